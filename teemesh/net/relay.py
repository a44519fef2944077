"""The data plane's edge: byte relays between two connections, with asyncio protocols.

A ``Leg`` is one connection (cleartext TCP, or TLS done here over memory BIOs so that a TLS 1.3
close_notify is a half-close, which asyncio's own TLS transport cannot do). Two legs are
``join``ed: what one receives the other sends, with backpressure (a leg whose write buffer is
full pauses its partner's reading), half-close in both directions, and an idle timeout.
Before a leg is joined, what it receives goes to its ``sink`` (a tunnel's header parser) or is
held, up to a bound past which reading pauses.

Closing: a leg that has both sent and received EOF closes cleanly; a leg that fails (reset,
TLS error, truncation) aborts its partner, so a cut stream never looks complete on the far side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from typing import cast

HELD_LIMIT = 256 * 1024
"""Bytes held for a leg not yet joined before its reading pauses."""
WRITE_HIGH, WRITE_LOW = 1024 * 1024, 256 * 1024
TLS_READ = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, timeout 0: close() sends a TCP RST."""

Sink = Callable[[list[bytes]], None]


class Leg(asyncio.Protocol):
    """One side of a relay. Subclasses turn transport events into ``_received``/``_eof``."""

    transport: asyncio.Transport | None = None

    def __init__(self) -> None:
        self.partner: Leg | None = None
        self.sink: Sink | None = None
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.received = 0
        self.active = True
        self.eof_in = self.eof_out = self.closed = False
        self.on_close: Callable[[Leg, BaseException | None], None] | None = None
        self._paused = False

    # -- what the transport tells us ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        clean = exc is None and self.eof_in and self.eof_out
        partner = self.partner
        if partner is not None and not partner.closed:
            if clean:
                partner.close()
            else:
                partner.abort()
        if self.on_close is not None:
            self.on_close(self, exc)
        # break the reference cycles (partners, callbacks capturing legs), so a closed leg's
        # OpenSSL state is freed now rather than at the next garbage collection
        self.on_close = self.sink = None
        if partner is not None and partner.closed:
            partner.partner = self.partner = None

    def pause_writing(self) -> None:
        if self.partner is not None:
            self.partner.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None:
            self.partner.resume_reading()

    # -- what subclasses call ----------------------------------------------------------------

    def _received(self, chunks: list[bytes]) -> None:
        self.active = True
        for chunk in chunks:
            self.received += len(chunk)
        if self.partner is not None:
            self.partner.send(chunks)
        elif self.sink is not None:
            self.sink(chunks)
        else:
            self.hold(chunks)

    def _eof(self) -> None:
        self.eof_in = True
        if self.partner is not None:
            self.partner.send_eof()
        if self.eof_out:
            self.close()

    # -- what the relay and tunnels call -----------------------------------------------------

    def hold(self, chunks: list[bytes]) -> None:
        """Keep ``chunks`` until the leg is joined; past ``HELD_LIMIT`` stop reading."""
        self.held.extend(chunks)
        self.held_bytes += sum(len(c) for c in chunks)
        if self.held_bytes > HELD_LIMIT:
            self.pause_reading()

    def take_held(self) -> list[bytes]:
        held, self.held, self.held_bytes = self.held, [], 0
        self.resume_reading()
        return held

    def send(self, chunks: list[bytes]) -> None:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Flush what is buffered, then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (a reset): the far end must not mistake it for a clean end."""
        if self.transport is not None:
            self.transport.abort()
        else:
            self.closed = True


class TcpLeg(Leg):
    def abort(self) -> None:
        """A reset: asyncio's abort() alone closes with a FIN, a clean end to the far side."""
        if self.transport is not None and not self.transport.is_closing():
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):  # uvloop: closed pseudo-socket
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        super().abort()

    def data_received(self, data: bytes) -> None:
        self._received([data])

    def eof_received(self) -> bool:
        self._eof()
        return True  # keep writing: half-close

    def send(self, chunks: list[bytes]) -> None:
        assert self.transport is not None
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writelines(chunks)

    def send_eof(self) -> None:
        if self.eof_out or self.transport is None or self.transport.is_closing():
            return
        self.eof_out = True
        self.transport.write_eof()
        if self.eof_in:
            self.close()


