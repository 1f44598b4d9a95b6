"""One tenant's analysis, taken over and forking without end, starves no other's of processes.

Each analysis running at once holds a uid of its own with ``RLIMIT_NPROC`` set before the
drop (:mod:`corevault.analysis.slots`): a fork bomb fills its own uid's count and nobody
else's. The test runs under a pids cgroup of its own as a safety net, far above the bound
under test, so that the machine keeps its processes even when the bound is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from corevault import config, spool
from corevault.agent.analyses import worker_count
from corevault.analysis import runner, slots, template
from corevault.model import Report

#: a uid range of this test's own: its counts are this test's alone
BASE = 64_950
#: the bound under test, per analysis (the default is 256; lower here to keep the bomb light)
PROCESSES = 32
#: the safety net: every process this test starts, the pytest process's threads included
NET = PROCESSES + 200
#: tenant A's analysis, taken over by its core: every process it has forks as fast as it
#: can, without end (a failed fork is retried after 5 ms, so any process freed is taken)
BOMB = r"""
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.005)
"""


@contextlib.contextmanager
def pids_net(limit: int) -> Iterator[None]:
    """This process and all it starts in a cgroup v1 pids hierarchy of their own, capped at
    ``limit``; everything left in it killed at the end."""
    root = "/sys/fs/cgroup/pids"
    if not os.path.exists(os.path.join(root, "cgroup.procs")):
        pytest.fail("no pids cgroup to hold the fork bomb in: this test needs cgroup v1's pids hierarchy")
    net = os.path.join(root, f"corevault-test-{os.getpid()}")
    os.mkdir(net)
    try:
        with open(os.path.join(net, "pids.max"), "w") as f:
            f.write(str(limit))
        with open(os.path.join(net, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        try:
            yield
        finally:
            with open(os.path.join(root, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    finally:
        deadline = time.monotonic() + 30
        while True:
            with open(os.path.join(net, "cgroup.procs")) as f:
                left = [int(p) for p in f.read().split()]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(net)
                break
            except OSError:
                assert time.monotonic() < deadline, f"processes left in {net}: {left}"
                time.sleep(0.1)


def fixture_crash(exe: str) -> tuple[str, list[dict]]:
    from tests.conftest import FIXTURE_SPOOL

    [entry] = [
        e
        for e in os.listdir(spool.ready_dir(FIXTURE_SPOOL))
        if spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"] == exe
    ]
    return os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME), spool.read_meta(
        FIXTURE_SPOOL, entry
    )["modules"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per analysis is the agent's, which runs as root")
@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
def test_a_fork_bomb_fills_its_own_uid_and_another_tenants_analysis_ends_in_full(
    monkeypatch: pytest.MonkeyPatch, forked: bool
) -> None:
    """Tenants A and B's real crashes analysed at once. A's analysis, taken over, forks
    without end: it reaches its bound (all its uid's processes, its template's included)
    and no more, while B's analysis runs in another uid and ends with its full report. A is
    stopped at its time limit; no uid is taken again while a process of its last analysis is
    left; the next analysis runs, in a template's child: in A's uid and the very template A's
    analysis ran in. Both ways an analysis runs: a child of the pre-imported template, and a
    bubblewrap worker of its own."""
    from tests.conftest import FIXTURE_SPOOL

    store = os.path.join(FIXTURE_SPOOL, "store")
    a_core, a_record = fixture_crash("/app/libuser")
    b_core, b_record = fixture_crash("/app/crasher")
    monkeypatch.setattr(template, "_templates", {})
    monkeypatch.setattr(template, "_refused", {})
    if not forked:
        monkeypatch.setattr(template, "shared", lambda uid, processes=0: None)
    worker = runner._worker
    monkeypatch.setattr(
        runner, "_worker", lambda argv: (BOMB, []) if threading.current_thread().name == "a" else worker(argv)
    )
    alone: list[str] = []
    run_alone = runner._run_alone
    monkeypatch.setattr(
        runner, "_run_alone", lambda code, args, *a, **k: alone.append(code) or run_alone(code, args, *a, **k)
    )
    #: each uid as it was taken, with the processes of it then left outside its template
    taken: list[tuple[int, list[int]]] = []
    held = slots.held

    @contextlib.contextmanager
    def noted(base: int, count: int, deadline: float) -> Iterator[int]:
        with held(base, count, deadline) as uid:
            taken.append((uid, slots.stragglers(uid, template.pid_namespace(uid))))
            yield uid

    monkeypatch.setattr(slots, "held", noted)

    def analyse(core: str, record: list[dict], timeout: float) -> object:
        try:
            return runner.analyze(
                core, [store], record=record, timeout=timeout, uid=BASE, uids=2, processes=PROCESSES
            )
        except runner.AnalysisError as e:
            return e

    results: dict[str, object] = {}
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], len(slots.stragglers(BASE)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    a = threading.Thread(target=lambda: results.update(a=analyse(a_core, a_record, 20)), name="a")
    try:
        with pids_net(NET):
            expected = analyse(b_core, b_record, 60)  # B's report, analysed alone
            assert isinstance(expected, Report) and expected.threads, expected
            a_template = template._templates.get(BASE)  # the one A's analysis will run in
            sampler.start()
            a.start()
            deadline = time.monotonic() + 30
            while peak[0] < PROCESSES - 2:
                assert time.monotonic() < deadline, f"A's fork bomb did not take off: {peak[0]} processes"
                time.sleep(0.05)
            results["b"] = analyse(b_core, b_record, 60)
            a_running = a.is_alive()
            a.join(timeout=60)
            sampling.set()
            sampler.join()
            results["next"] = analyse(b_core, b_record, 60)
    finally:
        sampling.set()
        for t in template._templates.values():
            t.close()
    b = results["b"]
    assert isinstance(b, Report), b  # B's analysis ended, with its full report
    assert (b.signature, b.title, b.threads, b.modules) == (
        expected.signature,
        expected.title,
        expected.threads,
        expected.modules,
    )
    assert a_running, "A's analysis ended before B's: they did not run at once"
    # A's processes reached the bound, all of its uid's together, and went no further
    assert PROCESSES - 2 <= peak[0] <= PROCESSES, peak[0]
    assert isinstance(results["a"], runner.AnalysisError) and runner.STOPPED in str(results["a"])
    assert [uid for uid, _ in taken[:3]] == [BASE, BASE, BASE + 1]  # B's alone, A's, B's beside it
    assert all(left == [] for _, left in taken), f"a uid was taken again with processes left: {taken}"
    nxt = results["next"]
    assert isinstance(nxt, Report) and nxt.signature == expected.signature, nxt
    if forked:
        # A's uid again (the lowest free), in the template the bomb ran in
        assert taken[3][0] == BASE and template._templates[BASE] is a_template and a_template.forks == 3
        assert alone == [], "an analysis went to a worker of its own: a template could not fork"
    else:
        assert len(alone) == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per analysis is the agent's, which runs as root")
def test_analyses_at_once_hold_uids_of_their_own_and_wait_when_all_are_taken() -> None:
    """Each holder gets the lowest free uid of the range; with every uid taken the next one
    waits for its deadline and is refused; a uid given back is taken again."""
    deadline = time.monotonic() + 5
    with slots.held(BASE, 2, deadline) as first, slots.held(BASE, 2, deadline) as second:
        assert (first, second) == (BASE, BASE + 1)
        with pytest.raises(slots.NoSlot), slots.held(BASE, 2, time.monotonic() + 0.3):
            pass
    with slots.held(BASE, 2, time.monotonic() + 5) as again:
        assert again == BASE


def test_no_more_analyses_run_at_once_than_there_are_uids(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[agent]\nanalysis_workers = 8\nanalysis_uids = 3\nanalysis_processes = 64\n")
    settings = config.load(str(cfg))
    assert (settings.analysis_uids, settings.analysis_processes) == (3, 64)
    assert worker_count(settings) == 3
    cfg.write_text("[agent]\nanalysis_workers = 0\nanalysis_uids = 1\n")
    assert worker_count(config.load(str(cfg))) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per analysis is the agent's, which runs as root")
def test_a_killed_analysis_uid_is_not_taken_again_while_a_process_of_it_is_left() -> None:
    """An analysis killed without a word that its PID namespace is gone (a bubblewrap worker
    killed at its limit, a keeper that never answered) leaves its uid suspect: the uid is
    given back only once none of its processes are left."""
    with killed_with_a_process_left(BASE):
        pass
    with slots.held(BASE, 1, time.monotonic() + 10) as again:
        assert again == BASE and slots.stragglers(BASE) == []


@contextlib.contextmanager
def killed_with_a_process_left(base: int) -> Iterator[None]:
    """The only uid from ``base`` held by an analysis killed with a process of its uid left;
    while the block runs the uid is not taken again; the process is killed when it ends."""
    import subprocess

    with slots.held(base, 1, time.monotonic() + 5) as uid:
        left = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
        slots.suspect(uid, None)
    try:
        with pytest.raises(slots.NoSlot), slots.held(base, 1, time.monotonic() + 0.5):
            pass
        yield
    finally:
        left.kill()
        left.wait()
