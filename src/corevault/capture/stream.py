"""Streaming the core from the kernel's pipe into every target at once, never holding it.

The core is read once, in 1 MiB chunks, and each chunk goes to every live sink:

- :class:`SparseSink` writes the plain core, skipping all-zero 64 KiB blocks with holes
  (the kernel's own file-mode cores are sparse too; piped cores never are, zero pages
  arrive as zeros). On core-like data that is faster than ``cat`` and half the disk.
  Blocks are compared as ``bytearray`` slices against a zero block (a memcmp);
  ``memoryview`` comparisons would be two orders of magnitude slower. :func:`sparse_copy`
  writes any reader's plain core (a decompressing one, a file) the same way.
- :class:`ZstdSink` compresses with ``zstandard`` into the zstd seekable format (frames of
  4 MiB, each with its checksum, and a seek table: :mod:`corevault.seekable`), hashes the
  uncompressed bytes with SHA-256 and stops at a byte budget (the spool's room).

A sink that fails (ENOSPC, EDQUOT, over budget) is dropped with its reason and the others
go on; when none is left, reading stops so the crashed process can finish dying.
"""

from __future__ import annotations

import errno
import fcntl
import os

from corevault import hashing, seekable

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable
    from hashlib import _Hash
    from typing import BinaryIO

    from corevault.capture import offload

CHUNK = 1 << 20
#: seconds without progress after which a dump stops waiting for what does not answer and no
#: longer holds what the node shares: the kernel's stream of the core (:mod:`.coresocket`: the
#: kernel writes a core as fast as it reads the process's memory, and stops only where a page is
#: on a filesystem that does not answer) and the pod's volume (:mod:`.volumecopy`)
STALL = 5
BLOCK = 64 << 10
JOB_SIZE = 1 << 20
FLUSH_EVERY = 32 << 20
RECHECK_EVERY = 16 << 20
_ZERO_BLOCK = bytes(BLOCK)
_FRAME_LOG = seekable.FRAME_SIZE.bit_length() - 1
_ZEROS: list[bytes] = []
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


class SinkFailed(Exception):
    pass


def zero_chunk() -> bytes:
    """:data:`CHUNK` zero bytes, made at first use: made at import, they cost every crash ~1 ms of CPU."""
    if not _ZEROS:
        _ZEROS.append(bytes(CHUNK))
    return _ZEROS[0]


def _zstd():  # -> the zstandard C backend module
    """zstandard's C backend, loaded without running the package's ``__init__``.

    That ``__init__`` imports ``platform`` and (on Python 3.11) ``typing`` only to pick a
    backend and annotate types: about 15 ms of every crash's handler on this kind of
    machine, against 1 ms for the extension itself. Anything unexpected falls back to
    the ordinary import.
    """
    import sys

    if "zstandard" in sys.modules:
        return sys.modules["zstandard"]
    try:
        # importlib.machinery's own classes, from the frozen modules it re-exports: the package
        # itself imports warnings and more, ~1 ms
        from _frozen_importlib import ModuleSpec
        from _frozen_importlib_external import EXTENSION_SUFFIXES, ExtensionFileLoader

        # The package's directory, as the import system would find it (the first entry of
        # sys.path that has it), looked up with a stat per entry: the import system's own
        # search lists each directory first, ~0.25 ms for site-packages alone.
        directory = next(
            (d for d in (os.path.join(e, "zstandard") for e in sys.path if e) if os.path.isdir(d)), None
        )
        for suffix in EXTENSION_SUFFIXES if directory else []:
            path = os.path.join(directory, "backend_c" + suffix)
            if os.path.exists(path):
                loader = ExtensionFileLoader("zstandard.backend_c", path)
                module = loader.create_module(ModuleSpec("zstandard.backend_c", loader, origin=path))
                loader.exec_module(module)
                return module
    except (ImportError, OSError):
        pass
    import zstandard

    return zstandard


