"""Fleet benchmark: many node agents shipping into one PostgreSQL and one S3, and the catalog at size.

    python -m bench.fleet [--agents 50] [--per-agent 40] [--catalog-per-agent 200] [--batch 64]
                          [--ingest-runs 2] [--ingest-only | --size-only] [--rows 1000000] [--groups 20000]
                          [--runs 25] [--baseline SRC]

Measured in one run against a real SeaweedFS (``weed mini``) and a real PostgreSQL on 127.0.0.1:

1. **Ingest**: ``--agents`` simulated node agents, each a process of its own with its own
   spool, S3 client and database connection, ship ``--per-agent`` real spool entries each
   (real cores of small processes taken with gdb's ``gcore``, compressed as the capture
   handler compresses them, with varied metadata: 200 namespaces, their pods and images,
   four signals) through the agent's own shipping step (core and metadata uploaded and
   verified, the crash row, its search values and its namespace inserted): in batches of
   ``--batch`` (:func:`corevault.agent.ship.ship_batch`, as the agent's loop ships: small
   cores ``[agent] ship_parallel`` at once, the rows in one transaction) and, as the
   baseline, one entry at a time (:func:`corevault.agent.ship.ship_entry`); as the baseline of
   the S3 client, in batches with the single PutObjects through boto3 (as before obstore took
   them, :mod:`corevault.vault.s3put`); and, as the baseline of the S3 requests, in batches with
   every upload checked by a HEAD of its object (four requests per crash, as before a single
   PutObject was checked from its own answer; now two). All start
   together; crashes/s is entries ÷ (last done - first start). Then the catalog's part
   alone, sustained: the same processes insert ``--catalog-per-agent`` records each (of
   the same kind) into a fresh database, ``--batch`` per
   transaction (:func:`corevault.vault.catalog.add_crashes`) and one per transaction
   (:func:`corevault.vault.catalog.add_crash`, the baseline); goal ≥ 1,000 crashes/s.
   ``--ingest-runs`` runs of each (fresh spools and databases), their medians printed beside
   the goal and the baseline. Each line also gives the CPU time per crash of the agents'
   processes, of PostgreSQL's and (shipping) of SeaweedFS's: on a loaded machine the rate is
   what the others leave over, the CPU per crash is what a crash costs.
2. **Size**: ``--rows`` crashes in ``--groups`` groups over 200 namespaces and 90 days,
   bulk-loaded by PostgreSQL itself (``INSERT … SELECT … FROM generate_series``: the rows
   are made by the database, not sent one by one), then the catalog's own group counts and
   search dictionary rebuilt from them (:func:`catalog.rebuild_group_counts`, :func:`search.rebuild`)
   and ``VACUUM ANALYZE``. Two ``corevault serve`` processes, each with its own port and
   state directory, stand behind one address (a TCP proxy in this process that gives each
   new connection the next server); two keep-alive clients of that address take turns, so
   both servers answer. p50 of the group list, a namespace's crash list and the triage
   search (goal ≤ 50 ms each), and each as a ratio to ``/healthz`` (the fixed cost of a
   request here). A group ignored through one server and read back through the other shows
   that they share nothing but the database. With ``--baseline SRC`` (another tree's ``src/``,
   e.g. ``git archive COMMIT src | tar -x -C DIR``) two more servers run that tree's code on the
   same catalog (this tree's schema) behind an address of their own, and each request is
   measured on both in turn: each line gives the baseline's p50 and this tree's as a ratio of it.

The machine has 2 cores shared with other work: every figure is the median of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass

import httpx
import sqlalchemy as sa

from corevault import config, spool
from corevault.agent import ship
from corevault.capture import stream
from corevault.vault import catalog, search, tables
from corevault.vault.crashes import LocalVault
from testbed import gcore, servers

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
ADMIN, TEAM = "fleet-admin-token-0123456789", "fleet-team7-token-0123456789"
NAMESPACES = 200
SIGNALS = [(11, "SIGSEGV"), (6, "SIGABRT"), (8, "SIGFPE"), (7, "SIGBUS")]
NOW = int(time.time())


# --- real cores ---------------------------------------------------------------------------------


def real_cores(work: str) -> list[tuple[str, int, str]]:
    """Real cores of three small processes, compressed as the handler does: (path, size, sha256)."""
    made = []
    programs = [["sleep", "300"], ["cat"], ["busybox", "sh", "-c", "read x"]]
    for i, argv in enumerate(programs):
        plain = os.path.join(work, f"core{i}")
        gcore.core_of(argv, plain)
        packed = plain + ".zst"
        fd = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            sink = stream.ZstdSink(fd, 3, 0, 1 << 40)
            src = os.open(plain, os.O_RDONLY)
            try:
                size, _ = stream.pump(src, [sink], None)
            finally:
                os.close(src)
            sink.finish()
        finally:
            os.close(fd)
        os.unlink(plain)
        made.append((packed, size, sink.sha256))
    return made


def meta_of(agent: int, n: int, core: tuple[str, int, str], rng: random.Random) -> dict:
    """A spool entry's metadata as the handler writes it, with the fleet's variety."""
    ns = f"team-{rng.randrange(NAMESPACES)}"
    number, name = rng.choice(SIGNALS)
    entry_id = f"20261201T000000Z-{agent:03d}{n:05d}-fleet"
    return {
        "id": entry_id,
        "time": NOW - rng.randrange(86400),
        "node": f"node-{agent}",
        "pod": {"namespace": ns, "name": f"{ns}-svc-{rng.randrange(40)}-{rng.randrange(1 << 20):05x}",
                "uid": f"{agent:08x}-0000-0000-0000-{n:012x}", "container": "app",
                "image": f"registry.example/{ns}/svc-{rng.randrange(7)}:1.{rng.randrange(30)}"},
        "signal": {"number": number, "name": name},
        "process": {"exe": f"/usr/bin/svc-{rng.randrange(40)}", "comm": "svc", "ns_pid": 1 + rng.randrange(300)},
        "core": {"size": core[1], "stored_size": os.path.getsize(core[0]), "sha256": core[2],
                 "compression": "zstd", "file": spool.CORE_NAME},
        "modules": [],
    }  # fmt: skip


def metas_of(agent: int, count: int, cores: list[tuple[str, int, str]]) -> list[dict]:
    """Agent ``agent``'s ``count`` crashes, the ``n``-th of ``cores[n % len(cores)]``."""
    rng = random.Random(agent)
    return [meta_of(agent, n, cores[n % len(cores)], rng) for n in range(count)]


