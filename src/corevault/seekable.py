"""Cores kept in the zstd seekable format, so that a byte range costs what it reads.

The format is zstd's own (``contrib/seekable_format``, v0.1): the plain core cut into frames
of :data:`FRAME_SIZE` plain bytes, each an ordinary zstd frame with its own checksum, then
one skippable frame (magic ``0x184D2A5E``) that holds the seek table: per frame its
compressed and plain sizes (little-endian u32), and a 9-byte footer: the number of frames
(u32), a descriptor byte (bit 7: entries carry checksums; these carry none, the frames
have theirs) and the magic ``0x8F92EAB1``.

Any zstd decoder reads such a file as the plain core, skipping the table: ``zstd -d``,
``zstdcat``, and this tree's readers (which read across frames). A reader that knows the
table decompresses only the frames a range touches (:func:`open_range`): serving the last
MiB of a 4 GiB core decompresses at most one frame more than that MiB, where a single-frame
core has to be decompressed from its start.

Frames of 4 MiB: the capture's compression jobs are 1 MiB already (:mod:`corevault.capture.stream`),
so a frame boundary costs about what a job boundary does in ratio, and a range at most one
frame of decompression beyond what it reads. The table of a 4 GiB core is 8 KiB.

Written here with ``zstandard`` frames rather than through pyzstd's ``SeekableZstdFile``
(which writes the same format): the capture handler imports the standard library and
zstandard only, and writes through a sink with a byte budget; the format is a few
``struct`` calls. The tests read these files with pyzstd's reader, an independent one.

Cores stored before this (one frame, no table) are still served: :func:`read_table`
returns None for them, and a range is decompressed from the start as before. A table is
used only when its sizes add up to the stored object's and the core's plain size, and only
when it has no more frames than this writer makes of that core (:func:`most_frames`): a
damaged footer that claims millions of frames costs a read of 9 bytes, not of its table.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

FRAME_SIZE = 4 << 20
SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, magic
ENTRY = struct.Struct("<II")  # compressed size, plain size
HEADER = struct.Struct("<II")  # skippable frame: magic, content size
#: what a table may hold when the core's plain size is unknown: a 4 TiB core in 4 MiB
#: frames, a table of 8 MiB (the format itself allows 0x8000000 frames, a table of 1.5 GiB)
MAX_FRAMES = 1 << 20
_CHECKSUMS = 0x80
_RESERVED = 0x7C


def seek_table(frames: list[tuple[int, int]]) -> bytes:
    """The seek table (a skippable frame) for ``frames``, each (compressed size, plain size)."""
    entries = b"".join(ENTRY.pack(c, p) for c, p in frames)
    body = entries + FOOTER.pack(len(frames), 0, SEEKABLE_MAGIC)
    return HEADER.pack(SKIPPABLE_MAGIC, len(body)) + body


class Table:
    """Where each frame starts, in the stored object and in the plain core (one more: the ends).

    A plain class, not a dataclass: the capture handler imports this module for the writer's
    constants, and dataclasses brings in inspect and typing (about 14 ms of every crash).
    """

    __slots__ = ("plain", "stored")

    def __init__(self, stored: list[int], plain: list[int]) -> None:
        self.stored = stored
        self.plain = plain

    @property
    def size(self) -> int:
        return self.plain[-1]

    def frame_of(self, at: int) -> int:
        """The index of the frame that holds plain byte ``at`` (within the core)."""
        import bisect  # here: the capture handler writes tables and never reads one

        return min(bisect.bisect_right(self.plain, at) - 1, len(self.plain) - 2)

    def span(self, start: int, end: int) -> tuple[int, int, int]:
        """For plain bytes ``start``..``end`` (inclusive): the stored offset and length of the
        frames that hold them, and how many plain bytes of the first frame come before ``start``."""
        import bisect

        first = bisect.bisect_right(self.plain, start) - 1
        last = bisect.bisect_right(self.plain, end) - 1
        last = min(last, len(self.plain) - 2)
        return self.stored[first], self.stored[last + 1] - self.stored[first], start - self.plain[first]


def most_frames(plain_size: int | None) -> int:
    """How many frames a table of a core of ``plain_size`` plain bytes may have: as many as
    :data:`FRAME_SIZE` frames it takes (the capture writes no other), at least one."""
    if plain_size is None:
        return MAX_FRAMES
    return min(MAX_FRAMES, max(1, -(-plain_size // FRAME_SIZE)))


def table_length(footer: bytes, plain_size: int | None = None) -> int | None:
    """How many bytes at the object's end the whole seek table takes, from its last 9; None if
    the object does not end in a seek table (of a core of ``plain_size`` bytes, when known)."""
    if len(footer) < FOOTER.size:
        return None
    frames, descriptor, magic = FOOTER.unpack(footer[-FOOTER.size :])
    if magic != SEEKABLE_MAGIC or descriptor & _RESERVED or frames > most_frames(plain_size):
        return None
    entry = ENTRY.size + (4 if descriptor & _CHECKSUMS else 0)
    return HEADER.size + frames * entry + FOOTER.size


def parse(tail: bytes, stored_size: int, plain_size: int | None) -> Table | None:
    """The table at the end of a stored object of ``stored_size`` bytes (``tail``: at least its
    :func:`table_length` last bytes), or None when it is absent or does not add up."""
    length = table_length(tail, plain_size)
    if length is None or length > len(tail) or length > stored_size:
        return None
    raw = tail[len(tail) - length :]
    magic, content = HEADER.unpack_from(raw)
    frames, descriptor, _ = FOOTER.unpack(raw[-FOOTER.size :])
    if magic != SKIPPABLE_MAGIC or content != length - HEADER.size:
        return None
    entry = ENTRY.size + (4 if descriptor & _CHECKSUMS else 0)
    stored, plain = [0], [0]
    for i in range(frames):
        c, p = ENTRY.unpack_from(raw, HEADER.size + i * entry)
        stored.append(stored[-1] + c)
        plain.append(plain[-1] + p)
    if stored[-1] + length != stored_size or (plain_size is not None and plain[-1] != plain_size):
        return None
    return Table(stored, plain)


#: how much of an object's end is read at first: the table of a core up to 32 GiB
TAIL = 64 << 10


def read_table(read: Callable[[int, int], bytes], stored_size: int, plain_size: int | None) -> Table | None:
    """The seek table of a stored object, read with ``read(start, length)``; None if it has none."""
    if stored_size < FOOTER.size:
        return None
    want = min(TAIL, stored_size)
    tail = read(stored_size - want, want)
    length = table_length(tail, plain_size)
    if length is None:
        return None
    if length > len(tail) and length <= stored_size:
        tail = read(stored_size - length, length)
    return parse(tail, stored_size, plain_size)


def open_range(open_stored: Callable[[int, int], BinaryIO], table: Table, start: int, end: int) -> BinaryIO:
    """A reader of plain bytes from ``start`` (to ``end`` or a little past it: read what you
    need), decompressing only the frames that hold them; ``open_stored(offset, length)``
    opens that part of the stored object."""
    import zstandard

    offset, length, skip = table.span(start, end)
    reader = zstandard.ZstdDecompressor().stream_reader(
        open_stored(offset, length), read_size=1 << 20, read_across_frames=True, closefd=True
    )
    while skip > 0:  # within the first frame only
        got = reader.read(min(skip, 1 << 20))
        if not got:
            break
        skip -= len(got)
    return reader  # type: ignore[return-value]


def unpack_into(frame: bytes, out: memoryview, decompressor: object = None) -> None:
    """One frame of a seekable core decompressed into ``out``, which its table says it fills:
    ValueError when it holds fewer bytes or more (never written past ``out``). ``decompressor``:
    a ``zstandard.ZstdDecompressor`` to reuse (one per thread), whose buffers are then made once."""
    import zstandard

    try:
        unpacker = decompressor if decompressor is not None else zstandard.ZstdDecompressor()
        reader = unpacker.stream_reader(frame, read_across_frames=False)  # type: ignore[attr-defined]
        got = 0
        while got < len(out) and (n := reader.readinto(out[got:])):
            got += n
        more = reader.read(1)
    except zstandard.ZstdError as e:
        raise ValueError(f"a frame of {len(out)} bytes does not decompress: {e}") from None
    if got != len(out) or more:
        raise ValueError(f"a frame of the seek table's {len(out)} bytes holds {'more' if more else got}")
