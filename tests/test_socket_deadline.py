"""Socket mode's bounds per dump, attacked from real containers on this 6.18 kernel.

A pod controls its files, and may serve them itself: its executable lives on a FUSE
filesystem whose server stops answering once the process runs (here ``rclone mount`` of a
local directory, stopped with SIGSTOP). A read of such a file waits until the server answers,
and no signal but a fatal one ends the wait. The listener must then hold nothing node-wide
for it (the node reads ``parallel`` dumps at once, and this pod's share alone could take them
all), its threads must stay within the pod's share, and the dump's deadline must drop the
dump under its pod, with nothing left in the spool.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from corevault import hostsetup, spool
from testbed import fusefs, runc
from tests.tenants import of_namespace, pod, processes, wait_for
from tests.test_socket_mode import socket_capture

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(
        hostsetup.kernel_socket_mode() != "@@", reason="the coredump socket with requests needs Linux 6.17+"
    ),
]


def serving_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "coredump")


def serving_settles_at(n: int) -> bool:
    """The listener's connection threads come down to ``n`` (others end a moment after their record)."""
    return bool(wait_for(lambda: serving_threads() == n, 30))


def test_a_pods_binary_that_never_answers_holds_nothing_node_wide_and_is_called_off(
    rootfs: str, programs: dict[str, str], tmp_path
) -> None:
    source = tmp_path / "served"
    source.mkdir()
    shutil.copy(programs["hang"], source / "hang")
    with socket_capture(parallel=2) as s, fusefs.local(str(source)) as served, ExitStack() as pods:
        s.settings.timeout = 8  # the deadline per dump; pod_dumps stays 2, the node's parallel
        a_volume = os.path.join(s.dir, "a-vol")
        os.mkdir(a_volume)
        a_uid = runc.new_pod_uid()

        def a_container(args: list[str], **kw: object) -> runc.Container:
            return runc.Container(rootfs, args, volume=a_volume, annotations=pod("tenant-a", "a-0"),
                                  pod_uid=a_uid, **kw)  # fmt: skip

        fuse = [{"destination": "/served", "type": "bind", "source": served.path, "options": ["rbind", "rw"]}]
        for _ in range(s.listener.parallel + 1):
            pods.enter_context(
                a_container(["/bin/sh", "-c", "/served/hang deadlock; true"], mounts=fuse).running()
            )
        crashing = processes(b"/served/hang\x00deadlock")
        assert len(crashing) == s.listener.parallel + 1
        os.kill(served.pid, signal.SIGSTOP)  # the pod's server answers no more
        for pid in crashing:
            os.kill(pid, signal.SIGSEGV)

        # Two dumps admitted (the pod's share), the third refused on it; the two are read, and
        # their processes let go although the executable they mapped does not answer.
        def refused_on_share() -> list[dict]:
            return [
                r for r in of_namespace(s.journal(), "tenant-a") if "dumps of this pod" in r.get("reason", "")
            ]

        wait_for(refused_on_share, 30)
        wait_for(lambda: not processes(b"/served/hang\x00deadlock"), 30)
        assert serving_settles_at(2)  # blocked on the pod's file, each holding a slot of the pod

        # Another pod's crash on the node meanwhile: read and stored whole.
        b = runc.Container(
            rootfs, ["/app/crasher", "alloc", "8"], volume=s.volume, annotations=pod("tenant-b", "b-0")
        )
        b.run()
        wait_for(lambda: of_namespace(s.journal(), "tenant-b"), 30)
        [b_entry] = s.entries()
        assert b_entry["pod"]["namespace"] == "tenant-b" and not b_entry["core"]["truncated"]
        assert b_entry["core"]["size"] == os.path.getsize(os.path.join(s.volume, os.listdir(s.volume)[0]))
        assert [r["event"] for r in of_namespace(s.journal(), "tenant-b")] == ["captured"]

        # The pod's share bounds the agent's threads: its next crash is refused, no thread added.
        a_container(["/app/crasher", "segv"]).run()
        assert len(refused_on_share()) == 2 and serving_settles_at(2)

        # The deadline strikes: dropped under the pod, saying what to do; nothing in the spool.
        def called_off() -> list[dict]:
            return [
                r for r in of_namespace(s.journal(), "tenant-a") if "[capture] timeout" in r.get("reason", "")
            ]

        dropped = wait_for(called_off, 60)
        wait_for(lambda: len(called_off()) == 2, 30)
        for r in called_off():
            assert r["event"] == "dropped" and r["pod"]["name"] == "a-0"
            assert "after the process was let go" in r["reason"] and "repair that mount" in r["reason"]
        assert dropped and [e["pod"]["namespace"] for e in s.entries()] == ["tenant-b"]
        assert os.listdir(spool.tmp_dir(s.settings.spool_dir)) == []
        assert s.listener.outcomes.get("called off") == 2

        # The server answers again: the blocked threads come back, publish nothing, and give the
        # pod's slots back, so its next crash is captured.
        os.kill(served.pid, signal.SIGCONT)
        assert s.listener.wait_idle(60)
        assert serving_settles_at(0)
        assert [e["pod"]["namespace"] for e in s.entries()] == ["tenant-b"]
        assert not [r for r in of_namespace(s.journal(), "tenant-a") if r["event"] == "captured"]
        a_container(["/app/crasher", "segv"]).run()
        wait_for(lambda: [r for r in of_namespace(s.journal(), "tenant-a") if r["event"] == "captured"], 30)
        assert sorted(e["pod"]["namespace"] for e in s.entries()) == ["tenant-a", "tenant-b"]