def fill_spool(spool_dir: str, agent: int, count: int, cores: list[tuple[str, int, str]]) -> list[dict]:
    ready = spool.ready_dir(spool_dir)
    metas = metas_of(agent, count, cores)
    for n, meta in enumerate(metas):
        entry = os.path.join(ready, meta["id"])
        os.makedirs(entry)
        os.link(cores[n % len(cores)][0], os.path.join(entry, spool.CORE_NAME))
        with open(os.path.join(entry, spool.META_NAME), "w") as f:
            json.dump(meta, f)
    return metas


# --- the agents ---------------------------------------------------------------------------------


def agent_settings(work: str, agent: int, bucket: str, endpoint: str, pg_url: str) -> config.Settings:
    return config.from_dict({
        "state_dir": os.path.join(work, f"node-{agent}"),
        "vault": {"store": f"s3://{bucket}/fleet", "catalog": pg_url,
                  "s3": {"endpoint": endpoint, "addressing": "path"}},
        "agent": {"analyze": False, "metrics": ""},
    })  # fmt: skip


def _ship_all(settings: config.Settings, batch: int, how: str, start: object, out: object) -> None:
    """One node agent: ship every ready entry of its spool, once everyone is ready.

    ``batch`` 1 ships one entry at a time (the baseline); more ships them as the agent's loop
    does, ``batch`` at a time, their small cores ``[agent] ship_parallel`` at once. ``how``:
    "head", every upload is checked with a HEAD of its object, as before the service's answer to
    a single PutObject was taken as the check (the store's own path for an answer that proves
    nothing); "boto3", the single requests go through boto3's client, as before obstore took them.
    """
    vault = LocalVault(settings)
    uploads = vault.store.uploads  # type: ignore[attr-defined]
    if how in ("head", "boto3"):
        uploads.open_small = None
    if how == "head":
        put_small = uploads.put_small
        uploads.put_small = lambda name, data: (put_small(name, data)[0], None)
    entries = spool.entries(settings.spool_dir)
    with vault.engine.connect():
        pass  # the connection is open before the clock starts, as in a running agent
    start.wait()  # type: ignore[attr-defined]
    t0, cpu = time.monotonic(), time.process_time()
    new = 0
    if batch == 1:
        for entry_id in entries:
            new += ship.ship_entry(vault, settings, entry_id).new
    else:
        for at in range(0, len(entries), batch):
            done = ship.ship_batch(vault, settings, entries[at : at + batch], settings.agent_ship_parallel)
            if done.failed:
                raise SystemExit(f"shipping failed: {next(iter(done.failed.values()))}")
            new += sum(s.new for s in done.shipped.values())
    out.put((t0, time.monotonic(), len(entries), new, time.process_time() - cpu))  # type: ignore[attr-defined]


