"""The programs people actually run, built from Debian's toolchains and cached under build/corpus.

``build.py`` compiles the C corpus (a static and a non-PIE crasher among it); this module
adds the other runtimes a node sees:

- ``goservice``: Go (Debian's golang-go), a static non-PIE binary without a GNU build-id,
  forty idle goroutines and two bugs (``nilmap``, ``nilptr``); run it with ``GOTRACEBACK=crash``.
- ``rustcrash`` and ``rustcrash-v0``: Rust (Debian's rustc) with ``-C panic=abort``, legacy and
  v0 symbol mangling, two bugs (``index``, ``unwrap``).
- ``workerthrow``: C++, an uncaught exception thrown in a worker thread among idle ones.
- ``lastwords``: C, fails an assert whose message is 64 KiB of markup and terminal escapes.
- ``deepstacks``: C, threads waiting 5,000 calls deep and a stack overflow through two
  functions that call each other: a stack made to cost its reader.
- ``forgedgo``: C that passes for Go (``runtime.goexit``, ``runtime.sigreturn``) and forges a
  signal frame pointing back at itself.
- ``/usr/bin/python3.11``: Debian's own non-PIE interpreter binary (not built here), running
  ``pyctypes.py`` which reads address 0 through ctypes or calls ``os.abort()``.
- ``/usr/bin/node``: the host's Node.js (a 100 MB non-PIE C++ binary, not built here), running
  ``nodecrash.js``: ``process.abort()``, an uncaught exception under
  ``--abort-on-uncaught-exception``, a SIGSEGV.

Outputs are keyed by the source, the flags and the toolchain's version, so a toolchain
upgrade rebuilds them. :func:`build_rootfs` lays all of them into one container root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from testbed import build, runc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "corpus")
HERE = build.HERE
PYTHON = "/usr/bin/python3.11"
NODE = "/usr/bin/node"
GO = "/usr/bin/go"
RUSTC = "/usr/bin/rustc"  # Debian's, not a rustup toolchain that may come first on PATH
RUST_FLAGS = ["-C", "panic=abort", "-g", "-C", "opt-level=1"]
# name: (source, toolchain, how)
PROGRAMS = {
    "goservice": ("goservice.go", GO, []),
    "rustcrash": ("rustcrash.rs", RUSTC, RUST_FLAGS),
    "rustcrash-v0": ("rustcrash.rs", RUSTC, [*RUST_FLAGS, "-C", "symbol-mangling-version=v0"]),
    "workerthrow": ("workerthrow.cc", "g++", ["-g", "-O1", "-pthread"]),
    "lastwords": ("lastwords.c", "gcc", ["-g", "-O1"]),
    "deepstacks": ("deepstacks.c", "gcc", ["-g", "-O0", "-pthread"]),
    "forgedgo": ("forgedgo.c", "gcc", ["-g", "-O1"]),
}


def _version(tool: str) -> bytes:
    arg = "version" if tool == GO else "--version"
    return subprocess.run([tool, arg], capture_output=True, check=True).stdout


def build_program(name: str) -> str:
    """Path of the built program ``name`` (rebuilt when its source, flags or toolchain change)."""
    source, tool, flags = PROGRAMS[name]
    src = os.path.join(HERE, source)
    with open(src, "rb") as f:
        key = hashlib.sha256(f.read() + repr(flags).encode() + _version(tool)).hexdigest()[:12]
    out = os.path.join(CACHE, f"{key}-{name}")
    if os.path.exists(out):
        return out
    os.makedirs(CACHE, exist_ok=True)
    tmp = out + ".tmp"
    if tool == GO:
        env = {
            **os.environ, "GOCACHE": os.path.join(CACHE, "gocache"), "GOPATH": os.path.join(CACHE, "gopath"),
            "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0",
        }  # fmt: skip
        subprocess.run([GO, "build", "-o", tmp, src], check=True, env=env, cwd=CACHE)
    else:
        subprocess.run([tool, *flags, "-o", tmp, src], check=True, cwd=CACHE)
    os.replace(tmp, out)
    return out


def build_all() -> dict[str, str]:
    return {name: build_program(name) for name in PROGRAMS}


def _copy(src: str, root: str, dest: str | None = None) -> None:
    target = os.path.join(root, (dest or src).lstrip("/"))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.realpath(src), target)


def _python_stdlib(root: str) -> None:
    """Debian's python3.11 at its own path with the standard library it needs (no tests, no site)."""
    _copy(PYTHON, root)
    for lib in runc.libraries(PYTHON):
        _copy(lib, root)
    stdlib = os.path.join(os.path.dirname(os.path.dirname(PYTHON)), "lib", "python3.11")
    ignore = shutil.ignore_patterns("test", "tests", "idlelib", "tkinter", "site-packages", "dist-packages",
                                    "__pycache__", "ensurepip", "lib2to3", "config-*")  # fmt: skip
    shutil.copytree(stdlib, os.path.join(root, stdlib.lstrip("/")), ignore=ignore, symlinks=False,
                    ignore_dangling_symlinks=True, dirs_exist_ok=True)  # fmt: skip
    dynload = os.path.join(stdlib, "lib-dynload")
    for ext in os.listdir(dynload):
        for lib in runc.libraries(os.path.join(dynload, ext)):
            _copy(lib, root)
    _copy(os.path.join(HERE, "pyctypes.py"), root, "/app/pyctypes.py")


def _node(root: str) -> None:
    """The host's node at its own path, its libraries and the script that crashes it."""
    _copy(NODE, root)
    for lib in runc.libraries(NODE):
        _copy(lib, root)
    _copy(os.path.join(HERE, "nodecrash.js"), root, "/app/nodecrash.js")


def build_rootfs(path: str) -> str:
    """A container root with the whole corpus: the C programs and every runtime above."""
    programs = {**build.build_all(), **build_all()}
    runc.build_rootfs(path, programs)
    _python_stdlib(path)
    _node(path)
    return path
