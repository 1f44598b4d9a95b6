"""Server benchmark: page latency at 1,000,000 crashes, and debuginfod throughput.

    python -m bench.server [--rows 1000000] [--binary-mib 256] [--runs 25] [--core-mib 256] [--downloads | --pages | --cores]

``corevault serve`` runs as its own process on 127.0.0.1 over a SQLite catalog of
``--rows`` crashes (2,000 crash groups of very different sizes, each in one of 50
namespaces, over 90 days) and a file:// vault. Measured over HTTP with one keep-alive
client, in one run:

- p50 latency of the group list page, a crash page, and their JSON forms, for a reader of
  every namespace and for a reader of one namespace (goal ≤ 100 ms), each also as a ratio
  to the p50 of ``/healthz`` (the server's fixed cost per request);
- search (``?q=``) over crashes and groups, for both readers (goal ≤ 50 ms): a pod's name,
  a word that every crash holds (newest first, a page of 50), two words, and groups;
- downloads, each as a ratio beside its goal, with the baselines measured in the same run, the
  cases taking turns in a new random order each round: debuginfod fetching ``/buildid/<id>/executable`` of a 100 KiB, a 4 MiB and
  a ``--binary-mib`` MiB file (sent by the kernel: :mod:`corevault.server.zerocopy`), read by one
  reader (1 MiB reads, in this process) from the socket, ÷ ``cat`` of the same stored file into
  the same reader through a pipe of 1 MiB (goal ≥ 0.9; the pipe holds what the reader asks for
  at once, as the socket's buffer does; the default pipe of 64 KiB is printed beside it), ÷ a
  bare asyncio ``sendfile`` server of the same file read the same way, and ÷ uvicorn alone (as
  ``corevault serve`` runs it: httptools, uvloop, the same zero-copy send, no application: what
  is uvicorn's and what is corevault's); over one kept-alive connection too; then with ``curl``
  into /dev/null, against the bare server and ``cat`` into /dev/null (what curl's own start-up
  and copies cost). Each download is a new connection, each ``cat`` a new process. A ratio is the
  median of the rounds' own ratios (the baseline's time over the download's in the same round,
  so that the host's load, which moves from second to second on two shared cores, hits both
  alike), printed with its quartiles. Beside each size, each server's CPU and context switches
  per download (``/proc/PID/task/*``), which the host's load does not stretch; and for the largest
  file, ``sendfile`` alone into the same reader over loopback TCP and over a Unix socket (no HTTP);
- a range of a compressed core: the last MiB of a ``--core-mib`` MiB core stored in the
  seekable format ÷ the same range of the same core stored as one frame (as before); and the
  whole core, in rounds as above (at least 15), into the same reader: as stored
  (``Content-Encoding: zstd``) ÷ ``cat`` of the stored file and ÷ the bare sendfile server of
  it; the plain core (the server decompresses) ÷ ``zstd -dc`` of the stored file through the same
  pipe and ÷ the bare sendfile server of the plain core as a file; and ``curl --compressed``
  (which decompresses) and plain ``curl`` into /dev/null ÷ ``zstd -dc`` into /dev/null.
  ``--cores`` measures these alone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

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


def fill(state: str, rows: int, binary_mib: int) -> str:
    """The catalog and vault; returns the id of the crash of namespace team-7 that mapped the binaries."""
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
        for build_id, size in binaries(binary_mib).items():
            sha = build_id[:2] * 32
            conn.execute(tables.objects.insert().values(key=build_id, sha256=sha, size=size, debuginfo=True))
            conn.execute(
                tables.crash_objects.insert().values(
                    crash_id=crash_id, key=build_id, sha256=sha, path=f"/usr/lib/{build_id[:2]}.so"
                )
            )
        conn.exec_driver_sql("ANALYZE")
    print(f"{rows} crashes in {len(sigs)} groups loaded in {time.perf_counter() - t:.0f} s")
    store = stores.open_store(settings.vault_store)
    path = os.path.join(state, "binary")
    chunk = random.Random(1).randbytes(1 << 20)
    for build_id, size in binaries(binary_mib).items():
        with open(path, "wb") as f:
            for at in range(0, size, len(chunk)):
                f.write(chunk[: size - at])
        store.put_file(blobs.object_key(build_id, build_id[:2] * 32), path)
    os.unlink(path)
    return crash_id


def binaries(binary_mib: int) -> dict[str, int]:
    """The binaries the crash mapped, by build-id: 100 KiB, 4 MiB and ``binary_mib`` MiB."""
    return {"ab" * 20: 100 << 10, "ac" * 20: 4 << 20, "ad" * 20: binary_mib << 20}


def size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


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


#: the fastest a server can send a file here: sendfile(2) from asyncio, no HTTP parsing at all;
#: ``GET /N`` answers the N-th file of its command line
BARE_SENDFILE = """
import asyncio, os, sys
paths = sys.argv[2:]
async def handle(reader, writer):
    try:
        while head := await reader.readuntil(b"\\r\\n\\r\\n"):
            path = paths[int(head.split(b" ")[1][1:])]
            size = os.path.getsize(path)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % size)
            with open(path, "rb") as f:
                await asyncio.get_running_loop().sendfile(writer.transport, f)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

