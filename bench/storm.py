"""A crash storm on one node, in pipe and socket mode: nothing lost, the storm limit held, the spool drained.

    python -m bench.storm [--pods 200] [--crashes 3] [--namespaces 4] [--big 4] [--big-mib 256]
                          [--parallel 6] [--storm-max 2] [--baseline 30] [--modes pipe,socket]
                          [--group-samples N] [--match-after N]

For each mode, ``--pods`` runc pods (kubepods cgroups, one container each, namespaces in
turn) crash-loop ``--crashes`` times at once, ``--parallel`` containers running at a time
(:mod:`testbed.storm`); ``--big`` of them with a ``--big-mib`` MiB process, the rest with a
small one. Then:

- **nothing lost silently**: every crash is captured, or journaled as lost with a reason, by
  the handler or the listener (the storm limit, the dump slots…) or by the kernel
  (``core_pipe_limit``, read from its log); the bench exits 1 otherwise;
- **the storm limit holds**: no pod has more than ``--storm-max`` cores kept;
- **the spool is drained**: an agent (shipping and analysing in parallel, as many analyses as
  cores and memory allow) takes the node's spool into the catalog. Printed: analysed small
  crashes per second (goal >= 20/s), how many were matched to their group's samples rather
  than analysed (``[analysis] match_after``, default 3, and ``group_samples``, default 20),
  and the time until the last report was in the catalog; beside them two baselines measured
  in the same run: a copy of the whole spool drained under the rule before ``match_after``
  (matched only once ``group_samples`` crashes were analysed in full), and a copy of
  ``--baseline`` of the small crashes drained with ``group_samples = 0`` (every crash
  analysed in full).

200 runc containers are what this asks of 2 cores: each ``runc run`` costs a few hundred
ms of CPU, so the storm itself takes minutes on a loaded machine; the bench says how long.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from corevault import config, hostsetup, spool
from corevault.agent.coredumps import CoredumpListener
from corevault.agent.kernellog import KernelLog
from corevault.agent.loop import Agent
from corevault.vault import catalog, tables
from testbed import build, runc, storm, sysctl

GOAL_PER_SECOND = 20.0


def capture_storm(work: str, mode: str, plan: storm.Plan, rootfs: str, storm_max: int, analysis: str):
    """Install ``mode``, run the storm, journal the kernel's skips; the node's settings, pods, seconds."""
    d = os.path.join(work, mode[0])
    os.makedirs(os.path.join(d, "vol"))
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[capture]\nstorm_max = {storm_max}\nstorm_window = 3600\n'
                f'timeout = 600\n[spool]\nmax_size = "64G"\n'
                f'[agent]\npoll_interval = 0.1\nmetrics = ""\n'
                f"[analysis]\n{analysis}")  # fmt: skip
    settings = config.load(cfg)
    kernel = KernelLog(settings)
    kernel.poll()  # from now on
    handler = os.path.join(d, "h")
    os.symlink(hostsetup.default_handler(), handler)
    listener = None
    with sysctl.core_settings():
        if mode == "socket":
            listener = CoredumpListener(settings, hostsetup.socket_path(settings.state_dir)).listen().start()
            hostsetup.install(None, config_path=cfg, socket=listener.path)
        else:
            hostsetup.install(handler, config_path=cfg)
        try:
            started = time.monotonic()
            pods = storm.run(plan, rootfs, os.path.join(d, "vol"))
            seconds = time.monotonic() - started
        finally:
            hostsetup.uninstall(hostsetup.state_path(settings))
            if listener is not None:
                listener.close()
    kernel.poll()
    kernel.close()
    return settings, pods, seconds


def baseline_node(
    work: str, name: str, settings: config.Settings, entries: list[str], analysis: str
) -> config.Settings:
    """A node holding copies of ``entries`` and the store, with ``analysis`` its [analysis] settings."""
    d = os.path.join(work, name)
    os.makedirs(d)
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[agent]\npoll_interval = 0.1\nmetrics = ""\n[analysis]\n{analysis}')
    base = config.load(cfg)
    spool.ensure(base.spool_dir)
    for entry in entries:
        shutil.copytree(os.path.join(spool.ready_dir(settings.spool_dir), entry),
                        os.path.join(spool.ready_dir(base.spool_dir), entry))  # fmt: skip
    subprocess.run(["cp", "-a", "--sparse=always", settings.buildid_dir, base.buildid_dir], check=True)
    return base


def _agent(config_path: str, ready: Connection) -> None:
    agent = Agent(config.load(config_path))
    ready.send(True)
    agent.run(once=True)


def drain(settings: config.Settings, small: set[str]) -> dict[str, float]:
    """Run an agent until the spool is in the catalog and analysed; times and counts.

    The agent is a process of its own, as on a node (the catalog reads that time it here do
    not take turns with it for the interpreter), started afresh rather than forked from this
    one, whose threads (the socket listener's) may hold a lock at the fork; the clock starts
    when it is ready.
    """
    assert settings.source is not None
    engine = catalog.connect(settings.catalog_url)
    total = len(spool.entries(settings.spool_dir))
    spawn = multiprocessing.get_context("spawn")
    ready, tell = spawn.Pipe(duplex=False)
    agent = spawn.Process(target=_agent, args=(settings.source, tell))
    agent.start()
    ready.recv()
    started = time.monotonic()
    last_small = last = 0.0
    done_small = done = 0
    while agent.is_alive() or done < total:
        with engine.connect() as conn:
            c = tables.crashes.c
            rows = conn.execute(tables.crashes.select().with_only_columns(c.id, c.analysis, c.matched)).all()
        finished = [r for r in rows if r.analysis != "pending"]
        now = time.monotonic() - started
        if len(finished) > done:
            done, last = len(finished), now
        n_small = sum(1 for r in finished if r.id in small)
        if n_small > done_small:
            done_small, last_small = n_small, now
        if not agent.is_alive():
            break
        time.sleep(0.1)
    agent.join()
    engine.dispose()
    matched = sum(1 for r in rows if r.matched and r.id in small)
    failed = sum(1 for r in rows if r.analysis == "failed")
    return {"total": total, "done": done, "last": last, "small": done_small, "last_small": last_small,
            "matched": matched, "failed": failed}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.storm")
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--crashes", type=int, default=3, help="crashes per pod")
    ap.add_argument("--namespaces", type=int, default=4)
    ap.add_argument("--big", type=int, default=4, help="pods whose process is big")
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--parallel", type=int, default=6, help="containers running at once")
    ap.add_argument("--storm-max", type=int, default=2, help="[capture] storm_max: cores kept per pod")
    ap.add_argument(
        "--baseline", type=int, default=30, help="small crashes analysed in full, for the baseline"
    )
    ap.add_argument("--modes", default="pipe,socket")
    ap.add_argument(
        "--group-samples",
        type=int,
        help="[analysis] group_samples of the drained node (default: the default)",
    )
    ap.add_argument(
        "--match-after", type=int, help="[analysis] match_after of the drained node (default: the default)"
    )
    a = ap.parse_args()
    defaults = config.Settings()
    samples = defaults.group_samples if a.group_samples is None else a.group_samples
    analysis = f"group_samples = {samples}\n"
    analysis += f"match_after = {a.match_after}\n" if a.match_after is not None else ""
    # the rule before match_after: matched only once group_samples crashes were analysed in full
    before = f"group_samples = {samples}\nmatch_after = {max(samples, 1)}\n"
    plan = storm.Plan(a.pods, a.crashes, a.namespaces, a.big, a.big_mib, a.parallel)
    modes = a.modes.split(",")
    if "socket" in modes and hostsetup.kernel_socket_mode() != "@@":
        print(
            f"this kernel ({os.uname().release}) has no coredump socket with requests (6.17+): pipe mode only"
        )
        modes = [m for m in modes if m != "socket"]
    work = tempfile.mkdtemp(prefix="cvs-", dir="/tmp")  # short: the core_pattern has 127 bytes
    failures: list[str] = []
    try:
        rootfs = runc.build_rootfs(os.path.join(work, "rootfs"), {"crasher": build.build("crasher")})
        for mode in modes:
            settings, pods, seconds = capture_storm(work, mode, plan, rootfs, a.storm_max, analysis)
            acc = storm.account(settings.spool_dir, pods, plan)
            print(f"\n{mode} mode: {plan.pods} pods in {plan.namespaces} namespaces, {plan.crashes} crashes each "
                  f"({plan.big} pods of {plan.big_mib} MiB), {plan.parallel} containers at once: "
                  f"{seconds:.1f} s, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
            print(f"  crashes {acc.expected}: captured {acc.captured}, journaled lost {sum(acc.dropped.values())} "
                  f"({', '.join(f'{n} {why}' for why, n in acc.dropped.most_common()) or 'none'}), "
                  f"skipped by the kernel {acc.kernel} (and {acc.kernel_unnamed} it only counted); "
                  f"unaccounted {acc.expected - acc.accounted}")  # fmt: skip
            most = max(acc.per_pod.values(), default=0)
            print(f"  storm limit: at most {most} cores kept of one pod (limit {a.storm_max})")
            if not acc.complete:
                failures.append(f"{mode}: {acc.expected - acc.accounted} crashes lost silently, "
                                f"{acc.unexplained} journaled without a reason")  # fmt: skip
            if most > a.storm_max:
                failures.append(f"{mode}: a pod kept {most} cores, over the storm limit {a.storm_max}")
            entries = spool.entries(settings.spool_dir)
            metas = {e: spool.read_meta(settings.spool_dir, e) for e in entries}
            big_pods = {p.container.id for p in pods if p.big and p.container is not None}
            small = {m.get("id") or e for e, m in metas.items() if m["pod"]["container_id"] not in big_pods}
            base_entries = [e for e in entries if (metas[e].get("id") or e) in small][: a.baseline]
            here = os.path.join(work, mode[0])
            whole = baseline_node(here, "before", settings, entries, before)
            full = baseline_node(here, "full", settings, base_entries, "group_samples = 0\n")
            got = drain(settings, small)
            old = drain(whole, small)
            ref = drain(full, set(base_entries))
            rate, old_rate, ref_rate = (
                r["small"] / r["last_small"] if r["last_small"] else 0.0 for r in (got, old, ref)
            )
            print(f"  drained {got['done']} of {got['total']} entries; the last report in the catalog after "
                  f"{got['last']:.1f} s ({got['failed']} analyses failed); before match_after: {old['last']:.1f} s, "
                  f"ratio {got['last'] / old['last'] if old['last'] else float('nan'):.2f}")  # fmt: skip
            print(f"  small crashes: {got['small']} analysed in {got['last_small']:.1f} s = {rate:.1f}/s "
                  f"(goal >= {GOAL_PER_SECOND:g}/s), {got['matched']} of them matched to their group's samples")  # fmt: skip
            print(f"    baseline, the same spool matched only after {samples} samples: {old_rate:.1f}/s "
                  f"({old['matched']} matched), ratio {rate / old_rate if old_rate else float('nan'):.2f}")  # fmt: skip
            print(f"    baseline, every one analysed in full ({ref['small']} of them): {ref_rate:.1f}/s, "
                  f"ratio {rate / ref_rate if ref_rate else float('nan'):.2f}")  # fmt: skip
            shutil.rmtree(os.path.join(work, mode[0]), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
