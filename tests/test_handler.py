"""The handler started by hand the way the kernel starts it, against live host processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from corevault import spool
from tests.conftest import Capture, kernel_args, run_handler

pytestmark = pytest.mark.crash


@pytest.fixture
def sleeper() -> Iterator[tuple[int, int]]:
    """A live process standing in for the crashed one, and its pidfd."""
    proc = subprocess.Popen(["sleep", "120"])
    pidfd = os.pidfd_open(proc.pid)
    yield proc.pid, pidfd
    os.close(pidfd)
    proc.kill()
    proc.wait()


def host_rule(capture: Capture, extra: str = "") -> str:
    target = os.path.join(capture.dir, "crashes")
    os.mkdir(target)
    capture.configure(f'{extra}[[rules]]\nexe = "*/sleep"\npattern = "{target}/core-%e-%p"\n')
    return target


def test_host_rule_captures_a_process_outside_containers(capture: Capture, sleeper) -> None:
    pid, pidfd = sleeper
    target = host_rule(capture)
    data = os.urandom(300000) + bytes(2 << 20)
    assert run_handler(capture, kernel_args(pid, pidfd_fd=pidfd), data, pidfd).returncode == 0
    with open(os.path.join(target, f"core-sleep-{pid}"), "rb") as f:
        assert f.read() == data
    [meta] = capture.entries()
    assert meta["pod"]["source"] == "rules" and meta["process"]["exe"] == "/usr/bin/sleep"


def test_timeout_releases_the_process_and_leaves_nothing_half_written(capture: Capture, sleeper) -> None:
    pid, pidfd = sleeper
    target = host_rule(capture, "[capture]\ntimeout = 1\n")
    read_end, write_end = os.pipe()
    os.write(write_end, b"\x7fELF" + bytes(60000))  # the kernel stalls mid-core and never closes the pipe
    try:
        result = run_handler(capture, kernel_args(pid, pidfd_fd=pidfd), read_end, pidfd)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 0
    assert any("handler timeout after 1s" in r.get("reason", "") for r in capture.journal())  # its own timer
    assert os.listdir(target) == []
    assert os.listdir(spool.tmp_dir(capture.spool)) == [] and capture.entries() == []
    [record] = capture.journal()
    assert record["event"] == "dropped" and "handler timeout after 1s" in record["reason"]


def test_bad_arguments_are_journaled(capture: Capture) -> None:
    result = run_handler(capture, ["1", "2"], b"", None)
    assert result.returncode == 2
    [record] = capture.journal()
    assert record["event"] == "error" and "expected 16 arguments" in record["reason"]


def test_broken_settings_fall_back_to_defaults_and_say_so(capture: Capture, sleeper) -> None:
    pid, pidfd = sleeper
    with open(capture.snapshot, "w") as f:
        f.write("{half a snapshot")
    # With built-in defaults the journal is /var/lib/corevault's; remove what this test adds there.
    existed = os.path.exists("/var/lib/corevault")
    try:
        result = run_handler(capture, kernel_args(pid, pidfd_fd=pidfd), b"core", pidfd)
        default_journal = spool.read_journal("/var/lib/corevault/spool")
    finally:
        if not existed:
            shutil.rmtree("/var/lib/corevault", ignore_errors=True)
    assert result.returncode == 0
    mine = [r for r in default_journal if r.get("pid") == pid]
    assert mine and "run 'corevault install' again" in mine[-1]["warnings"][0]


def test_handler_starts_with_stdout_and_stderr_closed(capture: Capture, sleeper) -> None:
    """The kernel gives the handler fd 0 only; a file opened first must not become stdout."""
    pid, pidfd = sleeper
    target = host_rule(capture)
    data = os.urandom(10000)
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&- 2>&-', capture.handler, "-c", capture.snapshot, *kernel_args(pid, pidfd_fd=pidfd)],
        input=data, pass_fds=(pidfd,), cwd="/", check=False,
    )  # fmt: skip
    assert result.returncode == 0
    with open(os.path.join(target, f"core-sleep-{pid}"), "rb") as f:
        assert f.read() == data


def test_a_crash_of_the_handler_itself_does_not_call_the_handler_again(capture: Capture, sleeper) -> None:
    pid, pidfd = sleeper
    host_rule(capture, '[[rules]]\nexe = "*python*"\npattern = "/tmp/never/core-%p"\n')
    read_end, write_end = os.pipe()
    os.write(write_end, b"\x7fELF" + bytes(1000))
    # with the core limit the kernel gives its pipe helpers (test_handler_crash.py checks that it does)
    handler = subprocess.Popen(
        ["prlimit", "--core=1:1", capture.handler, "-c", capture.snapshot, *kernel_args(pid, pidfd_fd=pidfd)],
        stdin=read_end, pass_fds=(pidfd,), cwd="/",
    )  # fmt: skip
    os.close(read_end)
    time.sleep(1)  # well into its read loop
    handler.send_signal(signal.SIGSEGV)
    assert handler.wait(timeout=30) == -signal.SIGSEGV
    os.close(write_end)
    time.sleep(1)
    assert [r for r in capture.journal() if r.get("pid") == handler.pid] == []
