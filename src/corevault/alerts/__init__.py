"""Alerts: a crash group's events (new, regressed, spike) reach people through webhooks and Prometheus.

:mod:`sinks` reads the ``[alerts]`` settings, :mod:`payload` builds the signed webhook and
the Slack message, :mod:`outbox` turns the catalog's group events into deliveries and sends
them (at least once, retried with backoff, at most one per group, sink and window, across
restarts), :mod:`metrics` exposes counts per namespace and state for Prometheus' rules.
"""
