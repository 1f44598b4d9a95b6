"""Where alerts go, from the ``[alerts]`` table of the server's settings.

::

    [alerts]
    url = "https://corevault.example.com"   # links in alerts point at this server's group pages
    window = 3600            # at most one alert per group and sink in this many seconds
    spike_crashes = 20       # a spike: more than this many crashes of one group ...
    spike_minutes = 10       # ... in this many minutes, in one namespace
    retry_first = 5          # seconds before the first retry; doubles each time ...
    retry_max = 600          # ... up to this
    give_up = 86400          # a delivery still failing after this long is marked failed

    [[alerts.sink]]
    name = "shop-team"
    kind = "slack"           # or "webhook" (JSON, signed with HMAC-SHA256)
    url = "https://hooks.slack.com/services/…"
    namespaces = ["shop"]    # ["*"]: every namespace and the hosts' crashes
    events = ["new", "regressed", "spike"]
    secret_file = "/etc/corevault/shop-webhook.key"   # webhook: the HMAC key (or secret = "…")

A sink of some namespaces gets the events of those namespaces only, and each alert
carries the data of its own namespace only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from corevault.config import ConfigError

KINDS = ("webhook", "slack")
EVENTS = ("new", "regressed", "spike")


@dataclass(frozen=True, slots=True)
class Sink:
    name: str
    kind: str
    url: str
    #: None: every namespace, the hosts' crashes ("") included
    namespaces: frozenset[str] | None
    events: frozenset[str]
    secret: bytes | None = None

    def wants(self, kind: str, namespace: str) -> bool:
        return kind in self.events and (self.namespaces is None or namespace in self.namespaces)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    sinks: tuple[Sink, ...]
    url: str = "http://127.0.0.1:8080"
    window: float = 3600.0
    spike_crashes: int = 20
    spike_minutes: float = 10.0
    retry_first: float = 5.0
    retry_max: float = 600.0
    give_up: float = 86400.0
    #: seconds between two rounds of the dispatcher
    poll: float = 2.0


_NUMBERS = ("window", "spike_crashes", "spike_minutes", "retry_first", "retry_max", "give_up", "poll")


def parse(table: dict, where: str = "[alerts]") -> AlertSettings | None:
    """The alert settings, or None when no sink is configured; ConfigError says what is wrong."""
    unknown = set(table) - {"url", "sink", *_NUMBERS}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    raw_sinks = table.get("sink", [])
    if not isinstance(raw_sinks, list):
        raise ConfigError(f"{where}: sinks are [[alerts.sink]] tables")
    if not raw_sinks:
        return None
    numbers = {}
    for key in _NUMBERS:
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where} {key}: a positive number, not {value!r}")
            numbers[key] = int(value) if key == "spike_crashes" else float(value)
    url = table.get("url", "http://127.0.0.1:8080")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} url: this server's address, http(s)://…")
    sinks = tuple(_sink(s, f"{where} sink {n + 1}") for n, s in enumerate(raw_sinks))
    names = [s.name for s in sinks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two sinks share a name; each needs its own")
    return AlertSettings(sinks=sinks, url=url.rstrip("/"), **numbers)  # type: ignore[arg-type]


def _sink(raw: object, where: str) -> Sink:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a table with name, kind, url and namespaces")
    unknown = set(raw) - {"name", "kind", "url", "namespaces", "events", "secret", "secret_file"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, kind, url = raw.get("name"), raw.get("kind"), raw.get("url")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ConfigError(f"{where}: needs a name (up to 64 characters)")
    if kind not in KINDS:
        raise ConfigError(f"{where} ({name}): kind is webhook or slack, not {kind!r}")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} ({name}): url is the receiver's http(s):// address")
    ns = raw.get("namespaces")
    if not isinstance(ns, list) or not ns or not all(isinstance(x, str) for x in ns):
        raise ConfigError(f'{where} ({name}): namespaces = ["ns", …], or ["*"] for every namespace')
    events = raw.get("events", list(EVENTS))
    if not isinstance(events, list) or not set(events) <= set(EVENTS) or not events:
        raise ConfigError(f"{where} ({name}): events are some of {', '.join(EVENTS)}")
    secret = raw.get("secret")
    if "secret_file" in raw:
        try:
            with open(raw["secret_file"], "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConfigError(f"{where} ({name}): secret_file {raw['secret_file']}: {e.strerror}") from None
        if os.stat(raw["secret_file"]).st_mode & 0o077:
            raise ConfigError(f"{where} ({name}): {raw['secret_file']} is readable by others; chmod 600 it")
    if isinstance(secret, str):
        secret = secret.encode()
    if kind == "webhook" and (not secret or len(secret) < 16):
        raise ConfigError(f"{where} ({name}): a webhook needs secret_file (or secret) of 16 bytes or more")
    return Sink(name, kind, url, None if "*" in ns else frozenset(ns), frozenset(events), secret or None)
