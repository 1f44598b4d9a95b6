"""The node spool: finished crash entries waiting for the agent, and the journal.

Layout, maildir-style, so a half-written entry never looks finished::

    <spool>/tmp/<id>/            being written by a capture handler
    <spool>/ready/<id>/          complete: core.zst (zstd, with frame checksum) + meta.json
                                 (+ owner: the tenants whose share the entry counts against)
    <spool>/shipped/<id>/        in the vault and the catalog, kept until its analysis is recorded
    <spool>/quarantine/<id>/     set aside by the agent after failing again and again for a reason
                                 other than the vault being away (+ reason: the last error)
    <spool>/quarantine/journal.jsonl  journal lines the catalog refused, each with its reason
    <spool>/journal.jsonl        one JSON line per dump that was dropped, cut, refused or skipped

A handler builds its entry under ``tmp/``, fsyncs the files, then renames the directory
into ``ready/`` and fsyncs ``ready/``. The agent only ever looks at ``ready/`` and removes an
entry from there once the vault and the catalog hold it: into ``shipped/`` when it still
waits for its analysis (which runs apart from shipping), or away. What is left in ``tmp/``
belongs to a handler that died and is cleaned up by the agent. An entry in ``shipped/``
or ``quarantine/`` still counts against its tenants' shares: an entry set aside is kept,
never lost, and moving it back into ``ready/`` ships it again.

Tenants share the spool: an entry names its pod and namespace in a small ``owner`` file
written before its core, and :func:`room` gives a new entry no more than what is left of
each of its tenants' parts of the spool, so one pod's flood of cores never costs another
pod its copy. A part is a fraction of what the spool may hold (``max_size``, or less when
the filesystem's free space above ``keep_free`` is smaller).
"""

from __future__ import annotations

import os
import time

from corevault import quickjson

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")

CORE_NAME = "core.zst"
META_NAME = "meta.json"
OWNER_NAME = "owner"
JOURNAL_NAME = "journal.jsonl"
REASON_NAME = "reason"


def new_id(now: float, pid: int) -> str:
    """A sortable, unique entry id: UTC time, the crashed PID, and randomness."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{pid}-{os.urandom(4).hex()}"


def tmp_dir(spool: str) -> str:
    return os.path.join(spool, "tmp")


def ready_dir(spool: str) -> str:
    return os.path.join(spool, "ready")


def shipped_dir(spool: str) -> str:
    return os.path.join(spool, "shipped")


def quarantine_dir(spool: str) -> str:
    return os.path.join(spool, "quarantine")


def ensure(spool: str) -> None:
    """Create the spool's directories (root-only: cores hold whole process memories).

    One ``mkdir`` each, an existing one left as it is: every crash's handler calls this, and
    ``os.makedirs`` stats and checks around each ``mkdir``.
    """
    for d in (spool, tmp_dir(spool), ready_dir(spool), shipped_dir(spool), quarantine_dir(spool)):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:  # the state directory itself is new
            os.makedirs(d, mode=0o700, exist_ok=True)


def made(spool: str, step: Callable[[], T]) -> T:
    """``step()``; where it finds a spool directory missing (a new spool), the directories are
    made (:func:`ensure`) and it runs again. Every crash's handler writes through here: making
    them before each step cost it ten ``mkdir`` calls that found them there."""
    try:
        return step()
    except FileNotFoundError:
        ensure(spool)
        return step()


def write_owner(entry_dir: str, keys: list[str]) -> None:
    """Name the tenants an entry counts against (one key per line).

    An entry of no tenant (a host's crash) gets no file, which reads as none: making a file
    is the dearest step of a small crash on a filesystem without a journal, where ext4 checks
    every recently deleted inode it passes over for a free one.
    """
    if not keys:
        return
    fd = os.open(
        os.path.join(entry_dir, OWNER_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
    )
    try:
        os.write(fd, "".join(k + "\n" for k in keys).encode())
    finally:
        os.close(fd)


def _owners(entry_dir: str) -> list[str]:
    try:
        with open(os.path.join(entry_dir, OWNER_NAME), "rb") as f:
            return f.read(4096).decode(errors="replace").split()
    except OSError:
        return []  # an entry of an older handler, or one being created this moment


def usage_by_owner(spool: str) -> tuple[int, dict[str, int]]:
    """Bytes held by the spool's entries, in progress, finished or waiting for analysis: in
    all, and per owner key."""
    total = 0
    owned: dict[str, int] = {}
    for parent in (tmp_dir(spool), ready_dir(spool), shipped_dir(spool), quarantine_dir(spool)):
        try:
            entries = os.scandir(parent)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                try:
                    with os.scandir(entry.path) as files:
                        size = sum(f.stat(follow_symlinks=False).st_blocks * 512 for f in files)
                except (NotADirectoryError, FileNotFoundError):
                    continue
                total += size
                for key in _owners(entry.path):
                    owned[key] = owned.get(key, 0) + size
    return total, owned


def usage(spool: str) -> int:
    """Bytes held by the spool's entries, in progress, finished or waiting for analysis."""
    return usage_by_owner(spool)[0]


def room(
    spool: str,
    max_size: int,
    keep_free: int,
    shares: dict[str, float] | None = None,
    usage: tuple[int, dict[str, int]] | None = None,
) -> tuple[int, str | None]:
    """How many more bytes a new entry may take, and the owner key whose share binds.

    ``shares`` maps owner keys to their part of the spool; the key is None when the spool's
    own limits (``max_size``, ``keep_free``) bind. ``usage`` is :func:`usage_by_owner`'s answer
    when the caller has it already (the spool is walked for it).
    """
    st = os.statvfs(spool)
    free = st.f_bavail * st.f_frsize
    total, owned = usage if usage is not None else usage_by_owner(spool)
    left, binding = min(max_size - total, free - keep_free), None
    capacity = min(max_size, total + free - keep_free)
    for key, part in (shares or {}).items():
        mine = int(capacity * part) - owned.get(key, 0)
        if mine < left:
            left, binding = mine, key
    return max(0, left), binding


def entries(spool: str, where: str = "ready") -> list[str]:
    """Ids of the finished entries (``where="shipped"``: those waiting for analysis), oldest first."""
    try:
        return sorted(e for e in os.listdir(os.path.join(spool, where)) if not e.startswith("."))
    except FileNotFoundError:
        return []


def quarantined(spool: str) -> list[tuple[str, str]]:
    """``(id, reason)`` of each entry the agent set aside, oldest first."""
    out = []
    for entry_id in entries(spool, "quarantine"):
        try:
            with open(os.path.join(quarantine_dir(spool), entry_id, REASON_NAME), "rb") as f:
                reason = f.read(4096).decode(errors="replace").strip()
        except (NotADirectoryError, FileNotFoundError):
            continue  # the journal's refused lines, or an entry being moved in
        out.append((entry_id, reason))
    return out


def read_meta(spool: str, entry_id: str, where: str = "ready") -> dict:
    with open(os.path.join(spool, where, entry_id, META_NAME), "rb") as f:
        return quickjson.loads(f.read())


def journal(spool: str, record: dict) -> None:
    """Append one record to the journal; one write with O_APPEND, so lines never interleave."""
    record.setdefault("time", time.time())
    line = (quickjson.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(
        os.path.join(spool, JOURNAL_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_journal(spool: str) -> list[dict]:
    try:
        with open(os.path.join(spool, JOURNAL_NAME), "rb") as f:
            return [quickjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
