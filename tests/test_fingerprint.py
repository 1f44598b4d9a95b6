"""A crash's fingerprint (:mod:`corevault.fingerprint`), as the handler takes it while the core
streams: the same crash in another address layout gets the same one; another stack, another
program's content or a cut core do not; its parts come from the core's head
(:mod:`corevault.capture.corehead`), which the crashed process wrote."""

from __future__ import annotations

import struct

from corevault import fingerprint
from corevault.capture import corehead, stream
from tests.test_corehead import _note, elf_core, fixture_cores, head_of, prstatus, siginfo

SHA = "ab" * 32


def modules(base: int, sha: str = SHA) -> list[dict]:
    return [{"start": base, "end": base + 0x10000, "key": "11" * 20, "sha256": sha},
            {"start": base + 0x100000, "end": base + 0x200000, "key": "22" * 20, "sha256": "cd" * 32}]  # fmt: skip


def stack(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words).ljust(fingerprint.STACK_BYTES, b"\0")


def test_the_same_crash_in_another_layout_has_the_same_fingerprint() -> None:
    a = fingerprint.of(11, 1, 0x1000 + 0x123, stack(0x1000 + 0x456, 0x5, 0x101000 + 0x789), modules(0x1000))
    b = fingerprint.of(11, 1, 0x7000 + 0x123, stack(0x7000 + 0x456, 0x6, 0x107000 + 0x789), modules(0x7000))
    assert a is not None and fingerprint.FORMAT.match(a) and a == b


def test_another_stack_content_signal_or_code_is_another_fingerprint() -> None:
    base = fingerprint.of(6, -6, 0x1123, stack(0x1456), modules(0x1000))
    assert base != fingerprint.of(6, -6, 0x1123, stack(0x1457), modules(0x1000))  # another caller
    assert base != fingerprint.of(6, -6, 0x1123, stack(0x1456), modules(0x1000, sha="ef" * 32))  # other bytes
    assert base != fingerprint.of(11, -6, 0x1123, stack(0x1456), modules(0x1000))
    assert base != fingerprint.of(6, 0, 0x1123, stack(0x1456), modules(0x1000))


def test_no_fingerprint_outside_the_objects_or_without_the_whole_stack_window() -> None:
    assert fingerprint.of(11, 1, 0x9999999, stack(0x1456), modules(0x1000)) is None  # JIT code, a wild jump
    assert fingerprint.of(11, 1, 0x1123, stack(0x1456)[:-8], modules(0x1000)) is None  # the core was cut
    assert fingerprint.of(0, 0, 0x1123, stack(0x1456), modules(0x1000)) is None  # a snapshot: no signal
    assert fingerprint.of(11, 1, 0x1123, stack(0x1456), [{"start": 0x1000, "end": 0x2000}]) is None


def test_real_cores_give_the_registers_and_where_the_stack_streams(tmp_path) -> None:
    for meta, core in fixture_cores():
        head, _ = head_of(core, tmp_path)
        assert head.pc is not None and head.stack is not None and head.code is not None
        tap = stream.Window(head.stack, fingerprint.STACK_BYTES)
        view = memoryview(bytearray(core))
        for at in range(0, len(core), 4096):  # as pump hands a core to its sinks
            n = min(4096, len(core) - at)
            tap.write(bytearray(), view[at : at + n], n)
        assert bytes(tap.data) == core[head.stack : head.stack + fingerprint.STACK_BYTES]
        mark = fingerprint.of(head.signal, head.code, head.pc, bytes(tap.data), meta["modules"])
        assert mark is not None and fingerprint.FORMAT.match(mark)


def test_a_stack_pointer_outside_the_dumped_memory_gives_no_stack(tmp_path) -> None:
    def regs(pc: int, sp: int) -> bytes:
        desc = bytearray(prstatus(11, 42))
        struct.pack_into("<Q", desc, 112 + 8 * 16, pc)
        struct.pack_into("<Q", desc, 112 + 8 * 19, sp)
        return bytes(desc)

    notes = _note(b"CORE\0", 1, regs(0x401000, 0x400000 + 8192 - 100)) + _note(
        b"CORE\0", corehead.NT_SIGINFO, siginfo(11)
    )
    head, _ = head_of(elf_core(notes), tmp_path)
    assert head.pc == 0x401000 and head.stack is None  # only 100 bytes of it in the core
    notes = _note(b"CORE\0", 1, regs(0x401000, 0x400000 + 16)) + _note(
        b"CORE\0", corehead.NT_SIGINFO, siginfo(11)
    )
    head, _ = head_of(elf_core(notes), tmp_path)
    assert head.stack == 64 + 112 + len(notes) + 16
