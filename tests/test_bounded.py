"""A helper program bounded in time and resources: its limits hold, and a timeout ends all of it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess

import pytest

from corevault import bounded
from tests.waiting import exited, wait_for


def test_limits_hold_and_the_helper_dumps_no_core(tmp_path) -> None:
    out, _, status = bounded.run(
        ["sh", "-c", f"ulimit -c; exec head -c 100000 /dev/zero > {tmp_path}/big"],
        timeout=30,
        limits={resource.RLIMIT_FSIZE: 4096},
    )
    assert out.split() == [b"0"] and status == -signal.SIGXFSZ
    assert os.path.getsize(tmp_path / "big") == 4096


def test_a_timeout_kills_the_helper_and_everything_it_started(tmp_path) -> None:
    pid_file = tmp_path / "child"
    with pytest.raises(subprocess.TimeoutExpired):
        bounded.run(
            ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"],
            timeout=1,
            limits={},
            stderr=subprocess.STDOUT,
        )
    child = int(pid_file.read_text())
    # a killed process needs a moment to exit, and reaping by whoever inherits it may lag
    wait_for(lambda: exited(child), "the helper's own child to end after the timeout", timeout=5)
