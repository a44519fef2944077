"""The etcd backend: etcd v3 through its own JSON gateway, over httpx.

Why the gateway (``/v3/kv/*``, ``/v3/lease/*``, ``/v3/watch``) and not a gRPC client: it needs
no dependency beyond httpx, which teemesh already uses; nothing ties us to grpcio and protobuf
versions (the coupling that broke PyPI's ``etcd3``); it is async like the rest of the control
plane; and Patroni's etcd3 backend has run on this same gateway for years. Every etcd 3.4+
serves it on the client port. The costs are base64 keys and values and int64s as JSON strings
(translated here) and one HTTP connection per watch (the catalog should share a watch per
prefix rather than open one per client).

Keys live under a prefix, ``/teemesh/<cluster>/`` (``cluster_prefix``), so several clusters,
or tests, can share one etcd. Revisions and lease ids are etcd's own and span the whole etcd.
A request that could not connect is tried on the next endpoint (it never reached etcd, so even
a write is safe to repeat); any other transport failure is UNAVAILABLE, as is a reply that is
not etcd's JSON.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import httpx

from teemesh.catalog.store import (
    CasResult,
    Event,
    EventType,
    KeyValue,
    Lease,
    Snapshot,
    Store,
    StoreError,
    StoreErrorReason,
    Watch,
    by_revision,
    invalid,
    lease_not_found,
    prefix_end,
    unavailable,
)
from teemesh.encoding import DNS_LABEL

_INVALID_ARGUMENT, _OUT_OF_RANGE = 3, 11  # gRPC status codes meaning "the request is wrong"


def cluster_prefix(cluster: str) -> str:
    """Where a cluster's keys live in a shared etcd: ``/teemesh/<cluster>/``."""
    if not DNS_LABEL.fullmatch(cluster):
        raise invalid("cluster", "must be 1-63 lowercase letters, digits or '-' (a DNS label)")
    return f"/teemesh/{cluster}/"