def _insert_all(url: str, metas: list[dict], batch: int, start: object, out: object) -> None:
    """The catalog's part of shipping alone: ``batch`` crashes per transaction (1: one at a time)."""
    engine = catalog.connect(url)
    with engine.connect():
        pass
    start.wait()  # type: ignore[attr-defined]
    t0, cpu = time.monotonic(), time.process_time()
    new = 0
    for at in range(0, len(metas), batch):
        with engine.begin() as conn:
            if batch == 1:
                new += catalog.add_crash(conn, metas[at], "off")
            else:
                new += len(catalog.add_crashes(conn, metas[at : at + batch], "off"))
    out.put((t0, time.monotonic(), len(metas), new, time.process_time() - cpu))  # type: ignore[attr-defined]


@dataclass
class Raced:
    seconds: float
    entries: int
    new: int
    #: CPU seconds of the agents' processes, of PostgreSQL's and of SeaweedFS's, from the start on
    agents_cpu: float
    database_cpu: float
    store_cpu: float = 0.0

    def line(self, what: str) -> str:
        rate = self.entries / self.seconds
        return (f"  {what:<62} {rate:7.0f} crashes/s ({self.entries} in {self.seconds:.1f} s, {self.new} new); "
                f"CPU per crash: agents {self.agents_cpu / self.entries * 1000:.2f} ms, "
                f"PostgreSQL {self.database_cpu / self.entries * 1000:.2f} ms"
                + (f", SeaweedFS {self.store_cpu / self.entries * 1000:.2f} ms" if self.store_cpu else ""))  # fmt: skip


