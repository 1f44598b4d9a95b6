"""The agent notices when core_pattern stops being corevault's, without fighting the change."""

from __future__ import annotations

import json
import logging
import os

import pytest

from corevault import config, hostsetup
from corevault.agent.loop import Agent


def _installed(settings: config.Settings, pattern: str) -> None:
    os.makedirs(settings.state_dir, exist_ok=True)
    state = {"saved": {}, "installed": {"core_pattern": pattern}, "handler": None, "snapshot": None}
    with open(hostsetup.state_path(settings), "w") as f:
        json.dump(state, f)


def test_a_replaced_core_pattern_is_reported_once_and_in_a_metric(
    tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's core_pattern is whatever the test session holding the host-wide lock set (often
    # another corevault-capture, which counts as corevault's): the agent reads a value this test
    # chooses instead, and may not write one.
    kernel = {
        "core_pattern": "|/usr/share/apport/apport -p%p -s%s",
        "core_pipe_limit": "0",
        "suid_dumpable": "0",
    }
    monkeypatch.setattr(hostsetup, "read_sysctls", lambda: dict(kernel))
    written: list[tuple] = []
    monkeypatch.setattr(hostsetup, "write_sysctl", lambda *a: written.append(a))
    settings = config.from_dict({"state_dir": str(tmp_path / "s")})
    agent = Agent(settings)
    assert agent.check_installed() is None  # nothing installed: nothing to say
    current = kernel["core_pattern"]
    _installed(settings, current)  # what we installed is what the kernel has
    assert agent.check_installed() is True
    assert agent.metrics.installed._value.get() == 1
    _installed(settings, "|/usr/lib/corevault/corevault-capture %P")  # and now someone else's is there
    with caplog.at_level(logging.WARNING, logger="corevault.agent"):
        assert agent.check_installed() is False
        assert agent.check_installed() is False
    assert agent.metrics.installed._value.get() == 0
    warnings = [r for r in caplog.records if "no longer corevault's" in r.getMessage()]
    assert len(warnings) == 1 and repr(current) in warnings[0].getMessage()
    assert written == []  # reported, not changed back
