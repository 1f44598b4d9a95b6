"""The node's pod index forgets pods and containers long gone, and never one whose process lives.

A node whose pods churn (jobs, rollouts, crash loops) added a file per pod and one per container
id to the index; the old ids of a restarting container and files that were no entry stayed for
good. :mod:`corevault.kube.podsweep` removes them, except while a process of theirs lives: that
process may still crash, and its crash must be attributed to its pod.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corevault import podindex
from corevault.kube import podsweep
from testbed import runc
from tests.conftest import Capture

KEEP = 3600.0
LATER = time.time() + 2 * KEEP  # when every file written now is older than KEEP


def pod(uid: str, *container_ids: str, deleted_at: float | None = None) -> dict:
    """A pod's record; its containers' ids in the order the container restarted (the last is current)."""
    return {
        "uid": uid, "namespace": "shop", "name": f"cart-{uid[:5]}", "deleted_at": deleted_at,
        "annotations": {"corevault.io/core-pattern": "/data/dump-a/core-%p"},
        "containers": {"app": {"id": container_ids[-1], "image": "cart:1"}} if container_ids else {},
    }  # fmt: skip


def restarted(index: str, uid: str, *container_ids: str, deleted_at: float | None = None) -> None:
    """Write the pod's record as the watch does at each restart of its container."""
    for i in range(len(container_ids)):
        podindex.write_pod(index, pod(uid, *container_ids[: i + 1], deleted_at=deleted_at))


def files(index: Path, kind: str) -> list[str]:
    return sorted(os.listdir(index / kind)) if (index / kind).exists() else []


def nothing_lives() -> str:
    return ""


def test_a_churning_node_s_index_keeps_only_what_is_current_or_lately_gone(tmp_path: Path) -> None:
    index = str(tmp_path)
    looping = [f"{i:064x}" for i in range(1, 6)]  # a crash-looping pod's container, restarted four times
    restarted(index, "u-loop", *looping)
    for i in range(30):  # a job's pods, each run once and deleted (long ago, by LATER's clock)
        restarted(index, f"u-job-{i}", f"{0xA000 + i:064x}", deleted_at=time.time())
    restarted(index, "u-late", "b" * 64, deleted_at=LATER - KEEP / 2)  # deleted lately, by LATER's clock
    (tmp_path / "pods" / "torn.json").write_text("{not json")  # no entry
    (tmp_path / "pods" / "u-other.json").write_text('{"uid": "u-else"}')  # an entry under another name
    (tmp_path / "containers" / "x.json.41.42.tmp").write_text("{}")  # a write cut short
    (tmp_path / "containers" / ("e" * 64 + ".json")).write_text(f'{{"id": "{"e" * 64}", "pod_uid": []}}')
    assert len(files(tmp_path, "containers")) == 5 + 30 + 1 + 2

    assert podsweep.sweep(index, KEEP, live=nothing_lives).pods == []  # nothing is old yet
    swept = podsweep.sweep(index, KEEP, LATER, live=nothing_lives)

    assert sorted(swept.pods) == sorted(f"u-job-{i}" for i in range(30))
    assert (swept.containers, swept.other, swept.live) == (30 + 4 + 1, 3, 0)
    assert files(tmp_path, "pods") == ["u-late.json", "u-loop.json"]
    assert files(tmp_path, "containers") == sorted([looping[-1] + ".json", "b" * 64 + ".json"])
    assert podindex.read_container(index, looping[-1])["pod_uid"] == "u-loop"


