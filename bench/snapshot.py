"""Snapshots of a live process in a runc pod: how long it takes and how long the process stops.

    python -m bench.snapshot [--size-mib 100] [--runs 5]

A pod runs ``hang alloc N`` (N MiB touched, and a thread that measures the longest pause it
ever sees). Each run takes ``corevault snapshot --pod`` and then ``corevault analyze`` of the
spool entry, as the agent would. Printed, medians over the runs:

- command to analysed report, in seconds;
- how long the process was stopped (gdb's clock, from attach to detach) ÷ writing the same
  number of bytes from memory into a new file in the spool's filesystem (the page cache),
  which is the floor for any dumper; goal <= 1.0;
- the longest pause the process itself saw over all runs.

Snapshots do not go through core_pattern, so this needs root but not the host's core settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from testbed import build, runc

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


def page_cache_write(directory: str, size: int) -> float:
    """Seconds to write ``size`` bytes from memory into a new file (no fsync)."""
    data = memoryview(bytearray(os.urandom(1 << 20)) * 1)
    path = os.path.join(directory, "baseline")
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            left -= f.write(data[: min(left, len(data))])
    took = time.perf_counter() - t
    os.unlink(path)
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cv-bench-snap-")
    try:
        root = runc.build_rootfs(os.path.join(work, "root"), {"hang": build.build("hang")})
        volume = os.path.join(work, "vol")
        os.mkdir(volume)
        cfg = os.path.join(work, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{work}/state"\n')
        pod = {"io.kubernetes.pod.namespace": "bench", "io.kubernetes.pod.name": "big-0",
               "corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}  # fmt: skip
        c = runc.Container(root, ["/app/hang", "alloc", str(a.size_mib)], volume=volume, annotations=pod)
        totals, stops, floors, sizes = [], [], [], []
        with c.running() as proc:
            for _ in range(a.runs):
                t = time.perf_counter()
                out = subprocess.run([CLI, "-c", cfg, "snapshot", "--pod", "bench/big-0", "--json"],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                outcome = json.loads(out.stdout)
                subprocess.run(
                    [CLI, "-c", cfg, "analyze", outcome["entry"], "--json"], capture_output=True, check=True
                )
                totals.append(time.perf_counter() - t)
                stops.append(outcome["stopped_seconds"])
                sizes.append(outcome["size"])
                floors.append(page_cache_write(os.path.join(work, "state", "spool"), outcome["size"]))
                for name in os.listdir(volume):
                    os.unlink(os.path.join(volume, name))
            open(os.path.join(volume, "release"), "w").close()
            said, _ = proc.communicate(timeout=60)
        pause = int(said.split("longest pause ")[1].split()[0]) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stop, floor = statistics.median(stops), statistics.median(floors)
    print(f"snapshot of a {a.size_mib} MiB process ({statistics.median(sizes) >> 20} MiB core), "
          f"median of {a.runs} runs")  # fmt: skip
    print(f"  command to analysed report      {statistics.median(totals):6.2f} s")
    print(f"  stopped (gdb, attach to detach) {stop:6.3f} s")
    print(f"  writing the core to page cache  {floor:6.3f} s")
    print(f"  stopped ÷ page-cache write      {stop / floor:6.2f}   (goal <= 1.0)")
    print(f"  longest pause the process saw   {pause:6.3f} s")


if __name__ == "__main__":
    main()
