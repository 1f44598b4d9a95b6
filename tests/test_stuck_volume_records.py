"""A pipe handler's writer stuck on a pod's own FUSE volume: recorded, aborted, its record swept.

Tenant A's pod (:func:`testbed.podfuse.hanging`) mounts its own FUSE server over the directory
its core pattern names; the server reads every request of one kind and never answers it. A
stopped server would not do: it never reads the request, and a wait for an unread request ends
with the pipe handler's process. Against this one the handler's writer waits uninterruptibly
after the handler exited, holding A's stuck-writer slots, and nothing but an answer or the
connection's abort ends it. Three ways to hang, each a gap of the record before:

- ``write``: the writer is given up while the process dumps; its record names the mount from
  the directory's ``mnt_id`` and A's mountinfo;
- ``fsync``: the publish hangs, so the writer is given up only after the process was let go; A's
  mountinfo is gone with it, and the record names the connection by the device of the
  directory's fd;
- ``opendir``, then ``umount -l`` of the mount by the pod while the writer waits to enter it:
  A's mountinfo no longer lists it, and the record names the connection by the device of the
  fd the walk holds on the mount's root.

In each, the agent aborts A's connection past ``[capture] timeout`` since the give-up, the
writer's slots come back, and the record, unlocked, is removed by the state pruning (no agent
pass needed: on a node with the pipe handler alone, each give-up sweeps them too)."""

from __future__ import annotations

import os
import time

import pytest

from corevault import quickjson
from corevault.agent import stuckvolumes
from corevault.capture import stateprune, stream, stuckwriters
from testbed import podfuse
from tests import test_volume_stall
from tests.tenants import pod
from tests.test_stuck_volumes import DEADLINE, OWN, aborts, agent_in, given_up
from tests.test_volume_stall import stuck_writers
from tests.waiting import wait_for

pytestmark = pytest.mark.crash


@pytest.fixture(scope="module")
def hanging_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return podfuse.hanging_rootfs(str(tmp_path_factory.mktemp("fusehang") / "root"))


def records(state_dir: str) -> dict[str, dict]:
    """The stuck writers' records under the state dir, by name (hidden ones left out)."""
    d = os.path.join(state_dir, stuckwriters.MOUNTS)
    found = {}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if not name.startswith("."):
            with open(os.path.join(d, name), "rb") as f:
                found[name] = quickjson.loads(f.read())
    return found


#: how A's server hangs, what the pod does once it hangs, the step the copy is given up in,
#: whether the record names the mount point (from A's mountinfo) or the held fd's device alone,
#: and the dump's deadline ([capture] timeout): a publish is waited for before the let-go until
#: the writer made no progress for STALL seconds (up to twice that since the publish was asked),
#: then until STALL seconds before the deadline
WAYS = {
    "write": ("write", "", f"writing the core, no progress for {stream.STALL}s", True, DEADLINE),
    "after-let-go": (
        "fsync", "", "publishing it (fsync, close or rename) past the dump's deadline", False,
        3 * stream.STALL - 1,
    ),
    "lazily-unmounted": ("opendir", f"busybox umount -l {OWN}", "opening its directory", False, DEADLINE),
}  # fmt: skip


@pytest.mark.parametrize("way", list(WAYS))
def test_a_pipe_handlers_writer_stuck_on_a_hanging_fuse_volume_is_recorded_and_aborted(
    way: str, monkeypatch: pytest.MonkeyPatch, hanging_rootfs: str, tmp_path
) -> None:
    opcode, after, step, named, deadline = WAYS[way]
    monkeypatch.setattr(test_volume_stall, "TIMEOUT", deadline)
    with test_volume_stall.pipe_node() as node:
        agent = agent_in(node)
        a_volume = tmp_path / "a"
        a_volume.mkdir()
        annotations = pod("tenant-a", "a-0", f"{OWN}/core-%p")
        a = podfuse.hanging(hanging_rootfs, str(a_volume), annotations, OWN, opcode, after=after)
        with a.running():
            [conn] = wait_for(lambda: podfuse.connections(a.pid()), "A's FUSE mount")
            try:
                podfuse.go(str(a_volume))  # A dumps; its server hangs on the copy's request
                [meta] = wait_for(lambda: given_up(node.spool, a.pod_uid), "A's copy given up", 120)
                assert step in meta["volume"]["error"], meta["volume"]
                assert meta["core"]["truncated"] is False and meta["core"]["size"] > 0
                if after:
                    assert podfuse.connections(a.pid()) == [], "A's mount is still listed"
                # the handler exited; its writer waits on, holding A's pod, namespace and node slots
                wait_for(lambda: len(stuck_writers(node.state)) == 3, "A's stuck writer")
                [(name, record)] = wait_for(lambda: list(records(node.state).items()), "the record")
                assert record["pod"]["uid"] == a.pod_uid
                assert record["mounts"] == [[conn.decode(), OWN if named else None]]

                agent.pass_once()
                assert aborts(node.spool, agent) == [], "aborted before the deadline"
                wait_for(
                    lambda: agent.pass_once() is not None and aborts(node.spool, agent), "the abort", 120
                )
                wait_for(lambda: stuck_writers(node.state) == [], "A's stuck slots back", 120)
            finally:
                podfuse.abort_connections([conn])
        [journaled] = aborts(node.spool, agent)
        assert journaled["event"] == "dropped" and journaled["pod"]["uid"] == a.pod_uid
        where = OWN if named else stuckvolumes.UNNAMED
        assert f"own FUSE server of its volume {where} stopped answering" in journaled["reason"]

        # The writer ended with the handler's process: its record, no longer held, means nothing.
        # The agent's stuck-volume watch is not what removes it here: the state pruning is.
        assert list(records(node.state)) == [name]
        assert stateprune.prune(node.state, 60.0, now=time.time()).records == 1
        assert records(node.state) == {}
