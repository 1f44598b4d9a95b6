"""What the first bytes of a core say (:mod:`corevault.capture.corehead`): the signal, the
crashing thread and the size the kernel promised, read from a bounded head of the stream.

The core is the crashed process's: every header and note in it may be crafted.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

import pytest
import zstandard

from corevault import spool
from corevault.capture import corehead
from tests.conftest import FIXTURE_SPOOL

PT_LOAD, PT_NOTE = 1, 4


def _note(name: bytes, ntype: int, desc: bytes, e: str = "<") -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack(e + "III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def prstatus(signal: int, tid: int, e: str = "<") -> bytes:
    # elf_siginfo (12), pr_cursig, pad, pr_sigpend, pr_sighold, pr_pid, then more of elf_prstatus
    return struct.pack(e + "iiihxxQQi", 0, 0, 0, signal, 0, 0, tid) + b"\0" * 300


def siginfo(signal: int, e: str = "<") -> bytes:
    return struct.pack(e + "iii", signal, 1, 0) + b"\0" * 116


def elf_core(notes: bytes, *, e: str = "<", load: int = 8192, ident_class: int = 2, claimed_phoff: int = 64,
             phnum: int | None = None, note_offset: int | None = None, note_size: int | None = None) -> bytes:  # fmt: skip
    """An ELF64 core: the header, a PT_NOTE and a PT_LOAD of ``load`` bytes of memory.

    The program headers follow the ELF header, wherever ``claimed_phoff`` says they are.
    """
    first = 64 + 56 * 2
    n_off = first if note_offset is None else note_offset
    n_size = len(notes) if note_size is None else note_size
    mem_off = first + len(notes)
    ident = b"\x7fELF" + bytes([ident_class, 1 if e == "<" else 2, 1]) + b"\0" * 9
    header = ident + struct.pack(e + "HHIQQQIHHHHHH", 4, 62, 1, 0, claimed_phoff, 0, 0, 64, 56, 2 if phnum is None else phnum, 0, 0, 0)  # fmt: skip
    phdrs = struct.pack(e + "IIQQQQQQ", PT_NOTE, 0, n_off, 0, 0, n_size, 0, 4) + struct.pack(
        e + "IIQQQQQQ", PT_LOAD, 5, mem_off, 0x400000, 0, load, load, 4096
    )
    return header + phdrs + notes + b"\xcc" * load


def head_of(data: bytes, tmp_path, name: str = "core") -> tuple[corehead.Head, bytes]:
    """Read the head from a file holding ``data``; also what the fd gives after it."""
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        head = corehead.read_head(fd)
        rest = b""
        while chunk := os.read(fd, 1 << 20):
            rest += chunk
    finally:
        os.close(fd)
    return head, rest


def fixture_cores() -> Iterator[tuple[dict, bytes]]:
    for entry in sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL))):
        meta = spool.read_meta(FIXTURE_SPOOL, entry)
        with open(os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME), "rb") as f:
            yield meta, zstandard.ZstdDecompressor().stream_reader(f).read()


def test_real_cores_give_their_signal_thread_and_size(tmp_path) -> None:
    seen = set()
    for meta, core in fixture_cores():
        head, rest = head_of(core, tmp_path)
        assert head.signal == meta["signal"]["number"] and head.tid == meta["process"]["ns_tid"]
        assert head.size == len(core) == meta["core"]["size"]
        # the head is a prefix of the stream, bounded by the notes; the stream goes on after it
        assert head.data + rest == core and 64 < len(head.data) < 64 << 10
        seen.add(meta["signal"]["name"])
    assert seen == {"SIGFPE", "SIGSEGV"}


def test_a_core_the_kernel_cut_short_promises_more_than_the_stream_holds() -> None:
    meta, core = next(fixture_cores())
    r, w = os.pipe()
    cut = core[: len(core) // 2]
    writer = threading.Thread(target=lambda: (os.write(w, cut[: 1 << 16]), os.close(w)))
    writer.start()  # the first 64 KiB, then the pipe closes, as when the kernel stops dumping
    try:
        head = corehead.read_head(r)
    finally:
        writer.join()
        os.close(r)
    assert head.signal == meta["signal"]["number"] and head.size == len(core) > len(head.data)


def test_notes_name_the_first_thread_and_siginfo_has_the_last_word(tmp_path) -> None:
    notes = (
        _note(b"LINUX\0", 1, prstatus(9, 99))  # not CORE: ignored
        + _note(b"CORE\0", 1, b"\0" * 20)  # too short to be a prstatus: ignored
        + _note(b"CORE\0", 1, prstatus(11, 42))  # the crashing thread comes first
        + _note(b"CORE\0", 1, prstatus(0, 43))
        + _note(b"CORE\0", corehead.NT_SIGINFO, siginfo(7))
    )
    head, _ = head_of(elf_core(notes), tmp_path)
    assert (head.signal, head.tid) == (7, 42)
    assert head.size == 64 + 112 + len(notes) + 8192


def test_big_endian_cores_are_read_in_their_own_order(tmp_path) -> None:
    head, _ = head_of(elf_core(_note(b"CORE\0", 1, prstatus(6, 1234, ">"), ">"), e=">"), tmp_path)
    assert (head.signal, head.tid) == (6, 1234)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not a core",
        b"\x7fELF" + b"\0" * 10,
        elf_core(b"", ident_class=1),
        b"\x7fELF\x02\x03" + b"\0" * 100,
    ],
)
def test_anything_else_is_streamed_as_it_is(data: bytes, tmp_path) -> None:
    head, rest = head_of(data, tmp_path)
    assert (head.signal, head.tid) == (None, None) and head.data + rest == data and len(head.data) <= 64


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("program headers a terabyte away", elf_core(b"", claimed_phoff=1 << 40)),
        ("no program headers", elf_core(b"", phnum=0)),
        ("PN_XNUM program headers", elf_core(b"", phnum=0xFFFF)),
    ],
)
def test_hostile_headers_are_not_followed(what: str, data: bytes, tmp_path) -> None:
    head, rest = head_of(data, tmp_path)
    assert (head.signal, head.tid, head.size) == (None, None, None), what
    assert len(head.data) == 64 and head.data + rest == data  # nothing read past the ELF header


def test_notes_beyond_the_bound_are_not_read(tmp_path) -> None:
    data = elf_core(_note(b"CORE\0", 1, prstatus(11, 1)), note_offset=1 << 40, note_size=16)
    head, rest = head_of(data, tmp_path)
    assert head.signal is None and head.size == (1 << 40) + 16  # what the headers promise, all the same
    assert len(head.data) == 64 + 112 and head.data + rest == data


def test_broken_or_missing_notes_give_no_values_and_no_error(tmp_path) -> None:
    broken = struct.pack("<III", 0xFFFFFFFF, 8, 1) + b"CORE" * 8
    for data in (elf_core(broken), elf_core(_note(b"CORE\0", 1, prstatus(11, 1)))[:200]):
        head, rest = head_of(data, tmp_path)
        assert head.signal is None and head.tid is None and head.data + rest == data
