"""The command line as a user types it: real process, real exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from corevault import hostsetup
from testbed import sysctl
from tests.clirun import corevault

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


def run(*args: str) -> subprocess.CompletedProcess:
    return corevault(*args)


# (arguments, exit code, words the one-line error must contain)
MUST_FAIL = [
    (["pattern", "check", "relative/core"], 2, "not an absolute path"),
    (["pattern", "check", "/data/../etc/core"], 2, "'..' component"),
    (["pattern", "check", "|/bin/sh"], 2, "not a pipe or socket"),
    (["pattern", "check", "/data/core-%z"], 2, "%z"),
    (["pattern", "expand", "/core"], 2, "directly in /"),
    (["--config", "/nonexistent/c.toml", "status"], 2, "does not exist"),
    (["install", "--handler", "/nonexistent/corevault-capture"], 1, "not an executable"),
    (["install", "--suid-dumpable", "7", "--handler", "/bin/true"], 1, "must be 0, 1 or 2"),
    (["no-such-command"], 2, "No such command"),
]


@pytest.mark.parametrize(("args", "code", "words"), MUST_FAIL, ids=[" ".join(a) for a, _, _ in MUST_FAIL])
def test_must_fail(args: list[str], code: int, words: str, tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    full = args if args[0] == "--config" else ["--config", str(config), *args]
    result = run(*full)
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    if code != 2 or "No such command" not in words:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_pattern_check_and_expand() -> None:
    ok = run("pattern", "check", "/data/dump-a/core-%E-%p-%t")
    assert ok.returncode == 0 and "/data/dump-a/" in ok.stdout
    name = run("pattern", "expand", "/data/dump-a/core-%E-%p", "--exe", "/usr/sbin/nginx", "--pid", "7")
    assert name.stdout.strip() == "/data/dump-a/core-!usr!sbin!nginx-7"


@pytest.mark.crash
def test_install_status_uninstall_on_this_host(short_dir: str) -> None:
    d = short_dir
    config = os.path.join(d, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{d}/state"\n')
    handler = os.path.join(d, "h")
    os.symlink(hostsetup.default_handler(), handler)
    with sysctl.core_settings() as saved:
        assert run("-c", config, "install", "--handler", handler).returncode == 0
        st = json.loads(run("-c", config, "status", "--json").stdout)
        assert st["installed"] and st["current"]["core_pipe_limit"] == "16" and st["saved"] == saved
        again = run("-c", config, "install", "--handler", handler)
        assert again.returncode == 0
        out = run("-c", config, "uninstall")
        assert out.returncode == 0 and "restored" in out.stdout
        assert hostsetup.read_sysctls() == saved
        assert "not installed" in run("-c", config, "uninstall").stdout
        st = json.loads(run("-c", config, "status", "--json").stdout)
        assert not st["installed"] and st["saved"] is None


def test_pattern_specifiers_lists_every_one() -> None:
    from corevault.pattern import SPECIFIERS

    out = run("pattern", "specifiers").stdout
    assert all(f"%{s}  " in out for s in "%" + SPECIFIERS)


def test_an_error_quoting_a_crashed_process_s_names_prints_them_as_data(tmp_path) -> None:
    """A path or symbol quoted in an error is escaped: no terminal sequence reaches the reader's screen."""
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    hostile = "core-\x1b]0;owned\x07\x1b[2J\u202e"
    out = run("--config", str(config), "analyze", f"{tmp_path}/{hostile}/x")
    assert out.returncode != 0 and out.stderr.startswith("corevault: error: ")
    assert "\x1b" not in out.stderr and "\u202e" not in out.stderr and "\x07" not in out.stderr
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in out.stderr
