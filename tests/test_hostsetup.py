"""Installing on a host: save, set, restore exactly; never clobber another tool silently."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from corevault import hostsetup


@pytest.fixture
def host(tmp_path):
    """Stand-in sysctl files, so the install logic runs without touching this host."""
    paths = {k: str(tmp_path / k) for k in hostsetup.SYSCTLS}
    for key, value in {"core_pattern": "core", "core_pipe_limit": "0", "suid_dumpable": "0"}.items():
        with open(paths[key], "w") as f:
            f.write(value + "\n")
    short = tempfile.mkdtemp(prefix="cvh-", dir="/tmp")  # the whole pattern must fit 127 bytes
    handler = os.path.join(short, "corevault-capture")
    with open(handler, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(handler, 0o755)
    yield paths, handler, str(tmp_path / "state" / "installed.json")
    shutil.rmtree(short)


def test_install_then_uninstall_restores_everything(host) -> None:
    paths, handler, state = host
    hostsetup.install(state, handler, paths=paths)
    now = hostsetup.read_sysctls(paths)
    assert now["core_pattern"] == f"|{handler} %P %p %i %I %s %t %d %u %g %c %C %h %e %f %E %F"
    assert (now["core_pipe_limit"], now["suid_dumpable"]) == ("16", "2")
    assert hostsetup.status(state, paths)["installed"]
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths) == {
        "core_pattern": "core",
        "core_pipe_limit": "0",
        "suid_dumpable": "0",
    }
    assert not os.path.exists(state)


def test_reinstall_keeps_the_hosts_original_values(host) -> None:
    paths, handler, state = host
    hostsetup.install(state, handler, paths=paths)
    hostsetup.install(state, handler, pipe_limit=4, paths=paths)
    assert hostsetup.read_sysctls(paths)["core_pipe_limit"] == "4"
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"] == "core"


def test_foreign_handler_is_kept_unless_forced(host) -> None:
    paths, handler, state = host
    hostsetup.write_sysctl(paths["core_pattern"], "|/lib/systemd/systemd-coredump %P %u %g %s %t %c %h")
    with pytest.raises(hostsetup.SetupError, match="another handler .*systemd-coredump.*--force"):
        hostsetup.install(state, handler, paths=paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"].startswith("|/lib/systemd/systemd-coredump")
    hostsetup.install(state, handler, force=True, paths=paths)
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"].startswith("|/lib/systemd/systemd-coredump")


def test_uninstall_leaves_a_pattern_someone_set_since(host) -> None:
    paths, handler, state = host
    hostsetup.install(state, handler, paths=paths)
    hostsetup.write_sysctl(paths["core_pattern"], "/var/crash/core.%p")
    hostsetup.uninstall(state, paths)
    now = hostsetup.read_sysctls(paths)
    assert now["core_pattern"] == "/var/crash/core.%p" and now["core_pipe_limit"] == "0"


def test_status_says_when_crashes_are_lost(host, tmp_path) -> None:
    paths, _, state = host
    hostsetup.write_sysctl(paths["core_pattern"], f"|{tmp_path}/gone/corevault-capture %P")
    st = hostsetup.status(state, paths)
    assert any("every crash is lost" in p for p in st["problems"])


@pytest.mark.parametrize(
    ("handler", "config", "message"),
    [
        ("relative/corevault-capture", None, "must be absolute"),
        ("/" + "x" * 60 + "/corevault-capture", "/" + "y" * 30 + "/c.toml", "would be 1"),
    ],
)
def test_unusable_patterns(handler: str, config: str | None, message: str) -> None:
    with pytest.raises(hostsetup.SetupError, match=message):
        hostsetup.pipe_pattern(handler, config)


def test_missing_handler_is_refused(host) -> None:
    paths, _, state = host
    with pytest.raises(hostsetup.SetupError, match="not an executable"):
        hostsetup.install(state, "/nonexistent/corevault-capture", paths=paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"] == "core"
