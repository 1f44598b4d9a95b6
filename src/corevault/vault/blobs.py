"""Blob stores: where the vault keeps cores, metadata, reports and binaries.

Two back-ends behind one small interface:

- ``file:///path``: a local disk or a NAS/NFS mount. Writes replace a file whole through
  :mod:`corevault.atomic` (a temporary name, fsync and close checked, rename, directory fsync).
- ``s3://bucket/prefix``: any S3-compatible store through botocore (AWS S3, Alibaba OSS's
  S3 endpoint, MinIO, SeaweedFS), with multipart uploads of ``part_size`` parts; a single
  request's upload through obstore (:mod:`corevault.vault.s3put`).

S3 uploads go part by part through :mod:`corevault.vault.s3upload`, which checksums each
part as it reads it: CRC32 (``checksums = when_supported``: each part is sent with its
CRC32, the server checks it and reports the composite that we compare) or MD5 (stores
without flexible checksums: Content-MD5 per part and the multipart ETag), and which takes
up an upload that an agent killed midway left behind. ``put_file`` returns only once the
store has shown that it holds the bytes sent: an object below the part size goes in one
request whose answer is the check (the CRC32 the service echoes once it has checked the body,
or the ETag where that is the body's MD5), looked at with a HEAD only when that answer proves
nothing; an object in parts is looked at (its size and composite checksum). An object that
fails the check is deleted (every bucket store does so, :meth:`BucketStore._wrong`) and the
upload is retried.
Uploads that nobody takes up again are cleared by ``abort_abandoned`` (S3 aborts them; a
file store removes temporary files).

The base here (:class:`BlobStore`, :class:`BucketStore`, :class:`StreamBody`, the keys) is
shared by the other clouds' stores, :mod:`corevault.vault.gcs` and :mod:`corevault.vault.azure`;
:mod:`corevault.vault.stores` chooses the store a URL names.

Key layout (the same in every back-end; binaries by key and content, as the node's store
keeps them, see :mod:`corevault.objectid`)::

    crashes/<id>/core.zst    crashes/<id>/meta.json    crashes/<id>/report.json
    buildid/<key>/<sha256>             buildid/<build-id>/executable (kept before content hashes)
    buildid/<build-id>/<sha256>.debuginfo   (a separate debug file fetched from an upstream
                                             debuginfod for the object of that content)
    buildid/<build-id>/debuginfo   (one kept by build-id alone before content hashes: never served)
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, BinaryIO, Protocol

from corevault import atomic
from corevault.config import S3Settings
from corevault.errors import UserError
from corevault.vault import s3proxy, s3put, s3upload

#: how long a redirected download's URL is good for: the reader follows it at once
PRESIGNED_SECONDS = 60
MAX_PARTS = 9_500  # S3's limit is 10,000; a little room for rounding
MIB = 1 << 20


class StoreError(UserError):
    """The store cannot be reached or refused an operation; the message says which."""


def core_key(crash_id: str) -> str:
    return f"crashes/{crash_id}/core.zst"


def meta_key(crash_id: str) -> str:
    return f"crashes/{crash_id}/meta.json"


def report_key(crash_id: str) -> str:
    return f"crashes/{crash_id}/report.json"


def object_key(key: str, sha256: str) -> str:
    """Where a mapped object is kept; ``sha256`` "" names one stored before content hashes."""
    return f"buildid/{key}/{sha256 or 'executable'}"


def debuginfo_key(key: str, sha256: str) -> str:
    """Where the upstream debug file fetched for the object ``key``/``sha256`` is kept: given
    only to readers of a crash that mapped that very content."""
    return f"buildid/{key}/{sha256}.debuginfo"


def legacy_debuginfo_key(key: str) -> str:
    """Where an upstream debug file was kept by build-id alone (before content hashes): never
    served, deleted when a file for a content under it is kept or the key's objects go."""
    return f"buildid/{key}/debuginfo"


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    size: int


class BlobStore(Protocol):
    url: str

    def put_file(self, key: str, path: str) -> Stored: ...
    def put_bytes(self, key: str, data: bytes) -> Stored: ...
    def size(self, key: str) -> int | None: ...
    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        """The blob's bytes from ``start`` (``length`` of them, or to the end), streamed."""
        ...

    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> Iterator[tuple[str, int]]: ...
    def abort_abandoned(self, older_than: float) -> list[str]:
        """Clear the unfinished uploads begun more than ``older_than`` seconds ago; their keys."""
        ...

    def close(self) -> None:
        """Let go of the client's connections (the store is not used after)."""
        ...


