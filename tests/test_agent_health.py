"""The agent's /healthz and /readyz, on the host: ready while it captures, unready when it cannot.

The same probes run from the rendered DaemonSet against the agent in the image in test_image.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from corevault import hostsetup
from testbed import servers, sysctl

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
pytestmark = pytest.mark.crash


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - a loopback URL of the test
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_ready_while_capturing_unready_when_core_pattern_or_listener_is_gone() -> None:
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    port = servers.free_port()
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[agent]\nmetrics = "127.0.0.1:{port}"\nanalyze = false\n')
    url = f"http://127.0.0.1:{port}"
    try:
        with sysctl.core_settings() as saved:
            agent = subprocess.Popen(
                [CLI, "-c", cfg, "agent", "--install", "socket"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        status, body = get(f"{url}/readyz")
                    except OSError:
                        status, body = 0, {}
                    if status == 200:
                        break
                    assert agent.poll() is None and time.monotonic() < deadline, (status, body)
                    time.sleep(0.1)
                assert body == {"live": True, "ready": True, "problems": []}
                assert hostsetup.read_sysctls()["core_pattern"].startswith("@")
                metrics = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()  # noqa: S310
                assert "corevault_capture_installed" in metrics  # the metrics are still served beside

                # an administrator takes core_pattern back: unready (and said why), but alive
                hostsetup.write_sysctl(hostsetup.SYSCTLS["core_pattern"], "core")
                status, body = get(f"{url}/readyz")
                assert status == 503 and "core_pattern is 'core'" in body["problems"][0], body
                assert get(f"{url}/healthz")[0] == 200

                # and nothing listens for the kernel any more: unready for that too
                os.unlink(hostsetup.socket_path(f"{d}/s"))
                listener = hostsetup.socket_path(f"{d}/s")
                status, body = get(f"{url}/readyz")
                assert status == 503
                assert any(f"nothing listens on {listener}" in p for p in body["problems"]), body
            finally:
                agent.send_signal(signal.SIGTERM)
                _, err = agent.communicate(timeout=60)
            assert agent.returncode == 0, err
            assert hostsetup.read_sysctls() == saved
    finally:
        shutil.rmtree(d, ignore_errors=True)
