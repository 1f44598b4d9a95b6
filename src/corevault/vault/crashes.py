"""Crashes in the vault, as the command line (and later the server) uses them.

:class:`LocalVault` works on this machine's catalog and blob store; a remote client over
the corevault server's API offers the same methods, so every command works either way.
Forgetting a crash removes its blobs first and its rows last: a crash interrupted halfway
is still listed and can be forgotten again; a crash's binaries stay until no crash needs
them (:func:`corevault.vault.retention.vacuum`).
"""

from __future__ import annotations

import os
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


class LocalVault:
    """The vault configured in this machine's settings."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.engine = catalog.connect(settings.catalog_url)
        self.store = stores.vault_store(settings)

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