def test_a_container_replaced_only_lately_is_kept_for_its_late_crash(tmp_path: Path) -> None:
    index = str(tmp_path)
    restarted(index, "u-a", "a" * 64)
    old = tmp_path / "containers" / ("a" * 64 + ".json")
    os.utime(old, (LATER - 2 * KEEP, LATER - 2 * KEEP))  # current until two KEEPs before LATER
    restarted(index, "u-a", "a" * 64, "c" * 64)  # then replaced, at LATER - KEEP / 2
    os.utime(old, (LATER - KEEP / 2, LATER - KEEP / 2))
    assert podsweep.sweep(index, KEEP, LATER, live=nothing_lives).containers == 0
    assert podsweep.sweep(index, KEEP, LATER + KEEP, live=nothing_lives).containers == 1
    assert files(tmp_path, "containers") == ["c" * 64 + ".json"]


def test_an_entry_written_again_while_the_sweep_decides_is_kept(tmp_path: Path) -> None:
    """Another writer (a second agent, a relist) writes the pod while the sweep looks for its
    processes: the file it unlinks must be the one it read, else the new entry is lost."""
    index = str(tmp_path)
    restarted(index, "u-a", "a" * 64, deleted_at=time.time() - 2 * KEEP)

    def written_meanwhile() -> str:
        podindex.write_pod(index, pod("u-a", "a" * 64, deleted_at=None))  # alive after all
        return ""

    swept = podsweep.sweep(index, KEEP, live=written_meanwhile)
    assert swept.pods == []
    assert podindex.read_pod(index, "u-a")["deleted_at"] is None


def test_a_container_id_that_is_no_file_name_removes_nothing_outside_the_containers(tmp_path: Path) -> None:
    """The ids a pod's record holds come from the API server's status: one that walks out of
    the index (``../pods/<uid>``) is never written as a file, and never unlinked as one."""
    index = str(tmp_path)
    restarted(index, "u-other", "b" * 64)
    restarted(index, "u-gone", "a" * 64, deleted_at=time.time())
    restarted(index, "u-gone", "a" * 64, "../pods/u-other", deleted_at=time.time())
    assert podsweep.sweep(index, KEEP, LATER, live=nothing_lives).pods == ["u-gone"]
    assert files(tmp_path, "pods") == ["u-other.json"] and podindex.read_pod(index, "u-other") is not None


@pytest.mark.crash
def test_a_pod_deleted_long_ago_whose_process_lives_is_kept_and_its_crash_attributed(
    capture: Capture, rootfs: str
) -> None:
    """The pod was deleted (by force, say) two hours ago, but its process still runs; its old
    container's id is gone with its process. The sweep forgets the old container and keeps the
    pod; the process then crashes and its core lands where the pod's index entry says, the crash
    named after that pod. Once the process is gone, the pod goes at the next sweep."""
    go = os.path.join(capture.volume, "go")
    c = runc.Container(
        rootfs,
        [
            "/bin/sh",
            "-c",
            "echo ready; while [ ! -e /data/dump-a/go ]; do sleep 0.05; done; exec /app/crasher segv",
        ],
        volume=capture.volume,
    )
    restarted(capture.podindex, c.pod_uid, "d" * 64, c.id, deleted_at=time.time() - 2 * KEEP)
    index = Path(capture.podindex)
    with c.running() as proc:
        swept = podsweep.sweep(capture.podindex, KEEP, LATER)
        assert swept.pods == [] and swept.live == 1 and swept.containers == 1
        assert files(index, "pods") == [f"{c.pod_uid}.json"] and files(index, "containers") == [
            f"{c.id}.json"
        ]
        since = runc.uptime() - 0.02
        Path(go).touch()
        proc.wait(timeout=30)
        runc.wait_for_dump_helpers(since)
    [meta] = capture.entries()
    assert meta["pod"]["source"] == "podindex" and meta["pod"]["uid"] == c.pod_uid
    assert (meta["pod"]["name"], meta["pod"]["container"]) == (f"cart-{c.pod_uid[:5]}", "app")
    assert [name for name in capture.volume_files() if name.startswith("core-")] == ["core-1"]
    assert podsweep.sweep(capture.podindex, KEEP, LATER).pods == [c.pod_uid]
    assert files(index, "pods") == files(index, "containers") == []