def database_cpu(pg: servers.Postgres) -> float:
    """CPU seconds of PostgreSQL's processes so far: the postmaster's own, its ended children's
    (reaped backends), and its live children's (backends, autovacuum, WAL writer…), so that a
    window between two readings holds what PostgreSQL spent in it, a backend's start-up before
    the window excepted."""
    with open(os.path.join(pg.dir, "data", "postmaster.pid")) as f:
        pid = f.readline().strip()
    total = 0
    fields = _stat(pid)
    if fields is not None:
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    for child in os.listdir("/proc"):
        if child.isdigit() and (fields := _stat(child)) is not None and fields[1] == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, …), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def store_cpu(store: servers.Seaweed | None) -> float:
    """CPU seconds of SeaweedFS's process so far (0 without one)."""
    fields = _stat(str(store.proc.pid)) if store is not None and store.proc is not None else None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def race(
    pg: servers.Postgres, target: object, args: list[tuple], store: servers.Seaweed | None = None
) -> Raced:
    """Run ``target(*a, start, out)`` in one process per ``a``, all started at once."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args]  # type: ignore[arg-type]
    for p in procs:
        p.start()
    time.sleep(1 + len(procs) * 0.05)  # every process connected and waiting
    before, store_before = database_cpu(pg), store_cpu(store)
    start.set()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"an agent process failed (exit code {p.exitcode})")
    time.sleep(0.5)  # the backends of the closed connections reaped
    began = min(r[0] for r in results)
    ended = max(r[1] for r in results)
    return Raced(ended - began, sum(r[2] for r in results), sum(r[3] for r in results),
                 sum(r[4] for r in results), database_cpu(pg) - before, store_cpu(store) - store_before)  # fmt: skip


def bench_ingest(w: servers.Seaweed, pg: servers.Postgres, agents: int, per_agent: int, batch: int,
                 runs: int, catalog_per_agent: int) -> None:  # fmt: skip
    """Shipping and the catalog's part alone, one entry at a time and in batches, ``runs`` times."""
    work = tempfile.mkdtemp(prefix="cv-bench-fleet-")
    try:
        cores = real_cores(work)
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
        sizes = ", ".join(f"{c[1] >> 10} KiB ({os.path.getsize(c[0]) >> 10} KiB stored)" for c in cores)
        print(f"ingest: {agents} agent processes x {per_agent} spool entries (the catalog's part alone: x "
              f"{catalog_per_agent} records), real gcore cores of {sizes}; batches of {batch} against one "
              f"entry at a time (the baseline), {runs} runs each, medians")  # fmt: skip
        records = [metas_of(a, catalog_per_agent, cores) for a in range(agents)]
        cases = [
            ("shipping (S3 upload and check, catalog rows)", "ship"),
            ("the catalog's part alone", "insert"),
        ]
        measured: dict[tuple[str, int], list[Raced]] = {}
        for run in range(runs):
            for kind in ("ship", "ship-boto3", "ship-head", "insert"):
                for size in (1, batch) if kind in ("ship", "insert") else (batch,):
                    name = f"fleet_{kind.replace('-', '_')}_{size}_{run}"
                    url = pg.database(name)
                    catalog.connect(url).dispose()  # the schema, made once before the race
                    if kind.startswith("ship"):
                        settings = []
                        for a in range(agents):
                            s = agent_settings(os.path.join(work, name), a, w.bucket, w.endpoint, url)
                            spool.ensure(s.spool_dir)
                            fill_spool(s.spool_dir, a, per_agent, cores)
                            settings.append(s)
                        how = kind.partition("-")[2]
                        raced = race(pg, _ship_all, [(s, size, how) for s in settings], w)
                        if count_rows(url) != agents * per_agent:
                            raise SystemExit(
                                f"{count_rows(url)} rows after shipping {agents * per_agent} crashes"
                            )
                    else:
                        raced = race(pg, _insert_all, [(url, m, size) for m in records])
                    measured.setdefault((kind, size), []).append(raced)
                    print(
                        f"  run {run + 1}: "
                        + raced.line(f"{kind}, {'one at a time' if size == 1 else f'batches of {size}'}")
                    )
        print("medians:")
        for label, kind in cases:
            base, batched = (median_of(measured[kind, size]) for size in (1, batch))
            rate, base_rate = batched.entries / batched.seconds, base.entries / base.seconds
            goal = "met" if rate >= 1000 else "NOT met"
            print(batched.line(f"{label}, batches of {batch}") + f"; {rate / base_rate:.1f} x the baseline; "
                  f"goal >= 1,000 crashes/s ({goal})")  # fmt: skip
            print(base.line(f"{label}, one at a time (baseline)"))
            if kind == "ship":
                boto = median_of(measured["ship-boto3", batch])
                print(boto.line(f"shipping, batches of {batch}, single requests through boto3 (before)")
                      + f"; shipping as it is: {rate / (boto.entries / boto.seconds):.2f} x this, agents' CPU "
                      f"per crash {batched.agents_cpu / boto.agents_cpu:.2f} x; goal: CPU below 1 x")  # fmt: skip
                headed = median_of(measured["ship-head", batch])
                print(headed.line(f"shipping, batches of {batch}, a HEAD after each upload (before)")
                      + f"; shipping as it is: {rate / (headed.entries / headed.seconds):.2f} x this; goal > 1")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def median_of(raced: list[Raced]) -> Raced:
    """The runs' median rate and median CPU per crash (the runs ship the same entries)."""
    entries = raced[0].entries
    rate = statistics.median(r.entries / r.seconds for r in raced)
    return Raced(entries / rate, entries, min(r.new for r in raced),
                 *(statistics.median(getattr(r, cpu) for r in raced)
                   for cpu in ("agents_cpu", "database_cpu", "store_cpu")))  # fmt: skip


