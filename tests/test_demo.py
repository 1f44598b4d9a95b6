"""``make demo`` is what a newcomer runs first: it must keep working."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest

from testbed import servers, sysctl

pytestmark = pytest.mark.crash


def settled() -> dict[str, str]:
    """The host's core settings while no test of another process holds them changed."""
    with sysctl.core_settings() as now:
        return now


def test_demo_runs_and_restores_the_host() -> None:
    before = settled()
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    config = os.path.join(d, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{d}/s"\n')
    port = servers.free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "testbed.demo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COREVAULT_CONFIG": config, "COLUMNS": "160", "PYTHONUNBUFFERED": "1",
             "COREVAULT_DEMO_PORT": str(port)},
    )  # fmt: skip
    try:
        lines = []
        for line in demo.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Serving http://127.0.0.1:"):
                break
        stdout = "".join(lines)
        assert f"Serving http://127.0.0.1:{port}/" in stdout, stdout[-3000:] + demo.stderr.read()  # type: ignore[union-attr]
        servers.wait_port(port)
        url = f"http://127.0.0.1:{port}"
        crashes = httpx.get(url + "/api/v1/crashes").json()["items"]
        assert {c["pod"] for c in crashes} == {"checkout-7d9f4", "pricing-5c6b8", "ingest-0"}
        for c in crashes:  # each with its stack, file:line included
            crash = httpx.get(f"{url}/api/v1/crashes/{c['id']}").json()
            crashed = next(t for t in crash["report"]["threads"] if t["crashed"])
            assert any(f["file"] and f["line"] for f in crashed["frames"]), crash["id"]
            assert httpx.get(f"{url}/crashes/{c['id']}").status_code == 200
        groups = httpx.get(url + "/api/v1/groups").json()["items"]
        assert {g["title"] for g in groups} >= {
            "SIGABRT in parse_config ← main",
            "SIGSEGV in crash_here ← main",
        }
        assert "SIGABRT in parse_config ← main" in httpx.get(url + "/").text
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
        shutil.rmtree(d, ignore_errors=True)
    assert code == 0
    assert settled() == before
    for words in (
        "core-!app!crasher-1-",
        "SIGABRT in parse_config",
        "crash_here",
        "nothing: no core-pattern",
    ):
        assert words in stdout, words
