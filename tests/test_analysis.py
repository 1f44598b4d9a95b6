"""Analysis of the crash corpus: real programs crashed for real in runc containers.

Each crash is captured by the installed handler once per module; the tests analyse the
cores (the plain one from the pod's volume or the zstd one from the spool) and check the
signal, the crashing thread, the top in-app function and the signature.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corevault import spool
from corevault.analysis import render, runner
from corevault.model import Report
from corevault.server import ui
from testbed import build, runc
from tests.conftest import installed_capture

pytestmark = pytest.mark.crash

SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
CORPUS = {
    # name: (args, via a shell so the program is not the container's PID 1)
    "segv": (["/app/crasher", "segv"], False),
    "segv-again": (["/app/crasher segv; exit 1"], True),
    "stack": (["/app/crasher", "stack"], False),
    "fpe": (["/app/crasher", "fpe"], False),
    "ill": (["/app/crasher", "ill"], False),
    "bus": (["/app/crasher", "bus"], False),
    "cxx": (["/app/thrower; exit 1"], True),
    "assert": (["/app/crasher assert; exit 1"], True),
    "assert-pid1": (["/app/crasher", "assert"], False),
    "threads": (["/app/crasher", "threads", "199"], False),
    "stripped": (["/app/crasher-stripped", "segv"], False),
    "stripped-again": (["/app/crasher-stripped segv; exit 1"], True),
    "library": (["/app/libuser"], False),
    # copied into the (writable) volume and run from there, so it can delete itself
    "deleted-exe": (["cp /app/crasher /data/dump-a/gone && exec /data/dump-a/gone unlink"], True),
}


@dataclass
class Crash:
    meta: dict
    spool_core: str
    volume_core: str
    report: Report


@pytest.fixture(scope="module")
def corpus(programs: dict[str, str], rootfs: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    glibc = build.other_glibc()
    assert glibc is not None, "no other libc6 build in the Debian archive to make a foreign-libc container"
    foreign = runc.build_rootfs(str(tmp_path_factory.mktemp("foreign") / "root"), programs, glibc=glibc)
    runs = {name: (rootfs, args, shell) for name, (args, shell) in CORPUS.items()}
    runs["foreign-libc"] = (foreign, ["/app/crasher", "libc"], False)
    with installed_capture() as cap:
        cap.configure("[capture]\nstorm_max = 100\n")
        crashes = {}
        for name, (root, args, shell) in runs.items():
            argv = ["/bin/sh", "-c", " ".join(args)] if shell else args
            c = cap.crash(root, argv, annotations=SEED)
            [meta] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
            spool_core = os.path.join(spool.ready_dir(cap.spool), meta["id"], spool.CORE_NAME)
            volume_core = os.path.join(cap.volume, os.path.basename(meta["volume"]["path"]))
            report = runner.analyze(spool_core, [cap.store])
            crashes[name] = Crash(meta, spool_core, volume_core, report)
        yield {"crashes": crashes, "capture": cap, "glibc": glibc, "foreign": foreign}


def top_app_function(report: Report) -> str:
    return report.signature_frames[0]


@pytest.mark.parametrize(
    ("name", "signal", "function"),
    [
        ("segv", "SIGSEGV", "crash_here"),
        ("stack", "SIGSEGV", "recurse"),
        ("fpe", "SIGFPE", "divide"),
        ("ill", "SIGILL", "illegal_instruction"),
        ("bus", "SIGBUS", "read_truncated"),
        ("cxx", "SIGABRT", "parse_config"),
        ("assert", "SIGABRT", "check_config"),
        ("threads", "SIGSEGV", "crash_here"),
        ("library", "SIGSEGV", "crashy_parse"),
        ("foreign-libc", "SIGSEGV", "enqueue"),
    ],
)
def test_signal_crashing_thread_and_top_function(corpus: dict, name: str, signal: str, function: str) -> None:
    r = corpus["crashes"][name].report
    meta = corpus["crashes"][name].meta
    assert r.signal.name == signal
    assert r.crashed_tid == meta["process"]["ns_tid"] or r.crashed_tid == meta["process"]["tid"]
    assert top_app_function(r) == function, r.signature_frames
    assert r.backend == "drgn" and r.exe in ("/app/crasher", "/app/thrower", "/app/libuser")


def test_fault_details(corpus: dict) -> None:
    c = corpus["crashes"]
    assert c["segv"].report.signal.code_name == "SEGV_MAPERR" and c["segv"].report.signal.fault_address == 0
    assert c["fpe"].report.signal.code_name == "FPE_INTDIV"
    assert (
        c["ill"].report.signal.code_name == "ILL_ILLOPN" or c["ill"].report.signal.code_name == "ILL_ILLOPC"
    )
    assert c["bus"].report.signal.code_name == "BUS_ADRERR"
    segv = c["segv"].report.crashed_thread
    assert segv is not None and segv.frames[0].file.endswith("crasher.c") and segv.frames[0].line
    assert "rip" in c["segv"].report.registers


def test_abort_in_a_containers_pid_1_is_called_an_abort(corpus: dict) -> None:
    r = corpus["crashes"]["assert-pid1"].report
    assert r.signal.name == "SIGSEGV" and r.signal.code == 128
    assert r.signal.description is not None and r.signal.description.startswith("abort")
    assert r.signature == corpus["crashes"]["assert"].report.signature
    assert r.title is not None and r.title.startswith("SIGABRT in check_config")


def test_two_crashes_of_one_bug_share_a_signature(corpus: dict) -> None:
    c = corpus["crashes"]
    assert c["segv"].meta["process"]["pid"] != c["segv-again"].meta["process"]["pid"]
    assert c["segv"].report.signature == c["segv-again"].report.signature
    stripped, again = c["stripped"].report, c["stripped-again"].report
    assert stripped.signature == again.signature
    assert stripped.signature_frames[0].startswith("crasher-stripped+0x")


def test_different_bugs_never_share_a_signature(corpus: dict) -> None:
    distinct = [
        "segv",
        "stack",
        "fpe",
        "ill",
        "bus",
        "cxx",
        "assert",
        "threads",
        "stripped",
        "library",
        "foreign-libc",
    ]
    signatures = [corpus["crashes"][n].report.signature for n in distinct]
    assert None not in signatures
    assert len(set(signatures)) == len(distinct), dict(zip(distinct, signatures, strict=True))


def test_200_threads_are_all_unwound(corpus: dict) -> None:
    r = corpus["crashes"]["threads"].report
    assert len(r.threads) == 201
    crashed = r.crashed_thread
    assert crashed is not None and crashed.tid != corpus["crashes"]["threads"].meta["process"]["ns_pid"]
    assert [normalize.function for normalize in crashed.frames[:2]] == ["crash_here", "worker_crash"]
    assert all(t.frames for t in r.threads)


def test_a_stack_overflow_shows_its_top_its_bottom_and_how_often_it_repeats(corpus: dict) -> None:
    # drgn stops at 1,024 frames; the walk goes on to main, as gdb's does (30,000 frames
    # and more), and the report keeps the top and the bottom around the repeated part
    r = corpus["crashes"]["stack"].report
    crashed = r.crashed_thread
    assert crashed is not None and not crashed.incomplete
    [run] = crashed.omitted
    assert run.function == "recurse" and run.count > 10_000 and crashed.depth > run.count
    top, bottom = crashed.frames[: crashed.omitted_at], crashed.frames[crashed.omitted_at :]
    assert [f.function for f in top] == ["recurse"] * 3
    names = [f.function for f in bottom]
    assert names[:4] == ["recurse"] * 3 + ["main"] and "__libc_start_main" in names
    assert [f.index for f in bottom] == list(range(crashed.depth - len(bottom), crashed.depth))
    assert len(crashed.frames) <= 256 and r.signature_frames == ("recurse", "recurse", "recurse")
    assert f"… recurse x {run.count:,}" in render.text(r)
    doc = r.to_dict()
    assert Report.from_dict(doc) == r
    page = ui.templates.env.get_template("crash.html").render(
        crash={"id": "x", "signal_name": "SIGSEGV", "signal": 11, "time": 0, "size": 1, "stored_size": 1},
        report={**doc, "threads": []}, crashed=doc["threads"][0], others=[], commands=[], environ=[],
        meta=corpus["crashes"]["stack"].meta, open_access=True,
    )  # fmt: skip
    assert f"recurse x {run.count:,}" in page and f"#{crashed.depth - 1}<" in page


def test_deleted_executable_is_found_by_build_id(corpus: dict) -> None:
    crash = corpus["crashes"]["deleted-exe"]
    assert crash.meta["process"]["exe"].endswith("(deleted)")
    r = crash.report
    assert r.exe == "/data/dump-a/gone (deleted)"
    assert r.missing_modules == () and r.signature_frames[0] == "crash_here"
    assert r.signature == corpus["crashes"]["segv"].report.signature  # the same bug, the same binary


def test_frames_in_a_shared_library_name_it(corpus: dict) -> None:
    crashed = corpus["crashes"]["library"].report.crashed_thread
    assert crashed is not None
    assert crashed.frames[0].module == "/app/libcrashy.so" and crashed.frames[0].file.endswith("libcrashy.c")
    assert "crashy_entry" in [f.function for f in crashed.frames]


def test_foreign_libc_frames_come_from_the_containers_libc(corpus: dict) -> None:
    crash = corpus["crashes"]["foreign-libc"]
    r = crash.report
    libc = next(m for m in r.modules if m.path.endswith("libc.so.6"))
    expected = subprocess.run(
        ["eu-readelf", "-n", os.path.join(corpus["glibc"], "lib/x86_64-linux-gnu/libc.so.6")],
        capture_output=True, text=True, check=True,
    ).stdout.split("Build ID: ")[1].split()[0]  # fmt: skip
    assert libc.build_id == expected and libc.found
    host = subprocess.run(
        ["eu-readelf", "-n", "/lib/x86_64-linux-gnu/libc.so.6"], capture_output=True, text=True, check=True
    )
    assert expected not in host.stdout
    top = r.crashed_thread.frames[0]  # type: ignore[union-attr]
    assert top.function == "insque" and top.module == "/lib/x86_64-linux-gnu/libc.so.6"
    # The host's libc has other code at that offset: a debugger using it would name another function.
    wrong = subprocess.run(
        ["eu-addr2line", "-f", "-e", "/lib/x86_64-linux-gnu/libc.so.6", hex(top.offset)],
        capture_output=True, text=True, check=False,
    ).stdout.split("\n")[0]  # fmt: skip
    assert wrong != "insque"


def test_plain_and_compressed_cores_give_the_same_report(corpus: dict) -> None:
    crash = corpus["crashes"]["cxx"]
    plain = runner.analyze(crash.volume_core, [corpus["capture"].store])
    assert plain.signature == crash.report.signature
    assert plain.crashed_thread == crash.report.crashed_thread


def test_gdb_backend_agrees_on_frames_and_signature(corpus: dict) -> None:
    for name in ("segv", "cxx", "library"):
        crash = corpus["crashes"][name]
        g = runner.analyze(crash.volume_core, [corpus["capture"].store], backend="gdb")
        assert g.backend == "gdb"
        assert g.signature == crash.report.signature, (g.signature_frames, crash.report.signature_frames)


def without_libc(corpus: dict, tmp_path) -> tuple:  # -> (the segv crash, its store, libc's module)
    """The segv crash, and a copy of the capture's store that lacks the libc it mapped."""
    crash = corpus["crashes"]["segv"]
    store = tmp_path / "store"
    shutil.copytree(corpus["capture"].store, store, symlinks=True)
    libc = next(m for m in crash.report.modules if m.path.endswith("libc.so.6"))
    shutil.rmtree(store / "buildid" / libc.build_id)
    return crash, store, libc


