"""The mistakes of a tired person at 3 a.m.: each is one line that says what to do, a non-zero exit, nothing lost.

A typo'd flag, a signal or state that is not one, a time already past, a server given without
its scheme or pointing at another web service, no token or a stale one, an output path in a
directory that does not exist, an empty vault, a crash not shipped yet, a store without
credentials or not answering, a port in use, a missing kubeconfig, a damaged stored core, a
download whose connection breaks off, Ctrl-C in the middle of a download and Ctrl-C inside
``corevault gdb``; against the fixture's real crashes, the real server (uvicorn, in this
process) and real gdb under a real terminal (a pty).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from corevault import spool
from corevault.cli import kubectl
from corevault.server.access import Open
from corevault.server.app import create_app
from testbed import servers
from tests.clirun import corevault
from tests.conftest import FIXTURE_SPOOL, FixtureVault
from tests.nodes import CLI, make_node
from tests.test_server import TOKENS, serve


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr and "╭" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


# (arguments after "-c CONFIG", exit code, words of the one line); "{a}" is crash a's id
MISTAKES = [
    (
        ["list", "--namspace", "a"],
        2,
        ["No such option: --namspace", "--namespace", "see 'corevault list -h'"],
    ),
    (["list", "--signal", "SEGFAULT"], 2, ["signal 'SEGFAULT' is not a signal", "SEGV"]),
    (["list", "--signal", "99"], 2, ["signal '99' is not a signal", "1 to 64"]),
    (["list", "--since", "yesterday"], 2, ["use 30m, 2h, 7d", "see 'corevault list -h'"]),
    (["list", "--since", "1h", "--until", "2h"], 2, ["--since 1h is not before --until 2h"]),
    (["groups", "--state", "opne"], 2, ["state 'opne'", "open, resolved"]),
    (
        ["groups", "ignore", "{sig}", "--until", "2001-01-01"],
        2,
        ["until 2001-01-01 00:00:00 UTC is already past"],
    ),
    (["groups", "ignore", "{sig}", "--until", "0d"], 2, ["is already past; ignore until a later time"]),
    (["groups", "resolve"], 2, ["Missing argument 'SIGNATURE'", "see 'corevault groups resolve -h'"]),
    (["dump", "{a}", "-o", "/nonexistent/dir/core"], 1, ["cannot write the core to /nonexistent/dir/core"]),
    (["info", "{a}x"], 4, ["no crash '", "'corevault list' shows the ids"]),
    (["analyze", "{a}x"], 4, ["x is not a core file, nor a crash in the spool"]),
    (["analyze", "/etc/os-release"], 1, ["/etc/os-release: unreadable: not an ELF file"]),
    (["analyze", "{a}", "--backend", "lldb"], 2, ["unknown backend 'lldb'; use drgn or gdb"]),
    (
        ["analyze", "{a}", "--timeout", "-1"],
        2,
        ["Invalid value for '--timeout'", "see 'corevault analyze -h'"],
    ),
    (["pattern", "expand", "/d/core-%p", "--pid", "-5"], 2, ["Invalid value for '--pid'"]),
    (["snapshot", "--pod", "checkout"], 2, ["--pod 'checkout': expected NAMESPACE/NAME"]),
    (["snapshot"], 2, ["name a process: a PID or --pod NS/NAME"]),
]


@pytest.mark.parametrize(("args", "code", "words"), MISTAKES, ids=[" ".join(a) for a, _, _ in MISTAKES])
def test_a_mistake_is_one_line_that_says_what_to_do(
    fixture_vault: FixtureVault, args: list[str], code: int, words: list[str]
) -> None:
    sig = json.loads(
        corevault("-c", fixture_vault.node.config, "info", "--json", fixture_vault.ids["a"]).stdout
    )
    values = {"a": fixture_vault.ids["a"], "sig": sig["signature"]}
    out = corevault("-c", fixture_vault.node.config, *(a.format(**values) for a in args))
    assert out.returncode == code, out.stderr
    err = one_line(out)
    assert all(w in err for w in words), err


NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}  # fmt: skip
SOME_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "corevault-test", "AWS_SECRET_ACCESS_KEY": "corevault-test-secret"}


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            NO_CREDENTIALS,
            "Unable to locate credentials: set [vault.s3] credentials_file, or AWS_ACCESS_KEY_ID",
        ),
        (SOME_CREDENTIALS, "check [vault.s3] endpoint and that the store is up"),
    ],
    ids=["no credentials", "nothing listens"],
)
def test_a_store_that_cannot_be_read_names_the_setting_to_check(
    fixture_vault_copy: FixtureVault, env: dict[str, str | None], words: str, tmp_path
) -> None:
    with open(fixture_vault_copy.node.config, "a") as f:  # the catalog's crashes, their blobs in a bucket
        f.write(
            f'[vault]\nstore = "s3://cores/p"\n[vault.s3]\nendpoint = "http://127.0.0.1:{servers.free_port()}"\n'
        )
    no_proxy = {"HTTPS_PROXY": None, "HTTP_PROXY": None, "https_proxy": None, "http_proxy": None}
    out = corevault(
        "-c", fixture_vault_copy.node.config, "dump", fixture_vault_copy.ids["a"], "-o", str(tmp_path / "core"),
        env={**env, **no_proxy},
    )  # fmt: skip
    assert out.returncode == 1 and words in one_line(out)
    assert list(tmp_path.iterdir()) == []


def test_rm_with_a_mistyped_id_among_several_removes_none(fixture_vault_copy: FixtureVault) -> None:
    ids = fixture_vault_copy.ids
    out = corevault("-c", fixture_vault_copy.node.config, "rm", ids["a"], ids["b"] + "x", ids["host"])
    assert out.returncode == 4 and f"no crash '{ids['b']}x'" in one_line(out)
    left = corevault("-c", fixture_vault_copy.node.config, "list", "--json").stdout
    assert all(i in left for i in ids.values())


def test_a_damaged_core_in_the_vault_is_reported_not_handed_out(
    fixture_vault_copy: FixtureVault, tmp_path
) -> None:
    """A zstd stream cut short decompresses to a short core without an error: dump must not call it done."""
    crash = fixture_vault_copy.ids["a"]
    stored = os.path.join(
        fixture_vault_copy.node.settings.vault_store.removeprefix("file://"), "crashes", crash
    )
    with open(os.path.join(stored, "core.zst"), "r+b") as f:
        f.truncate(1000)  # the store lost the object's end
    kept = tmp_path / "core"
    kept.write_bytes(b"the core dumped yesterday")
    for out in (
        corevault("-c", fixture_vault_copy.node.config, "dump", crash, "-o", str(kept), "--force"),
        corevault("-c", fixture_vault_copy.node.config, "dump", crash, "-o", "-"),
    ):
        assert out.returncode == 1 and f"the vault's copy of the core of {crash} is damaged" in one_line(out)
    assert kept.read_bytes() == b"the core dumped yesterday" and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["core"]


def test_info_on_a_crash_not_shipped_yet_says_where_it_is() -> None:
    entry = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))[0]
    node = make_node({"dir": FIXTURE_SPOOL, "ids": [entry]})  # captured here; no agent has run
    out = corevault("-c", node.config, "info", entry)
    assert out.returncode == 4
    assert f"is in this node's spool, not shipped yet: 'corevault analyze {entry}' reads it" in one_line(out)


def test_the_plugin_s_typo_is_one_line_too(capsys) -> None:
    assert kubectl.main(["lst"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kubectl corevault: error: No such command 'lst'") and len(err.splitlines()) == 1, (
        err
    )


def test_an_empty_vault_says_that_nothing_matches(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    crashes = corevault("-c", str(cfg), "list")
    assert crashes.returncode == 0 and crashes.stderr == "no crashes match\n", crashes.stderr
    groups = corevault("-c", str(cfg), "groups")
    assert (
        groups.returncode == 0 and "no crash groups match" in groups.stderr and "--state all" in groups.stderr
    )


@pytest.mark.servers
def test_a_server_answers_a_bad_filter_as_the_local_vault_does(fixture_vault: FixtureVault) -> None:
    with serve(fixture_vault) as s:
        env = {"COREVAULT_TOKEN": TOKENS["admin"], "COREVAULT_SERVER": s.url}
        out = corevault("list", "--signal", "SEGFAULT", env=env)
        assert out.returncode == 2 and "signal 'SEGFAULT' is not a signal" in one_line(out)
        headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
        for path in ("/api/v1/crashes", "/api/v1/groups"):
            r = httpx.get(s.url + path, params={"signal": "SEGFAULT"}, headers=headers)
            assert r.status_code == 400 and "is not a signal" in r.json()["detail"], r.text
        ok = httpx.get(s.url + "/api/v1/groups", params={"signal": "8"}, headers=headers).json()["items"]
        assert ok and all(g["signal_name"] == "SIGFPE" for g in ok)  # a number names the same signal
        no_scheme = corevault("list", env={**env, "COREVAULT_SERVER": s.url.removeprefix("http://")})
        assert no_scheme.returncode == 2 and "http:// or https://" in one_line(no_scheme)
        no_token = corevault("list", env={**env, "COREVAULT_TOKEN": None})
        assert (
            no_token.returncode == 1
            and "needs a token: set COREVAULT_TOKEN or pass --token-file" in one_line(no_token)
        )
        wrong = corevault("list", env={**env, "COREVAULT_TOKEN": "yesterdays-token-0123"})
        assert wrong.returncode == 1 and "did not accept the token" in one_line(wrong)


def test_serve_outside_a_cluster_without_a_kubeconfig_says_what_to_set(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    out = subprocess.run(
        [CLI, "-c", str(cfg), "serve", "--kubernetes", "--listen", f"127.0.0.1:{servers.free_port()}"],
        capture_output=True, text=True, check=False, timeout=60, env={**env, "KUBECONFIG": str(tmp_path / "none")},
    )  # fmt: skip
    assert out.returncode == 1 and "no usable kubeconfig" in one_line(out) and "set KUBECONFIG" in out.stderr


@pytest.mark.servers
def test_serve_on_a_port_in_use_says_so_before_it_says_serving(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run(
            [CLI, "-c", str(cfg), "serve", "--no-auth", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; pick another --listen" in one_line(
        out
    )


def test_a_server_that_is_not_corevault_is_one_line(tmp_path) -> None:
    """--server pointed at another web service (a wrong port): its pages are not taken for answers."""
    (tmp_path / "api" / "v1").mkdir(parents=True)
    (tmp_path / "api" / "v1" / "crashes").write_text("<html>a wiki</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # its log would go where the command's errors go
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{other.server_address[1]}"
    try:
        listed = corevault("--server", url, "list", env={"COREVAULT_TOKEN": None})
        info = corevault(
            "--server", url, "info", "20261128T060502Z-4502-7bf6460b", env={"COREVAULT_TOKEN": None}
        )
    finally:
        other.shutdown()
        other.server_close()
    assert listed.returncode == 1 and "did not answer with JSON: is" in one_line(listed)
    assert (
        info.returncode == 4
        and "HTTP 404, not an answer of a corevault server; check --server" in one_line(info)
    )


@pytest.mark.servers
def test_the_api_refuses_an_ignore_that_would_end_at_once(fixture_vault: FixtureVault) -> None:
    sig = json.loads(
        corevault("-c", fixture_vault.node.config, "info", "--json", fixture_vault.ids["a"]).stdout
    )
    app = create_app(fixture_vault.node.settings, Open())
    with servers.asgi(app) as url:
        r = httpx.post(
            f"{url}/api/v1/groups/{sig['signature']}/state", json={"state": "ignored", "until": 1000}
        )
    assert r.status_code == 400 and "until 1970-01-01 00:16:40 UTC is already past" in r.json()["detail"], (
        r.text
    )


@contextmanager
def stalling_relay(
    upstream: str, after: bytes, budget: int, cut: bool = False
) -> Iterator[tuple[str, threading.Event]]:
    """A TCP relay to ``upstream`` (http://HOST:PORT) that, once a request holds ``after``, passes
    ``budget`` bytes of its answer and then nothing more: a download whose network stalls midway
    (or, with ``cut``, whose connection is closed there). Yields the relay's URL and an event set
    when it stalls."""
    host, port = upstream.removeprefix("http://").rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    stalled, done = threading.Event(), threading.Event()
    sockets: list[socket.socket] = [listener]

    def pump(src: socket.socket, dst: socket.socket, state: dict, request: bool) -> None:
        while not done.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if request:
                state["watched"] = state["watched"] or after in data
            elif state["watched"]:
                data = data[: max(0, budget - state["sent"])]
                state["sent"] += len(data)
                if state["sent"] >= budget:
                    dst.sendall(data)
                    stalled.set()
                    if cut:  # shutdown, not close alone: the other pump's recv holds the sockets open
                        for end in (dst, src):
                            end.shutdown(socket.SHUT_RDWR)
                    else:
                        done.wait()
                    return
            dst.sendall(data)

    def accept() -> None:
        while not done.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, int(port)))
            sockets.extend((client, server))
            state = {"watched": False, "sent": 0}
            for args in ((client, server, state, True), (server, client, state, False)):
                threading.Thread(target=pump, args=args, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", stalled
    finally:
        done.set()
        for s in sockets:
            s.close()


@pytest.mark.servers
def test_ctrl_c_in_the_middle_of_a_download_keeps_the_file_that_was_there(
    fixture_vault: FixtureVault, tmp_path
) -> None:
    crash = fixture_vault.ids["a"]
    out = tmp_path / "core"
    out.write_bytes(b"yesterday's core, still wanted")
    with (
        serve(fixture_vault) as s,
        stalling_relay(s.url, f"/crashes/{crash}/core".encode(), 2048) as (url, stalled),
    ):
        child = subprocess.Popen(
            [CLI, "--server", url, "dump", crash, "-o", str(out), "--force"],
            env={**os.environ, "COREVAULT_TOKEN": TOKENS["admin"]}, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert stalled.wait(60), "the download never started"
            deadline = time.monotonic() + 30
            while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:
                assert time.monotonic() < deadline and child.poll() is None, "no download under way"
                time.sleep(0.05)
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=30)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "interrupted" in one_line(subprocess.CompletedProcess([], 130, "", err))
    assert out.read_bytes() == b"yesterday's core, still wanted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core"]  # no half-written file left beside it


@pytest.mark.servers
def test_a_download_whose_connection_breaks_off_is_one_line(fixture_vault: FixtureVault, tmp_path) -> None:
    crash = fixture_vault.ids["a"]
    with (
        serve(fixture_vault) as s,
        stalling_relay(s.url, f"/crashes/{crash}/core".encode(), 2048, cut=True) as (
            url,
            _,
        ),
    ):
        out = corevault(
            "--server",
            url,
            "dump",
            crash,
            "-o",
            str(tmp_path / "core"),
            env={"COREVAULT_TOKEN": TOKENS["admin"]},
        )
    assert out.returncode == 1 and f"the download of the core of {crash} from {url} broke off" in one_line(
        out
    )
    assert list(tmp_path.iterdir()) == []


def read_until(fd: int, want: bytes, seen: bytearray, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while want not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} in {bytes(seen[-2000:])!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side has gone
                chunk = b""
            assert chunk, f"ended before {want!r}: {bytes(seen[-2000:])!r}"
            seen += chunk


def test_ctrl_c_in_gdb_is_gdb_s(fixture_vault: FixtureVault) -> None:
    """^C at gdb's prompt (or in a long backtrace) gives gdb's prompt back; it must not end the session."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: corevault gdb on a terminal of its own, as a person runs it
        try:
            env = {**os.environ, "TERM": "dumb"}
            os.execve(CLI, [CLI, "-c", fixture_vault.node.config, "gdb", fixture_vault.ids["a"]], env)  # noqa: S606 - no shell wanted
        finally:
            os._exit(127)  # never back into pytest's code in the forked child
    seen = bytearray()
    try:
        read_until(fd, b"(gdb) ", seen)
        os.write(fd, b"\x03")  # the terminal sends SIGINT to its foreground group: corevault and gdb
        time.sleep(0.5)  # what killed gdb did so within 0.25 s of the signal
        os.write(fd, b"print 6*7\n")
        read_until(fd, b"= 42", seen)
        os.write(fd, b"quit\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, bytes(seen[-2000:])
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


class _FailingStore:
    """A vault whose core breaks off with a read error after its first MiB (a store's disk failing)."""

    class _Reader:
        def __init__(self) -> None:
            self.given = 0

        def readinto(self, buf) -> int:
            if self.given:
                raise OSError(5, "Input/output error")
            self.given = len(buf)
            buf[:] = b"\x7fELF".ljust(len(buf), b"\1")
            return len(buf)

    @contextmanager
    def open_core(self, crash_id: str) -> Iterator[_Reader]:
        yield self._Reader()


def test_a_core_the_vault_fails_to_give_is_its_error_not_the_output_files(tmp_path) -> None:
    from corevault.cli import crashes
    from corevault.errors import UserError

    out = tmp_path / "core"
    out.write_bytes(b"kept")
    with pytest.raises(UserError) as e:
        crashes.write_core(_FailingStore(), "c1", str(out), 8 << 20)
    assert "cannot read the core of c1 from the vault: Input/output error" in str(e.value)
    assert "choose another -o" not in str(e.value) and out.read_bytes() == b"kept"


@pytest.mark.parametrize(("command", "option"), [("debug", "--timeout"), ("snapshot", "--wait")])
def test_the_plugin_refuses_a_zero_wait(command: str, option: str) -> None:
    plugin = os.path.join(os.path.dirname(sys.executable), "kubectl-corevault")
    out = subprocess.run([plugin, command, "web-0", option, "0"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and f"Invalid value for '{option}'" in out.stderr, out.stderr