class EtcdStore(Store):
    """The store in etcd; open it with ``await EtcdStore.open(endpoints, prefix=...)``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        endpoints: list[str],
        prefix: str,
        timeout: float,
        watch_idle: float,
    ) -> None:
        self._http: httpx.AsyncClient | None = http
        self.endpoints = endpoints
        self.prefix = prefix
        self.timeout = timeout
        self.watch_idle = watch_idle
        self._namespace = prefix.encode()
        self._current = 0  # the endpoint that answered last
        self._watches: set[_EtcdWatch] = set()

    @classmethod
    async def open(
        cls,
        endpoints: str | Sequence[str],
        *,
        prefix: str,
        timeout: float = 5.0,
        watch_idle: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> EtcdStore:
        """Connect to etcd (``http[s]://host:port``, one or more members); check it answers.

        ``timeout`` bounds each request; a watch silent for ``watch_idle`` seconds is re-created
        (transparently, from its next revision) to prove etcd is still there.
        """
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not urls or not all(re.fullmatch(r"https?://[^/\s]+/?", url) for url in urls):
            raise invalid("endpoints", "must be one or more http(s)://host:port URLs")
        if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 2:
            raise invalid("prefix", "must start and end with '/', like /teemesh/<cluster>/")
        if not timeout > 0 or not watch_idle > 0:
            raise invalid("timeout", "timeouts must be positive seconds")
        http = httpx.AsyncClient(
            timeout=timeout,
            verify=tls or True,
            trust_env=False,  # never send etcd traffic through an HTTP proxy from the environment
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
        )
        store = cls(http, [url.rstrip("/") for url in urls], prefix, timeout, watch_idle)
        try:
            await store._revision()
        except BaseException:
            await http.aclose()
            raise
        return store

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is None:
            return
        for watch in list(self._watches):
            await watch._end(unavailable("the store was closed"))
        await http.aclose()

    # -- reads --------------------------------------------------------------------------------

    async def _get(self, key: str) -> KeyValue | None:
        reply = await self._call("/v3/kv/range", {"key": self._b64key(key)})
        kvs = reply.get("kvs", [])
        return self._key_value(kvs[0]) if kvs else None

    async def _range(self, prefix: str) -> Snapshot:
        reply = await self._call("/v3/kv/range", self._span(prefix))
        kvs = tuple(self._key_value(kv) for kv in reply.get("kvs", []))
        return Snapshot(kvs, _revision(reply))

    async def _revision(self) -> int:
        reply = await self._call("/v3/kv/range", {"key": _b64(self._namespace), "count_only": True})
        return _revision(reply)

    # -- writes -------------------------------------------------------------------------------

    async def _put(self, key: str, value: bytes, lease: int | None) -> int:
        return _revision(await self._call("/v3/kv/put", self._put_request(key, value, lease)))

    async def _delete(self, key: str) -> int | None:
        reply = await self._call("/v3/kv/deleterange", {"key": self._b64key(key)})
        return _revision(reply) if _int(reply.get("deleted")) else None

    async def _put_if(
        self, key: str, value: bytes, lease: int | None, mod_revision: int
    ) -> CasResult:
        request = {"request_put": self._put_request(key, value, lease)}
        return await self._txn(key, mod_revision, request)

    async def _delete_if(self, key: str, mod_revision: int) -> CasResult:
        request = {"request_delete_range": {"key": self._b64key(key)}}
        return await self._txn(key, mod_revision, request)

    async def _txn(self, key: str, mod_revision: int, on_success: dict[str, Any]) -> CasResult:
        """One etcd transaction: if mod_revision (0: absent) matches, write; else read the key."""
        compare = {
            "key": self._b64key(key),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": mod_revision,
        }
        reply = await self._call(
            "/v3/kv/txn",
            {
                "compare": [compare],
                "success": [on_success],
                "failure": [{"request_range": {"key": self._b64key(key)}}],
            },
        )
        if reply.get("succeeded"):
            return CasResult(True, _revision(reply), None)
        try:
            kvs = reply["responses"][0]["response_range"].get("kvs", [])
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _malformed("txn", exc) from exc
        return CasResult(False, _revision(reply), self._key_value(kvs[0]) if kvs else None)

    async def _compact(self, revision: int) -> None:
        try:
            await self._call("/v3/kv/compaction", {"revision": revision})
        except StoreError as exc:
            if exc.reason is not StoreErrorReason.COMPACTED:  # already compacted that far
                raise

    # -- leases -------------------------------------------------------------------------------

    async def _grant(self, ttl: int) -> Lease:
        reply = await self._call("/v3/lease/grant", {"TTL": ttl})
        return Lease(_int(reply.get("ID")), _int(reply.get("TTL")))

    async def _refresh(self, lease_id: int) -> Lease:
        reply = await self._call("/v3/lease/keepalive", {"ID": lease_id})
        result = reply.get("result")
        ttl = _int(result.get("TTL")) if isinstance(result, dict) else 0
        if ttl <= 0:  # etcd answers a keep-alive for an unknown lease with TTL 0
            raise lease_not_found(lease_id)
        return Lease(lease_id, ttl)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": lease_id})
        except StoreError as exc:
            if exc.reason is not StoreErrorReason.LEASE_NOT_FOUND:
                raise

    # -- watches ------------------------------------------------------------------------------

    def _watch(self, prefix: str, start_revision: int | None) -> Watch:
        return _EtcdWatch(self, prefix, start_revision)

    # -- the wire -----------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send(path, body)
        return _reply(response, response.content)

    async def _send(
        self, path: str, body: dict[str, Any], *, timeout: httpx.Timeout | None = None
    ) -> httpx.Response:
        """POST to the endpoint that answered last, moving on while a connection fails.

        With a ``timeout`` (watches), the reply is streamed: the caller closes it.
        """
        http = self._client()
        failures: list[str] = []
        for _ in self.endpoints:
            endpoint = self.endpoints[self._current]
            if timeout is None:
                request = http.build_request("POST", endpoint + path, json=body)
            else:
                request = http.build_request("POST", endpoint + path, json=body, timeout=timeout)
            try:
                return await http.send(request, stream=timeout is not None)
            except ssl.SSLError as exc:
                if not _refused_certificate(exc):  # the request may have been applied
                    raise unavailable(f"{endpoint}: {exc}") from exc
                failures.append(f"{endpoint}: {exc}")
                self._current = (self._current + 1) % len(self.endpoints)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{endpoint}: {exc or type(exc).__name__}")
                self._current = (self._current + 1) % len(self.endpoints)
            except httpx.HTTPError as exc:
                raise unavailable(f"{endpoint}: {exc or type(exc).__name__}") from exc
        raise unavailable(f"no etcd endpoint answered ({'; '.join(failures)})")

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise unavailable("the store is closed")
        return self._http

    def _b64key(self, key: str) -> str:
        return _b64(self._namespace + key.encode())

    def _span(self, prefix: str) -> dict[str, Any]:
        start = self._namespace + prefix.encode()
        end = prefix_end(start)
        assert end is not None  # the namespace ends with "/"
        return {"key": _b64(start), "range_end": _b64(end)}

    def _put_request(self, key: str, value: bytes, lease: int | None) -> dict[str, Any]:
        request: dict[str, Any] = {"key": self._b64key(key), "value": _b64(value)}
        if lease is not None:
            request["lease"] = lease
        return request

    def _key(self, encoded: object) -> str:
        raw = _unb64(encoded)
        if not raw.startswith(self._namespace):
            raise _malformed("key", ValueError(f"{raw[:80]!r} is outside {self.prefix}"))
        try:
            return raw[len(self._namespace) :].decode()
        except UnicodeDecodeError as exc:
            raise _malformed("key", exc) from exc

    def _key_value(self, kv: object) -> KeyValue:
        if not isinstance(kv, dict):
            raise _malformed("kv", TypeError(type(kv).__name__))
        return KeyValue(
            key=self._key(kv.get("key")),
            value=_unb64(kv.get("value", "")),
            create_revision=_int(kv.get("create_revision")),
            mod_revision=_int(kv.get("mod_revision")),
            version=_int(kv.get("version")),
            lease=_int(kv.get("lease")) or None,
        )

    def _events(self, raw: object) -> list[tuple[Event, ...]]:
        """A watch reply's events, one tuple per revision."""
        if not isinstance(raw, list):
            raise _malformed("events", TypeError(type(raw).__name__))
        return by_revision(self._event(item) for item in raw)

    def _event(self, item: Any) -> Event:
        kv = item.get("kv") if isinstance(item, dict) else None
        if not isinstance(kv, dict):
            raise _malformed("event", TypeError(type(kv).__name__))
        deleted = item.get("type") == "DELETE"  # PUT is the default, left out of the JSON
        return Event(
            EventType.DELETE if deleted else EventType.PUT,
            self._key(kv.get("key")),
            b"" if deleted else _unb64(kv.get("value", "")),
            _int(kv.get("mod_revision")),
        )


class _EtcdWatch(Watch):
    """One etcd watch: a POST to /v3/watch whose reply streams one JSON message per line.

    A stream silent for ``watch_idle`` seconds is closed and created again from the next
    revision, so a paused or cut-off etcd member shows up as UNAVAILABLE instead of a watch
    that waits forever (TCP alone would not notice).
    """

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int | None) -> None:
        super().__init__(prefix, start_revision)
        self._store = store
        self._stack = AsyncExitStack()
        self._lines: AsyncIterator[str] | None = None

    async def _open(self) -> None:
        await self._connect()
        self._store._watches.add(self)

    async def _receive(self) -> None:
        try:
            result = await self._message(self._store.watch_idle)
        except TimeoutError:
            await self._stack.aclose()
            await self._connect()  # from _next: after what is already queued
            return
        if result.get("canceled"):
            raise self._cancelled(result)
        self._queue(self._store._events(result.get("events", [])))

    async def _release(self) -> None:
        self._store._watches.discard(self)
        await self._stack.aclose()

    async def _connect(self) -> None:
        store = self._store
        create: dict[str, Any] = store._span(self._prefix)
        if self._next:
            create["start_revision"] = self._next
        self._stack = AsyncExitStack()
        try:
            response = await asyncio.wait_for(  # a paused etcd accepts and then says nothing
                store._send(
                    "/v3/watch",
                    {"create_request": create},
                    timeout=httpx.Timeout(store.timeout, read=None),
                ),
                store.timeout * len(store.endpoints),
            )
            self._stack.push_async_callback(response.aclose)
            if response.status_code != 200:
                _reply(response, await response.aread())
            self._lines = response.aiter_lines()
            created = await self._message(store.timeout)
            if not created.get("created"):
                raise unavailable("etcd did not confirm the watch")
        except TimeoutError as exc:
            await self._stack.aclose()
            raise unavailable(f"etcd did not confirm the watch in {store.timeout} s") from exc
        except BaseException:
            await self._stack.aclose()
            raise
        if not self._next:
            self._next = _revision(created) + 1  # "from now" is after etcd's revision at creation

    async def _message(self, timeout: float) -> dict[str, Any]:
        """The next message's result; TimeoutError when etcd said nothing for ``timeout`` s."""
        assert self._lines is not None
        try:
            line = ""
            while not line.strip():
                line = await asyncio.wait_for(anext(self._lines), timeout)
        except (StopAsyncIteration, httpx.HTTPError, httpx.StreamError, ssl.SSLError) as exc:
            ending = self._ending()  # closed or ended meanwhile: say so, not "stream ended"
            if ending is not None:
                raise ending from None
            raise unavailable(f"the watch stream ended: {exc or type(exc).__name__}") from exc
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise _malformed("watch", exc) from exc
        if not isinstance(message, dict) or "error" in message:
            raise _etcd_error(message if isinstance(message, dict) else {})
        result = message.get("result")
        if not isinstance(result, dict):
            raise _malformed("watch", TypeError(type(result).__name__))
        return result

    def _cancelled(self, result: dict[str, Any]) -> StoreError:
        compact = _int(result.get("compact_revision"))
        if compact:
            return StoreError(
                StoreErrorReason.COMPACTED,
                f"history before revision {compact} is gone (asked from {self._start})",
                field="start_revision",
                compact_revision=compact,
            )
        return unavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")


