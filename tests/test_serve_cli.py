"""``corevault serve`` as a command: it starts on an empty vault, and serves HTTPS when given a certificate."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import httpx
import pytest

from testbed import servers, tls

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


@pytest.mark.servers
def test_serve_speaks_https_with_the_given_certificate(tmp_path) -> None:
    (tmp_path / "tls").mkdir()
    cert, key = tls.self_signed(str(tmp_path / "tls"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\n')
    port = servers.free_port()
    server = subprocess.Popen(
        [CLI, "-c", str(cfg), "serve", "--no-auth", "--listen", f"127.0.0.1:{port}", "--tls-cert", cert,
         "--tls-key", key],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    trust = ssl.create_default_context(cafile=cert)
    try:
        servers.wait_port(port)
        r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trust)
        assert r.json() == {"status": "ok"}
        assert httpx.get(f"https://127.0.0.1:{port}/api/v1/crashes", verify=trust).json() == {
            "items": [],
            "next": None,
        }  # an empty vault is a valid one
        page = httpx.get(f"https://127.0.0.1:{port}/", verify=trust)
        assert page.status_code == 200 and "No crash groups" in page.text
    finally:
        server.terminate()
        server.wait(30)
    assert f"serving https://127.0.0.1:{port}/" in server.stderr.read()  # type: ignore[union-attr]
