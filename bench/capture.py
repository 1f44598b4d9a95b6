"""Capture benchmark: the handler against the baselines it must beat, measured in one run.

    python -m bench.capture [--size-mib 1024] [--runs 3] [--big-gib 4]

Every number is a median over ``--runs`` runs, baseline and subject interleaved, the core
fed through a pipe as the kernel does (``cat core | …``), so both sides pay the same feeder:

- plain capture (volume target only) ÷ ``cat > file``                  goal ≤ 1.0
- compressed capture (vault target only, the default level) ÷ ``zstd -3 -T1``   goal ≤ 1.0,
  with the stored sizes beside; and ÷ ``zstd`` at the handler's own level
- an all-zero core (what a process that touched its memory once is mostly made of), both
  targets, ÷ ``head -c SIZE /dev/zero | cat``                         goal ≤ 1.5

The last two are timed the way the kernel holds the crashed process (with ``core_pipe_limit``
> 0): until the reader lets go of the pipe (:func:`timed`). The handler lets go once the core
is read and the plain copy published, and finishes the compressed copy and its SHA-256 after
that, so the time to its exit and its CPU are printed beside, against the same baselines and,
for the zero core, against SHA-256 of the same bytes (``openssl dgst -sha256``): SHA-256 has
no shortcut for zeros, so that is the floor of the handler's exit there.
- fixed cost of the whole handler on a 4 KiB core (both targets)
  ÷ ``python -c pass``                                               goal ≤ 1.5;
  with ``--fixed-against LAUNCHER``, also another tree's launcher (written by that tree's
  ``hostsetup.isolated_launcher``) crash by crash in turn with this one, on the same settings
  snapshot: a change worth a few hundred microseconds shows there, where separate runs of the
  bench on a shared machine vary by more
- peak RSS of the handler with a 1 GiB and a 4 GiB core               goal ≤ 32 MiB, flat;
  the bench exits with status 1 when either is over, so a regression is loud

The RSS is the handler's own: it is started by a small launcher (:data:`RSS_LAUNCHER`), never
by this process. A child made with vfork (what ``subprocess`` uses) inherits the parent's peak
RSS at exec, so starting it from here reported this bench's own memory (the 64 MiB of blocks
:func:`core_like` builds) as the handler's.

The handler runs for real: the launcher ``corevault install`` points the kernel at
(``corevault-capture-isolated``: ``python -I -S``, see ``hostsetup.isolated_launcher``), with a live process standing
in for the crashed one (its pidfd passed as the kernel does), a host rule opting it in.
The core is synthetic but shaped like one: 64 KiB blocks of untouched (zero) pages,
pointer-rich heap, text and incompressible data, so zstd gets a realistic ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from corevault import config, hostsetup, spool

WORK = "/tmp/corevault-bench"
BLOCK = 64 << 10
KERNEL_ENV = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "TERM": "linux"}
RSS_GOAL_MIB = 32
#: Runs argv[1:] as its child (stdin inherited, stdout and stderr closed as the kernel leaves
#: them) and prints the child's exit code and peak RSS in KiB. Its own RSS (~9 MiB) is below
#: the handler's, so what the child inherits at exec cannot hide the handler's figure.
RSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.closerange(1, 3)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _block(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.45:
        return bytes(BLOCK)  # untouched pages
    if kind < 0.75:  # heap full of pointers: two random bytes in every eight
        b = bytearray(os.urandom(BLOCK))
        for i, v in enumerate((0x4C, 0x5F, 0x7F, 0, 0, 0)):
            b[i + 2 :: 8] = bytes([v]) * (BLOCK // 8)
        return bytes(b)
    if kind < 0.90:  # strings and logs
        words = [
            f"request id={rng.randrange(10**6)} path=/api/v1/items/{rng.randrange(999)} " for _ in range(64)
        ]
        text = "".join(rng.choice(words) for _ in range(2000)).encode()
        return text[:BLOCK].ljust(BLOCK, b"\0")
    return os.urandom(BLOCK)  # compressed or encrypted data


def core_like(path: str, mib: int) -> str:
    """A ``mib`` MiB core-like file, made once and kept."""
    if os.path.exists(path) and os.path.getsize(path) == mib << 20:
        return path
    rng = random.Random(42)
    chunks = [b"".join(_block(rng) for _ in range(16)) for _ in range(64)]
    with open(path + ".tmp", "wb") as f:
        for _ in range(mib):
            f.write(rng.choice(chunks))
    os.replace(path + ".tmp", path)
    return path


class Stage:
    """A live stand-in for the crashed process, and a handler configuration opting it in."""

    def __init__(self, targets: list[str], level: int, threads: int) -> None:
        # one per run: two runs at once (on a shared machine) would otherwise clean up, and keep
        # state in, each other's stage; the core-like inputs beside it are shared, made once
        self.dir = os.path.join(WORK, f"stage-{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.out = os.path.join(self.dir, "vol")
        os.makedirs(self.out)
        self.config = os.path.join(self.dir, "c.toml")
        with open(self.config, "w") as f:
            f.write(
                f'state_dir = "{self.dir}/state"\n'
                f"[capture]\ntargets = {targets!r}\nstorm_max = 1000000\ntimeout = 3600\n"
                f'[spool]\nmax_size = "64G"\nkeep_free = "1G"\ncompression_level = {level}\n'
                f"compression_threads = {threads}\n"
                f'[[rules]]\nexe = "*/sleep"\npattern = "{self.out}/core"\n'
            )
        self.settings, self.snapshot = config.write_snapshot(self.config)
        self.proc = subprocess.Popen(["sleep", "100000"])
        self.pidfd = os.pidfd_open(self.proc.pid)

    def args(self) -> list[str]:
        pid = str(self.proc.pid)
        values = {
            "P": pid, "p": pid, "i": pid, "I": pid, "s": "11", "t": str(int(time.time())), "d": "1",
            "u": "0", "g": "0", "c": str((1 << 64) - 1), "C": "0", "h": "bench", "e": "sleep",
            "f": "sleep", "E": "!usr!bin!sleep", "F": str(self.pidfd),
        }  # fmt: skip
        from corevault.pattern import SPECIFIERS

        return [hostsetup.default_handler(), "-c", self.snapshot, *(values[s] for s in SPECIFIERS)]

    def clean(self) -> None:
        for name in os.listdir(self.out):
            os.unlink(os.path.join(self.out, name))
        for entry in spool.entries(self.settings.spool_dir):
            shutil.rmtree(os.path.join(spool.ready_dir(self.settings.spool_dir), entry))

    def close(self) -> None:
        os.close(self.pidfd)
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(
    feed: list[str],
    cmd: list[str],
    stdout: str | None = None,
    pass_fds: tuple = (),
    held: list[float] | None = None,
) -> tuple[float, int, float]:
    """Run ``feed | cmd``; wall seconds, the peak RSS (KiB) and the CPU seconds of ``cmd``.

    With ``held``, the seconds until ``cmd`` let go of the pipe (its fd 0 no longer the pipe, or
    ``cmd`` gone) are appended to it: how long the kernel holds a crashed process with
    ``core_pipe_limit`` > 0. Watched every millisecond from here.
    """
    out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    feeder = subprocess.Popen(feed, stdout=subprocess.PIPE)
    # The kernel starts the handler with a minimal environment and cwd /.
    sink = subprocess.Popen(cmd, stdin=feeder.stdout, stdout=out, pass_fds=pass_fds, cwd="/", env=KERNEL_ENV)
    assert feeder.stdout is not None
    feeder.stdout.close()
    if held is not None:
        held.append(_held(sink.pid) - started)
    _, status, usage = os.wait4(sink.pid, 0)
    feeder.wait()
    elapsed = time.perf_counter() - started
    sink.returncode = os.waitstatus_to_exitcode(status)
    if stdout:
        out.close()  # type: ignore[union-attr]
    if sink.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with {sink.returncode}")
    return elapsed, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def _held(pid: int) -> float:
    """When process ``pid`` let go of the pipe on its fd 0 (perf_counter)."""
    fd0 = f"/proc/{pid}/fd/0"
    try:
        pipe = os.readlink(fd0)
        while pipe.startswith("pipe:") and os.readlink(fd0) == pipe:
            time.sleep(0.001)
    except OSError:  # gone (or a zombie, whose fds are closed)
        pass
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_plain(data: str, runs: int) -> tuple[float, float, float]:
    stage = Stage(["volume"], 3, 1)
    cat, cat_sync, ours = [], [], []
    try:
        for _ in range(runs):
            target = os.path.join(stage.out, "cat-copy")
            cat.append(timed(["cat", data], ["cat"], stdout=target)[0])
            os.unlink(target)
            # The handler fsyncs the core before naming it; cat then sync(1) is the fair pair.
            cat_sync.append(timed(["cat", data], ["sh", "-c", f"cat > {target} && sync {target}"])[0])
            os.unlink(target)
            ours.append(timed(["cat", data], stage.args(), pass_fds=(stage.pidfd,))[0])
            with open(os.path.join(stage.out, "core"), "rb") as f:
                f.seek(0, 2)
                assert f.tell() == os.path.getsize(data)
            stage.clean()
    finally:
        stage.close()
    return median(cat), median(cat_sync), median(ours)


#: per subject, medians of (seconds held, seconds to exit, CPU seconds)
Figures = dict[str, tuple[float, float, float]]


def _medians(seen: dict[str, list[tuple[float, float, float]]]) -> Figures:
    return {k: tuple(median([run[i] for run in v]) for i in range(3)) for k, v in seen.items()}  # type: ignore[misc]


def _run(seen: dict, name: str, feed: list[str], cmd: list[str], **kw) -> None:
    held: list[float] = []
    wall, _, cpu = timed(feed, cmd, held=held, **kw)
    seen.setdefault(name, []).append((held[0], wall, cpu))


def bench_compressed(
    data: str, runs: int, level: int, threads: int, against: int
) -> tuple[Figures, dict[str, int]]:
    """The handler (vault target, zstd ``level``) on ``data``, against ``zstd -against`` (the goal's
    baseline) and ``zstd -level`` (the same settings); and the bytes each stored."""
    stage = Stage(["vault"], level, threads)
    seen: dict[str, list[tuple[float, float, float]]] = {}
    stored: dict[str, int] = {}
    clis = {f"zstd -{n} -T{threads}": n for n in dict.fromkeys((against, level))}
    try:
        for _ in range(runs):
            for name, n in clis.items():
                target = os.path.join(stage.out, "cli.zst")
                _run(seen, name, ["cat", data], ["zstd", f"-{n}", f"-T{threads}", "-q", "-c"], stdout=target)
                stored[name] = os.path.getsize(target)
                os.unlink(target)
            _run(seen, "ours", ["cat", data], stage.args(), pass_fds=(stage.pidfd,))
            [entry] = spool.entries(stage.settings.spool_dir)
            stored["ours"] = spool.read_meta(stage.settings.spool_dir, entry)["core"]["stored_size"]
            stage.clean()
    finally:
        stage.close()
    return _medians(seen), stored


def bench_zeros(mib: int, runs: int) -> Figures:
    """``cat``, ``openssl dgst -sha256`` (SHA-256 of the same bytes, SHA-NI) and the handler
    (both targets) on ``mib`` MiB of zeros."""
    feed = ["head", "-c", str(mib << 20), "/dev/zero"]
    stage = Stage(["volume", "vault"], 3, 1)
    seen: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for _ in range(runs):
            _run(seen, "cat", feed, ["cat"])
            _run(seen, "sha256", feed, ["openssl", "dgst", "-sha256"])
            _run(seen, "ours", feed, stage.args(), pass_fds=(stage.pidfd,))
            [entry] = spool.entries(stage.settings.spool_dir)
            assert spool.read_meta(stage.settings.spool_dir, entry)["core"]["size"] == mib << 20
            stage.clean()
    finally:
        stage.close()
    return _medians(seen)


def bench_fixed(runs: int, against: str | None = None) -> dict[str, tuple[float, float]]:
    """Medians of (wall, CPU) seconds: ``python -c pass``, ``python -I -S -c pass``, the whole
    handler; and ``work``: the handler's own seconds after start-up and imports (wall only);
    with ``against``, ``other``: that launcher's, each run right after this one's (and before it
    in every other run).

    CPU time is given beside wall time because it holds still on a loaded machine: the
    handler waits on fsync and on other processes, ``python -c pass`` does not.
    """
    tiny = os.path.join(WORK, f"tiny-core-{os.getpid()}")
    with open(tiny, "wb") as f:
        f.write(b"\x7fELF" + os.urandom(4092))
    stage = Stage(["volume", "vault"], 3, 1)
    seen: dict[str, list[tuple[float, float]]] = {"python": [], "isolated": [], "handler": [], "work": []}
    if against:
        seen["other"] = []
    try:
        for i in range(runs):
            for name, cmd in (("python", [sys.executable, "-c", "pass"]),
                              ("isolated", [sys.executable, "-I", "-S", "-c", "pass"])):  # fmt: skip
                wall, _, cpu = timed(["cat", tiny], cmd)
                seen[name].append((wall, cpu))
            args = stage.args()
            launchers = [("handler", args[0])] + ([("other", against)] if against else [])
            for name, launcher in launchers if i % 2 == 0 else launchers[::-1]:
                wall, _, cpu = timed(["cat", tiny], [launcher, *args[1:]], pass_fds=(stage.pidfd,))
                seen[name].append((wall, cpu))
                [entry] = spool.entries(stage.settings.spool_dir)
                if name == "handler":
                    meta = spool.read_meta(stage.settings.spool_dir, entry)
                    seen["work"].append((meta["handler_seconds"], 0.0))
                stage.clean()
    finally:
        stage.close()
        os.unlink(tiny)
    return {k: (median([w for w, _ in v]), median([c for _, c in v])) for k, v in seen.items()}


def bench_rss(data: str, copies: int) -> tuple[int, int]:
    """Peak RSS (KiB) of the handler on ``copies`` of ``data``: as its parent saw it, and as it said.

    The second figure is the one the handler writes into the spool entry (``handler_max_rss_kib``).
    """
    stage = Stage(["volume", "vault"], 3, 1)
    try:
        feeder = subprocess.Popen(["cat", *[data] * copies], stdout=subprocess.PIPE)
        launcher = [sys.executable, "-I", "-S", "-c", RSS_LAUNCHER, *stage.args()]
        out = subprocess.run(
            launcher, stdin=feeder.stdout, capture_output=True, text=True, pass_fds=(stage.pidfd,),
            cwd="/", env=KERNEL_ENV, check=True,
        )  # fmt: skip
        assert feeder.stdout is not None
        feeder.stdout.close()
        feeder.wait()
        code, rss = (int(x) for x in out.stdout.split())
        if code != 0:
            raise SystemExit(f"the handler failed with {code}")
        [entry] = spool.entries(stage.settings.spool_dir)
        said = spool.read_meta(stage.settings.spool_dir, entry)["handler_max_rss_kib"]
        stage.clean()
    finally:
        stage.close()
    return rss, said


def report_fixed(runs: int, against: str | None = None) -> None:
    """Print the handler's fixed cost against ``python -c pass``, both measured in this run (and
    against the launcher ``against``, taking turns crash by crash)."""
    fixed = bench_fixed(runs, against)
    (py_wall, py_cpu), (iso_wall, iso_cpu), (ours_wall, ours_cpu) = (
        fixed["python"],
        fixed["isolated"],
        fixed["handler"],
    )
    print(
        f"fixed cost, 4 KiB    {ours_wall * 1000:7.1f} ms  python -c pass      {py_wall * 1000:7.1f} ms  "
        f"ratio {ours_wall / py_wall:5.2f}  (goal <= 1.5; medians of {runs}; "
        f"{fixed['work'][0] * 1000:.1f} ms of it after start-up and imports)"
    )
    print(
        f"  the same in CPU    {ours_cpu * 1000:7.1f} ms  python -c pass      {py_cpu * 1000:7.1f} ms  "
        f"ratio {ours_cpu / py_cpu:5.2f}  (python -I -S -c pass, the floor of any Python handler: "
        f"{iso_cpu * 1000:.1f} ms CPU, {iso_wall * 1000:.1f} ms wall, ratio {iso_cpu / py_cpu:.2f})"
    )
    if against:
        other_wall, other_cpu = fixed["other"]
        print(
            f"  against {against}: CPU {other_cpu * 1000:.2f} ms, this tree's {ours_cpu * 1000:.2f} ms "
            f"(ratio {ours_cpu / other_cpu:.3f}; wall {other_wall * 1000:.1f} and {ours_wall * 1000:.1f} ms)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="core size for the throughput runs")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--fixed-runs", type=int, default=30, help="runs for the fixed cost")
    ap.add_argument("--big-gib", type=int, default=4, help="the larger core of the RSS check, in GiB")
    ap.add_argument("--zero-mib", type=int, default=2048, help="size of the all-zero core")
    ap.add_argument(
        "--level", type=int, default=config.Settings().compression_level, help="the handler's zstd level"
    )
    ap.add_argument("--against", type=int, default=3, help="the zstd level of the goal's baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed-only", action="store_true", help="measure only the handler's fixed cost")
    ap.add_argument(
        "--fixed-against", metavar="LAUNCHER", help="another tree's launcher, timed crash by crash in turn"
    )
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    if a.fixed_only:
        report_fixed(a.fixed_runs, a.fixed_against)
        return 0
    data = core_like(os.path.join(WORK, f"core-like-{a.size_mib}m"), a.size_mib)
    size = os.path.getsize(data)
    print(f"core-like input: {size >> 20} MiB, fed through a pipe; medians of {a.runs} runs\n")

    cat, cat_sync, plain = bench_plain(data, a.runs)
    print(
        f"plain capture        {plain:7.3f} s   cat > file          {cat:7.3f} s   ratio {plain / cat:5.2f}  (goal <= 1.0)"
    )
    print(
        f"                                 cat > file; sync    {cat_sync:7.3f} s   ratio {plain / cat_sync:5.2f}  (both durable)"
    )
    comp, stored = bench_compressed(data, a.runs, a.level, a.threads, a.against)
    held, wall, cpu = comp["ours"]
    for name, (cli_held, cli_wall, cli_cpu) in ((n, f) for n, f in comp.items() if n != "ours"):
        goal = "goal <= 1.0" if name.startswith(f"zstd -{a.against} ") else "the same level"
        print(
            f"compressed capture   {held:7.3f} s   {name:<19} {cli_held:7.3f} s   "
            f"ratio {held / cli_held:5.2f}  ({goal}; the process held; level {a.level}; compression "
            f"ratio {size / stored['ours']:.2f}, zstd's {size / stored[name]:.2f})"
        )
        print(
            f"  to exit, CPU       {wall:7.3f} s, {cpu:5.2f} s   zstd {cli_wall:7.3f} s, {cli_cpu:5.2f} s   "
            f"ratios {wall / cli_wall:5.2f}, {cpu / cli_cpu:5.2f}"
        )
    zeros = bench_zeros(a.zero_mib, a.runs)
    (held, wall, cpu), (cat_held, cat_wall, cat_cpu), (_, sha_wall, sha_cpu) = (
        zeros["ours"], zeros["cat"], zeros["sha256"]
    )  # fmt: skip
    print(
        f"zero core, {a.zero_mib} MiB {held:7.3f} s   head -c | cat       {cat_held:7.3f} s   "
        f"ratio {held / cat_held:5.2f}  (goal <= 1.5; the process held; both targets)"
    )
    print(
        f"  to exit, CPU       {wall:7.3f} s, {cpu:5.2f} s   cat  {cat_wall:7.3f} s, {cat_cpu:5.2f} s   "
        f"ratios {wall / cat_wall:5.2f}, {cpu / cat_cpu:5.2f}; against SHA-256 of the same bytes "
        f"(openssl dgst -sha256: {sha_wall:.3f} s, {sha_cpu:.2f} s CPU) {wall / sha_wall:5.2f}, {cpu / sha_cpu:5.2f}"
    )
    report_fixed(a.fixed_runs, a.fixed_against)
    rss1, said1 = bench_rss(data, 1)
    rss4, said4 = bench_rss(data, a.big_gib * 1024 // a.size_mib)
    over = max(rss1, rss4) > RSS_GOAL_MIB << 10
    print(
        f"peak RSS             {rss1 / 1024:7.1f} MiB with {size >> 20} MiB, "
        f"{rss4 / 1024:.1f} MiB with {a.big_gib} GiB   (goal <= {RSS_GOAL_MIB} MiB, flat; "
        f"the handler's own figures {said1 / 1024:.1f} and {said4 / 1024:.1f} MiB)"
        + ("   OVER THE GOAL" if over else "")
    )
    if over:
        print(
            f"error: the handler's peak RSS is over {RSS_GOAL_MIB} MiB; find what holds the core",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
