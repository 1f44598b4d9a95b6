"""Server benchmark: page latency at 1,000,000 crashes, and debuginfod throughput.

    python -m bench.server [--rows 1000000] [--binary-mib 256] [--runs 25]

``corevault serve`` runs as its own process on 127.0.0.1 over a SQLite catalog of
``--rows`` crashes (2,000 crash groups of very different sizes, each in one of 50
namespaces, over 90 days) and a file:// vault. Measured over HTTP with one keep-alive
client, in one run:

- p50 latency of the group list page, a crash page, and their JSON forms, for a reader of
  every namespace and for a reader of one namespace (goal ≤ 100 ms), each also as a ratio
  to the p50 of ``/healthz`` (the server's fixed cost per request);
- search (``?q=``) over crashes and groups, for both readers (goal ≤ 50 ms): a pod's name,
  a word that every crash holds (newest first, a page of 50), two words, and groups;
- debuginfod: throughput of ``curl`` fetching ``/buildid/<id>/executable``, a ``--binary-mib``
  MiB file (sent by the kernel: :mod:`corevault.server.zerocopy`), ÷ ``cat`` of the same
  stored file from the page cache, both into /dev/null (goal ≥ 0.9), and ÷ ``curl`` from a
  bare asyncio ``sendfile`` server of the same file (the most any HTTP server gets here:
  the copy from the loopback socket into curl is the bound);
- a range of a compressed core: the last MiB of a ``--core-mib`` MiB core stored in the
  seekable format ÷ the same range of the same core stored as one frame (as before); and the
  whole core with ``curl`` ÷ ``zstd -dc`` of its stored file (a core is served plain, so
  decompression is its floor, not ``cat``).
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

import httpx

from bench.vault import insert_crashes
from corevault import config
from corevault.vault import blobs, catalog, search, stores, tables
from testbed import servers

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
ADMIN, TEAM = "bench-admin-token-0123456789", "bench-team7-token-0123456789"
NOW = int(time.time())


def report(threads: int = 8, frames: int = 24) -> dict:
    """A report shaped like a real one (a C++ service, eight threads)."""

    def frame(i: int, n: int) -> dict:
        return {"index": i, "pc": 0x5555_0000 + 16 * i + n, "function": f"ns::Service::handler_{i}(Request const&)",
                "file": f"/src/service/handler_{i}.cc", "line": 40 + i, "column": None, "inline": i % 5 == 0,
                "module": "/usr/bin/service", "offset": 0x1000 + 16 * i}  # fmt: skip

    return {
        "signal": {"number": 11, "name": "SIGSEGV", "code": 1, "code_name": "SEGV_MAPERR", "fault_address": 0,
                   "description": "address not mapped"},
        "crashed_tid": 100, "backend": "drgn", "core_size": 1 << 26, "truncated": False, "pid": 1,
        "exe": "/usr/bin/service", "args": "/usr/bin/service --port 8080", "registers": {"rip": 0x5555_1000},
        "threads": [{"tid": 100 + t, "crashed": t == 0, "incomplete": False,
                     "frames": [frame(i, t) for i in range(frames)]} for t in range(threads)],
        "modules": [{"path": f"/usr/lib/lib{m}.so", "start": m << 20, "end": (m + 1) << 20, "build_id": f"{m:040x}",
                     "file": None if m == 3 else f"/store/{m}", "debuginfo": m == 0} for m in range(12)],
        "warnings": [], "signature": "0" * 16, "signature_frames": ["handler_0"], "title": "SIGSEGV in handler_0",
        "version": 1,
    }  # fmt: skip


def fill(state: str, rows: int, binary_mib: int) -> tuple[str, str]:
    """The catalog and vault; returns one crash id of namespace team-7 and the binary's build-id."""
    settings = config.from_dict({"state_dir": state})
    engine = catalog.connect(settings.catalog_url)
    rng = random.Random(7)
    sigs = [f"{i:016x}" for i in range(2000)]
    weights = [1 / (i + 1) for i in range(len(sigs))]  # a few groups hold most crashes, as in life
    home = {
        s: (f"team-{i % 50}", f"registry.example/team-{i % 50}/svc-{i % 7}:1.{i % 3}")
        for i, s in enumerate(sigs)
    }
    t = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            tables.groups.insert(),
            [{"signature": s, "title": f"SIGSEGV in ns::Service::handler_{i} ← main", "signal_name": "SIGSEGV",
              "first_seen": NOW - 90 * 86400, "last_seen": NOW, "count": 0} for i, s in enumerate(sigs)],
        )  # fmt: skip

        def crashes():  # -> Iterator[dict]
            for i in range(rows):
                sig = rng.choices(sigs, weights)[0]
                ns, image = home[sig]
                yield {
                    "id": f"c{i:09d}", "time": NOW - rng.randrange(90 * 86400), "node": f"node-{i % 200}", "namespace": ns,
                    "pod": f"{ns}-pod-{rng.randrange(500)}", "container": "app", "image": image, "signal": 11,
                    "signal_name": "SIGSEGV", "exe": "/usr/bin/service", "size": 1 << 26, "stored_size": 1 << 22,
                    "truncated": False, "signature": sig, "title": "SIGSEGV in handler_0", "analysis": "done", "meta": "{}",
                }  # fmt: skip

        insert_crashes(conn, crashes())
        catalog.rebuild_group_counts(conn)
        search.rebuild(conn)
        crash_id = conn.execute(
            tables.crashes.select()
            .with_only_columns(tables.crashes.c.id)
            .where(tables.crashes.c.namespace == "team-7")
            .limit(1)
        ).scalar_one()
        meta = {
            "id": crash_id,
            "process": {"cmdline": ["/usr/bin/service", "--port", "8080"], "environ": {"PATH": "/bin"}},
        }
        conn.execute(
            tables.crashes.update().where(tables.crashes.c.id == crash_id).values(meta=json.dumps(meta))
        )
        conn.execute(
            tables.reports.insert().values(crash_id=crash_id, backend="drgn", report=json.dumps(report()))
        )
        build_id = "ab" * 20
        sha = "cd" * 32
        conn.execute(
            tables.objects.insert().values(key=build_id, sha256=sha, size=binary_mib << 20, debuginfo=True)
        )
        conn.execute(
            tables.crash_objects.insert().values(
                crash_id=crash_id, key=build_id, sha256=sha, path="/usr/bin/service"
            )
        )
        conn.exec_driver_sql("ANALYZE")
    print(f"{rows} crashes in {len(sigs)} groups loaded in {time.perf_counter() - t:.0f} s")
    store = stores.open_store(settings.vault_store)
    path = os.path.join(state, "binary")
    with open(path, "wb") as f:
        chunk = random.Random(1).randbytes(1 << 20)
        for _ in range(binary_mib):
            f.write(chunk)
    store.put_file(blobs.object_key(build_id, "cd" * 32), path)
    os.unlink(path)
    return crash_id, build_id


