"""Fixtures: a real capture installation on this host, real containers, the crash corpus,
and the checked-in spool entries shipped into vaults of their own.

Tests marked ``crash`` set the host's core_pattern. They hold a host-wide lock while they
do (so two test runs never interleave) and the previous core_pattern, core_pipe_limit and
suid_dumpable are written back when they end, also when they fail.

Tests marked ``servers`` start a server process, a browser or kubectl (see the marker in
pyproject.toml). A fixture that starts one says so with :func:`starts_servers`, and every
test that uses it, directly or through another fixture, gets the marker; a test that
starts one itself carries the marker. A test without it that calls one of testbed's server
starters (:data:`SERVER_STARTERS`) fails. The quick loop, ``-m "not crash and not servers"``,
leaves both out.

The others need neither root nor a crash: the catalog, server and command-line tests read
``fixture_vault``, real crashes that ``tests/fixtures/spool`` keeps (see its README). One
vault serves them all, so none may change it (checked after each test that uses it); a
test that removes or changes something takes ``fixture_vault_copy``, a copy of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
import sqlalchemy

from corevault import spool
from corevault.agent.loop import Agent
from corevault.vault import catalog, migrations
from testbed import build, clouds, debuginfod, runc, servers, sysctl
from testbed.capture import HANDLER, Capture, installed_capture  # noqa: F401 - tests import them from here
from tests.nodes import Node, make_node

FIXTURE_SPOOL = os.path.join(os.path.dirname(__file__), "fixtures", "spool")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        # Another user can neither see whether the handler exists (it may sit in a root-only
        # directory of a test session running now) nor change core_pattern: only root repairs.
        return
    removed = sysctl.repair_dangling_pattern()
    if removed:
        print(f"\nwarning: core_pattern pointed at a missing handler ({removed}); reset it to 'core'")


F = TypeVar("F", bound=Callable[..., object])


def starts_servers(fixture: F) -> F:
    """Put under ``@pytest.fixture``: this fixture starts a server process, a browser or kubectl."""
    fixture.starts_servers = True  # type: ignore[attr-defined]
    return fixture


# What starts a server process in testbed; a test not marked ``servers`` that calls one fails.
SERVER_STARTERS = ((servers, "seaweed"), (servers, "postgres"), (clouds, "azurite"), (clouds, "fake_gcs"),
                   (debuginfod, "serve"))  # fmt: skip


@pytest.fixture(autouse=True)
def _servers_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the ``servers`` marker true: the quick loop must not start one unannounced."""
    if request.node.get_closest_marker("servers") is not None:
        return
    for module, name in SERVER_STARTERS:

        def refuse(*_: object, _what: str = f"{module.__name__}.{name}", **__: object) -> None:
            raise AssertionError(
                f"{_what} starts a server: mark the test servers, or its fixture @starts_servers"
            )

        monkeypatch.setattr(module, name, refuse)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The marker follows the fixtures a test really gets (its closure, as overridden where it
    # runs), so a fixture of the same name elsewhere that starts nothing marks nothing.
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in item.fixturenames:
            defs = info.name2fixturedefs.get(name)
            if defs and getattr(defs[-1].func, "starts_servers", False):
                item.add_marker(pytest.mark.servers)
                break


@pytest.fixture(scope="module")
@starts_servers
def postgres() -> Iterator[servers.Postgres]:
    """PostgreSQL on 127.0.0.1, one for the tests of a module (each test takes a database of its own)."""
    with servers.postgres() as pg:
        yield pg


_catalogs = itertools.count(1)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.servers)])
def new_catalog(request: pytest.FixtureRequest, tmp_path) -> Callable[[str], str]:
    """Makes a new empty catalog by name, of each kind in turn (SQLite, then a database of the
    module's PostgreSQL); returns its URL."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path}/{name}.db"
    pg: servers.Postgres = request.getfixturevalue("postgres")
    return lambda name: pg.database(f"{name}_{next(_catalogs)}")


@pytest.fixture
def catalog_url(new_catalog: Callable[[str], str]) -> str:
    """The URL of a new empty catalog, SQLite and then PostgreSQL."""
    return new_catalog("catalog")


@pytest.fixture
def engine(catalog_url: str) -> Iterator[sqlalchemy.Engine]:
    """A new catalog, SQLite and then PostgreSQL, connected (its schema made)."""
    connected = catalog.connect(catalog_url)
    yield connected
    connected.dispose()


def catalog_at(url: str, version: int) -> sqlalchemy.Engine:
    """The catalog at ``url`` made at schema ``version``, as a server of that version made it."""
    engine = sqlalchemy.create_engine(url)
    real = migrations.MIGRATIONS
    migrations.MIGRATIONS = real[:version]
    try:
        assert migrations.migrate(engine) == version
    finally:
        migrations.MIGRATIONS = real
    return engine


@pytest.fixture(scope="module")
@starts_servers
def gcs() -> Iterator[clouds.FakeGcs]:
    """fake-gcs-server on 127.0.0.1, one for the tests of a module."""
    with clouds.fake_gcs() as server:
        yield server


@pytest.fixture(scope="session")
def programs() -> dict[str, str]:
    return build.build_all()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory of a short path under /tmp (a core_pattern holds 127 bytes, a socket's path
    107: the test's own tmp_path is too long for either), removed after the test, failed or not."""
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs(programs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    return runc.build_rootfs(str(tmp_path_factory.mktemp("rootfs") / "root"), programs)


@pytest.fixture
def screenshots(tmp_path) -> str:
    """Where a browser test leaves its screenshots: ``$COREVAULT_SCREENSHOTS``, else the
    checkout's ``build/screenshots`` when this user may write there, else the test's own
    temporary directory (a read-only checkout, another user's)."""
    chosen = os.environ.get("COREVAULT_SCREENSHOTS") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "screenshots"
    )
    try:
        os.makedirs(chosen, exist_ok=True)
    except OSError:
        return str(tmp_path)
    return chosen if os.access(chosen, os.W_OK) else str(tmp_path)