class SparseSink:
    """The plain core, written at explicit offsets with holes for zero blocks.

    Where the filesystem refuses a write past what was written so far (``rclone mount``
    without its cache answers ESPIPE: it uploads as it goes), the rest is written densely,
    zeros included: tried, not guessed from the filesystem's name.
    """

    __slots__ = ("dense", "end", "failed", "fd", "name", "size")

    def __init__(self, fd: int, name: str = "volume") -> None:
        self.fd = fd
        self.name = name
        self.size = 0
        self.end = 0  # where the data written so far ends
        self.dense = False
        self.failed: str | None = None

    def write(self, buf: bytearray, view: memoryview, n: int, zero: bool | None = None) -> None:
        """Write ``view[:n]`` (``zero``: known to be all zeros; None: not known)."""
        try:
            self._write(buf, view, n, zero)
        except OSError as e:  # said with where: a bucket mounted through FUSE may fail mid-upload
            raise OSError(e.errno, f"writing the core failed after {self.end} bytes: {e.strerror}") from e

    def _write(self, buf: bytearray, view: memoryview, n: int, zero: bool | None) -> None:
        pos = self.size
        self.size += n
        if self.dense:
            self._put(view[:n], pos)
        elif zero or (zero is None and n == CHUNK and buf == zero_chunk()):
            return
        else:
            start = -1  # first block of the current run of data
            for off in range(0, n, BLOCK):
                end = off + BLOCK
                zero = buf[off:end] == _ZERO_BLOCK if end <= n else buf[off:n] == bytes(n - off)
                if zero and start >= 0:
                    self._put(view[start:off], pos + start)
                    start = -1
                elif not zero and start < 0:
                    start = off
            if start >= 0:
                self._put(view[start:n], pos + start)
        if self.size // FLUSH_EVERY != pos // FLUSH_EVERY:
            _flush_behind(self.fd, self.size)

    def _put(self, data: memoryview, offset: int) -> None:
        if offset > self.end and not self.dense:
            try:
                _pwrite_all(self.fd, data, offset)
                self.end = offset + len(data)
                return
            except OSError as e:
                if e.errno != errno.ESPIPE:
                    raise
                self.dense = True
        self._zeros_upto(offset)
        _pwrite_all(self.fd, data, offset)
        self.end = offset + len(data)

    def _zeros_upto(self, offset: int) -> None:
        while self.end < offset:
            n = min(CHUNK, offset - self.end)
            _pwrite_all(self.fd, memoryview(zero_chunk())[:n], self.end)
            self.end += n

    def finish(self) -> None:
        """Give the file the core's size: a trailing hole, or zeros where holes are refused.

        Only when the core ends in zeros: s3fs uploads the whole file at every ftruncate.
        """
        if self.end >= self.size:
            return
        if not self.dense:
            try:
                os.ftruncate(self.fd, self.size)
                return
            except OSError as e:
                if e.errno not in (errno.ESPIPE, errno.EINVAL, errno.EOPNOTSUPP):
                    raise OSError(e.errno, f"setting the core's size failed: {e.strerror}") from e
        self._zeros_upto(self.size)


def sparse_copy(reader: BinaryIO, fd: int, progress: Callable[[int], None] | None = None) -> int:
    """Copy a plain core from ``reader`` into ``fd`` with holes for zero blocks; returns its size.

    ``progress`` is told each chunk's length as it is written.
    """
    sink = SparseSink(fd)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := reader.readinto(buf):
        sink.write(buf, view, n)
        if progress is not None:
            progress(n)
    sink.finish()
    return sink.size


def _flush_behind(fd: int, upto: int) -> None:
    """Start writeback of what was written so far and drop it from the page cache.

    A core is written once and read rarely: keeping it cached would push the node's
    working set out, and starting writeback as we go makes the final fsync short.
    POSIX_FADV_DONTNEED starts writeback of dirty pages and drops the clean ones.
    """
    try:
        os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class Window:
    """A sink that writes nowhere: it keeps the stream's bytes at ``[start, start + size)``
    (the memory at the crashing thread's stack pointer, for the crash's fingerprint)."""

    __slots__ = ("data", "end", "failed", "name", "pos", "start")

    def __init__(self, start: int, size: int, name: str = "window") -> None:
        self.start, self.end = start, start + size
        self.pos = 0
        self.data = bytearray()
        self.failed: str | None = None
        self.name = name

    def write(self, buf: bytearray, view: memoryview, n: int, zero: bool | None = None) -> None:
        lo = self.pos
        self.pos += n
        a, b = max(lo, self.start), min(self.pos, self.end)
        if a < b:
            self.data += view[a - lo : b - lo]


