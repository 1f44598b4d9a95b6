"""Inline frames from DWARF for the languages drgn does not read (Rust, for one).

drgn turns the DWARF of C and C++ into inline frames, but for a compile unit of another
language it finds no function at a pc: the frame is named from ELF symbols only, so
``Option::unwrap`` inlined into ``lookup_user`` shows as ``lookup_user`` while gdb shows
both. binutils' ``addr2line -i`` reads the chain of inlined subroutines at an address from
the one compilation unit that holds it, for any language, in milliseconds (pyelftools took
2 s on a Rust panic: without ``DW_AT_sibling``, which LLVM does not emit, it parses every
DIE it passes). One run per module answers every address of that module.

It parses untrusted DWARF like gdb does: inside the sandboxed worker, with a timeout, and
an answer it cannot read means "no chain" (the frame keeps what drgn gave it).
"""

from __future__ import annotations

from dataclasses import dataclass

TIMEOUT = 30.0
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Scope:
    """One function of an inline chain, and where in it the address (or the inner call) is."""

    name: str | None
    file: str | None
    line: int | None
    inline: bool


def chains(path: str, addresses: list[int]) -> dict[int, list[Scope]]:
    """For each file address of ``path``: its functions, innermost first ([] when unknown)."""
    import subprocess  # here: most reports have no frame to ask addr2line about

    cmd = ["addr2line", "--addresses", "--inlines", "--functions", "-e", path, *(hex(a) for a in addresses)]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    result: dict[int, list[tuple[str | None, str | None, int | None]]] = {}
    current: list[tuple[str | None, str | None, int | None]] | None = None
    lines = out.stdout.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("0x"):
            try:
                current = result.setdefault(int(line, 16), [])
            except ValueError:
                current = None
            i += 1
            continue
        if current is not None and i + 1 < len(lines) and len(current) < MAX_DEPTH:
            name = None if line == "??" else line
            where = lines[i + 1].split(" (discriminator", 1)[0]
            file, _, number = where.rpartition(":")
            known = file not in ("", "??")
            current.append((name, file if known else None, int(number) if number.isdigit() else None))
        i += 2
    return {
        address: [Scope(n, f, ln, inline=k < len(found) - 1) for k, (n, f, ln) in enumerate(found)]
        for address, found in result.items()
        if found and all(n is not None for n, _, _ in found)
    }
