"""Vault benchmark: shipping against a plain boto3 upload, and catalog queries at 1,000,000 crashes.

    python -m bench.vault [--size-mib 1024] [--rows 1000000] [--runs 3] [--ship-only]

Measured in one run against a real SeaweedFS and a real PostgreSQL on 127.0.0.1:

- ``corevault agent --once`` shipping one spool entry of ``--size-mib`` MiB (analysis off)
  ÷ ``upload_fileobj`` of the same file with the same part size and concurrency, as
  throughput (goal ≥ 0.95, as a process and inside running ones; the sides take turns, and
  the ratio is the median of the runs' own, with their range), the CPU each side and
  SeaweedFS spend per upload (what a loaded machine changes least), and the agent's peak RSS
  (goal ≤ 128 MiB; the bench exits with status 1 when it is over, so a regression is loud),
  beside the plain upload's;
- p50 latency of the catalog queries people make (newest crashes, by namespace, pod,
  signal, group, a page further down) with ``--rows`` crashes in SQLite and in
  PostgreSQL (goal ≤ 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa

from corevault import spool
from corevault.vault import catalog, tables
from testbed import servers

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
CONCURRENCY = 2  # the agent's default
RSS_GOAL_MIB = 128


@dataclass
class Cost:
    """One upload: wall seconds, the uploader's CPU seconds, SeaweedFS's CPU seconds, peak RSS (KiB)."""

    seconds: float
    cpu: float
    server: float
    rss: int = 0


def server_cpu(pid: int) -> float:
    """CPU seconds the server process has used so far (its user and system time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict, server: int) -> Cost:
    started, busy = time.perf_counter(), server_cpu(server)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed")
    cpu = usage.ru_utime + usage.ru_stime
    return Cost(time.perf_counter() - started, cpu, server_cpu(server) - busy, usage.ru_maxrss)


@contextmanager
def measured(server: int) -> Iterator[list[Cost]]:
    """The cost of the block, run in this process (its CPU, all threads, and the server's)."""
    started, busy, own = time.perf_counter(), server_cpu(server), resource.getrusage(resource.RUSAGE_SELF)
    out: list[Cost] = []
    yield out
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = used.ru_utime - own.ru_utime + used.ru_stime - own.ru_stime
    out.append(Cost(time.perf_counter() - started, cpu, server_cpu(server) - busy))


def ratios(ours: list[Cost], plain: list[Cost]) -> str:
    """Throughput of ours ÷ plain: the median of the runs' ratios, and their range."""
    r = sorted(p.seconds / o.seconds for o, p in zip(ours, plain, strict=True))
    return f"{statistics.median(r):.2f} [{r[0]:.2f}-{r[-1]:.2f}]"


def costs(label: str, ours: list[Cost], plain: list[Cost], mib: int) -> None:
    o, p = (statistics.median(c.seconds for c in side) for side in (ours, plain))
    print(f"  {label}: agent {o:.2f} s ({mib / o:.0f} MiB/s), plain upload_fileobj {p:.2f} s "
          f"({mib / p:.0f} MiB/s): throughput ratio {ratios(ours, plain)} (goal >= 0.95)")  # fmt: skip
    oc, pc = (statistics.median(c.cpu for c in side) for side in (ours, plain))
    os_, ps = (statistics.median(c.server for c in side) for side in (ours, plain))
    print(f"    CPU per upload: agent {oc:.2f} s, plain {pc:.2f} s ({pc / oc:.2f}); "
          f"SeaweedFS {os_:.2f} s and {ps:.2f} s ({ps / os_:.2f})")  # fmt: skip


PLAIN_UPLOAD = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
endpoint, bucket, key, path, part = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
cfg = TransferConfig(multipart_threshold=int(part), multipart_chunksize=int(part), max_concurrency=int(sys.argv[6]))
with open(path, "rb") as f:
    s3.upload_fileobj(f, bucket, key, Config=cfg)
