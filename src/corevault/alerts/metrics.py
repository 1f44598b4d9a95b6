"""Crash groups for Prometheus: groups per namespace and state, group events, alert deliveries.

Served at ``/api/v1/metrics`` to a reader's token, made of the namespaces that reader may
see (namespace names and counts say something about crashes, so they are not on the open
``/metrics``). Values come from the catalog at each scrape, so every server of one vault
reports the same numbers and a restart resets nothing:

- ``corevault_groups{namespace, state}``: groups that crashed in the namespace, by state;
- ``corevault_group_events_total{namespace, kind}``: new, regressed and spike events, a
  counter from 0 for every namespace with crashes (so a first event is an increase);
- ``corevault_alert_deliveries_total{sink, status}``: sent, pending, failed and suppressed
  deliveries, for readers of every namespace only.

``deploy/monitoring/`` holds the alert rules made of them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.engine import Connection

from corevault.vault import catalog, lifecycle


class _Snapshot:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def exposition(conn: Connection, visible: Collection[str] | None, namespace: str | None = None) -> bytes:
    """The text format of the metrics over the namespaces in scope."""

    def shown(ns: str) -> bool:
        return (visible is None or ns in visible) and (namespace is None or ns == namespace)

    groups = GaugeMetricFamily(
        "corevault_groups",
        "Crash groups that crashed in a namespace, by state",
        labels=["namespace", "state"],
    )
    for ns, state, n in sorted(lifecycle.state_counts(conn)):
        if shown(ns):
            groups.add_metric([ns, state], n)
    events = CounterMetricFamily(
        "corevault_group_events", "Crash group events: new, regressed, spike", labels=["namespace", "kind"]
    )
    counts = {(ns, kind): n for ns, kind, n in lifecycle.event_counts(conn)}
    names = {ns for ns in catalog.list_namespaces(conn)} | {ns for ns, _ in counts}
    for ns in sorted(n for n in names if shown(n)):
        for kind in lifecycle.EVENTS:
            events.add_metric([ns, kind], counts.get((ns, kind), 0))
    metrics: list[Metric] = [groups, events]
    if visible is None:
        from corevault.alerts import outbox

        sent = CounterMetricFamily(
            "corevault_alert_deliveries", "Alert deliveries by sink and status", labels=["sink", "status"]
        )
        for sink, status, n in sorted(outbox.status_counts(conn)):
            sent.add_metric([sink, status], n)
        metrics.append(sent)
    registry = CollectorRegistry()
    registry.register(_Snapshot(metrics))  # type: ignore[arg-type]
    return generate_latest(registry)
