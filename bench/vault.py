"""Vault benchmark: shipping against a plain boto3 upload, and catalog queries at 1,000,000 crashes.

    python -m bench.vault [--size-mib 1024] [--rows 1000000] [--runs 3]

Measured in one run against a real SeaweedFS and a real PostgreSQL on 127.0.0.1:

- ``corevault agent --once`` shipping one spool entry of ``--size-mib`` MiB (analysis off)
  ÷ ``upload_fileobj`` of the same file with the same part size and concurrency, as
  throughput (goal ≥ 0.95, as a process and inside running ones), and the agent's peak RSS
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

import sqlalchemy as sa

from corevault import spool
from corevault.vault import catalog, tables
from testbed import servers

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
CONCURRENCY = 2  # the agent's default
RSS_GOAL_MIB = 128


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed")
    return time.perf_counter() - started, usage.ru_maxrss


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


def bench_ship(w: servers.Seaweed, pg_url: str, mib: int, runs: int) -> bool:
    """Print the figures; whether the agent's peak RSS kept within :data:`RSS_GOAL_MIB`."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": servers.KEY, "AWS_SECRET_ACCESS_KEY": servers.SECRET}
    work = tempfile.mkdtemp(prefix="cv-bench-ship-")
    try:
        blob = os.path.join(work, "blob")
        with open(blob, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        part = 16 << 20
        ours, plain, rss, plain_rss = [], [], 0, 0
        for run in range(runs):
            upload = [sys.executable, "-c", PLAIN_UPLOAD, w.endpoint, w.bucket, f"plain/{run}", blob]
            seconds, r = timed([*upload, str(part), str(CONCURRENCY)], env)
            plain.append(seconds)
            plain_rss = max(plain_rss, r)
            cfg = agent_config(w, pg_url, work, f"s{run}")
            entry = os.path.join(work, f"s{run}", "spool", "ready", f"20260101T000000Z-{run}-bench")
            os.makedirs(entry)
            os.link(blob, os.path.join(entry, spool.CORE_NAME))
            with open(os.path.join(entry, spool.META_NAME), "w") as f:
                json.dump(
                    {
                        "id": os.path.basename(entry),
                        "time": 1,
                        "core": {"stored_size": mib << 20},
                        "modules": [],
                    },
                    f,
                )
            t, r = timed([CLI, "-c", cfg, "agent", "--once"], env)
            ours.append(t)
            rss = max(rss, r)
        o, p = statistics.median(ours), statistics.median(plain)
        print(f"ship {mib} MiB: agent {o:.2f} s ({mib / o:.0f} MiB/s), plain upload_fileobj {p:.2f} s "
              f"({mib / p:.0f} MiB/s): throughput ratio {p / o:.2f} (goal >= 0.95)")  # fmt: skip
        over = rss / 1024 > RSS_GOAL_MIB
        print(f"  peak RSS: agent {rss / 1024:.0f} MiB (goal <= {RSS_GOAL_MIB} MiB{', OVER' if over else ''}), "
              f"plain upload_fileobj {plain_rss / 1024:.0f} MiB")  # fmt: skip
        warm_ours, warm_plain = in_process(w, pg_url, work, blob, mib, runs)
        print(f"  inside running processes (no start-up on either side): ship_entry {warm_ours:.2f} s, "
              f"upload_fileobj {warm_plain:.2f} s: throughput ratio {warm_plain / warm_ours:.2f} (goal >= 0.95)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return not over


def in_process(
    w: servers.Seaweed, pg_url: str, work: str, blob: str, mib: int, runs: int
) -> tuple[float, float]:
    """Median seconds of one ship_entry and of one upload_fileobj, both in this warm process."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from corevault import config
    from corevault.agent import ship
    from corevault.vault.crashes import LocalVault

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
    s3 = boto3.client(
        "s3", endpoint_url=w.endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )
    plain_cfg = TransferConfig(
        multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=CONCURRENCY
    )
    settings = config.load(agent_config(w, pg_url, work, "warm"))
    vault = LocalVault(settings)
    ours, plain = [], []
    for run in range(runs):
        t = time.perf_counter()
        with open(blob, "rb") as f:
            s3.upload_fileobj(f, w.bucket, f"warm-plain/{run}", Config=plain_cfg)
        plain.append(time.perf_counter() - t)
        entry_id = f"20260102T000000Z-{run}-warm"
        entry = os.path.join(spool.ready_dir(settings.spool_dir), entry_id)
        os.makedirs(entry)
        os.link(blob, os.path.join(entry, spool.CORE_NAME))
        with open(os.path.join(entry, spool.META_NAME), "w") as f:
            json.dump({"id": entry_id, "time": 1, "core": {"stored_size": mib << 20}, "modules": []}, f)
        t = time.perf_counter()
        ship.ship_entry(vault, settings, entry_id)
        ours.append(time.perf_counter() - t)
    return statistics.median(ours), statistics.median(plain)


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
    a = ap.parse_args()
    with servers.seaweed() as w, servers.postgres() as pg:
        rss_kept = bench_ship(w, pg.database("ship"), a.size_mib, a.runs)
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
