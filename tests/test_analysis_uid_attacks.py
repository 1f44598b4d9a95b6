"""A pod that runs its own processes as an analysis uid cannot stop the analyses of that uid.

Any pod may run as any uid (``runAsUser``, an image's ``USER``, or root in the container
calling ``setuid``), the analysis uids (``[agent] analysis_uid`` on) included. The kernel
counts ``RLIMIT_NPROC`` per user namespace and uid: were an analysis's processes counted
with the host's processes of its uid, a pod holding ``analysis_processes`` processes as that
uid would leave none to the analysis (measured without the defence: the template could not
even drop to the uid, and the worker of its own that replaced it failed the same way). The
analysis's processes are counted in a user namespace of their own, owned by root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

import pytest

from corevault.analysis import runner, slots, template
from corevault.model import Report
from testbed import runc
from tests.test_analysis_slots import fixture_crash, killed_with_a_process_left

#: a uid range of this module's own: its counts are this module's alone
BASE = 64_970
#: the bound per analysis, lowered so that the pod's processes stay few
PROCESSES = 24

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="a uid per analysis is the agent's, which runs as root"
)


def pod_as(uid: int, rootfs: str, processes: int) -> runc.Container:
    """A pod whose container runs as ``uid`` and holds ``processes`` processes of it, sleeping."""
    script = f"i=0; while [ $i -lt {processes} ]; do sleep 120 & i=$((i+1)); done; echo ready; wait"
    return runc.Container(rootfs, ["/bin/sh", "-c", script], uid=uid, rlimit_core=None)


def running_as(uid: int) -> list[int]:
    """Every process on the host whose real uid is ``uid``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, StopIteration), open(f"/proc/{name}/status") as f:
            if int(next(line for line in f if line.startswith("Uid:")).split()[1]) == uid:
                found.append(int(name))
    return found


@pytest.mark.parametrize("forked", [True, False], ids=["template", "worker-of-its-own"])
def test_a_pod_running_as_an_analysis_uid_does_not_take_that_analysis_s_processes(
    rootfs: str, monkeypatch: pytest.MonkeyPatch, tmp_path, forked: bool
) -> None:
    """A pod holds more processes as the analysis's uid than an analysis may have; a tenant's
    real crash analysed in that uid still ends with its full report, in a template's child,
    and in a worker of its own beside a running template (a tree of debug files outside
    /usr, which a template's child cannot place)."""
    from tests.conftest import FIXTURE_SPOOL

    store = os.path.join(FIXTURE_SPOOL, "store")
    core, record = fixture_crash("/app/crasher")
    monkeypatch.setattr(template, "_templates", {})
    monkeypatch.setattr(template, "_refused", {})
    alone: list[str] = []
    run_alone = runner._run_alone
    monkeypatch.setattr(
        runner, "_run_alone", lambda code, args, *a, **k: alone.append(code) or run_alone(code, args, *a, **k)
    )

    debug = () if forked else (str(tmp_path),)

    def analyse(uid: int) -> Report | runner.AnalysisError:
        try:
            return runner.analyze(
                core,
                [store],
                record=record,
                timeout=60,
                uid=uid,
                uids=1,
                processes=PROCESSES,
                debug_dirs=debug,
            )
        except runner.AnalysisError as e:
            return e

    try:
        expected = analyse(BASE + 1)  # in a uid no pod runs as
        assert isinstance(expected, Report) and expected.threads, expected
        with pod_as(BASE, rootfs, PROCESSES + 8).running():
            held = running_as(BASE)
            assert len(held) > PROCESSES, f"the pod holds {len(held)} processes of uid {BASE}"
            got = analyse(BASE)
    finally:
        for t in template._templates.values():
            t.close()
    assert isinstance(got, Report), got
    assert (got.signature, got.title, got.threads, got.modules) == (
        expected.signature,
        expected.title,
        expected.threads,
        expected.modules,
    )
    if forked:
        assert alone == [], f"the template did not serve: {template._refused}"
    else:
        assert len(alone) == 2, alone  # each analysis in a worker of its own


def test_a_pod_running_as_an_analysis_uid_does_not_hold_a_killed_analysis_s_uid(rootfs: str) -> None:
    """A killed analysis's uid waits until none of its processes are left; a pod's process of
    that uid is none of them, and the uid comes back while the pod runs on."""
    pod = pod_as(BASE, rootfs, 1)
    with pod.running():
        assert pod.pid() in running_as(BASE)  # the pod runs as the analysis uid
        with killed_with_a_process_left(BASE):
            pass
        with slots.held(BASE, 1, time.monotonic() + 5) as again:
            assert again == BASE


class HostPidContainer(runc.Container):
    """A pod with the host's PID namespace (``hostPID: true``)."""

    def spec(self) -> dict:
        spec = super().spec()
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
        return spec


#: what the pod tries on each process it is given: read its environment, reach its files
#: (the crash's copy, among them) through its root and its open files, enter its user namespace
PRY = r"""
for p in "$@"; do
  cat /proc/$p/environ >/dev/null 2>&1 && echo "$p environ"
  ls /proc/$p/root/ >/dev/null 2>&1 && echo "$p root"
  readlink /proc/$p/fd/0 >/dev/null 2>&1 && echo "$p fd"
  readlink /proc/$p/ns/user >/dev/null 2>&1 && echo "$p userns"
done
"""


def test_a_pod_running_as_an_analysis_uid_with_the_hosts_pids_cannot_pry_into_the_analysis(
    rootfs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``hostPID`` pod running as the analysis uid sees the analysis's processes; it reads
    nothing of them and cannot enter their user namespace (made by root, not by that uid),
    while it can all of that on a host process of the uid that is not an analysis's."""
    from tests.conftest import FIXTURE_SPOOL

    uid = BASE + 2
    store = os.path.join(FIXTURE_SPOOL, "store")
    core, record = fixture_crash("/app/crasher")
    monkeypatch.setattr(template, "_templates", {})
    monkeypatch.setattr(template, "_refused", {})
    monkeypatch.setattr(runner, "_worker", lambda argv: ("import time; time.sleep(60)", []))
    ended: list[object] = []

    def analyse() -> None:
        try:
            runner.analyze(core, [store], record=record, timeout=8, uid=uid, uids=1, processes=PROCESSES)
        except runner.AnalysisError as e:
            ended.append(e)

    a = threading.Thread(target=analyse)
    other = subprocess.Popen(
        ["sleep", "60"], user=uid, group=uid, extra_groups=[]
    )  # the uid's, not an analysis's
    try:
        a.start()
        deadline = time.monotonic() + 5
        while len(running_as(uid)) < 4:  # the template, a keeper, the analysis, and the other
            assert time.monotonic() < deadline, running_as(uid)
            time.sleep(0.05)
        analysis = [p for p in running_as(uid) if p != other.pid]
        pod = HostPidContainer(
            rootfs, ["/bin/sh", "-c", PRY, "pry", *map(str, [other.pid, *analysis])], uid=uid
        )
        out = pod.run().stdout.split("\n")
        assert set(analysis) <= set(running_as(uid)), "the analysis ended before the pod tried it"
    finally:
        other.kill()
        other.wait()
        a.join(timeout=30)
        for t in template._templates.values():
            t.close()
    assert [f"{other.pid} {what}" for what in ("environ", "root", "fd", "userns")] == out[:4]
    assert out[4:] == [""], f"the pod reached into an analysis: {out[4:]}"
    assert ended and runner.STOPPED in str(ended[0])
