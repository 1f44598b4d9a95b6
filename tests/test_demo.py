"""``make demo`` is what a newcomer runs first: it must keep working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from corevault import hostsetup

pytestmark = pytest.mark.crash


def test_demo_runs_and_restores_the_host() -> None:
    before = hostsetup.read_sysctls()
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    config = os.path.join(d, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{d}/s"\n')
    out = subprocess.run(
        [sys.executable, "-m", "testbed.demo"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "COREVAULT_CONFIG": config, "COLUMNS": "160"},
    )  # fmt: skip
    shutil.rmtree(d, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert hostsetup.read_sysctls() == before
    for words in (
        "core-!app!crasher-1-",
        "SIGABRT in parse_config",
        "crash_here",
        "nothing: no core-pattern",
    ):
        assert words in out.stdout, words