def count_rows(url: str) -> int:
    engine = catalog.connect(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(tables.crashes)).scalar_one()
    finally:
        engine.dispose()


# --- the catalog at size ------------------------------------------------------------------------

#: the rows, made by PostgreSQL: group g (of a Zipf-like weight, a few groups hold most crashes)
#: lives in namespace g % 200 with image g % 7 of it; crash i of it in 90 days
LOAD_CRASHES = r"""
INSERT INTO crashes (id, time, node, namespace, pod, container, image, signal, signal_name, exe,
                     size, stored_size, truncated, signature, title, analysis, meta)
SELECT 'c' || lpad(i::text, 10, '0'), :now - (hashint8(i) & 8388607) % 7776000,
       'node-' || (i % 500), 'team-' || (g % 200), 'team-' || (g % 200) || '-pod-' || (hashint8(i * 7) & 1023),
       'app', 'registry.example/team-' || (g % 200) || '/svc-' || (g % 7) || '\:1.' || (g % 3), 11, 'SIGSEGV',
       '/usr/bin/svc-' || (g % 40), 67108864, 4194304, false, lpad(to_hex(g), 16, '0'),
       'SIGSEGV in ns::Service::handler_' || g || ' <- main', 'done', '{}'
FROM (SELECT i, (floor(power(:groups, (hashint8(i * 13) & 1048575) / 1048576.0::float8)) - 1)::int AS g
      FROM generate_series(1, :rows) AS i) AS s
"""

LOAD_GROUPS = """
INSERT INTO crash_groups (signature, title, signal_name, first_seen, last_seen, count)
SELECT signature, min(title), 'SIGSEGV', min(time), max(time), count(*) FROM crashes GROUP BY signature
"""


#: the secondary indexes of the table a bulk load fills: dropped before, made again after (the
#: search dictionary is small: a few hundred thousand values at 10,000,000 crashes)
BULK_TABLES = ["crashes"]


def load(url: str, rows: int, groups: int) -> None:
    """The rows, made by PostgreSQL, with the tables' indexes made once after (not row by row)."""
    engine = catalog.connect(url)
    t = time.perf_counter()
    with engine.begin() as conn:
        indexes = conn.execute(
            sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(:tables) "
                    "AND indexname NOT LIKE '%pkey'"),
            {"tables": BULK_TABLES},
        ).all()  # fmt: skip
        for name, _ in indexes:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
        conn.execute(sa.text(LOAD_CRASHES), {"now": NOW, "rows": rows, "groups": groups + 1})
        loaded = time.perf_counter()
        conn.execute(sa.text(LOAD_GROUPS))
        catalog.rebuild_group_counts(conn)
        search.rebuild(conn)
        for _, definition in indexes:
            conn.exec_driver_sql(definition)
        counted = time.perf_counter()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        n = conn.execute(sa.text("SELECT count(*) FROM crash_groups")).scalar_one()
        sizes = conn.execute(sa.text(SIZES), {"tables": SIZED}).all()
    engine.dispose()
    print(f"\nsize: {rows} crashes in {n} groups: rows made by generate_series in {loaded - t:.0f} s; group "
          f"counts, search dictionary and every index made in {counted - loaded:.0f} s; VACUUM ANALYZE "
          f"{time.perf_counter() - counted:.0f} s")  # fmt: skip
    print("  " + "; ".join(f"{name} {rows:,} rows, {heap >> 20} MiB + indexes {index >> 20} MiB"
                           for name, rows, heap, index in sizes))  # fmt: skip


