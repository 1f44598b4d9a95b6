"""The fallback unwinder and deep-dive tool: gdb, driven through its embedded Python.

gdb looks up shared libraries by their path in the core under its sysroot, and gdb 13
will happily use whatever file sits there, a host's libc for a container's. So gdb gets a
private sysroot in which every path holds only the file whose build-id matches the core
(symlinks into the build-id store), a debug-file directory built the same way, and no
way to reach anything else: ``-nx``, ``set auto-load off`` (a container's libthread_db is
untrusted code; gdb would even load the host's for a container's process, so the thread
library search path points nowhere), ``set debuginfod enabled off``.

The core names each file by the path the kernel resolved (``/usr/lib/x86_64-linux-gnu/
libc.so.6`` in a merged-/usr image) while gdb asks for the dynamic linker's name of it
(``/lib/x86_64-linux-gnu/libc.so.6``): finding no library there, it unwound nothing past
libc's first frame (a Rust panic's abort showed ``__pthread_kill_implementation`` and
``??``). So the same files are also offered by base name (``solib-search-path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from corevault.analysis.binaries import Found
from corevault.analysis.elfcore import Core
from corevault.model import Frame, Thread

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gdb_script.py")


def gdb_command(
    core: Core, found: dict[str, Found], root: str, executable: str | None, batch: bool = True
) -> list[str]:
    """The gdb command line for ``core``, after laying out a sysroot and debug dir under ``root``."""
    sysroot = os.path.join(root, "sysroot")
    debugdir = os.path.join(root, "debug")
    byname = os.path.join(root, "byname")
    os.makedirs(byname, exist_ok=True)
    for path, where in found.items():
        bid = core.build_ids.get(path)
        if where.executable and path.startswith("/"):
            link = os.path.join(sysroot, path.removesuffix(" (deleted)").lstrip("/"))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(where.executable, link)
            alias = os.path.join(byname, os.path.basename(link))
            if not os.path.lexists(alias):
                os.symlink(where.executable, alias)
        if bid and where.debuginfo and where.debuginfo != where.executable:
            link = os.path.join(debugdir, ".build-id", bid[:2], bid[2:] + ".debug")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(where.debuginfo, link)
    os.makedirs(sysroot, exist_ok=True)
    return [
        "gdb", *(["-batch"] if batch else ["-q"]), "-nx",
        "-iex", "set auto-load off", "-iex", "set debuginfod enabled off",
        "-iex", f"set libthread-db-search-path {root}/no-thread-db",
        "-iex", f"set sysroot {sysroot}", "-iex", f"set solib-search-path {byname}",
        "-iex", f"set debug-file-directory {debugdir}",
        "-iex", "set print thread-events off", "-iex", "set pagination off",
        *([executable] if executable else []), "-c", core.path,
    ]  # fmt: skip


def unwind(
    core: Core, found: dict[str, Found], executable: str | None, max_frames: int, timeout: float = 600
) -> tuple[list[Thread], list[str]]:
    with tempfile.TemporaryDirectory(prefix="corevault-gdb-") as root:
        out = os.path.join(root, "frames.json")
        cmd = [*gdb_command(core, found, root, executable), "-x", SCRIPT]
        env = {**os.environ, "COREVAULT_GDB_OUT": out, "COREVAULT_MAX_FRAMES": str(max_frames)}
        env.pop("DEBUGINFOD_URLS", None)
        proc = subprocess.run(  # what gdb says holds the binary's names: bytes, not always UTF-8
            cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout, check=False
        )
        if not os.path.exists(out):
            raise RuntimeError(f"gdb produced no frames: {proc.stderr.strip()[-300:]}")
        with open(out) as f:
            result = json.load(f)
    threads = [
        Thread(
            tid=t["tid"],
            crashed=t["tid"] == result["crashed"],
            frames=tuple(_frame(core, i, fr) for i, fr in enumerate(t["frames"])),
            incomplete=t["incomplete"],
        )
        for t in result["threads"]
    ]
    threads.sort(key=lambda t: (not t.crashed, t.tid))
    return threads, []


def _frame(core: Core, index: int, fr: dict) -> Frame:
    module, offset = core.module_at(fr["pc"])
    return Frame(
        index=index, pc=fr["pc"], function=fr["function"], file=fr["file"], line=fr["line"],
        inline=fr["inline"], module=module, offset=offset,
    )  # fmt: skip
