"""``python -m testbed.spoolfixture`` still remakes the checked-in crashes of ``tests/fixtures/spool``.

It crashes the same programs again (root, under the host-wide lock) into a directory of its
own and the result must have the checked-in entries' shape: the same processes, signals
and pods, the build-id files of what they mapped but the C library, readable by anyone.
"""

from __future__ import annotations

import os
import stat

import pytest

from corevault import spool
from testbed import spoolfixture
from tests.conftest import FIXTURE_SPOOL

pytestmark = pytest.mark.crash


def _shape(d: str) -> list[tuple]:
    out = []
    for entry in sorted(os.listdir(spool.ready_dir(d))):
        meta = spool.read_meta(d, entry)
        held = sorted(
            os.path.basename(m["path"])
            for m in meta["modules"]
            if os.path.exists(os.path.join(d, "store", "buildid", m["key"], m["sha256"]))
        )
        files = sorted(os.listdir(os.path.join(spool.ready_dir(d), entry)))
        out.append(
            (
                meta["process"]["exe"],
                meta["signal"]["name"],
                meta["pod"]["namespace"],
                meta["pod"]["name"],
                held,
                files,
            )
        )
    return sorted(out)


def test_the_spool_fixture_is_remade_with_the_same_shape(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dest = str(tmp_path / "spool")
    spoolfixture.write(spoolfixture.capture(str(work)), dest)
    assert _shape(dest) == _shape(FIXTURE_SPOOL)
    assert [e[4] for e in _shape(dest)] == [
        ["crasher", "ld-linux-x86-64.so.2"],
        ["ld-linux-x86-64.so.2", "libcrashy.so", "libuser"],
    ]
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            assert os.stat(os.path.join(root, name)).st_mode & stat.S_IROTH, name
