"""Streaming a core into its sinks: sparse plain copy, compressed copy, limits, failures."""

from __future__ import annotations

import hashlib
import os

import pytest
import zstandard

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
    data = os.urandom(6 * stream.CHUNK)
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
