"""Crashes in the vault, as the command line (and later the server) uses them.

:class:`LocalVault` works on this machine's catalog and blob store; a remote client over
the corevault server's API offers the same methods, so every command works either way.
Forgetting a crash removes its blobs first and its rows last: a crash interrupted halfway
is still listed and can be forgotten again; a crash's binaries stay until no crash needs
them (:func:`corevault.vault.retention.vacuum`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol

from corevault import config, nodestore, objectid, seekable
from corevault.errors import NotFound
from corevault.vault import blobs, catalog, stores
from corevault.vault.catalog import Filters


def encode_cursor(values: tuple) -> str:
    """An opaque page cursor for the server's API: the sort key of a page's last row."""
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The sort key in a cursor; ValueError for anything :func:`encode_cursor` did not make."""
    import base64
    import binascii
    import json

    try:
        t, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(cursor) from None
    if isinstance(t, int) and not isinstance(t, bool) and isinstance(key, str):
        return t, key
    raise ValueError(cursor)


class CrashSource(Protocol):
    def list(self, filters: Filters, limit: int, before: tuple | None = None) -> list[dict]: ...
    def get(self, crash_id: str) -> dict: ...
    def groups(
        self, limit: int, *, state: str | None = None, search: str | None = None, new_in: str | None = None
    ) -> list[dict]: ...
    def group(self, signature: str) -> dict: ...
    def set_state(self, signature: str, change: dict, actor: str) -> dict: ...
    def open_core(self, crash_id: str) -> BinaryIO: ...
    def binary(self, crash_id: str, module: dict, dest: str) -> bool: ...
    def forget(self, crash_id: str) -> None: ...


def plain(stored: BinaryIO) -> BinaryIO:
    """A reader of the plain core over a stored (zstd) one; closing it closes both."""
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
        stored, read_size=1 << 20, read_across_frames=True, closefd=True
    )


def plain_range(store: blobs.BlobStore, crash: dict, start: int, end: int) -> BinaryIO:
    """The plain core of ``crash`` (its catalog row) from byte ``start``, to read up to ``end``.

    Of a seekable core only the frames that hold the range are fetched and decompressed; an
    older one is decompressed from its start and the bytes before ``start`` discarded."""
    key, size, stored_size = blobs.core_key(crash["id"]), crash["size"], crash["stored_size"]
    if (start or (size is not None and end < size - 1)) and stored_size:

        def read(offset: int, length: int) -> bytes:
            with store.open(key, offset, length) as f:
                return f.read()

        table = seekable.read_table(read, stored_size, size)
        if table is not None:
            return seekable.open_range(lambda at, length: store.open(key, at, length), table, start, end)
    reader = plain(store.open(key))
    left = start
    while left > 0 and (got := reader.read(min(left, 1 << 20))):
        left -= len(got)
    return reader


@functools.cache
def _per_thread() -> threading.local:
    """Each thread's decompressor and buffer of stored bytes, made once per thread: made anew for
    every frame (or download), their memory cost more page faults than decompressing took."""
    return threading.local()


class _Frames:
    """What the frame jobs of one download share: the stored core (a file of a local store is
    opened once and read with ``pread``, any other store with one ranged read per frame)."""

    def __init__(self, store: blobs.BlobStore, key: str) -> None:
        self.store, self.key = store, key
        local = getattr(store, "local_path", None)
        # closed when the last job lets go of it (a download cut short drops the jobs it never ran)
        self.file = open(local(key), "rb", buffering=0) if local is not None else None  # noqa: SIM115

    def read(self, offset: int, length: int, into: bytearray | None = None) -> memoryview | bytes:
        """``length`` stored bytes from ``offset``: into ``into`` (grown as needed) from a file."""
        if self.file is not None:
            if into is None:
                into = bytearray(length)
            elif len(into) < length:
                into.extend(bytes(length - len(into)))
            view = memoryview(into)[:length]
            got = os.preadv(self.file.fileno(), [view], offset)
        else:
            parts, got = [], 0
            with self.store.open(self.key, offset, length) as f:
                while got < length and (part := f.read(length - got)):
                    parts.append(part)
                    got += len(part)
            view = memoryview(b"".join(parts))
        if got != length:
            raise ValueError(f"{self.key} holds {offset + got} bytes, its seek table more")
        return view

    def unpack(self, offset: int, length: int, out: memoryview) -> None:
        """The frame of ``length`` stored bytes at ``offset``, decompressed into ``out``."""
        import zstandard

        mine = _per_thread()
        if not hasattr(mine, "unpacker"):
            mine.unpacker, mine.packed = zstandard.ZstdDecompressor(), bytearray()
        seekable.unpack_into(self.read(offset, length, mine.packed), out, mine.unpacker)


