"""Running an analysis safely: a sandboxed worker process with a timeout and a memory cap.

A core and the binaries it names are untrusted input, and unwinders are large C
programs. So the analysis never runs inside a long-lived process: each core gets a process
of its own in a sandbox of its own (:mod:`corevault.analysis.sandbox`: its own uid, no
capabilities, no network, nothing of the host but its inputs), with ``RLIMIT_DATA``
capping its heap, killed with everything it started (gdb included) when the timeout
passes. That process is a child of the pre-imported template
(:mod:`corevault.analysis.template`), which spares each analysis the interpreter's start
and the worker's imports, or, where the template cannot run, a fresh worker
(:mod:`corevault.analysis.worker`) under bubblewrap. A zstd-compressed spool core is
first expanded into a sparse temporary file the worker's uid may read.

The worker never goes to the network. With upstream debuginfod servers configured, the
driver here reads the first report's modules that appear in a stack without a debug
file, fetches what the servers have for each one's build-id, kept for its content
(:mod:`corevault.analysis.upstream`), and runs the worker once more: only the first crash
that maps a content pays for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import resource
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator
from typing import BinaryIO

from corevault import bounded, nodestore, objectid, printable
from corevault.analysis import binaries, sandbox, seccomp, signature, slots, template, upstream
from corevault.capture.stream import sparse_copy
from corevault.errors import UserError
from corevault.model import MAX_REPORT_BYTES, Report

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MEMORY = 4 << 30
#: how a stopped analysis's error begins (the catalog's record of it says so)
STOPPED = "analysis took longer than"
CORE_IN_SANDBOX = sandbox.INPUTS + "/core"
RECORD_IN_SANDBOX = sandbox.INPUTS + "/record.json"


class AnalysisError(UserError):
    """The core could not be analysed; the message says why."""


def decompress(src: str, dest: str) -> int:
    """Expand a zstd core into ``dest``, with holes for zero blocks; returns its size."""
    import zstandard

    try:
        with open(src, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            with reader:
                return _sparse_copy(reader, dest)
    except zstandard.ZstdError as e:
        raise AnalysisError(f"{src} is not a readable zstd stream: {e}") from None


def _sparse_copy(reader: BinaryIO, dest: str) -> int:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return sparse_copy(reader, fd)
    finally:
        os.close(fd)


def _worker_copy(path: str, dest: str, uid: int) -> str:
    """A path of ``path``, in plain form, that the sandboxed worker (``uid``) can read.

    A zstd core is expanded into ``dest``; a plain file that others may not read is copied
    there (sparse); a world-readable plain file is used as it is. The worker reads a copy
    by its group and does not own it: an owner could make it writable again and reopen it
    through ``/proc/1/fd`` (a template's child holds the host's file, not a read-only bind)
    and write the host's disk past its capped ``/tmp``.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) == ZSTD_MAGIC:
                decompress(path, dest)
            elif os.fstat(f.fileno()).st_mode & stat.S_IROTH:
                return path
            else:
                f.seek(0)
                _sparse_copy(f, dest)
    except OSError as e:
        raise AnalysisError(f"cannot read {path}: {e.strerror}") from None
    if os.geteuid() == 0:
        os.chown(dest, 0, uid)
        os.chmod(dest, 0o440)
    else:  # the worker is this user (a user namespace of its own): owner it stays
        os.chmod(dest, 0o400)
    return dest