class ZstdSink:
    """A zstd-compressed copy with the SHA-256 of what went in, within a byte budget.

    Hashing and compressing run beside the reading thread, one thread each
    (:mod:`.offload`), once the core is known to be larger than a block and unless
    ``threads`` is 0; a small core is done in the reading thread, without threads to start.
    Compression is zstd's single-threaded streaming per frame: zstd's own workers
    (``threads`` > 1 asks for them, under the compressing thread) take their input by polling,
    and python-zstandard's feeding loop then spins a core while the worker compresses
    (measured here: the reading thread at 1.9 s of CPU per GiB instead of 0.7).

    A frame whose every byte arrived as a zero chunk is not compressed: its compressed bytes
    are the same for every such frame, made once per process (:func:`_zero_frame`). That is
    what a process that touched its memory once is made of, and its compression then costs
    nothing; its SHA-256 still reads every byte.
    """

    __slots__ = (
        "budget", "compressor", "context", "expected", "failed", "fd", "frame_left", "frame_start", "frames",
        "hasher", "level", "name", "offload", "over", "recheck", "size", "stored", "threads", "zeros", "zstd",
    )  # fmt: skip

    def __init__(
        self,
        fd: int,
        level: int,
        threads: int,
        budget: int,
        *,
        over: str = "spool is full (its quota was reached)",
        name: str = "vault",
        recheck: Callable[[], tuple[int, str]] | None = None,
    ) -> None:
        self.zstd = _zstd()
        self.fd = fd
        self.name = name
        self.budget = budget
        #: what the budget is (said when it is exceeded)
        self.over = over
        #: the room left now (and what limits it), asked again every RECHECK_EVERY stored bytes:
        #: dumps written at once (of one pod, or of all) then never overshoot it by more
        self.recheck = recheck
        self.size = 0
        self.stored = 0
        self.failed: str | None = None
        #: the core's size as its headers tell, when known before the first write; only the
        #: speed depends on it (see :meth:`_start`)
        self.expected: int | None = None
        self.level, self.threads = level, threads
        # made at the first write, when it may be known that the whole core is small
        self.hasher: _Hash | None = None
        self.context = self.compressor = None
        self.offload: offload.Offload | None = None
        #: (compressed, plain) size of each finished frame; plain bytes the current one still takes
        self.frames: list[tuple[int, int]] = []
        self.frame_left = seekable.FRAME_SIZE
        self.frame_start = 0
        #: zero bytes at the start of the current frame not given to the compressor yet
        self.zeros = 0

    def _start(self, whole: int | None) -> None:
        """The hasher and the compressor; ``whole`` is the core's size where it is known.

        A small core is hashed without loading OpenSSL (:mod:`corevault.hashing`) and compressed
        with tables sized for it (zstd's source size hint; the frame is the same format), which
        spares a crash ~1 ms of setting up level 3's full-size tables.
        """
        small = whole is not None and whole <= BLOCK
        self.hasher = hashing.sha256(whole)
        workers = 0 if small or self.threads < 2 else self.threads
        # A frame's 4 MiB in one window: with level 3's 2 MiB the streaming buffer wraps within
        # every frame and zstd takes its slower external-dictionary path (28 % of the compressing
        # thread in perf); the ratio is a little better too (4.96 against 4.89). A small core's
        # window is the one its size hint gives (the whole core): the level's own 2 MiB window
        # made the compressor allocate 2.9 MB (an mmap of its own) where 0.1 MB does
        window = {} if small else {"window_log": _FRAME_LOG}
        params = self.zstd.ZstdCompressionParameters.from_level(
            self.level,
            threads=workers,
            job_size=JOB_SIZE if workers else 0,
            source_size=whole if small else 0,
            write_checksum=True,
            write_content_size=False,
            **window,
        )
        self.context = self.zstd.ZstdCompressor(compression_params=params)
        if not small and self.threads:
            # imported here: a small core starts no threads, and _queue is an extension to load
            from corevault.capture import offload

            self.offload = offload.Offload([self._hash, self._compress], CHUNK, zero_chunk())

    def write(self, buf: bytearray, view: memoryview, n: int, zero: bool | None = None) -> None:
        """Take ``view[:n]`` (``zero``: known to be all zeros; None: not known)."""
        chunk = view[:n]
        if self.hasher is None:
            # a first write shorter than a block is the whole core: pump's first read is a block
            self._start(self.expected if self.expected is not None else n if n < BLOCK else None)
        if zero is None:
            zero = n == CHUNK and buf == zero_chunk()
        if self.offload is None:
            self.size += n
            self.hasher.update(chunk)
            self._compress(chunk, zero)
            return
        self._raise_failure()
        self.size += n
        self.offload.put(chunk, zero)

    def _hash(self, chunk: memoryview, zero: bool) -> None:
        self.hasher.update(chunk)

    def _raise_failure(self) -> None:
        if self.offload is not None:
            for error in self.offload.errors:
                if error is not None:
                    raise error

    def _compress(self, chunk: memoryview, zero: bool) -> None:
        """Compress ``chunk`` into the current frame(s): the compressing thread's step."""
        while chunk:
            take = min(len(chunk), self.frame_left)
            if zero and self.zeros == seekable.FRAME_SIZE - self.frame_left:
                self.zeros += take  # the frame is all zeros so far: maybe it stays so
            else:
                self._feed_zeros()
                self._out(self._compressor().compress(chunk[:take]))
            self.frame_left -= take
            chunk = chunk[take:]
            if not self.frame_left:
                self._end_frame()

    def _compressor(self):  # -> a zstandard compressobj
        if self.compressor is None:
            self.compressor = self.context.compressobj()
        return self.compressor

    def _feed_zeros(self) -> None:
        zeros = memoryview(zero_chunk()) if self.zeros else None
        while self.zeros:
            n = min(self.zeros, CHUNK)
            self._out(self._compressor().compress(zeros[:n]))
            self.zeros -= n

    def _end_frame(self) -> None:
        plain = seekable.FRAME_SIZE - self.frame_left
        if self.zeros == seekable.FRAME_SIZE:
            self._out(_zero_frame(self.context, self.level))
            self.zeros = 0
        else:
            self._feed_zeros()
            self._out(self._compressor().flush(self.zstd.COMPRESSOBJ_FLUSH_FINISH))
            self.compressor = None
        self.frames.append((self.stored - self.frame_start, plain))
        self.frame_start = self.stored
        self.frame_left = seekable.FRAME_SIZE

    def _out(self, data: bytes) -> None:
        if not data:
            return
        before = self.stored
        self.stored += len(data)
        if self.recheck is not None and self.stored // RECHECK_EVERY != before // RECHECK_EVERY:
            room, self.over = self.recheck()
            self.budget = before + room  # the room counts what this sink wrote already
        if self.stored > self.budget:
            raise SinkFailed(f"{self.over}; stopped after {self.stored} compressed bytes")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def finish(self) -> None:
        """Compress what is left, then the seek table; raises what failed on the way."""
        if self.hasher is None:  # an empty core
            self._start(0)
        if self.offload is not None:
            self.offload.close()
            self._raise_failure()
        if self.frame_left < seekable.FRAME_SIZE or not self.frames:  # the last frame (an empty core: one)
            self._end_frame()
        self._out(seekable.seek_table(self.frames))

    def close(self) -> None:
        """Stop the threads (their work left undone) and close the file."""
        if self.offload is not None:
            self.offload.close(abort=True)
        os.close(self.fd)

    @property
    def sha256(self) -> str:
        """The SHA-256 of every byte written (waits for the hashing thread)."""
        if self.offload is not None:
            self.offload.close()
        return self.hasher.hexdigest() if self.hasher is not None else hashing.sha256_hex(b"")


