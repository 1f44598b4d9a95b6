"""Socket mode: the listening process's own crash, on this 6.18 kernel.

core_pattern points at the listener's socket, so a crash of the listener's own process would be
dumped into it, and nothing is left to accept: the kernel stops every other thread before it
dumps. Measured without the defence: the dying process waited in the kernel for ever (for the
``coredump_ack`` with ``@@``, for room in the socket with ``@``), SIGKILL alone ended it, and
crashes on the host were lost meanwhile. The listener runs in a child here, as in the agent.
"""

from __future__ import annotations

import signal
import sys

import pytest

from corevault import hostsetup
from corevault.agent.coredumps import CoredumpListener
from tests.test_socket_mode import crash_own_listener, host_crash, socket_capture

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(
        hostsetup.kernel_socket_mode() != "@@", reason="the coredump socket with requests needs Linux 6.17+"
    ),
]

LISTEN_THEN_CRASH = """
import ctypes, os, sys
from corevault import config
from corevault.agent.coredumps import CoredumpListener
config_path, path, mode, how = sys.argv[1:]
CoredumpListener(config.load(config_path), path, request_mode=mode == "@@").listen().start()
print("listening", flush=True)
sys.stdin.readline()
if how == "segv":
    ctypes.string_at(0)
os.abort()
"""


@pytest.mark.parametrize(
    ("mode", "how", "signum"), [("@@", "segv", signal.SIGSEGV), ("@", "abrt", signal.SIGABRT)]
)
def test_the_listeners_own_crash_ends_it_and_a_new_listener_captures_the_next_crash(
    programs: dict[str, str], mode: str, how: str, signum: int
) -> None:
    with socket_capture(requests=mode == "@@") as s:
        assert hostsetup.read_sysctls()["core_pattern"] == mode + s.listener.path
        status, err = crash_own_listener(
            [sys.executable, "-c", LISTEN_THEN_CRASH, s.config, s.listener.path, mode, how], "listener"
        )
        assert status == -signum
        assert "Fatal Python error" in err  # what it ran when it crashed: its stacks, in its log
        # As the restarted agent: a new listener on the same path captures the next crash.
        listener = CoredumpListener(s.settings, s.listener.path, request_mode=mode == "@@").listen().start()
        try:
            pid, dumped, _ = host_crash([programs["crasher"], "segv"])
            assert listener.wait_idle(120)
        finally:
            listener.close()
        assert dumped
        [entry] = s.entries()
        assert entry["process"]["pid"] == pid and entry["signal"]["number"] == 11
        assert listener.outcomes == {"captured": 1}