@contextmanager
def crashed_on_stopped_server(rootfs: str, volume: str, served: fusefs.Mount, *args: str) -> Iterator[None]:
    """Tenant A's pod runs ``args`` (``hang``) with ``served`` at /served; once it is ready the FUSE
    server stops answering and the process gets SIGSEGV. The block runs while the pod does."""
    fuse = [{"destination": "/served", "type": "bind", "source": served.path, "options": ["rbind", "rw"]}]
    a = runc.Container(rootfs, ["/bin/sh", "-c", " ".join(args) + "; true"], volume=volume,
                       annotations=pod("tenant-a", "a-0"), mounts=fuse)  # fmt: skip
    with a.running():
        [pid] = processes("\x00".join(args[:2]).encode())
        os.kill(served.pid, signal.SIGSTOP)  # the pod's server answers no more
        os.kill(pid, signal.SIGSEGV)
        yield


def _held_in_spool(spool_dir: str) -> int:
    """Bytes on disk of the spool's files this process still holds open after they were removed."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(spool_dir + "/") and target.endswith(" (deleted)"):
                held += os.fstat(int(fd)).st_blocks * 512
        except OSError:
            continue  # closed meanwhile
    return held


def test_a_called_off_dump_blocked_for_good_keeps_no_room_of_the_spool(
    rootfs: str, programs: dict[str, str], tmp_path
) -> None:
    """A pod's core of 48 MiB that does not compress, its executable on a FUSE mount that stops
    answering: the dump is read and its process let go, then its thread blocks on the executable
    until the deadline calls it off. Its copy of the core, removed from the spool, must not keep its
    blocks on the spool's filesystem (unseen by the spool's accounting) while the thread waits."""
    source = tmp_path / "served"
    source.mkdir()
    shutil.copy(programs["hang"], source / "hang")
    with socket_capture(parallel=1) as s, fusefs.local(str(source)) as served:
        s.settings.timeout = 4
        try:
            with crashed_on_stopped_server(rootfs, s.volume, served, "/served/hang", "noise", "48"):
                [dropped] = wait_for(lambda: of_namespace(s.journal(), "tenant-a"), 60)
            assert dropped["event"] == "dropped" and "after the process was let go" in dropped["reason"]
            assert serving_settles_at(1)  # its thread still waits on the executable
            assert os.listdir(spool.tmp_dir(s.settings.spool_dir)) == []
            assert _held_in_spool(s.settings.spool_dir) < 1 << 20
        finally:
            os.kill(served.pid, signal.SIGCONT)
        assert s.listener.wait_idle(60)
        assert s.entries() == []


def test_a_core_that_stops_coming_gives_the_node_wide_slots_back_before_its_deadline(
    rootfs: str, tmp_path
) -> None:
    """A pod maps a file it serves itself over FUSE, asks file mappings into its core
    (coredump_filter) and stops its server: the kernel, dumping, waits on the file's first page for
    as long as the server sleeps. The node reads one core at once; once the core stops coming the
    dump gives that slot back, before its deadline, and another pod's crash is captured whole."""
    source = tmp_path / "served"
    source.mkdir()
    (source / "data").write_bytes(os.urandom(64 << 20))
    with socket_capture(parallel=1) as s, fusefs.local(str(source)) as served:
        s.settings.timeout = 15  # past coresocket.STALL (5 s)
        try:
            with crashed_on_stopped_server(rootfs, s.volume, served, "/app/hang", "mapped", "/served/data"):
                wait_for(lambda: s.listener.dumps._value == 0, 30)  # type: ignore[attr-defined]
                wait_for(lambda: s.listener.dumps._value == 1, 60)  # type: ignore[attr-defined]
                assert not of_namespace(s.journal(), "tenant-a"), "given back only when called off"
                assert serving_threads() == 1  # A's dump is still read
                b = runc.Container(
                    rootfs, ["/app/crasher", "segv"], volume=s.volume, annotations=pod("tenant-b", "b-0")
                )
                b.run()
                wait_for(lambda: of_namespace(s.journal(), "tenant-b"), 30)
                assert [(r["event"], r.get("reason")) for r in of_namespace(s.journal(), "tenant-b")] == [
                    ("captured", None)
                ]
                [entry] = s.entries()
                assert entry["pod"]["namespace"] == "tenant-b" and not entry["core"]["truncated"]
                # A's deadline still calls it off, while its core is read
                [dropped] = wait_for(lambda: of_namespace(s.journal(), "tenant-a"), 60)
                assert dropped["event"] == "dropped" and "while its core was read" in dropped["reason"]
                os.kill(served.pid, signal.SIGCONT)  # the kernel ends its dump, and the process
        finally:
            os.kill(served.pid, signal.SIGCONT)
        assert s.listener.wait_idle(60)
        assert [e["pod"]["namespace"] for e in s.entries()] == ["tenant-b"]
