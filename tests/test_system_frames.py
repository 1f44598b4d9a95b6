"""System frames named by default and cheaply, from debug files found by build-id.

Real crashes in runc pods (a NULL read inside libc's strlen, an abort, threads): libc's
frames are named from the symbol table of its separate debug file, found in the host's
``/usr/lib/debug`` or fetched from an upstream debuginfod server (a real elfutils
``debuginfod`` on 127.0.0.1 serving libc6-dbg's files, standing in for a distribution's),
kept once, put in the vault and served again by corevault's own debuginfod.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import httpx
import pytest

from corevault import spool
from corevault.agent.loop import Agent
from corevault.analysis import binaries, runner, upstream
from corevault.model import Report
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import blobs
from testbed import corpus, debuginfod, runc, servers
from tests.conftest import installed_capture, starts_servers
from tests.test_vault import make_node

pytestmark = pytest.mark.crash

SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
CASES = {
    "strlen": ["/app/crasher", "strlen"],
    "abort": ["/bin/sh", "-c", "/app/crasher abort; exit 1"],
    "threads": ["/app/crasher", "threads", "3"],
}
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LOADER = "/lib64/ld-linux-x86-64.so.2"
TOKEN = "sysframes-admin-token-0123456789"


def host_debug_file(path: str) -> tuple[str, str]:
    """The build-id of a host library and its debug file from the installed -dbg package."""
    build_id = binaries.file_build_id(path)
    assert build_id is not None, path
    debug = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    assert binaries.file_build_id(debug) == build_id, f"libc6-dbg does not match {path}"
    return build_id, debug


@pytest.fixture(scope="module")
def material(rootfs: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Spool entries and the build-id store of the crashes above, kept after the capture is gone."""
    keep = tmp_path_factory.mktemp("sysframes")
    cores = {}
    with installed_capture() as cap:
        cap.configure("[capture]\nstorm_max = 100\n")
        for name, args in CASES.items():
            c = cap.crash(rootfs, args, annotations=SEED)
            [meta] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
            cores[name] = meta["id"]
        shutil.copytree(spool.ready_dir(cap.spool), keep / "ready")
        shutil.copytree(cap.store, keep / "store")
    paths = {name: str(keep / "ready" / entry / spool.CORE_NAME) for name, entry in cores.items()}
    return {"dir": str(keep), "ids": sorted(cores.values()), "store": str(keep / "store"), **paths}


def frames(report: Report) -> list[str | None]:
    assert report.crashed_thread is not None
    return [f.function for f in report.crashed_thread.frames]


def test_a_fault_inside_libc_names_libcs_function_without_its_dwarf(material: dict) -> None:
    r = runner.analyze(material["strlen"], [material["store"]])
    assert r.crashed_thread is not None
    top = r.crashed_thread.frames[0]
    assert top.module == LIBC and top.function and top.function.startswith("__strlen_"), top
    assert top.file is None  # from the debug file's symbol table: libc's DWARF was not indexed
    assert frames(r)[1:3] == ["measure", "main"]
    assert next(m for m in r.modules if m.path == LIBC).debuginfo
    assert r.title == "SIGSEGV in measure ← main"


def test_aborts_and_threads_start_where_gdb_says(material: dict) -> None:
    abort = runner.analyze(material["abort"], [material["store"]])
    assert frames(abort)[:4] == ["__pthread_kill_implementation", "raise", "abort", "main"]
    threads = runner.analyze(material["threads"], [material["store"]])
    workers = [t for t in threads.threads if t.tid != threads.threads[-1].tid or t.crashed]
    starts = [[f.function for f in t.frames[-2:]] for t in threads.threads if len(t.frames) > 2]
    assert starts.count(["start_thread", "__clone3"]) == 4, starts  # three waiters and the crashing worker
    assert len(workers) >= 4


def test_the_gdb_backend_names_them_the_same_way(material: dict) -> None:
    r = runner.analyze(material["strlen"], [material["store"]], backend="gdb")
    assert r.backend == "gdb"
    top = r.crashed_thread.frames[0]  # type: ignore[union-attr]
    assert top.function and top.function.startswith("__strlen_") and frames(r)[1] == "measure"


