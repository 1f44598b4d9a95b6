"""How late one hostile pod can make another pod's crash reach the catalog.

    python -m bench.tenants [--limit 30] [--runs 3]

Real crashes in runc pods of two namespaces, captured once by the installed handler:
tenant A's program and two libraries it preloads are ELF files that claim 16 million section
headers each, in sparse 1 GiB files (:func:`testbed.hostile.section_bomb_crash`), tenant
B's is an ordinary segfault. Then, on
copies of that spool, an agent with one analysis worker and an analysis limit of
``--limit`` seconds runs

- **alone**: B's entry only (the baseline);
- **hostile**: A's entry first, then B's, so A's analysis is in flight, up to the limit,
  while B's crash is shipped.

Printed: the seconds from the agent's start until B's crash is in the catalog in each case,
the delay A adds (goal: at most 10 s), and when B's report was ready.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

from corevault import config, hostsetup, spool
from corevault.agent.loop import Agent
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault
from testbed import build, hostile, runc, sysctl

GOAL = 10.0


def capture(work: str) -> tuple[str, str]:
    """Crash A's hostile program, then B's; returns their entry ids (in ``work``/s/spool)."""
    rootfs = runc.build_rootfs(os.path.join(work, "rootfs"), build.build_all())
    volume = os.path.join(work, "vol")
    os.makedirs(volume)
    evil = hostile.section_bomb_crash(build.build("crasher"), build.build("libcrashy.so"), volume)
    handler = os.path.join(work, "h")
    os.symlink(hostsetup.default_handler(), handler)
    cfg = os.path.join(work, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{work}/s"\n')
    ids = []
    with sysctl.core_settings():
        hostsetup.install(handler, config_path=cfg)
        try:
            for namespace, args in (("tenant-a", evil), ("tenant-b", ["/app/crasher", "segv"])):
                annotations = {
                    "io.kubernetes.pod.namespace": namespace,
                    "io.kubernetes.pod.name": namespace + "-pod",
                    "corevault.io/core-pattern": "/data/dump-a/core-%p",
                    "corevault.io/targets": "vault",
                }
                c = runc.Container(rootfs, args, volume=volume, annotations=annotations)
                c.run()
                spooled = os.path.join(work, "s", "spool")
                [entry] = [
                    e for e in spool.entries(spooled)
                    if spool.read_meta(spooled, e)["pod"]["container_id"] == c.id
                ]  # fmt: skip
                ids.append(entry)
        finally:
            hostsetup.uninstall(os.path.join(work, "s", hostsetup.STATE_NAME))
    return ids[0], ids[1]


def node(work: str, name: str, entries: list[str], limit: float) -> config.Settings:
    """A node of its own holding copies of ``entries`` and the store (holes kept)."""
    d = os.path.join(work, name)
    cfg = os.path.join(d, "c.toml")
    os.makedirs(d)
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[agent]\npoll_interval = 0.1\nmetrics = ""\n'
                f"analysis_timeout = {limit}\nanalysis_workers = 1\nanalysis_memory = \"8G\"\n")  # fmt: skip
    settings = config.load(cfg)
    spool.ensure(settings.spool_dir)
    for entry in entries:
        shutil.copytree(
            os.path.join(spool.ready_dir(os.path.join(work, "s", "spool")), entry),
            os.path.join(spool.ready_dir(settings.spool_dir), entry),
        )
    subprocess.run(["cp", "-a", "--sparse=always", os.path.join(work, "s", "store"), settings.buildid_dir],
                   check=True)  # fmt: skip
    return settings


def b_times(settings: config.Settings, b: str, a: str | None = None) -> tuple[float, float]:
    """Seconds from the agent's start until B is in the catalog, and until its report is.

    With ``a``, A's analysis must still be running when B is in the catalog, and be stopped
    at its limit in the end: otherwise this is not the case the bench is for.
    """
    agent = Agent(settings)
    thread = threading.Thread(target=agent.run)
    engine = LocalVault(settings).engine
    started = time.monotonic()
    thread.start()
    in_catalog = None
    try:
        while time.monotonic() - started < 900:
            with engine.connect() as conn:
                row = catalog.get_crash(conn, b)
            if row is not None:
                if in_catalog is None:
                    in_catalog = time.monotonic() - started
                    with engine.connect() as conn:
                        hostile_row = catalog.get_crash(conn, a) if a else None
                    if a and (hostile_row is None or hostile_row["analysis"] != "pending"):
                        raise SystemExit("A's analysis was not in flight when B reached the catalog")
                if row["analysis"] != "pending":
                    if a:
                        with engine.connect() as conn:
                            hostile_row = catalog.get_crash(conn, a)
                        error = (hostile_row or {}).get("analysis_error") or ""
                        if "was stopped" not in error:
                            raise SystemExit(f"A's analysis was not stopped at its limit: {hostile_row}")
                    return in_catalog, time.monotonic() - started
            time.sleep(0.05)
        raise SystemExit("B's crash was not analysed within 15 minutes")
    finally:
        agent.stop.set()
        thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.tenants")
    ap.add_argument(
        "--limit",
        type=float,
        default=5.0,
        help="the analysis limit, seconds (A's analysis needs about 10 s)",
    )
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cvt-", dir="/tmp")  # short: the core_pattern has 127 bytes
    try:
        a, b = capture(work)
        alone, hostile_runs = [], []
        for i in range(args.runs):
            alone.append(b_times(node(work, f"alone-{i}", [b], args.limit), b))
            hostile_runs.append(b_times(node(work, f"hostile-{i}", [a, b], args.limit), b, a))
            shutil.rmtree(os.path.join(work, f"alone-{i}"))
            shutil.rmtree(os.path.join(work, f"hostile-{i}"))
        base = statistics.median(t for t, _ in alone)
        worst = max(t for t, _ in hostile_runs)
        print(f"tenant B's crash into the catalog, one analysis worker, analysis limit {args.limit:g} s, "
              f"{args.runs} runs:")  # fmt: skip
        print(
            f"  alone: median {base:.2f} s; report ready after {statistics.median(r for _, r in alone):.2f} s"
        )
        print(f"  behind tenant A's hostile crash: worst {worst:.2f} s (runs: "
              f"{', '.join(f'{t:.2f}' for t, _ in hostile_runs)}); report ready after "
              f"{statistics.median(r for _, r in hostile_runs):.2f} s")  # fmt: skip
        print(f"  delay A adds to B reaching the catalog: {worst - base:.2f} s (goal <= {GOAL:g} s), "
              f"ratio {worst / base:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