"""


def agent_config(w: servers.Seaweed, pg_url: str, work: str, name: str) -> str:
    """Settings for an agent shipping to the bucket (16 MiB parts, as the plain upload) without analysis."""
    cfg = os.path.join(work, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(
            f'state_dir = "{work}/{name}"\n[vault]\nstore = "s3://{w.bucket}/{name}"\ncatalog = "{pg_url}"\n'
            f'[vault.s3]\nendpoint = "{w.endpoint}"\naddressing = "path"\npart_size = "16M"\nconcurrency = {CONCURRENCY}\n'
            '[agent]\nanalyze = false\nmetrics = ""\n'
        )
    return cfg


def spool_entry(spool_dir: str, entry_id: str, blob: str, mib: int) -> None:
    """A ready spool entry whose core is ``blob`` (a hard link: nothing copied)."""
    entry = os.path.join(spool.ready_dir(spool_dir), entry_id)
    os.makedirs(entry)
    os.link(blob, os.path.join(entry, spool.CORE_NAME))
    with open(os.path.join(entry, spool.META_NAME), "w") as f:
        json.dump({"id": entry_id, "time": 1, "core": {"stored_size": mib << 20}, "modules": []}, f)


def bench_ship(w: servers.Seaweed, pg_url: str, mib: int, runs: int) -> bool:
    """Print the figures; whether the agent's peak RSS kept within :data:`RSS_GOAL_MIB`.

    The two sides take turns, the first of each run alternating, so that neither has the
    quieter moments of a shared machine to itself; the ratio is the median of the runs' own."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": servers.KEY, "AWS_SECRET_ACCESS_KEY": servers.SECRET}
    assert w.proc is not None
    weed = w.proc.pid
    work = tempfile.mkdtemp(prefix="cv-bench-ship-")
    try:
        blob = os.path.join(work, "blob")
        with open(blob, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        part = 16 << 20
        ours: list[Cost] = []
        plain: list[Cost] = []
        for run in range(runs):
            upload = [sys.executable, "-c", PLAIN_UPLOAD, w.endpoint, w.bucket, f"plain/{run}", blob]
            cfg = agent_config(w, pg_url, work, f"s{run}")
            spool_entry(os.path.join(work, f"s{run}", "spool"), f"20260101T000000Z-{run}-bench", blob, mib)
            sides = [
                (plain, [*upload, str(part), str(CONCURRENCY)]),
                (ours, [CLI, "-c", cfg, "agent", "--once"]),
            ]
            for side, cmd in sides if run % 2 == 0 else sides[::-1]:
                side.append(timed(cmd, env, weed))
        print(f"ship {mib} MiB, medians of {runs} runs taking turns [the runs' range]:")
        costs("as processes", ours, plain, mib)
        rss, plain_rss = max(c.rss for c in ours), max(c.rss for c in plain)
        over = rss / 1024 > RSS_GOAL_MIB
        print(f"    peak RSS: agent {rss / 1024:.0f} MiB (goal <= {RSS_GOAL_MIB} MiB{', OVER' if over else ''}), "
              f"plain upload_fileobj {plain_rss / 1024:.0f} MiB")  # fmt: skip
        warm_ours, warm_plain = in_process(w, pg_url, work, blob, mib, runs)
        costs("inside running processes (no start-up on either side)", warm_ours, warm_plain, mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return not over


def in_process(
    w: servers.Seaweed, pg_url: str, work: str, blob: str, mib: int, runs: int
) -> tuple[list[Cost], list[Cost]]:
    """The costs of ship_entry and of upload_fileobj, both in this warm process, taking turns."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from corevault import config
    from corevault.agent import ship
    from corevault.vault.crashes import LocalVault

    assert w.proc is not None
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
    s3 = boto3.client(
        "s3", endpoint_url=w.endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )
    plain_cfg = TransferConfig(
        multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=CONCURRENCY
    )
    settings = config.load(agent_config(w, pg_url, work, "warm"))
    vault = LocalVault(settings)
    ours: list[Cost] = []
    plain: list[Cost] = []

    def upload(run: int) -> None:
        with measured(w.proc.pid) as cost, open(blob, "rb") as f:  # type: ignore[union-attr]
            s3.upload_fileobj(f, w.bucket, f"warm-plain/{run}", Config=plain_cfg)
        plain.extend(cost)

    def shipped(run: int) -> None:
        entry_id = f"20260102T000000Z-{run}-warm"
        spool_entry(settings.spool_dir, entry_id, blob, mib)
        with measured(w.proc.pid) as cost:  # type: ignore[union-attr]
            ship.ship_entry(vault, settings, entry_id)
        ours.extend(cost)

    for run in range(runs):
        for side in (upload, shipped) if run % 2 == 0 else (shipped, upload):
            side(run)
    return ours, plain


def insert_crashes(conn: sa.Connection, rows: Iterable[dict], batch: int = 20000) -> None:
    """Bulk-insert crash rows, ``batch`` at a time."""
    pending: list[dict] = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch:
            conn.execute(tables.crashes.insert(), pending)
            pending = []
    if pending:
        conn.execute(tables.crashes.insert(), pending)


def fill(url: str, rows: int) -> sa.Engine:
    engine = catalog.connect(url)
    rng = random.Random(7)
    namespaces = [f"team-{i}" for i in range(50)]
    signatures = [f"{i:016x}" for i in range(2000)]
    signals = [(11, "SIGSEGV"), (6, "SIGABRT"), (8, "SIGFPE"), (7, "SIGBUS")]
    now = 1_790_000_000

    def crashes():  # -> Iterator[dict]
        for i in range(rows):
            ns = rng.choice(namespaces)
            sig = rng.choice(signals)
            yield {
                "id": f"c{i:09d}", "time": now - rng.randrange(90 * 86400), "node": f"node-{i % 200}",
                "namespace": ns, "pod": f"{ns}-pod-{rng.randrange(500)}", "container": "app", "image": f"img:{i % 30}",
                "signal": sig[0], "signal_name": sig[1], "exe": f"/usr/bin/svc{i % 40}", "size": 1 << 20,
                "stored_size": 1 << 18, "truncated": False, "signature": rng.choice(signatures),
                "analysis": "done", "meta": "{}",
            }  # fmt: skip

    with engine.begin() as conn:
        insert_crashes(conn, crashes())
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE crashes"))
        else:
            conn.exec_driver_sql("ANALYZE")
    return engine


def p50(engine: sa.Engine, query: object, n: int = 25) -> float:
    times = []
    with engine.connect() as conn:
        for _ in range(n):
            t = time.perf_counter()
            query(conn)  # type: ignore[operator]
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench_catalog(name: str, url: str, rows: int) -> None:
    t = time.perf_counter()
    engine = fill(url, rows)
    print(
        f"\n{name}: {rows} crashes loaded in {time.perf_counter() - t:.0f} s; p50 of 25 runs, 50 rows a page"
    )
    F = catalog.Filters
    with engine.connect() as conn:
        page = catalog.list_crashes(conn, limit=50)
        deep = catalog.list_crashes(conn, limit=50, before=(page[-1]["time"], page[-1]["id"]))[-1]
        group = conn.execute(sa.select(tables.crashes.c.signature).limit(1)).scalar()
    queries = {
        "newest": lambda c: catalog.list_crashes(c, limit=50),
        "namespace": lambda c: catalog.list_crashes(c, F(namespace="team-7"), limit=50),
        "pod": lambda c: catalog.list_crashes(c, F(pod="team-7-pod-42"), limit=50),
        "signal": lambda c: catalog.list_crashes(c, F(signal="SIGFPE"), limit=50),
        "group": lambda c: catalog.list_crashes(c, F(group=group), limit=50),
        "namespace+signal": lambda c: catalog.list_crashes(
            c, F(namespace="team-7", signal="SIGBUS"), limit=50
        ),
        "page 3": lambda c: catalog.list_crashes(c, limit=50, before=(deep["time"], deep["id"])),
    }
    for label, q in queries.items():
        ms = p50(engine, q)
        print(f"  {label:<18} {ms:7.1f} ms {'(goal <= 50 ms)' if ms > 50 else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--ship-only", action="store_true", help="measure shipping only, not the catalog's queries"
    )
    a = ap.parse_args()
    with servers.seaweed() as w, servers.postgres() as pg:
        rss_kept = bench_ship(w, pg.database("ship"), a.size_mib, a.runs)
        if not a.ship_only:
            d = tempfile.mkdtemp(prefix="cv-bench-cat-")
            try:
                bench_catalog("SQLite", f"sqlite:///{d}/catalog.db", a.rows)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            bench_catalog("PostgreSQL", pg.database("catalog"), a.rows)
    if not rss_kept:
        print(f"\nFAILED: the agent's peak RSS shipping {a.size_mib} MiB is over {RSS_GOAL_MIB} MiB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
