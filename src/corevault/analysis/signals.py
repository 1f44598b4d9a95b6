"""Naming what killed a process: signal, si_code, and the quirks that hide an abort.

A container's PID 1 that calls ``abort()`` is not killed by SIGABRT: PID 1 ignores
signals it has no handler for, so glibc's abort() falls through to a ``hlt`` instruction,
which faults in user mode as SIGSEGV with si_code SI_KERNEL (128). That crash is an abort
and is reported as one.
"""

from __future__ import annotations

import signal as _signal

from corevault.model import Signal

SI_KERNEL = 0x80
_GENERIC = {0: "SI_USER", -1: "SI_QUEUE", -6: "SI_TKILL", SI_KERNEL: "SI_KERNEL"}
_CODES = {
    _signal.SIGSEGV: {
        1: ("SEGV_MAPERR", "address not mapped"),
        2: ("SEGV_ACCERR", "invalid permissions for mapped object"),
        3: ("SEGV_BNDERR", "failed address bound checks"),
        4: ("SEGV_PKUERR", "protection key check failed"),
    },
    _signal.SIGBUS: {
        1: ("BUS_ADRALN", "invalid address alignment"),
        2: ("BUS_ADRERR", "nonexistent physical address (e.g. a truncated mmap'ed file)"),
        3: ("BUS_OBJERR", "object-specific hardware error"),
    },
    _signal.SIGFPE: {
        1: ("FPE_INTDIV", "integer divide by zero"),
        2: ("FPE_INTOVF", "integer overflow"),
        3: ("FPE_FLTDIV", "floating-point divide by zero"),
        4: ("FPE_FLTOVF", "floating-point overflow"),
        5: ("FPE_FLTUND", "floating-point underflow"),
        6: ("FPE_FLTRES", "floating-point inexact result"),
        7: ("FPE_FLTINV", "invalid floating-point operation"),
        8: ("FPE_FLTSUB", "subscript out of range"),
    },
    _signal.SIGILL: {
        1: ("ILL_ILLOPC", "illegal opcode"),
        2: ("ILL_ILLOPN", "illegal operand"),
        3: ("ILL_ILLADR", "illegal addressing mode"),
        4: ("ILL_ILLTRP", "illegal trap"),
        5: ("ILL_PRVOPC", "privileged opcode"),
        6: ("ILL_PRVREG", "privileged register"),
        7: ("ILL_COPROC", "coprocessor error"),
        8: ("ILL_BADSTK", "internal stack error"),
    },
    _signal.SIGTRAP: {1: ("TRAP_BRKPT", "breakpoint"), 2: ("TRAP_TRACE", "trace trap")},
}
FAULT_SIGNALS = frozenset({_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGILL, _signal.SIGFPE, _signal.SIGTRAP})
HLT = b"\xf4"


def name(number: int) -> str | None:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return None


SNAPSHOT = "snapshot of a live process"


def snapshot() -> Signal:
    """What a snapshot's report says instead of a signal: the process did not crash."""
    return Signal(number=0, name=None, description=SNAPSHOT)


def describe(
    number: int, code: int | None, fault_address: int | None, pc_bytes: bytes | None, top_functions: list[str]
) -> Signal:
    """The signal as people talk about it, with the container-PID-1 abort recognised."""
    code_name, description = (
        _CODES.get(number, {}).get(code, (_GENERIC.get(code), None)) if code is not None else (None, None)
    )
    if (
        number == _signal.SIGSEGV
        and code == SI_KERNEL
        and (pc_bytes == HLT or any("abort" in f for f in top_functions[:3]))
    ):
        description = (
            "abort (SIGABRT is ignored by a container's PID 1, so abort() ended at a hlt instruction)"
        )
    elif number == _signal.SIGABRT:
        description = "abort"
    elif description is None and code in (0, -6):
        description = "sent by a process (kill/tkill)"
    return Signal(
        number=number,
        name=name(number),
        code=code,
        code_name=code_name,
        fault_address=fault_address if number in FAULT_SIGNALS else None,
        description=description,
    )
