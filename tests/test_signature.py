"""Signature normalisation and the report's JSON round trip, on hand-made reports."""

from __future__ import annotations

import pytest

from corevault.analysis import signature
from corevault.model import Frame, Module, Report, Signal, Thread


def report(frames: list[Frame], sig: Signal | None = None) -> Report:
    return Report(
        signal=sig or Signal(11, "SIGSEGV", 1, "SEGV_MAPERR", 0, "address not mapped"),
        crashed_tid=7,
        threads=(Thread(7, True, tuple(frames)), Thread(8, False, (Frame(0, 1, "pause"),))),
        modules=(Module("/app/srv", 0x1000, 0x9000, "ab" * 20, "/store/x", True),),
        backend="drgn",
        core_size=4096,
    )


def f(name: str | None, module: str = "/app/srv", offset: int = 0x10, i: int = 0) -> Frame:
    return Frame(index=i, pc=0x7F0000000000 + offset, function=name, module=module, offset=offset)


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        (
            "parse_config(std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> > const&)",
            "parse_config",
        ),
        ("ns::Cache::get(int) const", "ns::Cache::get"),
        ("handle_request.isra.0", "handle_request"),
        ("handle_request.constprop.1.cold", "handle_request"),
        ("__GI_raise", "raise"),
        ("memcpy@@GLIBC_2.14", "memcpy"),
    ],
)
def test_normalize(name: str, normal: str) -> None:
    assert signature.normalize(f(name)) == normal


def test_unnamed_frames_use_module_and_offset() -> None:
    assert signature.normalize(f(None, "/usr/lib/libfoo.so.1", 0x1A2B)) == "libfoo.so.1+0x1a2b"


def test_noise_frames_are_dropped_and_app_frames_win() -> None:
    frames = [
        f("__pthread_kill_implementation", "/lib/x86_64-linux-gnu/libc.so.6", 1),
        f("raise", "/lib/x86_64-linux-gnu/libc.so.6", 2),
        f("abort", "/lib/x86_64-linux-gnu/libc.so.6", 3),
        f("__cxa_throw", "/lib/x86_64-linux-gnu/libstdc++.so.6", 4),
        f("load(char const*)", "/app/srv", 5),
        f("memcpy", "/lib/x86_64-linux-gnu/libc.so.6", 6),
        f("main", "/app/srv", 7),
        f("__libc_start_call_main", "/lib/x86_64-linux-gnu/libc.so.6", 8),
        f("_start", "/app/srv", 9),
    ]
    sig, top, title = signature.compute(report(frames, Signal(6, "SIGABRT", -6, "SI_TKILL", None, "abort")))
    assert top == ("load", "main")
    assert title == "SIGABRT in load ← main"
    assert sig is not None and len(sig) == 16


def test_aslr_does_not_change_the_signature() -> None:
    a = [f("crash_here", offset=0x20), f("main", offset=0x40)]
    b = [
        Frame(i, fr.pc + 0x1000_0000, fr.function, module=fr.module, offset=fr.offset)
        for i, fr in enumerate(a)
    ]
    assert signature.compute(report(a))[0] == signature.compute(report(b))[0]


def test_signal_is_part_of_the_signature() -> None:
    frames = [f("crash_here")]
    fpe = Signal(8, "SIGFPE", 1, "FPE_INTDIV", 0, "integer divide by zero")
    assert signature.compute(report(frames))[0] != signature.compute(report(frames, fpe))[0]


def test_crash_only_in_libc_falls_back_to_library_frames() -> None:
    frames = [
        f("__strlen_avx2", "/lib/x86_64-linux-gnu/libc.so.6"),
        f(None, "/lib/x86_64-linux-gnu/libc.so.6", 0x99),
    ]
    assert signature.compute(report(frames))[1] == ("__strlen_avx2", "libc.so.6+0x99")


def test_report_json_round_trip() -> None:
    r = report([f("crash_here"), f("main")])
    assert Report.from_dict(r.to_dict()) == r


