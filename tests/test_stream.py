"""Streaming a core into its sinks: sparse plain copy, compressed copy, limits, failures."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess

import pytest
import pyzstd
import zstandard

from corevault import seekable
from corevault.capture import stream


def core_like(size: int) -> bytes:
    """Data pages and zero pages interleaved, ending in zeros, with an odd length."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += os.urandom(4096) if block % 3 == 0 else bytes(stream.BLOCK)
        block += 1
    return bytes(out[:size])


def pipe_with(data: bytes, tmp_path) -> int:
    src = tmp_path / "src"
    src.write_bytes(data)
    return os.open(src, os.O_RDONLY)


def test_sparse_copy_is_identical_and_has_holes(tmp_path) -> None:
    data = core_like(5 * stream.CHUNK + 12345) + bytes(3 * stream.CHUNK)
    out = os.open(tmp_path / "core", os.O_WRONLY | os.O_CREAT)
    sink = stream.SparseSink(out)
    src = pipe_with(data, tmp_path)
    assert stream.pump(src, [sink], None) == (len(data), False)
    sink.finish()
    os.close(out)
    assert (tmp_path / "core").read_bytes() == data
    assert os.stat(tmp_path / "core").st_blocks * 512 < len(data) / 2


def test_sparse_copy_expands_a_compressed_core_with_holes(tmp_path) -> None:
    data = core_like(3 * stream.CHUNK + 777) + bytes(2 * stream.CHUNK)
    packed = tmp_path / "core.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(data))
    seen: list[int] = []
    fd = os.open(tmp_path / "core", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with open(packed, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        assert stream.sparse_copy(reader, fd, seen.append) == len(data)
    os.close(fd)
    assert (tmp_path / "core").read_bytes() == data and sum(seen) == len(data)
    assert os.stat(tmp_path / "core").st_blocks * 512 < len(data) / 2


def test_compressed_copy_round_trips_with_hash(tmp_path) -> None:
    data = core_like(3 * stream.CHUNK + 7)
    out = os.open(tmp_path / "core.zst", os.O_WRONLY | os.O_CREAT)
    sink = stream.ZstdSink(out, level=3, threads=1, budget=1 << 30)
    stream.pump(pipe_with(data, tmp_path), [sink], None)
    sink.finish()
    os.close(out)
    assert (
        zstandard.ZstdDecompressor().decompress(
            (tmp_path / "core.zst").read_bytes(), max_output_size=len(data)
        )
        == data
    )
    assert sink.sha256 == hashlib.sha256(data).hexdigest()
    assert sink.stored == os.path.getsize(tmp_path / "core.zst")


@pytest.mark.parametrize("limit", [0, 1, stream.CHUNK, stream.CHUNK + 1])
def test_limit_cuts_and_reports_truncation(tmp_path, limit: int) -> None:
    data = core_like(2 * stream.CHUNK)
    out = os.open(tmp_path / "core", os.O_WRONLY | os.O_CREAT)
    sink = stream.SparseSink(out)
    assert stream.pump(pipe_with(data, tmp_path), [sink], limit) == (limit, True)
    sink.finish()
    os.close(out)
    assert (tmp_path / "core").read_bytes() == data[:limit]


def test_limit_equal_to_the_size_is_not_truncation(tmp_path) -> None:
    data = core_like(stream.CHUNK)
    sink = stream.SparseSink(os.open(tmp_path / "core", os.O_WRONLY | os.O_CREAT))
    assert stream.pump(pipe_with(data, tmp_path), [sink], len(data)) == (len(data), False)


def test_a_failing_sink_does_not_stop_the_others(tmp_path) -> None:
    data = core_like(4 * stream.CHUNK)
    full = stream.ZstdSink(os.open(tmp_path / "a.zst", os.O_WRONLY | os.O_CREAT), 1, 0, budget=1000)
    plain_fd = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)
    plain = stream.SparseSink(plain_fd)
    assert stream.pump(pipe_with(data, tmp_path), [full, plain], None)[0] == len(data)
    plain.finish()
    assert full.failed is not None and "quota" in full.failed
    assert plain.failed is None and (tmp_path / "b").read_bytes() == data


def test_disk_full_is_a_sink_failure(tmp_path) -> None:
    sink = stream.SparseSink(os.open("/dev/full", os.O_WRONLY))
    stream.pump(pipe_with(os.urandom(100000), tmp_path), [sink], None)
    assert sink.failed == "writing the core failed after 0 bytes: No space left on device"


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_mostly_zero_core_is_one_frame_with_the_same_bytes_and_hash(tmp_path, threads: int) -> None:
    """Every thread setting stores one zstd frame that readers decompress to the exact core."""
    data = bytes(5 * stream.CHUNK) + core_like(2 * stream.CHUNK + 5) + bytes(4 * stream.CHUNK + 3)
    out = os.open(tmp_path / "core.zst", os.O_WRONLY | os.O_CREAT)
    sink = stream.ZstdSink(out, level=3, threads=threads, budget=1 << 30)
    assert stream.pump(pipe_with(data, tmp_path), [sink], None) == (len(data), False)
    sink.finish()
    os.close(out)
    with open(tmp_path / "core.zst", "rb") as f:  # as the vault and the analysis read it: one frame
        assert zstandard.ZstdDecompressor().stream_reader(f).read() == data
    assert sink.sha256 == hashlib.sha256(data).hexdigest()


def test_a_sink_over_budget_midway_still_hashes_and_stops_cleanly(tmp_path) -> None:
    # The budget is crossed on the compressing thread; the reader is at most offload.POOL
    # chunks ahead of it, so it hears of it well before the core's end.
    data = os.urandom(16 * stream.CHUNK)
    sink = stream.ZstdSink(
        os.open(tmp_path / "a.zst", os.O_WRONLY | os.O_CREAT), 3, 1, budget=2 * stream.CHUNK
    )
    plain = stream.SparseSink(os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT))
    assert stream.pump(pipe_with(data, tmp_path), [sink, plain], None) == (len(data), False)
    assert sink.failed and "stopped after" in sink.failed
    # What it took is hashed in full up to where it failed, and the plain copy went on.
    assert sink.sha256 == hashlib.sha256(data[: sink.size]).hexdigest()
    plain.finish()
    assert (tmp_path / "b").read_bytes() == data


