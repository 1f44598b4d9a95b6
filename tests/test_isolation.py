"""One tenant's crash never holds up another's: analysis bounded, apart from shipping, fair, sandboxed.

Tenant A (namespace tenant-a) runs a program that, like two libraries it preloads, is an ELF
file claiming 16 million section headers in a sparse 1 GiB file (built here, a few KiB on
disk each): an ELF library that walks that table spends minutes in it, drgn seconds each. Tenant B (tenant-b) has an
ordinary crash right after. B's crash must be in the catalog while A's analysis still runs,
A's analysis must be stopped at its limit and recorded so, and B's crash explained.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevault import config, elf, spool
from corevault.agent.analyses import FairQueue
from corevault.agent.loop import Agent
from corevault.analysis import binaries, runner, sandbox, seccomp
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault
from testbed import hostile
from tests.conftest import Capture, installed_capture

LIMIT = 5.0  # the hostile analysis needs about 10 s (drgn on A's three files), the ordinary one 1 s


def build_id_of(path: str) -> str:
    bid = binaries.file_build_id(path)
    assert bid is not None
    return bid


def test_section_names_are_read_within_a_bound(programs: dict[str, str], tmp_path) -> None:
    evil = hostile.section_bomb(programs["crasher"], str(tmp_path / "evil"))
    assert os.stat(evil).st_size > 1 << 30 and os.stat(evil).st_blocks * 512 < 1 << 20  # sparse
    read = lambda offset, size: os.pread(fd, size, offset)  # noqa: E731
    fd = os.open(evil, os.O_RDONLY)
    try:
        assert elf.section_names(read) is None  # more sections than anything real: not read at all
    finally:
        os.close(fd)
    assert not binaries.has_dwarf(evil)
    assert binaries.has_dwarf(programs["crasher"])  # the ordinary program still says it has DWARF


def test_fair_queue_takes_turns_by_namespace_then_pod() -> None:
    q = FairQueue()
    for i in range(5):
        q.put("tenant-a", "loop", f"a{i}")
    q.put("tenant-a", "other", "a-other")
    q.put("tenant-b", "web", "b0")
    first = q.take()
    assert first == ("tenant-a", "a0")
    # A has an analysis in flight: B goes next, then A's other pod before A's loop again
    assert q.take() == ("tenant-b", "b0")
    assert q.take() == ("tenant-a", "a-other")
    assert q.take() == ("tenant-a", "a1")
    q.put("tenant-b", "web", "b1")
    q.done("tenant-b")
    assert q.take() == ("tenant-b", "b1")  # a newcomer never waits behind A's whole queue


def pod(namespace: str, name: str, pattern: str, **more: str) -> dict[str, str]:
    """A pod's annotations as a CRI runtime passes them to runc."""
    return {
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": name,
        "corevault.io/core-pattern": pattern,
        **more,
    }


@pytest.fixture
def two_tenants(rootfs: str, programs: dict[str, str]) -> Iterator[tuple[Capture, str, str]]:
    """A's hostile crash, then B's ordinary one, both in the spool; their entry ids."""
    with installed_capture() as cap:
        argv = hostile.section_bomb_crash(programs["crasher"], programs["libcrashy.so"], cap.volume)
        hostile_pod = pod("tenant-a", "a", "/data/dump-a/core-%p", **{"corevault.io/targets": "vault"})
        a = cap.crash(rootfs, argv, annotations=hostile_pod)
        time.sleep(1.1)  # entry ids sort by the second: A's is shipped first, its analysis starts first
        b = cap.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b", "/data/dump-a/b-%p"))
        ids = {m["pod"]["container_id"]: m["id"] for m in cap.entries()}
        assert spool.entries(cap.spool) == [ids[a.id], ids[b.id]]
        [a_meta] = [m for m in cap.entries() if m["id"] == ids[a.id]]
        for name in ("evil", "evil1.so", "evil2.so"):
            [m] = [m for m in a_meta["modules"] if os.path.basename(m["path"]) == name]
            assert m["key"] == build_id_of(os.path.join(cap.volume, name))
            held = os.path.join(cap.store, "buildid", m["key"], m["sha256"])
            assert os.path.getsize(held) > 1 << 30
        yield cap, ids[a.id], ids[b.id]


def crash_rows(settings: config.Settings) -> dict[str, dict]:
    with LocalVault(settings).engine.connect() as conn:
        return {r["id"]: r for r in catalog.list_crashes(conn, limit=100)}