def test_without_a_debug_file_libcs_internals_stay_unnamed(material: dict) -> None:
    r = runner.analyze(material["abort"], [material["store"]], debug_dirs=())
    assert frames(r)[0] is None and frames(r)[3] == "main"
    assert not next(m for m in r.modules if m.path == LIBC).debuginfo


@pytest.fixture(scope="module")
@starts_servers
def distribution() -> Iterator[str]:
    """A real debuginfod serving libc6-dbg's debug files of libc and the loader."""
    libc, libc_debug = host_debug_file(LIBC)
    _, loader_debug = host_debug_file(LOADER)
    with debuginfod.serve([libc_debug, loader_debug], ready_build_id=libc) as url:
        yield url


def test_upstream_debuginfod_names_them_once_fetched_and_kept(
    material: dict, distribution: str, tmp_path
) -> None:
    up = upstream.Upstream((distribution,), str(tmp_path / "cache"))
    r = runner.analyze(material["abort"], [material["store"]], debug_dirs=(), fetch=up)
    assert frames(r)[:4] == ["__pthread_kill_implementation", "raise", "abort", "main"]
    libc, debug = host_debug_file(LIBC)
    used = next(m for m in r.modules if m.path == LIBC)
    assert used.sha256  # a bare core's: the stored file's own, checked against the core's memory
    kept = upstream.debuginfo_path(up.cache, libc, used.sha256)
    assert _sha(kept) == _sha(debug)
    crasher = next(m.build_id for m in r.modules if m.path == "/app/crasher")
    assert not os.path.exists(os.path.join(up.cache, "buildid", crasher))  # has its own DWARF: not asked for
    # Later crashes use the kept file, with no server at all.
    offline = upstream.Upstream(("http://127.0.0.1:9",), up.cache, timeout=2)
    again = runner.analyze(material["strlen"], [material["store"]], debug_dirs=(), fetch=offline)
    assert frames(again)[0].startswith("__strlen_")  # type: ignore[union-attr]


def test_a_debug_file_kept_by_build_id_alone_is_never_used_and_is_removed(material: dict, tmp_path) -> None:
    """Kept before content hashes, nobody knows which content it was fetched for: another
    tenant's, maybe, under a build-id this crash's object claims. It is not read, and goes."""
    libc, debug = host_debug_file(LIBC)
    legacy = tmp_path / "cache" / "buildid" / libc / upstream.LEGACY_NAME
    legacy.parent.mkdir(parents=True)
    shutil.copy(debug, legacy)
    offline = upstream.Upstream(("http://127.0.0.1:9",), str(tmp_path / "cache"), timeout=2)
    r = runner.analyze(material["abort"], [material["store"]], debug_dirs=(), fetch=offline)
    assert frames(r)[0] is None and not next(m for m in r.modules if m.path == LIBC).debuginfo
    assert not legacy.exists()


def test_an_upstream_file_over_the_size_limit_is_not_kept(
    material: dict, distribution: str, tmp_path
) -> None:
    up = upstream.Upstream((distribution,), str(tmp_path / "cache"), max_size=1 << 20)  # libc's is 4 MiB
    r = runner.analyze(material["abort"], [material["store"]], debug_dirs=(), fetch=up)
    assert frames(r)[0] is None
    assert kept(up, host_debug_file(LIBC)[0]) == []


class _Recording(http.server.SimpleHTTPRequestHandler):
    asked: list[str]

    def do_GET(self) -> None:
        self.asked.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def http_directory(root: str, asked: list[str] | None = None) -> Iterator[str]:
    """A plain HTTP server of ``root`` on 127.0.0.1; the paths asked for go into ``asked``."""
    handler = partial(
        type("Handler", (_Recording,), {"asked": [] if asked is None else asked}), directory=root
    )
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_a_file_from_upstream_with_another_build_id_is_never_used(material: dict, tmp_path) -> None:
    libc, _ = host_debug_file(LIBC)
    _, loader_debug = host_debug_file(LOADER)
    wrong = tmp_path / "server" / "buildid" / libc / "debuginfo"
    wrong.parent.mkdir(parents=True)
    shutil.copy(loader_debug, wrong)  # a real debug file, of another object
    with http_directory(str(tmp_path / "server")) as url:
        up = upstream.Upstream((url,), str(tmp_path / "cache"))
        assert httpx.get(f"{url}/buildid/{libc}/debuginfo").status_code == 200
        r = runner.analyze(material["abort"], [material["store"]], debug_dirs=(), fetch=up)
    assert frames(r)[0] is None  # the loader's symbols would have named libc's frames wrongly
    assert os.listdir(os.path.join(up.cache, "buildid", libc)) == [upstream.MISSING]


