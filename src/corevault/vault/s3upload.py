"""S3 multipart uploads that an agent killed midway takes up again, and single uploads checked
from their own answer.

An object smaller than a part goes in one PutObject with its CRC32 (or Content-MD5), which the
service checks before it keeps the object; the answer then shows what it holds (:func:`shown`:
the CRC32 it echoes, or the ETag where that is the MD5 of the body), and only an answer that
shows neither has the caller look at the object.

boto3's transfer manager starts every upload afresh and cannot take up one it did not start,
so a file of at least one part goes up through the client's own multipart calls:

- the upload's id, with the key, size, part size and checksum it is for, is kept beside the
  file (``<file>.s3-upload``) as soon as the service gives it, before any part is sent (an
  upload begun with another checksum, before ``[vault.s3] checksums`` changed, cannot be
  completed with this one's: it is started anew, as is one whose part size no upload of the
  file can have);
- the next attempt (after a SIGKILL, a node drain, the store away) lists the parts the
  service holds and keeps each part whose size and ETag (the MD5 of its bytes) are those of
  the local file at that place, re-read and hashed now: a part is never taken on the
  service's word alone. Only the others are sent;
- parts go up ``concurrency`` at a time and none is held in memory: a part is read once in
  blocks for its checksum (the next one while the senders are busy), then sent from the file
  (the page cache) through its own descriptor. The agent's memory does not grow with the part size
  (16 MiB parts held whole, with botocore's copy of each, were about 50 MiB of its 141 MiB peak);
- each part carries its checksum (CRC32, or Content-MD5 for stores that take no flexible
  checksums, such as OSS), which the service checks before it keeps the part; the finished
  object must then report the file's size and the composite of the parts' checksums.

An upload the service no longer knows (completed, or aborted as abandoned) is started anew,
unless the object under its name already holds the file's bytes (its size, and the checksum
its parts make, re-read and hashed now): an agent killed after the service carried out its
completion, before it dropped the kept session, has nothing left to send.
One that is never taken up again (its spool entry gone) is aborted by :func:`abort_abandoned`
once older than ``[vault] abandoned_upload_days`` with no part sent for as long: one an agent
has taken up again and sends parts to, however old, is in progress.

While a file goes up, its descriptor holds an ``flock``: two uploads of one file (two agents
shipping crashes that map the same binary) take turns rather than share one upload id.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, BinaryIO

from corevault.vault import s3put, sessions

SESSION_SUFFIX = ".s3-upload"
MAX_PARTS = 10_000  # S3's limits on one multipart upload
MAX_PART = 5 << 30
#: what a part is read and hashed in
BLOCK = 1 << 20


class UploadGone(Exception):
    """The service no longer knows the multipart upload (completed or aborted)."""


def checksum(algorithm: str, data: bytes) -> bytes:
    """One part's digest: CRC32 (big-endian, as S3 reports it) or MD5."""
    if algorithm == "crc32":
        return zlib.crc32(data).to_bytes(4, "big")
    return hashlib.md5(data).digest()  # noqa: S324 - S3's ETag, not security


def reported(algorithm: str, digests: list[bytes], multipart: bool) -> str:
    """What the service reports for an object of these parts: ChecksumCRC32, or the ETag."""
    if algorithm == "crc32":
        if not multipart:
            return base64.b64encode(digests[0]).decode()
        combined = zlib.crc32(b"".join(digests)).to_bytes(4, "big")
        return base64.b64encode(combined).decode() + f"-{len(digests)}"
    if not multipart:
        return digests[0].hex()
    return hashlib.md5(b"".join(digests)).hexdigest() + f"-{len(digests)}"  # noqa: S324


def _checksum_args(algorithm: str, digest: bytes) -> dict[str, str]:
    # The part's own checksum goes with it: the service checks it, and botocore computes none.
    if algorithm == "crc32":
        return {"ChecksumCRC32": base64.b64encode(digest).decode()}
    return {"ContentMD5": base64.b64encode(digest).decode()}


