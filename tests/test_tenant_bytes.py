"""A crashed process's names are bytes the tenant chose: one that is not UTF-8 still ships.

Tenant A's pod runs an executable whose path holds a byte that is not UTF-8 (Linux paths are
bytes); the kernel hands it to the handler as ``%E``. Tenant B's pod (another namespace) crashes plainly beside it. Both go through the real
capture handler and one pass of the agent, whose batch records both in one transaction, and
A's crash once more refused (RLIMIT_CORE 0), a line of the node's journal, which the agent
ships before any entry: both crashes and the refusal must be in the catalog, A's path shown
with the byte replaced, and the spool empty.
"""

from __future__ import annotations

import os
import shutil

import pytest
import sqlalchemy as sa

from corevault import spool
from corevault.agent.loop import Agent
from corevault.vault import tables
from corevault.vault.crashes import LocalVault
from testbed import runc
from tests.conftest import Capture
from tests.tenants import node_of, pod

pytestmark = pytest.mark.crash
#: /app/bin\xff-crasher: the byte 0xff is never UTF-8
ODD_EXE = os.fsdecode(b"/app/bin\xff-crasher")


def test_a_path_that_is_not_utf8_ships_beside_another_tenants_crash(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    root = runc.build_rootfs(str(tmp_path / "root"), {"crasher": programs["crasher"]})
    app = os.path.join(os.fsencode(root), b"app")
    shutil.copy2(programs["crasher"], os.path.join(app, os.path.basename(os.fsencode(ODD_EXE))))
    # started by a link (the runtime's spec is JSON, which holds no such byte): the kernel
    # names the executable by the file's own path
    os.symlink(os.path.basename(os.fsencode(ODD_EXE)), os.path.join(app, b"odd"))
    capture.crash(root, ["/app/odd", "segv"], annotations=pod("tenant-a", "a-0"))
    # and once with RLIMIT_CORE 0, which the handler refuses: a line of the node's journal
    capture.crash(root, ["/app/odd", "segv"], annotations=pod("tenant-a", "a-1"), rlimit_core=(0, 0))
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
    assert len(capture.entries()) == 2, capture.journal()
    shutil.copy(os.path.join(capture.spool, spool.JOURNAL_NAME), tmp_path / "journal")

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/node"\n[agent]\nmetrics = ""\nanalyze = false\n')
    settings = node_of(capture, str(cfg))
    shutil.copy(tmp_path / "journal", os.path.join(settings.spool_dir, spool.JOURNAL_NAME))
    Agent(settings).run(once=True)  # the journal's line too: it ships before any entry, each pass

    assert spool.entries(settings.spool_dir) == []  # nothing left behind, retried for ever
    with LocalVault(settings).engine.connect() as conn:
        rows = dict(conn.execute(sa.select(tables.crashes.c.namespace, tables.crashes.c.exe)).all())
    assert rows.keys() == {"tenant-a", "tenant-b"}, rows
    assert rows["tenant-a"] == "/app/bin\ufffd-crasher"
    assert rows["tenant-b"] == "/app/crasher"
    with LocalVault(settings).engine.connect() as conn:
        refused = conn.execute(sa.select(tables.dropped.c.namespace, tables.dropped.c.exe)).all()
    assert [tuple(r) for r in refused] == [("tenant-a", "/app/bin\ufffd-crasher")]
