"""Boot authorization over the webhook: one KMS check against a real auth-simple on loopback.

    .venv/bin/python bench/bootauth_bench.py

Printed, never asserted. Each KMS GetAppKey pays this once for the app and once for itself.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

from _harness import Processes, free_port, percentile

from teemesh.platform.bootauth import BootInfo, WebhookAuth

ROUNDS = 300
INFO = BootInfo(
    mr_aggregated=bytes(32),
    os_image_hash=b"\x11" * 32,
    app_id=b"\x22" * 20,
    compose_hash=b"\x33" * 32,
    instance_id=b"\x01" * 20,
    device_id=b"\x02" * 32,
    tcb_status="UpToDate",
)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


def main() -> None:
    procs = Processes()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "auth.json"
        config.write_text(
            json.dumps(
                {
                    "osImages": [INFO.os_image_hash.hex()],
                    "apps": {INFO.app_id.hex(): {"composeHashes": [INFO.compose_hash.hex()]}},
                }
            )
        )
        port = free_port()
        args = ["kms", "auth-simple", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        log = Path(folder) / "auth-simple.log"
        try:  # started, and stopped (SIGTERM, then SIGKILL after 10 s), by its PID
            procs.start("kms auth-simple", args, log, lambda: _listening(port))
            with WebhookAuth(f"http://127.0.0.1:{port}") as auth:
                for _ in range(20):  # warm up
                    assert auth.authorize(INFO, "app").is_allowed
                samples = []
                for _ in range(ROUNDS):
                    start = time.perf_counter()
                    auth.authorize(INFO, "app")
                    samples.append((time.perf_counter() - start) * 1000)
        finally:
            procs.stop()
    p99 = percentile(samples, 0.99)
    rate = 1000 / statistics.mean(samples)
    p50 = statistics.median(samples)
    print(f"webhook authorize: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rate:.0f}/s")


if __name__ == "__main__":
    main()
