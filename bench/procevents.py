"""Process events benchmark: the listener's CPU for one crashed process of a pod, with and without
the pods it found lately.

    sudo python -m bench.procevents [--calls 3000] [--runs 5]

A runc pod (kubepods cgroup, OCI annotations) runs a sleeping process; :func:`corevault.agent.
procevents.observe` reads it as it reads a process the kernel is about to dump, ``--calls`` times
per run, taking turns: finding its pod each time (as before :class:`~corevault.agent.procevents.
Owners`) and with the listener's ``Owners`` (a crash loop's deaths are one container's). Printed:
the median over ``--runs`` of the thread's CPU per call, each way, and their ratio (goal <= 0.5:
a pod's crash loop costs the listener at most half of what it did). Needs root and runc.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time

from corevault import config
from corevault.agent import procevents
from testbed import build, runc

ANNOTATIONS = {
    "corevault.io/core-pattern": "/data/core-%p",
    "io.kubernetes.pod.namespace": "bench",
    "io.kubernetes.pod.name": "loop-0",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    settings = config.Settings()
    work = tempfile.mkdtemp(prefix="cv-bench-procevents-")
    root = runc.build_rootfs(work + "/root", build.build_all())
    pod = runc.Container(root, ["/bin/sh", "-c", "echo ready; exec sleep 600"], annotations=ANNOTATIONS)
    took: dict[str, list[float]] = {"each time": [], "owners": []}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        cleanup.enter_context(pod.running())
        pid = pod.pid()
        for _ in range(a.runs):
            for way, times in took.items():  # taking turns: the machine's load falls on both
                owners = procevents.Owners(settings) if way == "owners" else None
                start = time.thread_time()
                for _ in range(a.calls):
                    death = procevents.observe(settings, pid, time.time(), owners=owners)
                times.append((time.thread_time() - start) / a.calls * 1e6)
                assert death.pod is not None and death.pod["name"] == "loop-0" and death.opted_in, death
    before, now = statistics.median(took["each time"]), statistics.median(took["owners"])
    print(f"listener CPU per crashed process of a pod, median of {a.runs} runs of {a.calls:,} calls")
    print(f"  finding its pod each time  {before:6.0f} µs")
    print(f"  with the pods found lately {now:6.0f} µs   ratio {now / before:.2f} (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
