"""The report as people read it (:mod:`corevault.analysis.render`), and what a crashed
process's names cannot do to it: every name, path and argument in it is the process's."""

from __future__ import annotations

from corevault.analysis import render
from corevault.model import Frame, Module, Report, Signal, Thread


def report(**kw: object) -> Report:
    frames = (
        Frame(index=0, pc=0x401136, function="crash_here", file="/src/crasher.c", line=36, module="/app/crasher", offset=0x1136),
        Frame(index=1, pc=0x401040, function="main", file="/src/crasher.c", line=120, inline=True),
        Frame(index=2, pc=0x7F0000027249, module="/lib/x86_64-linux-gnu/libc.so.6", offset=0x27249),
        Frame(index=3, pc=0x7F00000272FF),
    )  # fmt: skip
    base: dict = {
        "signal": Signal(number=11, name="SIGSEGV", code=1, code_name="SEGV_MAPERR", fault_address=0,
                         description="address not mapped"),
        "crashed_tid": 7,
        "threads": (Thread(tid=7, crashed=True, frames=frames),),
        "modules": (
            Module(path="/app/crasher", start=0x400000, end=0x402000, build_id="ab" * 20, file="/store/ab", debuginfo=True),
            Module(path="/lib/x86_64-linux-gnu/libc.so.6", start=0x7F0000000000, end=0x7F0000200000,
                   build_id="cd" * 20, file="/store/cd"),
            Module(path="/app/libgone.so", start=0x7F1000000000, end=0x7F1000001000, build_id="ef" * 20),
        ),
        "backend": "drgn", "core_size": 4096, "pid": 1, "exe": "/app/crasher", "args": "/app/crasher segv",
        "title": "SIGSEGV in crash_here ← main", "signature": "0123456789abcdef",
    }  # fmt: skip
    return Report(**(base | kw))


def test_frames_show_source_lines_else_module_and_offset() -> None:
    lines = render.text(report()).splitlines()
    i = lines.index("Stack trace of thread 7 (crashed):")
    assert lines[i + 1 : i + 5] == [
        "  #0   0x0000000000401136 crash_here at /src/crasher.c:36",
        "  #1   0x0000000000401040 main [inlined] at /src/crasher.c:120",
        "  #2   0x00007f0000027249 ?? (libc.so.6+0x27249)",
        "  #3   0x00007f00000272ff ??",
    ]


def test_the_header_modules_and_warnings() -> None:
    text = render.text(report(warnings=("missing: /app/libgone.so",), truncated=True, core_size=10))
    assert text.startswith("       Title: SIGSEGV in crash_here ← main\n   Signature: 0123456789abcdef\n")
    assert "      Signal: 11 (SIGSEGV), code 1 (SEGV_MAPERR)\n        What: address not mapped\n" in text
    assert "       Fault: address 0x0\n" in text
    assert "         PID: 1    crashed thread: 7    threads: 1\n        Core: 10 bytes  (TRUNCATED)\n" in text
    assert text.endswith(
        "Modules:\n"
        f"  0x400000 /app/crasher  build-id {'ab' * 20}  [debug info]\n"
        f"  0x7f0000000000 /lib/x86_64-linux-gnu/libc.so.6  build-id {'cd' * 20}  [symbols only]\n"
        f"  0x7f1000000000 /app/libgone.so  build-id {'ef' * 20}  [MISSING]\n"
        "warning: missing: /app/libgone.so"
    )


def test_a_report_of_nothing_known_still_renders() -> None:
    bare = Report(
        signal=Signal(number=6, name=None),
        crashed_tid=None,
        threads=(),
        modules=(),
        backend="notes",
        core_size=0,
    )
    text = render.text(bare)
    assert "       Title: ?" in text and "      Signal: 6 (?)" in text and "Executable: ?" in text
    assert "Stack trace" not in text and text.endswith("Modules:")


def test_a_snapshot_names_no_signal_and_no_crashed_thread() -> None:
    snap = report(signal=Signal(number=0, name=None, description="snapshot of a live process"), crashed_tid=None,
                  threads=(Thread(tid=7, crashed=False, frames=(Frame(index=0, pc=1, function="poll"),)),))  # fmt: skip
    text = render.text(snap)
    assert "      Signal: none: a snapshot of a live process" in text and "What:" not in text
    assert "crashed thread" not in text and "Stack trace of thread 7:\n  #0 " in text


def test_other_threads_are_cut_and_can_be_left_out() -> None:
    many = tuple(Frame(index=i, pc=0x1000 + i, function=f"f{i}") for i in range(render.MAX_OTHER_FRAMES + 5))
    r = report(threads=(*report().threads, Thread(tid=8, crashed=False, frames=many)))
    text = render.text(r)
    assert f"f{render.MAX_OTHER_FRAMES - 1}" in text and f"f{render.MAX_OTHER_FRAMES}" not in text
    assert "\n\nStack trace of thread 8:\n" in text and "  …\n" in text
    assert "thread 8" not in render.text(r, all_threads=False)


def test_last_words_keep_their_lines_indented() -> None:
    text = render.text(report(last_words="panic: boom\n\ngoroutine 1 [running]:"))
    assert "  Last words: panic: boom\n              \n              goroutine 1 [running]:\n" in text


def test_names_from_the_process_cannot_forge_lines_or_drive_the_terminal() -> None:
    """A symbol, a path and an argument with line breaks, escapes and a right-to-left override."""
    forged = "\nwarning: nothing to worry about\n  0x0 /usr/lib/trusted.so  build-id 00  [debug info]"
    r = report(
        exe="/app/\x1b]0;owned\x07x",
        args="x\rCommand line: innocent",
        threads=(Thread(tid=7, crashed=True, frames=(Frame(index=0, pc=1, function="evil" + forged),)),),
        modules=(Module(path="/app/x\u202egnp.exe" + forged, start=0, end=1),),
        warnings=("missing: /app/y" + forged,),
        title="SIGSEGV in evil\x1b[2J",
    )
    text = render.text(r)
    lines = text.split("\n")
    assert not any(line.startswith(("warning: nothing", "  0x0 /usr/lib/trusted.so")) for line in lines)
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: missing: /app/y\\x0awarning: nothing to worry about\\x0a  0x0 /usr/lib/trusted.so  build-id 00  [debug info]"
    ]
    assert (
        sum(line.startswith("  #") for line in lines) == 1
        and sum(line.startswith("  0x") for line in lines) == 1
    )
    assert all(line.isprintable() for line in lines)
    assert "\\x1b]0;owned\\x07" in text and "x\\x0dCommand line: innocent" in text and "\\u202e" in text


def test_hostile_last_words_stay_inside_their_indented_block() -> None:
    text = render.text(report(last_words="assert failed\nwarning: all is well\x1b[2J"))
    assert "\nwarning: all is well" not in text
    assert "              warning: all is well\\x1b[2J" in text