def test_fetched_debug_files_go_to_the_vault_and_are_served_again(
    material: dict, distribution: str, tmp_path
) -> None:
    node = make_node(material, extra=f'[analysis]\ndebuginfod_urls = "{distribution}"\ndebug_dirs = []\n')
    try:
        Agent(node.settings).run(once=True)
        vault = node.vault()
        libc, debug = host_debug_file(LIBC)
        meta = vault.store.open(blobs.meta_key(material["ids"][0])).read().decode()
        [sha] = [m["sha256"] for m in json.loads(meta)["modules"] if m["path"] == LIBC]
        assert vault.store.size(blobs.debuginfo_key(libc, sha)) == os.path.getsize(debug)
        reports = [vault.store.open(blobs.report_key(entry)).read().decode() for entry in material["ids"]]
        named = ("__strlen_", "__pthread_kill_implementation", "start_thread")  # one in each crash
        assert all(any(n in r for n in named) for r in reports)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{TOKEN}"\nnamespaces = ["*"]\n')
        tokens.chmod(0o600)
        with servers.asgi(create_app(node.settings, StaticTokens(str(tokens)))) as url:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            served = httpx.get(f"{url}/buildid/{libc}/debuginfo", headers=auth)
            assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == _sha(debug)
            assert httpx.get(f"{url}/buildid/{libc}/debuginfo").status_code == 401
    finally:
        shutil.rmtree(node.dir, ignore_errors=True)


