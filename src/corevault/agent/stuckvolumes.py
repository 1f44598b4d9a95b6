"""Writers stuck on a pod's own FUSE volume: their mount aborted past the dump's deadline.

A copy into a pod's volume whose FUSE server stopped answering is given up (:mod:`corevault.
capture.volumecopy`), but its thread waits on, uninterruptibly, holding stuck-writer slots of its
pod, its namespace and the node (:mod:`corevault.capture.stuckwriters`) for as long as the server
sleeps: a pod that mounts its own FUSE filesystem over its volume path and stops its server
would keep them for good, and a few such pods fill the node's and skip every other pod's copy.

A writer given up records what it waits on (:func:`corevault.capture.stuckwriters.note_mounts`):
the FUSE mounts, whose dump it is, and when it was given up, in a file it keeps locked while it
waits. Each agent pass (:meth:`StuckVolumes.check`) reads those records; one still locked past
``[capture] timeout`` since the give-up has its mounts aborted under the rule of the stuck-dump
watch (:func:`corevault.agent.stuckdumps.seen_elsewhere`): only a mount of that pod's alone,
absent from the host's mount namespace and from the namespaces of every process of another pod
or of the host, is aborted (:func:`corevault.agent.stuckdumps.abort`); a mount the record names
by the device its writer holds alone (no mountinfo of the crashed process named it) is one only
if the FUSE control filesystem lists that connection. The writer's request then
fails, its thread ends and its slots come back. Each abort is journaled under the pod as
``dropped`` and counted with the stuck dumps' (``corevault_stuck_fuse_aborted_total``); a mount
that may not be aborted is logged once. An unlocked record is a writer's that ended: removed.
``[capture] abort_stuck_fuse = false`` turns this off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from corevault import config, quickjson
from corevault.agent import stuckdumps
from corevault.capture import stuckwriters

log = logging.getLogger("corevault.agent")

#: the mount point said for a connection a record names by the device its writer holds alone
UNNAMED = (
    "(a FUSE connection its writer held that no mountinfo of the crashed process named: the process "
    "was let go first, or the pod unmounted it lazily)"
)
#: bytes of a record read at most (the handler writes a few hundred; a mount point is escaped)
RECORD_MAX = 1 << 20


class StuckVolumes:
    """The agent's watch over writers stuck on a pod's own FUSE volume."""

    def __init__(self, settings: config.Settings, on_abort: Callable[[], object] | None = None) -> None:
        self.settings = settings
        self.on_abort = on_abort
        #: the records already acted on (their mounts aborted, or logged as not to be)
        self.done: set[str] = set()

    def check(self, now: float | None = None) -> int:
        """One look; returns how many connections were aborted."""
        if not self.settings.abort_stuck_fuse:
            return 0
        now = time.monotonic() if now is None else now
        d = os.path.join(self.settings.state_dir, stuckwriters.MOUNTS)
        try:
            names = [n for n in os.listdir(d) if not n.startswith(".")]
        except FileNotFoundError:
            return 0
        self.done &= set(names)
        aborted = 0
        for name in names:
            record = _still_waiting(d, name)  # removed once its writer ended, acted on or not
            if name in self.done:
                continue
            given_up = record.get("given_up") if record is not None else None
            if not isinstance(given_up, (int, float)) or now - given_up < self.settings.timeout:
                continue
            self.done.add(name)
            aborted += self._end(record)
        return aborted

    def _end(self, record: dict) -> int:
        pod = record["pod"] if isinstance(record.get("pod"), dict) else {}
        whose = {"pid": record.get("pid"), "comm": record.get("comm"), "exe": record.get("exe"), "pod": pod}
        aborted = 0
        live: set[str] | None = None
        for dev, listed_at in record.get("mounts") or []:
            point = listed_at if listed_at is not None else UNNAMED
            try:
                if listed_at is None:
                    # named by the device the writer holds (no mountinfo listed it): a FUSE
                    # connection only if the control filesystem has it (else another kind of
                    # mount, or one whose connection ended already: nothing to abort)
                    live = stuckdumps.live_connections() if live is None else live
                    if stuckdumps.connection(str(dev).encode()) not in live:
                        continue
                elsewhere = stuckdumps.seen_elsewhere(str(dev).encode(), pod.get("uid") or None)
                if elsewhere is not None:
                    log.warning(
                        "a writer of process %s's core is stuck on the FUSE volume %s (%s), which is not its "
                        "pod's alone (%s): not aborted",
                        whose["pid"], point, dev, elsewhere,
                    )  # fmt: skip
                    continue
                stuckdumps.abort(str(dev).encode())
            except (OSError, ValueError) as e:
                log.warning("could not abort the FUSE volume %s a writer is stuck on: %s", point, e)
                continue
            aborted += 1
            reason = (
                f"the pod's own FUSE server of its volume {point} stopped answering the copy of its core: "
                f"the writer waited past [capture] timeout ({self.settings.timeout:g}s) holding stuck-writer "
                "slots of its pod, namespace and node, and the FUSE connection was aborted (its mount fails "
                "from now on)"
            )
            stuckdumps.journal_abort(self.settings, "stuck volume writers", whose, reason)
            if self.on_abort is not None:
                self.on_abort()
        return aborted


def _still_waiting(directory: str, name: str) -> dict | None:
    """The record ``name`` when its writer still waits (it holds the record's lock); a record
    whose writer ended is removed (:func:`stuckwriters.held`), and a damaged one is logged and
    left alone (None)."""
    fd = stuckwriters.held(directory, name)
    if fd is None:
        return None
    try:
        record = quickjson.loads(os.read(fd, RECORD_MAX))
        return record if isinstance(record, dict) else None
    except (OSError, ValueError) as e:
        log.warning("could not read the stuck writer record %s: %s", os.path.join(directory, name), e)
        return None
    finally:
        os.close(fd)