def test_missing_modules_are_named(corpus: dict, tmp_path) -> None:
    crash, store, _ = without_libc(corpus, tmp_path)
    r = runner.analyze(crash.volume_core, [str(store)])
    missing = [m.path for m in r.missing_modules]
    assert missing == ["/lib/x86_64-linux-gnu/libc.so.6"]
    assert any(w.startswith("missing: /lib/x86_64-linux-gnu/libc.so.6") for w in r.warnings)
    assert r.signature == crash.report.signature  # in-app frames still named


def test_a_file_with_the_wrong_build_id_is_never_used(corpus: dict, tmp_path) -> None:
    crash, store, libc = without_libc(corpus, tmp_path)
    (store / "buildid" / libc.build_id).mkdir()
    target = store / "buildid" / libc.build_id / "executable"  # a tree in debuginfod's layout
    shutil.copy(os.path.join(corpus["glibc"], "lib/x86_64-linux-gnu/libc.so.6"), target)  # another libc
    r = runner.analyze(crash.volume_core, [str(store)], backend="gdb")
    assert [m.path for m in r.missing_modules] == ["/lib/x86_64-linux-gnu/libc.so.6"]


def test_truncated_core_is_reported_as_truncated(corpus: dict, tmp_path) -> None:
    crash = corpus["crashes"]["segv"]
    cut = tmp_path / "cut.core"
    with open(crash.volume_core, "rb") as f:
        cut.write_bytes(f.read(os.path.getsize(crash.volume_core) // 2))
    r = runner.analyze(str(cut), [corpus["capture"].store])
    assert r.truncated and any("truncated" in w for w in r.warnings)
    assert r.signal.name == "SIGSEGV"


def test_unreadable_input_is_one_clear_error(tmp_path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + os.urandom(4000))
    with pytest.raises(runner.AnalysisError, match="^unreadable: "):
        runner.analyze(str(junk), [])


def test_timeout_stops_the_worker(corpus: dict) -> None:
    crash = corpus["crashes"]["threads"]
    with pytest.raises(runner.AnalysisError, match="longer than 0.01s"):
        runner.analyze(crash.volume_core, [corpus["capture"].store], timeout=0.01)


def test_cli_analyze_by_crash_id_and_json(corpus: dict) -> None:
    import json
    import sys

    crash = corpus["crashes"]["cxx"]
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")
    out = subprocess.run(
        [cli, "-c", corpus["capture"].config, "analyze", crash.meta["id"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "SIGABRT in parse_config" in out.stdout and "thrower.cc" in out.stdout
    js = subprocess.run(
        [cli, "-c", corpus["capture"].config, "analyze", "--json", crash.volume_core],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(js.stdout)["signature"] == crash.report.signature
    bad = subprocess.run([cli, "analyze", "no-such-crash"], capture_output=True, text=True, check=False)
    assert bad.returncode == 4 and "is not a core file, nor a crash in the spool" in bad.stderr


def test_system_debuginfo_on_request_names_libc_internals(corpus: dict) -> None:
    crash = corpus["crashes"]["cxx"]
    quick = crash.report.crashed_thread
    deep = runner.analyze(crash.volume_core, [corpus["capture"].store], system_debuginfo=True)
    libc = next(m for m in deep.modules if m.path.endswith("libc.so.6"))
    assert libc.debuginfo  # the host's libc6-dbg, matched by build-id
    # named by default from the debug file's symbol table; its file:line only with libc's DWARF
    assert quick is not None and quick.frames[0].function == "__pthread_kill_implementation"
    assert quick.frames[0].file is None
    assert deep.crashed_thread.frames[0].function == "__pthread_kill_implementation"  # type: ignore[union-attr]
    assert deep.crashed_thread.frames[0].file.endswith("pthread_kill.c")  # type: ignore[union-attr]
    assert deep.signature == crash.report.signature