def plain_frames(
    store: blobs.BlobStore, crash: dict, start: int, end: int
) -> list[Callable[[bytearray], memoryview]] | None:
    """The plain core of ``crash`` from byte ``start`` to ``end`` (inclusive) as one job per frame
    of its seek table, in order: each reads its frame from the store, decompresses it into the
    buffer it is given (or a new one, when that is smaller than the frame) and returns its part of
    the range, a view of that buffer. The jobs are independent, so that frames may be decompressed
    in parallel; None when the core is not in the seekable format (then :func:`plain_range`
    decompresses it from the start). A frame that does not hold what its table says fails its
    job (ValueError)."""
    key, size, stored_size = blobs.core_key(crash["id"]), crash["size"], crash["stored_size"]
    if not stored_size or size is None or not 0 <= start <= end < size:
        return None
    frames = _Frames(store, key)
    table = seekable.read_table(lambda at, length: bytes(frames.read(at, length)), stored_size, size)
    if table is None:
        return None

    def job(i: int) -> Callable[[bytearray], memoryview]:
        def run(buf: bytearray) -> memoryview:
            plain_size = table.plain[i + 1] - table.plain[i]
            if len(buf) < plain_size:
                buf = bytearray(plain_size)
            out = memoryview(buf)
            frames.unpack(table.stored[i], table.stored[i + 1] - table.stored[i], out[:plain_size])
            return out[max(start - table.plain[i], 0) : min(end + 1 - table.plain[i], plain_size)]

        return run

    return [job(i) for i in range(table.frame_of(start), table.frame_of(end) + 1)]


class LocalVault:
    """The vault configured in this machine's settings."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.engine = catalog.connect(settings.catalog_url)
        self.store = stores.vault_store(settings)

    def close(self) -> None:
        """Close the catalog's pooled connections and the store's clients (the engine opens
        new ones if it is used again)."""
        self.engine.dispose()
        self.store.close()

    def list(self, filters: Filters, limit: int, before: tuple | None = None) -> list[dict]:
        with self.engine.connect() as conn:
            return catalog.list_crashes(conn, filters, limit, before)

    def get(self, crash_id: str) -> dict:
        with self.engine.connect() as conn:
            crash = catalog.get_crash(conn, crash_id)
        if crash is None:
            raise NotFound(f"no crash {crash_id!r} in the catalog; 'corevault list' shows the ids")
        return crash

    def groups(
        self, limit: int, *, state: str | None = None, search: str | None = None, new_in: str | None = None
    ) -> list[dict]:
        """Groups in the given states (default: open and regressed), matching ``search``."""
        from corevault.vault import lifecycle

        with self.engine.connect() as conn:
            return catalog.list_groups(
                conn, limit, states=lifecycle.parse_states(state), search=search, new_in=new_in
            )

    def group(self, signature: str) -> dict:
        """One group with its state, history and newest crashes (what the server's API returns)."""
        with self.engine.connect() as conn:
            group = catalog.group_detail(conn, signature)
        if group is None:
            raise NotFound(f"no crash group {signature!r}; 'corevault groups --state all' lists them")
        return group

    def set_state(self, signature: str, change: dict, actor: str) -> dict:
        """Move a group to a new state (``change``: state, resolved_in, until, crashes, comment)."""
        from corevault.vault import lifecycle

        self.group(signature)
        with self.engine.begin() as conn:
            lifecycle.change(conn, signature, lifecycle.Change(**change), actor)
        return self.group(signature)

    def open_core(self, crash_id: str) -> BinaryIO:
        """The crash's plain core, decompressed as it is read (forward seeks skip ahead)."""
        self.get(crash_id)
        return plain(self.store.open(blobs.core_key(crash_id)))

    def binary(self, crash_id: str, module: dict, dest: str) -> bool:
        """Copy the file a crash's ``module`` (from its record) names to ``dest``; False if not held."""
        local = nodestore.record_path(self.settings.buildid_dir, module)
        if local is not None:
            os.symlink(local, dest)
            return True
        if not objectid.is_object(module.get("key"), module.get("sha256")):
            return False
        key = blobs.object_key(module["key"], module["sha256"])
        if self.store.size(key) is None:
            return False
        blobs.copy_to_file(self.store, key, dest)
        return True

    def forget(self, crash_id: str) -> None:
        self.get(crash_id)
        self.remove(crash_id)

    def remove(self, crash_id: str) -> None:
        """Remove a crash's blobs, then its rows: cut short, it is still listed and removed again."""
        for key in (blobs.core_key(crash_id), blobs.meta_key(crash_id), blobs.report_key(crash_id)):
            self.store.delete(key)
        with self.engine.begin() as conn:
            catalog.forget(conn, crash_id)