def _refused_certificate(exc: ssl.SSLError) -> bool:
    """A member refused our certificate (or we its): with TLS 1.3 its alert comes after the
    handshake, on the first read, which httpx lets through as ssl.SSLError; etcd ran nothing,
    so another member may be asked. Any other TLS error may follow a request it applied."""
    reason = str(exc.reason or "")
    return "CERTIFICATE" in reason or "UNKNOWN_CA" in reason


def _reply(response: httpx.Response, content: bytes) -> dict[str, Any]:
    """etcd's JSON reply, or the StoreError it stands for."""
    try:
        data = json.loads(content)
    except ValueError as exc:
        raise unavailable(
            f"{response.url} answered HTTP {response.status_code} with no JSON"
        ) from exc
    if not isinstance(data, dict):
        raise _malformed(str(response.url), TypeError(type(data).__name__))
    if response.status_code != 200 or "error" in data:
        raise _etcd_error(data)
    return data


def _etcd_error(data: dict[str, Any]) -> StoreError:
    """Map etcd's gRPC error to a reason (a stream error nests it under "error")."""
    detail = data.get("error")
    if isinstance(detail, dict):
        data = {"code": detail.get("grpc_code"), "message": detail.get("message")}
    message = str(data.get("message") or data.get("error") or "unknown error")
    code = data.get("code")
    if "lease not found" in message:
        return StoreError(StoreErrorReason.LEASE_NOT_FOUND, f"etcd: {message}", field="lease")
    if "compacted" in message:
        return StoreError(StoreErrorReason.COMPACTED, f"etcd: {message}")
    if code in (_INVALID_ARGUMENT, _OUT_OF_RANGE):
        return StoreError(StoreErrorReason.INVALID_ARGUMENT, f"etcd: {message}")
    return unavailable(f"etcd: {message}")


def _revision(reply: dict[str, Any]) -> int:
    header = reply.get("header")
    revision = _int(header.get("revision")) if isinstance(header, dict) else 0
    if revision <= 0:
        raise _malformed("header", ValueError("no revision"))
    return revision


def _int(value: object) -> int:
    """An int64 from etcd's JSON: a string, a number, or absent (zero, proto3's default)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _malformed("integer", TypeError(type(value).__name__))
    try:
        return int(value)
    except ValueError as exc:
        raise _malformed("integer", exc) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise _malformed("base64", TypeError(type(value).__name__))
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise _malformed("base64", exc) from exc


def _malformed(what: str, exc: Exception) -> StoreError:
    return unavailable(f"etcd sent a malformed {what}: {exc}")
