"""FUSE volume benchmark: what a large core costs on a bucket mounted through s3fs or rclone.

    python -m bench.fuse [--size-mib 300] [--runs 3]

A mostly-zero core of ``--size-mib`` MiB (one 4 KiB page of data per MiB, like the thread
stacks of a crashed server) is written and published into the mounted bucket by the
handler's own code (:class:`~corevault.capture.volumecopy.VolumeCopy`: the writer thread the
handler copies a pod's volume on), in a child process measured with ``wait4``. Against a
SeaweedFS bucket on 127.0.0.1, in one run, medians of ``--runs``:

- the writer thread's cost: the same core written into a local directory through it ÷
  written there directly from the reading thread (:class:`~corevault.capture.stream.SparseSink`,
  then :meth:`~corevault.capture.safefs.NewFile.publish`; no goal: the price of giving up a
  volume that stops answering, paid beside the spool's compression on another core);
- the writer's peak RSS (goal ≤ 64 MiB, flat in the core's size: the core is streamed);
- publish time, and until the object is in the bucket, ÷ the same publish to a local
  directory (the baseline; no goal: this is the price of the network filesystem);
- the node-side cache at its largest (sampled every 20 ms) ÷ the core's size, and the
  FUSE daemon's peak RSS (goal: documented, as the node's cost of such volumes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress

import boto3
from botocore.config import Config

from testbed import fusefs, servers

#: the handler's volume copy: a writer thread fed by the reading thread (what a crash runs)
THREADED = """
import os, sys, time
from corevault import config
from corevault.capture import stream, volumecopy
directory, mib, state = sys.argv[1], int(sys.argv[2]), sys.argv[3]
buf = bytearray(stream.CHUNK)
buf[:4096] = os.urandom(4096)
view = memoryview(buf)
root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
started = time.perf_counter()
copy = volumecopy.VolumeCopy(config.from_dict({"state_dir": state}), (None, None), root, directory, 600)
for _ in range(mib):
    copy.write(buf, view, len(buf))
copy.publish("core", 0, 0)
copy.result(time.monotonic() + 600)
copy.close()
print(time.perf_counter() - started)
"""

#: the baseline: the same core written and published from the reading thread itself
DIRECT = """
import os, sys, time
from corevault.capture import safefs, stream
directory, mib = sys.argv[1], int(sys.argv[2])
buf = bytearray(stream.CHUNK)
buf[:4096] = os.urandom(4096)
view = memoryview(buf)
d = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
started = time.perf_counter()
f = safefs.NewFile(d)
sink = stream.SparseSink(f.fd)
for _ in range(mib):
    sink.write(buf, view, len(buf))
sink.finish()
f.publish("core", 0, 0)
print(time.perf_counter() - started)
"""


def write(directory: str, mib: int, writer: str = THREADED) -> tuple[float, int]:
    """Publish a core into ``directory`` in a child; (seconds from the first write until the
    core is published, as the child timed it: its start-up is not the writer's; peak RSS in KiB)."""
    state = tempfile.mkdtemp(prefix="cv-bench-fuse-state-")
    try:
        cmd = [sys.executable, "-c", writer, directory, str(mib), state]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        said = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"publishing into {directory} failed")
        return float(said), usage.ru_maxrss
    finally:
        shutil.rmtree(state, ignore_errors=True)


def cache_usage(mount: fusefs.Mount) -> int:
    """Bytes on the node's disk held by the daemon's cache: files in its cache directory and
    files it holds open (s3fs unlinks its temporary files at once)."""
    seen: dict[tuple[int, int], int] = {}
    mount_dev = os.stat(mount.path).st_dev
    paths = [os.path.join(top, n) for top, _, files in os.walk(mount.cache) for n in files]
    with suppress(OSError):
        paths += [os.path.join(f"/proc/{mount.pid}/fd", n) for n in os.listdir(f"/proc/{mount.pid}/fd")]
    for path in paths:
        with suppress(OSError):  # a cache file removed while we looked
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_dev != mount_dev:
                seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


class Sampler:
    """The largest node-side cache and FUSE daemon RSS seen while a publish runs."""

    def __init__(self, mount: fusefs.Mount) -> None:
        self.mount = mount
        self.cache = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.cache = max(self.cache, cache_usage(self.mount))

    def daemon_peak_rss(self) -> int:
        with open(f"/proc/{self.mount.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def in_bucket(s3, bucket: str, key: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=key):
        if time.monotonic() > deadline:
            raise SystemExit(f"{key} never reached {bucket}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    mib = args.size_mib
    print(f"{mib} MiB mostly-zero core, medians of {args.runs}")
    local = tempfile.mkdtemp(prefix="cv-bench-fuse-")
    try:
        base, direct = [], []
        for _ in range(args.runs):
            for writer, into in ((THREADED, base), (DIRECT, direct)):  # alternated: the machine drifts
                os.makedirs(os.path.join(local, "d"))
                into.append(write(os.path.join(local, "d"), mib, writer))
                shutil.rmtree(os.path.join(local, "d"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    base_s = statistics.median(t for t, _ in base)
    direct_s = statistics.median(t for t, _ in direct)
    print(
        f"local directory: {base_s:.2f} s, writer peak RSS {statistics.median(r for _, r in base) / 1024:.1f} MiB; "
        f"the writer thread ÷ writing from the reading thread {base_s / direct_s:.2f} ({direct_s:.2f} s; the stall defence's price)"
    )
    with servers.seaweed() as w:
        s3 = boto3.client(
            "s3", endpoint_url=w.endpoint, aws_access_key_id=servers.KEY,
            aws_secret_access_key=servers.SECRET, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip
        for kind in fusefs.KINDS:
            rows = []
            for run in range(args.runs):
                bucket = f"bench-{kind}-{run}"
                s3.create_bucket(Bucket=bucket)
                with fusefs.mounted(kind, w, bucket) as m, Sampler(m) as sampler:
                    started = time.perf_counter()
                    seconds, rss = write(m.path, mib)
                    in_bucket(s3, bucket, "core")
                    visible = time.perf_counter() - started
                    rows.append((seconds, visible, rss, sampler.cache, sampler.daemon_peak_rss()))
            med = [statistics.median(r[i] for r in rows) for i in range(5)]
            print(
                f"{kind:14} publish ÷ local {med[0] / base_s:5.1f} ({med[0]:.2f} s), in the bucket after "
                f"{med[1]:.2f} s; writer peak RSS {med[2] / 1024:.1f} MiB (goal ≤ 64); node cache at most "
                f"{med[3] / 2**20:.0f} MiB = {med[3] / (mib << 20):.2f} of the core's size; FUSE daemon peak RSS "
                f"{med[4] / 1024:.0f} MiB"
            )


if __name__ == "__main__":
    main()
