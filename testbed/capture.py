"""corevault installed on this host for a while: the handler in pipe mode, a state dir of its own.

:func:`installed_capture` holds the host-wide lock of :mod:`testbed.sysctl` while
``core_pattern`` points at the handler and writes the host's three settings back when it
ends, also when it fails. The tests use it (``capture`` in ``tests/conftest.py``), and so
does :mod:`testbed.spoolfixture`, which remakes the checked-in spool entries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from corevault import hostsetup, spool
from testbed import runc, sysctl

HANDLER = hostsetup.default_handler()


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
