"""Removing the state files of tenants that are gone, without ever freeing a slot that is held.

The capture keeps small files per tenant under the node's state directory: one file per dump
slot of each pod and namespace (``dumps/<key>.<i>``, ``stuck/<key>.<i>``: :func:`.policy.take_slot`),
one snapshot lock per container snapshotted (``snapshots/<key>.0``, a slot too) and one storm
budget per container (``storm/<key>``: :func:`.policy.admit`). Pod names and
container ids churn, so on a node that runs for months these would grow without bound. The
agent calls :func:`prune` from its loop every ``PRUNE_EVERY`` seconds
(:mod:`corevault.agent.loop`); it removes:

- a slot file no dump holds, made more than :data:`IDLE` ago (a slot file is never written: its
  lock is the slot; one of a pod still crashing is made again by its next dump, one open);
- a storm budget untouched for longer than its window and :data:`IDLE` (every crash writes it:
  all the times it holds have left the window, so it counts as no crashes, as a new file would);
- a set's directory left empty, so that a kind of slot no dump holds costs a crash one failed
  lookup again (:func:`.policy.held_slots`).

Removing a file someone may open is where a slot could be lost. A handler opens a slot file by
name and then locks it; if the file were unlinked in between, it would lock the unlinked file
while the next handler creates a new one under the name and locks that: two holders of one slot.
So the pruner unlinks a file only while it holds the file's own lock, after checking that the
name still leads to the file it locked; and a handler that gets a lock checks that its file is
still linked (``st_nlink``), else opens the name again (:func:`.policy.take_slot`, ``admit``,
``held_slots`` likewise). While the pruner holds a free slot's lock for that instant, a handler
trying it sees it taken; a dump that would be refused because every slot of its share looked
taken asks again once the pruner is between two files (it holds :data:`.policy.PRUNE_LOCK`
exclusively around each file, the handler shares it), so the pruner never costs a dump its slot.

Its cost is bounded: one ``lstat`` per file of the four sets, then the lock, check and unlink
of at most ``limit`` files a pass (:data:`PRUNE_MAX`); what is left goes at the next pass. The
content-hash cache (``hashes/``) needs none of this: it holds at most
:data:`corevault.capture.hashcache.MAX_ENTRIES` files and evicts the ones used longest ago.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from dataclasses import dataclass

from corevault.capture import policy, snapshot, stuckwriters

#: a file made or written within this many seconds is left alone (an active tenant's)
IDLE = 3600.0
#: files removed a pass at most
PRUNE_MAX = 1000
#: the sets of slot files (directories of the state dir)
SLOT_KINDS = (policy.DUMPS, stuckwriters.KIND, snapshot.KIND)


@dataclass
class Pruned:
    """What one pass removed, and what it left because it was held (or written) meanwhile."""

    slots: int = 0
    budgets: int = 0
    busy: int = 0

    @property
    def removed(self) -> int:
        return self.slots + self.budgets


def prune(state_dir: str, storm_window: float, now: float | None = None, limit: int = PRUNE_MAX) -> Pruned:
    """Remove the idle slot files and storm budgets under ``state_dir`` (see the module's docstring)."""
    now = time.time() if now is None else now
    done = Pruned()
    lock = policy.open_state(state_dir, policy.PRUNE_LOCK)
    try:
        for kind in SLOT_KINDS:
            done.slots += _prune_set(os.path.join(state_dir, kind), now - IDLE, lock, limit, done)
        storm = os.path.join(state_dir, policy.STORM)
        done.budgets += _prune_set(storm, now - max(storm_window, IDLE), lock, limit, done)
    finally:
        os.close(lock)
    return done


def _prune_set(directory: str, before: float, lock: int, limit: int, done: Pruned) -> int:
    """Remove the files of one set last changed before ``before``, until the pass has removed
    ``limit``; the directory too when nothing is left in it."""
    limit -= done.removed
    try:
        d = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    removed = left = 0
    try:
        with os.scandir(d) as entries:
            names = []
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_ctime) < before and len(names) < limit:
                    names.append(e.name)
                else:
                    left += 1  # young, not a file, or past this pass's limit
        for name in names:
            outcome = _remove_if_idle(d, name, before, lock)
            if outcome == "removed":
                removed += 1
            else:
                left += 1
                done.busy += outcome == "busy"
    finally:
        os.close(d)
    if not left:
        try:
            os.rmdir(directory)  # a dump that made a file in it meanwhile keeps it (ENOTEMPTY)
        except OSError:
            pass
    return removed


def _remove_if_idle(d: int, name: str, before: float, lock: int) -> str:
    """Unlink ``name`` if nobody holds it and it is still idle: "removed", "busy" or "kept"."""
    fcntl.flock(lock, fcntl.LOCK_EX)  # a dump about to be refused waits for this file only
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=d)
        except OSError:
            return "kept"  # gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "busy"  # a dump holds it (or a crash's storm budget is being written)
            held = os.fstat(fd)
            try:
                named = os.stat(name, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                return "kept"
            if (
                held.st_nlink == 0
                or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino)  # the name is another file now
                or max(held.st_mtime, held.st_ctime) >= before  # written since it was looked at
            ):
                return "kept"
            # while this lock is held nobody else holds the file; one who opened it and locks it
            # after this finds it unlinked and opens the name again
            os.unlink(name, dir_fd=d)
            return "removed"
        finally:
            os.close(fd)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
