"""Writers stuck on pods' volumes are counted per pod, namespace and node, and each bound holds.

The slots are real ``flock`` files in a state directory, held by fds as a stuck writer holds
them; closing the fds is what a writer's end (or its handler process's) does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from corevault import config
from corevault.capture import stateprune, stuckwriters, volumecopy


@pytest.fixture
def settings(tmp_path) -> config.Settings:
    s = config.Settings()
    s.state_dir = str(tmp_path / "state")
    return s


@pytest.fixture
def held() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def test_a_pod_with_a_stuck_writer_skips_its_volume_and_others_do_not(
    settings: config.Settings, held: list[int]
) -> None:
    assert stuckwriters.blocked(settings, ("p-a", "n-1")) is None
    fds = stuckwriters.register(settings, ("p-a", "n-1"))
    assert len(fds) == 3  # the pod's, the namespace's and the node's
    reason = stuckwriters.blocked(settings, ("p-a", "n-1"))
    assert reason is not None and "earlier dump of this pod is still stuck" in reason
    assert stuckwriters.blocked(settings, ("p-b", "n-1")) is None  # a pod beside it
    assert stuckwriters.blocked(settings, ("p-c", "n-2")) is None  # another namespace
    for fd in fds:  # the writer ends
        os.close(fd)
    assert stuckwriters.blocked(settings, ("p-a", "n-1")) is None


def test_a_pods_writers_stuck_at_once_are_all_counted(settings: config.Settings, held: list[int]) -> None:
    """Its dumps under way when the volume hung (``pod_dumps``) each hold a slot of the pod."""
    held += stuckwriters.register(settings, ("p-a", "n-1"))
    held += stuckwriters.register(settings, ("p-a", "n-1"))
    assert len(held) == 6
    slots = sorted(os.listdir(os.path.join(settings.state_dir, stuckwriters.KIND)))
    assert slots == ["n-1.0", "n-1.1", "node.0", "node.1", "p-a.0", "p-a.1"]


def test_a_namespace_is_bounded_by_its_share(settings: config.Settings, held: list[int]) -> None:
    for i in range(settings.namespace_dumps):
        held += stuckwriters.register(settings, (f"p-{i}", "n-1"))
    reason = stuckwriters.blocked(settings, ("p-new", "n-1"))
    assert (
        reason is not None
        and f"{settings.namespace_dumps} writers are stuck on volumes of this namespace" in reason
    )
    assert stuckwriters.blocked(settings, ("p-other", "n-2")) is None


def test_the_node_is_bounded(settings: config.Settings, held: list[int]) -> None:
    for i in range(stuckwriters.NODE_MAX):
        held += stuckwriters.register(settings, (f"p-{i}", f"n-{i}"))
    reason = stuckwriters.blocked(settings, ("p-new", "n-new"))
    assert (
        reason is not None and f"{stuckwriters.NODE_MAX} writers are stuck on volumes of this node" in reason
    )
    # the node's own processes (no pod, no namespace) count against the node's bound alone
    assert stuckwriters.blocked(settings, (None, None)) == reason
    os.close(held.pop())  # the last one's node slot (registered last) is free again
    assert stuckwriters.blocked(settings, ("p-new", "n-new")) is None


def test_the_writer_channel_keeps_order_and_times_out() -> None:
    """The volume writer's queue (built on a lock, not the ``_queue`` extension): items in order,
    a reader woken by a writer on another thread, and Empty once the timeout passes."""
    channel = volumecopy.Channel()
    with pytest.raises(volumecopy.Empty):
        channel.get(timeout=0.01)
    for item in (1, 2, 3):
        channel.put(item)
    assert [channel.get(timeout=1), channel.get(timeout=1)] == [1, 2]
    assert channel.get(timeout=1) == 3 and channel.empty()
    with pytest.raises(volumecopy.Empty):  # the releases left over wake no one for nothing
        channel.get(timeout=0.01)
    later = threading.Timer(0.05, channel.put, ("late",))
    later.start()
    assert channel.get() == "late"
    later.join()


def _records(settings: config.Settings) -> list[str]:
    return sorted(os.listdir(os.path.join(settings.state_dir, stuckwriters.MOUNTS)))


def test_a_give_up_sweeps_the_records_of_writers_that_ended(
    settings: config.Settings, held: list[int]
) -> None:
    """Without an agent, nothing else would remove them: the pipe handler alone on a bare host."""
    whose = {"pid": 1, "pod": {"uid": "u-a"}}
    fds = [stuckwriters.note_mounts(settings, {b"0:99": b"/data/own"}, whose) for _ in range(3)]
    assert None not in fds
    d = os.path.join(settings.state_dir, stuckwriters.MOUNTS)
    # a record being written (hidden, not yet locked) is left alone; one of a writer that died
    # before its rename, long ago, is not
    young, old = os.path.join(d, ".young"), os.path.join(d, ".old")
    for path in (young, old):
        open(path, "w").close()
    os.utime(old, (1, 1))
    os.close(fds[0])  # its writer ended (answered, or its connection aborted)
    os.close(fds[1])
    held.append(fds[2])
    held.append(stuckwriters.note_mounts(settings, {b"0:98": None}, whose))
    left = _records(settings)
    assert ".young" in left and ".old" not in left
    visible = [n for n in left if not n.startswith(".")]
    assert len(visible) == 2, left  # the writer still stuck, and the new one
    with open(
        os.path.join(d, max(visible, key=lambda n: os.stat(os.path.join(d, n)).st_mtime_ns)), "rb"
    ) as f:
        assert b'"mounts":[["0:98",null]]' in f.read().replace(b" ", b"")


def test_a_sweep_is_bounded_and_the_state_pruning_sweeps_too(
    settings: config.Settings, held: list[int]
) -> None:
    whose = {"pid": 1, "pod": {"uid": "u-a"}}
    for _ in range(stuckwriters.SWEEP_MAX + 5):
        fd = stuckwriters.note_mounts(settings, {b"0:99": b"/data/own"}, whose)
        assert fd is not None
        os.close(fd)
    d = os.path.join(settings.state_dir, stuckwriters.MOUNTS)
    assert len(_records(settings)) <= 2  # each give-up swept the ones before it
    names = [f"{i:016x}" for i in range(stuckwriters.SWEEP_MAX + 5)]
    for name in names:  # records of writers that ended while no give-up came to sweep them
        open(os.path.join(d, name), "w").close()
    before = len(_records(settings))
    assert stuckwriters.sweep(d) == stuckwriters.SWEEP_MAX
    assert len(_records(settings)) == before - stuckwriters.SWEEP_MAX
    pruned = stateprune.prune(settings.state_dir, 60.0)
    assert pruned.records == before - stuckwriters.SWEEP_MAX
    assert _records(settings) == []


def test_the_device_a_writer_holds_is_read_without_asking_its_filesystem(tmp_path) -> None:
    for flags in (os.O_RDONLY, os.O_PATH):
        fd = os.open(tmp_path, flags | os.O_DIRECTORY)
        try:
            st = os.fstat(fd)
            assert stuckwriters.held_device(fd) == b"%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
        finally:
            os.close(fd)
