"""One tenant's crash never holds up another's: analysis bounded, apart from shipping, fair, sandboxed.

Tenant A (namespace tenant-a) runs a program that, like two libraries it preloads, is an ELF
file claiming 16 million section headers in a sparse 1 GiB file (built here, a few KiB on
disk each): an ELF library that walks that table spends minutes in it, drgn seconds each. Tenant B (tenant-b) has an
ordinary crash right after. B's crash must be in the catalog while A's analysis still runs,
A's analysis must be stopped at its limit and recorded so, and B's crash explained. (The
vault's directory store keeps A's files' holes as holes: written out, the three GiBs took the
agent 57 s before A's analysis could start.)
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
from corevault.analysis import binaries, runner, sandbox, seccomp, slots, template
from corevault.model import MAX_REPORT_BYTES
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


Probed = tuple[str, int, list[str]]


@pytest.fixture
def host_to_probe(tmp_path: Path) -> Iterator[Probed]:
    """What a worker must not reach, made on the host: a world-readable secret (only the sandbox
    keeps it from the worker) among other files, and a listener on the host's 127.0.0.1. Gives
    the worker's one input (a core), the listener's port and the paths to try."""
    secret = tmp_path / "host-secret"
    secret.write_text("tenant B's database password")
    secret.chmod(0o644)
    core = tmp_path / "core"
    core.write_bytes(b"\x7fELF" + b"\0" * 60)
    core.chmod(0o644)
    targets = [
        str(secret),
        "/etc/shadow",
        "/etc/hostname",
        f"/proc/{os.getpid()}/environ",
        os.path.abspath(__file__),
    ]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield str(core), listener.getsockname()[1], targets


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_the_worker_sees_only_its_inputs_as_an_unprivileged_user(host_to_probe: Probed) -> None:
    core, port, targets = host_to_probe
    fd = seccomp.filter_fd()
    assert fd is not None, "libseccomp is part of every Debian system"
    cmd = sandbox.command(
        [sys.executable, "-c", PROBE, str(port), *targets],
        [sandbox.Bind(core, runner.CORE_IN_SANDBOX)],
        64_900,
        fd,
    )
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True, pass_fds=(fd,))
    finally:
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


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_a_template_child_sees_only_its_inputs_and_holds_nothing(host_to_probe: Probed) -> None:
    """A child of the pre-imported template: the worker's uid on the host (root of a user
    namespace that maps nothing else), no capability in any set, no_new_privs, the seccomp
    filter, its own PID namespace and network, its input and nothing of the host."""
    core, port, targets = host_to_probe
    forked = template.shared(64_900)
    assert forked is not None, "the analysis template does not start on this machine"
    code = (
        PROBE
        + "\nimport json\nprint(json.dumps({'uid_map': open('/proc/self/uid_map').read().split(), 'pids': os.listdir('/proc')}))"
    )
    out, err, status = forked.run(
        code, [str(port), *targets], [sandbox.Bind(core, runner.CORE_IN_SANDBOX)], memory=1 << 30, timeout=60
    )
    assert status == 0, err
    first, second = out.decode().splitlines()
    seen, more = json.loads(first), json.loads(second)
    assert more["uid_map"] == ["0", "64900", "1"] and [p for p in more["pids"] if p.isdigit()] == ["1"]
    assert (seen["uid"], seen["gid"], seen["groups"]) == (0, 0, [])
    caps = ("CapEff", "CapPrm", "CapBnd", "CapAmb")
    assert {seen["status"][k] for k in caps} == {"0" * 16}
    assert seen["status"]["NoNewPrivs"] == "1" and seen["status"]["Seccomp"] == "2"
    assert seen["unshare_user"] == errno.EPERM
    assert seen["input"] == "7f454c46"
    for path in targets:
        assert seen["reads"][path] == "No such file or directory", (path, seen["reads"][path])
    assert seen["net"] in ("Connection refused", "Network is unreachable")


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


#: tenant B's analysis, held running: its core open, a secret in its /tmp and in its memory,
#: a terminal open (as a debugger it starts may)
VICTIM = r"""
import os, time
core = open("/in/core", "rb")
terminal = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
with open("/tmp/b-secret", "w") as f:
    f.write("tenant B's state")
