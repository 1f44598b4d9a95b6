"""The state files of gone tenants are pruned, and pruning never frees a slot that is held.

Pods churn: each pod and namespace that ever crashed left dump-slot files under the state
directory, each container a storm budget; :mod:`corevault.capture.stateprune` removes those
nobody holds and nobody used for a while. The dangerous moments are the handler's: it opens a
slot file by name and locks it after, so a file removed in between must not be held as a second
copy of the same slot; and while the pruner holds a free slot's lock for an instant, a dump must
not be refused for it. Each such interleaving is forced here, at the exact point it can happen.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from corevault import config
from corevault.agent import loop
from corevault.capture import policy, snapshot, stateprune, stuckwriters
from tests.conftest import Capture
from tests.tenants import of_namespace, pod
from tests.test_tenant_slots import HeldDumps

LATER = time.time() + 2 * stateprune.IDLE  # when every file made now counts as idle


def names(state: Path, kind: str) -> list[str]:
    d = state / kind
    return sorted(os.listdir(d)) if d.exists() else []


def test_gone_pods_files_are_removed_and_the_held_and_recent_ones_kept(tmp_path: Path) -> None:
    state = str(tmp_path)
    for i in range(50):  # fifty pods of a churning deployment crashed once each, long ago
        for key in (f"p-gone-{i}", "n-web"):
            fd = policy.take_slot(state, key, 2)
            assert fd is not None
            os.close(fd)
        policy.admit(state, f"c-gone-{i}", 5, 600, time.time())
        stuck = policy.take_slot(state, f"p-gone-{i}", 1, stuckwriters.KIND)
        assert stuck is not None
        os.close(stuck)
    for i in range(5):  # snapshots of containers gone since
        os.close(policy.take_slot(state, f"c-gone-{i}", 1, snapshot.KIND) or -1)
    taking = policy.take_slot(state, "c-live", 1, snapshot.KIND)  # a snapshot being taken
    held = policy.take_slot(state, "p-live", 2)  # a dump under way, however old its file
    stuck_held = policy.take_slot(state, "p-live", 1, stuckwriters.KIND)  # a writer stuck for hours
    assert held is not None and stuck_held is not None
    assert len(names(tmp_path, "dumps")) == 52 and len(names(tmp_path, "storm")) == 50

    pruned = stateprune.prune(state, storm_window=600, now=LATER)

    assert names(tmp_path, "dumps") == ["p-live.0"] and names(tmp_path, "stuck") == ["p-live.0"]
    assert names(tmp_path, "storm") == [] and names(tmp_path, "snapshots") == ["c-live.0"]
    assert (pruned.slots, pruned.budgets, pruned.busy) == (106, 50, 3)
    assert policy.take_slot(state, "p-live", 1) is None  # still the live dump's slot
    os.close(held)
    os.close(stuck_held)
    os.close(taking or -1)
    assert stateprune.prune(state, storm_window=600, now=LATER).slots == 3
    # every set empty: its directory goes too, so a crash's look for stuck writers is one lookup again
    assert not (tmp_path / "dumps").exists() and not (tmp_path / "stuck").exists()
    assert policy.held_slots(state, "p-live", 1, stuckwriters.KIND) == 0
    fd = policy.take_slot(state, "p-live", 1)  # and the next crash makes what it needs again
    assert fd is not None
    os.close(fd)


def test_recent_files_and_budgets_with_crashes_in_the_window_are_kept(tmp_path: Path) -> None:
    state = str(tmp_path)
    os.close(policy.take_slot(state, "p-new", 1) or -1)
    policy.admit(state, "c-looping", 5, 7200, time.time())
    assert stateprune.prune(state, storm_window=7200).removed == 0  # made just now
    # an hour on the slot file is idle, the budget still holds a crash of its two-hour window
    pruned = stateprune.prune(state, storm_window=7200, now=time.time() + stateprune.IDLE + 60)
    assert (pruned.slots, pruned.budgets) == (1, 0) and names(tmp_path, "storm") == ["c-looping"]


def test_a_pass_removes_at_most_its_limit_and_the_next_takes_the_rest(tmp_path: Path) -> None:
    state = str(tmp_path)
    for i in range(30):
        os.close(policy.take_slot(state, f"p-{i}", 1) or -1)
    assert stateprune.prune(state, 600, now=LATER, limit=20).slots == 20
    assert len(names(tmp_path, "dumps")) == 10
    assert stateprune.prune(state, 600, now=LATER, limit=20).slots == 10
    assert names(tmp_path, "dumps") == []


def test_a_pass_looks_at_no_more_than_its_scan_and_the_next_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """Millions of files (a churn of pods, a pod making keys) would cost a pass that looks at every
    one unbounded time. A pass looks at ``scan`` entries; the next reads on from there, so the
    held (or young) files the first ones happen to be are not looked at again and again while
    the idle ones behind them wait forever."""
    state = str(tmp_path)
    for i in range(60):
        os.close(policy.take_slot(state, f"p-{i}", 1) or -1)
    first = os.listdir(tmp_path / "dumps")[:20]  # the directory's own order: what a pass reads first
    held = [policy.take_slot(state, name.removesuffix(".0"), 1) for name in first]  # dumps under way
    assert all(fd is not None for fd in held)
    pruner = stateprune.Pruner(state, 600, scan=20)
    try:
        one = pruner.prune(LATER)
        assert (one.looked, one.busy, one.slots, one.more) == (20, 20, 0, True)
        assert len(names(tmp_path, "dumps")) == 60
        # a pass from the start would find the same twenty held files, and nothing else, every time
        assert stateprune.prune(state, 600, now=LATER, scan=20).slots == 0
        two, three = pruner.prune(LATER), pruner.prune(LATER)
        assert (two.looked, two.slots, three.looked, three.slots) == (20, 20, 20, 20)
        assert sorted(names(tmp_path, "dumps")) == sorted(first)
        end = pruner.prune(LATER)  # the set read to its end: its files held, its directory kept
        assert (end.looked, end.more) == (0, False) and sorted(names(tmp_path, "dumps")) == sorted(first)
        for fd in held:
            os.close(fd or -1)
        again = pruner.prune(LATER)  # a new round, from the start
        assert (again.looked, again.slots) == (20, 20) and names(tmp_path, "dumps") == []
        pruner.prune(LATER)
        assert not (tmp_path / "dumps").exists()  # a round that left nothing takes the directory
    finally:
        pruner.close()


def test_a_pass_shares_its_scan_between_the_sets_and_gives_what_one_leaves_to_the_others(
    tmp_path: Path,
) -> None:
    state = str(tmp_path)
    for i in range(100):
        os.close(policy.take_slot(state, f"p-{i}", 1) or -1)
        policy.admit(state, f"c-{i}", 5, 600, time.time())
    os.close(policy.take_slot(state, "p-0", 1, stuckwriters.KIND) or -1)
    pruner = stateprune.Pruner(state, 600, scan=40)
    try:
        one = pruner.prune(LATER)
        # the stuck set's one file and the snapshots' none leave their shares to the two big sets
        assert one.looked == 40 and one.slots + one.budgets == 40
        assert one.budgets >= 10 and one.slots >= 10 + 1
        while pruner.prune(LATER).more:
            pass
        assert names(tmp_path, "dumps") == names(tmp_path, "storm") == names(tmp_path, "stuck") == []
    finally:
        pruner.close()


def test_a_slot_pruned_between_a_dumps_open_and_its_lock_is_not_held_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler opens ``p-a.0``; the pruner finds it free and idle and unlinks it; the handler
    then locks what it opened. Holding that unlinked file, it would leave the name free for the
    next dump of the pod, which would make a new file and hold the same slot a second time."""
    state = str(tmp_path)
    os.close(policy.take_slot(state, "p-a", 1) or -1)  # the pod's slot file, from an old crash
    real_open = policy.open_state
    pruned: list[int] = []

    def open_then_pruned(directory: str, name: str) -> int:
        fd = real_open(directory, name)
        if name == "p-a.0" and not pruned:
            pruned.append(stateprune.prune(state, 600, now=LATER).slots)
        return fd

    monkeypatch.setattr(policy, "open_state", open_then_pruned)
    first = policy.take_slot(state, "p-a", 1)
    assert pruned == [1] and first is not None  # the file it opened was removed before its lock
    assert os.fstat(first).st_nlink == 1  # it holds the file under the slot's name, not the unlinked one
    assert policy.take_slot(state, "p-a", 1) is None  # so the pod's next dump finds its one slot held
    assert policy.held_slots(state, "p-a", 1, policy.DUMPS) == 1
    os.close(first)


