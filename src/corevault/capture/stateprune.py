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
  lookup again (:func:`.policy.held_slots`);
- a record of what a stuck writer waited on whose writer ended (nobody holds its lock:
  :func:`.stuckwriters.sweep`, which every give-up runs too, so that a node without an agent
  keeps them few), within what is left of the pass's ``limit`` and ``scan``.

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

Its cost is bounded, however many files a churn of pods (or a pod making many keys) left: a
pass looks at no more than ``scan`` entries (:data:`SCAN_MAX`, one ``lstat`` each, shared
between the four sets) and locks, checks and unlinks at most ``limit`` files (:data:`PRUNE_MAX`).
A :class:`Pruner` keeps each set's directory open between its passes and reads on from where
the last pass stopped (the directory's own read position is the cursor: an entry that is there
all along is read exactly once a round, whatever is added or removed meanwhile); a set read to
its end starts over at its next pass. While a round is unfinished the agent prunes again after
:data:`corevault.agent.loop.PRUNE_AGAIN` instead of ``PRUNE_EVERY``. The content-hash cache
(``hashes/``) needs none of this: it holds at most
:data:`corevault.capture.hashcache.MAX_ENTRIES` files and evicts the ones used longest ago.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from corevault.capture import policy, snapshot, stuckwriters

#: a file made or written within this many seconds is left alone (an active tenant's)
IDLE = 3600.0
#: files removed a pass at most
PRUNE_MAX = 1000
#: entries a pass looks at (one ``lstat`` each) at most: ~40 ms here with the inodes cached
#: (4 µs an entry, measured on ext4 with 200,000 files)
SCAN_MAX = 10000
#: the sets of slot files (directories of the state dir)
SLOT_KINDS = (policy.DUMPS, stuckwriters.KIND, snapshot.KIND)


@dataclass
class Pruned:
    """What one pass removed, and what it left because it was held (or written) meanwhile."""

    slots: int = 0
    budgets: int = 0
    #: records of stuck writers that ended (:func:`.stuckwriters.sweep`)
    records: int = 0
    busy: int = 0
    #: entries looked at
    looked: int = 0
    #: whether a set was left part-read, to go on with at the next pass
    more: bool = False

    @property
    def removed(self) -> int:
        return self.slots + self.budgets + self.records


@dataclass
class _Round:
    """One set's directory, open and read up to where the last pass stopped."""

    fd: int
    entries: Iterator[os.DirEntry[str]]
    #: entries of this round not removed (young, held, not a file): the directory stays
    left: int = 0


class Pruner:
    """Passes over the state directory's sets, each going on where the one before stopped."""

    def __init__(
        self, state_dir: str, storm_window: float, scan: int = SCAN_MAX, limit: int = PRUNE_MAX
    ) -> None:
        self.state_dir = state_dir
        self.storm_window = storm_window
        self.scan = scan
        self.limit = limit
        self._rounds: dict[str, _Round] = {}
        self._turn = 0

    def prune(self, now: float | None = None) -> Pruned:
        """One pass (see the module's docstring)."""
        now = time.time() if now is None else now
        done = Pruned()
        sets = [(kind, now - IDLE) for kind in SLOT_KINDS]
        sets.append((policy.STORM, now - max(self.storm_window, IDLE)))
        self._turn = (self._turn + 1) % len(sets)  # each set in turn is first to have what is left over
        sets = sets[self._turn :] + sets[: self._turn]
        lock = policy.open_state(self.state_dir, policy.PRUNE_LOCK)
        try:
            for kind, before in sets:  # an equal share each
                self._prune_set(kind, before, lock, self.scan // len(sets), done)
            for kind, before in sets:  # then what the sets read to their end left, to the others
                if kind in self._rounds:
                    self._prune_set(kind, before, lock, self.scan - done.looked, done)
            room = min(self.limit - done.removed, self.scan - done.looked)
            if room > 0:
                done.records += stuckwriters.sweep(os.path.join(self.state_dir, stuckwriters.MOUNTS), room)
        finally:
            os.close(lock)
        done.more = bool(self._rounds)
        return done

    def close(self) -> None:
        for kind in list(self._rounds):
            self._end(kind)

    def _end(self, kind: str) -> _Round:
        r = self._rounds.pop(kind)
        close = getattr(r.entries, "close", None)  # scandir's iterator holds a copy of the fd
        if close is not None:
            close()
        os.close(r.fd)
        return r

    def _prune_set(self, kind: str, before: float, lock: int, share: int, done: Pruned) -> None:
        """Look at up to ``share`` more entries of one set and remove those last changed before
        ``before``, until the pass has removed its limit; the directory too when a round of it
        found nothing to leave."""
        directory = os.path.join(self.state_dir, kind)
        r = self._rounds.get(kind)
        if r is None:
            try:
                d = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return
            r = self._rounds[kind] = _Round(d, os.scandir(d))
        names: list[str] = []
        read_all = False
        while share > 0 and len(names) < self.limit - done.removed:
            e = next(r.entries, None)
            if e is None:
                read_all = True
                break
            share -= 1
            done.looked += 1
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_ctime) < before:
                names.append(e.name)
            else:
                r.left += 1  # young, or not a file
        for name in names:
            outcome = _remove_if_idle(r.fd, name, before, lock)
            if outcome != "removed":
                r.left += 1
                done.busy += outcome == "busy"
            elif kind == policy.STORM:
                done.budgets += 1
            else:
                done.slots += 1
        if read_all and not self._end(kind).left:
            try:
                os.rmdir(directory)  # a dump that made a file in it meanwhile keeps it (ENOTEMPTY)
            except OSError:
                pass


def prune(
    state_dir: str,
    storm_window: float,
    now: float | None = None,
    limit: int = PRUNE_MAX,
    scan: int = SCAN_MAX,
) -> Pruned:
    """One pass from the start of every set (a long-running caller keeps a :class:`Pruner`, so
    that its passes go on where the last stopped)."""
    pruner = Pruner(state_dir, storm_window, scan, limit)
    try:
        return pruner.prune(now)
    finally:
        pruner.close()


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
