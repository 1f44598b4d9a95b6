"""The agent's Prometheus metrics, on their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.captured = Counter("corevault_crashes_captured", "Crashes the capture handler kept", registry=r)
        self.shipped = Counter("corevault_crashes_shipped", "Crashes shipped into the vault", registry=r)
        self.dropped = Counter(
            "corevault_dumps_dropped", "Dumps dropped, cut or refused, by event", ["event"], registry=r
        )
        self.failures = Counter(
            "corevault_ship_failures", "Attempts to ship an entry that failed", registry=r
        )
        self.queue = Gauge("corevault_spool_entries", "Finished entries waiting in the spool", registry=r)
        self.installed = Gauge(
            "corevault_capture_installed",
            "1 while core_pattern is corevault's, 0 when something else replaced it after install",
            registry=r,
        )
        self.upload_bytes = Counter("corevault_upload_bytes", "Core bytes uploaded to the vault", registry=r)
        self.upload_seconds = Histogram(
            "corevault_ship_seconds", "Time to ship one entry, analysis included", registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip

    def serve(self, address: str) -> None:
        """Serve /metrics on ``host:port`` (nothing for an empty address)."""
        if not address:
            return
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