def _abort() -> Signal:
    return Signal(6, "SIGABRT", -6, "SI_TKILL", None, "abort")


LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def test_rust_panic_machinery_is_not_the_bug() -> None:
    def panic(bug: str) -> list[Frame]:
        frames = [
            f("__pthread_kill_implementation", LIBC), f("raise", LIBC), f("abort", LIBC),
            f("panic_abort::__rust_start_panic::abort"), f("__rust_start_panic"), f("rust_panic"),
            f("std::panicking::rust_panic_with_hook"), f("std::panicking::begin_panic_handler::{{closure}}"),
            f("std::sys_common::backtrace::__rust_end_short_backtrace"), f("rust_begin_unwind"),
            f("core::panicking::panic_fmt"), f("core::panicking::panic"), f("core::option::Option<T>::unwrap"),
            f(bug), f("app::main"), f("std::rt::lang_start::{{closure}}"), f("std::rt::lang_start_internal"),
            f("main"),
        ]  # fmt: skip
        return frames

    _, top, title = signature.compute(report(panic("app::lookup_user"), _abort()))
    assert top == ("app::lookup_user", "app::main", "main")
    assert title == "SIGABRT in app::lookup_user ← app::main"
    assert (
        signature.compute(report(panic("app::parse_port"), _abort()))[0]
        != signature.compute(report(panic("app::lookup_user"), _abort()))[0]
    )


def test_go_runtime_frames_are_not_the_bug() -> None:
    def crash(*bug: str) -> list[Frame]:
        frames = [
            f("runtime.raise"), f("runtime.dieFromSignal"), f("runtime.sigfwdgo"), f("runtime.crash"),
            f("runtime.fatalpanic.func1"), f("runtime.systemstack"), f("runtime.fatalpanic"), f("runtime.gopanic"),
            *[f(b) for b in bug], f("main.handle"), f("runtime.goexit"),
        ]  # fmt: skip
        return frames

    nilmap = report(crash("runtime.mapassign_faststr", "main.recordHit"), _abort())
    nilptr = report(crash("runtime.panicmem", "runtime.sigpanic", "main.sessionUser"), _abort())
    assert signature.compute(nilmap)[1] == ("main.recordHit", "main.handle")
    assert signature.compute(nilptr)[1] == ("main.sessionUser", "main.handle")
    # a crash wholly inside the runtime still gets a signature, from the runtime's frames
    inside = report([f("runtime.raise"), f("runtime.throw"), f("runtime.mallocgc"), f("runtime.newobject")])
    assert signature.compute(inside)[1] == ("runtime.mallocgc", "runtime.newobject")


def test_cxx_terminate_and_thread_entry_frames_are_not_the_bug() -> None:
    std = "/lib/x86_64-linux-gnu/libstdc++.so.6"
    frames = [
        f("raise", LIBC), f("abort", LIBC), f("__gnu_cxx::__verbose_terminate_handler()", std),
        f("__cxxabiv1::__terminate(void (*)())", std), f("std::terminate()", std), f("__cxa_throw", std),
        f("validate_order(int)"), f("process_orders()"), f("__invoke_impl<void, void (*)()>"),
        f("std::thread::_State_impl<std::thread::_Invoker<std::tuple<void (*)()> > >::_M_run()"),
        f("execute_native_thread_routine", std), f("start_thread", LIBC), f("clone3", LIBC),
    ]  # fmt: skip
    assert signature.compute(report(frames, _abort()))[1] == ("validate_order", "process_orders")


def test_a_program_function_named_like_a_runtime_prefix_still_counts() -> None:
    # only the runtimes' own namespaces are noise, not every name that resembles one
    frames = [f("runtime_config_load"), f("panic_button"), f("std_parse"), f("main")]
    assert signature.compute(report(frames))[1] == ("runtime_config_load", "panic_button", "std_parse")
