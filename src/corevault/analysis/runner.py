"""Running an analysis safely: a worker process with a timeout and a memory cap.

A core and the binaries it names are untrusted input, and unwinders are large C
programs. So the analysis never runs inside a long-lived process: each core gets a fresh
worker (:mod:`corevault.analysis.worker`) in its own session, with ``RLIMIT_DATA`` capping
its heap, killed with its whole process group (gdb included) when the timeout passes.
A zstd-compressed spool core is first expanded into a sparse temporary file.

The worker never goes to the network. With upstream debuginfod servers configured, the
driver here reads the first report's modules that appear in a stack without a debug
file, fetches what the servers have (:mod:`corevault.analysis.upstream`) and runs the
worker once more: only the first crash that needs a build-id pays for that.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

from corevault.analysis import binaries, upstream
from corevault.capture.stream import CHUNK, SparseSink
from corevault.errors import UserError
from corevault.model import Report

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MEMORY = 4 << 30


class AnalysisError(UserError):
    """The core could not be analysed; the message says why."""


def decompress(src: str, dest: str) -> int:
    """Expand a zstd core into ``dest``, with holes for zero blocks; returns its size."""
    import zstandard

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        sink = SparseSink(fd)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(src, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            while n := reader.readinto(buf):
                sink.write(buf, view, n)
        sink.finish()
        return sink.size
    except zstandard.ZstdError as e:
        raise AnalysisError(f"{src} is not a readable zstd stream: {e}") from None
    finally:
        os.close(fd)


def analyze(
    core: str,
    stores: list[str],
    backend: str = "drgn",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory: int = DEFAULT_MEMORY,
    max_frames: int = 256,
    system_debuginfo: bool = False,
    debug_dirs: tuple[str, ...] = binaries.DEBUG_DIRS,
    fetch: upstream.Upstream | None = None,
) -> Report:
    """Analyse ``core`` (plain or zstd) in a worker; raises :class:`AnalysisError`.

    ``debug_dirs`` are trees of separate debug files by build-id (the host's
    ``/usr/lib/debug``); ``fetch`` names upstream debuginfod servers to ask for the rest.
    """
    if fetch is not None:
        stores = [*stores, fetch.cache]
    with tempfile.TemporaryDirectory(prefix="corevault-analysis-") as tmp:
        try:
            with open(core, "rb") as f:
                compressed = f.read(4) == ZSTD_MAGIC
        except OSError as e:
            raise AnalysisError(f"cannot read {core}: {e.strerror}") from None
        if compressed:
            plain = os.path.join(tmp, "core")
            decompress(core, plain)
            core = plain
        cmd = [sys.executable, "-m", "corevault.analysis.worker", core, "--backend", backend]
        cmd += ["--max-frames", str(max_frames)] + (["--system-debuginfo"] if system_debuginfo else [])
        cmd += ["--debug-dirs", os.pathsep.join(debug_dirs)]
        for store in stores:
            cmd += ["--store", store]
        report = _run(cmd, timeout, memory)
        if fetch is not None and upstream.fetch_missing(fetch, _wanting_debuginfo(report)):
            report = _run(cmd, timeout, memory)
    return report


def _wanting_debuginfo(report: Report) -> list[str]:
    """Build-ids of the modules that appear in a stack and had no debug file, crashing thread first."""
    modules = {m.path: m for m in report.modules}
    wanted: dict[str, None] = {}
    for thread in report.threads:
        for frame in thread.frames:
            m = modules.get(frame.module or "")
            if m is not None and m.build_id and not m.debuginfo and not m.path.startswith("["):
                wanted[m.build_id] = None
    return list(wanted)


def _run(cmd: list[str], timeout: float, memory: int) -> Report:
    """One worker run of ``cmd``; its report."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,  # noqa: PLW1509 - only setrlimit, async-signal-safe enough
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AnalysisError(f"analysis took longer than {timeout:g}s and was stopped") from None
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        if "MemoryError" in last[0] or proc.returncode == -signal.SIGKILL:
            raise AnalysisError(f"analysis ran out of its {memory >> 20} MiB memory cap")
        raise AnalysisError(f"analysis failed: {last[0]}")
    doc = json.loads(out)
    if "error" in doc:
        raise AnalysisError(doc["error"])
    return Report.from_dict(doc)