#: the tables whose size the load prints: rows (as ANALYZE counted them), the table, its indexes
SIZED = ["crashes", "search_values", "group_terms", "crash_groups", "group_namespaces", "group_days"]
SIZES = """
SELECT relname, reltuples::bigint, pg_table_size(oid), pg_indexes_size(oid) FROM pg_class
WHERE relname = ANY(:tables) AND relkind = 'r' ORDER BY array_position(:tables, relname::text)
"""


@contextmanager
def proxy(backends: list[int]) -> Iterator[int]:
    """One address in front of ``backends``: each new connection goes to the next one in turn."""
    turn = itertools.cycle(backends)
    loop = asyncio.new_event_loop()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", next(turn))
        with suppress(asyncio.CancelledError):  # the proxy is stopping
            await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def shutdown() -> None:
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def p50(clients: list[httpx.Client], path: str, token: str, runs: int) -> float:
    """Median ms of ``path``, the requests taking turns over the clients' connections."""
    headers = {"Authorization": f"Bearer {token}"}
    for client in clients:  # the first request of a path on each server builds its caches
        client.get(path, headers=headers).raise_for_status()
    times = []
    for i in range(runs):
        t = time.perf_counter()
        r = clients[i % len(clients)].get(path, headers=headers)
        times.append(time.perf_counter() - t)
        r.raise_for_status()
    return statistics.median(times) * 1000


CASES = [
    ("group list, every namespace", "/api/v1/groups", ADMIN),
    ("group list, one namespace", "/api/v1/groups", TEAM),
    ("group list page, one namespace", "/", TEAM),
    ("a namespace's crash list", "/api/v1/crashes?namespace=team-7", ADMIN),
    ("a namespace's crash list, its reader", "/api/v1/crashes", TEAM),
    ("search crashes: a pod's name", "/api/v1/crashes?q=team-7-pod-123", ADMIN),
    ("search crashes: a word in every crash", "/api/v1/crashes?q=handler_", ADMIN),
    ("search crashes: a pod's name, its reader", "/api/v1/crashes?q=team-7-pod-123", TEAM),
    ("search groups: a function name", "/api/v1/groups?state=all&q=handler_42", ADMIN),
    ("search groups: a pod's name, its reader", "/api/v1/groups?state=all&q=team-7-pod-12", TEAM),
]


#: how the servers of ``--baseline`` run: the ``corevault`` package of another tree's ``src/``
BASELINE = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from corevault.cli.app import main; sys.exit(main())"
)


