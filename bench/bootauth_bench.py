"""Boot authorization over the webhook: one KMS check against a real auth-simple on loopback.

    .venv/bin/python bench/bootauth_bench.py

Printed, never asserted. Each KMS GetAppKey pays this once for the app and once for itself.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    with tempfile.TemporaryDirectory() as folder, socket.socket() as probe:
        config = Path(folder) / "auth.json"
        config.write_text(
            json.dumps(
                {
                    "osImages": [INFO.os_image_hash.hex()],
                    "apps": {INFO.app_id.hex(): {"composeHashes": [INFO.compose_hash.hex()]}},
                }
            )
        )
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        teemesh = Path(sys.executable).parent / "teemesh"
        args = [str(teemesh), "kms", "auth-simple", "--config", str(config)]
        server = subprocess.Popen(
            [*args, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("auth-simple did not start") from None
                    time.sleep(0.05)
            with WebhookAuth(f"http://127.0.0.1:{port}") as auth:
                for _ in range(20):  # warm up
                    assert auth.authorize(INFO, "app").is_allowed
                samples = []
                for _ in range(ROUNDS):
                    start = time.perf_counter()
                    auth.authorize(INFO, "app")
                    samples.append((time.perf_counter() - start) * 1000)
        finally:
            server.terminate()
            server.wait()
    samples.sort()
    p99 = samples[int(len(samples) * 0.99)]
    rate = 1000 / statistics.mean(samples)
    p50 = statistics.median(samples)
    print(f"webhook authorize: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rate:.0f}/s")


if __name__ == "__main__":
    main()