def _store_binds(
    stores: list[str],
    wanted: Collection[tuple[str, str | None]],
    tmp: str,
    uid: int,
    fetched: str | None = None,
) -> tuple[list[str], list[sandbox.Bind]]:
    """Where the worker sees each store, holding only the files ``wanted`` names.

    ``wanted`` holds ``(key, sha256)`` of a crash's recorded objects, or ``(key, None)``
    for every content held under a key; the debug files fetched for those contents
    (``<sha256>.debuginfo``) come along, and a key's ``debuginfo`` of a user's tree, though
    not of ``fetched``, the upstream cache, where that name is a file kept by build-id alone
    (before content hashes), whose content nobody knows. Files are bound one by one: the
    store's directories are the agent's own (0700).
    """
    names: list[str] = []
    binds: list[sandbox.Bind] = []
    keys = sorted(
        w for w in wanted if objectid.KEY.match(w[0]) and (w[1] is None or objectid.SHA256.match(w[1]))
    )
    # of a bare core: every content held under the key in any store, whose debug file may be in another
    contents = {
        key: list(dict.fromkeys(os.path.basename(p) for s in stores for p in nodestore.candidates(s, key)))
        for key, sha in keys
        if sha is None
    }
    for i, store in enumerate(stores):
        name = f"{sandbox.INPUTS}/store-{i}"
        names.append(name)
        for key, sha in keys:
            held = [sha] if sha else contents[key]
            debug = [h + upstream.SUFFIX for h in held if objectid.SHA256.match(h)]
            if store != fetched:
                debug.append(upstream.LEGACY_NAME)
            for kind in dict.fromkeys([*held, *debug]):
                path = os.path.join(store, "buildid", key, kind)
                if os.path.isfile(path):
                    readable = _worker_copy(path, os.path.join(tmp, f"{i}-{key}-{kind}"), uid)
                    binds.append(sandbox.Bind(readable, f"{name}/buildid/{key}/{kind}"))
    return names, binds


def _run_alone(
    code: str,
    args: list[str],
    binds: list[sandbox.Bind],
    uid: int,
    deadline: float,
    *,
    limit: float,
    memory: int,
    processes: int,
    beside_template: bool = False,
) -> tuple[bytes, bytes, int]:
    """``code`` in a bubblewrap worker of its own: its output, errors and exit status.

    ``beside_template``: a template runs for ``uid``, so user namespaces and libseccomp work
    here; the worker then drops as the template does (:func:`template.drop_to`), its
    processes counted in a user namespace of its own rather than with the host's of ``uid``.
    Where none runs, ``setpriv`` drops it to ``uid`` on the host."""
    drops_itself = beside_template and os.geteuid() == 0
    filter_fd = None if drops_itself else seccomp.filter_fd()
    if drops_itself:
        code = f"from corevault.analysis.template import drop_to; drop_to({uid}); {code}"
    limits = {resource.RLIMIT_DATA: memory}
    if os.geteuid() == 0:  # set before it drops to the slot's uid (root is held to none)
        limits[resource.RLIMIT_NPROC] = processes
    try:
        cmd = sandbox.command(sandbox.python(code, args), binds, uid, filter_fd, drops_itself=drops_itself)
        fds = () if filter_fd is None else (filter_fd,)
        timeout = max(deadline - time.monotonic(), 0.001)
        # bwrap's --die-with-parent and the worker's own PID namespace take gdb with it on a
        # kill; bwrap ended by it, not with it: the slot's processes are checked before reuse
        return bounded.run(cmd, timeout=timeout, limits=limits, pass_fds=fds, max_output=MAX_REPORT_BYTES)
    except subprocess.TimeoutExpired:
        slots.suspect(uid, template.pid_namespace(uid))
        raise AnalysisError(f"{STOPPED} {limit:g}s and was stopped") from None
    except bounded.TooMuchOutput as e:
        slots.suspect(uid, template.pid_namespace(uid))
        raise AnalysisError(f"analysis {e} and was stopped") from None
    except sandbox.SandboxError as e:
        raise AnalysisError(str(e)) from None
    finally:
        if filter_fd is not None:
            os.close(filter_fd)


def _worker(argv: list[str]) -> tuple[str, list[str]]:
    """What the sandboxed process runs: the worker's ``main()`` with ``argv``, as code and arguments."""
    return sandbox.main_code("corevault.analysis.worker"), argv


