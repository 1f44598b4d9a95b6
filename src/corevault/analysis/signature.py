"""Crash signatures: the same bug gets one, different bugs never share one.

The algorithm, the way ABRT/satyr, Socorro and Sentry do it:

1. Take the crashing thread's frames, inline frames included, innermost first.
2. Name each frame: its function name without parameters, return type, ``const``,
   clone suffixes (``.isra.0``, ``.constprop.1``, ``.part.2``, ``.cold``, ``.lto_priv.0``),
   symbol versions (``@@GLIBC_2.2.5``) and glibc's internal ``__GI_`` prefix. A frame with no
   name is ``module+0xOFFSET`` from the module's load address, which does not move with ASLR.
3. Drop the frames that say how the process died rather than why, for every runtime:
   glibc (raise, abort, ``__pthread_kill*``, assert, fortify and malloc failure paths),
   C++ (``std::terminate``, ``__cxa_throw``, the verbose terminate handler, ``std::__throw_*``,
   the unwinder), Rust (``panic_abort::…``, ``__rust_start_panic``, ``rust_panic``,
   ``core::panicking::…``, ``std::panicking::…``, the failure paths of ``unwrap``/``expect``
   and of slice indexing), Go (``runtime.raise``, ``dieFromSignal``, ``sigfwdgo``,
   ``fatalpanic``, ``gopanic``, ``sigpanic``, ``panicmem``, ``throw``…), and the thread and
   process entry points of each.
4. Keep the top three frames of the program itself (not libc, libstdc++, libgcc, the dynamic
   loader, the vDSO or Go's ``runtime`` package, which is linked into every Go binary); if
   there are none (a crash deep in libc with no program frames), the top three of what is
   left. A Go panic raised inside the runtime (``runtime.mapassign_faststr`` for a write to
   a nil map) is so attributed to the goroutine's own function that called it.
5. The signature is the signal name (an abort seen as SIGSEGV in a container's PID 1 counts
   as SIGABRT) and those frames; its id is the first 16 hex digits of their SHA-256.

A snapshot of a live process has no crashing thread: its signature is the set of distinct
thread stacks (each one's top frames, as above), so the same deadlock seen twice is one
group however many idle threads the pools had.

Computed from one back-end's frames only (the report says which), so a report never
mixes naming conventions.
"""

from __future__ import annotations

import hashlib
import os
import re

from corevault.model import Frame, Report

DEPTH = 3

SKIP = frozenset(
    """
    raise abort gsignal pthread_kill __pthread_kill __pthread_kill_implementation __pthread_kill_internal
    __assert_fail __assert_fail_base __assert_perror_fail __libc_message __libc_fatal __fortify_fail
    __chk_fail __stack_chk_fail malloc_printerr __malloc_assert
    std::terminate std::__terminate __cxa_throw __cxa_rethrow __cxa_call_terminate __cxa_call_unexpected
    __cxxabiv1::__terminate __cxxabiv1::__unexpected __gnu_cxx::__verbose_terminate_handler
    std::rethrow_exception std::__throw_logic_error std::__throw_out_of_range std::__throw_bad_alloc
    _Unwind_RaiseException _Unwind_Resume _Unwind_Resume_or_Rethrow __restore_rt
    __libc_start_main __libc_start_main_impl __libc_start_call_main _start start_thread clone clone3
    __libc_message_impl __fortify_fail_abort __stack_chk_fail_local __libc_start_main_alias_2
    __cxa_pure_virtual __cxa_deleted_virtual __cxa_bad_cast __cxa_bad_typeid __cxa_throw_bad_array_new_length
    __cxa_rethrow std::__glibcxx_assert_fail std::__replacement_assert execute_native_thread_routine
    std::thread::_State_impl::_M_run std::thread::_Invoker::_M_invoke std::__invoke std::__invoke_impl
    _M_run _M_invoke __invoke __invoke_impl
    rust_panic rust_begin_unwind __rust_start_panic __rust_end_short_backtrace __rust_begin_short_backtrace
    __rust_alloc_error_handler __rg_oom __rdl_oom std::process::abort std::sys::unix::abort_internal
    alloc::alloc::handle_alloc_error
    """.split()
)
# Prefixes and patterns of the same kind (template arguments removed before matching).
SKIP_PATTERN = re.compile(
    r"^(std::__throw_|__gnu_cxx::__throw_"
    r"|core::panicking::|std::panicking::|std::panic::|panic_abort::|panic_unwind::|std::sys_common::backtrace::"
    r"|std::rt::"
    r"|core::ops::function::|std::alloc::"
    r"|(core|alloc|std)::.*(_fail|_failed)$"
    r"|core::(option|result)::\w+::(unwrap|expect)\w*$"
    r"|runtime\.(raise\w*|dieFromSignal|sigfwd\w*|\w*sigtramp\w*|sighandler|crash|fatal\w*|throw|gopanic|sigpanic"
    r"|panic\w*|goPanic\w*|systemstack\w*|mcall|morestack\w*|abort|startpanic_m|dopanic_m|goexit\w*|main"
    r"|mstart\w*|rt0_go|asmcgocall\w*|sigreturn\w*)(\.func\d+)*(\.abi0)?$)"
)
# Go's runtime is linked into the program's own binary, but it is no more the program than libc is.
GO_RUNTIME = re.compile(r"^runtime(/internal/\w+)?\.")
_TEMPLATE_ARGS = re.compile(r"<[^<>]*>")
SYSTEM_LIBRARIES = re.compile(
    r"^(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[\w.-]*|ld-musl[\w.-]*|libstdc\+\+|libgcc_s|"
    r"libc\+\+|libc\+\+abi|libunwind|linux-vdso|linux-gate)(\.so|[.-]|$)"
)
_CLONE_SUFFIX = re.compile(r"(\.(isra|constprop|part|cold|lto_priv|llvm|localalias)(\.\d+)?)+$")


