"""A crash storm on one node: runc pods crash-looping at once, and the account of every crash.

:func:`run` starts ``pods`` runc containers with kubepods cgroups, ``parallel`` at a time,
each a pod of its own (namespaces taken in turn) whose shell runs the crasher ``crashes``
times in a row; ``big`` of the pods crash with a ``big_mib`` MiB process, the others with a
small one. Whatever installed the capture (pipe handler, forwarder or socket) takes them.

:func:`account` then reads the node's journal and says what became of each crash: captured,
or journaled as lost with a reason, by the handler (storm limit, dump slots, spool room…) or
by the kernel (``core_pipe_limit``, from its log through :class:`corevault.agent.kernellog.KernelLog`).
A crash in neither is lost silently, which must never happen.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from corevault import spool
from testbed import runc

COMM = "crasher"


@dataclass(frozen=True)
class Plan:
    pods: int = 200
    crashes: int = 3
    namespaces: int = 4
    big: int = 4
    big_mib: int = 256
    parallel: int = 6


@dataclass
class Pod:
    namespace: str
    name: str
    big: bool
    container: runc.Container | None = None
    returncode: int | None = None


@dataclass
class Account:
    expected: int
    captured: int = 0
    #: crashes the handler or listener journaled as lost, by reason
    dropped: Counter[str] = field(default_factory=Counter)
    #: crashes the kernel said it skipped (its log, naming the crasher)
    kernel: int = 0
    #: skips the kernel only counted ("N callbacks suppressed": more than ten in five seconds),
    #: printed with its next such message, however late: whose they were it does not say
    kernel_unnamed: int = 0
    #: cores kept per pod (by container id)
    per_pod: Counter[str] = field(default_factory=Counter)
    #: lost records with no reason, which must not exist
    unexplained: int = 0

    @property
    def accounted(self) -> int:
        return self.captured + sum(self.dropped.values()) + self.kernel

    @property
    def complete(self) -> bool:
        """Every crash in the account: exactly, or within what the kernel only counted."""
        within = self.accounted <= self.expected <= self.accounted + self.kernel_unnamed
        return within and not self.unexplained


def pods_of(plan: Plan) -> list[Pod]:
    """Every ``pods // big``-th pod is a big one; namespaces in turn."""
    every = plan.pods // plan.big if plan.big else 0
    big = {i * every for i in range(plan.big)} if every else set()
    return [Pod(f"storm-{i % plan.namespaces}", f"loop-{i}", big=i in big) for i in range(plan.pods)]


def run(plan: Plan, rootfs: str, volume: str) -> list[Pod]:
    """Crash-loop every pod (``parallel`` containers at a time); returns them once all are done."""
    pods = pods_of(plan)
    lock = threading.Lock()

    def loop(pod: Pod) -> None:
        what = f"alloc {plan.big_mib}" if pod.big else "segv"
        script = f"i=0; while [ $i -lt {plan.crashes} ]; do /app/crasher {what}; i=$((i+1)); done; exit 0"
        annotations = {
            "corevault.io/core-pattern": "/data/dump-a/core-%p",
            "corevault.io/targets": "vault",
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.name": pod.name,
        }
        c = runc.Container(rootfs, ["/bin/sh", "-c", script], volume=volume, annotations=annotations)
        with lock:
            pod.container = c
        pod.returncode = c.run(timeout=600).returncode

    with ThreadPoolExecutor(plan.parallel) as pool:
        for done in [pool.submit(loop, p) for p in pods]:
            done.result()
    return pods


def account(spool_dir: str, pods: list[Pod], plan: Plan) -> Account:
    """What became of every crash of ``pods``, from the journal of ``spool_dir``."""
    ours = {p.container.id for p in pods if p.container is not None}
    acc = Account(expected=plan.pods * plan.crashes)
    captured: set[int] = set()
    lost: dict[int, str] = {}
    for r in spool.read_journal(spool_dir):
        if r.get("transport") == "kernel":
            if r.get("comm") == COMM:
                acc.kernel += 1
            elif "count" in r:
                acc.kernel_unnamed += int(r["count"])
            continue
        if (r.get("pod") or {}).get("container_id") not in ours or not isinstance(r.get("pid"), int):
            continue
        if r.get("event") == "captured":
            captured.add(r["pid"])
            acc.per_pod[r["pod"]["container_id"]] += 1
        elif r.get("event") in ("dropped", "refused", "skipped", "error"):
            if not r.get("reason"):
                acc.unexplained += 1
            lost.setdefault(r["pid"], _kind(r.get("reason") or ""))
    acc.captured = len(captured)
    acc.dropped = Counter(reason for pid, reason in lost.items() if pid not in captured)
    return acc


def _kind(reason: str) -> str:
    """A reason without its numbers, to count alike reasons together."""
    return reason.split(":", maxsplit=1)[0] if reason else "no reason"
