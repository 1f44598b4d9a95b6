"""The agent's Prometheus metrics, on their own registry, served with the health probes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

HEALTH_PATHS = {"/healthz": "live", "/readyz": "ready"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.captured = Counter("corevault_crashes_captured", "Crashes the capture handler kept", registry=r)
        self.shipped = Counter("corevault_crashes_shipped", "Crashes shipped into the vault", registry=r)
        self.dropped = Counter(
            "corevault_dumps_dropped", "Dumps dropped, cut or refused, by event", ["event"], registry=r
        )
        self.kernel_skipped = Counter(
            "corevault_kernel_skipped_dumps",
            "Dumps the kernel skipped (over core_pipe_limit, or no handler), from its log and process events",
            registry=r,
        )
        self.failures = Counter(
            "corevault_ship_failures", "Attempts to ship an entry that failed", registry=r
        )
        self.errors = Counter(
            "corevault_ship_errors",
            "Failures to ship an entry or a journal line that were not the vault or the disk being away",
            registry=r,
        )
        self.quarantined = Counter(
            "corevault_spool_quarantined",
            "Entries and journal lines set aside in the spool's quarantine/ (kept, no longer tried)",
            registry=r,
        )
        self.fuse_aborted = Counter(
            "corevault_stuck_fuse_aborted",
            "FUSE connections of a pod's own mount aborted because a pipe dump of the pod, or a writer "
            "of its core into its volume, was stuck on them past the deadline",
            registry=r,
        )
        self.queue = Gauge("corevault_spool_entries", "Finished entries waiting in the spool", registry=r)
        self.installed = Gauge(
            "corevault_capture_installed",
            "1 while core_pattern is corevault's, 0 when something else replaced it after install",
            registry=r,
        )
        self.analysis_queue = Gauge(
            "corevault_analysis_queue", "Shipped crashes waiting for or in analysis", registry=r
        )
        self.analysed = Counter(
            "corevault_crashes_analysed",
            "Analyses finished, by outcome (done, failed)",
            ["state"],
            registry=r,
        )
        self.upload_bytes = Counter("corevault_upload_bytes", "Core bytes uploaded to the vault", registry=r)
        self.upload_seconds = Histogram(
            "corevault_ship_seconds", "Time to ship one entry into the vault and the catalog", registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip

    def serve(self, address: str, health: Callable[[], dict] | None = None) -> None:
        """Serve /metrics on ``host:port`` (nothing for an empty address), and with ``health``
        (returning :func:`corevault.agent.health.check`'s dict) /healthz and /readyz."""
        if not address:
            return
        host, _, port = address.rpartition(":")
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            key = HEALTH_PATHS.get(environ.get("PATH_INFO", ""))
            if key is None or health is None:
                return metrics(environ, start_response)
            try:
                state = health()
            except Exception as e:  # a probe that cannot look says so rather than crash the server
                state = {"live": False, "ready": False, "problems": [f"{type(e).__name__}: {e}"]}
            body = json.dumps(state).encode()
            status = "200 OK" if state[key] else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

        server = make_server(host or "127.0.0.1", int(port), app, ThreadingWSGIServer, _Quiet)
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # the kubelet probes every few seconds: no line per request
