"""A storm's spool is drained by matching, and its group's samples still grow at idle.

The checked-in SIGFPE crash (tests/fixtures/spool) copied into a node's spool as a storm: the
same crash of pods of one namespace, each copy a crash of its own. One analysis worker, so
the order is the queue's: ``[analysis] match_after`` crashes are analysed in full, the rest
of the storm is matched to them while more entries wait, and the one taken when nothing
waits is analysed in full, a sample more. Crashes that come one at a time after the storm
are analysed in full until the group has ``group_samples``, then matched even at idle.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from corevault import config, fingerprint, spool
from corevault.agent.loop import Agent
from corevault.analysis import elfcore, runner
from corevault.vault import catalog, tables
from tests.conftest import FIXTURE_SPOOL
from tests.nodes import Node, make_node

SETTINGS = "analysis_workers = 1\n[analysis]\ngroup_samples = 5\nmatch_after = 2\n"


def fpe_entry() -> str:
    [entry] = [
        e
        for e in os.listdir(spool.ready_dir(FIXTURE_SPOOL))
        if spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"] == "/app/crasher"
    ]
    return entry


def fingerprint_of(entry: str, meta: dict) -> str:
    """The fingerprint the handler takes (the fixture predates them), read from the core itself."""
    plain = os.path.join(os.path.dirname(entry), "plain-core")
    runner.decompress(os.path.join(entry, spool.CORE_NAME), plain)
    try:
        core = elfcore.read(plain)
        state = core.threads[0]
        stack = core.read_memory(state.registers["rsp"], fingerprint.STACK_BYTES) or b""
        mark = fingerprint.of(core.signal, core.signal_code, state.pc(core.machine), stack, meta["modules"])
    finally:
        os.unlink(plain)
    assert mark is not None
    return mark


def crash_again(node: Node, n: int, namespace: str = "storm") -> list[str]:
    """``n`` more crashes of the fixture's SIGFPE in ``node``'s spool, pods of ``namespace`` in turn."""
    source = os.path.join(spool.ready_dir(FIXTURE_SPOOL), fpe_entry())
    meta = spool.read_meta(FIXTURE_SPOOL, fpe_entry())
    meta["fingerprint"] = fingerprint_of(source, meta)
    ids = []
    for _ in range(n):
        i = len(os.listdir(spool.ready_dir(node.spool))) + len(node.crashes()) + len(ids)
        new = spool.new_id(int(time.time()), 1000 + i)
        dest = os.path.join(spool.ready_dir(node.spool), new)
        shutil.copytree(source, dest)
        pod = {**meta["pod"], "namespace": namespace, "name": f"loop-{i % 3}", "uid": f"uid-{i % 3}"}
        with open(os.path.join(dest, spool.META_NAME), "w") as f:
            json.dump(meta | {"id": new, "pod": pod}, f)
        ids.append(new)
    return ids


def outcomes(node: Node) -> dict[str, dict]:
    """Each crash's analysis, whether it was matched, and its report's ``matched`` field."""
    with node.vault().engine.connect() as conn:
        c = tables.crashes.c
        rows = conn.execute(tables.crashes.select().with_only_columns(c.id, c.analysis, c.matched)).all()
        reports = {r.id: catalog.get_crash(conn, r.id)["report"] for r in rows}
    return {r.id: {"analysis": r.analysis, "matched": bool(r.matched), "report": reports[r.id]} for r in rows}


def test_a_storms_later_crashes_are_matched_and_samples_grow_at_idle() -> None:
    node = make_node({"dir": FIXTURE_SPOOL, "ids": []}, extra=SETTINGS)
    storm = crash_again(node, 8)
    assert Agent(node.settings).run(once=True) == 0

    got = outcomes(node)
    assert all(got[i]["analysis"] == "done" for i in storm), got
    matched = [i for i in storm if got[i]["matched"]]
    full = [i for i in storm if not got[i]["matched"]]
    # match_after (2) in full, then matched while entries waited; the last one, taken when
    # nothing else waited, in full: a third sample of the five the group collects
    assert len(full) == 3 and len(matched) == 5, got
    for i in matched:
        report = got[i]["report"]
        assert report["matched"]["sample"] in full and report["matched"]["samples"] >= 2, report["matched"]
        assert any("matched, not analysed" in w for w in report["warnings"])
    for i in full:
        assert got[i]["report"].get("matched") is None and got[i]["report"]["signature"]
    assert len({got[i]["report"]["signature"] for i in storm}) == 1

    # after the storm, crashes one at a time: analysed in full up to group_samples (5), then matched
    states = []
    for _ in range(3):
        [one] = crash_again(node, 1)
        assert Agent(node.settings).run(once=True) == 0
        states.append(outcomes(node)[one])
    assert [s["matched"] for s in states] == [False, False, True], states
    assert states[-1]["report"]["matched"]["samples"] == 5


def test_match_after_needs_a_sample(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[analysis]\nmatch_after = 0\n')
    with pytest.raises(config.ConfigError, match="match_after: at least 1"):
        config.load(str(cfg))