def test_enlarging_a_pipe_never_shrinks_it() -> None:
    """A pipe gets the size asked for where it may (not above pipe-max-size without
    CAP_SYS_RESOURCE, then at least 1 MiB); a later, smaller request keeps it."""
    import fcntl

    r, w = os.pipe()
    try:
        stream.enlarge_pipe(r, 4 << 20)
        first = fcntl.fcntl(r, 1032)  # F_GETPIPE_SZ
        assert first >= 1 << 20  # at least pipe-max-size's default, which anyone may ask for
        stream.enlarge_pipe(r, 64 << 10)
        assert fcntl.fcntl(r, 1032) == first
    finally:
        os.close(r)
        os.close(w)


FRAME = seekable.FRAME_SIZE


def frames_of_zeros_and_data() -> bytes:
    """Whole zero frames, a frame of data then zeros, one of zeros then data, one of zeros
    cut by a data chunk midway, and a short all-zero last frame (chunks straddle frames: the
    pump's first read is a block)."""
    return (
        bytes(2 * FRAME)
        + core_like(FRAME // 2) + bytes(FRAME // 2)
        + bytes(FRAME - 4096) + os.urandom(4096)
        + bytes(FRAME // 2 + 1) + os.urandom(stream.CHUNK) + bytes(FRAME // 2 - stream.CHUNK - 1)
        + bytes(3 * FRAME)
        + bytes(stream.CHUNK + 17)
    )  # fmt: skip


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_zero_frames_and_data_frames_round_trip_with_the_plain_cores_hash(tmp_path, threads: int) -> None:
    data = frames_of_zeros_and_data()
    out = os.open(tmp_path / "core.zst", os.O_WRONLY | os.O_CREAT)
    sink = stream.ZstdSink(out, level=3, threads=threads, budget=1 << 30)
    assert stream.pump(pipe_with(data, tmp_path), [sink], None) == (len(data), False)
    sink.finish()
    os.close(out)
    packed = tmp_path / "core.zst"
    with pyzstd.SeekableZstdFile(packed, "r") as f:  # an independent reader of the format
        assert f.read() == data
    assert subprocess.run(["zstd", "-dc", str(packed)], capture_output=True, check=True).stdout == data
    assert (
        subprocess.run(["zstd", "-t", "-q", str(packed)], check=False).returncode == 0
    )  # every frame's checksum
    assert sink.sha256 == hashlib.sha256(data).hexdigest()
    assert [p for _, p in sink.frames] == [FRAME] * 8 + [stream.CHUNK + 17]
    # every all-zero frame is the same few bytes, whatever thread wrote it
    table = seekable.read_table(lambda s, n: packed.read_bytes()[s : s + n], sink.stored, len(data))
    assert table is not None
    raw = packed.read_bytes()
    zero_frames = {raw[table.stored[i] : table.stored[i + 1]] for i in (0, 1, 5, 6, 7)}
    assert len(zero_frames) == 1 and len(next(iter(zero_frames))) < 1024


def test_cores_written_at_different_levels_in_one_process_each_round_trip_with_their_own_zero_frames(
    tmp_path,
) -> None:
    """The spool's level (1 by default) may differ between crashes of one long-lived process (a
    socket-mode agent whose settings changed) and from the level of the agent that reads them:
    the all-zero frame made once per process is kept per level, and each core reads back whole
    by any reader, whatever level it was written at or the reader is set to."""
    data = frames_of_zeros_and_data()
    made: dict[int, set[bytes]] = {}
    for i, (level, threads) in enumerate([(1, 2), (3, 0), (1, 0), (3, 2)]):
        packed = tmp_path / f"core-{i}.zst"
        out = os.open(packed, os.O_WRONLY | os.O_CREAT)
        sink = stream.ZstdSink(out, level=level, threads=threads, budget=1 << 30)
        assert stream.pump(pipe_with(data, tmp_path), [sink], None) == (len(data), False)
        sink.finish()
        os.close(out)
        with pyzstd.SeekableZstdFile(packed, "r") as f:
            assert f.read() == data
        assert sink.sha256 == hashlib.sha256(data).hexdigest()
        raw = packed.read_bytes()
        table = seekable.read_table(lambda s, n, raw=raw: raw[s : s + n], sink.stored, len(data))
        assert table is not None
        made.setdefault(level, set()).update(
            raw[table.stored[i] : table.stored[i + 1]] for i in (0, 1, 5, 6, 7)
        )
    # one zero frame per level, kept for that level (zstd may make the same bytes at both: a
    # frame of zeros is RLE blocks whatever the level, so only the keeping per level is checked)
    assert set(made) == {1, 3}
    for level, frames in made.items():
        assert frames == {stream._ZERO_FRAMES[level]}
        assert zstandard.ZstdDecompressor().decompress(next(iter(frames)), max_output_size=FRAME) == bytes(
            FRAME
        )


def test_a_core_of_zeros_only_is_stored_in_a_few_bytes_per_frame(tmp_path) -> None:
    data = bytes(16 * FRAME)
    out = os.open(tmp_path / "core.zst", os.O_WRONLY | os.O_CREAT)
    sink = stream.ZstdSink(out, level=3, threads=1, budget=1 << 30)
    stream.pump(pipe_with(data, tmp_path), [sink], None)
    sink.finish()
    os.close(out)
    assert sink.stored < 16 * 1024
    assert sink.sha256 == hashlib.sha256(data).hexdigest()
    with pyzstd.SeekableZstdFile(tmp_path / "core.zst", "r") as f:
        assert f.read() == data


def test_letting_go_of_the_pipe_tells_the_writer_there_is_no_reader() -> None:
    """What the kernel waits for (core_pipe_limit > 0): no reader left on the pipe. The fd
    number stays taken, by /dev/null."""
    r, w = os.pipe()
    try:
        os.write(w, b"core")
        poll = select.poll()
        poll.register(w, 0)
        assert poll.poll(0) == []
        stream.let_go(r)
        assert poll.poll(1000) == [(w, select.POLLERR)]
        assert os.read(r, 10) == b""  # /dev/null
        assert os.readlink(f"/proc/self/fd/{r}") == "/dev/null"
    finally:
        os.close(r)
        os.close(w)