_ZERO_FRAMES: dict[int, bytes] = {}


def _zero_frame(context, level: int) -> bytes:  # context: a zstandard ZstdCompressor
    """A frame of :data:`seekable.FRAME_SIZE` zero bytes, compressed by ``context`` once per level."""
    if level not in _ZERO_FRAMES:
        compressor = context.compressobj()
        zeros = memoryview(zero_chunk())
        parts = [compressor.compress(zeros) for _ in range(seekable.FRAME_SIZE // CHUNK)]
        parts.append(compressor.flush(_zstd().COMPRESSOBJ_FLUSH_FINISH))
        _ZERO_FRAMES[level] = b"".join(parts)
    return _ZERO_FRAMES[level]


def enlarge_pipe(fd: int, size: int = CHUNK) -> None:
    """Give a pipe a buffer of at least ``size`` (or :data:`CHUNK`, when only root with
    CAP_SYS_RESOURCE may have more than ``fs.pipe-max-size``), so the kernel hands over more
    per wake-up. Never shrinks one. The agent's receiver asks for no more than a pipe's
    default for a forwarded core (:data:`corevault.agent.receiver.FORWARDED_PIPE` says why).
    """
    try:  # not a pipe: smaller reads still work
        if fcntl.fcntl(fd, _F_GETPIPE_SZ) >= size:
            return
        for want in dict.fromkeys((size, min(size, CHUNK))):
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, want)
                return
            except PermissionError:  # over pipe-max-size without CAP_SYS_RESOURCE
                pass
    except OSError:
        pass


def _all_zero(buf: bytearray, n: int) -> bool:
    """Whether ``buf[:n]`` is all zeros: one memcmp, which stops at the first other byte."""
    if n == len(buf):
        return buf == (zero_chunk() if n == CHUNK else _ZERO_BLOCK if n == BLOCK else bytes(n))
    # copies: once or twice per core (its second read, its end); a small core's one read is
    # compared with the zero block, so it never makes the 1 MiB zero chunk (an mmap of its own)
    return buf[:n] == (_ZERO_BLOCK if n <= BLOCK else zero_chunk())[:n]


def let_go(fd: int) -> None:
    """Put /dev/null in the place of ``fd``, the core's pipe or coredump socket, read to its end.

    The kernel holds the crashed process until that is done (with ``core_pipe_limit`` > 0, or
    ``COREDUMP_WAIT`` on the socket) and /proc/%P with it; after this it lets the process go,
    while the handler still finishes its copies from the bytes and fds it has. The fd number
    stays taken (by /dev/null), so whoever owns it closes it as before and no file opened
    later takes its place.
    """
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


class _Prefixed:
    """Reads ``head`` first, then the file descriptor."""

    __slots__ = ("fd", "head")

    def __init__(self, head: bytes, fd: int) -> None:
        self.head = memoryview(head)
        self.fd = fd

    def readinto(self, view: memoryview) -> int:
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return os.readv(self.fd, [view])

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.readinto(memoryview(buf))])