secret = "tenant B's state " * 1000
time.sleep(20)
"""

#: tenant A's analysis taken over by its core: everything it can find of B's, and what it
#: could leave behind for the analyses that share its parent (the template's children)
PROBE_OTHER = r"""
import json, os
host_core, host_pid = sys.argv[1], int(sys.argv[2])
seen = {"processes": {}, "reads": {}, "tmp": sorted(os.listdir("/tmp")), "in": sorted(os.listdir("/in"))}
seen["pts"] = sorted(os.listdir("/dev/pts"))
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
seen["planted"] = {}
for path in ("/etc/ld.so.preload", "/dev/planted", "/planted", "/usr/planted", "/in/planted", "/proc/planted"):
    try:
        with open(path, "w") as f:
            f.write("/tmp/evil.so")
        seen["planted"][path] = "written"
    except OSError as e:
        seen["planted"][path] = e.strerror
print(json.dumps({"error": json.dumps(seen)}))
"""


def _victim_on_host(host_core: str) -> int:
    """The host pid of B's held analysis, whose core's copy is ``host_core``."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if not 64_900 <= os.stat(f"/proc/{pid}").st_uid < 64_900 + slots.DEFAULT_COUNT:
                continue
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/mountinfo") as f:
                mounts = f.read()
        except OSError:
            continue
        # a template's child holds the host's file; a worker of its own, its bind at /in/core
        bound = runner.CORE_IN_SANDBOX in held and os.path.basename(os.path.dirname(host_core)) in mounts
        if host_core in held or bound:
            return int(pid)
    raise LookupError


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
def test_an_analysis_taken_over_sees_nothing_of_another_running_beside_it(
    monkeypatch: pytest.MonkeyPatch, forked: bool
) -> None:
    """Two tenants' real crashes analysed at once, A's worker doing what a core that took it
    over could: B's processes, its core (inside the sandbox and at its host path), its /tmp
    and its memory are out of A's reach, and so is a signal to B's worker; nothing A writes
    outside its own /tmp outlives it. Both ways an analysis runs: a child of the pre-imported
    template, and a bubblewrap worker of its own."""

    if not forked:
        monkeypatch.setattr(template, "shared", lambda uid, processes=0: None)
    elif template.shared(64_900) is None:
        pytest.fail("the analysis template does not start on this machine")
    programs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(runner, "_worker", lambda argv: programs.pop(0))
    copies: list[str] = []
    copy = runner._worker_copy

    def noted(path: str, dest: str, uid: int) -> str:
        copies.append(copy(path, dest, uid))
        return copies[-1]

    monkeypatch.setattr(runner, "_worker_copy", noted)
    errors: dict[str, str] = {}

    def analyse(name: str, exe: str) -> None:
        core, record, store = _fixture_crash(exe)
        try:
            runner.analyze(core, [store], record=record, timeout=30)
        except runner.AnalysisError as e:
            errors[name] = str(e)

    programs.append((VICTIM, []))
    b = threading.Thread(target=analyse, args=("b", "/app/crasher"))
    b.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                host_core = copies[0]  # the core's: the first copy an analysis makes
                host_pid = _victim_on_host(host_core)
                break
            except (LookupError, IndexError):
                assert time.monotonic() < deadline, "tenant B's analysis did not start"
                time.sleep(0.05)
        programs.append((PROBE_OTHER, [host_core, str(host_pid)]))
        analyse("a", "/app/libuser")
    finally:
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(host_pid, signal.SIGKILL)  # end B's wait
        b.join(timeout=60)
    seen = json.loads(errors["a"])
    # /tmp holds nothing but the read-only runtime of a checkout made under /tmp, if it is one
    runtime = sorted({p.split("/")[2] for p in sandbox.runtime_paths() if p.startswith("/tmp/")})
    assert seen["in"] == ["core", "record.json", "store-0"] and seen["tmp"] == runtime
    assert seen["pts"] == ["ptmx"]  # not B's terminal
    # only A's own processes (and in a worker of its own, bwrap's init): nothing of B's
    assert not any("tenant B" in cmdline for cmdline in seen["processes"].values()), seen["processes"]
    assert len(seen["processes"]) <= 1, seen["processes"]
    assert not any(v.startswith("7f454c46") for v in seen["reads"].values() if isinstance(v, str)), seen[
        "reads"
    ]
    assert seen["reads"][host_core] == "No such file or directory"
    assert seen["kill"] == "No such process"
    assert "written" not in seen["planted"].values(), seen["planted"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_a_template_child_is_stopped_at_its_time_and_memory_caps() -> None:
    """Killed with everything it started once its time is up (it spawned a sleeper that
    would outlive it), held to its memory cap; the template goes on forking."""
    forked = template.shared(64_900)
    assert forked is not None, "the analysis template does not start on this machine"
    spawn = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run(spawn, [], [], memory=1 << 30, timeout=1)
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while any(cmdline == b"sleep\0600\0" for cmdline in _cmdlines_of(64_900)):
        assert time.monotonic() < deadline, "the analysis's sleeper outlived it"
        time.sleep(0.1)
    _, err, status = forked.run("b = bytearray(1 << 31)", [], [], memory=256 << 20, timeout=30)
    assert status == 1 and b"MemoryError" in err
    out, _, status = forked.run("print('still forking')", [], [], memory=1 << 30, timeout=30)
    assert (out, status) == (b"still forking\n", 0)


def _cmdlines_of(uid: int) -> list[bytes]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_an_input_the_template_cannot_place_goes_to_a_worker_of_its_own(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A debug directory outside /usr is bound at its own path, which a template's child
    cannot make: that analysis runs in a bubblewrap worker of its own, with the same report."""

    core, record, store = _fixture_crash("/app/crasher")
    alone: list[str] = []
    run_alone = runner._run_alone
    monkeypatch.setattr(
        runner, "_run_alone", lambda code, args, *a, **k: alone.append(code) or run_alone(code, args, *a, **k)
    )
    forked = runner.analyze(core, [store], record=record)
    assert alone == []
    debug = tmp_path / "debug"
    debug.mkdir()
    debug.chmod(0o755)
    tmp_path.chmod(0o755)
    own = runner.analyze(core, [store], record=record, debug_dirs=("/usr/lib/debug", str(debug)))
    assert len(alone) == 1
    assert (own.title, own.signature, own.threads) == (forked.title, forked.signature, forked.threads)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_a_template_is_replaced_after_its_forks_without_ending_a_running_analysis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its children share its memory layout and hash seed: after MAX_FORKS a new template
    serves, and the old one ends once the analysis still running in it is done."""
    monkeypatch.setattr(template, "MAX_FORKS", 2)
    first = template.shared(64_900)
    assert first is not None, "the analysis template does not start on this machine"
    first.forks = 1
    results: list[tuple[bytes, bytes, int]] = []
    slow = threading.Thread(
        target=lambda: results.append(
            first.run("import time; time.sleep(2); print('done')", [], [], memory=1 << 30, timeout=30)
        )
    )
    slow.start()
    deadline = time.monotonic() + 10
    while first.forks < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = template.shared(64_900)
    assert second is not None and second is not first and first.alive()
    slow.join(timeout=30)
    assert results == [(b"done\n", b"", 0)] and not first.alive()
    assert second.run("print(2)", [], [], memory=1 << 30, timeout=30)[::2] == (b"2\n", 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_analyses_at_once_in_one_template_each_get_their_own_crash_and_report() -> None:
    """Eight analyses of two tenants' crashes at once through one template: each report is
    of the crash it was given, none mixed with another's."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import FIXTURE_SPOOL

    assert template.shared(64_900) is not None, "the analysis template does not start on this machine"
    store = os.path.join(FIXTURE_SPOOL, "store")
    crashes = []
    for entry in sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL))):
        meta = spool.read_meta(FIXTURE_SPOOL, entry)
        crashes.append(
            (os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME), meta["modules"])
        )
    alone = [runner.analyze(core, [store], record=record) for core, record in crashes]
    assert alone[0].signature != alone[1].signature
    with ThreadPoolExecutor(8) as pool:
        reports = list(
            pool.map(lambda i: runner.analyze(crashes[i % 2][0], [store], record=crashes[i % 2][1]), range(8))
        )
    for i, report in enumerate(reports):
        assert (report.signature, report.exe, report.threads) == (
            alone[i % 2].signature,
            alone[i % 2].exe,
            alone[i % 2].threads,
        )


def _fixture_crash(exe: str) -> tuple[str, list[dict], str]:
    """The fixture spool's crash of ``exe`` (a real crash in a container): its core, the record
    of its modules, and the store of its binaries."""
    from tests.conftest import FIXTURE_SPOOL

    [entry] = [
        e
        for e in os.listdir(spool.ready_dir(FIXTURE_SPOOL))
        if spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"] == exe
    ]
    core = os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME)
    return core, spool.read_meta(FIXTURE_SPOOL, entry)["modules"], os.path.join(FIXTURE_SPOOL, "store")


#: an analysis taken over by its core, trying to write its inputs: each is the host's file
#: (a template's child holds it open), which an owner could make writable and reopen
WRITER = r"""
import json, os
seen = {}
for top, _, names in os.walk("/in"):
    for path in (os.path.join(top, n) for n in names):
        try:  # through /proc/1/fd/N in a template's child, the bind otherwise
            os.chmod(path, 0o666)
            seen[path] = "chmod"
        except OSError as e:
            seen[path] = e.strerror
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"tenant A was here" * 4096)
            os.close(fd)
            seen[path] += ", written"
        except OSError as e:
            seen[path] += ", " + e.strerror
print(json.dumps({"error": json.dumps(seen)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
def test_an_analysis_taken_over_can_write_none_of_its_inputs(
    monkeypatch: pytest.MonkeyPatch, forked: bool
) -> None:
    """A real crash's analysis doing what a core that took it over could with the files it
    was given (the core's expanded copy, the record's, the store's binaries): neither make
    them writable nor write them, which would write the node's disk past the sandbox's
    capped /tmp. Both ways an analysis runs."""

    if not forked:
        monkeypatch.setattr(template, "shared", lambda uid, processes=0: None)
    elif template.shared(64_900) is None:
        pytest.fail("the analysis template does not start on this machine")
    core, record, store = _fixture_crash("/app/crasher")
    monkeypatch.setattr(runner, "_worker", lambda argv: (WRITER, []))
    copies: list[tuple[str, int]] = []
    copy = runner._worker_copy

    def noted(path: str, dest: str, uid: int) -> str:
        made = copy(path, dest, uid)
        copies.append((made, os.stat(made).st_size))
        return made

    monkeypatch.setattr(runner, "_worker_copy", noted)
    sizes: dict[str, int] = {}
    real_run = runner._run

    def run(*args, **kwargs) -> dict:
        try:
            return real_run(*args, **kwargs)
        finally:  # the copies go with the analysis's directory: their sizes are read now
            sizes.update({p: os.stat(p).st_size for p, _ in copies})

    monkeypatch.setattr(runner, "_run", run)
    with pytest.raises(runner.AnalysisError) as caught:
        runner.analyze(core, [store], record=record, timeout=60)
    seen = json.loads(str(caught.value))
    assert {runner.CORE_IN_SANDBOX, runner.RECORD_IN_SANDBOX} <= set(seen), seen
    for path, outcome in seen.items():
        assert "chmod" not in outcome and "written" not in outcome, (path, outcome)
    assert sizes == {p: size for p, size in copies}  # not a byte more on the host


#: an analysis that waits, under a name the test finds it by, to be killed from outside
OOM_VICTIM = "cv-oom-victim"


def _kill_when_seen(name: str, stop: threading.Event) -> None:
    """SIGKILL, from the host, the process called ``name`` once it shows (as the kernel's
    out-of-memory killer would: from outside the analysis's PID namespace)."""
    while not stop.is_set():
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    os.kill(int(pid), signal.SIGKILL)
                    return
        stop.wait(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
@pytest.mark.parametrize(
    ("code", "said"),
    [
        (
            # PR_SET_NAME (15): /proc is read-only in a template's child
            f"import ctypes, time\nctypes.CDLL(None).prctl(15, {OOM_VICTIM.encode()!r}, 0, 0, 0)\ntime.sleep(60)\n",
            "was killed (SIGKILL)",
        ),
        ("raise MemoryError\n", "ran out of its 512 MiB memory cap"),
        ("pass\n", "gave no report"),
    ],
    ids=["killed", "out-of-memory", "silent"],
)
def test_an_analysis_killed_or_silent_says_so_and_not_that_it_ran_out_of_memory(
    monkeypatch: pytest.MonkeyPatch, forked: bool, code: str, said: str
) -> None:
    """An analysis ended by SIGKILL from outside (the node's out-of-memory killer, or another
    process: its own memory cap makes allocations fail, it kills nothing) says so; one that ran
    out of its cap says that; one that ends saying nothing says that. Both ways an analysis runs."""

    if not forked:
        monkeypatch.setattr(template, "shared", lambda uid, processes=0: None)
    elif template.shared(64_900) is None:
        pytest.fail("the analysis template does not start on this machine")
    core, record, store = _fixture_crash("/app/crasher")
    monkeypatch.setattr(runner, "_worker", lambda argv: (code, []))
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_seen, args=(OOM_VICTIM, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(runner.AnalysisError) as caught:
            runner.analyze(core, [store], record=record, timeout=60, memory=512 << 20)
    finally:
        stop.set()
        killer.join()
    assert said in str(caught.value)
    assert ("memory cap" in str(caught.value)) == ("MemoryError" in code)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_an_analysis_taken_over_cannot_stop_the_template_for_other_tenants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tenant A's analysis, taken over by its core, ends as a child that could not make its
    sandbox does (status 125, nothing on stdout): that fails A's analysis alone. Tenant B's
    next analysis still runs in the template, and A's is not run a second time elsewhere."""

    monkeypatch.setattr(template, "_refused", {})
    monkeypatch.setattr(template, "_templates", {})
    if template.shared(64_900) is None:
        pytest.fail("the analysis template does not start on this machine")
    alone: list[str] = []
    run_alone = runner._run_alone
    monkeypatch.setattr(
        runner, "_run_alone", lambda code, args, *a, **k: alone.append(code) or run_alone(code, args, *a, **k)
    )
    worker = runner._worker
    forged = "import os, sys\nsys.stderr.write('TemplateError: forged\\n')\nsys.stderr.flush()\nos._exit(125)"
    monkeypatch.setattr(runner, "_worker", lambda argv: (forged, []))

    def analyse(exe: str):
        core, record, store = _fixture_crash(exe)
        return runner.analyze(core, [store], record=record, timeout=60)

    with pytest.raises(runner.AnalysisError, match="forged"):
        analyse("/app/libuser")
    assert template._refused == {} and alone == []
    monkeypatch.setattr(runner, "_worker", worker)
    report = analyse("/app/crasher")
    assert report.threads and alone == []  # B's, in a child of the template
    forked = template.shared(64_900)
    assert forked is not None
    # a sandbox that does fail (a request it cannot take) is still told from an analysis's status
    with pytest.raises(template.TemplateError, match="could not make its sandbox"):
        forked.run("print('never')", [], [], memory="no number", timeout=30)  # type: ignore[arg-type]


#: tenant A's analysis taken over by its core: it forks until the worker's uid may start no
#: more processes (its limit here: the template's, lowered by the test), then says so in its name
HOARDER = r"""
import ctypes, os, time
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
ctypes.CDLL(None).prctl(15, b"cv-hoarded", 0, 0, 0)
time.sleep(120)
"""


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid``, by pid: their names."""
    parents: dict[int, tuple[int, str]] = {}
    for p in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            parents[int(p)] = (int(rest[1]), name)
    found: dict[int, str] = {}
    more = [pid]
    while more:
        at = more.pop()
        for child, (parent, name) in parents.items():
            if parent == at and child not in found:
                found[child] = name
                more.append(child)
    return found


def _until(what: str, check) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_an_analysis_that_takes_every_process_ends_no_other_analysis(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant A's analysis, taken over by its core, forks until the worker's uid may start no
    more processes, while tenant C's analysis runs in the same template. Tenant B's crash then
    comes: the template cannot fork for it, and says so (B's analysis runs in a worker of its
    own) instead of ending, with every analysis running in it (C's). The template then serves
    the next analysis."""

    # A uid of this test's own (its count of processes is this test's alone), whose template
    # may run 11 processes: itself, C's keeper and analysis, and eight more. Every analysis
    # here runs as that uid, as all did before each got a uid of its own (tests/test_analysis_slots.py):
    # what is tested is the template's answer when it cannot fork.
    uid = 64_990
    forked = template.Template(uid, processes=11)
    monkeypatch.setattr(slots, "held", lambda base, count, deadline: contextlib.nullcontext(uid))
    monkeypatch.setattr(template, "_templates", {uid: forked})
    monkeypatch.setattr(template, "_refused", {})
    worker = runner._worker
    monkeypatch.setattr(
        runner,
        "_worker",
        lambda argv: (HOARDER, []) if threading.current_thread().name == "a" else worker(argv),
    )
    alone: list[str] = []
    run_alone = runner._run_alone
    monkeypatch.setattr(
        runner, "_run_alone", lambda code, args, *a, **k: alone.append(code) or run_alone(code, args, *a, **k)
    )
    results: dict[str, object] = {}

    def analyse(name: str, exe: str) -> None:
        core, record, store = _fixture_crash(exe)
        try:
            results[name] = runner.analyze(core, [store], record=record, timeout=60, uid=uid)
        except runner.AnalysisError as e:
            results[name] = e

    # C's analysis runs until the test writes to its input (a pipe)
    go = str(tmp_path / "go")
    os.mkfifo(go, 0o644)
    tmp_path.chmod(0o755)
    writer = os.open(go, os.O_RDWR)

    def victim() -> None:
        code = "print('C read', open('/in/go').read(1))"
        results["c"] = forked.run(code, [], [sandbox.Bind(go, "/in/go")], memory=1 << 30, timeout=60)

    c = threading.Thread(target=victim)
    a = threading.Thread(target=analyse, args=("a", "/app/libuser"), name="a")
    try:
        c.start()
        _until("C's analysis did not start", lambda: len(_descendants(forked._proc.pid)) >= 4)
        a.start()
        _until(
            "A did not take every process", lambda: "cv-hoarded" in _descendants(forked._proc.pid).values()
        )
        analyse("b", "/app/crasher")
        assert not isinstance(results["b"], Exception) and results["b"].threads, results["b"]
        assert alone == [worker([])[0]]  # B's: the template could not fork, and said so
        assert forked.alive()
    finally:
        for pid, name in _descendants(forked._proc.pid).items():
            if name == "cv-hoarded":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # A's analysis, its PID namespace with it
        os.write(writer, b"!")
        a.join(timeout=60)
        c.join(timeout=60)
        os.close(writer)
    try:
        assert results["c"] == (b"C read !\n", b"", 0)  # C's analysis went on to its end
        assert isinstance(results["a"], runner.AnalysisError)
        _until(
            "A's processes outlived it", lambda: "cv-hoarded" not in _descendants(forked._proc.pid).values()
        )
        out, _, status = forked.run("print('still forking')", [], [], memory=1 << 30, timeout=30)
        assert (out, status) == (b"still forking\n", 0)
    finally:
        forked.close()


#: an analysis taken over by its core: it closes its output and runs on, as if it had ended
LINGERER = r"""
import ctypes, os, time
ctypes.CDLL(None).prctl(15, b"cv-lingerer", 0, 0, 0)
os.close(1)
os.close(2)
time.sleep(600)
"""


def _named(name: str) -> list[int]:
    found = []
    for p in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/comm").read_text().strip() == name:
                found.append(int(p))
    return found


#: an analysis taken over by its core: it writes without end on its output
FLOODER = r"""
import ctypes, os
ctypes.CDLL(None).prctl(15, b"cv-writer", 0, 0, 0)
while True:
    os.write(1, bytes(1 << 20))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
@pytest.mark.parametrize(
    ("program", "name", "error", "timeout"),
    [
        (LINGERER, "cv-lingerer", runner.STOPPED, 3),
        (FLOODER, "cv-writer", f"analysis wrote more than {MAX_REPORT_BYTES >> 20} MiB and was stopped", 60),
    ],
    ids=["closes-its-output-and-runs-on", "writes-without-end"],
)
def test_an_analysis_taken_over_is_stopped_at_its_bounds(  # noqa: PLR0917
    monkeypatch: pytest.MonkeyPatch, forked: bool, program: str, name: str, error: str, timeout: float
) -> None:
    """A real crash's analysis, taken over, closes its output as if it had ended and runs on, or
    writes without end on its output (which the agent, every tenant's, holds in memory): it is
    stopped at its time or once past its bound (the most a report may weigh), recorded so, and
    not left running (with its memory and CPU, for every crash that does the same) after the
    agent has moved on."""
    if not forked:
        monkeypatch.setattr(template, "shared", lambda uid, processes=0: None)
    elif template.shared(64_900) is None:
        pytest.fail("the analysis template does not start on this machine")
    core, record, store = _fixture_crash("/app/crasher")
    monkeypatch.setattr(runner, "_worker", lambda argv: (program, []))
    try:
        with pytest.raises(runner.AnalysisError, match=error):
            runner.analyze(core, [store], record=record, timeout=timeout)
        _until("the analysis ran on past its bounds", lambda: _named(name) == [])
    finally:
        for pid in _named(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the worker's own uid needs root")
def test_an_analysis_taken_over_cannot_signal_its_process_group(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant A's analysis, taken over by its core, sends SIGKILL to its process group
    (``kill(0, …)``, which the kernel delivers across PID namespaces to processes of the same
    uid) while tenant C's analysis runs in the same template: C's goes on to its end, and the
    template serves the next one."""
    monkeypatch.setattr(template, "_templates", {})
    monkeypatch.setattr(template, "_refused", {})
    forked = template.shared(64_900)
    if forked is None:
        pytest.fail("the analysis template does not start on this machine")

    go = str(tmp_path / "go")
    os.mkfifo(go, 0o644)
    tmp_path.chmod(0o755)
    writer = os.open(go, os.O_RDWR)
    results: dict[str, object] = {}

    def victim() -> None:
        code = "print('C read', open('/in/go').read(1))"
        results["c"] = forked.run(code, [], [sandbox.Bind(go, "/in/go")], memory=1 << 30, timeout=60)

    c = threading.Thread(target=victim)
    try:
        c.start()
        _until("C's analysis did not start", lambda: len(_descendants(forked._proc.pid)) >= 4)
        core, record, store = _fixture_crash("/app/libuser")
        killer = 'import os, signal\nos.kill(0, signal.SIGKILL)\nprint(\'{"error": "sent"}\')'
        monkeypatch.setattr(runner, "_worker", lambda argv: (killer, []))
        with pytest.raises(runner.AnalysisError, match="sent"):
            runner.analyze(core, [store], record=record, timeout=60)
        os.write(writer, b"!")
        c.join(timeout=60)
        assert results["c"] == (b"C read !\n", b"", 0)  # C's analysis went on to its end
        assert forked.alive()
        out, _, status = forked.run("print('still forking')", [], [], memory=1 << 30, timeout=30)
        assert (out, status) == (b"still forking\n", 0)
    finally:
        with contextlib.suppress(OSError):
            os.write(writer, b"!")
        c.join(timeout=60)
        os.close(writer)
        forked.close()
