"""A crash storm loses no crash: each is captured, or journaled as lost with a reason.

Six runc pods in two namespaces crash-loop three times each, all at once (one of them with a
bigger process), into the pipe handler with a storm limit of two cores per pod: the handler
drops what is over the limit, and the account (:func:`testbed.storm.account`) must add up to
every crash, each kept core in its spool entry.

The kernel's own ``core_pipe_limit`` skips are journaled from its log
(:mod:`corevault.agent.kernellog`, tested in tests/test_kernellog.py); the storm here stays
under that limit on purpose, because past ten skips in five seconds the kernel names no more
of them and tells only a count, with its next such message, however late (docs/capture.md,
"Crash storms"): an account could not be exact then.
"""

from __future__ import annotations

import pytest

from corevault import config
from corevault.agent.kernellog import KernelLog
from testbed import storm
from tests.conftest import Capture

pytestmark = pytest.mark.crash


def test_every_crash_of_a_storm_is_captured_or_journaled_with_why(capture: Capture, rootfs: str) -> None:
    capture.configure("[capture]\nstorm_max = 2\nstorm_window = 3600\n")
    kernel = KernelLog(config.load(capture.config))
    kernel.poll()  # from now on
    plan = storm.Plan(pods=6, crashes=3, namespaces=2, big=1, big_mib=32, parallel=6)
    pods = storm.run(plan, rootfs, capture.volume)
    kernel.poll()
    kernel.close()
    assert all(p.returncode == 0 for p in pods), [p.returncode for p in pods]

    acc = storm.account(capture.spool, pods, plan)
    assert acc.kernel_unnamed == 0 and acc.unexplained == 0, acc
    assert acc.accounted == acc.expected == 18, acc
    assert acc.captured == len(capture.entries())  # every kept core has its spool entry
    assert max(acc.per_pod.values()) <= 2  # the storm limit, per pod
    # each pod's third crash is over the limit, unless another loss took one of its three
    storm_drops = acc.dropped["crash storm"]
    assert storm_drops >= 6 - (acc.expected - acc.captured - storm_drops)
