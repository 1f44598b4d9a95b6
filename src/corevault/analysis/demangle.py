"""Symbol names as people write them: C++ fully demangled, Rust without its build hashes.

Frames named from ELF symbols rather than DWARF carry linker names: ``_ZN…`` (C++ and
Rust's legacy mangling) and ``_R…`` (Rust's v0 mangling). binutils' ``c++filt`` demangles
all three (one process per report, every name at once); then the parts that change with
every build are removed, so a rebuild of the same source keeps its signature:

- Rust legacy names end in ``::h`` and 16 hex digits, a hash of the crate's build;
- Rust v0 names carry crate disambiguators in brackets (``rustcrash[3c1c0]::main``);
- LLVM's ThinLTO appends ``.llvm.<digits>`` to the linker name of a promoted local.

Names are untrusted (a crashed program chose them): they are passed to ``c++filt`` on its
standard input, one per line, never as arguments, and a name with a newline or one longer
than :data:`MAX_NAME` is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_NAME = 4096
_LLVM_SUFFIX = re.compile(r"\.llvm\.\d+$")
_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")
_RUST_DISAMBIGUATOR = re.compile(r"\[[0-9a-f]+\]")
_RUST_V0 = re.compile(r"^_R[A-Za-z0-9_]")
_MANGLED = re.compile(r"^(_Z|_R)")
_TYPE_NAME = re.compile(r"^[A-Za-z0-9_$.]{1,1024}\Z")  # \Z: "$" lets a trailing newline through


def is_mangled(name: str) -> bool:
    return bool(_MANGLED.match(name)) and len(name) <= MAX_NAME and "\n" not in name


def _clean(mangled: str, demangled: str) -> str:
    if demangled == mangled:  # c++filt did not know it: keep the linker's name
        return mangled
    if _RUST_V0.match(mangled):
        return _RUST_DISAMBIGUATOR.sub("", demangled)
    return _RUST_HASH.sub("", demangled)


def readable(name: str | None, table: dict[str, str]) -> str | None:
    """``name`` as people write it: demangled through ``table``, without a Rust build hash."""
    if name is None:
        return None
    return _RUST_HASH.sub("", table.get(name, name))


def demangle_all(names: Iterable[str]) -> dict[str, str]:
    """``{linker name: readable name}`` for every mangled name in ``names``.

    Names that are not mangled, or that ``c++filt`` cannot read, are not in the result;
    if ``c++filt`` is missing or fails, the result is empty and frames keep linker names.
    """
    mangled = sorted({n for n in names if is_mangled(n)})
    if not mangled:
        return {}
    bare = [_LLVM_SUFFIX.sub("", n) for n in mangled]
    import subprocess  # here: a report without linker names never starts a process

    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(bare) + "\n", capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(bare):
        return {}
    return {m: _clean(b, d) for m, b, d in zip(mangled, bare, lines, strict=True)}


def demangle_type(name: str) -> str | None:
    """A mangled C++ type name (``St16invalid_argument``, a ``std::type_info``'s) demangled."""
    if not _TYPE_NAME.match(name):
        return None
    import subprocess

    try:
        out = subprocess.run(
            ["c++filt", "-t"], input=name + "\n", capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text and "\n" not in text else None