#: uvicorn alone, as ``corevault serve`` runs it (httptools and uvloop where installed, the zero-copy
#: send, no access log) but with no application behind it: ``GET /N`` answers the N-th file of its command line, by ``sendfile``
UVICORN_ALONE = """
import os, sys
import uvicorn
from corevault.server import zerocopy
paths = sys.argv[2:]
async def app(scope, receive, send):
    path = paths[int(scope["path"][1:])]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        await send({"type": zerocopy.EXTENSION, "file": f, "offset": 0, "count": size})
zerocopy.install()
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            server_header=False, lifespan="off")
"""

READ = 1 << 20


def read_all(f: BinaryIO | socket.socket, buf: bytearray, want: int | None = None) -> int:
    """The reader every download and baseline goes into: 1 MiB reads until the end (or ``want``)."""
    into = f.recv_into if isinstance(f, socket.socket) else f.readinto
    got = 0
    view = memoryview(buf)
    while want is None or got < want:
        n = into(view if want is None else view[: min(READ, want - got)])
        if not n:
            break
        got += n
    return got


def exchange(
    s: socket.socket, path: str, token: str | None, buf: bytearray, encoding: str = "identity"
) -> int | None:
    """GET ``path`` on connection ``s`` and read its body with :func:`read_all`; its length, or None
    when the server had closed the connection before answering."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Accept-Encoding: {encoding}\r\n\r\n".encode())
        head = s.recv(4096)
    except ConnectionError:
        return None
    if not head:
        return None
    while b"\r\n\r\n" not in head:
        more = s.recv(4096)
        if not more:
            raise SystemExit(f"{path}: the server closed the connection amid its headers")
        head += more
    head, _, body = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{path}: {head.splitlines()[0].decode()}")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    got = len(body) + read_all(s, buf, length - len(body))
    if got != length:
        raise SystemExit(f"{path}: {got} bytes of {length}")
    return got


def http_get(port: int, path: str, token: str | None, buf: bytearray, encoding: str = "identity") -> int:
    """GET ``path`` on one new connection and read its body with :func:`read_all`; its length."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = exchange(s, path, token, buf, encoding)
    if got is None:
        raise SystemExit(f"{path}: the server closed the connection before its headers")
    return got


