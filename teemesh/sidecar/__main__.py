"""The sidecar process, ``python -m teemesh.sidecar LAUNCH.json``: what ``sidecar run`` becomes.

Only the data plane's modules load here (asyncio, uvloop, ssl, h11): no CLI framework, no
pydantic, no X.509 library, so an idle sidecar stays small. SIGTERM or SIGINT drains it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvloop

from teemesh.errors import MeshError
from teemesh.logs import setup_json_logging
from teemesh.sidecar.launch import Launch
from teemesh.sidecar.service import Sidecar


async def serve(sidecar: Sidecar) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = loop.create_task(sidecar.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start ends the process with its error
        await stopping
    else:
        starting.cancel()
    await sidecar.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m teemesh.sidecar LAUNCH.json (see teemesh sidecar run)\n")
        return 2
    path = Path(argv[0])
    try:
        launch = Launch.read(path)
    except MeshError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    setup_json_logging(launch.log_level)
    sidecar = Sidecar(launch.config, path, hosts_file=Path(launch.hosts_file))
    try:
        uvloop.run(serve(sidecar))
    except (OSError, MeshError) as exc:
        sys.stderr.write(f"Error: sidecar: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
