"""Cores in the zstd seekable format: any reader gets the plain core back, a range costs what it reads.

The core is a real one: gdb's ``gcore`` of a small Python process holding 6 MiB of random
bytes and 6 MiB of zeros (so that it spans several frames), compressed by the capture
handler's own sink. pyzstd's ``SeekableZstdFile`` (another implementation of the format)
and the ``zstd`` command read it back; the server serves ranges of it over HTTP, byte for
byte those of the plain core, also from a core stored before (one frame, no table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import pyzstd
import zstandard

from corevault import config, seekable
from corevault.capture import stream
from corevault.server.access import Open
from corevault.server.app import create_app
from corevault.vault import blobs, catalog, stores
from corevault.vault.crashes import plain_frames, plain_range
from testbed import gcore, servers

FRAME = seekable.FRAME_SIZE


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real core of a process that holds random and zero pages."""
    path = tmp_path_factory.mktemp("core") / "core"
    holder = [sys.executable, "-I", "-S", "-c", "import os, sys; a = os.urandom(6 << 20); b = bytearray(6 << 20); "
              "print('ready', flush=True); sys.stdin.read()"]  # fmt: skip
    gcore.core_of(holder, str(path), b"ready\n")
    assert path.stat().st_size > 3 * FRAME
    return path


def compress(plain: Path, dest: Path) -> stream.ZstdSink:
    """``plain`` through the capture handler's sink, as a crash's core goes into the spool."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sink = stream.ZstdSink(fd, 3, 0, 1 << 40)
        src = os.open(plain, os.O_RDONLY)
        try:
            stream.pump(src, [sink], None)
        finally:
            os.close(src)
        sink.finish()
    finally:
        os.close(fd)
    return sink


def test_a_seekable_core_reads_back_whole_with_other_readers(core: Path, tmp_path: Path) -> None:
    plain = core.read_bytes()
    packed = tmp_path / "core.zst"
    sink = compress(core, packed)
    assert len(sink.frames) == -(-len(plain) // FRAME) and all(p == FRAME for _, p in sink.frames[:-1])
    with pyzstd.SeekableZstdFile(packed, "r") as f:  # reads the seek table, refuses a bad one
        assert f.read() == plain
        f.seek(len(plain) - 1000)
        assert f.read() == plain[-1000:]
    unpacked = subprocess.run(["zstd", "-dc", str(packed)], capture_output=True, check=True).stdout
    assert unpacked == plain
    with open(packed, "rb") as f, stream_reader(f) as reader:
        assert reader.read() == plain


def stream_reader(f: BinaryIO) -> BinaryIO:
    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)  # type: ignore[return-value]


def test_an_empty_core_is_one_empty_frame_and_its_table(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    sink = compress(empty, tmp_path / "empty.zst")
    assert sink.frames and sink.frames[0][1] == 0
    with pyzstd.SeekableZstdFile(tmp_path / "empty.zst", "r") as f:
        assert f.read() == b""


class Counting:
    """A blob store that counts the stored bytes handed out (what a range cost)."""

    def __init__(self, store: blobs.BlobStore) -> None:
        self.store = store
        self.read = 0

    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        size = self.store.size(key) or 0
        self.read += (size - start) if length is None else min(length, size - start)
        return self.store.open(key, start, length)


def ranges(size: int) -> list[tuple[int, int]]:
    """Ranges around frame boundaries, inside one frame, over three, the first and last bytes."""
    return [
        (0, 0), (0, 99), (FRAME - 1, FRAME), (FRAME, FRAME), (FRAME - 10, 3 * FRAME + 10),
        (FRAME + 12345, FRAME + 67890), (size - 100, size - 1), (size - 1, size - 1), (0, size - 1),
    ]  # fmt: skip


def test_ranges_of_a_seekable_core_are_the_plain_cores_and_cost_what_they_read(
    core: Path, tmp_path: Path
) -> None:
    plain = core.read_bytes()
    store = blobs.FsStore(str(tmp_path / "vault"))
    packed = tmp_path / "core.zst"
    compress(core, packed)
    store.put_file(blobs.core_key("seekable"), str(packed))
    old = tmp_path / "old.zst"
    old.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plain))
    store.put_file(blobs.core_key("old"), str(old))
    for crash_id, stored in (("seekable", packed), ("old", old)):
        crash = {"id": crash_id, "size": len(plain), "stored_size": stored.stat().st_size}
        for start, end in ranges(len(plain)):
            counting = Counting(store)
            with plain_range(counting, crash, start, end) as f:  # type: ignore[arg-type]
                got = f.read(end - start + 1)
            assert got == plain[start : end + 1], (crash_id, start, end)
            if crash_id == "seekable" and end - start < FRAME:
                # at most two frames and the table, never the core from its start
                assert counting.read < 2 * max(c for c, _ in frames_of(packed)) + seekable.TAIL, (start, end)


def frames_of(packed: Path) -> list[tuple[int, int]]:
    data = packed.read_bytes()
    table = seekable.parse(data[-seekable.TAIL :], len(data), None)
    assert table is not None
    return [(table.stored[i + 1] - table.stored[i], table.plain[i + 1] - table.plain[i])
            for i in range(len(table.plain) - 1)]  # fmt: skip


def test_a_table_that_does_not_add_up_is_not_used(core: Path, tmp_path: Path) -> None:
    packed = tmp_path / "core.zst"
    compress(core, packed)
    data = packed.read_bytes()
    size = core.stat().st_size
    assert seekable.parse(data[-seekable.TAIL :], len(data), size) is not None
    assert seekable.parse(data[-seekable.TAIL :], len(data), size + 1) is None  # another plain size
    assert seekable.parse(data[-seekable.TAIL :], len(data) + 1, size) is None  # another stored size
    # a single-frame core whose last bytes happen to read as a footer (its checksum chosen so)
    forged = zstandard.ZstdCompressor().compress(b"x" * 1000)[:-9] + seekable.FOOTER.pack(
        3, 0, seekable.SEEKABLE_MAGIC
    )
    assert seekable.parse(forged, len(forged), 1000) is None
    huge = b"\0" * 100 + seekable.FOOTER.pack(seekable.MAX_FRAMES + 1, 0, seekable.SEEKABLE_MAGIC)
    assert seekable.table_length(huge) is None


@pytest.mark.parametrize(
    ("frames", "plain_size"),
    [(0x8000000, None), (1 << 20, 1 << 30)],  # the format's limit; more frames than 1 GiB makes
    ids=["format-limit", "more-than-the-core-makes"],
)
def test_a_damaged_footer_costs_the_tail_read_not_its_table(frames: int, plain_size: int | None) -> None:
    """A footer that claims a huge table is not believed: nothing more than the tail is read."""
    stored_size = 4 << 30
    footer = seekable.FOOTER.pack(frames, 0, seekable.SEEKABLE_MAGIC)
    asked: list[int] = []

    def read(offset: int, length: int) -> bytes:
        asked.append(length)
        # the object's end; a larger read is answered short rather than with gigabytes
        return b"\0" * (length - len(footer)) + footer if length <= seekable.TAIL else b""

    assert seekable.read_table(read, stored_size, plain_size) is None
    assert asked == [seekable.TAIL]
    assert seekable.most_frames(plain_size) < frames
    assert seekable.most_frames(1 << 30) == 256 and seekable.most_frames(0) == 1


def test_frames_of_a_seekable_core_decompressed_apart_are_the_plain_cores_bytes(
    core: Path, tmp_path: Path
) -> None:
    """The jobs a download runs ahead, one per frame, each into a buffer of its own (reused from
    job to job, as the server reuses them) or a store that has no local file: the plain core's
    bytes, range by range, from the frames that hold the range and no more; an older core (one
    frame, no table) has none, and is decompressed from its start instead."""
    plain = core.read_bytes()
    fs = blobs.FsStore(str(tmp_path / "vault"))
    packed = tmp_path / "core.zst"
    compress(core, packed)
    fs.put_file(blobs.core_key("seekable"), str(packed))
    crash = {"id": "seekable", "size": len(plain), "stored_size": packed.stat().st_size}
    biggest = max(c for c, _ in frames_of(packed))
    buf = bytearray(b"\xff" * FRAME)  # what an earlier frame left in a reused buffer
    for start, end in ranges(len(plain)):
        for store in (fs, Counting(fs)):  # Counting has no local file: one ranged read per frame
            jobs = plain_frames(store, crash, start, end)  # type: ignore[arg-type]
            assert jobs is not None and len(jobs) == (end // FRAME) - (start // FRAME) + 1
            got = b"".join(bytes(job(buf)) for job in jobs)
            assert got == plain[start : end + 1], (start, end)
            if isinstance(store, Counting) and end - start < FRAME:
                assert store.read < 2 * biggest + seekable.TAIL, (start, end)
    old = tmp_path / "old.zst"
    old.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plain))
    fs.put_file(blobs.core_key("old"), str(old))
    assert (
        plain_frames(fs, {"id": "old", "size": len(plain), "stored_size": old.stat().st_size}, 0, 99) is None
    )


def test_a_frame_that_does_not_hold_what_its_table_says_fails_its_job(core: Path, tmp_path: Path) -> None:
    """A damaged frame, or one whose table entry names more plain bytes than it holds: the job
    that decompresses it raises (the download ends short), and never writes past its frame."""
    plain = core.read_bytes()
    packed = tmp_path / "core.zst"
    compress(core, packed)
    data = bytearray(packed.read_bytes())
    fs = blobs.FsStore(str(tmp_path / "vault"))
    crash = {"id": "bad", "size": len(plain), "stored_size": len(data)}
    first = frames_of(packed)[0][0]
    data[first // 2] ^= 0xFF  # a flipped byte in the first frame: its checksum fails
    fs.put_bytes(blobs.core_key("bad"), bytes(data))
    jobs = plain_frames(fs, crash, 0, len(plain) - 1)
    assert jobs is not None
    with pytest.raises(ValueError):
        jobs[0](bytearray(FRAME))
    assert bytes(jobs[1](bytearray(FRAME))) == plain[FRAME : 2 * FRAME]  # the others are whole
    out = bytearray(FRAME + 10)
    with pytest.raises(ValueError, match="holds more"):  # a table that says a frame is shorter
        seekable.unpack_into(packed.read_bytes()[:first], memoryview(out)[: FRAME - 1])
    assert out[FRAME - 1 :] == bytes(11)


@pytest.fixture
def served(core: Path, tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A server over a vault holding the core as one crash."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    packed = tmp_path / "core.zst"
    sink = compress(core, packed)
    stores.vault_store(settings).put_file(blobs.core_key("c1"), str(packed))
    engine = catalog.connect(settings.catalog_url)
    meta = {"id": "c1", "time": int(time.time()), "process": {"exe": "/usr/bin/python3"},
            "core": {"size": sink.size, "stored_size": packed.stat().st_size, "sha256": sink.sha256}}  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, json.loads(json.dumps(meta)), "off")
    engine.dispose()
    with servers.asgi(create_app(settings, Open())) as url:
        yield url, core.read_bytes()


def test_the_server_serves_ranges_of_a_seekable_core(served: tuple[str, bytes]) -> None:
    url, plain = served
    with httpx.Client(base_url=url, timeout=60) as client:
        for start, end in ranges(len(plain)):
            r = client.get("/api/v1/crashes/c1/core", headers={"Range": f"bytes={start}-{end}"})
            assert r.status_code == 206 and r.content == plain[start : end + 1], (start, end)
            assert r.headers["content-range"] == f"bytes {start}-{end}/{len(plain)}"
        whole = client.get("/api/v1/crashes/c1/core")
        assert whole.status_code == 200 and whole.content == plain


def test_a_client_that_takes_zstd_gets_the_stored_frames_and_a_range_stays_plain(
    served: tuple[str, bytes], tmp_path: Path
) -> None:
    """A core goes out as the vault keeps it (frames and seek table) to a client that accepts zstd,
    which curl --compressed and corevault's own client decompress to the plain core; a range is
    always of the plain core, and a client that does not take zstd gets the plain core."""
    from corevault.vault.remote import RemoteVault

    url, plain = served
    stored = (tmp_path / "core.zst").read_bytes()
    path = "/api/v1/crashes/c1/core"
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("GET", path, headers={"Accept-Encoding": "gzip, zstd"}) as r:
            assert r.headers["content-encoding"] == "zstd" and r.headers["vary"] == "Accept-Encoding"
            assert r.headers["content-length"] == str(len(stored))
            assert b"".join(r.iter_raw()) == stored
        for refused in ("identity", "gzip, zstd;q=0", "br"):
            r = client.get(path, headers={"Accept-Encoding": refused})
            assert "content-encoding" not in r.headers and r.content == plain, refused
        start = 3 * FRAME - 10
        r = client.get(path, headers={"Accept-Encoding": "zstd", "Range": f"bytes={start}-{start + 99}"})
        assert (
            r.status_code == 206
            and "content-encoding" not in r.headers
            and r.content == plain[start : start + 100]
        )
    curl = subprocess.run(["curl", "-sf", "--compressed", url + path], capture_output=True, check=True).stdout
    assert curl == plain
    with RemoteVault(url, None).open_core("c1") as f:
        assert f.read() == plain


def test_the_stored_core_is_sent_by_the_kernel_from_a_file_store(
    served: tuple[str, bytes], tmp_path: Path, sendfile_calls: list[int]
) -> None:
    """As stored (zstd), from a file store, the core goes out as a binary does: ``sendfile(2)``
    from the stored file, every byte of it, none copied through Python."""
    url, _ = served
    stored = (tmp_path / "core.zst").read_bytes()
    with httpx.stream("GET", url + "/api/v1/crashes/c1/core", headers={"Accept-Encoding": "zstd"}) as r:
        assert r.headers["content-encoding"] == "zstd" and b"".join(r.iter_raw()) == stored
    assert sum(sendfile_calls) == len(stored)


@pytest.mark.servers
def test_a_seekable_core_in_s3_is_served_plain_frame_by_frame(core: Path, tmp_path: Path) -> None:
    """From an object store (a real SeaweedFS) each frame is one ranged read: the plain core,
    whole and by range, byte for byte."""
    with servers.seaweed() as w:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
        try:
            settings = config.from_dict({
                "state_dir": str(tmp_path / "state"),
                "vault": {"store": f"s3://{w.bucket}/v", "s3": {"endpoint": w.endpoint, "addressing": "path"}},
            })  # fmt: skip
            packed = tmp_path / "core.zst"
            sink = compress(core, packed)
            stores.vault_store(settings).put_file(blobs.core_key("c1"), str(packed))
            engine = catalog.connect(settings.catalog_url)
            meta = {"id": "c1", "time": int(time.time()),
                    "core": {"size": sink.size, "stored_size": packed.stat().st_size, "sha256": sink.sha256}}  # fmt: skip
            with engine.begin() as conn:
                catalog.add_crash(conn, meta, "off")
            engine.dispose()
            plain = core.read_bytes()
            with (
                servers.asgi(create_app(settings, Open())) as url,
                httpx.Client(base_url=url, timeout=60) as client,
            ):
                whole = client.get("/api/v1/crashes/c1/core", headers={"Accept-Encoding": "identity"})
                assert whole.status_code == 200 and whole.content == plain
                start, end = FRAME - 10, 3 * FRAME + 10
                r = client.get("/api/v1/crashes/c1/core", headers={"Range": f"bytes={start}-{end}"})
                assert r.status_code == 206 and r.content == plain[start : end + 1]
        finally:
            del os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
