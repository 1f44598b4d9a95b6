"""Installing on a host: save, set, restore exactly; never clobber another tool silently."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

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
    config = os.path.join(short, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{short}/s"\n')
    yield Host(paths, handler, config, os.path.join(short, "s", hostsetup.STATE_NAME))
    shutil.rmtree(short)


@dataclass
class Host:
    paths: dict[str, str]
    handler: str
    config: str
    state: str

    def install(self, **kw: object) -> dict:
        return hostsetup.install(self.handler, config_path=self.config, paths=self.paths, **kw)  # type: ignore[arg-type]


def test_install_then_uninstall_restores_everything(host) -> None:
    paths, handler, state = host.paths, host.handler, host.state
    host.install()
    now = hostsetup.read_sysctls(paths)
    snapshot = os.path.join(os.path.dirname(state), "capture.json")
    assert now["core_pattern"] == f"|{handler} -c {snapshot} %P %p %i %I %s %t %d %u %g %c %C %h %e %f %E %F"
    assert os.path.exists(snapshot)
    assert (now["core_pipe_limit"], now["suid_dumpable"]) == ("16", "2")
    assert hostsetup.status(state, paths)["installed"]
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths) == {
        "core_pattern": "core",
        "core_pipe_limit": "0",
        "suid_dumpable": "0",
    }
    assert not os.path.exists(state) and not os.path.exists(snapshot)


def test_reinstall_keeps_the_hosts_original_values(host) -> None:
    paths, state = host.paths, host.state
    host.install()
    host.install(pipe_limit=4)
    assert hostsetup.read_sysctls(paths)["core_pipe_limit"] == "4"
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"] == "core"


def test_foreign_handler_is_kept_unless_forced(host) -> None:
    paths, state = host.paths, host.state
    hostsetup.write_sysctl(paths["core_pattern"], "|/lib/systemd/systemd-coredump %P %u %g %s %t %c %h")
    with pytest.raises(hostsetup.SetupError, match="another handler .*systemd-coredump.*--force"):
        host.install()
    assert hostsetup.read_sysctls(paths)["core_pattern"].startswith("|/lib/systemd/systemd-coredump")
    host.install(force=True)
    hostsetup.uninstall(state, paths)
    assert hostsetup.read_sysctls(paths)["core_pattern"].startswith("|/lib/systemd/systemd-coredump")


def test_uninstall_leaves_a_pattern_someone_set_since(host) -> None:
    paths, state = host.paths, host.state
    host.install()
    hostsetup.write_sysctl(paths["core_pattern"], "/var/crash/core.%p")
    hostsetup.uninstall(state, paths)
    now = hostsetup.read_sysctls(paths)
    assert now["core_pattern"] == "/var/crash/core.%p" and now["core_pipe_limit"] == "0"


def test_status_says_when_crashes_are_lost(host, tmp_path) -> None:
    hostsetup.write_sysctl(host.paths["core_pattern"], f"|{tmp_path}/gone/corevault-capture %P")
    st = hostsetup.status(host.state, host.paths)
    assert any("every crash is lost" in p for p in st["problems"])


def test_status_says_when_the_settings_changed_since_install(host) -> None:
    host.install()
    assert hostsetup.status(host.state, host.paths)["problems"] == []
    with open(host.config, "a") as f:
        f.write("[capture]\nstorm_max = 9\n")
    os.utime(host.config, ns=(1, 1))
    assert any(
        "run 'corevault install' again" in p for p in hostsetup.status(host.state, host.paths)["problems"]
    )
    host.install()
    assert hostsetup.status(host.state, host.paths)["problems"] == []


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
    with pytest.raises(hostsetup.SetupError, match="not an executable"):
        hostsetup.install("/nonexistent/corevault-capture", config_path=host.config, paths=host.paths)
    assert hostsetup.read_sysctls(host.paths)["core_pattern"] == "core"


def test_the_handler_launcher_starts_python_isolated_and_ignores_pythonpath(host, tmp_path) -> None:
    """The launcher runs the real handler with -I -S: neither a ``sitecustomize`` on a PYTHONPATH
    in its environment nor a shadow ``corevault`` package there is imported."""
    if os.access(os.path.dirname(sys.executable), os.W_OK):
        launcher = hostsetup.default_handler()
    else:  # another user's environment (the quick loop run as any user): written where this one may
        launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    assert os.path.basename(launcher) == hostsetup.LAUNCHER_NAME
    assert hostsetup.is_ours(f"|{launcher} %P")
    with open(launcher) as f:
        assert f.readline().rstrip().endswith(" -IS")
    shadow = tmp_path / "shadow" / "corevault" / "capture"
    shadow.mkdir(parents=True)
    marker = tmp_path / "imported-the-shadow"
    for init in (
        shadow.parent / "__init__.py",
        shadow / "__init__.py",
        shadow.parent.parent / "sitecustomize.py",
    ):
        init.write_text(f"open({str(marker)!r}, 'w').close()\n")
    host.install()
    snapshot = os.path.join(os.path.dirname(host.state), "capture.json")
    done = subprocess.run(
        [launcher, "-c", snapshot, "not", "enough", "arguments"],
        env={"PYTHONPATH": str(tmp_path / "shadow"), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL, cwd=str(tmp_path / "shadow"), check=False,
    )  # fmt: skip
    assert done.returncode == 2  # the real handler: bad arguments, journaled
    assert not marker.exists()
    journal = os.path.join(os.path.dirname(host.state), "spool", "journal.jsonl")
    with open(journal) as f:
        assert "bad handler arguments" in f.read()
    hostsetup.uninstall(host.state, host.paths)


def test_the_handler_launcher_is_written_again_when_stale(tmp_path) -> None:
    path = str(tmp_path / hostsetup.LAUNCHER_NAME)
    assert hostsetup.isolated_launcher(path) == path
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    hostsetup.isolated_launcher(path)
    with open(path) as f:
        text = f.read()
    assert "from corevault.capture.handler import main" in text and os.access(path, os.X_OK)


def test_the_pipe_handler_imports_no_typing_dataclasses_or_inspect(tmp_path) -> None:
    """What the launcher imports before the handler's main runs, in a fresh ``python -I -S``:
    typing, dataclasses and inspect cost about 14 ms of every crash, and nothing on the pipe
    path needs them (the seek table's writer, the crash record and the sinks are plain classes)."""
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    with open(launcher) as f:
        text = f.read()
    assert text.endswith("quick_exit(main())\n")
    probe = text.replace(
        "quick_exit(main())\n", "print(sorted({'typing', 'dataclasses', 'inspect'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.strip() == "[]"
