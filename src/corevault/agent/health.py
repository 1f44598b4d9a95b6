"""The agent's health for the kubelet's probes: ``/healthz`` (alive) and ``/readyz`` (capturing).

Served beside ``/metrics`` on the agent's metrics address, as JSON with 200 or 503.

- alive: the shipping loop took a step lately. One step ships one entry, so the bound is the
  analysis timeout plus ten minutes for a large upload. A loop stuck longer (a hung NFS mount,
  a deadlock) is what a restart fixes; an unreachable vault is not: the loop keeps stepping.
- ready: alive, and where the agent installed the capture, the socket the kernel (or the
  forwarder) connects to is listening and core_pattern is still corevault's. An administrator
  who points core_pattern elsewhere makes the pod unready, not restarted: corevault does not
  fight over the setting (see :meth:`corevault.agent.loop.Agent.check_installed`), it says so.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING

from corevault import hostsetup

if TYPE_CHECKING:
    from corevault.agent.loop import Agent

UPLOAD_ALLOWANCE = 600.0


def check(agent: Agent) -> dict:
    """``{"live": bool, "ready": bool, "problems": [...]}``, read fresh on every call."""
    problems = []
    quiet = time.monotonic() - agent.heartbeat
    live = quiet <= agent.settings.analysis_timeout + UPLOAD_ALLOWANCE
    if not live:
        problems.append(f"the shipping loop has not moved for {quiet:.0f} s")
    if agent.capture_socket is not None:
        if not _reachable(agent.capture_socket):
            problems.append(f"nothing listens on {agent.capture_socket}: crashes are not captured")
        state = hostsetup.load_state(hostsetup.state_path(agent.settings))
        pattern = hostsetup.read_sysctls()["core_pattern"]
        if state is None or not hostsetup.is_ours(pattern, state):
            problems.append(f"core_pattern is {pattern!r}, not corevault's: crashes are not captured")
    return {"live": live, "ready": not problems, "problems": problems}


def _reachable(path: str) -> bool:
    """A listening socket bound at ``path`` that is still there to connect to.

    /proc/net/unix keeps listing a bound socket after its file was removed, so both are checked;
    connecting to see would be taken for a crash handed over.
    """
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode) and hostsetup.listening(path)
    except OSError:
        return False
