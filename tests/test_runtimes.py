"""Real programs of every runtime, crashed for real in runc pods and explained from their cores.

Go, Rust (legacy and v0 mangling), C++ with an exception in a worker thread, a static
non-PIE C program, Debian's own non-PIE python3.11 crashing through ctypes, and a program
whose last words attack their reader. Each crash is captured by the installed handler
(so the binaries are kept by build-id while the process exists); the rootfs holding the
binaries is deleted before any analysis, as an image is gone by the time someone looks.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corevault import spool
from corevault.analysis import deepstack, lastwords, render, runner, stackwalk, worker
from corevault.model import Report
from corevault.server import ui
from testbed import corpus
from tests.conftest import installed_capture

pytestmark = pytest.mark.crash

SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
GO = "GOTRACEBACK=crash /app/goservice"
NODE = "/usr/bin/node --abort-on-uncaught-exception /app/nodecrash.js"
# A Go binary has no GNU build-id: capture keeps it by Go's build id (see corevault.objectid).
# name: shell command (never the container's PID 1, which ignores the SIGABRT it raises)
GO_RUNS = {
    "go-nilmap": f"{GO} nilmap",
    "go-nilmap-again": f"{GO} nilmap",
    "go-nilptr": f"{GO} nilptr",
    "go-nilptr-admin": f"{GO} nilptr-admin",
    "go-mapwrites": f"{GO} mapwrites",
    "go-overflow": f"{GO} overflow",
}
RUNS = {
    **GO_RUNS,
    "rust-index": "/app/rustcrash index",
    "rust-index-again": "/app/rustcrash index",
    "rust-unwrap": "/app/rustcrash unwrap",
    "rust-v0-unwrap": "/app/rustcrash-v0 unwrap",
    "cxx-thread": "/app/workerthrow",
    "cxx-thread-again": "/app/workerthrow",
    "cxx-custom": "/app/workerthrow custom",
    "static-assert": "/app/crasher-static assert",
    "python-ctypes": "/usr/bin/python3.11 -S /app/pyctypes.py",
    "python-abort": "/usr/bin/python3.11 -S /app/pyctypes.py abort",
    "hostile": "/app/lastwords",
    "deep-stacks": "/app/deepstacks",
    "forged-go": "/app/forgedgo",
    "node-abort": f"{NODE} abort",
    "node-uncaught": f"{NODE} uncaught",
    "node-segv": f"{NODE} segv",
}


@dataclass
class Crash:
    meta: dict
    report: Report


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Crash]]:
    root = corpus.build_rootfs(str(tmp_path_factory.mktemp("runtimes") / "root"))
    with installed_capture() as cap:
        cap.configure("[capture]\nstorm_max = 100\n")
        metas = {}
        for name, command in RUNS.items():
            c = cap.crash(root, ["/bin/sh", "-c", f"{command}; exit 1"], annotations=SEED)
            [metas[name]] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
        shutil.rmtree(root)  # the image is gone: only what capture kept can explain the crashes
        out = {}
        for name, meta in metas.items():
            core = os.path.join(spool.ready_dir(cap.spool), meta["id"], spool.CORE_NAME)
            out[name] = Crash(meta, runner.analyze(core, [cap.store]))
        yield out


def crashed_thread_is_the_one_the_kernel_named(crash: Crash) -> bool:
    tids = (crash.meta["process"]["ns_tid"], crash.meta["process"]["tid"])
    return crash.report.crashed_tid in tids


@pytest.mark.parametrize(
    ("name", "signal", "function", "frames"),
    [
        pytest.param("go-nilmap", "SIGABRT", "main.recordHit", ["main.handle"]),
        # the faulting frame under Go's injected sigpanic call, and its callers
        pytest.param("go-nilptr", "SIGABRT", "main.sessionUser", ["main.handle"]),
        pytest.param("go-nilptr-admin", "SIGABRT", "main.sessionUser", ["main.auditAdmin", "main.handle"]),
        # either writer may be the one the runtime catches: handle's own, or the goroutine it started
        pytest.param("go-mapwrites", "SIGABRT", "main.countVisit", ["main.handle|main.handle.func1"]),
        pytest.param("go-overflow", "SIGABRT", "main.walkTree", ["main.walkTree"]),
        ("rust-index", "SIGABRT", "rustcrash::parse_port", ["rustcrash::load_config", "rustcrash::main"]),
        ("rust-unwrap", "SIGABRT", "rustcrash::lookup_user", ["rustcrash::main"]),
        ("rust-v0-unwrap", "SIGABRT", "rustcrash::lookup_user", ["rustcrash::main"]),
        ("cxx-thread", "SIGABRT", "check_id", ["validate_order", "process_orders"]),
        ("cxx-custom", "SIGABRT", "reject_order", ["process_orders"]),
        ("static-assert", "SIGABRT", "check_config", ["main"]),
        # Node's own C++ frames: what JavaScript was running is not reconstructed
        ("node-abort", "SIGABRT", "node::Abort", ["v8::internal::FunctionCallbackArguments::Call"]),
        ("node-uncaught", "SIGTRAP", "v8::base::OS::Abort", ["v8::internal::Isolate::CreateMessageOrAbort"]),
        ("node-segv", "SIGSEGV", "uv_kill", ["node::Kill"]),
    ],
)
def test_signal_thread_and_top_program_function(
    crashes: dict[str, Crash], name: str, signal: str, function: str, frames: list[str]
) -> None:
    crash = crashes[name]
    r = crash.report
    assert r.signal.name == signal
    assert crashed_thread_is_the_one_the_kernel_named(crash)
    assert r.signature_frames[0] == function, r.signature_frames
    callers = r.signature_frames[1 : 1 + len(frames)]
    assert len(callers) == len(frames) and all(
        c in f.split("|") for c, f in zip(callers, frames, strict=True)
    )
    assert r.missing_modules == (), [m.path for m in r.missing_modules]


def test_a_go_crash_belongs_to_the_goroutine_that_panicked(crashes: dict[str, Crash]) -> None:
    for name in ("go-nilmap", "go-nilptr"):
        r = crashes[name].report
        assert len(r.threads) > 1  # the service's other threads are there too
        crashed = r.crashed_thread
        assert crashed is not None
        names = [f.function for f in crashed.frames]
        # the runtime's death path is in the stack, and out of the signature
        assert "runtime.raise" in names and "runtime.fatalpanic" in names
        assert not any(n.startswith("runtime.") for n in r.signature_frames)


def test_a_go_nil_pointer_unwinds_through_the_runtimes_signal_frames(crashes: dict[str, Crash]) -> None:
    # Go's own restorer has no CFI and sigpanic is "called" from the faulting pc: each frame
    # once, from the signal handler down to the goroutine's first frame, as Go's traceback has it
    crashed = crashes["go-nilptr"].report.crashed_thread
    assert crashed is not None
    names = [f.function for f in crashed.frames if not f.inline]
    assert names.count("runtime.sigtrampgo") == 1 and names.count("main.sessionUser") == 1, names
    fault = names.index("main.sessionUser")
    assert names[fault - 1] == "runtime.sigpanic"
    assert names[fault + 1 :] == ["main.handle", "main.main.func2", "runtime.goexit"]
    assert not crashed.incomplete


def test_a_go_fatal_error_on_the_system_stack_is_the_goroutines(crashes: dict[str, Crash]) -> None:
    # "fatal error: stack overflow" is thrown on the thread's g0 stack: past runtime.morestack
    # the frames are the goroutine's, read from its saved state and its frame pointers
    crashed = crashes["go-overflow"].report.crashed_thread
    assert crashed is not None
    names = [f.function for f in crashed.frames]
    switch = names.index("runtime.morestack")
    assert "runtime.newstack" in names[:switch] and "runtime.throw" in names[:switch]
    # the goroutine's whole stack, to its first frame: the recursion counted in between
    [run] = crashed.omitted
    assert run.function == "main.walkTree" and run.count > 1000 and crashed.omitted_at == switch + 4
    assert set(names[switch + 1 : -3]) == {"main.walkTree"} and not crashed.incomplete
    assert names[-3:] == ["main.handle", "main.main.func2", "runtime.goexit.abi0"]
    assert all(f.module == "/app/goservice" for f in crashed.frames[switch + 1 :])


def test_a_worker_threads_exception_is_the_worker_threads_crash(crashes: dict[str, Crash]) -> None:
    crash = crashes["cxx-thread"]
    assert crash.report.crashed_tid != crash.meta["process"]["ns_pid"]
    assert len(crash.report.threads) == 5
    crashed = crash.report.crashed_thread
    assert crashed is not None
    program = [f for f in crashed.frames if f.module == "/app/workerthrow"]
    # check_id was inlined into validate_order: one pc, two frames, the inner one marked inline
    assert [(f.function, f.inline) for f in program[:2]] == [("check_id", True), ("validate_order", False)]
    assert program[0].pc == program[1].pc and program[0].file.endswith("workerthrow.cc")


def test_rust_names_carry_no_build_hash(crashes: dict[str, Crash]) -> None:
    for name in ("rust-index", "rust-v0-unwrap"):
        crashed = crashes[name].report.crashed_thread
        assert crashed is not None
        names = [f.function or "" for f in crashed.frames]
        assert "std::panicking::rust_panic_with_hook" in names
        assert not any(n.startswith(("_ZN", "_R")) or "::h" in n or "[" in n for n in names), names


def test_runtime_frames_are_not_the_signature(crashes: dict[str, Crash]) -> None:
    noise = ("panic", "rust_", "__rust", "core::", "std::", "runtime.", "__cxa", "abort", "raise")
    names = ["rust-index", "rust-unwrap", "cxx-thread", "static-assert", "go-nilmap", "go-nilptr",
             "go-mapwrites"]  # fmt: skip
    for name in names:
        top = crashes[name].report.signature_frames
        assert top and not any(f.startswith(noise) for f in top), (name, top)


def test_the_same_bug_in_two_pods_is_one_group_and_different_bugs_are_not(crashes: dict[str, Crash]) -> None:
    def sig(name: str) -> str | None:
        return crashes[name].report.signature

    for name in ["rust-index", "cxx-thread", "go-nilmap"]:
        again = crashes[f"{name}-again"]
        assert again.meta["pod"]["uid"] != crashes[name].meta["pod"]["uid"]
        assert sig(name) == sig(f"{name}-again")
    # a rebuild with the other Rust mangling scheme is the same bug
    assert sig("rust-unwrap") == sig("rust-v0-unwrap")
    distinct = ["go-nilmap", "go-nilptr", "go-nilptr-admin", "go-mapwrites", "go-overflow", "rust-index", "rust-unwrap", "cxx-thread", "cxx-custom", "static-assert",
                "python-ctypes", "python-abort", "node-abort", "node-uncaught", "node-segv"]  # fmt: skip
    signatures = [sig(n) for n in distinct]
    assert None not in signatures and len(set(signatures)) == len(distinct), dict(
        zip(distinct, signatures, strict=True)
    )


@pytest.mark.parametrize(
    ("name", "words"),
    [
        pytest.param("go-nilmap", "panic: assignment to entry in nil map"),
        pytest.param(
            "go-nilptr",
            "panic: runtime error: invalid memory address or nil pointer dereference",
        ),
        # no panic: the runtime's own print ring (runtime.printBacklog) holds the text
        ("go-mapwrites", "fatal error: concurrent map writes"),
        ("go-overflow", "fatal error: stack overflow"),
        (
            "rust-index",
            "panicked at 'index out of bounds: the len is 2 but the index is 4', {src}/rustcrash.rs:8:5",
        ),
        (
            "rust-unwrap",
            "panicked at 'called `Option::unwrap()` on a `None` value', {src}/rustcrash.rs:19:63",
        ),
        (
            "rust-v0-unwrap",
            "panicked at 'called `Option::unwrap()` on a `None` value', {src}/rustcrash.rs:19:63",
        ),
        ("cxx-thread", "uncaught std::invalid_argument: order id must not be negative: -7"),
        # a type of the program's own: its name, and no what() (its layout is unknown)
        ("cxx-custom", "uncaught shop::OrderRejected"),
        (
            "static-assert",
            'crasher-static: {src}/crasher.c:{line}: check_config: Assertion `c != NULL && "config must be loaded"\' failed.',
        ),
    ],
)
def test_last_words_are_read_from_the_core(crashes: dict[str, Crash], name: str, words: str) -> None:
    r = crashes[name].report
    # {src}: the corpus's source directory, wherever the cached build was compiled
    expected = re.escape(words).replace(re.escape("{src}"), r"/\S*testbed/programs")
    expected = expected.replace(re.escape("{line}"), r"\d+")
    assert r.last_words is not None and re.fullmatch(expected, r.last_words), r.last_words
    assert f"Last words: {r.last_words}" in render.text(r)


def test_no_last_words_where_the_runtime_left_none(crashes: dict[str, Crash]) -> None:
    # os.abort() and a SIGSEGV leave no message anywhere: nothing is made up
    assert crashes["python-abort"].report.last_words is None
    assert crashes["python-ctypes"].report.last_words is None


def test_the_interpreter_crash_is_in_the_interpreters_own_files(crashes: dict[str, Crash]) -> None:
    r = crashes["python-ctypes"].report
    assert r.signal.name == "SIGSEGV" and r.signal.fault_address == 0
    assert r.exe == "/usr/bin/python3.11"
    python = next(m for m in r.modules if m.path == "/usr/bin/python3.11")
    assert python.start == 0x400000 and python.found  # not position-independent, still kept
    crashed = r.crashed_thread
    assert crashed is not None and crashed.frames[0].module is not None
    assert os.path.basename(crashed.frames[0].module).startswith("_ctypes")


def test_node_is_named_as_gdb_names_it_and_kept_once(crashes: dict[str, Crash]) -> None:
    # gdb on the same core: v8::base::OS::Abort() <- v8::internal::Isolate::CreateMessageOrAbort(...)
    # <- ...ThrowInternal(...) <- v8::internal::Runtime_Throw(...) <- Builtins_CEntry_... <-
    # Builtins_ThrowHandler <- Builtins_InterpreterEntryTrampoline, then unnamed JIT frames;
    # V8 keeps frame pointers, which lead through them to node::Start and main
    crashed = crashes["node-uncaught"].report.crashed_thread
    assert crashed is not None
    names = [f.function or "" for f in crashed.frames]
    assert names[:4] == [
        "v8::base::OS::Abort()",
        "v8::internal::Isolate::CreateMessageOrAbort(v8::internal::Handle<v8::internal::Object>, "
        "v8::internal::MessageLocation*)",
        "v8::internal::Isolate::ThrowInternal(v8::internal::Object, v8::internal::MessageLocation*)",
        "v8::internal::Runtime_Throw(int, unsigned long*, v8::internal::Isolate*)",
    ], names[:4]
    assert "Builtins_InterpreterEntryTrampoline" in names and "node::Start(int, char**)" in names
    assert all(f.module == "/usr/bin/node" for f in crashed.frames[:4])
    # a 100 MB binary is copied once, at its first crash; later crashes name the same content
    stored = [
        next(m for m in crashes[name].meta["modules"] if m["path"] == "/usr/bin/node")
        for name in ("node-abort", "node-uncaught", "node-segv")
    ]
    assert [m["stored"] for m in stored] == ["new", "held", "held"]
    assert len({m["sha256"] for m in stored}) == 1
    for name in ("node-abort", "node-uncaught", "node-segv"):
        assert crashes[name].report.last_words is None  # V8's message is not read from its heap


def test_a_stack_built_to_cost_its_reader_costs_a_bounded_report(crashes: dict[str, Crash]) -> None:
    r = crashes["deep-stacks"].report
    crashed = r.crashed_thread
    # it overflows in either function, wherever the stack's end falls
    assert crashed is not None and r.signature_frames in (("pong", "ping", "pong"), ("ping", "pong", "ping"))
    # the crashed thread is walked to the depth bound, no further, and its middle, where
    # no function repeats in a row, is at most MAX_RUNS runs however long it is
    assert crashed.incomplete and crashed.depth == worker.MAX_DEPTH
    assert len(crashed.omitted) == deepstack.MAX_RUNS and crashed.omitted[-1].function is None
    assert crashed.omitted[-1].count > worker.MAX_DEPTH // 2
    # threads that did not crash are not walked past the report's frame limit
    waiting = [t for t in r.threads if not t.crashed]
    assert len(waiting) == 4
    assert all(t.incomplete and len(t.frames) == 256 and not t.omitted for t in waiting)


def test_a_forged_go_signal_frame_that_points_at_itself_is_followed_a_bounded_number_of_times(
    crashes: dict[str, Crash],
) -> None:
    crashed = crashes["forged-go"].report.crashed_thread
    assert crashed is not None
    names = [f.function for f in crashed.frames]
    # each restart from the forged state finds the same fault and the same forged frame
    assert names.count("fault_here") == stackwalk.MAX_RESTARTS + 1
    assert crashed.depth == 2 * (stackwalk.MAX_RESTARTS + 1)


def test_hostile_last_words_are_bounded_plain_text(crashes: dict[str, Crash]) -> None:
    words = crashes["hostile"].report.last_words
    assert words is not None and words.startswith(
        "lastwords: <i>evil.c</i>:1: say_goodbye: Assertion `<script>"
    )
    assert len(words) <= lastwords.MAX_TEXT
    assert "\x1b" not in words and "\x07" not in words
    page = ui.templates.env.get_template("crash.html").render(
        crash={"id": "x", "signal_name": "SIGABRT", "signal": 6, "time": 0, "size": 1, "stored_size": 1},
        report={**crashes["hostile"].report.to_dict(), "threads": []},
        crashed=None, others=[], commands=[], environ=[], meta=crashes["hostile"].meta, open_access=True,
    )  # fmt: skip
    assert "&lt;script&gt;alert(" in page and "<script>alert(" not in page
