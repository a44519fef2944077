"""The sidecar's Prometheus metrics, in a registry of its own (several sidecars per process in
tests, and nothing from other libraries leaks into the scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

ADMISSION_STATES = ("pending", "admitted", "renewing", "refused", "expired")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Counter(
            "teemesh_connections", "Tunnels opened", ["direction", "name"], registry=r
        )
        self.active = Gauge(
            "teemesh_active_connections", "Tunnels open now", ["direction"], registry=r
        )
        self.bytes = Counter(
            "teemesh_bytes", "Bytes relayed, counted when a tunnel closes",
            ["direction", "way"], registry=r,
        )  # fmt: skip
        self.handshakes = Counter(
            "teemesh_tls_handshakes", "mTLS handshakes", ["side", "result"], registry=r
        )
        self.refusals = Counter(
            "teemesh_refusals", "Connections refused", ["direction", "reason"], registry=r
        )
        self.connect_failures = Counter(
            "teemesh_upstream_connect_failures", "Failed tunnel attempts (instance ejected)",
            ["route"], registry=r,
        )  # fmt: skip
        self.cut = Counter(
            "teemesh_connections_cut", "Open tunnels closed by the mesh", ["reason"], registry=r
        )
        self.cert_expiry = Gauge(
            "teemesh_certificate_expiry_timestamp_seconds", "When the SVID in use expires",
            registry=r,
        )  # fmt: skip
        self.admission = Gauge(
            "teemesh_admission_state", "1 for the admission state the sidecar is in", ["state"],
            registry=r,
        )  # fmt: skip
        self.renewals = Counter("teemesh_admissions", "Admission attempts", ["result"], registry=r)
        self.health = Gauge(
            "teemesh_backend_healthy", "1 when the local backend passes its check", ["service"],
            registry=r,
        )  # fmt: skip
        self.set_admission("pending")

    def set_admission(self, state: str) -> None:
        for name in ADMISSION_STATES:
            self.admission.labels(name).set(1 if name == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