@pytest.mark.crash
def test_hostile_elf_delays_neither_shipping_nor_other_tenants(two_tenants: tuple[Capture, str, str]) -> None:
    cap, a, b = two_tenants
    assert [spool.read_meta(cap.spool, e)["pod"]["namespace"] for e in (a, b)] == ["tenant-a", "tenant-b"]
    with open(cap.config, "a") as f:
        f.write(
            f'[agent]\npoll_interval = 0.2\nmetrics = ""\nanalysis_timeout = {LIMIT}\nanalysis_workers = 1\n'
            # at the default 4 GiB heap cap drgn gives up on each of A's files within a second;
            # at 8 GiB after about 3 s each: the time limit is what stops the analysis then
            'analysis_memory = "8G"\n'
        )
    settings = config.load(cap.config)
    agent = Agent(settings)
    runner_thread = threading.Thread(target=agent.run)
    started = time.monotonic()
    runner_thread.start()
    try:
        rows: dict[str, dict] = {}
        while b not in rows and time.monotonic() - started < 60:
            time.sleep(0.1)
            rows = crash_rows(settings)
        # B is in the catalog while A's analysis is still running, not after it
        assert b in rows, "tenant B's crash did not reach the catalog within 60 s"
        assert rows[a]["analysis"] == "pending", rows[a]
        while rows[b]["analysis"] == "pending" or rows[a]["analysis"] == "pending":
            assert time.monotonic() - started < 120, (rows[a], rows[b])
            time.sleep(0.2)
            rows = crash_rows(settings)
    finally:
        agent.stop.set()
        runner_thread.join(timeout=60)
    with LocalVault(settings).engine.connect() as conn:
        stopped = catalog.get_crash(conn, a)
    assert stopped is not None and stopped["analysis"] == "failed"
    assert stopped["analysis_error"] == f"{runner.STOPPED} {LIMIT:g}s and was stopped"
    assert rows[b]["analysis"] == "done" and rows[b]["title"] == "SIGSEGV in crash_here ← main"
    assert spool.entries(cap.spool) == [] and spool.entries(cap.spool, "shipped") == []


PROBE = r"""
import ctypes, json, os, socket, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
out["status"] = {k: v.strip() for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
                 if k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
libc = ctypes.CDLL(None, use_errno=True)
# in a user namespace of its own the worker would hold capabilities again: the filter refuses it
out["unshare_user"] = ctypes.get_errno() if libc.unshare(0x10000000) else 0
out["input"] = open("/in/core", "rb").read(4).hex()
out["reads"] = {}
for path in sys.argv[2:]:
    try:
        with open(path, "rb") as f:
            out["reads"][path] = f.read(64).hex()
    except OSError as e:
        out["reads"][path] = e.strerror
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    out["net"] = "connected"
except OSError as e:
    out["net"] = e.strerror
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_the_worker_sees_only_its_inputs_as_an_unprivileged_user(tmp_path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("tenant B's database password")
    secret.chmod(0o644)  # world-readable on the host: only the sandbox keeps it from the worker
    core = tmp_path / "core"
    core.write_bytes(b"\x7fELF" + b"\0" * 60)
    core.chmod(0o644)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    targets = [
        str(secret),
        "/etc/shadow",
        "/etc/hostname",
        f"/proc/{os.getpid()}/environ",
        os.path.abspath(__file__),
    ]
    fd = seccomp.filter_fd()
    assert fd is not None, "libseccomp is part of every Debian system"
    cmd = sandbox.command(
        [sys.executable, "-c", PROBE, str(port), *targets],
        [sandbox.Bind(str(core), runner.CORE_IN_SANDBOX)],
        64_900,
        fd,
    )
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True, pass_fds=(fd,))
    finally:
        listener.close()
        os.close(fd)
    seen = json.loads(out.stdout)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (64_900, 64_900, [])
    assert seen["status"]["CapEff"] == seen["status"]["CapBnd"] == seen["status"]["CapAmb"] == "0" * 16
    assert seen["status"]["NoNewPrivs"] == "1" and seen["status"]["Seccomp"] == "2"
    assert seen["unshare_user"] == errno.EPERM
    assert seen["input"] == "7f454c46"  # its input is there
    for path in targets:
        assert seen["reads"][path] == "No such file or directory", (path, seen["reads"][path])
    assert seen["net"] in ("Connection refused", "Network is unreachable")  # not the host's 127.0.0.1


def test_an_unprivileged_uid_is_required_of_the_settings(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[agent]\nanalysis_uid = 0\n")
    with pytest.raises(config.ConfigError, match="never runs as root"):
        config.load(str(cfg))


def test_missing_sandbox_tools_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxError, match="apt-get install bubblewrap"):
        sandbox.command(["true"], [])


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_the_worker_interpreter_starts_isolated_without_site_or_bytecode_writes() -> None:
    """No ``.pth`` file, environment variable or current directory shapes what the worker
    imports, and it writes no bytecode; corevault still comes from the parent's installation."""
    import corevault

    code = (
        "import json, corevault; print(json.dumps([sys.flags.isolated, sys.flags.no_site,"
        " sys.flags.dont_write_bytecode, 'site' in sys.modules, corevault.__file__]))"
    )
    fd = seccomp.filter_fd()
    try:
        cmd = sandbox.command(sandbox.python(code), [], 64_900, fd)
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, check=True, pass_fds=(fd,) if fd else ()
        )
    finally:
        if fd is not None:
            os.close(fd)
    assert json.loads(out.stdout) == [1, 1, 1, False, corevault.__file__]