def bench_size(pg: servers.Postgres, rows: int, groups: int, runs: int, baseline: str | None = None) -> None:
    url = pg.database("fleet_size")
    load(url, rows, groups)
    state = tempfile.mkdtemp(prefix="cv-bench-fleet-serve-")
    procs: list[subprocess.Popen] = []
    trees = {"this tree": [CLI]}
    if baseline:  # the same catalog (this tree's schema) served by another tree's code
        trees["baseline"] = [sys.executable, "-c", BASELINE, os.path.abspath(baseline)]
    try:
        tokens = os.path.join(state, "tokens.toml")
        with open(tokens, "w") as f:
            f.write(f'[[token]]\nname = "admin"\ntoken = "{ADMIN}"\nnamespaces = ["*"]\nupdate = true\n'
                    f'[[token]]\nname = "team-7"\ntoken = "{TEAM}"\nnamespaces = ["team-7"]\n')  # fmt: skip
        os.chmod(tokens, 0o600)
        ports: dict[str, list[int]] = {}
        for tree, command in trees.items():
            ports[tree] = []
            for _ in range(2):  # each its own state directory: nothing shared but the database
                n = len(procs)
                cfg = os.path.join(state, f"server{n}.toml")
                with open(cfg, "w") as f:
                    f.write(f'state_dir = "{state}/server{n}"\n[vault]\ncatalog = "{url}"\n')
                ports[tree].append(servers.free_port())
                procs.append(subprocess.Popen(
                    [*command, "-c", cfg, "serve", "--listen", f"127.0.0.1:{ports[tree][-1]}", "--tokens", tokens],
                    stderr=open(os.path.join(state, f"server{n}.log"), "wb"),  # noqa: SIM115
                ))  # fmt: skip
        for port in itertools.chain(*ports.values()):
            servers.wait_port(port)
        shared_database(ports["this tree"])
        with ExitStack() as stack:
            # per tree, one keep-alive connection each through the one address: the proxy gives them a server each
            clients = {}
            for tree in trees:
                port = stack.enter_context(proxy(ports[tree]))
                clients[tree] = [
                    stack.enter_context(httpx.Client(timeout=120, base_url=f"http://127.0.0.1:{port}"))
                    for _ in range(2)
                ]
            also = ", two of the baseline behind another" if baseline else ""
            print(f"two servers behind one address{also}; p50 of {runs} requests taking turns on both "
                  "(goal: p50 <= 50 ms)")  # fmt: skip
            base = {tree: p50(clients[tree], "/healthz", ADMIN, runs) for tree in trees}
            print(f"  {'/healthz':<42} {base['this tree']:7.1f} ms" + _against(base, base))
            for label, path, token in CASES:
                ms = {tree: p50(clients[tree], path, token, runs) for tree in trees}
                goal = "" if ms["this tree"] <= 50 else "  (goal <= 50 ms NOT met)"
                print(f"  {label:<42} {ms['this tree']:7.1f} ms  {ms['this tree'] / base['this tree']:5.1f} x /healthz"
                      f"{goal}{_against(ms, base)}")  # fmt: skip
    except httpx.HTTPStatusError:
        for n in range(len(procs)):
            with open(os.path.join(state, f"server{n}.log")) as f:
                print(f.read()[-3000:], file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        shutil.rmtree(state, ignore_errors=True)


def _against(ms: dict[str, float], base: dict[str, float]) -> str:
    """The baseline's figure and this tree's as a ratio of it, when there is a baseline."""
    if "baseline" not in ms:
        return ""
    return f"  | baseline {ms['baseline']:7.1f} ms, this tree {ms['this tree'] / ms['baseline']:4.2f} x the baseline"


def shared_database(ports: list[int]) -> None:
    """Ignore a group through one server and read its state through the other."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    listed = httpx.get(f"http://127.0.0.1:{ports[0]}/api/v1/groups", headers=headers, timeout=60)
    signature = listed.raise_for_status().json()["items"][-1]["signature"]
    one, other = (f"http://127.0.0.1:{p}/api/v1/groups/{signature}" for p in ports)
    httpx.post(one + "/state", json={"state": "ignored"}, headers=headers, timeout=60).raise_for_status()
    seen = httpx.get(other, headers=headers, timeout=60).raise_for_status().json()["state"]
    if seen != "ignored":
        raise SystemExit(f"the second server sees group {signature} {seen!r}, not 'ignored'")
    print(
        f"  group {signature} ignored through the server on :{ports[0]}, read as {seen!r} through :{ports[1]}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--per-agent", type=int, default=40)
    ap.add_argument("--rows", type=int, default=1_000_000, help="10000000 for the fleet's full size")
    ap.add_argument("--groups", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64, help="entries per batch (1: one at a time only)")
    ap.add_argument("--ingest-runs", type=int, default=2)
    ap.add_argument(
        "--catalog-per-agent", type=int, default=200, help="records per agent, the catalog's part"
    )
    ap.add_argument("--ingest-only", action="store_true", help="skip the catalog at size")
    ap.add_argument("--size-only", action="store_true", help="skip the ingest")
    ap.add_argument(
        "--baseline", metavar="SRC", help="another tree's src/: its servers answer the same requests"
    )
    a = ap.parse_args()
    with servers.seaweed() as w, servers.postgres() as pg:
        if not a.size_only:
            bench_ingest(w, pg, a.agents, a.per_agent, a.batch, a.ingest_runs, a.catalog_per_agent)
        if not a.ingest_only:
            bench_size(pg, a.rows, a.groups, a.runs, a.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