def _run(
    argv: list[str],
    binds: list[sandbox.Bind],
    uid: int,
    deadline: float,
    *,
    limit: float,
    memory: int,
    processes: int,
) -> dict:
    """Run the worker with ``argv`` in its sandbox until ``deadline`` (monotonic); its JSON
    output, or :class:`AnalysisError` (which names ``limit``, the whole analysis's).

    A child of the pre-imported template (:mod:`corevault.analysis.template`) where it runs,
    a bubblewrap worker of its own otherwise."""
    code, args = _worker(argv)
    timeout = max(deadline - time.monotonic(), 0.001)
    forked = template.shared(uid, processes)
    result = None
    if forked is not None:
        try:
            result = forked.run(
                code, args, binds, memory=memory, timeout=timeout, max_output=MAX_REPORT_BYTES
            )
        except template.NotForTemplate:
            result = None  # not this one: a worker of its own runs it
        except template.TemplateError as e:
            # a template that ended or was retired is started again for the next analysis;
            # one that fails while it runs is not tried again
            if forked.alive() and not forked.retired:
                template.refuse(uid, str(e))
        except subprocess.TimeoutExpired:
            raise AnalysisError(f"{STOPPED} {limit:g}s and was stopped") from None
        except bounded.TooMuchOutput as e:
            raise AnalysisError(f"analysis {e} and was stopped") from None
    if result is None:
        beside = forked is not None and forked.alive()
        result = _run_alone(
            code,
            args,
            binds,
            uid,
            deadline,
            limit=limit,
            memory=memory,
            processes=processes,
            beside_template=beside,
        )
    out, err, returncode = result
    if returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        if "MemoryError" in last[0]:
            raise AnalysisError(f"analysis ran out of its {memory >> 20} MiB memory cap")
        if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
            # RLIMIT_DATA makes an allocation fail (MemoryError), it kills nothing: a SIGKILL came
            # from the kernel's out-of-memory killer or from another process
            raise AnalysisError(
                "analysis was killed (SIGKILL) before it ended: the node's out-of-memory killer "
                "or another process; look for it in the kernel's log (dmesg)"
            )
        raise AnalysisError(f"analysis failed: {last[0]}")
    try:
        doc = json.loads(out)
    except ValueError:  # nothing, or not a report: what a worker taken over by its core may say
        raise AnalysisError(f"analysis gave no report ({len(out)} bytes on its output, status 0)") from None
    if not isinstance(doc, dict):
        raise AnalysisError("analysis gave no report (its output is not a JSON object)")
    if "error" in doc:
        raise AnalysisError(doc["error"])
    return doc


def taken(doc: dict) -> Report:
    """The worker's report as the agent takes it: of the report's types throughout, and grouped
    by the signature the agent computes from its frames, not by the one it states.

    A worker taken over by its core writes what it likes: a report of another shape (which
    failed on some later read, and the crash was analysed again at each retry), or the
    signature of another tenant's group under frames of its own, or a name with a lone surrogate
    (a JSON ``\\udcff``), which no encoder, database or page takes: it becomes U+FFFD."""
    from pydantic import ValidationError

    try:
        report = _report_adapter().validate_python(printable.valid_text(doc))
    except ValidationError as e:
        where = ".".join(map(str, e.errors()[0]["loc"]))
        raise AnalysisError(f"analysis gave no report (its output is not a report: {where})") from None
    sig, frames, title = signature.compute(report)
    return dataclasses.replace(report, signature=sig, signature_frames=frames, title=title)