def test_a_probe_of_a_slot_pruned_as_it_opened_it_sees_the_new_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look at the stuck writers opens ``p-a.0``; it is pruned, and a new writer takes the slot in
    a new file of that name; the look then locks the unlinked file it opened, which is free."""
    state = str(tmp_path)
    kind = stuckwriters.KIND
    os.close(policy.take_slot(state, "p-a", 1, kind) or -1)
    other = policy.take_slot(state, "p-b", 1, kind)  # held: the directory stays, only the file goes
    real_flock = fcntl.flock
    taken: list[int] = []

    def pruned_and_taken_before_the_probe(fd: int, op: int) -> None:
        if op == fcntl.LOCK_SH | fcntl.LOCK_NB and not taken:
            stateprune.prune(state, 600, now=LATER)
            taken.append(policy.take_slot(state, "p-a", 1, kind) or -1)
        real_flock(fd, op)

    monkeypatch.setattr(policy.fcntl, "flock", pruned_and_taken_before_the_probe)
    assert policy.held_slots(state, "p-a", 1, kind) == 1
    assert taken and taken[0] >= 0
    os.close(taken[0])
    os.close(other or -1)


def test_a_dump_is_not_refused_for_the_instant_the_pruner_holds_its_free_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pruner holds the prune lock and the free slot's own lock while it checks the file; a
    dump of that pod arriving then finds its one slot locked. It waits for the pruner to be done
    with that file and takes the slot, rather than being refused as if a dump held it."""
    state = str(tmp_path)
    os.close(policy.take_slot(state, "p-a", 1) or -1)
    lock = policy.open_state(state, policy.PRUNE_LOCK)
    fcntl.flock(lock, fcntl.LOCK_EX)
    slot = os.open(tmp_path / "dumps" / "p-a.0", os.O_RDONLY)
    fcntl.flock(slot, fcntl.LOCK_EX)  # the pruner, mid-file
    waiting = threading.Event()
    monkeypatch.setattr(policy, "PRUNE_WAIT", 60.0)  # it is let go of below, once the dump waits
    real_sleep = policy.sleep

    def dump_waits(seconds: float) -> None:
        waiting.set()
        real_sleep(seconds)

    monkeypatch.setattr(policy, "sleep", dump_waits)

    def pruner_done() -> None:
        waiting.wait(60)
        os.unlink(tmp_path / "dumps" / "p-a.0")
        os.close(slot)
        os.close(lock)

    done = threading.Thread(target=pruner_done)
    done.start()
    try:
        fd = policy.take_slot(state, "p-a", 1)
    finally:
        waiting.set()
        done.join()
    assert waiting.is_set() and fd is not None and os.fstat(fd).st_nlink == 1
    os.close(fd)