def pump(
    src_fd: int,
    sinks: list,
    limit: int | None,
    head: bytes = b"",
    taps: list[Window] | None = None,
    *,
    stalled: Callable[[], object] | None = None,
) -> tuple[int, bool]:
    """Copy ``head`` then ``src_fd`` into every sink until EOF or ``limit`` bytes; ``(bytes, truncated)``.

    A sink that raises is marked ``failed`` with the reason and left out from then on.
    ``taps`` see the same bytes but keep no stream going: once every sink has failed the
    reading stops, as the core has nowhere to go (a core is as large as its pod makes it).
    With ``stalled``, a read that times out (a socket's ``SO_RCVTIMEO``) calls it and reads on;
    without, it raises.
    """
    src = _Prefixed(head, src_fd)
    # The first read takes a block; a chunk's buffer comes once the core is larger: 1 MiB of
    # zeroed buffer costs ~2 ms of CPU, which a small core would pay for nothing.
    size = BLOCK
    buf = bytearray(size)
    view = memoryview(buf)
    total = 0
    live = list(sinks)
    taps = taps or []
    while live:
        # reads end on chunk boundaries, so a chunk never straddles two frames (see ZstdSink)
        want = size - total % size
        want = want if limit is None else min(want, limit - total)
        if want == 0:
            return total, bool(src.read(1))
        filled = 0
        while filled < want:
            try:
                got = src.readinto(view[filled:want])
            except BlockingIOError:
                if stalled is None:
                    raise
                stalled()
                continue
            if not got:
                break
            filled += got
        if filled == 0:
            return total, False
        total += filled
        # one memcmp says it for every sink (it stops at the first byte that is not zero)
        zero = _all_zero(buf, filled)
        for sink in list(live):
            try:
                sink.write(buf, view, filled, zero)
            except (OSError, SinkFailed) as e:
                sink.failed = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                live.remove(sink)
        for tap in taps:
            tap.write(buf, view, filled, zero)
        if filled < want:
            return total, False
        if size < CHUNK:
            size = CHUNK
            buf = bytearray(size)
            view = memoryview(buf)
    return total, False