def _valid(kept: dict) -> bool:
    """Whether a kept session can be an upload of its file: an upload id, and a part size
    that S3 takes (above 0, at most 5 GiB, the file in at most 10,000 parts)."""
    part, size = kept.get("part"), kept["size"]
    return (
        isinstance(kept.get("upload"), str)
        and bool(kept["upload"])
        and type(part) is int
        and 0 < part <= MAX_PART
        and -(-size // part) <= MAX_PARTS
    )


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


class MultipartUpload:
    """Uploads of one store: ``client`` into ``bucket``, parts checksummed with ``algorithm``."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        url: str,
        concurrency: int,
        algorithm: str,
        *,
        small: Callable[[], Any] | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.url = url
        self.concurrency = concurrency
        self.algorithm = algorithm
        #: bytes handed to the service in parts (what a resumed upload saves shows here)
        self.sent = 0
        self._count = threading.Lock()
        #: makes the obstore store of the single requests (:mod:`corevault.vault.s3put`) when the
        #: first is sent; None: they go through ``client``
        self.open_small = small
        self._small: Any = None
        self._opening = threading.Lock()

    def put(self, name: str, key: str, f: BinaryIO, size: int, *, part: int, session_file: str | None) -> str:
        """Upload ``size`` bytes of ``f`` as object ``name``; returns what the service must report.

        ``key`` is the store's key (what the kept session is checked against). With
        ``session_file``, the upload is kept there and taken up again by the next call.
        """
        from botocore.exceptions import ClientError

        if session_file is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the caller closes f
        expect = {"store": self.url, "key": key, "size": size, "algorithm": self.algorithm}
        kept = sessions.load(session_file, valid=_valid, **expect) if session_file else None
        held: dict[int, tuple[int, str]] = {}
        if kept is not None:
            try:
                held = dict(self._held(name, kept["upload"]))
                part = kept["part"]
            except UploadGone:
                expected = self._completed(name, f, size, kept["part"])
                if expected is not None:
                    if session_file is not None:
                        sessions.drop(session_file)
                    return expected
                kept = None
        if kept is None:
            extra = {"ChecksumAlgorithm": "CRC32"} if self.algorithm == "crc32" else {}
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=name, **extra)["UploadId"]
            kept = {**expect, "upload": upload, "part": part}
            if session_file is not None:
                try:
                    sessions.keep(session_file, kept)
                except OSError:
                    session_file = None  # nowhere to keep it: this upload cannot be resumed, only redone
        try:
            parts = self._send(name, kept["upload"], f, part, held)
            listed = [self._entry(number, etag, digest) for number, etag, digest in parts]
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=kept["upload"], MultipartUpload={"Parts": listed}
            )
        except ClientError as e:
            if _code(e) == "NoSuchUpload" and session_file is not None:
                sessions.drop(session_file)  # aborted meanwhile: the next attempt starts anew
            raise
        if session_file is not None:
            sessions.drop(session_file)
        return reported(self.algorithm, [digest for _, _, digest in parts], multipart=True)

    def _completed(self, name: str, f: BinaryIO, size: int, part: int) -> str | None:
        """What the service reports for ``f`` in parts of ``part`` bytes, if the object ``name``
        already holds exactly that (the file's bytes, re-read and hashed now); else None."""
        from botocore.exceptions import ClientError

        start, digests = f.tell(), []
        while (read := self._digest(f, part, md5=False))[0]:
            digests.append(read[1])
        f.seek(start)
        expected = reported(self.algorithm, digests, multipart=True)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return (
            expected if head["ContentLength"] == size and in_parts(head, self.algorithm) == expected else None
        )

    def _held(self, name: str, upload: str) -> Iterator[tuple[int, tuple[int, str]]]:
        """The parts the service holds of ``upload``: number -> (size, ETag)."""
        from botocore.exceptions import ClientError

        paginator = self.client.get_paginator("list_parts")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Key=name, UploadId=upload):
                for p in page.get("Parts", []):
                    yield p["PartNumber"], (p["Size"], p["ETag"].strip('"'))
        except ClientError as e:
            if _code(e) in ("NoSuchUpload", "404", "NotFound"):
                raise UploadGone(upload) from None
            raise

    def _send(
        self, name: str, upload: str, f: BinaryIO, part: int, held: dict[int, tuple[int, str]]
    ) -> list[tuple[int, str, bytes]]:
        """Every part of the file, in order: (number, ETag, checksum); sends those not held."""
        parts: list[tuple[int, str, bytes]] = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending: list[Future] = []
            number = 0
            while True:
                start = f.tell()  # the next part is hashed while the senders are busy: it is not held
                length, digest, md5 = self._digest(f, part, md5=number + 1 in held)
                if not length:
                    break
                number += 1
                size, etag = held.get(number, (-1, ""))
                if size == length and etag == md5:
                    # held by the service, and the local bytes at its place are the same
                    parts.append((number, etag, digest))
                    continue
                if len(pending) >= self.concurrency:  # sent when a sender is free for it
                    parts.append(pending.pop(0).result())
                span = (f, start, length)
                pending.append(pool.submit(self._send_part, name, upload, number, span, digest))
            for p in pending:
                parts.append(p.result())
        parts.sort()
        return parts

    def _digest(self, f: BinaryIO, length: int, *, md5: bool) -> tuple[int, bytes, str]:
        """Read up to ``length`` bytes of ``f`` in blocks: (bytes read, their checksum, their MD5
        in hex when ``md5``, else "")."""
        crc, hasher = 0, hashlib.md5() if md5 or self.algorithm != "crc32" else None  # noqa: S324
        buf = bytearray(min(BLOCK, length))
        view = memoryview(buf)
        n = 0
        while n < length and (got := f.readinto(view[: min(len(buf), length - n)])):  # type: ignore[attr-defined]
            n += got
            if self.algorithm == "crc32":
                crc = zlib.crc32(view[:got], crc)
            if hasher is not None:
                hasher.update(view[:got])
        if self.algorithm == "crc32":
            digest = crc.to_bytes(4, "big")
        else:
            digest = hasher.digest() if hasher is not None else b""
        return n, digest, hasher.hexdigest() if md5 and hasher is not None else ""

    def _send_part(
        self, name: str, upload: str, number: int, span: tuple[BinaryIO, int, int], digest: bytes
    ) -> tuple[int, str, bytes]:
        """Send part ``number``: the ``(file, start, length)`` of ``span``, with its checksum."""
        from s3transfer.utils import ReadFileChunk

        f, start, length = span
        with self._count:
            self.sent += length
        # The part's bytes come from the file again, through a descriptor of this sender's own
        # (the same open file, not the path: nothing can swap it) and s3transfer's reader of a
        # file's range, which botocore can rewind for a retry. Had they changed since they were
        # hashed, the service refuses the part for its checksum.
        with open(f"/proc/self/fd/{f.fileno()}", "rb") as own:
            own.seek(start)
            body = ReadFileChunk(own, length, start + length)
            answer = self.client.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=number, Body=body,
                **_checksum_args(self.algorithm, digest),
            )  # fmt: skip
        return number, answer["ETag"].strip('"'), digest

    def _entry(self, number: int, etag: str, digest: bytes) -> dict:
        """A part as the completing request names it."""
        entry: dict = {"PartNumber": number, "ETag": f'"{etag}"'}
        if self.algorithm == "crc32":
            entry["ChecksumCRC32"] = base64.b64encode(digest).decode()
        return entry

    def put_small(self, name: str, data: bytes) -> tuple[str, tuple[str, str] | None]:
        """One request for an object smaller than a part: what the service must report for it,
        and what the service's answer shows of the bytes it holds, as :func:`shown` gives it
        (None: the answer proves nothing, the object is to be looked at)."""
        digest = checksum(self.algorithm, data)
        expected = reported(self.algorithm, [digest], multipart=False)
        small = self._small_store()
        if small is not None:
            # obstore's answer names no encryption: an ETag that is not the MD5 of the bytes
            # proves nothing by itself (SSE-KMS), and the object is looked at
            seen = shown(s3put.put(small, name, data), self.algorithm, expected, data)
            return expected, seen if seen is not None and seen[0] == seen[1] else None
        checksums = _checksum_args(self.algorithm, digest)
        answer = self.client.put_object(Bucket=self.bucket, Key=name, Body=data, **checksums)
        return expected, shown(answer, self.algorithm, expected, data)

    def _small_store(self) -> Any:
        """obstore's store for the single requests, made at the first (None: they go through
        the botocore client)."""
        with self._opening:
            if self._small is None and self.open_small is not None:
                try:
                    self._small = self.open_small()
                except s3put.Unavailable:
                    self.open_small = None
            return self._small

    def close(self) -> None:
        """Let go of obstore's store: its client has no close, its connections go with it. Single
        requests go through the botocore client after this (closed too when the store is)."""
        with self._opening:
            self._small, self.open_small = None, None