def part_size(size: int, minimum: int, max_parts: int) -> int:
    """Parts of ``minimum`` bytes, or larger (whole MiB) where the store's part count would run out."""
    needed = -(-size // max_parts)  # bytes per part, rounded up
    return max(minimum, -(-needed // MIB) * MIB)


class StreamBody(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a streamed download)."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], object] | None = None) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.pending:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.pending = chunk
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        super().close()


#: a blob is written in chunks of this many bytes; one of zeros alone is left a hole
FS_CHUNK = 1 << 20


class FsStore:
    """Blobs as files under a directory (local disk or a NAS mount).

    What reads as zeros is not written but skipped over, leaving a hole that reads back as the
    same zeros: the holes of a sparse file put here are not even read (``SEEK_DATA``), and a
    chunk of zeros read is not written. A binary may be mostly holes (a pod's may be a 1 GiB
    table of nothing, as testbed/hostile.py's are); writing those out cost the disk their size
    and the agent the time to write it (tests/test_isolation.py's hostile ELF test).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.url = "file://" + root

    def close(self) -> None:
        pass  # each call opens and closes its own files

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"refusing key {key!r}")
        return os.path.join(self.root, key)

    def put_file(self, key: str, path: str) -> Stored:
        # unbuffered: finding the next extent moves the fd's offset (SEEK_DATA), under a buffered
        # reader that would serve a seek from its read-ahead and then read on from that offset
        # (the bytes of another place, wherever a file's blocks, st_blksize, are larger than its
        # holes: NFS's are its wsize)
        with open(path, "rb", buffering=0) as src:
            size = os.fstat(src.fileno()).st_size
            return self._write(key, src, size, _data_extents(src.fileno(), size))

    def put_bytes(self, key: str, data: bytes) -> Stored:
        return self._write(key, io.BytesIO(data), len(data), [(0, len(data))])

    def _write(self, key: str, src: BinaryIO, size: int, extents: Iterable[tuple[int, int]]) -> Stored:
        """Write the ``size`` bytes of ``src``, of which only ``extents`` (start, end) may hold data."""
        dest = self._path(key)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        zeros = bytes(FS_CHUNK)
        try:
            with atomic.replacing(dest) as out:
                for start, end in extents:
                    src.seek(start)
                    at = start
                    while at < end and (chunk := src.read(min(FS_CHUNK, end - at))):
                        if chunk != zeros[: len(chunk)]:
                            out.seek(at)
                            out.write(chunk)
                        at += len(chunk)
                out.truncate(size)  # holes up to the end, if the data ends before it
        except OSError as e:
            raise StoreError(f"cannot write {dest}: {e.strerror}") from None
        if os.path.getsize(dest) != size:
            raise StoreError(f"{dest} holds {os.path.getsize(dest)} bytes after writing {size}")
        return Stored(key, size)

    def local_path(self, key: str) -> str:
        """The file that holds the blob (which the server may have the kernel send)."""
        return self._path(key)

    def size(self, key: str) -> int | None:
        try:
            return os.path.getsize(self._path(key))
        except FileNotFoundError:
            return None

    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            raise StoreError(f"{key} is not in {self.url}") from None
        f.seek(start)
        if length is None:
            return f

        def chunks() -> Iterator[bytes]:
            left = length
            while left > 0 and (chunk := f.read(min(left, MIB))):
                left -= len(chunk)
                yield chunk

        return StreamBody(chunks(), f.close)  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        with suppress(OSError):
            os.unlink(self._path(key))
        with suppress(OSError):
            os.rmdir(os.path.dirname(self._path(key)))

    def abort_abandoned(self, older_than: float) -> list[str]:
        """Remove the temporary files of writes begun more than ``older_than`` seconds ago."""
        cutoff = time.time() - older_than
        removed = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                with suppress(OSError):
                    if atomic.target(name) and os.lstat(full).st_mtime < cutoff:
                        os.unlink(full)
                        removed.append(atomic.target(os.path.relpath(full, self.root)))
        return removed

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        for dirpath, _, files in os.walk(base):
            for name in files:
                if atomic.target(name):
                    continue  # a write under way, or one a kill left behind
                full = os.path.join(dirpath, name)
                yield os.path.relpath(full, self.root), os.path.getsize(full)


class BucketStore:
    """What the object stores share: keys under a prefix, uploads from a file or from bytes."""

    prefix = ""

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unprefixed(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def put_file(self, key: str, path: str) -> Stored:
        with open(path, "rb") as f:
            return self._upload(key, f, os.fstat(f.fileno()).st_size)

    def put_bytes(self, key: str, data: bytes) -> Stored:
        return self._upload(key, io.BytesIO(data), len(data))

    def _upload(self, key: str, f: BinaryIO, size: int) -> Stored:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def _wrong(self, key: str, why: str) -> StoreError:
        """The error for an upload whose object is not the bytes sent (``why``: its size or
        checksum), once that object is deleted: a wrong object never stays under a crash's or
        a binary's name, where the next pass would find it in place and take it as stored;
        the upload is tried again whole instead."""
        try:
            self.delete(key)
        except StoreError as e:
            why += f" (and deleting it failed: {e})"
        return StoreError(f"{self.url}/{key} {why}; it is uploaded again on the next pass")

    def abort_abandoned(self, older_than: float) -> list[str]:
        """Nothing to clear here: the service drops unfinished uploads itself.

        GCS forgets a resumable session a week after it began; Azure drops a blob's
        uncommitted blocks after seven days.
        """
        return []


class S3Store(BucketStore):
    """Blobs as objects in an S3-compatible bucket, under an optional prefix."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings) -> None:
        import botocore.session
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.part_size = settings.part_size
        self.checksums = settings.checksums
        if settings.credentials_file:
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = settings.credentials_file
        # One botocore session resolves the credentials and the CA bundle of its clients and of
        # obstore's (:mod:`corevault.vault.s3put`). The clients are botocore's own: boto3's layer
        # over them (its resources, its transfer methods) is used nowhere, and importing it and
        # making a client through it cost the agent's start 60-160 ms of CPU.
        session = botocore.session.Session()
        region = settings.region or "us-east-1"
        config = Config(
            s3={"addressing_style": settings.addressing},
            request_checksum_calculation=settings.checksums,
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=max(10, settings.concurrency * 2),
        )

        def client(proxy: str | None) -> Any:
            proxies = Config(**s3proxy.botocore_config(proxy, s3put.ca_bundle(session)))
            return session.create_client(
                "s3", endpoint_url=settings.endpoint, region_name=region, config=config.merge(proxies)
            )

        # One proxy (or none) for both clients, decided here: each would read the environment by
        # rules of its own (:mod:`corevault.vault.s3proxy`). It is decided for the endpoint that
        # botocore resolves, known once the client is made: the guess is right but for regions of
        # other domains (China's, amazonaws.com.cn), where the client is made again if need be.
        #: ``[vault.s3] proxy``: the decision for other addresses of the store (its public endpoint)
        self.proxy_setting = settings.proxy
        self.proxy = s3proxy.for_endpoint(settings.proxy, settings.endpoint or s3proxy.aws_endpoint(region))
        self.client = client(self.proxy)
        self.endpoint: str = self.client.meta.endpoint_url
        if (proxy := s3proxy.for_endpoint(settings.proxy, self.endpoint)) != self.proxy:
            self.proxy, self.client = proxy, client(proxy)
        # Presigned URLs name the address readers reach the store at; signing sends nothing.
        self.signer = self.client
        if settings.public_endpoint and settings.public_endpoint != settings.endpoint:
            self.signer = session.create_client(
                "s3", endpoint_url=settings.public_endpoint, region_name=region, config=config
            )
        self.concurrency = settings.concurrency
        algorithm = "crc32" if settings.checksums == "when_supported" else "md5"
        # a single request through obstore where it can send a checksum the store checks (it
        # sends no Content-MD5, which stores without flexible checksums need)
        small = (
            partial(s3put.open_store, self.client, bucket, session, self.proxy)
            if algorithm == "crc32"
            else None
        )
        self.uploads = s3upload.MultipartUpload(
            self.client, bucket, self.url, self.concurrency, algorithm, small=small
        )
        self.redirect_downloads = settings.redirect_downloads

    def close(self) -> None:
        """Close the clients' connection pools (a long-running server that stops lets go of them)."""
        self.uploads.close()
        self.client.close()
        if self.signer is not self.client:
            self.signer.close()

    def presign(self, key: str, encoding: str | None = None) -> str | None:
        """A URL that reads the object without credentials for :data:`PRESIGNED_SECONDS`, answered
        with ``Content-Encoding: encoding`` if given; None when downloads are not to be redirected
        (the store's endpoint is not the readers')."""
        if not self.redirect_downloads:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            where = {"Bucket": self.bucket, "Key": self._key(key)}
            if encoding is not None:
                where["ResponseContentEncoding"] = encoding
            return self.signer.generate_presigned_url("get_object", Params=where, ExpiresIn=PRESIGNED_SECONDS)
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"cannot sign a download of {key} from {self.url}: {e}") from None

    def put_file(self, key: str, path: str) -> Stored:
        with open(path, "rb") as f:
            return self._upload(key, f, os.fstat(f.fileno()).st_size, path + s3upload.SESSION_SUFFIX)

    def _upload(self, key: str, f: BinaryIO, size: int, session_file: str | None = None) -> Stored:
        """Upload and verify: a single request is checked from the service's own answer where that
        answer proves the bytes (:func:`s3upload.shown`), an object in parts, or one whose answer
        proves nothing, by a HEAD of the object (its size and checksum)."""
        from botocore.exceptions import BotoCoreError, ClientError

        part = part_size(size, self.part_size, MAX_PARTS)  # S3 takes at most 10,000 parts
        algorithm = self.uploads.algorithm
        try:
            if size < part:
                data = f.read()
                expected, answered = self.uploads.put_small(self._key(key), data)
                if answered is None:  # the answer proves nothing: the object is looked at
                    head = self._head(key, size)
                    answered = s3upload.shown(head, algorithm, expected, data)
            else:
                expected = self.uploads.put(
                    self._key(key), key, f, size, part=part, session_file=session_file
                )
                # No answer of the multipart calls gives the object's size: it is looked at.
                answered = s3upload.in_parts(self._head(key, size), algorithm), expected
        except (BotoCoreError, ClientError, s3put.PutFailed) as e:
            raise self._failed(f"cannot upload {key} to {self.url}", e) from None
        if answered is not None and answered[0] is not None and answered[0] != answered[1]:
            raise self._wrong(key, f"had the checksum {answered[0]}, not the uploaded bytes' {answered[1]}")
        return Stored(key, size)

    def _failed(self, what: str, error: Exception) -> StoreError:
        """``what`` failed: why, in one line, with what to do where the proxy, the credentials or the
        endpoint is the cause."""
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError

        why = s3proxy.explain(error, self.proxy, self.endpoint)
        if why is None and isinstance(error, NoCredentialsError):
            why = (
                f"{error}: set [vault.s3] credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE"
            )
        elif why is None and isinstance(error, EndpointConnectionError):
            why = f"{error}: check [vault.s3] endpoint and that the store is up"
        return StoreError(f"{what}: {why or error}")

    def _head(self, key: str, size: int) -> dict:
        """The object's HEAD, once its size is known to be ``size`` (else it is deleted)."""
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        if head["ContentLength"] != size:
            raise self._wrong(key, f"held {head['ContentLength']} bytes after uploading {size}")
        return head

    @property
    def sent(self) -> int:
        """Bytes sent in parts by this store object (what a resumed upload saves shows here)."""
        return self.uploads.sent

    def abort_abandoned(self, older_than: float) -> list[str]:
        """Abort this vault's multipart uploads begun more than ``older_than`` seconds ago."""
        from botocore.exceptions import BotoCoreError, ClientError

        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        try:
            return [
                self._unprefixed(k)
                for k in s3upload.abort_abandoned(self.client, self.bucket, self._key(""), cutoff)
            ]
        except (BotoCoreError, ClientError) as e:
            raise self._failed(f"cannot abort the abandoned uploads of {self.url}", e) from None

    def size(self, key: str) -> int | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._failed(f"cannot look at {key} in {self.url}", e) from None
        except BotoCoreError as e:
            raise self._failed(f"cannot reach {self.url}", e) from None

    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        end = "" if length is None else str(start + length - 1)
        ranged = {"Range": f"bytes={start}-{end}"} if start or length is not None else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **ranged)["Body"]
        except (BotoCoreError, ClientError) as e:
            raise self._failed(f"cannot read {key} from {self.url}", e) from None

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as e:
            raise self._failed(f"cannot delete {key} from {self.url}", e) from None

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for obj in page.get("Contents", []):
                yield self._unprefixed(obj["Key"]), obj["Size"]


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` ranges of the file that may hold data, its holes left out (all of it
    where the filesystem cannot tell)."""
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # nothing but a hole from ``at`` on
            yield at, size
            return
        yield start, end
        at = end


def copy_to_file(store: BlobStore, key: str, dest: str) -> int:
    """Stream one blob into a local file; returns its size."""
    with store.open(key) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        return out.tell()
