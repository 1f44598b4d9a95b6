"""Google Cloud Storage: ``gs://BUCKET/PREFIX``, through Google's ``google-cloud-storage``.

A file of at least one part is uploaded through a resumable upload session, one chunk of
``part_size`` at a time (memory: one chunk), hashed with CRC32C as it is read; the object
the service reports at the end must have the file's size and CRC32C. The session's URL is
kept beside the file (``<file>.gcs-upload``) until the upload is done, so that an agent
killed in the middle asks the service how much it holds and sends only the rest; a session
is good for a week, and one the service refuses is started again. Smaller files go in one request,
checked the same way.

The client library has no public way to take up a session it did not start, so the few
requests of the resumable protocol (a PUT of a byte range, a PUT asking for the status) are
made here with the library's own authorized session.

Credentials: Google's default chain: on GKE with Workload Identity, the metadata server;
elsewhere ``GOOGLE_APPLICATION_CREDENTIALS`` naming an external-account (workload identity
federation) or a service-account key file. With ``[vault.gcs] endpoint`` (an emulator)
and no ``GOOGLE_APPLICATION_CREDENTIALS``, requests go unauthenticated and no metadata
server is asked.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from typing import BinaryIO

from corevault.config import CloudSettings
from corevault.vault import s3proxy, sessions
from corevault.vault.blobs import BucketStore, Stored, StoreError, StreamBody

#: the service's address when ``[vault.gcs] endpoint`` names none
ENDPOINT = "https://storage.googleapis.com"
SESSION_SUFFIX = ".gcs-upload"
SESSION_LIFE = 7 * 86400  # the service forgets a resumable session a week after it began
QUANTUM = 256 << 10  # resumable chunks are multiples of this


class GcsStore(BucketStore):
    """Objects in a Cloud Storage bucket, under an optional prefix."""

    def __init__(self, bucket: str, prefix: str, settings: CloudSettings) -> None:
        import google.auth
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage

        options = {"api_endpoint": settings.endpoint} if settings.endpoint else None
        if settings.endpoint and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            # An emulator: no credential chain (it would ask a metadata server that is not there).
            credentials, project = AnonymousCredentials(), None
        else:
            try:
                credentials, project = google.auth.default()
            except DefaultCredentialsError as e:
                raise StoreError(f"no Google credentials for gs://{bucket}: {e}") from None
        # One session for the library's requests and the resumable ones made here, with the proxy
        # decided as every store decides it (requests would honour ALL_PROXY, which the others do not)
        self.http = AuthorizedSession(credentials)
        self.http.trust_env = False
        proxy = s3proxy.for_endpoint(None, settings.endpoint or ENDPOINT)
        self.http.proxies, self.http.verify = s3proxy.requests_options(proxy)
        self.client = storage.Client(
            project=settings.project or project or "corevault",
            credentials=credentials,
            client_options=options,
            _http=self.http,
        )
        self.bucket = self.client.bucket(bucket)
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}".rstrip("/")
        self.part_size = max(QUANTUM, settings.part_size // QUANTUM * QUANTUM)
        #: bytes sent by this store object (what a resumed upload saves shows here)
        self.sent = 0

    def close(self) -> None:
        self.http.close()
        self.client.close()

    def _error(self, what: str, key: str, e: Exception) -> StoreError:
        return StoreError(f"cannot {what} {key} in {self.url}: {type(e).__name__}: {str(e).splitlines()[0]}")

    def put_file(self, key: str, path: str) -> Stored:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self.part_size:
                return self._upload(key, f, size)
            return self._upload_resumable(key, f, size, path + SESSION_SUFFIX)

    def _upload(self, key: str, f: BinaryIO, size: int) -> Stored:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError  # credentials refused or unreachable
        from google.resumable_media import DataCorruption

        blob = self.bucket.blob(self._key(key))
        data = f.read()
        try:
            # The library sends the CRC32C and checks the one the service reports.
            blob.upload_from_file(io.BytesIO(data), size=size, checksum="crc32c")
        except DataCorruption as e:  # the library leaves the object it found wrong in place
            raise self._wrong(key, f"did not hold the bytes sent: {str(e).splitlines()[0]}") from None
        except (GoogleAPIError, GoogleAuthError, OSError) as e:
            raise self._error("upload", key, e) from None
        self.sent += size
        return self._check(key, blob.size, blob.crc32c, size, _crc32c(data))

    def _upload_resumable(self, key: str, f: BinaryIO, size: int, session_file: str) -> Stored:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError  # credentials refused or unreachable
        from requests import RequestException

        try:
            kept, offset = self._session(key, size, session_file)
            session = kept["session"]
            result: dict | None = None
            crc = _Crc32c()
            # What the service already holds is hashed from the local file, not sent again.
            done = 0
            while done < offset and (chunk := f.read(min(self.part_size, offset - done))):
                crc.update(chunk)
                done += len(chunk)
            while result is None:
                chunk = f.read(self.part_size)
                end = offset + len(chunk)
                response = self.http.put(
                    session, data=chunk, headers={"Content-Range": f"bytes {offset}-{end - 1}/{size}"}
                )
                self.sent += len(chunk)
                result, held = _answer(response)
                if result is None:
                    self._keep(session_file, kept, held)
                if result is None and held != end:  # the service kept less than was sent: go back
                    f.seek(held)
                    crc = _rehash(f, held)
                    offset = held
                    continue
                crc.update(chunk)
                offset = end
        except (GoogleAPIError, GoogleAuthError, RequestException, OSError) as e:
            raise self._error("upload", key, e) from None
        except StoreError:
            sessions.drop(session_file)  # the service refused the session: the next attempt starts anew
            raise
        sessions.drop(session_file)
        return self._check(key, int(result.get("size", -1)), result.get("crc32c"), size, crc.b64())

    def _session(self, key: str, size: int, session_file: str) -> tuple[dict, int]:
        """A session for this upload (the kept one) and how many bytes the service confirmed it holds.

        The count is the one the service gave in its last answer, kept beside the file: the
        next chunk starts there, and the service's answer to it says where it really stands
        (the loop goes back when it holds less). No status query is made first: the emulators
        finish the object on one. A session the service no longer knows fails that request,
        an object that is not the file's bytes is deleted, and the next attempt starts anew;
        one older than the week a session lives, or whose held count is not within the file, is
        dropped without asking.
        """
        kept = sessions.load(session_file, SESSION_LIFE, _valid, store=self.url, key=key, size=size)
        if kept is not None:
            return kept, kept["held"]
        session = self.bucket.blob(self._key(key)).create_resumable_upload_session(size=size, checksum=None)
        kept = {"store": self.url, "key": key, "size": size, "session": session}
        self._keep(session_file, kept, 0)
        return kept, 0

    def _keep(self, session_file: str, kept: dict, held: int) -> None:
        kept["held"] = held
        sessions.keep(session_file, kept)

    def _check(self, key: str, stored: int, crc: str | None, size: int, expected: str) -> Stored:
        if stored != size:
            raise self._wrong(key, f"held {stored} bytes after uploading {size}")
        if crc is not None and crc != expected:
            raise self._wrong(key, f"had the CRC32C {crc}, not the uploaded bytes' {expected}")
        return Stored(key, size)

    def size(self, key: str) -> int | None:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError  # credentials refused or unreachable

        try:
            blob = self.bucket.get_blob(self._key(key))
        except (GoogleAPIError, GoogleAuthError) as e:
            raise self._error("look at", key, e) from None
        return None if blob is None else blob.size

    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError  # credentials refused or unreachable

        end = None if length is None else start + length - 1
        try:
            reader = self.bucket.blob(self._key(key)).open("rb", chunk_size=4 << 20)
            reader.seek(start)
        except (GoogleAPIError, GoogleAuthError) as e:
            raise self._error("read", key, e) from None

        def chunks() -> Iterator[bytes]:
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = reader.read(1 << 20 if left is None else min(1 << 20, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

        return StreamBody(chunks(), reader.close)  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import GoogleAPIError, NotFound
        from google.auth.exceptions import GoogleAuthError  # credentials refused or unreachable

        try:
            self.bucket.blob(self._key(key)).delete()
        except NotFound:
            pass
        except (GoogleAPIError, GoogleAuthError) as e:
            raise self._error("delete", key, e) from None

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        for blob in self.client.list_blobs(self.bucket, prefix=self._key(prefix)):
            yield self._unprefixed(blob.name), blob.size


def _valid(kept: dict) -> bool:
    """Whether a kept session can be one of its file: a session URL, and a count of bytes the
    service holds within the file (a full file would have finished the upload)."""
    held = kept.get("held")
    return isinstance(kept.get("session"), str) and type(held) is int and 0 <= held < kept["size"]


class _Crc32c:
    def __init__(self) -> None:
        import google_crc32c

        self.checksum = google_crc32c.Checksum()

    def update(self, data: bytes) -> None:
        self.checksum.update(data)

    def b64(self) -> str:
        return base64.b64encode(self.checksum.digest()).decode()


def _crc32c(data: bytes) -> str:
    crc = _Crc32c()
    crc.update(data)
    return crc.b64()


def _rehash(f: BinaryIO, upto: int) -> _Crc32c:
    crc = _Crc32c()
    f.seek(0)
    done = 0
    while done < upto and (chunk := f.read(min(4 << 20, upto - done))):
        crc.update(chunk)
        done += len(chunk)
    return crc


def _answer(response: object) -> tuple[dict | None, int]:
    """A resumable PUT's answer: the finished object, or None and how many bytes the service holds."""
    status = response.status_code  # type: ignore[attr-defined]
    if status in (200, 201):
        return response.json(), -1  # type: ignore[attr-defined]
    if status == 308:
        held = response.headers.get("Range")  # type: ignore[attr-defined]
        return None, int(held.rpartition("-")[2]) + 1 if held else 0
    raise StoreError(f"resumable upload answered {status}: {response.text[:200]}")  # type: ignore[attr-defined]
