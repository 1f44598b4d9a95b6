"""Which kernel log lines mean a lost dump (the following of /dev/kmsg is tested with real skips)."""

from __future__ import annotations

from corevault.agent.kernellog import parse


def test_a_skip_over_core_pipe_limit_is_a_lost_dump() -> None:
    record = parse("coredump: 25682(victimxyz): over core_pipe_limit, skipping core dump")
    assert record == {
        "ns_pid": 25682,
        "comm": "victimxyz",
        "reason": "the kernel did not dump victimxyz (pid 25682 in its namespace): over core_pipe_limit, skipping core dump",
    }


def test_a_comm_with_parentheses_and_escapes_is_kept_as_the_kernel_printed_it() -> None:
    record = parse("coredump: 7(a): b\\x1b(x): over core_pipe_limit, skipping core dump")
    assert record is not None and record["ns_pid"] == 7 and record["comm"] == "a): b\\x1b(x"


def test_rate_limited_reports_are_counted() -> None:
    record = parse("__coredump_report: 12 callbacks suppressed")
    assert record is not None and record["count"] == 12


def test_rate_limited_warnings_about_settings_are_not_lost_dumps() -> None:
    # printed by writing core_pattern and suid_dumpable in the wrong order, as seen on this kind of host
    assert parse("validate_coredump_safety: 10 callbacks suppressed") is None
    record = parse("coredump_pipe: 3 callbacks suppressed")  # 6.16+: the skip's own function
    assert record is not None and record["count"] == 3


def test_warnings_about_settings_are_not_lost_dumps() -> None:
    assert (
        parse("coredump: 5823(python): Unsafe core_pattern used with fs.suid_dumpable=2: set it first")
        is None
    )
    assert parse("m[24173]: segfault at 0 ip 0000559136037129 sp 00007ffdf6045940 error 6") is None
