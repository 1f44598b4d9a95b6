"""What to do with one crash: opt-in, targets, size limits and the crash-storm limit.

A process opts in when its pod (or a host rule) carries a core pattern in
``corevault.io/core-pattern`` or ``alibabacloud.com/core-pattern``; which one counts is
the rule of :func:`corevault.podannotations.core_pattern`, shared with the webhook and
``kubectl corevault debug``. Its targets are the pod's volume (the plain core at the
expanded pattern, inside the container) and the node spool (for the vault);
``corevault.io/targets`` narrows them per pod, the node's settings for all pods. The core
is cut at the smaller of the soft RLIMIT_CORE (``%c``, which the kernel ignores for pipes)
and ``corevault.io/max-core-size``, and marked truncated.

Tenants get fixed shares of what the node has for dumps (:func:`take_slot`): at most
``pod_dumps`` dumps of one pod and ``namespace_dumps`` of one namespace are read at once,
and a dump beyond that is refused before a byte of its core is read, so its handler exits
at once and gives the kernel's ``core_pipe_limit`` slot back to other tenants' crashes.

A bad annotation never costs the crash its core: an unusable targets or size value is
reported as a warning and the node's defaults apply. Only the pattern itself is refused
when invalid, because guessing where to write would be worse.
"""

from __future__ import annotations

import fcntl
import os

from corevault import pattern, podannotations, quickjson
from corevault.capture.lookup import Owner
from corevault.capture.process import Crash
from corevault.config import ConfigError, Settings, parse_size, parse_targets

_INF = float("inf")


class Plan:
    __slots__ = (
        "limit",
        "limit_source",
        "opted_in",
        "pattern",
        "refused",
        "vault",
        "volume_path",
        "warnings",
    )

    def __init__(self) -> None:
        #: whether the pod (or a host rule) asked for cores at all
        self.opted_in = False
        self.pattern: str | None = None
        #: absolute path inside the container's root for the plain core, or None
        self.volume_path: str | None = None
        #: whether the node spool gets a compressed copy
        self.vault = False
        #: at most this many bytes of core are kept, or None
        self.limit: int | None = None
        self.limit_source: str | None = None
        #: why nothing is written at all, or None
        self.refused: str | None = None
        self.warnings: list[str] = []


def plan(crash: Crash, owner: Owner, settings: Settings, core_uses_pid: bool) -> Plan:
    p = Plan()
    ann = owner.annotations
    asked = podannotations.core_pattern(ann)
    if asked is None:
        p.refused = "not opted in (no core-pattern annotation or host rule)"
        return p
    key, pat = asked
    p.opted_in = True
    found = pattern.problems(pat)
    if found:
        p.refused = f"invalid {key} {pat!r}: " + "; ".join(found)
        return p
    p.pattern = pat

    targets = settings.targets
    if podannotations.TARGETS in ann:
        names = [t.strip() for t in ann[podannotations.TARGETS].split(",") if t.strip()]
        try:
            targets = targets & parse_targets(names, podannotations.TARGETS)
        except ConfigError as e:
            p.warnings.append(f"{e}; using the node's targets")
    if not targets:
        p.refused = "every target is turned off for this process"
        return p

    if crash.rlimit_core == 0:
        p.refused = "RLIMIT_CORE is 0 in the process (ulimit -c); raise it to get cores"
        return p
    if crash.rlimit_core is not None:
        p.limit, p.limit_source = crash.rlimit_core, "RLIMIT_CORE"
    if podannotations.MAX_SIZE in ann:
        try:
            cap = parse_size(ann[podannotations.MAX_SIZE], podannotations.MAX_SIZE)
        except ConfigError as e:
            p.warnings.append(f"{e}; no per-pod size cap applied")
        else:
            if p.limit is None or cap < p.limit:
                p.limit, p.limit_source = cap, podannotations.MAX_SIZE

    if "volume" in targets:
        p.volume_path = pattern.expand(pat, crash.values, core_uses_pid=core_uses_pid)
    p.vault = "vault" in targets
    return p


def _key(prefix: str, value: str) -> str:
    """A file name from a value a pod controls: only safe characters, bounded length."""
    return prefix + "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in value)[-100:]


def storm_key(owner: Owner, crash: Crash) -> str:
    """One storm budget per container, or per executable for processes outside containers."""
    if owner.container_id:
        return _key("c-", owner.container_id)
    return _key("e-", crash.exe)


def tenant_keys(owner: Owner) -> tuple[str | None, str | None]:
    """Whose shares a dump counts against: its pod (or container), its namespace.

    Processes outside containers are the node's own and count against no tenant's share.
    """
    pod = (
        _key("p-", owner.uid) if owner.uid else _key("c-", owner.container_id) if owner.container_id else None
    )
    return pod, (_key("n-", owner.namespace) if owner.namespace else None)


def take_slot(state_dir: str, key: str, share: int) -> int | None:
    """Hold one of ``key``'s ``share`` dump slots: the locked fd, or None when all are taken.

    A slot is an ``flock`` on one of ``share`` files: the kernel releases it when the holder
    closes it or dies (a killed handler never leaks a slot), and locks on separate opens
    exclude each other within one process too (the socket listener's threads).
    """
    d = os.path.join(state_dir, "dumps")
    os.makedirs(d, mode=0o700, exist_ok=True)
    for i in range(share):
        fd = os.open(
            os.path.join(d, f"{key}.{i}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd
    return None


def _times(doc: object, name: str, now: float, window: float) -> list[float]:
    """The crash times under ``name`` that are in the window; what a damaged file holds instead is dropped.

    A damaged budget must never cost a crash its core (an exception here would) nor hold a
    time that stays in every window (an infinity).
    """
    values = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(values, list):
        return []
    # -inf < t < inf: finite, NaN left out; unlike math.isfinite also for ints too large for a float
    return [t for t in values if isinstance(t, int | float) and -_INF < t < _INF and now - t < window]


def admit(state_dir: str, key: str, limit: int, window: float, now: float) -> tuple[bool, int]:
    """Count a crash against its storm budget; ``(kept, crashes in the window)``.

    The budget is a file of recent crash times per key, updated under ``flock`` because
    crashes of one container arrive in parallel handlers.
    """
    d = os.path.join(state_dir, "storm")
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(d, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            doc = quickjson.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        recent, kept = _times(doc, "seen", now, window), _times(doc, "kept", now, window)
        admitted = len(kept) < limit
        if admitted:
            kept.append(now)
        recent = [*recent[-9999:], now]
        doc = {"kept": kept, "seen": recent}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, quickjson.dumps(doc).encode())
        return admitted, len(recent)
    finally:
        os.close(fd)
