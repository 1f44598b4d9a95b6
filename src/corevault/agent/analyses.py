"""Analyses beside shipping: parallel, bounded, and fair between tenants.

Shipping puts a crash into the catalog (analysis ``pending``) and leaves its entry in the
spool's ``shipped/``; this pool analyses those entries and never holds shipping up. So one
tenant's crash that takes its analysis to the limit delays nobody's crash reaching the
catalog, and delays other analyses only as far as it occupies one of the workers.

- **Bounded.** Each analysis is a sandboxed worker process with a time limit and a memory
  cap (:mod:`corevault.analysis.runner`). ``workers`` run at once: the configured number,
  or as many as there are cores and as fit in the available memory at the cap each.
- **Fair.** Waiting entries are queued per namespace and, inside it, per pod; a free worker
  takes the next entry of the namespace with the fewest analyses in flight, round-robin
  among equals, and round-robin among that namespace's pods. A pod crash-looping a
  thousand times lengthens its own queue; every other pod's next crash waits at most for
  one entry of each other namespace.
- **Matched in a storm, sampled at idle.** Each entry is told whether anything else waits
  (in this queue, or in the spool still to be shipped): a crash that could be matched to its
  group's samples is then analysed in full only when nothing waits, so a storm drains by
  matching and the samples still grow to ``group_samples`` from the crashes that follow
  (:func:`corevault.agent.ship.analyse_shipped`).
- **Durable.** The queue is the ``shipped/`` directory: an agent that stops (or is killed)
  mid-analysis finds the entries there again on start and analyses them then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from corevault import config, crashrecord, spool

log = logging.getLogger("corevault.agent")

#: seconds before an analysis that could not reach the vault is tried again
RETRY_AFTER = 5.0


def worker_count(settings: config.Settings) -> int:
    """How many analyses may run at once: by cores, and by memory at the cap each; never more
    than there are analysis uids (each analysis holds one of its own, docs/analysis.md)."""
    if settings.analysis_workers > 0:
        return min(settings.analysis_workers, settings.analysis_uids)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = settings.analysis_memory
    by_memory = available // max(settings.analysis_memory, 1)
    return max(1, min(len(os.sched_getaffinity(0)), by_memory, settings.analysis_uids))


class FairQueue:
    """Entries waiting for analysis, taken round-robin by namespace, then by pod."""

    def __init__(self) -> None:
        #: namespace -> pod -> entry ids, in the order the namespaces and pods take turns
        self.waiting: OrderedDict[str, OrderedDict[str, deque[str]]] = OrderedDict()
        self.busy: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(q) for pods in self.waiting.values() for q in pods.values())

    def put(self, namespace: str, pod: str, entry_id: str) -> None:
        self.waiting.setdefault(namespace, OrderedDict()).setdefault(pod, deque()).append(entry_id)

    def take(self) -> tuple[str, str] | None:
        """``(namespace, entry id)`` of the entry whose turn it is, or None when none waits."""
        if not self.waiting:
            return None
        namespace = min(self.waiting, key=lambda ns: self.busy[ns])  # the first of the least busy
        pods = self.waiting.pop(namespace)
        pod, queue = pods.popitem(last=False)
        entry_id = queue.popleft()
        if queue:
            pods[pod] = queue  # the pod goes to the back of its namespace's turn
        if pods:
            self.waiting[namespace] = pods  # and the namespace to the back of the line
        self.busy[namespace] += 1
        return namespace, entry_id

    def done(self, namespace: str) -> None:
        self.busy[namespace] -= 1
        if self.busy[namespace] <= 0:
            del self.busy[namespace]


class AnalysisPool:
    """Worker threads, each driving one sandboxed analysis at a time."""

    def __init__(
        self, settings: config.Settings, analyse: Callable[[str, bool], str | None], workers: int
    ) -> None:
        #: analyse(entry id, idle) -> the analysis state recorded, or None when another agent
        #: holds the entry; raises to have it tried again later. ``idle``: no other entry waits
        #: for analysis or shipping
        self.analyse = analyse
        self.settings = settings
        self.queue = FairQueue()
        self.cond = threading.Condition()
        #: entries queued or in flight, so a look at shipped/ does not queue them twice
        self.known: set[str] = set()
        self.in_flight = 0
        self.retry_at: dict[str, float] = {}
        #: how often each entry's analysis raised (reset when it is done)
        self.failures: Counter[str] = Counter()
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._work, name=f"corevault-analysis-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def feed(self) -> int:
        """Queue what ``shipped/`` holds that is not queued yet; returns how many wait in all."""
        now = time.monotonic()
        present = spool.entries(self.settings.spool_dir, "shipped")
        with self.cond:
            for gone in self.retry_at.keys() - set(present):
                del self.retry_at[gone]  # done by another agent meanwhile
                self.failures.pop(gone, None)
        for entry_id in present:
            with self.cond:
                if self.retry_at.get(entry_id, 0.0) > now:
                    continue
            self.add(entry_id)
        with self.cond:
            return len(self.queue) + self.in_flight

    def add(self, entry_id: str) -> None:
        """Queue one entry of ``shipped/`` (just shipped) unless it is queued or in flight already."""
        with self.cond:
            if entry_id in self.known:
                return
        try:
            meta = spool.read_meta(self.settings.spool_dir, entry_id, "shipped")
        except (OSError, ValueError):
            return  # analysed and removed a moment ago, or another agent's
        pod = crashrecord.load(meta, entry_id)["pod"]
        with self.cond:
            if entry_id in self.known:
                return
            self.known.add(entry_id)
            self.retry_at.pop(entry_id, None)
            self.queue.put(pod["namespace"] or "", pod["name"] or pod["uid"] or "", entry_id)
            self.cond.notify()

    def wait_idle(self, stop: threading.Event, attempts: int = 3) -> None:
        """Block until nothing is queued, in flight or due to be tried again, leaving aside
        entries whose analysis already raised ``attempts`` times."""
        while not stop.is_set():
            self.feed()
            with self.cond:
                retrying = [e for e in self.retry_at if self.failures[e] < attempts]
                if not self.queue and self.in_flight == 0 and not retrying:
                    return
                self.cond.wait(0.2)

    def close(self) -> None:
        """Take no new entries; an analysis in flight ends at its limit, or with the agent."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                turn = self.queue.take()
                while turn is None and not self.stopping:
                    self.cond.wait()
                    turn = self.queue.take()
                if self.stopping:
                    if turn is not None:
                        self.queue.done(turn[0])
                    return
                namespace, entry_id = turn
                self.in_flight += 1
                idle = not self.queue
            try:
                state = self.analyse(entry_id, idle and not spool.entries(self.settings.spool_dir))
                if state is None:  # another agent holds it: look again later, quietly
                    with self.cond:
                        self.retry_at[entry_id] = time.monotonic() + RETRY_AFTER
                else:
                    log.info("analysed %s: %s", entry_id, state)
                    with self.cond:
                        self.failures.pop(entry_id, None)
            except Exception as e:  # the pool must outlive any one entry
                log.warning("cannot analyse %s (retry in %.0fs): %s", entry_id, RETRY_AFTER, e)
                with self.cond:
                    self.retry_at[entry_id] = time.monotonic() + RETRY_AFTER
                    self.failures[entry_id] += 1
            finally:
                with self.cond:
                    self.known.discard(entry_id)
                    self.queue.done(namespace)
                    self.in_flight -= 1
                    self.cond.notify_all()
