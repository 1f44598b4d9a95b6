"""A crashed process's names are data: never console markup, never terminal escapes.

Tenant A's pod runs an executable whose path holds Rich markup and an escape sequence and
crashes in a function whose ELF symbol does the same, with a right-to-left override and a
zero-width space; tenant B's pod (another namespace) crashes plainly. Both go through the
real capture handler, the agent and the catalog; then every reader's view (``corevault
list``, ``groups``, ``info``, ``kubectl corevault list``, the web UI's pages, the agent's log
lines and the Kubernetes Event text) must show A's strings as text and still show B's crash.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from corevault import printable
from corevault.kube.events import message
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from testbed import runc, servers
from testbed.fakekube import FakeKube
from tests.conftest import Capture
from tests.tenants import alerts_sent, analysed, pod, slack_sink
from tests.test_triage_alerts import Receiver

pytestmark = pytest.mark.crash
CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
EVIL_DIR, EVIL_NAME = "in[", "red][bold]\x1b]0;pwned\x07x"  # the path /app/in[/red][bold]…
EVIL_EXE = f"/app/{EVIL_DIR}/{EVIL_NAME}"
EVIL_SYMBOL = "crash[/red][bold]\x1b[2J\u202e\u200b"  # a right-to-left override, a zero-width space
#: what no page, line or message may hold as it is
RAW = ("\x1b", "\x07", "\u202e", "\u200b")
ADMIN = "admin-token-0123456789"


@pytest.fixture
def hostile_rootfs(programs: dict[str, str], tmp_path) -> str:
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"crasher": programs["crasher"], "markup": programs["markup"]}
    )
    os.mkdir(os.path.join(root, "app", EVIL_DIR))
    shutil.copy2(programs["markup"], os.path.join(root, EVIL_EXE.lstrip("/")))
    return root


def test_markup_and_escapes_from_a_crash_are_shown_as_text(
    capture: Capture, hostile_rootfs: str, tmp_path
) -> None:
    capture.crash(hostile_rootfs, [EVIL_EXE], annotations=pod("tenant-a", "a-0"))
    capture.crash(hostile_rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
    assert len(capture.entries()) == 2, capture.journal()

    with Receiver(servers.free_port()) as receiver:
        settings = analysed(capture, tmp_path, slack_sink(receiver.url))
        assert alerts_sent(settings) == 1
    cfg = tmp_path / "c.toml"
    [slack] = receiver.bodies("/slack")
    said = [
        slack["text"],
        *(t["text"] for b in slack["blocks"] for t in [b.get("text") or {}, *b.get("fields", [])] if t),
    ]
    assert not any(c in text for text in said for c in RAW), said
    assert printable.printable(EVIL_SYMBOL) in slack["text"], said

    env = {**os.environ, "COREVAULT_CONFIG": str(cfg)}
    listed = subprocess.run([CLI, "list", "--json"], capture_output=True, text=True, env=env, check=True)
    rows = {json.loads(line)["namespace"]: json.loads(line) for line in listed.stdout.splitlines()}
    assert rows["tenant-a"]["exe"] == EVIL_EXE and EVIL_SYMBOL in rows["tenant-a"]["title"]

    shown_exe, shown_symbol = printable.printable(EVIL_EXE), printable.printable(EVIL_SYMBOL)
    for args in (["list"], ["groups"], ["info", rows["tenant-a"]["id"]]):
        out = subprocess.run(
            [CLI, *args], capture_output=True, text=True, env={**env, "COLUMNS": "400"}, check=False
        )
        assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out.stderr)
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout, (args, out.stdout)
        assert shown_symbol in out.stdout, (args, out.stdout)  # the markup is there, as text
        if args[0] != "groups":
            assert shown_exe in out.stdout, (args, out.stdout)
        if args[0] != "info":
            assert "crash_here" in out.stdout  # tenant B's crash is listed too

    fake = FakeKube().start()
    try:
        kenv = {**env, "KUBECONFIG": fake.kubeconfig(str(tmp_path / "kubeconfig"), namespace="tenant-a"),
                "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}  # fmt: skip
        out = subprocess.run(
            ["kubectl", "corevault", "list"], capture_output=True, text=True, env=kenv, check=False
        )
    finally:
        fake.stop()
    assert out.returncode == 0 and "\x1b" not in out.stdout and shown_exe in out.stdout, out.stderr

    [record] = [r for r in capture.journal() if r.get("event") == "captured" and r["exe"] == EVIL_EXE]
    text = message(record)
    assert "\x1b" not in text and "\x07" not in text and shown_exe in text

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{ADMIN}"\nnamespaces = ["*"]\n')
    tokens.chmod(0o600)
    crash = rows["tenant-a"]
    with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as url:
        pages = [
            httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {ADMIN}"})
            for path in ("/", "/crashes", f"/crashes/{crash['id']}", f"/groups/{crash['signature']}")
        ]
    for page in pages:  # a browser shows what a terminal would: the escapes, as text
        assert page.status_code == 200 and not any(c in page.text for c in RAW), page.url
        assert html.escape(shown_symbol) in page.text, page.url
    assert html.escape(shown_exe) in pages[2].text  # the crash's own page names its executable

    formatter = printable.Formatter("%(message)s")
    line = formatter.format(
        logging.LogRecord("t", logging.INFO, __file__, 1, "crash of %s\nforged", (EVIL_EXE,), None)
    )
    assert line == f"crash of {shown_exe}\\x0aforged"
