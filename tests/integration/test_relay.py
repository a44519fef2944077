"""The byte relay (``net.relay``) in process, on loopback, on both event loops.

The path is the sidecar's: a client's TCP connection reaches a *front* that joins it
(``TcpLeg``) with a mesh TLS connection (client ``TlsLeg``) to a *back*, which joins its
server ``TlsLeg`` with a TCP connection (``TcpLeg``) to a backend::

    client --tcp--> front [TcpLeg|TlsLeg] --mTLS--> back [TlsLeg|TcpLeg] --tcp--> backend

Every wait is bounded: a whole test gets ``WAIT`` seconds, one step ``STEP``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from teemesh.identity.certs import cert_pem, new_p256_key, pem_pair
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.net.relay import IdleSweeper, Leg, TcpLeg, TlsLeg, join
from teemesh.net.tls import PemPair, tls_context

pytestmark = pytest.mark.integration
T = TypeVar("T")

WAIT = 15.0
STEP = 5.0
HOST = "127.0.0.1"

CA_KEY = mesh_ca_key(b"\x01" * 32)
CA = mesh_ca_cert(CA_KEY, "demo")
OTHER_KEY = mesh_ca_key(b"\x02" * 32)
OTHER_CA = mesh_ca_cert(OTHER_KEY, "demo")  # same cluster name, another key
CA_PEM = cert_pem(CA)


def svid(name: str, ca_key: Any = CA_KEY, ca: Any = CA) -> PemPair:
    key = new_p256_key()
    cert = issue_svid(
        ca_key, ca, key.public_key(), spiffe=f"spiffe://demo/g/{name}", peer_id=name,
        app_id=b"a" * 20, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1),
    )  # fmt: skip
    return pem_pair(cert, key)


FRONT_CTX = tls_context(server=False, identity=svid("front"), verify=CA_PEM)
BACK_CTX = tls_context(server=True, identity=svid("back"), verify=CA_PEM)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a test's coroutine on a fresh loop of the kind the parameter names, within WAIT."""

    def runner(main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            return loop_runner.run(asyncio.wait_for(main, WAIT))

    return runner


async def step(awaitable: Awaitable[T], timeout: float = STEP) -> T:
    return await asyncio.wait_for(awaitable, timeout)


async def until(what: str, check: Callable[[], bool], timeout: float = STEP) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Relay:
    """A front and a back on loopback, relaying to ``backend`` (a stream handler)."""

    def __init__(
        self,
        backend: Handler,
        *,
        front_ctx: ssl.SSLContext = FRONT_CTX,
        back_ctx: ssl.SSLContext = BACK_CTX,
        sweeper: IdleSweeper | None = None,
    ) -> None:
        self.backend = backend
        self.front_ctx, self.back_ctx = front_ctx, back_ctx
        self.sweeper = sweeper
        self.legs: list[Leg] = []
        self.front_tls: list[TlsLeg] = []
        self.back_tls: list[TlsLeg] = []
        self.failures: list[tuple[str, BaseException]] = []
        self.closes: list[tuple[Leg, BaseException | None]] = []
        self.backend_connections = 0
        self.backend_writers: list[asyncio.StreamWriter] = []
        self.servers: list[asyncio.Server | asyncio.AbstractServer] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Relay:
        loop = asyncio.get_running_loop()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.backend_connections += 1
            self.backend_writers.append(writer)
            try:
                await self.backend(reader, writer)
            except (ConnectionError, TimeoutError):
                pass
            finally:
                writer.close()

        backend = await asyncio.start_server(serve, HOST, 0)
        self.backend_port = backend.sockets[0].getsockname()[1]
        back = await loop.create_server(self._back_leg, HOST, 0)
        self.back_port = back.sockets[0].getsockname()[1]
        front = await loop.create_server(lambda: _Accepted(self), HOST, 0)
        self.port = front.sockets[0].getsockname()[1]
        self.servers = [front, back, backend]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for leg in self.legs:
            leg.abort()
        for writer in self.backend_writers:
            writer.transport.abort()
        if self.sweeper is not None:
            self.sweeper.stop()
        await asyncio.sleep(0.01)  # let connection_lost run

    def _track(self, leg: Leg) -> None:
        self.legs.append(leg)
        leg.on_close = lambda leg, exc: self.closes.append((leg, exc))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _join(self, a: Leg, b: Leg) -> None:
        join(a, b)
        if self.sweeper is not None:
            self.sweeper.add(a, b)

    # -- the front: a client's TcpLeg joined with a TlsLeg to the back ----------------------

    async def dial_back(self, client: TcpLeg) -> None:
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[bool] = loop.create_future()

        def done(ok: bool) -> None:
            if not handshake.done():
                handshake.set_result(ok)

        def failed(_leg: TlsLeg, exc: BaseException) -> None:
            self.failures.append(("front", exc))
            done(False)

        try:
            _, tls = await loop.create_connection(
                lambda: TlsLeg(self.front_ctx, server_side=False,
                               on_handshake=lambda _leg: done(True), on_failure=failed),
                HOST, self.back_port,
            )  # fmt: skip
        except OSError:
            client.abort()
            return
        self._track(tls)
        self.front_tls.append(tls)
        if await step(handshake):
            self._join(client, tls)
        else:
            client.abort()

    # -- the back: a server TlsLeg joined with a TcpLeg to the backend ----------------------

    def _back_leg(self) -> TlsLeg:
        leg = TlsLeg(
            self.back_ctx, server_side=True,
            on_handshake=lambda leg: self.spawn(self.dial_backend(leg)),
            on_failure=lambda _leg, exc: self.failures.append(("back", exc)),
        )  # fmt: skip
        self._track(leg)
        self.back_tls.append(leg)
        return leg

    async def dial_backend(self, tls: TlsLeg) -> None:
        loop = asyncio.get_running_loop()
        _, tcp = await loop.create_connection(TcpLeg, HOST, self.backend_port)
        self._track(tcp)
        self._join(tls, tcp)

    # -- what the tests look at -------------------------------------------------------------

    def buffered(self) -> int:
        """Bytes the relay holds in user space: write buffers and held bytes of every leg."""
        total = 0
        for leg in self.legs:
            total += leg.held_bytes
            if leg.transport is not None and not leg.closed:
                total += leg.transport.get_write_buffer_size()
        return total

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await step(asyncio.open_connection(HOST, self.port))


class _Accepted(TcpLeg):
    """A client's connection to the front: dials the back once it is made."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        relay._track(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.spawn(self.relay.dial_back(self))


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await step(reader.read())


async def sees_reset(reader: asyncio.StreamReader, timeout: float = STEP) -> str:
    """How the stream ended: 'reset', or 'clean EOF after N bytes' (what a cut must never be)."""
    received = 0
    try:
        while chunk := await step(reader.read(65536), timeout):
            received += len(chunk)
    except (ConnectionResetError, ConnectionAbortedError, asyncio.IncompleteReadError):
        return "reset"
    return f"clean EOF after {received} bytes"


# -- half-close ------------------------------------------------------------------------------


def test_client_half_close_still_gets_the_full_reply(run: Any) -> None:
    reply = os.urandom(300_000)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_all(reader)  # to the client's EOF
        writer.write(hashlib.sha256(request).digest() + reply)
        await step(writer.drain())

    async def main() -> None:
        async with Relay(backend) as relay:
            reader, writer = await relay.connect()
            request = os.urandom(100_000)
            writer.write(request)
            writer.write_eof()
            got = await read_all(reader)
            assert got == hashlib.sha256(request).digest() + reply
            writer.close()
            # every leg ends, and cleanly: both ways ended, no error, no abort
            await until("all legs closed", lambda: len(relay.closes) == 4)
            assert [exc for _, exc in relay.closes] == [None] * 4
            assert all(leg.eof_in and leg.eof_out for leg in relay.legs)
            assert relay.failures == []

    run(main())


def test_backend_half_close_first_still_gets_the_clients_later_bytes(run: Any) -> None:
    got_late: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        got_late.append(await read_all(reader))

    async def main() -> None:
        async with Relay(backend) as relay:
            reader, writer = await relay.connect()
            assert await read_all(reader) == b"greeting"  # the backend's EOF came through
            late = os.urandom(200_000)
            writer.write(late)
            await step(writer.drain())
            writer.write_eof()
            await until("the backend's read to EOF", lambda: bool(got_late))
            assert got_late == [late]
            await until("all legs closed", lambda: len(relay.closes) == 4)
            assert [exc for _, exc in relay.closes] == [None] * 4
            writer.close()

    run(main())


# -- volume and backpressure -----------------------------------------------------------------

SIZE = 64 * 1024 * 1024
STALL = 0.3
MAX_BUFFERED = 8 * 1024 * 1024  # four legs, each pausing its partner past 1 MiB


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_64_mib_arrive_intact_with_bounded_buffers(run: Any, direction: str) -> None:
    """The receiver stalls for a while first: the relay must pause, not buffer the stream."""
    data = os.urandom(SIZE)
    digest = hashlib.sha256(data).digest()
    sent = [0]
    sent_when_stalled: list[int] = []

    async def send(writer: asyncio.StreamWriter) -> None:
        view = memoryview(data)
        for offset in range(0, SIZE, 1 << 20):
            writer.write(view[offset : offset + (1 << 20)])
            await step(writer.drain())
            sent[0] = offset + (1 << 20)
        writer.write_eof()

    async def receive(reader: asyncio.StreamReader) -> bytes:
        first = await step(reader.read(65536))
        await asyncio.sleep(STALL)  # not reading: the sender must be held back
        sent_when_stalled.append(sent[0])
        hasher = hashlib.sha256(first)
        while chunk := await step(reader.read(1 << 20)):
            hasher.update(chunk)
        return hasher.digest()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if direction == "upload":
            writer.write(await receive(reader))
        else:
            await send(writer)
            await read_all(reader)

    async def main() -> None:
        async with Relay(backend) as relay:
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, relay.buffered())
                    await asyncio.sleep(0.001)

            sampler = asyncio.get_running_loop().create_task(sample())
            reader, writer = await relay.connect()
            if direction == "upload":
                await send(writer)
                assert await read_all(reader) == digest
            else:
                assert await receive(reader) == digest
                writer.write_eof()
            sampler.cancel()
            writer.close()
            assert 0 < peak <= MAX_BUFFERED, f"the relay held {peak} bytes at once"
            # kernel buffers absorb some (tens of MiB on loopback), never the whole stream
            assert sent_when_stalled[0] < SIZE, "the stalled receiver did not hold the sender back"
            await until("all legs closed", lambda: len(relay.closes) == 4)
            assert [exc for _, exc in relay.closes] == [None] * 4

    run(main())


# -- truncation and failures -----------------------------------------------------------------


@pytest.mark.parametrize("cut", ["front", "back"])
def test_tcp_end_without_close_notify_is_a_reset_on_both_far_sides(run: Any, cut: str) -> None:
    """One TLS side's TCP ends without close_notify: neither the client nor the backend may
    see a clean EOF (it would pass a cut stream off as complete)."""
    outcome: asyncio.Future[str] | None = None

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await step(reader.readexactly(4)) == b"ping"
        writer.write(b"pong")
        assert outcome is not None
        outcome.set_result(await sees_reset(reader))

    async def main() -> None:
        nonlocal outcome
        outcome = asyncio.get_running_loop().create_future()
        async with Relay(backend) as relay:
            reader, writer = await relay.connect()
            writer.write(b"ping")
            assert await step(reader.readexactly(4)) == b"pong"
            tls = (relay.front_tls if cut == "front" else relay.back_tls)[0]
            assert tls.transport is not None
            tls.transport.close()  # a TCP FIN, and no close_notify before it
            client_saw = await sees_reset(reader)
            backend_saw = await step(outcome)
            writer.close()
            assert (client_saw, backend_saw) == ("reset", "reset")

    run(main())


def test_tls_leg_takes_a_bare_tcp_eof_as_truncation(run: Any) -> None:
    """The back's TlsLeg itself: TCP EOF without close_notify aborts it and its partner."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await sees_reset(reader)

    async def main() -> None:
        async with Relay(backend) as relay:
            _reader, writer = await relay.connect()
            writer.write(b"x")
            await until("the backend connected", lambda: len(relay.legs) == 4)
            front_tls = relay.front_tls[0]
            assert front_tls.transport is not None
            front_tls.transport.write_eof()  # half-close the TCP, no close_notify
            await until("the back's legs closed", lambda: len(relay.closes) == 4)
            back_tls = relay.back_tls[0]
            assert not back_tls.eof_in, "a bare TCP EOF was taken for the peer's close_notify"
            assert all(leg.closed for leg in relay.legs)
            writer.close()

    run(main())


def test_client_certificate_from_another_ca_fails_the_handshake(run: Any) -> None:
    stranger = tls_context(server=False, identity=svid("x", OTHER_KEY, OTHER_CA), verify=CA_PEM)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("a refused peer reached the backend")

    async def main() -> None:
        async with Relay(backend, front_ctx=stranger) as relay:
            reader, writer = await relay.connect()
            writer.write(b"early bytes")
            await sees_reset(reader)
            await until("the back's failure", lambda: any(s == "back" for s, _ in relay.failures))
            back = [exc for side, exc in relay.failures if side == "back"]
            assert len(back) == 1
            assert isinstance(back[0], ssl.SSLError)
            assert "certificate" in str(back[0]).lower()
            assert not relay.back_tls[0].handshaken
            assert relay.backend_connections == 0
            writer.close()

    run(main())


def test_server_certificate_from_another_ca_fails_the_handshake(run: Any) -> None:
    impostor = tls_context(server=True, identity=svid("y", OTHER_KEY, OTHER_CA), verify=CA_PEM)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("a refused peer reached the backend")

    async def main() -> None:
        async with Relay(backend, back_ctx=impostor) as relay:
            reader, writer = await relay.connect()
            writer.write(b"early bytes")
            await sees_reset(reader)
            await until("both failures", lambda: len(relay.failures) == 2)
            failures = dict(relay.failures)
            assert isinstance(failures["front"], ssl.SSLCertVerificationError)
            assert not relay.front_tls[0].handshaken
            assert not relay.back_tls[0].handshaken
            assert relay.backend_connections == 0
            writer.close()

    run(main())


def test_failure_is_reported_once(run: Any) -> None:
    """on_failure runs once per leg, even when the abort it causes ends the connection."""
    stranger = tls_context(server=False, identity=svid("x", OTHER_KEY, OTHER_CA), verify=CA_PEM)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("unreachable")

    async def main() -> None:
        async with Relay(backend, front_ctx=stranger) as relay:
            reader, writer = await relay.connect()
            await sees_reset(reader)
            await until("all legs closed", lambda: len(relay.closes) == 3)
            await asyncio.sleep(0.05)
            assert sorted(side for side, _ in relay.failures) == ["back", "front"]
            writer.close()

    run(main())


# -- idle timeout ----------------------------------------------------------------------------


def test_idle_sweeper_closes_an_idle_relay_and_keeps_a_busy_one(run: Any) -> None:
    timeout = 0.2

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await step(reader.read(65536)):
            writer.write(data)

    async def main() -> None:
        sweeper = IdleSweeper(timeout)
        async with Relay(echo, sweeper=sweeper) as relay:
            idle_r, idle_w = await relay.connect()
            busy_r, busy_w = await relay.connect()
            for reader, writer in ((idle_r, idle_w), (busy_r, busy_w)):
                writer.write(b"hi")
                assert await step(reader.readexactly(2)) == b"hi"
            assert len(sweeper.pairs) == 4  # front and back pair of each
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < 4 * timeout:
                busy_w.write(b"beat")
                assert await step(busy_r.readexactly(4)) == b"beat"
                await asyncio.sleep(timeout / 5)
            # the idle relay is gone (the client sees its end), the busy one still echoes
            await sees_reset(idle_r, timeout)  # already ended: no need to wait
            busy_legs = {leg for leg in relay.legs if not leg.closed}
            assert len(busy_legs) == 4
            assert len(sweeper.pairs) == 2
            busy_w.write(b"still")
            assert await step(busy_r.readexactly(5)) == b"still"
            for writer in (idle_w, busy_w):
                writer.close()

    run(main())