def _strip_parameters(name: str) -> str:
    name = name.removesuffix(" const")
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i].rstrip()
    return name


def normalize(frame: Frame) -> str:
    """The name a frame contributes to a signature."""
    name = frame.function
    if not name:
        if frame.module and frame.offset is not None:
            return f"{os.path.basename(frame.module)}+0x{frame.offset:x}"
        return "?"
    name = name.split("@", 1)[0]
    name = _strip_parameters(name)
    name = _CLONE_SUFFIX.sub("", name)
    # a C++ return type in front ("void ns::f"): keep the qualified name only
    if " " in name and "operator" not in name and "<" not in name:
        name = name.rsplit(" ", 1)[-1]
    return name.removeprefix("__GI_").removeprefix("*")


def is_system(path: str) -> bool:
    """Whether a mapped file is a system runtime library (libc, libstdc++, the loader…)."""
    return bool(SYSTEM_LIBRARIES.match(os.path.basename(path)))


def in_app(frame: Frame) -> bool:
    if not frame.module or is_system(frame.module):
        return False
    return not GO_RUNTIME.match(frame.function or "")


def _bare(name: str) -> str:
    """``name`` without template arguments, however nested (bounded: names are untrusted)."""
    for _ in range(8):
        stripped = _TEMPLATE_ARGS.sub("", name)
        if stripped == name:
            break
        name = stripped
    return name


def is_noise(name: str) -> bool:
    """Whether a normalised frame name says how the process died rather than why."""
    if name in SKIP:
        return True
    if name.startswith("<") and ">::" in name:
        # Rust's qualified paths, seen in inline frames: <core::option::Option<u32>>::unwrap, and
        # <&dyn Fn<()> as core::ops::function::FnOnce<()>>::call_once: the type's or the trait's
        head, _, method = name[1:].rpartition(">::")
        owner, _, trait = head.rpartition(" as ") if " as " in head else (head, "", "")
        paths = [p for p in (owner, trait) if p and not p.startswith("<")]  # no deeper: names are untrusted
        return any(is_noise(f"{path}::{method}") for path in paths)
    bare = _bare(name)
    return bare in SKIP or bool(SKIP_PATTERN.match(bare))


def _top(frames: tuple[Frame, ...]) -> tuple[str, ...]:
    kept = [(normalize(f), f) for f in frames]
    kept = [(n, f) for n, f in kept if not is_noise(n)]
    app = [n for n, f in kept if in_app(f)]
    return tuple((app or [n for n, _ in kept])[:DEPTH])


def _snapshot(report: Report) -> tuple[str | None, tuple[str, ...], str | None]:
    stacks = sorted({"|".join(top) for t in report.threads if (top := _top(t.frames))})
    if not stacks:
        return None, (), "snapshot"
    text = "SNAPSHOT:" + ";".join(stacks)
    firsts = sorted({s.split("|", 1)[0] for s in stacks})
    title = f"snapshot: {len(report.threads)} threads in " + ", ".join(firsts[:3])
    title += " …" if len(firsts) > 3 else ""
    return hashlib.sha256(text.encode()).hexdigest()[:16], tuple(stacks), title


def compute(report: Report) -> tuple[str | None, tuple[str, ...], str | None]:
    """``(signature id, the frames it was made of, a title for people)``."""
    if report.signal.number == 0:
        return _snapshot(report)
    thread = report.crashed_thread
    if thread is None or not thread.frames:
        return None, (), None
    top = _top(thread.frames)
    aborted = report.signal.description is not None and report.signal.description.startswith("abort")
    signal = "SIGABRT" if aborted else (report.signal.name or f"signal {report.signal.number}")
    text = signal + ":" + "|".join(top)
    title = f"{signal} in {top[0]}" + (f" ← {top[1]}" if len(top) > 1 else "") if top else signal
    return hashlib.sha256(text.encode()).hexdigest()[:16], top, title
