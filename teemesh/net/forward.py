"""``python -m teemesh.net.forward LISTEN TARGET``: relay every TCP connection to TARGET.

The local platform publishes its gateway on the host with it (``127.0.0.1:8443`` to the gateway
CVM's port on the bridge): this machine has no netfilter to forward ports with. Bytes pass as
they are, TLS included, with half-close and backpressure (``relay``); a target that does not
answer closes the client's connection.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from teemesh.checks import split_host_port
from teemesh.net.relay import IdleSweeper, TcpLeg, join

CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 3600.0


class Forwarder:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sweeper = IdleSweeper(IDLE_TIMEOUT)
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> TcpLeg:
        return _Accepted(self)

    async def connect(self, client: TcpLeg) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(TcpLeg, *self.target), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            client.abort()
            return
        if client.closed:
            upstream.abort()
            return
        self.sweeper.add(client, upstream)
        join(client, upstream)


class _Accepted(TcpLeg):
    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self.forwarder.connect(self))
        self.forwarder.tasks.add(task)
        task.add_done_callback(self.forwarder.tasks.discard)


def _host_port(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Forwarder(target), *listen, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m teemesh.net.forward LISTEN_HOST:PORT TARGET_HOST:PORT")
    listen, target = _host_port(argv[0]), _host_port(argv[1])
    try:
        uvloop.run(serve(listen, target))
    except OSError as exc:
        raise SystemExit(f"cannot listen on {argv[0]}: {exc}") from exc


if __name__ == "__main__":
    main(sys.argv[1:])