@pytest.fixture
def capture() -> Iterator[Capture]:
    with installed_capture() as cap:
        yield cap


def gdb_backtrace(exe: str, core: str, sysroot: str) -> str:
    out = subprocess.run(
        [
            "gdb", "-batch", "-nx", "-iex", "set auto-load off", "-iex", f"set sysroot {sysroot}",
            "-ex", "bt", exe, core,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout


def kernel_args(pid: int, *, signal: int = 11, exe: str = "/usr/bin/sleep", pidfd_fd: int = 3) -> list[str]:
    """The arguments the kernel would pass for a crash of ``pid`` (all specifiers, in order)."""
    comm = os.path.basename(exe)[:15]
    values = {
        "P": str(pid), "p": str(pid), "i": str(pid), "I": str(pid), "s": str(signal), "t": str(int(time.time())),
        "d": "1", "u": "0", "g": "0", "c": str((1 << 64) - 1), "C": "0", "h": os.uname().nodename,
        "e": comm, "f": os.path.basename(exe), "E": exe.replace("/", "!"), "F": str(pidfd_fd),
    }  # fmt: skip
    from corevault.pattern import SPECIFIERS

    return [values[s] for s in SPECIFIERS]


def run_handler(
    cap: Capture, args: list[str], stdin: int | bytes, pidfd: int | None, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Start the handler as the kernel does: the core on fd 0, the pidfd open (its number in %F), cwd /."""
    return subprocess.run(
        [cap.handler, "-c", cap.snapshot, *args],
        input=stdin if isinstance(stdin, bytes) else None,
        stdin=stdin if isinstance(stdin, int) else None,
        capture_output=True,
        cwd="/",
        pass_fds=(pidfd,) if pidfd is not None else (),
        timeout=timeout,
        check=False,
    )


@dataclass
class FixtureVault:
    """The checked-in crashes in a vault of their own, shipped, analysed and grouped by the agent.

    ``ids`` names four crashes made of the fixture's two entries, with pods of two namespaces:
    ``a`` (crasher's SIGFPE in pod a/web-a-1), ``b`` (the same crash in b/web-b-1: one group
    with ``a``), ``b-lib`` (libuser's SIGSEGV in libcrashy.so, in b/parser-b-1) and ``host``
    (the SIGFPE again, of no pod: for readers of every namespace only), newest last, all
    within the last hour. ``build_ids`` maps each stored object's file name to its build-id.
    """

    node: Node
    ids: dict[str, str]
    build_ids: dict[str, str]


def _pod(ns: str, name: str, container: str, image: str) -> dict:
    return {"namespace": ns, "name": name, "uid": f"uid-{name}", "container": container, "image": image,
            "container_id": hashlib.sha256(name.encode()).hexdigest()}  # fmt: skip


# name: (the fixture entry's executable, its pod or None, seconds before the vault was made)
FIXTURE_CRASHES = {
    "a": ("/app/crasher", _pod("a", "web-a-1", "web", "registry.example/web:1"), 2400),
    "b": ("/app/crasher", _pod("b", "web-b-1", "web", "registry.example/web:1"), 1800),
    "b-lib": ("/app/libuser", _pod("b", "parser-b-1", "parser", "registry.example/parser:2"), 1200),
    "host": ("/app/crasher", None, 600),
}


def ship_fixture() -> FixtureVault:
    """A new node whose spool held the fixture's crashes as :data:`FIXTURE_CRASHES` labels them, after one agent pass."""
    entries = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))
    by_exe = {spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"]: e for e in entries}
    node = make_node({"dir": FIXTURE_SPOOL, "ids": []})
    ready = spool.ready_dir(node.spool)
    now = int(time.time())
    ids, build_ids = {}, {}
    for pid, (name, (exe, pod, ago)) in enumerate(FIXTURE_CRASHES.items(), start=1):
        meta = spool.read_meta(FIXTURE_SPOOL, by_exe[exe])
        new = spool.new_id(now - ago, pid)
        shutil.copytree(os.path.join(spool.ready_dir(FIXTURE_SPOOL), by_exe[exe]), os.path.join(ready, new))
        meta |= {"id": new, "pod": pod or {}, "time": now - ago, "captured_at": now - ago + 0.5}
        with open(os.path.join(ready, new, spool.META_NAME), "w") as f:
            json.dump(meta, f)
        ids[name] = new
        build_ids |= {os.path.basename(m["path"]): m["build_id"] for m in meta["modules"]}
    assert Agent(node.settings).run(once=True) == 0
    assert sorted(c["id"] for c in node.crashes()) == sorted(ids.values())
    return FixtureVault(node, ids, build_ids)


def _vault_state(v: FixtureVault) -> tuple:
    """What a test must leave as it found it: the catalog's crashes and groups, and the vault's files."""
    with v.node.vault().engine.connect() as conn:
        crashes = sorted(
            json.dumps(c, sort_keys=True, default=str) for c in catalog.list_crashes(conn, limit=1000)
        )
        groups = sorted(json.dumps(g, sort_keys=True, default=str) for g in catalog.list_groups(conn, 1000))
    files = sorted(
        (os.path.relpath(os.path.join(root, f), v.node.dir), os.path.getsize(os.path.join(root, f)))
        for root, _, names in os.walk(v.node.settings.vault_store.removeprefix("file://"))
        for f in names
    )
    return crashes, groups, files


@pytest.fixture(scope="session")
def fixture_vault() -> Iterator[FixtureVault]:
    v = ship_fixture()
    yield v
    shutil.rmtree(v.node.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fixture_vault_is_left_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    if "fixture_vault" not in request.fixturenames:
        yield
        return
    v = request.getfixturevalue("fixture_vault")
    before = _vault_state(v)
    yield
    assert _vault_state(v) == before, "this test changed the shared fixture_vault: take fixture_vault_copy"


@pytest.fixture
def fixture_vault_copy(fixture_vault: FixtureVault) -> Iterator[FixtureVault]:
    """A vault of this test's own, as ``fixture_vault`` is (copied, not shipped again)."""
    node = fixture_vault.node.copy()
    yield FixtureVault(node, dict(fixture_vault.ids), dict(fixture_vault.build_ids))
    shutil.rmtree(node.dir, ignore_errors=True)


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts of every ``os.sendfile`` in this process (asyncio's zero-copy send uses it)."""
    calls: list[int] = []
    real = os.sendfile

    def counted(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        calls.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counted)
    return calls
