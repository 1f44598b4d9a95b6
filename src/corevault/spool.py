"""The node spool: finished crash entries waiting for the agent, and the journal.

Layout, maildir-style, so a half-written entry never looks finished::

    <spool>/tmp/<id>/            being written by a capture handler
    <spool>/ready/<id>/          complete: core.zst (zstd, with frame checksum) + meta.json
    <spool>/journal.jsonl        one JSON line per dump that was dropped, cut, refused or skipped

A handler builds its entry under ``tmp/``, fsyncs the files, then renames the directory
into ``ready/`` and fsyncs ``ready/``. The agent only ever looks at ``ready/`` and removes an
entry once the vault holds the same bytes; what is left in ``tmp/`` belongs to a handler
that died and is cleaned up by the agent.
"""

from __future__ import annotations

import json
import os
import time

CORE_NAME = "core.zst"
META_NAME = "meta.json"
JOURNAL_NAME = "journal.jsonl"


def new_id(now: float, pid: int) -> str:
    """A sortable, unique entry id: UTC time, the crashed PID, and randomness."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{pid}-{os.urandom(4).hex()}"


def tmp_dir(spool: str) -> str:
    return os.path.join(spool, "tmp")


def ready_dir(spool: str) -> str:
    return os.path.join(spool, "ready")


def ensure(spool: str) -> None:
    """Create the spool's directories (root-only: cores hold whole process memories)."""
    for d in (spool, tmp_dir(spool), ready_dir(spool)):
        os.makedirs(d, mode=0o700, exist_ok=True)


def usage(spool: str) -> int:
    """Bytes held by the spool's entries, finished or in progress."""
    total = 0
    for parent in (tmp_dir(spool), ready_dir(spool)):
        try:
            entries = os.scandir(parent)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                try:
                    with os.scandir(entry.path) as files:
                        total += sum(f.stat(follow_symlinks=False).st_blocks * 512 for f in files)
                except (NotADirectoryError, FileNotFoundError):
                    continue
    return total


def room(spool: str, max_size: int, keep_free: int) -> int:
    """How many more bytes the spool may take under its quota and free-space floor."""
    st = os.statvfs(spool)
    free = st.f_bavail * st.f_frsize
    return max(0, min(max_size - usage(spool), free - keep_free))


def entries(spool: str) -> list[str]:
    """Ids of the finished entries, oldest first."""
    try:
        return sorted(e for e in os.listdir(ready_dir(spool)) if not e.startswith("."))
    except FileNotFoundError:
        return []


def read_meta(spool: str, entry_id: str) -> dict:
    with open(os.path.join(ready_dir(spool), entry_id, META_NAME), "rb") as f:
        return json.loads(f.read())


def journal(spool: str, record: dict) -> None:
    """Append one record to the journal; one write with O_APPEND, so lines never interleave."""
    record.setdefault("time", time.time())
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
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
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