class TlsLeg(Leg):
    """TLS over a plain transport. ``on_handshake`` runs once the peer is authenticated by
    OpenSSL; it may refuse the peer by raising, which aborts the connection. A client may offer
    a ``session`` from an earlier connection to the same peer: resuming it halves the
    handshake's CPU (no signature, no chain to verify), and the peer's certificate is the one
    the session was made with. ``server_hostname`` is sent as SNI only (a gateway in TLS
    passthrough routes by it); who the peer is, ``on_handshake`` decides."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        on_handshake: Callable[[TlsLeg], None],
        on_failure: Callable[[TlsLeg, BaseException], None] | None = None,
        session: ssl.SSLSession | None = None,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._in,
            self._out,
            server_side=server_side,
            session=session,
            server_hostname=server_hostname,
        )
        self.handshaken = False
        self.on_handshake = on_handshake
        self.on_failure = on_failure
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        self._handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshaken and self.on_failure is not None:
            self.on_failure(self, exc or ConnectionError("closed during the TLS handshake"))
        self.on_failure = None
        self.on_handshake = _no_handshake
        super().connection_lost(exc)

    def peer_der(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)

    def _handshake_timeout(self) -> None:
        self._fail(TimeoutError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        if self.on_failure is not None:
            self.on_failure(self, exc)
            self.on_failure = None
        self.abort()

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert, so the peer learns why
            self._fail(exc)
            return
        self._flush()
        self.handshaken = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            self.on_handshake(self)
        except Exception as exc:
            self._fail(exc)

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken or self.closed:
                return
        chunks: list[bytes] = []
        eof = False
        try:
            while True:
                chunk = self.tls.read(TLS_READ)
                if not chunk:  # the peer's close_notify (raised instead once we sent ours)
                    eof = True
                    break
                chunks.append(chunk)
                if not self._in.pending and not self.tls.pending():
                    break  # all read: spare the exception another read would raise
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()  # TLS 1.3 tickets and key updates
        if chunks:
            self._received(chunks)
        if eof and not self.eof_in:
            self._eof()

    def eof_received(self) -> bool:
        if not self.eof_in:  # TCP ended without close_notify: a truncation, never a clean end
            self.abort()
            return False
        return True

    def send(self, chunks: list[bytes]) -> None:
        if self.eof_out or self.closed:
            return
        try:
            for chunk in chunks:
                self.tls.write(chunk)
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()

    def send_eof(self) -> None:
        if not self.handshaken:  # nothing to end cleanly yet
            self.abort()
            return
        if self.eof_out or self.closed:
            return
        self.eof_out = True
        try:
            self.tls.unwrap()  # sends close_notify; TLS 1.3 keeps the other direction open
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()
        if self.eof_in:
            self.close()

    def _flush(self) -> None:
        if not self._out.pending:
            return
        data = self._out.read()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _no_handshake(_leg: TlsLeg) -> None:
    """What a closed leg's ``on_handshake`` becomes (the real one may hold the leg's owner)."""


def join(a: Leg, b: Leg) -> None:
    """Relay between ``a`` and ``b`` from now on, first passing on what each held."""
    a.partner, b.partner = b, a
    a.sink = b.sink = None
    for src, dst in ((a, b), (b, a)):
        held = src.take_held()
        if held:
            dst.send(held)
        if src.eof_in:
            dst.send_eof()
        if src.closed and not dst.closed:
            dst.abort()


class IdleSweeper:
    """Closes relays idle for ``timeout`` seconds, with one timer for all of them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pairs: set[tuple[Leg, Leg]] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, a: Leg, b: Leg) -> None:
        self.pairs.add((a, b))
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def discard(self, a: Leg, b: Leg) -> None:
        self.pairs.discard((a, b))

    def _sweep(self) -> None:
        self._handle = None
        for pair in list(self.pairs):
            a, b = pair
            if a.closed and b.closed:
                self.pairs.discard(pair)
            elif not (a.active or b.active):
                self.pairs.discard(pair)
                a.abort()
                b.abort()
            else:
                a.active = b.active = False
        if self.pairs:
            self._handle = asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
