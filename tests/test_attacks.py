"""Each trap of writing as root where a container controls the directory, attacked for real.

Every test prepares its trap from inside a real container (busybox ``ln``, ``mkfifo``,
``mknod``…) right before the process crashes, then checks that the host is untouched
and the trap is as the container left it.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import Capture, kernel_args, run_handler

pytestmark = pytest.mark.crash


def crash_with_trap(capture: Capture, rootfs: str, setup: str, pattern: str) -> None:
    capture.crash(
        rootfs,
        ["/bin/sh", "-c", f"{setup} && exec /app/crasher segv"],
        annotations={"corevault.io/core-pattern": pattern},
    )


@pytest.fixture
def host_secret(capture: Capture) -> str:
    path = os.path.join(capture.dir, "host-secret")
    with open(path, "w") as f:
        f.write("secret\n")
    return path


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_symlink_at_the_core_name_is_not_followed(capture: Capture, rootfs: str, host_secret: str) -> None:
    crash_with_trap(capture, rootfs, f"ln -s {host_secret} /data/dump-a/core", "/data/dump-a/core")
    assert read(host_secret) == "secret\n"
    assert os.readlink(os.path.join(capture.volume, "core")) == host_secret
    assert capture.volume_files() == ["core", "core.1"]
    assert stat.S_ISREG(os.lstat(os.path.join(capture.volume, "core.1")).st_mode)


def test_symlink_to_a_missing_host_path_creates_nothing(capture: Capture, rootfs: str) -> None:
    target = os.path.join(capture.dir, "would-be-created")
    crash_with_trap(capture, rootfs, f"ln -s {target} /data/dump-a/core", "/data/dump-a/core")
    assert not os.path.lexists(target)
    assert capture.volume_files() == ["core", "core.1"]


@pytest.mark.parametrize("link", ["{hostdir}", "../../../../../../../..{hostdir}"])
def test_symlinked_directory_on_the_way_is_refused(capture: Capture, rootfs: str, link: str) -> None:
    hostdir = os.path.join(capture.dir, "hostdir")
    os.mkdir(hostdir)
    crash_with_trap(
        capture, rootfs, f"ln -s {link.format(hostdir=hostdir)} /data/dump-a/sub", "/data/dump-a/sub/core"
    )
    assert os.listdir(hostdir) == []
    dropped = [r for r in capture.journal() if r["event"] == "dropped"]
    assert any("/data/dump-a/sub is a symbolic link" in r["reason"] for r in dropped), dropped
    assert len(capture.entries()) == 1  # the vault copy is still taken


def test_hard_link_at_the_core_name_is_not_written_through(capture: Capture, rootfs: str) -> None:
    precious = os.path.join(capture.volume, "precious")
    with open(precious, "w") as f:
        f.write("keep me\n")
    crash_with_trap(capture, rootfs, "ln /data/dump-a/precious /data/dump-a/core", "/data/dump-a/core")
    assert read(precious) == "keep me\n"
    assert os.stat(precious).st_nlink == 2
    assert os.path.getsize(os.path.join(capture.volume, "core.1")) > 0


def test_fifo_at_the_core_name_is_never_opened(capture: Capture, rootfs: str) -> None:
    # a handler that opened the FIFO would block there: the crash would not finish in runc's timeout
    crash_with_trap(capture, rootfs, "mkfifo /data/dump-a/core", "/data/dump-a/core")
    assert not any("timeout" in r.get("reason", "") for r in capture.journal())
    assert stat.S_ISFIFO(os.lstat(os.path.join(capture.volume, "core")).st_mode)
    assert os.path.getsize(os.path.join(capture.volume, "core.1")) > 0


def test_device_at_the_core_name_is_left_alone(capture: Capture, rootfs: str) -> None:
    crash_with_trap(capture, rootfs, "mknod /data/dump-a/core c 1 3", "/data/dump-a/core")
    st = os.lstat(os.path.join(capture.volume, "core"))
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert os.path.getsize(os.path.join(capture.volume, "core.1")) > 0


def test_existing_file_is_never_overwritten(capture: Capture, rootfs: str) -> None:
    crash_with_trap(capture, rootfs, "echo old > /data/dump-a/core", "/data/dump-a/core")
    assert read(os.path.join(capture.volume, "core")) == "old\n"
    assert capture.volume_files() == ["core", "core.1"]


def test_directory_replaced_by_a_symlink_to_the_host_root_is_refused(capture: Capture, rootfs: str) -> None:
    crash_with_trap(capture, rootfs, "ln -s / /data/dump-a/etc", "/data/dump-a/etc/corevault-pwned")
    assert not os.path.exists("/etc/corevault-pwned")
    assert any("symbolic link" in r["reason"] for r in capture.journal() if r["event"] == "dropped")


def test_dotdot_in_the_pattern_is_refused(capture: Capture, rootfs: str) -> None:
    outside = os.path.join(capture.dir, "escaped")
    crash_with_trap(capture, rootfs, "true", "/data/dump-a/../../../../../../" + outside.lstrip("/"))
    assert not os.path.exists(outside)
    assert capture.volume_files() == [] and capture.entries() == []
    [record] = capture.journal()
    assert record["event"] == "refused" and "'..' component" in record["reason"]


@pytest.mark.parametrize("comm", ["..", "../../etc"])
def test_process_name_cannot_climb_out_of_the_volume(capture: Capture, rootfs: str, comm: str) -> None:
    capture.crash(
        rootfs, ["/app/crasher", "comm", comm], annotations={"corevault.io/core-pattern": "/data/dump-a/%e"}
    )
    assert capture.volume_files() == ["!." if comm == ".." else "..!..!etc"]
    assert set(os.listdir(capture.dir)) == {"c.toml", "h", "state", "vol"}


def test_reused_pid_is_refused(capture: Capture) -> None:
    """The PID names a live process, but the kernel's pidfd is of another (already dead) one."""
    capture.configure('[[rules]]\nexe = "*/sleep"\npattern = "/tmp/never/core-%p"\n')
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["sleep", "0"])
    pidfd = os.pidfd_open(dead.pid)
    dead.wait()
    try:
        result = run_handler(capture, kernel_args(live.pid, pidfd_fd=pidfd), b"x" * 4096, pidfd)
    finally:
        os.close(pidfd)
        live.kill()
        live.wait()
    assert result.returncode == 0
    [record] = capture.journal()
    assert record["event"] == "refused" and "no longer belongs" in record["reason"]
    assert capture.entries() == []


def test_pidfd_of_a_different_live_process_is_refused(capture: Capture) -> None:
    capture.configure('[[rules]]\nexe = "*/sleep"\npattern = "/tmp/never/core-%p"\n')
    a, b = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(b.pid)
    try:
        run_handler(capture, kernel_args(a.pid, pidfd_fd=pidfd), b"x" * 4096, pidfd)
    finally:
        os.close(pidfd)
        for p in (a, b):
            p.kill()
            p.wait()
    [record] = capture.journal()
    assert record["event"] == "refused"
