"""The node's store of mapped binaries: layout, room, lookups and eviction.

Layout (see :mod:`corevault.objectid` for keys)::

    <store>/buildid/<key>/<sha256>     one file per content, under the key it claims

The capture handler writes it (:mod:`corevault.capture.buildid`), the analysis and the
agent read it through a crash's own record (``meta.json`` names each object's key and
content hash), and the agent evicts what nothing needs any more. The store lives on the
node's disk next to the spool, so it has a quota of its own and also counts against the
spool's ``max_size`` and ``keep_free``: a pod that maps big or sparse files cannot fill
the node through it. Files are copied with their holes, and counted by the blocks they
really take.

A file that a handler found already stored gets its mtime refreshed, and eviction spares
anything touched within a grace period: a handler may have found it "held" and not have
finished its spool entry yet.
"""

from __future__ import annotations

import os
import time

from corevault import objectid

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

BUILDID = "buildid"
LEGACY_NAME = "executable"  # the layout before content hashes: one file per build-id


def object_path(store: str, key: str, sha256: str) -> str:
    return os.path.join(store, BUILDID, key, sha256)


def record_path(store: str, module: dict) -> str | None:
    """Where a crash record's module is held in ``store``, if the record names it validly."""
    key, sha = module.get("key"), module.get("sha256")
    if not objectid.is_object(key, sha):
        return None
    path = object_path(store, str(key), str(sha))
    return path if os.path.isfile(path) else None


def candidates(store: str, key: str) -> list[str]:
    """Every file held under ``key`` (different contents claiming it), oldest first."""
    if not objectid.KEY.match(key):
        return []
    d = os.path.join(store, BUILDID, key)
    try:
        names = [n for n in os.listdir(d) if objectid.SHA256.match(n) or n == LEGACY_NAME]
    except OSError:
        return []
    paths = [os.path.join(d, n) for n in names]
    return sorted(paths, key=lambda p: os.stat(p).st_mtime if os.path.exists(p) else 0)


def objects(store: str) -> Iterable[tuple[str, os.stat_result]]:
    """``(path, stat)`` of every stored file."""
    top = os.path.join(store, BUILDID)
    try:
        keys = os.scandir(top)
    except FileNotFoundError:
        return
    with keys:
        for key in keys:
            try:
                files = os.scandir(key.path)
            except (NotADirectoryError, FileNotFoundError):
                continue
            with files:
                for f in files:
                    try:
                        yield f.path, f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue


def usage(store: str) -> int:
    """Bytes of disk the store's files take (holes do not count)."""
    return sum(st.st_blocks * 512 for _, st in objects(store))


def room(store: str, max_size: int, spool_used: int, spool_max_size: int, keep_free: int) -> int:
    """Bytes the store may still take: its quota, the spool's max_size shared, keep_free."""
    used = usage(store)
    try:
        st = os.statvfs(store)
    except FileNotFoundError:
        st = os.statvfs(os.path.dirname(store.rstrip("/")) or "/")
    free = st.f_bavail * st.f_frsize
    return max(0, min(max_size - used, spool_max_size - spool_used - used, free - keep_free))


def needed(metas: Iterable[dict]) -> set[tuple[str, str]]:
    """``(key, sha256)`` of every object the given crash records name."""
    keep = set()
    for meta in metas:
        for m in meta.get("modules") or []:
            if isinstance(m, dict) and m.get("key") and m.get("sha256"):
                keep.add((str(m["key"]), str(m["sha256"])))
    return keep


def evict(store: str, keep: Collection[tuple[str, str]], grace: float, now: float | None = None) -> list[str]:
    """Remove stored files that no record in ``keep`` names and nobody touched within ``grace``."""
    from contextlib import suppress  # not at import: the capture handler imports this module

    now = time.time() if now is None else now
    removed = []
    for path, st in list(objects(store)):
        key_dir, name = os.path.split(path)
        if not (objectid.SHA256.match(name) or name == LEGACY_NAME):
            continue  # not a stored object (a user's debuginfo beside it): not ours to remove
        if (os.path.basename(key_dir), name) in keep or now - st.st_mtime < grace:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        with suppress(OSError):  # other contents still held under the same key
            os.rmdir(key_dir)
    return removed
