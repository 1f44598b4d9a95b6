"""The core reader on hostile input: truncated, bit-flipped and hand-made cores.

Whatever the bytes, reading gives a Core or a CoreError with a reason: no other
exception, no unbounded allocation.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corevault.analysis import elfcore

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Blob(bytes):
    """Bytes that print short: hypothesis shows fixtures of failing examples."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def small_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A real core of a live process, written by gdb's gcore (no core_pattern involved)."""
    path = tmp_path_factory.mktemp("gcore") / "core"
    proc = subprocess.Popen(["sleep", "60"])
    try:
        subprocess.run(
            ["gdb", "-batch", "-nx", "-iex", "set auto-load off", "-p", str(proc.pid), "-ex", f"gcore {path}"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    yield Blob(path.read_bytes())


def read_bytes(data: bytes, tmp_path) -> elfcore.Core | None:
    path = tmp_path / "fuzzed.core"
    path.write_bytes(data)
    try:
        return elfcore.read(str(path))
    except elfcore.CoreError as e:
        assert str(e)
        return None


def test_real_core_reads(small_core: bytes, tmp_path) -> None:
    core = read_bytes(small_core, tmp_path)
    assert core is not None and core.machine == "x86_64" and not core.truncated
    assert core.threads and core.command == "sleep"
    assert any(p.endswith("/sleep") for p in core.build_ids)


@FUZZ
@given(fraction=st.floats(min_value=0, max_value=1))
def test_truncated_anywhere(small_core: bytes, tmp_path, fraction: float) -> None:
    cut = small_core[: int(len(small_core) * fraction)]
    core = read_bytes(cut, tmp_path)
    if core is not None:
        assert core.truncated or len(cut) == len(small_core)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 16383), st.integers(0, 7)), min_size=1, max_size=16))
def test_bit_flips_in_headers_and_notes(small_core: bytes, tmp_path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(small_core)
    for offset, bit in flips:
        data[offset % len(data)] ^= 1 << bit
    read_bytes(bytes(data), tmp_path)


def elf_core(notes: bytes, phnum: int = 1, note_size: int | None = None, sh_info: int | None = None) -> bytes:
    """A minimal x86_64 ET_CORE: an ELF header, one PT_NOTE program header, the notes, and
    with ``sh_info`` one section header (where a core of over 65,534 segments counts them)."""
    shdr = b"" if sh_info is None else struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, sh_info, 0, 0)
    notes_at = 64 + 56 + len(shdr)
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 4, 62, 1, 0, 64, 64 + 56 if shdr else 0,
        0, 64, 56, phnum, 64, 1 if shdr else 0, 0,
    )  # fmt: skip
    size = len(notes) if note_size is None else note_size
    phdr = struct.pack("<IIQQQQQQ", 4, 0, notes_at, 0, 0, size, 0, 4)
    return ehdr + phdr + shdr + notes


def note(name: bytes, ntype: int, desc: bytes, namesz: int | None = None, descsz: int | None = None) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    header = struct.pack(
        "<III", len(name) if namesz is None else namesz, len(desc) if descsz is None else descsz, ntype
    )
    return header + pad(name) + pad(desc)


PRSTATUS = bytes(112) + struct.pack("<27Q", *range(27))


def test_hand_made_core_with_one_thread(tmp_path) -> None:
    core = read_bytes(elf_core(note(b"CORE\0", 1, PRSTATUS)), tmp_path)
    assert core is not None and len(core.threads) == 1 and core.threads[0].registers["rip"] == 16


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not an ELF file"),
        (b"MZ\x90\x00", "not an ELF file"),
        (elf_core(b""), "no thread status"),
        (elf_core(note(b"CORE\0", 1, PRSTATUS), note_size=1 << 40), "more than a core has"),
        (elf_core(note(b"CORE\0", 1, PRSTATUS), phnum=60000), "program header table is cut short"),
        (elf_core(note(b"CORE\0", 1, PRSTATUS, descsz=1 << 31)), "no thread status"),
    ],
)
def test_broken_cores_have_a_reason(tmp_path, data: bytes, reason: str) -> None:
    path = tmp_path / "broken"
    path.write_bytes(data)
    with pytest.raises(elfcore.CoreError, match=reason):
        elfcore.read(str(path))


def test_more_segments_than_e_phnum_holds_are_counted_in_section_zero(tmp_path) -> None:
    core = read_bytes(elf_core(note(b"CORE\0", 1, PRSTATUS), phnum=0xFFFF, sh_info=1), tmp_path)
    assert core is not None and len(core.threads) == 1
    with pytest.raises(elfcore.CoreError, match="no section header to count them"):
        elfcore.read(str(write(tmp_path, elf_core(note(b"CORE\0", 1, PRSTATUS), phnum=0xFFFF))))


def test_headers_read_as_pyelftools_reads_them(small_core: bytes, tmp_path) -> None:
    """The reader's own ELF header parsing agrees with pyelftools on a real core."""
    from elftools.elf.elffile import ELFFile

    core = read_bytes(small_core, tmp_path)
    with open(tmp_path / "fuzzed.core", "rb") as f:
        ef = ELFFile(f)
        loads = [(s["p_vaddr"], s["p_memsz"], s["p_offset"], s["p_filesz"]) for s in ef.iter_segments()]
        loads = [seg for seg, s in zip(loads, ef.iter_segments(), strict=True) if s["p_type"] == "PT_LOAD"]
        assert core is not None and ef.header.e_machine == "EM_X86_64" and core.machine == "x86_64"
        assert core._segments == loads and len(loads) > 5


def write(tmp_path, data: bytes):
    path = tmp_path / "core"
    path.write_bytes(data)
    return path


def test_nt_file_with_a_lying_count_is_ignored_with_a_warning(tmp_path) -> None:
    lying = struct.pack("<QQ", 1 << 60, 4096) + struct.pack("<QQQ", 0x1000, 0x2000, 0) + b"/x\0"
    core = read_bytes(elf_core(note(b"CORE\0", 1, PRSTATUS) + note(b"CORE\0", 0x46494C45, lying)), tmp_path)
    assert core is not None and core.mappings == [] and "NT_FILE" in core.warnings[0]


@FUZZ
@given(
    notes=st.lists(
        st.tuples(
            st.sampled_from([b"CORE\0", b"LINUX\0", b"GNU\0", b""]),
            st.sampled_from([1, 3, 6, 0x53494749, 0x46494C45, 7, 0]),
            st.binary(max_size=400),
            st.one_of(st.none(), st.integers(0, 1 << 32 - 1)),
        ),
        max_size=8,
    )
)
def test_random_notes_never_escape(tmp_path, notes: list) -> None:
    body = b"".join(note(n, t, d, descsz=s) for n, t, d, s in notes)
    read_bytes(elf_core(note(b"CORE\0", 1, PRSTATUS) + body), tmp_path)


def test_worker_reports_unreadable_cores(tmp_path) -> None:
    import json
    import sys

    path = tmp_path / "broken"
    path.write_bytes(elf_core(b""))
    out = subprocess.run(
        [sys.executable, "-m", "corevault.analysis.worker", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {"error": "unreadable: no thread status (NT_PRSTATUS) in the core"}
    assert os.path.exists(path)


def test_real_core_names_its_executable_from_the_auxv(small_core: bytes, tmp_path) -> None:
    core = read_bytes(small_core, tmp_path)
    assert core is not None and core.executable is not None and core.executable.endswith("/sleep")
    del core.auxv[elfcore.AT_ENTRY]
    assert core.executable is None