def test_a_pruner_stopped_mid_file_holds_a_dump_for_a_moment_only(tmp_path: Path) -> None:
    state = str(tmp_path)
    os.close(policy.take_slot(state, "p-a", 1) or -1)
    lock = policy.open_state(state, policy.PRUNE_LOCK)
    slot = os.open(tmp_path / "dumps" / "p-a.0", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    fcntl.flock(slot, fcntl.LOCK_EX)
    try:
        assert policy.take_slot(state, "p-a", 1) is None  # refused after PRUNE_WAIT, never hung
        assert policy.held_slots(state, "p-a", 1, policy.DUMPS) == 1
    finally:
        os.close(slot)
        os.close(lock)


def test_a_budget_pruned_while_a_crash_waited_for_its_lock_still_counts_that_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash opens its container's idle budget and waits for its lock while the pruner removes
    it: written into the unlinked file, the crash would be counted nowhere, and the container's
    next crash would be kept beyond its limit."""
    state = str(tmp_path)
    policy.admit(state, "c-x", 1, 600, time.time())  # a crash, idle by LATER
    real_open = policy.open_state
    pruned: list[int] = []

    def open_then_pruned(directory: str, name: str) -> int:
        fd = real_open(directory, name)
        if name == "c-x" and not pruned:
            pruned.append(stateprune.prune(state, 600, now=LATER).budgets)
        return fd

    monkeypatch.setattr(policy, "open_state", open_then_pruned)
    assert policy.admit(state, "c-x", 1, 600, LATER) == (True, 1)
    assert pruned == [1]
    assert policy.admit(state, "c-x", 1, 600, LATER + 1) == (False, 2)  # the limit of one holds


def test_the_agent_prunes_on_its_first_pass_and_then_every_prune_every(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = config.Settings(str(tmp_path / "state"))
    settings.storm_window = 0
    settings.agent_analyze = False
    state = settings.state_dir
    for i in range(3):
        os.close(policy.take_slot(state, f"p-{i}", 1) or -1)
    monkeypatch.setattr(stateprune, "IDLE", 0.0)  # what was made before the pass counts as idle
    time.sleep(0.01)
    agent = loop.Agent(settings)
    with caplog.at_level(logging.INFO, logger="corevault.agent"):
        agent.pass_once()
    assert not (tmp_path / "state" / "dumps").exists()
    assert "removed 3 idle dump slot and 0 storm files" in caplog.text
    os.close(policy.take_slot(state, "p-again", 1) or -1)
    agent.pass_once()  # within PRUNE_EVERY of the last: left for the next pruning
    assert names(tmp_path / "state", "dumps") == ["p-again.0"]
    agent.last_prune -= loop.PRUNE_EVERY
    agent.pass_once()
    assert names(tmp_path / "state", "dumps") == []
    # a churn left more than a pruning looks at: the next comes after PRUNE_AGAIN, until all is read
    for i in range(20):
        os.close(policy.take_slot(state, f"p-churn-{i}", 1) or -1)
    time.sleep(0.01)
    agent.pruner.scan = 8
    agent.last_prune -= loop.PRUNE_EVERY
    left = []
    for _ in range(4):
        agent.pass_once()
        left.append(len(names(tmp_path / "state", "dumps")))
        agent.pass_once()  # within PRUNE_AGAIN: nothing
        assert len(names(tmp_path / "state", "dumps")) == left[-1]
        agent.last_prune -= loop.PRUNE_AGAIN
    assert left == [12, 4, 0, 0] and agent.prune_every == loop.PRUNE_EVERY


def test_the_agent_prunes_while_the_vault_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pods churn whether or not the vault answers: a node cut off from it for days still prunes."""
    settings = config.Settings(str(tmp_path / "state"))
    settings.catalog_url = "postgresql+psycopg://corevault@127.0.0.1:1/none"  # nothing listens there
    settings.agent_analyze = False
    for i in range(3):
        os.close(policy.take_slot(settings.state_dir, f"p-{i}", 1) or -1)
    monkeypatch.setattr(stateprune, "IDLE", 0.0)
    time.sleep(0.01)
    agent = loop.Agent(settings)
    agent.pass_once()
    assert agent.unreachable is not None
    assert not (tmp_path / "state" / "dumps").exists()


@pytest.mark.crash
def test_pruning_beside_real_pods_takes_the_gone_pods_files_and_never_a_held_slot(
    capture: Capture, rootfs: str
) -> None:
    """Three pods of a deployment crashed once each and were replaced; pod A's dump is being read
    (its handler held still while it reads the core) when the agent prunes. The gone pods' files
    go; A's slot stays A's: its next crash is refused for its one slot, not given a second one."""
    capture.configure("[capture]\npod_dumps = 1\nnamespace_dumps = 4\n")
    for i in range(3):
        capture.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-c", f"gone-{i}"))
    state = Path(capture.state_dir)
    assert len(names(state, "dumps")) == 4 and len(names(state, "storm")) == 3  # three pods, their namespace
    a = HeldDumps(capture, rootfs)
    try:
        a.crash()
        assert a.held, "A's dump was read to its end before it could be held"
        pruned = stateprune.prune(capture.state_dir, 600, now=LATER)
        assert names(state, "dumps") == sorted([f"p-{a.pod_uid}.0", "n-tenant-a.0"])
        assert pruned.slots == 4 and pruned.busy == 2 and pruned.budgets >= 3
        a.crash()  # A's next dump, while the first still holds the pod's one slot
    finally:
        a.release()
    a_events = of_namespace(capture.journal(), "tenant-a")
    assert sorted(r["event"] for r in a_events) == ["captured", "dropped"], a_events
    assert any("dumps of this pod" in r.get("reason", "") for r in a_events)
