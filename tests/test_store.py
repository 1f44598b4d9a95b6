"""The binary store: every object a crashed process mapped is kept, keyed and found again.

Real crashes in runc pods; the pod's rootfs is deleted before the analysis, so only what
capture kept can explain the crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from testbed import runc

pytestmark = pytest.mark.crash

SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


def analyze(config: str, what: str) -> dict:
    out = subprocess.run(
        [CLI, "-c", config, "analyze", "--json", what], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_non_pie_executables_are_kept_and_explained_after_the_image_is_gone(
    capture, programs, tmp_path
) -> None:
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"static": programs["crasher-static"], "nopie": programs["crasher-nopie"]}
    )
    ids = {}
    for name in ("static", "nopie"):
        c = capture.crash(root, [f"/app/{name}", "segv"], annotations=SEED)
        [meta] = [m for m in capture.entries() if m["pod"]["container_id"] == c.id]
        exe = next(m for m in meta["modules"] if m["path"] == f"/app/{name}")
        assert exe["start"] == 0x400000  # really not position-independent
        assert exe["stored"] == "new", exe
        ids[name] = meta["id"]
    shutil.rmtree(root)
    for name, crash_id in ids.items():
        report = analyze(capture.config, crash_id)
        assert report["signature_frames"][0] == "crash_here", (name, report["signature_frames"])
        exe = next(m for m in report["modules"] if m["path"] == f"/app/{name}")
        assert exe["file"] is not None
