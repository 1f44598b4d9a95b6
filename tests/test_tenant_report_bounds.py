"""A crashed process's report is bounded, whatever its binary names and however many stacks it has.

Tenant A's pod crashes in a function whose ELF symbol is 1 MiB long (an assembler name: any
bytes a linker takes) or not UTF-8, or with 64 threads deep in a long-named function. Tenant B's pod
(another namespace) crashes plainly. Both go through the real capture handler, the agent's
sandboxed analysis and the catalog.
"""

from __future__ import annotations

import json
import os

import pytest

from corevault import spool
from corevault.analysis import runner
from corevault.analysis.worker import MAX_NAME
from corevault.model import MAX_REPORT_BYTES
from testbed import runc, servers
from tests.conftest import Capture
from tests.tenants import alerts_sent, analysed, crashes_of, pod, slack_sink
from tests.test_triage_alerts import Receiver

pytestmark = pytest.mark.crash


def test_a_megabyte_symbol_name_is_cut_in_the_report_title_and_group(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"longname": programs["longname"], "crasher": programs["crasher"]}
    )
    capture.crash(root, ["/app/longname"], annotations=pod("tenant-a", "long-0"))
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "plain-0"))
    assert len(capture.entries()) == 2, capture.journal()
    with Receiver(servers.free_port()) as receiver:
        settings = analysed(capture, tmp_path, slack_sink(receiver.url))
        crashes = crashes_of(settings)
        long = crashes["tenant-a"]
        assert long["analysis"] == "done", long["analysis_error"]
        assert alerts_sent(settings) == 1
    # Slack refuses a message whose text object holds more than 3,000 characters (2,000 in a
    # field): the group's alert would never be delivered
    [slack] = receiver.bodies("/slack")
    [head, facts] = slack["blocks"]
    assert "SIGSEGV in crash_AAAA" in head["text"]["text"] and len(head["text"]["text"]) <= 3000
    assert all(len(f["text"]) <= 2000 for f in facts["fields"])
    cut = "crash_" + "A" * (MAX_NAME - len("crash_")) + "…"
    [top] = [f for t in long["report"]["threads"] if t["crashed"] for f in t["frames"][:1]]
    assert top["function"] == cut  # the program's own frame, named, its name cut
    assert long["title"] == f"SIGSEGV in {cut} ← main"
    # the whole report is a few names long, not megabytes (3 MiB before the bound)
    assert len(json.dumps(long["report"])) < 8 * MAX_NAME + 32_768
    plain = crashes["tenant-b"]
    assert plain["analysis"] == "done" and "crash_here" in (plain["title"] or ""), plain


def test_a_report_of_every_frame_of_every_thread_is_kept_within_its_bound(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """64 threads wait 240 calls deep in a function of a 4,000-character name: every frame of
    every thread made a 64 MiB report, which the agent (every tenant's) read, parsed and wrote
    whole. The crashed thread keeps its frames, the others their top frames, and tenant B's
    crash after it is explained."""
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"widestacks": programs["widestacks"], "crasher": programs["crasher"]}
    )
    capture.crash(root, ["/app/widestacks"], annotations=pod("tenant-a", "wide-0"))
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "plain-0"))
    assert len(capture.entries()) == 2, capture.journal()
    crashes = crashes_of(analysed(capture, tmp_path))
    wide = crashes["tenant-a"]
    assert wide["analysis"] == "done", wide["analysis_error"]
    report = wide["report"]
    assert len(json.dumps(report)) <= MAX_REPORT_BYTES
    threads = report["threads"]
    assert len(threads) == 65  # every thread is still there
    [crashed] = [t for t in threads if t["crashed"]]
    assert crashed["frames"][0]["function"] == "crash_wide" and wide["title"].startswith(
        "SIGSEGV in crash_wide"
    )
    waiting = [t for t in threads if not t["crashed"]]
    assert all(t["incomplete"] and 1 <= len(t["frames"]) < 240 for t in waiting)
    assert all(f["function"].startswith("wait_BBBB") for t in waiting for f in t["frames"][1:])
    assert any("the report's bound" in w for w in report["warnings"]), report["warnings"]
    plain = crashes["tenant-b"]
    assert plain["analysis"] == "done" and "crash_here" in (plain["title"] or ""), plain


def test_a_symbol_name_that_is_not_utf8_is_shown_with_replacements_by_either_backend(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """drgn and gdb's Python decode a name strictly: the name ended the unwind, and with it the
    whole analysis of the crash (gdb's output too was decoded strictly)."""
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"badname": programs["badname"], "crasher": programs["crasher"]}
    )
    capture.crash(root, ["/app/badname"], annotations=pod("tenant-a", "bad-0"))
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "plain-0"))
    assert len(capture.entries()) == 2, capture.journal()
    [meta] = [m for m in capture.entries() if m["process"]["exe"] == "/app/badname"]
    crashes = crashes_of(analysed(capture, tmp_path))
    title = "SIGSEGV in crash_\ufffd\ufffd_bad ← main"
    assert crashes["tenant-a"]["title"] == title, crashes["tenant-a"]
    assert "crash_here" in (crashes["tenant-b"]["title"] or "")
    core = os.path.join(spool.ready_dir(capture.spool), meta["id"], spool.CORE_NAME)
    by_gdb = runner.analyze(core, [capture.store], backend="gdb", record=meta["modules"])
    assert by_gdb.backend == "gdb" and by_gdb.title == title