def md5_etag(answer: dict) -> str | None:
    """The ETag of a PutObject's or HeadObject's answer when it is the MD5 of the object's
    bytes (lowercase hex), else None.

    S3 makes it the MD5 of a single request's body unless the object is encrypted with KMS or a
    customer's key (then it says so in the answer) or was put in parts (then it ends in
    ``-N``); OSS makes it the MD5 too, in uppercase. Anything else is opaque: not compared.
    """
    etag = answer.get("ETag", "").strip('"').lower()
    if answer.get("ServerSideEncryption", "AES256") != "AES256" or answer.get("SSECustomerAlgorithm"):
        return None
    return etag if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None


def in_parts(head: dict, algorithm: str) -> str | None:
    """What a HeadObject of an object put in parts reports of its bytes: its composite CRC32, or
    its multipart ETag (lowercase: OSS's is uppercase), or its MD5 ETag; None when it reports none."""
    if algorithm == "crc32":
        return head.get("ChecksumCRC32")
    etag = head.get("ETag", "").strip('"').lower()
    if "-" in etag and head.get("ServerSideEncryption", "AES256") == "AES256":
        return etag
    return md5_etag(head)


def shown(answer: dict, algorithm: str, expected: str, data: bytes) -> tuple[str, str] | None:
    """What the answer to a single PutObject (or a HeadObject of its object) shows of the bytes
    the service holds, and what it must be for them to be ``data``: (reported, required), or None
    when it shows nothing of them.

    The CRC32 first: a service echoes the ``x-amz-checksum-crc32`` it was sent only once it has
    checked the body against it (S3 refuses a body that does not match with BadDigest, and so does
    SeaweedFS, tried with a wrong checksum), or the SHA-256 of an object obstore put; then the ETag
    where it is the MD5 of the body, which the service computes itself from what it received.
    """
    if algorithm == "crc32" and answer.get("ChecksumCRC32"):
        return answer["ChecksumCRC32"], expected
    if answer.get("ChecksumSHA256"):  # an object obstore put (:mod:`corevault.vault.s3put`)
        return answer["ChecksumSHA256"], base64.b64encode(hashlib.sha256(data).digest()).decode()
    etag = md5_etag(answer)
    if etag is None:
        return None
    return etag, expected if algorithm != "crc32" else hashlib.md5(data).hexdigest()  # noqa: S324


def abort_abandoned(client: Any, bucket: str, prefix: str, older_than: datetime) -> list[str]:
    """Abort the multipart uploads under ``prefix`` started before ``older_than`` and sent no part
    since (an old upload an agent has taken up again is in progress, not abandoned); their keys."""
    aborted = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for u in page.get("Uploads", []):
            if u["Initiated"] < older_than and not _sent_since(client, bucket, u, older_than):
                client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                aborted.append(u["Key"])
    return aborted


def _sent_since(client: Any, bucket: str, upload: dict, since: datetime) -> bool:
    """Whether a part of ``upload`` was stored after ``since``."""
    pages = client.get_paginator("list_parts").paginate(
        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
    )
    return any(p["LastModified"] >= since for page in pages for p in page.get("Parts", []))