#: tenant B's analysis, held running: its core open, a secret in its /tmp and in its memory
VICTIM = r"""
import os, time
core = open("/in/core", "rb")
with open("/tmp/b-secret", "w") as f:
    f.write("tenant B's state")
secret = "tenant B's state " * 1000
time.sleep(20)
"""

#: tenant A's analysis taken over by its core: everything it can find of B's
PROBE_OTHER = r"""
import json, os
host_core, host_pid = sys.argv[1], int(sys.argv[2])
seen = {"processes": {}, "reads": {}, "tmp": sorted(os.listdir("/tmp")), "in": sorted(os.listdir("/in"))}
for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    try:
        seen["processes"][pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError as e:
        seen["processes"][pid] = e.strerror
    for what in ("root/in/core", "root/tmp/b-secret", "fd/3", "mem"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                seen["reads"][f"{pid}/{what}"] = f.read(4).hex()
        except OSError as e:
            seen["reads"][f"{pid}/{what}"] = e.strerror
for path in (host_core, os.path.dirname(host_core)):
    try:
        seen["reads"][path] = open(path, "rb").read(4).hex() if path == host_core else os.listdir(path)
    except OSError as e:
        seen["reads"][path] = e.strerror
try:
    os.kill(host_pid, 0)
    seen["kill"] = "delivered"
except OSError as e:
    seen["kill"] = e.strerror
print(json.dumps({"error": json.dumps(seen)}))
"""


def _victims() -> list[tuple[int, list[bytes]]]:
    """Host pids and argv of B's held analysis: its bwrap and its interpreter."""
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"tenant B's state" in a for a in argv):
            out.append((int(pid), argv))
    return out


def _victim_on_host() -> tuple[int, str]:
    """The host pid of B's held analysis (its interpreter, once running) and the host path
    of the core copy bound into its sandbox."""
    running = [pid for pid, argv in _victims() if os.path.basename(argv[0]) != b"bwrap"]
    sandboxes = [argv for _, argv in _victims() if os.path.basename(argv[0]) == b"bwrap"]
    if not running or not sandboxes:
        raise LookupError
    argv = sandboxes[0]
    return running[0], argv[argv.index(runner.CORE_IN_SANDBOX.encode()) - 1].decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_an_analysis_taken_over_sees_nothing_of_another_running_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two tenants' real crashes analysed at once, A's worker doing what a core that took it
    over could: B's processes, its core (inside the sandbox and at its host path), its /tmp
    and its memory are out of A's reach, and so is a signal to B's worker."""
    from tests.conftest import FIXTURE_SPOOL

    by_exe = {
        spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"]: e
        for e in os.listdir(spool.ready_dir(FIXTURE_SPOOL))
    }
    store = os.path.join(FIXTURE_SPOOL, "store")

    def core_of(exe: str) -> tuple[str, list[dict]]:
        entry = by_exe[exe]
        return os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME), spool.read_meta(
            FIXTURE_SPOOL, entry
        )["modules"]

    programs: list[list[str]] = []
    real = sandbox.python_main
    monkeypatch.setattr(
        sandbox, "python_main", lambda module, argv: programs.pop(0) if programs else real(module, argv)
    )
    errors: dict[str, str] = {}

    def analyse(name: str, exe: str) -> None:
        core, record = core_of(exe)
        try:
            runner.analyze(core, [store], record=record, timeout=60)
        except runner.AnalysisError as e:
            errors[name] = str(e)

    programs.append(sandbox.python(VICTIM))
    b = threading.Thread(target=analyse, args=("b", "/app/crasher"))
    b.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                host_pid, host_core = _victim_on_host()
                break
            except LookupError:
                assert time.monotonic() < deadline, "tenant B's analysis did not start"
                time.sleep(0.05)
        programs.append(sandbox.python(PROBE_OTHER, [host_core, str(host_pid)]))
        analyse("a", "/app/libuser")
    finally:
        for pid, _ in _victims():  # end B's wait (its bwrap ends with its interpreter)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        b.join(timeout=60)
    seen = json.loads(errors["a"])
    assert seen["in"] == ["core", "record.json", "store-0"] and seen["tmp"] == []
    # A's own interpreter (and bwrap's init) only: nothing of B's
    assert not any("tenant B" in cmdline for cmdline in seen["processes"].values()), seen["processes"]
    assert len(seen["processes"]) <= 3, seen["processes"]
    assert not any(v.startswith("7f454c46") for v in seen["reads"].values() if isinstance(v, str)), seen[
        "reads"
    ]
    assert seen["reads"][host_core] == "No such file or directory"
    assert seen["kill"] == "No such process"
