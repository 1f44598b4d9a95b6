"""A pipe handler that crashes is not called again for its own crash.

The handler sets no core limit of its own: the kernel starts every pipe helper with
RLIMIT_CORE 1 and, when a process with that limit crashes under a pipe pattern, writes
"Aborting core" instead of starting the helper for it (fs/coredump.c). Without that guard a
crashing handler would start itself again for its own core, and again, while the first
crashed process waits. Here the handler's own launcher, started by the kernel for a real
crash, crashes with SIGSEGV before it captures anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from corevault import hostsetup
from testbed import sysctl

#: replaces the launcher's last line: say who ran and with which core limit, then crash
CRASH = """import os
with open({log!r}, "a") as log:
    limits = open("/proc/self/limits").read().splitlines()
    log.write(" ".join([str(os.getpid()), *[l for l in limits if l.startswith("Max core file size")]]) + "\\n")
os.kill(os.getpid(), 11)
"""


@pytest.mark.crash
def test_a_crashing_handler_is_not_started_again_for_its_own_crash(tmp_path: Path) -> None:
    launcher = hostsetup.isolated_launcher(str(tmp_path / "corevault-capture-isolated"))
    text = Path(launcher).read_text()
    last = "from corevault.capture.handler import main, quick_exit\nquick_exit(main())\n"
    assert last in text
    log = tmp_path / "ran"
    crashing = tmp_path / "crashing-handler"
    crashing.write_text(text.replace(last, CRASH.format(log=str(log))))
    crashing.chmod(0o755)
    with sysctl.core_settings():
        hostsetup.write_sysctl(hostsetup.SYSCTLS["core_pipe_limit"], "16")  # the kernel waits for the helper
        hostsetup.write_sysctl(hostsetup.SYSCTLS["core_pattern"], f"|{crashing} %p")
        proc = subprocess.Popen(["prlimit", "--core=unlimited", "sleep", "60"])
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGSEGV)
        assert proc.wait(timeout=30) == -signal.SIGSEGV
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # a second helper, started for the first one's crash, would have written by now
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    # the kernel's guard: soft and hard limits of 1 byte, set before the helper's first instruction
    assert lines[0].split()[-3:] == ["1", "1", "bytes"], lines
