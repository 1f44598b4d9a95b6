"""Naming what killed a process (:mod:`corevault.analysis.signals`), the PID 1 abort included."""

from __future__ import annotations

import signal

import pytest

from corevault.analysis import signals


def test_names() -> None:
    assert signals.name(11) == "SIGSEGV" and signals.name(6) == "SIGABRT"
    assert signals.name(0) is None and signals.name(200) is None and signals.name(-1) is None


@pytest.mark.parametrize(
    ("number", "code", "code_name", "words"),
    [
        (signal.SIGSEGV, 1, "SEGV_MAPERR", "address not mapped"),
        (signal.SIGSEGV, 2, "SEGV_ACCERR", "invalid permissions"),
        (signal.SIGBUS, 2, "BUS_ADRERR", "truncated mmap"),
        (signal.SIGFPE, 1, "FPE_INTDIV", "integer divide by zero"),
        (signal.SIGILL, 2, "ILL_ILLOPN", "illegal operand"),
        (signal.SIGTRAP, 1, "TRAP_BRKPT", "breakpoint"),
    ],
)
def test_fault_codes_are_named_and_keep_the_fault_address(
    number: int, code: int, code_name: str, words: str
) -> None:
    s = signals.describe(number, code, 0xDEAD, None, ["f", "main"])
    assert (s.number, s.name, s.code, s.code_name) == (number, signal.Signals(number).name, code, code_name)
    assert words in (s.description or "") and s.fault_address == 0xDEAD


def test_a_signal_sent_by_a_process() -> None:
    for code, code_name in ((0, "SI_USER"), (-6, "SI_TKILL")):
        s = signals.describe(signal.SIGQUIT, code, 0x1234, None, [])
        assert s.code_name == code_name and s.description == "sent by a process (kill/tkill)"
        assert s.fault_address is None  # only faults have an address; siginfo's field means nothing here
    queued = signals.describe(signal.SIGSEGV, -1, 0x10, None, [])
    assert queued.code_name == "SI_QUEUE" and queued.description is None


def test_abort_is_an_abort_whatever_its_code() -> None:
    for code in (None, -6, 0):
        s = signals.describe(
            signal.SIGABRT, code, 0x10, None, ["__pthread_kill_implementation", "raise", "abort"]
        )
        assert s.description == "abort" and s.fault_address is None


def test_a_container_pid_1_abort_ends_at_hlt_and_is_reported_as_an_abort() -> None:
    by_instruction = signals.describe(signal.SIGSEGV, signals.SI_KERNEL, 0, signals.HLT, ["??"])
    by_frames = signals.describe(signal.SIGSEGV, signals.SI_KERNEL, 0, None, ["__GI_abort", "check", "main"])
    for s in (by_instruction, by_frames):
        assert s.name == "SIGSEGV" and s.code_name == "SI_KERNEL"
        assert s.description is not None and s.description.startswith("abort (SIGABRT is ignored")


def test_a_kernel_segv_that_is_no_abort_stays_a_segv() -> None:
    # abort deeper than the top three frames, another instruction, or another code: not the PID 1 abort
    for code, pc, frames in (
        (signals.SI_KERNEL, b"\x0f", ["f", "g", "h", "abort"]),
        (signals.SI_KERNEL, None, []),
        (1, signals.HLT, ["abort"]),
    ):
        s = signals.describe(signal.SIGSEGV, code, 0, pc, frames)
        assert s.description is None or not s.description.startswith("abort"), (code, pc, frames)


def test_unknown_numbers_and_codes_are_kept_unnamed() -> None:
    s = signals.describe(77, 99, 0x10, None, [])
    assert (s.number, s.name, s.code, s.code_name, s.description, s.fault_address) == (
        77,
        None,
        99,
        None,
        None,
        None,
    )
    s = signals.describe(signal.SIGSEGV, 1234, 0x10, None, [])
    assert s.code_name is None and s.fault_address == 0x10
    s = signals.describe(signal.SIGSEGV, None, None, None, [])
    assert s.code is None and s.code_name is None and s.description is None


def test_a_snapshot_names_no_signal() -> None:
    s = signals.snapshot()
    assert s.number == 0 and s.name is None and s.description == signals.SNAPSHOT
