"""Continuous writes through the Patroni demo's web app: a failover, watched from outside.

    python -m teemesh.examples.dbwriter https://<webdemo app id>-8080.teemesh.localhost:8445 \\
        --cacert .teemesh/pgdemo/gateway-ca.pem

It POSTs ``/db/write?tag=<run>-<n>`` every ``--interval`` seconds, each on a new TLS connection
through the gateway (as a fresh client would), and prints a line whenever the member that
commits changes or writes start or stop failing. A write that got no answer is never sent again,
so a row can be in the database at most once per tag; a write that got an ``id`` was committed
(on a synchronous standby too, whenever Patroni has one). At the end (``--duration``, Ctrl-C or
SIGTERM) it prints, or writes to ``--out``, a JSON record of every write: what a test or a
benchmark checks the database and the failover timeline against.

Names under ``.localhost`` are dialled on 127.0.0.1, as curl does (RFC 6761), with the name kept
for SNI and the Host header.
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 5.0


@dataclass(frozen=True)
class Write:
    """One attempt: when it was sent and answered (epoch seconds), and what came back."""

    tag: str
    sent: float
    done: float
    status: int | None
    """The HTTP status; None when no answer came (refused, reset, timed out)."""
    id: int | None = None
    member: str | None = None
    error: str | None = None


@dataclass
class Record:
    """Every write of a run, in order, and what they add up to."""

    url: str
    run: str
    writes: list[Write] = field(default_factory=list)

    def acknowledged(self) -> dict[str, int]:
        """tag -> row id of every write the app confirmed."""
        return {w.tag: w.id for w in self.writes if w.status == 200 and w.id is not None}

    def outages(self) -> list[tuple[float, float]]:
        """(first failure sent, next success answered) for each run of failed writes."""
        spans, start = [], None
        for w in self.writes:
            if w.status != 200 and start is None:
                start = w.sent
            elif w.status == 200 and start is not None:
                spans.append((start, w.done))
                start = None
        if start is not None:
            spans.append((start, self.writes[-1].done))
        return spans

    def summary(self) -> dict[str, Any]:
        outages = self.outages()
        return {
            "url": self.url,
            "run": self.run,
            "writes": len(self.writes),
            "acknowledged": len(self.acknowledged()),
            "failed": sum(w.status != 200 for w in self.writes),
            "members": sorted({w.member for w in self.writes if w.member}),
            "longest_outage": round(max((b - a for a, b in outages), default=0.0), 3),
        }

    def to_json(self) -> dict[str, Any]:
        return self.summary() | {"records": [asdict(w) for w in self.writes]}


class Writer:
    """POSTs one write at a time to ``url``, trusting ``cafile`` (None: the system's CAs)."""

    def __init__(self, url: str, cafile: str | None, run: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{url!r} is not an https:// URL")
        self.host, self.port = parts.hostname, parts.port or 443
        self.dial = "127.0.0.1" if self.host.endswith(".localhost") else self.host
        self.base = parts.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=cafile)
        self.record = Record(url, run or secrets.token_hex(4))
        self.stopping = threading.Event()

    def status(self) -> Any:
        """The app's ``GET /db/status``: which member each route reached, and its role."""
        return self.request("GET", self.base + "/db/status")[1]

    def master(self) -> str | None:
        """The member that ``postgres-master`` reaches now; None when the app cannot tell."""
        try:
            doc = self.status()
        except (OSError, http.client.HTTPException, ValueError):
            return None
        master = doc.get("master") if isinstance(doc, dict) else None
        member = master.get("member") if isinstance(master, dict) else None
        return member if isinstance(member, str) else None

    def write_once(self, n: int) -> Write:
        tag = f"{self.record.run}-{n}"
        sent = time.time()
        try:
            status, doc = self.request("POST", f"{self.base}/db/write?tag={tag}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return Write(tag, sent, time.time(), None, error=f"{type(exc).__name__}: {exc}")
        if status != 200:
            error = str(doc.get("error")) if isinstance(doc, dict) else f"HTTP {status}"
            return Write(tag, sent, time.time(), status, error=error)
        try:
            row, member = int(doc["id"]), doc.get("member")
        except (TypeError, KeyError, ValueError):
            return Write(tag, sent, time.time(), None, error=f"not the app's answer: {doc!r:.80}")
        return Write(tag, sent, time.time(), status, row, member)

    def request(self, method: str, path: str) -> tuple[int, Any]:
        """One request on a new connection: (status, the JSON answer)."""
        raw = socket.create_connection((self.dial, self.port), timeout=TIMEOUT)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        conn.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        try:
            conn.request(method, path, headers={"Content-Length": "0"})
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"null")
        finally:
            conn.close()

    def run(self, interval: float, duration: float | None, say: Any = None) -> Record:
        """Write until ``duration`` passes or ``stopping`` is set; ``say`` gets the changes."""
        end = None if duration is None else time.monotonic() + duration
        last: tuple[bool, str | None] | None = None
        n = 0
        while not self.stopping.is_set() and (end is None or time.monotonic() < end):
            write = self.write_once(n)
            self.record.writes.append(write)
            n += 1
            now = (write.status == 200, write.member)
            if say is not None and now != last:
                what = f"writes commit on {write.member}" if now[0] else f"failing: {write.error}"
                say(f"{time.strftime('%H:%M:%S', time.localtime(write.done))} {what}")
                last = now
            self.stopping.wait(interval)
        return self.record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m teemesh.examples.dbwriter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("url", help="the web app through the gateway: https://<app id>-8080.<domain>")
    p.add_argument("--cacert", help="the CA the gateway's certificate is signed by")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between writes")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--out", type=Path, help="write the JSON record here instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no line per change")
    args = p.parse_args(argv)
    try:
        writer = Writer(args.url, args.cacert)
    except (ValueError, OSError) as exc:
        p.error(str(exc))

    def stop(_signum: int, _frame: object) -> None:
        writer.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    record = writer.run(args.interval, args.duration, say)
    text = json.dumps(record.to_json())
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)
    print(json.dumps(record.summary()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
