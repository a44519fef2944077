"""The sidecar's Prometheus metrics, rendered in the text exposition format (version 0.0.4).

A few counters and gauges with labels need no library: ``prometheus_client`` costs ~3 MB of
RSS in a process whose whole budget is 40 MB. Each sidecar has its own registry (several run
in one test process, and nothing from other code leaks into a scrape).
"""

from __future__ import annotations

from collections.abc import Sequence

ADMISSION_STATES = ("pending", "admitted", "renewing", "refused", "expired")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value))


class _Sample:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Metric:
    """A counter or gauge family; ``labels(...)`` gives the sample for those label values."""

    def __init__(self, kind: str, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.kind, self.help, self.label_names = kind, help_text, tuple(labels)
        self.name = f"{name}_total" if kind == "counter" else name
        self.samples: dict[tuple[str, ...], _Sample] = {}
        if not self.label_names:
            self.samples[()] = _Sample()

    def labels(self, *values: str) -> _Sample:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}")
        sample = self.samples.get(values)
        if sample is None:
            sample = self.samples[values] = _Sample()
        return sample

    def inc(self, amount: float = 1.0) -> None:
        self.samples[()].inc(amount)

    def set(self, value: float) -> None:
        self.samples[()].set(value)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for values, sample in sorted(self.samples.items()):
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(self.label_names, values,
                                                                   strict=True))  # fmt: skip
            labels = f"{{{pairs}}}" if pairs else ""
            lines.append(f"{self.name}{labels} {_number(sample.value)}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.all: list[Metric] = []
        m = self._metric
        self.connections = m("counter", "teemesh_connections", "Tunnels opened",
                             ["direction", "name"])  # fmt: skip
        self.active = m("gauge", "teemesh_active_connections", "Tunnels open now", ["direction"])
        self.bytes = m("counter", "teemesh_bytes",
                       "Bytes relayed (in: from the connecting side), counted when a tunnel closes",
                       ["direction", "way"])  # fmt: skip
        self.handshakes = m("counter", "teemesh_tls_handshakes", "mTLS handshakes",
                            ["side", "result"])  # fmt: skip
        self.refusals = m("counter", "teemesh_refusals", "Connections refused",
                          ["direction", "reason"])  # fmt: skip
        self.connect_failures = m("counter", "teemesh_upstream_connect_failures",
                                  "Failed tunnel attempts (the instance is ejected)",
                                  ["route"])  # fmt: skip
        self.cut = m("counter", "teemesh_connections_cut", "Open tunnels closed by the mesh",
                     ["reason"])  # fmt: skip
        self.cert_expiry = m("gauge", "teemesh_certificate_expiry_timestamp_seconds",
                             "When the SVID in use expires (Unix time)")  # fmt: skip
        self.admission = m("gauge", "teemesh_admission_state",
                           "1 for the admission state the sidecar is in", ["state"])  # fmt: skip
        self.renewals = m("counter", "teemesh_admissions", "Admission attempts", ["result"])
        self.health = m("gauge", "teemesh_backend_healthy",
                        "1 when the local backend passes its check", ["service"])  # fmt: skip
        self.set_admission("pending")

    def _metric(self, kind: str, name: str, help_text: str, labels: Sequence[str] = ()) -> Metric:
        metric = Metric(kind, name, help_text, labels)
        self.all.append(metric)
        return metric

    def set_admission(self, state: str) -> None:
        for name in ADMISSION_STATES:
            self.admission.labels(name).set(1 if name == state else 0)

    def render(self) -> bytes:
        lines = [line for metric in self.all for line in metric.render()]
        return ("\n".join(lines) + "\n").encode()
