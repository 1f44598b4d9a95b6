"""The agent's loop: ship what the spool holds, retry what fails, never lose an entry.

Every ``poll_interval`` seconds it removes abandoned partial entries, ships the journal,
and ships the finished entries into the vault and the catalog, in batches of up to
``[agent] ship_batch`` (their small cores ``ship_parallel`` at a time, their rows in one
transaction: what lets one PostgreSQL take a fleet's crash storm); the analyses run apart, in
:class:`corevault.agent.analyses.AnalysisPool`, so no analysis ever holds shipping up, and
each entry is handed to them as soon as its batch is shipped (in a storm the first crashes
are analysed while the rest ships, and become the samples the later ones are matched to). A
failed entry stays in the spool and is retried with exponential backoff (1 s doubling to
5 min), per entry, so one bad entry never blocks the others, in its batch or after it. A
failure that is not the vault or the disk being away (:func:`corevault.agent.ship.transient`)
is the entry's own: logged once with its reason, counted in ``corevault_ship_errors``, and
after ``QUARANTINE_AFTER`` such attempts the entry is set aside in the spool's
``quarantine/`` with that reason, kept but no longer tried; the journal's lines likewise
(:func:`corevault.agent.ship.ship_journal`). Whatever else goes wrong in a pass is logged
and the next pass comes all the same: nothing one crash holds ends the agent. Retention
runs every ten minutes when configured. SIGTERM and SIGINT stop it after the batch in hand
(an analysis in flight is ended with the process and done again at the next start).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from corevault import config, hostsetup, spool
from corevault.agent import ship, storeclean
from corevault.agent.analyses import AnalysisPool, worker_count
from corevault.agent.kernellog import KernelLog
from corevault.agent.metrics import Metrics
from corevault.agent.procevents import ProcEvents
from corevault.agent.stuckdumps import StuckDumps
from corevault.agent.stuckvolumes import StuckVolumes
from corevault.capture import stateprune
from corevault.vault import blobs, catalog, retention
from corevault.vault.crashes import LocalVault

log = logging.getLogger("corevault.agent")
RETRYABLE = (blobs.StoreError, catalog.CatalogError, sa.exc.OperationalError, sa.exc.DBAPIError, OSError)
MAX_BACKOFF = 300.0
VACUUM_EVERY = 600.0
EVICT_EVERY = 60.0  # seconds between evictions from the node's binary store
PRUNE_EVERY = 600.0  # seconds between prunings of gone tenants' slot and storm files (capture.stateprune)
PRUNE_AGAIN = 10.0  # seconds to the next pruning while the last left a set part-read (its cost is bounded)
#: failures of an entry's own (not the vault away) before it is set aside: with the backoff,
#: about a minute, long enough for a hiccup of the catalog to pass
QUARANTINE_AFTER = 6


class Agent:
    def __init__(
        self,
        settings: config.Settings,
        metrics: Metrics | None = None,
        on_record: Callable[[dict], object] | None = None,
    ) -> None:
        self.settings = settings
        #: sees every journal record (the Kubernetes Event poster, when running in a cluster)
        self.on_record = on_record
        self.metrics = metrics or Metrics()
        self.stop = threading.Event()
        self.vault: LocalVault | None = None
        self.backoff: dict[str, tuple[float, float]] = {}
        #: failures of each entry's own so far (see QUARANTINE_AFTER)
        self.errors: dict[str, int] = {}
        #: why the vault could not be reached on the last pass, or None
        self.unreachable: str | None = None
        self.last_vacuum = 0.0
        self.last_evict = 0.0
        self.last_prune = -PRUNE_EVERY  # on the first pass
        #: prunes the state directory a bounded part at a time, each pruning going on where the last stopped
        self.pruner = stateprune.Pruner(settings.state_dir, settings.storm_window)
        self.prune_every = PRUNE_EVERY
        #: whether core_pattern was corevault's at the last look (None: not looked, or not installed)
        self.installed: bool | None = None
        #: when the loop last took a step (a pass, or an entry within one), for the liveness probe
        self.heartbeat = time.monotonic()
        #: the socket the kernel or the forwarder connects to, once the agent installed the capture
        self.capture_socket: str | None = None
        #: the analyses of shipped crashes (started with the first pass)
        self.analyses: AnalysisPool | None = None
        #: the dumps the kernel skipped, journaled from its log on every pass
        self.kernel_log = KernelLog(settings, on_skip=self.metrics.kernel_skipped.inc)
        #: every core-signal death, so a skip the kernel's rate-limited log leaves out is journaled
        #: too: listened to by a long-running loop while core_pattern is the one it installed (the
        #: node's crashes are then its own to account for)
        self.proc_events: ProcEvents | None = None
        #: pipe dumps the kernel is stuck in on a pod's own FUSE server, ended past their deadline
        self.stuck_dumps = StuckDumps(settings, on_abort=self._fuse_aborted)
        #: writers stuck on a pod's own FUSE volume, its mount aborted past their deadline
        self.stuck_volumes = StuckVolumes(settings, on_abort=self._fuse_aborted)
        self.listen = False

    def connect(self) -> LocalVault:
        vault = self.vault
        if vault is None:
            vault = self.vault = LocalVault(self.settings)
        return vault

    def _analyse(self, entry_id: str, idle: bool) -> str | None:
        """One shipped entry's analysis, as the pool's threads run it (None: another agent's)."""
        try:
            state = ship.analyse_shipped(self.connect(), self.settings, entry_id, idle=idle)
        except ship.Busy:
            return None
        self.metrics.analysed.labels(state).inc()
        return state

    def check_installed(self) -> bool | None:
        """Whether core_pattern is still the one corevault installed (None: nothing is installed).

        corevault does not fight an administrator who points core_pattern elsewhere; it says so,
        once in the log and for as long as it lasts in ``corevault_capture_installed``.
        """
        state = hostsetup.load_state(hostsetup.state_path(self.settings))
        if state is None:
            return None
        current = hostsetup.read_sysctls()["core_pattern"]
        ours = hostsetup.is_ours(current, state)
        self.metrics.installed.set(1 if ours else 0)
        if not ours and self.installed is not False:
            log.warning(
                "core_pattern is now %r, no longer corevault's: crashes are not captured; "
                "run 'corevault install' again (or restart the agent) to capture them",
                current,
            )
        self.installed = ours
        return ours

    def pass_once(self) -> int:
        """One look at the spool; returns how many entries are still waiting."""
        s = self.settings
        self.heartbeat = time.monotonic()
        self.check_installed()
        spool.ensure(s.spool_dir)
        self.kernel_log.poll()
        self._follow_deaths()
        if self.installed:
            self._end_stuck_dumps()
        if time.monotonic() - self.last_prune > self.prune_every:  # the vault reachable or not
            self.last_prune = time.monotonic()
            self._prune_state()
        ship.clean_abandoned(s)
        try:
            vault = self.connect()
            refused: list[str] = []
            shipped = ship.ship_journal(vault, s, self.on_record, refused)
            self.metrics.errors.inc(len(refused))
            self.metrics.quarantined.inc(len(refused))
            for event, n in shipped.items():
                if event == "captured":
                    self.metrics.captured.inc(n)
                elif event in ship.DROPPED_EVENTS:
                    self.metrics.dropped.labels(event).inc(n)
        except RETRYABLE as e:
            log.warning("cannot reach the vault: %s", e)
            self.vault = None
            self.unreachable = str(e)
            return len(spool.entries(s.spool_dir))
        self.unreachable = None
        if s.agent_analyze and self.analyses is None:
            self.analyses = AnalysisPool(s, self._analyse, worker_count(s))
        now = time.monotonic()
        due = [e for e in spool.entries(s.spool_dir) if now >= self.backoff.get(e, (0.0, 0.5))[0]]
        for at in range(0, len(due), s.agent_ship_batch):
            if self.stop.is_set():
                break
            self.heartbeat = time.monotonic()
            batch = ship.ship_batch(vault, s, due[at : at + s.agent_ship_batch], s.agent_ship_parallel)
            for entry, error in batch.failed.items():
                self._failed(entry, error)
            for entry, done in batch.shipped.items():
                self.backoff.pop(entry, None)
                self.errors.pop(entry, None)
                self.metrics.shipped.inc()
                self.metrics.upload_bytes.inc(done.bytes)
                self.metrics.upload_seconds.observe(done.seconds)
                log.info("shipped %s (%d bytes, analysis %s)", done.crash_id, done.bytes, done.analysis)
                if self.analyses is not None and done.analysis == "pending":
                    # analysed while the rest ships: a storm's first samples are in before its last crash is
                    self.analyses.add(entry)
        if self.analyses is not None:
            self.metrics.analysis_queue.set(self.analyses.feed())
        if self._retention_on() and time.monotonic() - self.last_vacuum > VACUUM_EVERY:
            self.last_vacuum = time.monotonic()
            try:
                gone = retention.vacuum(vault, s)
                if gone["crashes"]:
                    log.info("retention removed %d crashes", len(gone["crashes"]))
            except RETRYABLE as e:
                log.warning("retention failed: %s", e)
        if not self._retention_on() and time.monotonic() - self.last_vacuum > VACUUM_EVERY:
            self.last_vacuum = time.monotonic()  # no rules: the unfinished uploads are cleared all the same
            try:
                uploads = retention.abandoned(vault.store, s)
                if uploads:
                    log.info("aborted %d uploads nobody finished", len(uploads))
            except RETRYABLE as e:
                log.warning("clearing abandoned uploads failed: %s", e)
        if time.monotonic() - self.last_evict > EVICT_EVERY:
            self.last_evict = time.monotonic()
            gone = storeclean.evict(s)
            if gone:
                log.info("removed %d binaries no spool entry needs from the node's store", len(gone))
        waiting = len(spool.entries(s.spool_dir))
        self.metrics.queue.set(waiting)
        return waiting

    def _prune_state(self) -> None:
        """Remove the dump slot and storm files of tenants gone for a while (never one held)."""
        try:
            pruned = self.pruner.prune()
        except OSError as e:
            log.warning("could not prune the state directory %s: %s", self.settings.state_dir, e)
            self.pruner.close()  # the next pruning starts over
            return
        self.prune_every = PRUNE_AGAIN if pruned.more else PRUNE_EVERY
        if pruned.removed:
            log.info(
                "removed %d idle dump slot and %d storm files, %d ended stuck writers' records",
                pruned.slots, pruned.budgets, pruned.records,
            )  # fmt: skip

    def _end_stuck_dumps(self) -> None:
        """Abort a pod's own FUSE connection a pipe dump of its, or a writer into its volume in
        any mode, is stuck on past the deadline."""
        if hostsetup.read_sysctls()["core_pattern"].startswith("|"):
            try:
                self.stuck_dumps.check()
            except OSError as e:
                log.warning("could not look for stuck dumps: %s", e)
        try:
            self.stuck_volumes.check()
        except OSError as e:
            log.warning("could not look for writers stuck on volumes: %s", e)

    def _fuse_aborted(self) -> None:
        self.metrics.fuse_aborted.inc()

    def _failed(self, entry: str, error: Exception) -> None:
        """Back off from an entry that failed; set it aside after QUARANTINE_AFTER failures of its own."""
        delay = min(self.backoff.get(entry, (0.0, 0.5))[1] * 2, MAX_BACKOFF)
        self.backoff[entry] = (time.monotonic() + delay, delay)
        self.metrics.failures.inc()
        if ship.transient(error):
            log.warning("cannot ship %s (retry in %.0fs): %s", entry, delay, error)
            return
        why = ship.reason(error)
        self.metrics.errors.inc()
        n = self.errors[entry] = self.errors.get(entry, 0) + 1
        if n == 1:  # once: the same error again and again says nothing new
            log.warning("cannot ship %s (tried again %d times at most): %s", entry, QUARANTINE_AFTER - 1, why)
        if n < QUARANTINE_AFTER:
            return
        self.backoff.pop(entry, None)
        self.errors.pop(entry, None)
        if ship.set_aside(self.settings, entry, why):
            self.metrics.quarantined.inc()
            where = spool.quarantine_dir(self.settings.spool_dir)
            log.error("set %s aside in %s after %d failures: %s", entry, where, n, why)

    def _retention_on(self) -> bool:
        s = self.settings
        return any(
            v is not None
            for v in (s.retention_max_age_days, s.retention_max_size, s.retention_namespace_max_size)
        )

    def run(self, once: bool = False) -> int:
        """Loop until stopped; with ``once``, until the spool is empty or nothing more can be done."""
        self.listen = not once
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self.stop.set())
        while not self.stop.is_set():
            try:
                waiting = self.pass_once()
            except RETRYABLE as e:
                log.warning("the vault is unreachable: %s", e)
                self.vault = None
                self.unreachable = str(e)
                waiting = len(spool.entries(self.settings.spool_dir))
            except Exception as e:  # a bug, or something one crash holds: the next pass comes all the same
                log.exception("a pass of the agent failed: %s", ship.reason(e))
                self.metrics.errors.inc()
                waiting = len(spool.entries(self.settings.spool_dir))
                if once:
                    self._close()
                    return waiting
            if once and (waiting == 0 or self.unreachable or not self._anything_due()):
                if self.analyses is not None and not self.unreachable:
                    self.analyses.wait_idle(self.stop)
                self._close()
                return waiting
            self.stop.wait(self.settings.agent_poll)
        self._close()
        return 0

    def _follow_deaths(self) -> None:
        """Reconcile the deaths seen since the last pass, after the kernel's log was read (a death
        it names is not journaled again); listen only while corevault's capture is installed."""
        if self.listen and self.installed and self.proc_events is None:
            events = ProcEvents(self.settings, on_drop=self.metrics.kernel_skipped.inc)
            self.listen = events.start()  # where the connector cannot be had, said once
            self.proc_events = events if self.listen else None
            self.kernel_log.deaths_followed_since = time.time() if self.listen else None
        elif not self.installed and self.proc_events is not None:
            self._stop_following()
        if self.proc_events is not None:
            self.proc_events.reconcile()

    def _stop_following(self) -> None:
        if self.proc_events is not None:
            self.proc_events.close()
            self.proc_events = None
        self.kernel_log.deaths_followed_since = None

    def _close(self) -> None:
        self._stop_following()
        self.pruner.close()
        if self.analyses is not None:
            self.analyses.close()
            self.analyses = None

    def _anything_due(self) -> bool:
        now = time.monotonic()
        return any(due <= now for due, _ in self.backoff.values()) or not self.backoff
