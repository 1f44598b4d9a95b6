"""The same crash again is matched to its group's analysed samples, not analysed a second time.

Real crashes in runc pods of two namespaces, captured by the installed handler, shipped and
analysed by one agent with ``[analysis] group_samples = 2``. ``abort()`` and a failed
``assert()`` stop at the same instruction of libc; only the stack tells them apart, so the
assert must not be taken for the abort. A namespace's crashes are only matched to its own
samples.
"""

from __future__ import annotations

import pytest

from corevault.agent.loop import Agent
from corevault.vault import blobs, catalog, tables
from corevault.vault.crashes import LocalVault
from tests.conftest import Capture
from tests.tenants import node_of, pod

pytestmark = pytest.mark.crash


def test_a_crash_loop_is_matched_after_its_samples_and_other_crashes_are_not(
    capture: Capture, rootfs: str, tmp_path
) -> None:
    capture.configure("[capture]\nstorm_max = 100\n")
    crashes = [("tenant-a", "abort")] * 4 + [("tenant-a", "assert"), ("tenant-b", "abort")]
    ids: list[tuple[str, str, str]] = []
    for namespace, mode in crashes:
        c = capture.crash(rootfs, ["/app/crasher", mode], annotations=pod(namespace, f"{mode}-0"))
        [entry] = [e for e in capture.entries() if e["pod"]["container_id"] == c.id]
        ids.append((namespace, mode, entry["id"]))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/node"\n[agent]\nmetrics = ""\nanalysis_workers = 1\n'
        "[analysis]\ngroup_samples = 2\n"
    )
    settings = node_of(capture, str(cfg))
    Agent(settings).run(once=True)

    engine = catalog.connect(settings.catalog_url)
    with engine.connect() as conn:
        rows = {r["id"]: r for r in catalog.list_crashes(conn, limit=100)}
        c = tables.crashes.c
        got = {i: m for i, m in conn.execute(tables.crashes.select().with_only_columns(c.id, c.matched))}
    assert all(rows[i]["analysis"] == "done" for _, _, i in ids), rows
    aborts = [i for ns, mode, i in ids if (ns, mode) == ("tenant-a", "abort")]
    # one worker, group_samples 2: the first two taken are analysed in full, the other two recognised
    # (which two is the analysis queue's order, which need not be the order of capture)
    samples = [i for i in aborts if not got[i]]
    loop = [i for i in aborts if got[i]]
    assert len(samples) == 2 and len(loop) == 2, got
    assert len({rows[i]["signature"] for i in aborts}) == 1 and rows[aborts[0]]["signature"]
    with engine.connect() as conn:
        report = catalog.get_crash(conn, loop[-1])["report"]
    assert report["matched"]["sample"] in samples
    assert any("matched, not analysed" in w for w in report["warnings"])
    assert report["title"] == rows[aborts[0]]["title"]
    # the matched crash's report is its sample's report.json, not a copy of its own
    store = LocalVault(settings).store
    assert store.size(blobs.report_key(loop[-1])) is None
    assert store.size(blobs.report_key(report["matched"]["sample"]))

    [(_, _, assert_id)] = [x for x in ids if x[1] == "assert"]
    assert not got[assert_id], "a failed assert was taken for the abort it shares an instruction with"
    assert rows[assert_id]["signature"] != rows[aborts[0]]["signature"]
    [(_, _, other_ns)] = [x for x in ids if x[0] == "tenant-b"]
    assert not got[other_ns], "a crash was matched to another namespace's samples"
    assert rows[other_ns]["signature"] == rows[aborts[0]]["signature"]  # the same bug, analysed in full
