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
from corevault.capture import stuckwriters, volumecopy


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
