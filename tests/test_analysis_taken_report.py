"""What the agent takes from an analysis that its core took over: a report of the report's
types, grouped by the frames it shows, never by the signature it states.

The worker parses what a pod controls, so a core that takes it over writes what it likes on
its output. Here the worker is replaced by such a program and run on a real crash's core
(the fixture spool's, from a container) in its real sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from corevault.analysis import runner
from tests.test_analysis_slots import fixture_crash

#: another tenant's group, which the report claims
VICTIM = "0123456789abcdef"
FORGED = {
    "signal": {"number": 11, "name": "SIGSEGV"},
    "crashed_tid": 1,
    "threads": [{"tid": 1, "crashed": True, "frames": [{"index": 0, "pc": 4096, "function": "own_bug"}]}],
    "modules": [],
    "backend": "drgn",
    "core_size": 4096,
    "signature": VICTIM,
    "signature_frames": ["victims_bug"],
    "title": "SIGSEGV in victims_bug",
}


def _writes(doc: object) -> str:
    return f"import sys; sys.stdout.write({json.dumps(json.dumps(doc))})"


@pytest.fixture
def crash() -> tuple[str, list[dict], str]:
    from tests.conftest import FIXTURE_SPOOL

    core, record = fixture_crash("/app/crasher")
    return core, record, os.path.join(FIXTURE_SPOOL, "store")


@pytest.mark.skipif(os.geteuid() != 0, reason="the analysis's own uid is the agent's to switch to, as root")
def test_a_stated_signature_is_not_taken_the_frames_make_it(
    monkeypatch: pytest.MonkeyPatch, crash: tuple[str, list[dict], str]
) -> None:
    core, record, store = crash
    monkeypatch.setattr(runner, "_worker", lambda argv: (_writes(FORGED), []))
    report = runner.analyze(core, [store], record=record, timeout=30)
    assert report.signature == hashlib.sha256(b"SIGSEGV:own_bug").hexdigest()[:16] != VICTIM
    assert report.signature_frames == ("own_bug",) and report.title == "SIGSEGV in own_bug"


@pytest.mark.skipif(os.geteuid() != 0, reason="the analysis's own uid is the agent's to switch to, as root")
@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({**FORGED, "threads": "everything"}, "threads"),
        ({**FORGED, "signal": {"number": "eleven", "name": None}}, "signal.number"),
        (
            {
                **FORGED,
                "threads": [
                    {"tid": 1, "crashed": True, "frames": [{"index": 0, "pc": 1, "function": ["x"]}]}
                ],
            },
            "threads.0.frames.0.function",
        ),
    ],
    ids=["threads", "signal", "frame"],
)
def test_a_report_of_another_shape_fails_its_analysis_once(
    monkeypatch: pytest.MonkeyPatch, crash: tuple[str, list[dict], str], doc: dict, where: str
) -> None:
    """It is recorded as failed (an AnalysisError), not left to fail on a later read and be
    analysed again at every retry."""
    core, record, store = crash
    monkeypatch.setattr(runner, "_worker", lambda argv: (_writes(doc), []))
    with pytest.raises(runner.AnalysisError, match=f"its output is not a report: {where}"):
        runner.analyze(core, [store], record=record, timeout=30)


def test_a_lone_surrogate_in_a_report_is_taken_as_a_replacement_character() -> None:
    """A worker's JSON may spell ``\\udcff``: Python reads it as a lone surrogate, which the
    signature's hash, the catalog and every page refuse to encode (the analysis ended in a
    UnicodeEncodeError, at every retry)."""
    frame = {"index": 0, "pc": 4096, "function": "own\udcffbug", "file": "a\ud800.c"}
    doc = json.loads(json.dumps({**FORGED, "threads": [{"tid": 1, "crashed": True, "frames": [frame]}]}))
    report = runner.taken(doc)
    [taken] = report.threads[0].frames
    assert (taken.function, taken.file) == ("own\ufffdbug", "a\ufffd.c")
    assert report.title == "SIGSEGV in own\ufffdbug" and json.dumps(report.to_dict()).encode()