def p50(client: httpx.Client, path: str, token: str, runs: int) -> float:
    times = []
    headers = {"Authorization": f"Bearer {token}"}
    client.get(path, headers=headers).raise_for_status()  # warm: the first request of a path builds caches
    for _ in range(runs):
        t = time.perf_counter()
        r = client.get(path, headers=headers)
        times.append(time.perf_counter() - t)
        r.raise_for_status()
    return statistics.median(times) * 1000


#: the fastest a server can send a file here: sendfile(2) from asyncio, no HTTP parsing at all
BARE_SENDFILE = """
import asyncio, os, sys
path = sys.argv[1]
async def handle(reader, writer):
    try:
        while await reader.readuntil(b"\\r\\n\\r\\n"):
            size = os.path.getsize(path)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % size)
            with open(path, "rb") as f:
                await asyncio.get_running_loop().sendfile(writer.transport, f)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[2]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def bare_sendfile(plain_path: str, runs: int) -> float:
    """Median bytes/s of ``curl`` from :data:`BARE_SENDFILE` serving the same file."""
    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SENDFILE, plain_path, str(port)])
    try:
        servers.wait_port(port)
        url = f"http://127.0.0.1:{port}/"
        return statistics.median(
            _rate(["curl", "-sf", url], plain_path) for _ in range(runs)
        )
    finally:
        proc.terminate()
        proc.wait(10)


def _rate(cmd: list[str], plain_path: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    return os.path.getsize(plain_path) / (time.perf_counter() - t)


def throughput(url: str, token: str, plain_path: str, runs: int) -> tuple[float, float]:
    """Median bytes/s of ``curl URL > /dev/null`` and of ``cat FILE > /dev/null`` of the same file."""

    def timed(cmd: list[str]) -> float:
        return _rate(cmd, plain_path)

    curl = ["curl", "-sf", "-H", f"Authorization: Bearer {token}", url]
    cat = ["cat", plain_path]
    timed(cat)  # into the page cache
    ours, base = [], []
    for _ in range(runs):
        ours.append(timed(curl))
        base.append(timed(cat))
    return statistics.median(ours), statistics.median(base)


def add_cores(state: str, mib: int) -> tuple[str, str]:
    """One core-like core of ``mib`` MiB kept twice in namespace team-7: in the seekable format, as
    the capture handler stores it now, and as one frame, as it stored cores before; their ids."""
    import zstandard

    from corevault.capture import stream

    settings = config.from_dict({"state_dir": state})
    plain = os.path.join(state, "core")
    rng = random.Random(3)
    with open(plain, "wb") as f:
        text = b"#7 ns::Service::handler_7(Request const&) at handler.cc:42\n" * 2900
        for _ in range(mib):  # a quarter random, some text, zero pages for the rest
            f.write(rng.randbytes(256 << 10) + text + bytes((768 << 10) - len(text)))
    seekable_path, old_path = plain + ".zst", plain + ".old.zst"
    fd = os.open(seekable_path, os.O_WRONLY | os.O_CREAT, 0o600)
    sink = stream.ZstdSink(fd, 3, 0, 1 << 40)
    src = os.open(plain, os.O_RDONLY)
    stream.pump(src, [sink], None)
    sink.finish()
    os.close(src)
    os.close(fd)
    with open(plain, "rb") as f, open(old_path, "wb") as out:
        zstandard.ZstdCompressor(level=3, write_checksum=True).copy_stream(f, out)
    store = stores.open_store(settings.vault_store)
    engine = catalog.connect(settings.catalog_url)
    ids = ("core-seekable", "core-one-frame")
    for crash_id, path in zip(ids, (seekable_path, old_path), strict=True):
        store.put_file(blobs.core_key(crash_id), path)
        meta = {"id": crash_id, "time": NOW, "pod": {"namespace": "team-7", "name": "team-7-pod-1"},
                "core": {"size": mib << 20, "stored_size": os.path.getsize(path), "sha256": sink.sha256}}  # fmt: skip
        with engine.begin() as conn:
            catalog.add_crash(conn, meta, "off")
        os.unlink(path)
    engine.dispose()
    os.unlink(plain)
    return ids


def range_cost(url: str, token: str, mib: int, runs: int) -> tuple[float, float]:
    """Median seconds of ``curl -r`` of the last MiB of each of the two cores."""
    start = (mib - 1) << 20
    times = []
    for crash_id in ("core-seekable", "core-one-frame"):
        cmd = ["curl", "-sf", "-r", f"{start}-", "-H", f"Authorization: Bearer {token}",
               f"{url}/api/v1/crashes/{crash_id}/core"]  # fmt: skip
        got = subprocess.run(cmd, capture_output=True, check=True).stdout
        if len(got) != 1 << 20:
            raise SystemExit(f"{crash_id}: the range held {len(got)} bytes, not 1 MiB")
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            samples.append(time.perf_counter() - t)
        times.append(statistics.median(samples))
    return times[0], times[1]


def core_download(url: str, token: str, state: str, runs: int) -> tuple[float, float]:
    """Median bytes/s of ``curl`` of the whole seekable core, and of ``zstd -dc`` of its stored file
    (what any reader of a compressed core pays), both into /dev/null."""
    stored = os.path.join(state, "vault", blobs.core_key("core-seekable"))
    size = len(subprocess.run(["zstd", "-dc", stored], capture_output=True, check=True).stdout)
    curl = ["curl", "-sf", "-H", f"Authorization: Bearer {token}", f"{url}/api/v1/crashes/core-seekable/core"]
    rates: list[list[float]] = [[], []]
    for _ in range(runs):
        for i, cmd in enumerate((curl, ["zstd", "-dc", stored])):
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            rates[i].append(size / (time.perf_counter() - t))
    return statistics.median(rates[0]), statistics.median(rates[1])


#: searches: a pod (a few dozen crashes), a word in every crash, two words; groups by pod, by title, by a
#: word in every pod name
SEARCHES = [
    ("crashes, a pod's name, every namespace", "/api/v1/crashes?q=team-7-pod-123", ADMIN),
    ("crashes, a pod's name, one namespace", "/api/v1/crashes?q=team-7-pod-123", TEAM),
    ("crashes, a word in every crash, every namespace", "/api/v1/crashes?q=handler_0", ADMIN),
    ("crashes, a word in every crash, one namespace", "/api/v1/crashes?q=handler_0", TEAM),
    ("crashes, two words (image and pod)", "/api/v1/crashes?q=svc-3%20pod-42", ADMIN),
    ("groups, a pod's name, every namespace", "/api/v1/groups?state=all&q=team-7-pod-123", ADMIN),
    ("groups, a pod's name, one namespace", "/api/v1/groups?state=all&q=team-7-pod-123", TEAM),
    ("groups, a word in every crash, every namespace", "/api/v1/groups?state=all&q=handler_0", ADMIN),
    ("groups, a word in every pod, one namespace", "/api/v1/groups?state=all&q=pod-", TEAM),
    ("group list page with a search", "/?state=all&q=team-7-pod-12", TEAM),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--binary-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--core-mib", type=int, default=256)
    a = ap.parse_args()
    state = tempfile.mkdtemp(prefix="cv-bench-server-")
    try:
        crash_id, build_id = fill(state, a.rows, a.binary_mib)
        add_cores(state, a.core_mib)
        cfg = os.path.join(state, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{state}"\n')
        tokens = os.path.join(state, "tokens.toml")
        with open(tokens, "w") as f:
            f.write(f'[[token]]\nname = "admin"\ntoken = "{ADMIN}"\nnamespaces = ["*"]\n'
                    f'[[token]]\nname = "team-7"\ntoken = "{TEAM}"\nnamespaces = ["team-7"]\n')  # fmt: skip
        os.chmod(tokens, 0o600)
        port = servers.free_port()
        server = subprocess.Popen(
            [CLI, "-c", cfg, "serve", "--listen", f"127.0.0.1:{port}", "--tokens", tokens],
            stderr=subprocess.DEVNULL,
        )
        try:
            servers.wait_port(port)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                base = p50(client, "/healthz", ADMIN, a.runs)
                print(
                    f"\np50 of {a.runs} requests over HTTP; /healthz (the fixed cost per request) {base:.1f} ms"
                )
                cases = [
                    ("group list page, every namespace", "/", ADMIN),
                    ("group list page, one namespace", "/", TEAM),
                    ("group list JSON, every namespace", "/api/v1/groups", ADMIN),
                    ("crash list page, every namespace", "/crashes", ADMIN),
                    ("crash list page, one namespace", "/crashes", TEAM),
                    ("crash page (8 threads x 24 frames)", f"/crashes/{crash_id}", TEAM),
                    ("crash JSON", f"/api/v1/crashes/{crash_id}", TEAM),
                ]
                for label, path, token in cases:
                    ms = p50(client, path, token, a.runs)
                    goal = "" if ms <= 100 else "  (goal <= 100 ms NOT met)"
                    print(f"  {label:<38} {ms:7.1f} ms  {ms / base:5.1f} x /healthz{goal}")
                print("search (goal: p50 <= 50 ms)")
                for label, path, token in SEARCHES:
                    ms = p50(client, path, token, a.runs)
                    goal = "" if ms <= 50 else "  (goal <= 50 ms NOT met)"
                    print(f"  {label:<46} {ms:7.1f} ms  {ms / base:5.1f} x /healthz{goal}")
                plain_path = os.path.join(state, "vault", blobs.object_key(build_id, "cd" * 32))
                for who, token in (("every namespace", ADMIN), ("one namespace", TEAM)):
                    url = f"http://127.0.0.1:{port}/buildid/{build_id}/executable"
                    ours, plain = throughput(url, token, plain_path, 5)
                    bare = bare_sendfile(plain_path, 5)
                    goal = "" if ours / plain >= 0.9 else " (goal >= 0.9 NOT met)"
                    print(
                        f"debuginfod, {a.binary_mib} MiB, reader of {who}: curl {ours / 2**20:.0f} MiB/s, "
                        f"cat of the stored file {plain / 2**20:.0f} MiB/s: {ours / plain:.2f}{goal}; "
                        f"a bare sendfile server {bare / 2**20:.0f} MiB/s: {ours / bare:.2f}"
                    )
                seekable_s, one_frame_s = range_cost(f"http://127.0.0.1:{port}", TEAM, a.core_mib, 5)
                print(
                    f"the last MiB of a {a.core_mib} MiB core: stored seekable {seekable_s * 1000:.0f} ms, stored as "
                    f"one frame {one_frame_s * 1000:.0f} ms: {one_frame_s / seekable_s:.1f}x faster "
                    f"(goal: a range costs what it reads)"
                )
                ours, unzstd = core_download(f"http://127.0.0.1:{port}", TEAM, state, 5)
                print(
                    f"the whole {a.core_mib} MiB core: curl {ours / 2**20:.0f} MiB/s, zstd -dc of the stored file "
                    f"{unzstd / 2**20:.0f} MiB/s: {ours / unzstd:.2f} (served plain: decompressed as it is sent)"
                )
        finally:
            server.terminate()
            server.wait(30)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