def kept(up: upstream.Upstream, build_id: str) -> list[str]:
    """The debug files the node keeps for ``build_id`` (one per content fetched for)."""
    d = os.path.join(up.cache, "buildid", build_id)
    return sorted(n for n in os.listdir(d) if n.endswith(upstream.SUFFIX)) if os.path.isdir(d) else []


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def merge_usr(root: str) -> None:
    """Make a root look like a Debian image since bookworm: /lib and /lib64 link into /usr."""
    for d in ("lib", "lib64"):
        top, usr = os.path.join(root, d), os.path.join(root, "usr", d)
        if os.path.isdir(top) and not os.path.islink(top):
            shutil.copytree(top, usr, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(top)
            os.symlink(f"usr/{d}", top)


@pytest.fixture(scope="module")
def rust(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Rust panic (panic=abort, an unwrap on None) in a pod of a merged-/usr image, with its store."""
    keep = tmp_path_factory.mktemp("rust")
    root = corpus.build_rootfs(str(keep / "root"))
    merge_usr(root)
    with installed_capture() as cap:
        c = cap.crash(root, ["/bin/sh", "-c", "/app/rustcrash unwrap; exit 1"], annotations=SEED)
        [meta] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
        shutil.copy(os.path.join(spool.ready_dir(cap.spool), meta["id"], spool.CORE_NAME), keep / "core.zst")
        shutil.copytree(cap.store, keep / "store")
    shutil.rmtree(keep / "root")
    return {"core": str(keep / "core.zst"), "store": str(keep / "store")}


def lookup_user_chain(report: Report) -> list[tuple[str, bool]]:
    """The functions at lookup_user's pc, innermost first, and whether each is inlined."""
    assert report.crashed_thread is not None
    frames = report.crashed_thread.frames
    at = next(f.pc for f in frames if f.function == "rustcrash::lookup_user")
    return [(f.function or "", f.inline) for f in frames if f.pc == at]


def test_drgn_shows_the_inline_frames_rusts_dwarf_describes(rust: dict) -> None:
    ours = lookup_user_chain(runner.analyze(rust["core"], [rust["store"]]))
    gdb = lookup_user_chain(runner.analyze(rust["core"], [rust["store"]], backend="gdb"))
    # Option::unwrap is inlined into lookup_user: gdb has always shown it, drgn alone did not
    assert ours[-1] == ("rustcrash::lookup_user", False) and len(ours) == len(gdb) >= 2, (ours, gdb)
    assert all(inline for _, inline in ours[:-1]) and "unwrap" in ours[-2][0], ours


def test_the_gdb_backend_unwinds_a_rust_abort_in_a_merged_usr_image(rust: dict) -> None:
    # The core names /usr/lib/x86_64-linux-gnu/libc.so.6; the dynamic linker, /lib/x86_64-linux-gnu/…
    r = runner.analyze(rust["core"], [rust["store"]], backend="gdb")
    assert frames(r)[:3] == ["__pthread_kill_implementation", "raise", "abort"], frames(r)
    assert r.signature_frames[0] == "rustcrash::lookup_user" and "rustcrash::main" in frames(r)


CHAIN = 24


def build_chain(d: str) -> str:
    """A program whose crash runs through CHAIN shared libraries: CHAIN modules, no debug info."""
    for i in reversed(range(CHAIN)):
        body = "*(volatile int *)0 = 1;" if i == CHAIN - 1 else f"void f{i + 1}(void); f{i + 1}();"
        with open(os.path.join(d, f"l{i}.c"), "w") as f:
            f.write(f'void f{i}(void) {{ {body} __asm__ volatile(""); }}\n')
        nxt = [] if i == CHAIN - 1 else [f"-L{d}", f"-lchain{i + 1}"]
        subprocess.run(
            ["gcc", "-O0", "-g0", "-shared", "-fPIC", "-o", f"{d}/libchain{i}.so", f"{d}/l{i}.c", *nxt,
             f"-Wl,-rpath,{d}"], check=True,
        )  # fmt: skip
    with open(os.path.join(d, "main.c"), "w") as f:
        f.write("void f0(void);\nint main(void) { f0(); return 0; }\n")
    exe = os.path.join(d, "chain")
    subprocess.run(
        ["gcc", "-O0", "-g0", "-o", exe, f"{d}/main.c", f"-L{d}", "-lchain0", f"-Wl,-rpath,{d}"], check=True
    )
    return exe


@pytest.fixture(scope="module")
def chain_crash(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real crash through CHAIN libraries in a pod: its core and the store of its binaries."""
    tmp_path = tmp_path_factory.mktemp("chain")
    chain = tmp_path / "chain"
    chain.mkdir()
    root = runc.build_rootfs(str(tmp_path / "root"), {"chain": build_chain(str(chain))})
    with installed_capture() as cap:
        c = cap.crash(root, ["/app/chain"], annotations=SEED)
        [meta] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
        core = os.path.join(spool.ready_dir(cap.spool), meta["id"], spool.CORE_NAME)
        shutil.copy(core, tmp_path / "core.zst")
        shutil.copytree(cap.store, tmp_path / "store")
    return str(tmp_path / "core.zst"), str(tmp_path / "store")


def test_a_crash_through_many_modules_asks_upstream_for_a_few_once(
    chain_crash: tuple[str, str], tmp_path
) -> None:
    core, store = chain_crash
    (tmp_path / "nothing").mkdir()
    asked: list[str] = []
    with http_directory(str(tmp_path / "nothing"), asked) as url:
        up = upstream.Upstream((url,), str(tmp_path / "cache"))
        r = runner.analyze(core, [store], debug_dirs=(), fetch=up)
        assert [f"f{i}" for i in reversed(range(CHAIN))] == frames(r)[:CHAIN]  # from the libraries' .dynsym
        assert len(asked) == upstream.MAX_PER_ANALYSIS < CHAIN  # not one request per module the pod mapped
        runner.analyze(core, [store], debug_dirs=(), fetch=up)
        assert len(asked) == upstream.MAX_PER_ANALYSIS  # misses are remembered: the next crash asks nothing


def test_the_debug_files_kept_stay_within_their_bound(chain_crash: tuple[str, str], tmp_path) -> None:
    """Each of the pod's sixteen libraries claims a build-id the upstream has a file for (here: the
    libraries themselves, which carry their own build-ids): after the analysis the node keeps
    the newest of them within the bound, not all, so a pod whose crashes claim ever other
    build-ids cannot fill the node's disk."""
    core, store = chain_crash
    served = tmp_path / "server"
    sizes = []
    for top, _, names in os.walk(store):
        for name in names:
            bid = binaries.file_build_id(os.path.join(top, name))
            if bid and not (served / "buildid" / bid).exists():
                (served / "buildid" / bid).mkdir(parents=True)
                shutil.copy(os.path.join(top, name), served / "buildid" / bid / "debuginfo")
                sizes.append(os.path.getsize(os.path.join(top, name)))
    asked: list[str] = []
    with http_directory(str(served), asked) as url:
        bound = 3 * max(z for z in sizes if z < 64 << 10)  # three of the libraries (libc's is MiBs)
        up = upstream.Upstream((url,), str(tmp_path / "cache"), cache_max=bound)
        r = runner.analyze(core, [store], debug_dirs=(), fetch=up)
    assert [f"f{i}" for i in reversed(range(CHAIN))] == frames(r)[:CHAIN]
    fetched = [f for f in asked if f.endswith("/debuginfo")]
    assert len(fetched) == upstream.MAX_PER_ANALYSIS  # each one found and verified
    held = [str(p) for p in (tmp_path / "cache" / "buildid").glob("*/*" + upstream.SUFFIX)]
    assert held and sum(map(os.path.getsize, held)) <= bound < upstream.MAX_PER_ANALYSIS * min(sizes)


def test_the_build_ids_asked_for_in_vain_are_forgotten_once_no_fetch_heeds_them(tmp_path) -> None:
    """A pod's objects claim made-up build-ids, sixteen more a crash: each left a directory with
    its miss remembered, for good. Once the miss is older than RETRY_AFTER (no fetch heeds it),
    its directory goes; so does one left empty (its file removed) and untouched that long."""
    up = upstream.Upstream(("http://127.0.0.1:9",), str(tmp_path / "cache"), cache_max=1 << 20)
    long_ago = time.time() - upstream.RETRY_AFTER - 60
    made = {}
    for name, miss, kept, idle in (
        ("a1" * 20, True, False, True),  # asked in vain long ago
        ("b2" * 20, True, False, False),  # asked in vain lately: still heeded
        ("c3" * 20, False, False, True),  # its file removed long ago
        ("d4" * 20, False, False, False),  # being fetched into now
        ("e5" * 20, False, True, True),  # its file kept
    ):
        d = os.path.join(up.cache, "buildid", name)
        os.makedirs(d)
        if kept:
            with open(upstream.debuginfo_path(up.cache, name, "0" * 64), "wb") as f:
                f.write(b"x" * 100)
        if miss:
            open(os.path.join(d, upstream.MISSING), "w").close()
            if idle:
                os.utime(os.path.join(d, upstream.MISSING), (long_ago, long_ago))
        if idle:
            os.utime(d, (long_ago, long_ago))
        made[name] = d
    legacy = os.path.join(
        made["e5" * 20], upstream.LEGACY_NAME
    )  # kept by build-id alone, before content hashes
    with open(legacy, "wb") as f:
        f.write(b"y" * 100)
    assert upstream.make_room(up) == ["e5" * 20 + "/" + upstream.LEGACY_NAME]
    assert sorted(os.listdir(tmp_path / "cache" / "buildid")) == ["b2" * 20, "d4" * 20, "e5" * 20]
    assert os.listdir(made["e5" * 20]) == ["0" * 64 + upstream.SUFFIX]
    assert os.listdir(made["b2" * 20]) == [upstream.MISSING]


class _Dribbling(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every request with a byte now and then, for half a minute."""

    asked: list[str]

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(300):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


def test_upstream_downloads_end_with_the_analysis_s_time(chain_crash: tuple[str, str], tmp_path) -> None:
    """The pod's objects claim the build-ids asked for (here: sixteen modules with frames), and
    each download could take the upstream's own time limit (30 s) after the analysis's: a slow
    answer is given up at the analysis's time, no other is asked for, and the report stands."""
    core, store = chain_crash
    asked: list[str] = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Dribbling,), {"asked": asked}))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        up = upstream.Upstream((f"http://127.0.0.1:{srv.server_address[1]}",), str(tmp_path / "cache"))
        r = runner.analyze(core, [store], debug_dirs=(), fetch=up, timeout=8)
    finally:
        srv.shutdown()
        srv.server_close()
    assert [f"f{i}" for i in reversed(range(CHAIN))] == frames(r)[:CHAIN]
    assert len(asked) == 1, asked  # the first, cut at the analysis's time; not sixteen of 30 s each
    [first] = asked
    assert not os.path.exists(os.path.join(up.cache, "buildid", first.split("/")[2], upstream.MISSING))