class KeptAlive:
    """One connection for every GET, as an HTTP client that keeps its connections does (opened
    anew when the server closed it between two, after its keep-alive time)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def get(self, path: str, token: str | None, buf: bytearray) -> int:
        for _ in range(2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
            got = exchange(self.sock, path, token, buf)
            if got is not None:
                return got
            self.close()
        raise SystemExit(f"{path}: the server closed a new connection before its headers")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def cat_into(path: str, buf: bytearray, pipe: int = READ) -> int:
    """``cat path`` into the same reader, through a pipe of ``pipe`` bytes (by default what the
    reader asks for at once; the kernel's default is 64 KiB)."""
    return piped_into(["cat", path], buf, pipe)


def piped_into(cmd: list[str], buf: bytearray, pipe: int = READ) -> int:
    """What ``cmd`` writes, into the reader through a pipe of ``pipe`` bytes (as :func:`cat_into`)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    if pipe != 64 << 10:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, pipe)
    got = read_all(proc.stdout, buf)
    proc.stdout.close()
    proc.wait()
    return got


class Rounds:
    """Seconds of each case over ``runs`` rounds; in each round every case runs once, in a new
    random order (a fixed order would give one case the same neighbour every time)."""

    def __init__(self, cases: dict[str, Callable[[], object]], runs: int) -> None:
        for case in cases.values():  # warm: page cache, connections, the server's caches
            case()
        order = random.Random(runs)
        self.samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs):
            for name in order.sample(list(cases), len(cases)):
                t = time.perf_counter()
                cases[name]()
                self.samples[name].append(time.perf_counter() - t)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, base: str, case: str) -> tuple[float, float, float]:
        """``base``'s time over ``case``'s, round by round: the median and the quartiles."""
        q1, q2, q3 = statistics.quantiles(
            [b / c for b, c in zip(self.samples[base], self.samples[case], strict=True)], n=4
        )
        return q2, q1, q3


def run_quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)


def against_goal(ratio: tuple[float, float, float], want: float = 0.9) -> str:
    """A ratio (its median and quartiles) beside its goal, judged by the median."""
    return f"{spread(ratio)} (goal >= {want}{'' if ratio[0] >= want else ', NOT met'})"


def spread(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.2f} [{ratio[1]:.2f}-{ratio[2]:.2f}]"


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 2**20:.0f} MiB/s" if size >= 1 << 20 else f"{seconds * 1000:.1f} ms"


def server_load(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches of process ``pid`` so far, summed over its threads: what a
    request costs the server whatever else runs on the host, unlike its wall time."""
    cpu, switches = 0, 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                cpu += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{task}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:  # a thread that ended meanwhile
            pass
    return cpu / 1e9, switches


def one_binary(
    server: tuple[int, int],
    token: str,
    url: str,
    baselines: dict[str, tuple[int, int]],
    index: int,
    size: int,
    path: str,
    runs: int,
) -> None:
    """One binary's download: ``url`` of the server (port, process) and the ``index``-th file of
    the ``baselines`` (``bare`` and ``uvicorn alone``, each port and process)."""
    port, pid = server
    buf = bytearray(READ)
    bare_url = f"http://127.0.0.1:{baselines['bare'][0]}/{index}"
    curl = ["curl", "-sf", "-o", "/dev/null"]
    fetches = runs if size < 64 << 20 else max(15, runs // 2)
    kept = KeptAlive(port)
    try:
        got = Rounds(
            {
                "ours": lambda: http_get(port, url, token, buf),
                "ours, kept alive": lambda: kept.get(url, token, buf),
                "cat": lambda: cat_into(path, buf),
                "cat, 64 KiB pipe": lambda: cat_into(path, buf, 64 << 10),
                "bare": lambda: http_get(baselines["bare"][0], f"/{index}", None, buf),
                "uvicorn alone": lambda: http_get(baselines["uvicorn alone"][0], f"/{index}", None, buf),
                "curl ours": lambda: run_quiet(
                    [*curl, "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}{url}"]
                ),
                "curl bare": lambda: run_quiet([*curl, bare_url]),
                "cat > /dev/null": lambda: run_quiet(["cat", path]),
            },
            fetches,
        )
    finally:
        kept.close()
    # what each server spent on a download, in a loop of its own (curl hits the servers too)
    spent = {}
    for name, (at, process, where) in {
        "ours": (port, pid, url),
        **{name: (at, process, f"/{index}") for name, (at, process) in baselines.items()},
    }.items():
        before = server_load(process)
        for _ in range(fetches):
            http_get(at, where, token if name == "ours" else None, buf)
        after = server_load(process)
        spent[name] = tuple((b - a) / fetches for a, b in zip(before, after, strict=True))
    m = got.median
    print(
        f"  {size_label(size):>7}, reader: ours {rate(size, m('ours'))}, cat | reader {rate(size, m('cat'))}: "
        f"{against_goal(got.ratio('cat', 'ours'))}; with a 64 KiB pipe {rate(size, m('cat, 64 KiB pipe'))}: "
        f"{spread(got.ratio('cat, 64 KiB pipe', 'ours'))}; bare sendfile server {rate(size, m('bare'))}: "
        f"{spread(got.ratio('bare', 'ours'))}; uvicorn alone {rate(size, m('uvicorn alone'))}: "
        f"{spread(got.ratio('uvicorn alone', 'ours'))}"
    )
    # the most any HTTP server gets here: the bare one against the same goal
    print(
        f"  {size_label(size):>7}, reader: the bare sendfile server ÷ cat | reader {spread(got.ratio('cat', 'bare'))}"
    )
    print(
        f"  {size_label(size):>7}, server CPU and context switches per download: "
        + ", ".join(f"{name} {cpu * 1000:.2f} ms, {n:.1f}" for name, (cpu, n) in spent.items())
    )
    print(
        f"  {size_label(size):>7}, reader, one kept-alive connection: ours {rate(size, m('ours, kept alive'))}: "
        f"{against_goal(got.ratio('cat', 'ours, kept alive'))} of cat | reader"
    )
    print(
        f"  {size_label(size):>7}, curl:   ours {rate(size, m('curl ours'))}, bare sendfile server "
        f"{rate(size, m('curl bare'))}: {spread(got.ratio('curl bare', 'curl ours'))}; "
        f"cat > /dev/null {rate(size, m('cat > /dev/null'))}: {spread(got.ratio('cat > /dev/null', 'curl ours'))}"
    )


def sent_by(kind: str, path: str, buf: bytearray, sndbuf: int = 0, rcvbuf: int = 0) -> int:
    """``path`` sent whole by ``sendfile`` from a forked process into the reader, over loopback TCP
    (``kind`` "tcp") or a Unix socket ("unix"): the kernel's part of a download, with no HTTP.
    ``sndbuf``, ``rcvbuf``: the sender's and the reader's socket buffer, if not as the kernel
    sizes them; the reader reads ``len(buf)`` at once."""
    size = os.path.getsize(path)
    if kind == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        ours: socket.socket | None = None
    else:
        ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the sender
        code = 1
        try:
            out = listener.accept()[0] if kind == "tcp" else theirs
            if sndbuf:
                out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            with open(path, "rb") as f:
                at = 0
                while at < size:
                    at += os.sendfile(out.fileno(), f.fileno(), at, size - at)
            out.close()
            code = 0
        finally:
            os._exit(code)
    if kind == "tcp":
        ours = socket.socket()
        if rcvbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        ours.connect(listener.getsockname())
        listener.close()
    else:
        theirs.close()
    assert ours is not None
    with ours:
        got = read_all(ours, buf)
    os.waitpid(pid, 0)
    return got


def transports(path: str, runs: int) -> None:
    """Why a download of a large file stays below ``cat`` here: the same ``sendfile`` into the same
    reader over loopback TCP and over a Unix socket, against ``cat`` through the pipe; and over
    TCP with what a server or a reader could change: a 4 MiB send buffer (the most
    ``net.core.wmem_max`` allows here), a 4 MiB receive buffer, reads of 4 MiB."""
    buf, big = bytearray(READ), bytearray(4 * READ)
    got = Rounds(
        {
            "cat": lambda: cat_into(path, buf),
            "tcp": lambda: sent_by("tcp", path, buf),
            "unix": lambda: sent_by("unix", path, buf),
            "tcp, SO_SNDBUF 4 MiB": lambda: sent_by("tcp", path, buf, sndbuf=4 * READ),
            "tcp, SO_RCVBUF 4 MiB": lambda: sent_by("tcp", path, buf, rcvbuf=4 * READ),
            "tcp, 4 MiB reads": lambda: sent_by("tcp", path, big),
        },
        runs,
    )
    size = os.path.getsize(path)
    print(
        f"  {size_label(size):>7}, no HTTP: sendfile into the reader over loopback TCP {rate(size, got.median('tcp'))}: "
        f"{spread(got.ratio('cat', 'tcp'))} of cat | reader; over a Unix socket {rate(size, got.median('unix'))}: "
        f"{spread(got.ratio('cat', 'unix'))}"
    )
    print(
        f"  {size_label(size):>7}, no HTTP, loopback TCP ÷ cat | reader: "
        + "; ".join(
            f"{name[5:]} {rate(size, got.median(name))}: {spread(got.ratio('cat', name))}"
            for name in ("tcp, SO_SNDBUF 4 MiB", "tcp, SO_RCVBUF 4 MiB", "tcp, 4 MiB reads")
        )
    )


def debuginfod(server: tuple[int, int], token: str, state: str, binary_mib: int, runs: int) -> None:
    """Each binary's download against ``cat``, the bare sendfile server and uvicorn alone, into one
    reader and by curl."""
    files = {
        build_id: (size, os.path.join(state, "vault", blobs.object_key(build_id, build_id[:2] * 32)))
        for build_id, size in binaries(binary_mib).items()
    }
    started: dict[str, tuple[int, subprocess.Popen]] = {}
    try:
        for name, script in (("bare", BARE_SENDFILE), ("uvicorn alone", UVICORN_ALONE)):
            at = servers.free_port()
            started[name] = (
                at,
                subprocess.Popen([sys.executable, "-c", script, str(at), *(p for _, p in files.values())]),
            )
        for at, _ in started.values():
            servers.wait_port(at)
        baselines = {name: (at, proc.pid) for name, (at, proc) in started.items()}
        print(
            "debuginfod downloads, one reader (1 MiB reads) / curl -o /dev/null; rounds in random order; "
            "ratios: median [quartiles] of the rounds' own:"
        )
        for i, (build_id, (size, path)) in enumerate(files.items()):
            one_binary(server, token, f"/buildid/{build_id}/executable", baselines, i, size, path, runs)
        size, path = max(files.values())
        transports(path, max(15, runs // 2))
    finally:
        for _, proc in started.values():
            proc.terminate()
            proc.wait(10)


def add_cores(state: str, mib: int) -> tuple[str, str]:
    """One core-like core of ``mib`` MiB kept twice in namespace team-7: in the seekable format, as
    the capture handler stores it now, and as one frame, as it stored cores before; their ids.
    The plain core stays in ``state``, as ``core``."""
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
    return ids  # the plain core stays, for the bare server to send (core_download)


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


def core_download(server: tuple[int, int], token: str, state: str, runs: int) -> None:
    """The whole seekable core, every case into the same reader as the binaries: as stored (zstd)
    ÷ ``cat`` of its stored file, and ÷ the bare sendfile server of that file (what loopback TCP
    lets any server reach); the plain core, which the server decompresses, ÷ ``zstd -dc`` of the
    stored file into the reader through the same 1 MiB pipe as ``cat``, and ÷ the bare sendfile
    server of the plain core already decompressed (loopback TCP's bound for it); and, as before, decompressed
    by ``curl --compressed`` and plain by ``curl`` (into /dev/null) ÷ ``zstd -dc`` into /dev/null."""
    port, pid = server
    stored = os.path.join(state, "vault", blobs.core_key("core-seekable"))
    path = "/api/v1/crashes/core-seekable/core"
    url = f"http://127.0.0.1:{port}{path}"
    auth = ["-H", f"Authorization: Bearer {token}"]
    buf = bytearray(READ)
    bare_port = servers.free_port()
    plain = os.path.join(state, "core")
    bare = subprocess.Popen([sys.executable, "-c", BARE_SENDFILE, str(bare_port), stored, plain])
    try:
        servers.wait_port(bare_port)
        got = Rounds(
            {
                "stored": lambda: http_get(port, path, token, buf, "zstd"),
                "cat": lambda: cat_into(stored, buf),
                "bare": lambda: http_get(bare_port, "/0", None, buf),
                "plain": lambda: http_get(port, path, token, buf),
                "bare, plain": lambda: http_get(bare_port, "/1", None, buf),
                "zstd -dc | reader": lambda: piped_into(["zstd", "-qdc", stored], buf),
                "curl --compressed": lambda: run_quiet(
                    ["curl", "-sf", "--compressed", "-o", "/dev/null", *auth, url]
                ),
                "curl plain": lambda: run_quiet(["curl", "-sf", "-o", "/dev/null", *auth, url]),
                "zstd -dc": lambda: run_quiet(["zstd", "-qdc", stored]),
            },
            runs,
        )
    finally:
        bare.terminate()
        bare.wait(10)
    # what the server spent on each, in a loop of its own
    spent = {}
    for name, encoding in (("stored", "zstd"), ("plain", "identity")):
        before = server_load(pid)
        for _ in range(runs):
            http_get(port, path, token, buf, encoding)
        after = server_load(pid)
        spent[name] = tuple((b - a) / runs for a, b in zip(before, after, strict=True))
    size = os.path.getsize(stored)
    m = got.median
    print(
        f"the whole core, {size >> 20} MiB stored, {runs} rounds in random order: as stored "
        f"(Content-Encoding: zstd) into the reader {rate(size, m('stored'))}, cat | reader "
        f"{rate(size, m('cat'))}: {against_goal(got.ratio('cat', 'stored'))}; the bare sendfile server "
        f"{rate(size, m('bare'))}: {spread(got.ratio('bare', 'stored'))}, itself "
        f"{spread(got.ratio('cat', 'bare'))} of cat | reader"
    )
    print(
        f"  plain (decompressed by the server) into the reader {m('plain') * 1000:.0f} ms, zstd -dc | reader "
        f"{m('zstd -dc | reader') * 1000:.0f} ms: {against_goal(got.ratio('zstd -dc | reader', 'plain'))}; "
        f"the bare sendfile server of the plain core, already decompressed, {m('bare, plain') * 1000:.0f} ms: "
        f"{spread(got.ratio('bare, plain', 'plain'))}, itself {spread(got.ratio('zstd -dc | reader', 'bare, plain'))} "
        f"of zstd -dc | reader"
    )
    print(
        f"  server CPU per download: as stored {spent['stored'][0] * 1000:.1f} ms, plain "
        f"{spent['plain'][0] * 1000:.1f} ms"
    )
    print(
        f"  curl into /dev/null: --compressed {m('curl --compressed') * 1000:.0f} ms, of the plain core "
        f"{m('curl plain') * 1000:.0f} ms; zstd -dc of the stored file {m('zstd -dc') * 1000:.0f} ms: "
        f"{spread(got.ratio('zstd -dc', 'curl --compressed'))} and {spread(got.ratio('zstd -dc', 'curl plain'))}"
    )


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


def pages(client: httpx.Client, crash_id: str, runs: int) -> None:
    """p50 of the pages and searches, each also against /healthz."""
    base = p50(client, "/healthz", ADMIN, runs)
    print(f"\np50 of {runs} requests over HTTP; /healthz (the fixed cost per request) {base:.1f} ms")
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
        ms = p50(client, path, token, runs)
        goal = "" if ms <= 100 else "  (goal <= 100 ms NOT met)"
        print(f"  {label:<38} {ms:7.1f} ms  {ms / base:5.1f} x /healthz{goal}")
    print("search (goal: p50 <= 50 ms)")
    for label, path, token in SEARCHES:
        ms = p50(client, path, token, runs)
        goal = "" if ms <= 50 else "  (goal <= 50 ms NOT met)"
        print(f"  {label:<46} {ms:7.1f} ms  {ms / base:5.1f} x /healthz{goal}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--binary-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--core-mib", type=int, default=256)
    ap.add_argument("--downloads", action="store_true", help="measure the downloads only, not the pages")
    ap.add_argument(
        "--pages", action="store_true", help="measure the pages and searches only, not the downloads"
    )
    ap.add_argument(
        "--cores", action="store_true", help="measure the core downloads only (a range and the whole core)"
    )
    a = ap.parse_args()
    state = tempfile.mkdtemp(prefix="cv-bench-server-")
    try:
        crash_id = fill(state, a.rows, a.binary_mib)
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
                if not a.downloads and not a.cores:
                    pages(client, crash_id, a.runs)
                if a.pages:
                    return 0
                for who, token in (
                    (("every namespace", ADMIN), ("one namespace", TEAM)) if not a.cores else ()
                ):
                    print(f"a reader of {who}:")
                    debuginfod((port, server.pid), token, state, a.binary_mib, a.runs)
                seekable_s, one_frame_s = range_cost(f"http://127.0.0.1:{port}", TEAM, a.core_mib, 5)
                print(
                    f"the last MiB of a {a.core_mib} MiB core: stored seekable {seekable_s * 1000:.0f} ms, stored as "
                    f"one frame {one_frame_s * 1000:.0f} ms: {one_frame_s / seekable_s:.1f}x faster "
                    f"(goal: a range costs what it reads)"
                )
                core_download((port, server.pid), TEAM, state, max(15, a.runs // 2))
        finally:
            server.terminate()
            server.wait(30)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
