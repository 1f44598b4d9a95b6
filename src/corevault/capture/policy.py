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

The slot and budget files of tenants that are gone are removed by the agent
(:mod:`corevault.capture.stateprune`), each under its own lock: a slot file is taken only once its
lock is held *and* it is still linked (``st_nlink``), so a file removed between a handler's open
and its lock is opened again by name rather than held as a second copy of the same slot.

A bad annotation never costs the crash its core: an unusable targets or size value is
reported as a warning and the node's defaults apply. Only the pattern itself is refused
when invalid, because guessing where to write would be worse.
"""

from __future__ import annotations

import fcntl
import os
import struct
from time import monotonic, sleep

from corevault import pattern, podannotations, quickjson
from corevault.capture.lookup import Owner
from corevault.capture.process import Crash
from corevault.config import ConfigError, Settings, parse_size, parse_targets

_INF = float("inf")
#: the state directory's sets of slot files (see :func:`take_slot`) and of storm budgets (:func:`admit`)
DUMPS, STORM = "dumps", "storm"
#: taken exclusively by the pruner for each file it removes, shared by a dump about to be refused
#: because every slot of its share looked held: one of them may have been the pruner's for an instant
PRUNE_LOCK = "prune.lock"
#: how long a dump about to be refused waits for the pruner to finish with one file (it holds it
#: for microseconds; a pruner that is stopped or frozen meanwhile must not hold crashes up)
PRUNE_WAIT = 0.05


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


def take_slot(state_dir: str, key: str, share: int, kind: str = DUMPS) -> int | None:
    """Hold one of ``key``'s ``share`` dump slots: the locked fd, or None when all are taken.

    A slot is an ``flock`` on one of ``share`` files: the kernel releases it when the holder
    closes it or dies (a killed handler never leaks a slot), and locks on separate opens
    exclude each other within one process too (the socket listener's threads). ``kind`` names
    the set of slots (a directory of the state dir): dumps being read, writers stuck on a volume.
    """
    d = os.path.join(state_dir, kind)
    fd = _take_free(d, key, share)
    if fd is None and share > 0:
        settled = _pruner_settled(state_dir)  # one of them may have been the pruner's for an instant
        try:
            fd = _take_free(d, key, share)
        finally:
            _let_go(settled)
    return fd


def _take_free(directory: str, key: str, share: int) -> int | None:
    for i in range(share):
        name = f"{key}.{i}"
        while True:
            fd = open_state(directory, name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break
            if os.fstat(fd).st_nlink:
                return fd
            # pruned between the open and the lock: holding this unlinked file would let the next
            # dump take the same slot in a new file of that name; open the name again (a new file
            # is young, which the pruner leaves alone, so this ends)
            os.close(fd)
    return None


def _pruner_settled(state_dir: str) -> int | None:
    """Wait (at most :data:`PRUNE_WAIT`) until the pruner is between two files and keep it there:
    the fd to close to let it go on, or None."""
    try:
        fd = open_state(state_dir, PRUNE_LOCK)
    except OSError:
        return None  # no lock to take (a read-only state dir): nothing prunes there either
    deadline = monotonic() + PRUNE_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if monotonic() > deadline:
                return fd  # a pruner stopped mid-file: the refusal stands
            sleep(0.001)


def _let_go(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def held_slots(state_dir: str, key: str, share: int, kind: str, *, upto: int | None = None) -> int:
    """How many of ``key``'s ``share`` slots of ``kind`` are held (counting stops at ``upto``).

    Asked without taking one for long: a slot file that was never made is free, and a free one is
    locked shared for an instant only (a holder's exclusive lock refuses it). Without the kind's
    directory (no slot of it was ever taken on this node, the usual case) that is one lookup.
    A count that reaches ``upto`` is made again once the pruner is between two files (it holds
    each one's lock for an instant).
    """
    held = _count_held(state_dir, key, share, kind, upto)
    if held and held >= (upto if upto is not None else share):
        settled = _pruner_settled(state_dir)
        try:
            held = _count_held(state_dir, key, share, kind, upto)
        finally:
            _let_go(settled)
    return held


def _count_held(state_dir: str, key: str, share: int, kind: str, upto: int | None) -> int:
    while True:
        try:
            d = os.open(
                os.path.join(state_dir, kind), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError:
            return 0
        held = 0
        try:
            for i in range(share):
                if _probe_held(d, f"{key}.{i}"):
                    held += 1
                    if upto is not None and held >= upto:
                        break
            if os.fstat(d).st_nlink:
                return held
            # the pruner removed this directory (empty then) as it was read: a slot taken since is
            # in a new one of that name
        finally:
            os.close(d)


def _probe_held(d: int, name: str) -> bool:
    while True:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=d)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            if os.fstat(fd).st_nlink:
                return False
            # pruned as it was opened: the name may be a new file, held: look at that one
        finally:
            os.close(fd)


def open_state(directory: str, name: str) -> int:
    """Open (or create) a root-only state file, never through a symlink; the directory is made
    the first time only (trying the open first spares every crash a mkdir that fails)."""
    path = os.path.join(directory, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        pass
    for _ in range(2):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            continue  # the pruner removed the directory, empty, between the two
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.open(path, flags, 0o600)


def _times(doc: object, name: str, now: float, window: float) -> list[float]:
    """The crash times under ``name`` of a budget file in its first format (JSON) that are in the
    window; what a damaged file holds instead is dropped.

    A damaged budget must never cost a crash its core (an exception here would) nor hold a
    time that stays in every window (an infinity).
    """
    values = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(values, list):
        return []
    # -inf < t < inf: finite, NaN left out; unlike math.isfinite also for ints too large for a float
    return [t for t in values if isinstance(t, int | float) and -_INF < t < _INF and now - t < window]


# The storm budget of one key is a file of two rings of crash times (float64, little-endian) behind
# a header, so that a crash reads and writes a few fixed places of it, never the whole file:
#
#   header  magic, limit (the kept ring's size), kept count, next kept slot, seen count, first seen slot
#   seen    STORM_SEEN slots: every crash of the key, oldest first from "first seen slot"
#   kept    ``limit`` slots: the crashes that got a core, the oldest at "next kept slot" once full
#
# A crash is kept while fewer than ``limit`` kept crashes are in the window: when the kept ring
# is full, exactly when its oldest time has left the window. Seen times leave the ring from its
# oldest end as they leave the window (each time is read there once: O(1) a crash, amortized);
# the count that remains is the number of crashes in the window the journal reports.
STORM_SEEN = 10_000
_STORM_HEAD = struct.Struct("<8sQIIII")
_STORM_MAGIC = b"cvstorm1"
_SEEN_AT = _STORM_HEAD.size
_KEPT_AT = _SEEN_AT + 8 * STORM_SEEN
#: how much of a budget file in the first format (JSON) is read: 10,000 times take ~200 KiB
_OLD_FORMAT_MAX = 4 << 20


def _read_times(fd: int, at: int, n: int) -> list[float]:
    """``n`` times from offset ``at``; where the file ends early (never written), zeros: long gone."""
    raw = os.pread(fd, 8 * n, at) if n > 0 else b""
    return list(struct.unpack(f"<{n}d", raw.ljust(8 * n, b"\0")))


def _ring(fd: int, at: int, size: int, first: int, n: int) -> list[float]:
    """The ``n`` times of a ring of ``size`` slots at offset ``at``, oldest (slot ``first``) first."""
    head = min(n, size - first)
    return _read_times(fd, at + 8 * first, head) + _read_times(fd, at, n - head)


def _in_window(t: float, now: float, window: float) -> bool:
    return -_INF < t < _INF and now - t < window  # a damaged (NaN, infinite) time is long gone


def _rebuild(fd: int, limit: int, now: float, window: float) -> tuple[int, int, int, int]:
    """Write the budget anew for ``limit`` from what the file holds (a budget made for another
    limit, the first format's JSON, or damage: nothing); returns its header's counts."""
    head = os.pread(fd, _STORM_HEAD.size, 0)
    seen: list[float] = []
    kept: list[float] = []
    if head.startswith(_STORM_MAGIC) and len(head) == _STORM_HEAD.size:
        _, old_limit, kept_n, kept_next, seen_n, seen_first = _STORM_HEAD.unpack(head)
        if seen_n <= STORM_SEEN and seen_first < STORM_SEEN:
            seen = _ring(fd, _SEEN_AT, STORM_SEEN, seen_first, seen_n)
        if old_limit > 0 and kept_n <= old_limit and kept_next < old_limit:
            take = min(kept_n, limit)  # the newest ``limit`` of them are all that can count now
            kept = _ring(fd, _KEPT_AT, old_limit, (kept_next - take) % old_limit, take)
    else:
        size = os.fstat(fd).st_size  # a new key's file is empty: no buffer for the old format's most
        raw = os.pread(fd, min(size, _OLD_FORMAT_MAX), 0) if size else b""
        try:
            doc = quickjson.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        seen, kept = _times(doc, "seen", now, window), _times(doc, "kept", now, window)
    seen = [t for t in seen if _in_window(t, now, window)][-STORM_SEEN:]
    kept = [t for t in kept if _in_window(t, now, window)][-limit:] if limit > 0 else []
    os.ftruncate(fd, 0)
    if seen:
        os.pwrite(fd, struct.pack(f"<{len(seen)}d", *seen), _SEEN_AT)
    if kept:
        os.pwrite(fd, struct.pack(f"<{len(kept)}d", *kept), _KEPT_AT)
    return len(kept), len(kept) % max(limit, 1), len(seen), 0


def admit(state_dir: str, key: str, limit: int, window: float, now: float) -> tuple[bool, int]:
    """Count a crash against its storm budget; ``(kept, crashes in the window)``.

    The budget is a file per key (see the layout above), updated under ``flock`` because
    crashes of one container arrive in parallel handlers. What one crash reads and writes does
    not grow with the limit nor with the crashes counted.
    """
    while True:
        fd = open_state(os.path.join(state_dir, STORM), key)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # pruned (idle past the window) while this waited for its lock: the name's file counts
    try:
        head = os.pread(fd, _STORM_HEAD.size, 0)
        fields = _STORM_HEAD.unpack(head) if len(head) == _STORM_HEAD.size else None
        if (
            fields is None
            or fields[0] != _STORM_MAGIC
            or fields[1] != max(limit, 1)
            or not (fields[2] <= fields[1] and fields[3] < fields[1])
            or not (fields[4] <= STORM_SEEN and fields[5] < STORM_SEEN)
        ):
            kept_n, kept_next, seen_n, seen_first = _rebuild(fd, limit, now, window)
        else:
            _, _, kept_n, kept_next, seen_n, seen_first = fields
        slots = max(limit, 1)
        # the crashes that left the window leave the seen ring, oldest first
        newest = (seen_first + seen_n - 1) % STORM_SEEN
        if seen_n and not _in_window(_read_times(fd, _SEEN_AT + 8 * newest, 1)[0], now, window):
            seen_n = 0  # the newest is gone: all are (a crash after a quiet spell reads one time)
        while seen_n:
            batch = _ring(fd, _SEEN_AT, STORM_SEEN, seen_first, min(seen_n, 512))
            gone = next((i for i, t in enumerate(batch) if _in_window(t, now, window)), len(batch))
            seen_first, seen_n = (seen_first + gone) % STORM_SEEN, seen_n - gone
            if gone < len(batch):
                break
        if seen_n == STORM_SEEN:  # full: the oldest makes room
            seen_first, seen_n = (seen_first + 1) % STORM_SEEN, seen_n - 1
        os.pwrite(fd, struct.pack("<d", now), _SEEN_AT + 8 * ((seen_first + seen_n) % STORM_SEEN))
        seen_n += 1
        # fewer than ``limit`` kept crashes in the window: the ring is not full, or its oldest left
        admitted = limit > 0 and (
            kept_n < limit or not _in_window(_read_times(fd, _KEPT_AT + 8 * kept_next, 1)[0], now, window)
        )
        if admitted:
            os.pwrite(fd, struct.pack("<d", now), _KEPT_AT + 8 * kept_next)
            kept_n, kept_next = min(kept_n + 1, limit), (kept_next + 1) % limit
        os.pwrite(fd, _STORM_HEAD.pack(_STORM_MAGIC, slots, kept_n, kept_next, seen_n, seen_first), 0)
        return admitted, seen_n
    finally:
        os.close(fd)
