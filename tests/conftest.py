"""Fixtures: a real capture installation on this host, real containers, the crash corpus.

Tests marked ``crash`` set the host's core_pattern. They hold a host-wide lock while they
do (so two test runs never interleave) and the previous core_pattern, core_pipe_limit and
suid_dumpable are written back when they end, also when they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from corevault import hostsetup, spool
from testbed import build, runc, sysctl

HANDLER = hostsetup.default_handler()


def pytest_sessionstart(session: pytest.Session) -> None:
    removed = sysctl.repair_dangling_pattern()
    if removed:
        print(f"\nwarning: core_pattern pointed at a missing handler ({removed}); reset it to 'core'")


@pytest.fixture(scope="session")
def programs() -> dict[str, str]:
    return build.build_all()


@pytest.fixture(scope="session")
def rootfs(programs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    return runc.build_rootfs(str(tmp_path_factory.mktemp("rootfs") / "root"), programs)


@dataclass
class Capture:
    """corevault installed on this host with its own short-lived state directory."""

    dir: str
    config: str
    handler: str
    volume: str
    settings_text: str = ""
    containers: list = field(default_factory=list)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.dir, "state")

    @property
    def spool(self) -> str:
        return os.path.join(self.state_dir, "spool")

    @property
    def store(self) -> str:
        return os.path.join(self.state_dir, "store")

    @property
    def snapshot(self) -> str:
        return os.path.join(self.state_dir, "capture.json")

    @property
    def podindex(self) -> str:
        return os.path.join(self.state_dir, "pods")

    def configure(self, text: str) -> None:
        """Replace the settings file (state_dir is always this capture's own) and apply it.

        Applying is installing again, as a user does: it rewrites the handler's snapshot.
        """
        with open(self.config, "w") as f:
            f.write(f'state_dir = "{self.state_dir}"\n' + text)
        if os.path.exists(os.path.join(self.state_dir, hostsetup.STATE_NAME)):
            hostsetup.install(self.handler, config_path=self.config)

    def journal(self, pid: int | None = None) -> list[dict]:
        records = spool.read_journal(self.spool)
        return [r for r in records if pid is None or r.get("pid") == pid]

    def entries(self) -> list[dict]:
        return [spool.read_meta(self.spool, e) for e in spool.entries(self.spool)]

    def volume_files(self) -> list[str]:
        return sorted(os.listdir(self.volume))

    def crash(self, rootfs: str, args: list[str], **kwargs: object) -> runc.Container:
        """Run a container that crashes; returns it once the handler is done with it."""
        kwargs.setdefault("volume", self.volume)
        c = runc.Container(rootfs, args, **kwargs)  # type: ignore[arg-type]
        result = c.run()
        assert result.returncode != 0, f"the container was expected to crash: {result.stdout} {result.stderr}"
        self.containers.append(c)
        return c


@contextmanager
def installed_capture() -> Iterator[Capture]:
    """Install the handler (pipe mode, every specifier) with a fresh state dir; restore after."""
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")  # short: the whole pattern must fit 127 bytes
    handler = os.path.join(d, "h")
    os.symlink(HANDLER, handler)
    volume = os.path.join(d, "vol")
    os.mkdir(volume)
    cap = Capture(dir=d, config=os.path.join(d, "c.toml"), handler=handler, volume=volume)
    cap.configure("")
    try:
        with sysctl.core_settings() as saved:
            hostsetup.install(handler, config_path=cap.config)
            try:
                yield cap
            finally:
                hostsetup.uninstall(os.path.join(cap.state_dir, hostsetup.STATE_NAME))
                assert hostsetup.read_sysctls() == saved, "uninstall did not restore the host's sysctls"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def capture() -> Iterator[Capture]:
    with installed_capture() as cap:
        yield cap


def gdb_backtrace(exe: str, core: str, sysroot: str) -> str:
    out = subprocess.run(
        [
            "gdb", "-batch", "-nx", "-iex", "set auto-load off", "-iex", f"set sysroot {sysroot}",
            "-ex", "bt", exe, core,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout


def kernel_args(pid: int, *, signal: int = 11, exe: str = "/usr/bin/sleep", pidfd_fd: int = 3) -> list[str]:
    """The arguments the kernel would pass for a crash of ``pid`` (all specifiers, in order)."""
    comm = os.path.basename(exe)[:15]
    values = {
        "P": str(pid), "p": str(pid), "i": str(pid), "I": str(pid), "s": str(signal), "t": str(int(time.time())),
        "d": "1", "u": "0", "g": "0", "c": str((1 << 64) - 1), "C": "0", "h": os.uname().nodename,
        "e": comm, "f": os.path.basename(exe), "E": exe.replace("/", "!"), "F": str(pidfd_fd),
    }  # fmt: skip
    from corevault.pattern import SPECIFIERS

    return [values[s] for s in SPECIFIERS]


def run_handler(
    cap: Capture, args: list[str], stdin: int | bytes, pidfd: int | None, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Start the handler as the kernel does: the core on fd 0, the pidfd open (its number in %F), cwd /."""
    return subprocess.run(
        [cap.handler, "-c", cap.snapshot, *args],
        input=stdin if isinstance(stdin, bytes) else None,
        stdin=stdin if isinstance(stdin, int) else None,
        capture_output=True,
        cwd="/",
        pass_fds=(pidfd,) if pidfd is not None else (),
        timeout=timeout,
        check=False,
    )