@functools.cache
def _report_adapter():  # -> pydantic.TypeAdapter[Report]
    """The validator of reports, made once (on the first report: the command line's other uses
    of this module never need it)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Report)


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
    record: list[dict] | None = None,
    uid: int = sandbox.DEFAULT_UID,
    uids: int = slots.DEFAULT_COUNT,
    processes: int = slots.DEFAULT_PROCESSES,
) -> Report:
    """Analyse ``core`` (plain or zstd) in a sandboxed worker; raises :class:`AnalysisError`.

    ``debug_dirs`` are trees of separate debug files by build-id (the host's
    ``/usr/lib/debug``); ``fetch`` names upstream debuginfod servers to ask for the rest.
    ``record`` is the crash's list of mapped objects (``meta.json``'s ``modules``): with
    it, each object is the very file the process mapped, found by its content hash, and the
    worker sees only those files of the stores; without it (a bare core), the files held
    under the keys the core claims. Never every binary the stores hold. ``timeout`` bounds
    the whole.

    The analysis runs as one of ``uids`` uids from ``uid`` on, its own while it runs, with
    at most ``processes`` processes (:mod:`corevault.analysis.slots`).
    """
    if fetch is not None:
        stores = [*stores, fetch.cache]
    deadline = time.monotonic() + timeout
    with (
        _slot(uid, uids, deadline, timeout) as slot,
        tempfile.TemporaryDirectory(prefix="corevault-analysis-") as tmp,
    ):
        plain = _worker_copy(core, os.path.join(tmp, "core"), slot)
        inputs = [sandbox.Bind(plain, CORE_IN_SANDBOX)]
        # trees of system debug files (world-readable, keyed by build-id), where /usr is not
        inputs += [sandbox.Bind(d, d) for d in debug_dirs if os.path.isdir(d) and not d.startswith("/usr/")]
        wanted: set[tuple[str, str | None]]
        if record is None:
            # which binaries the core names is itself read from the core: in the sandbox too
            listed = _run(
                [CORE_IN_SANDBOX, "--list-keys"],
                inputs,
                slot,
                deadline,
                limit=timeout,
                memory=memory,
                processes=processes,
            )
            wanted = {(k, None) for k in listed["keys"] if isinstance(k, str)}
        else:
            wanted = {
                (m["key"], m["sha256"]) for m in record if objectid.is_object(m.get("key"), m.get("sha256"))
            }
            record_path = os.path.join(tmp, "record.json")
            with open(record_path, "w") as f:
                json.dump(record, f)
            inputs.append(
                sandbox.Bind(_worker_copy(record_path, record_path + ".w", slot), RECORD_IN_SANDBOX)
            )
        argv = [CORE_IN_SANDBOX, "--backend", backend, "--max-frames", str(max_frames)]
        argv += ["--debug-dirs", os.pathsep.join(debug_dirs)]
        argv += ["--system-debuginfo"] if system_debuginfo else []
        argv += ["--record", RECORD_IN_SANDBOX] if record is not None else []

        def run(attempt: int) -> Report:
            copies = os.path.join(tmp, str(attempt))
            os.mkdir(copies)
            store_names, binds = _store_binds(stores, wanted, copies, slot, fetch.cache if fetch else None)
            args = [*argv, *(arg for name in store_names for arg in ("--store", name))]
            doc = _run(
                args, inputs + binds, slot, deadline, limit=timeout, memory=memory, processes=processes
            )
            return taken(doc)

        report = run(0)
        if fetch is not None:
            # (not ``wanted``: the second run binds the same objects as the first, plus debug files)
            lacking = _wanting_debuginfo(report)[: upstream.MAX_PER_ANALYSIS]
            upstream.fetch_missing(fetch, lacking, deadline)
            # kept now, by this analysis or by another one running beside it since this one began
            if time.monotonic() < deadline and any(
                os.path.exists(upstream.debuginfo_path(fetch.cache, b, sha)) for b, sha in lacking
            ):
                try:
                    report = run(1)
                except AnalysisError as e:  # the first report stands: the second only names more frames
                    more = f"not analysed again with the debug files fetched: {e}"
                    report = dataclasses.replace(report, warnings=(*report.warnings, more))
            upstream.make_room(fetch)
    return report


@contextlib.contextmanager
def _slot(base: int, count: int, deadline: float, limit: float) -> Iterator[int]:
    """The uid of :mod:`corevault.analysis.slots` that the analysis holds until its end."""
    try:
        with slots.held(base, count, deadline) as uid:
            yield uid
    except slots.NoSlot as e:
        raise AnalysisError(
            f"{STOPPED} {limit:g}s waiting for an analysis uid ({e}): raise [agent] analysis_uids"
        ) from None


def _wanting_debuginfo(report: Report) -> list[tuple[str, str]]:
    """``(build-id, sha256)`` of the modules that appear in a stack and had no debug file,
    crashing thread first: a debug file is fetched for a content, and one whose file was not
    found (so whose content is not known) gets none."""
    modules = {m.path: m for m in report.modules}
    wanted: dict[tuple[str, str], None] = {}
    for thread in report.threads:
        for frame in thread.frames:
            m = modules.get(frame.module or "")
            if m is None or m.debuginfo or m.path.startswith("["):
                continue
            if m.build_id and m.sha256 and objectid.is_object(m.build_id, m.sha256):
                wanted[m.build_id, m.sha256] = None
    return list(wanted)
