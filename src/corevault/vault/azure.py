"""Azure Blob Storage: ``az://CONTAINER/PREFIX`` (the account from ``[vault.azure] account_url``) or
``azure://ACCOUNT/CONTAINER/PREFIX``, through Microsoft's ``azure-storage-blob``.

A blob smaller than a block goes in one request (Put Blob) with its MD5, which the service
checks, and whose answer carries the MD5 the service computed of what it received: that is the
check. A larger file is uploaded as a block blob, one block of ``part_size`` at a time per worker (memory:
part_size x concurrency). Each block's id names its place and the MD5 of its bytes, and each
is sent with that MD5 (computed once, for both), which the service checks before it keeps the
block (a transactional checksum); the commit then names the blocks in order and the blob's
size is compared with the file's. An upload that was cut short (the agent killed, the store away) leaves its
blocks uncommitted on the blob for a week: the next attempt lists them and sends only the
blocks whose id is not there, so a multi-GiB core resumes instead of starting again.
Uncommitted blocks of an upload that is never retried are dropped by the service.

Credentials, first found: ``AZURE_STORAGE_CONNECTION_STRING`` (an account key, or the
Azurite emulator), else ``DefaultAzureCredential``, which covers Azure Workload Identity (the
``AZURE_FEDERATED_TOKEN_FILE``, ``AZURE_CLIENT_ID`` and ``AZURE_TENANT_ID`` that its webhook
injects into a pod whose ServiceAccount is annotated), managed identities and the CLI login.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from corevault.config import CloudSettings
from corevault.vault import s3proxy
from corevault.vault.blobs import BucketStore, Stored, StoreError, StreamBody, part_size

MAX_BLOCKS = 49_000  # the service's limit is 50,000 blocks a blob
#: a blob below this (and below a block) goes in one Put Blob: the SDK's max_single_put_size, set
SINGLE_PUT = 64 << 20


def block_id(index: int, md5: bytes) -> str:
    """A block's id: its place and the MD5 of its bytes (ids of one blob must all have the same length)."""
    return base64.b64encode(f"{index:06d}-{md5.hex()}".encode()).decode()


def _proxy_options(endpoint: str) -> dict:
    """The client's proxy, decided as every store decides it (:mod:`corevault.vault.s3proxy`):
    requests, the SDK's transport, would honour ALL_PROXY, which the other stores do not."""
    proxies, verify = s3proxy.requests_options(s3proxy.for_endpoint(None, endpoint))
    return {"use_env_settings": False, "proxies": proxies, "connection_verify": verify}


class AzureStore(BucketStore):
    """Blobs in an Azure Storage container, under an optional prefix."""

    def __init__(self, account_url: str | None, container: str, prefix: str, settings: CloudSettings) -> None:
        from azure.storage.blob import BlobServiceClient

        # A failed request is retried a few times, briefly: the agent's own loop retries an
        # entry with backoff, and a stop request must not wait behind minutes of SDK retries.
        options = {"retry_total": 3, "retry_backoff_max": 10, "connection_timeout": 20, "read_timeout": 120,
                   "max_single_put_size": SINGLE_PUT}  # fmt: skip
        # The SDK logs every request's headers at INFO, which the agent's log would drown in.
        logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
        connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection:
            where = BlobServiceClient.from_connection_string(connection).url  # parsed only, no request
            service = BlobServiceClient.from_connection_string(connection, **options, **_proxy_options(where))
        elif account_url:
            from azure.identity import DefaultAzureCredential

            service = BlobServiceClient(
                account_url, credential=DefaultAzureCredential(), **options, **_proxy_options(account_url)
            )
        else:
            raise StoreError(
                "an az:// store needs [vault.azure] account_url (or AZURE_STORAGE_CONNECTION_STRING)"
            )
        self.service = service  # owns the connections its container client uses
        self.container = service.get_container_client(container)
        self.prefix = prefix.strip("/")
        self.url = f"az://{container}/{self.prefix}".rstrip("/")
        self.part_size = settings.part_size
        self.concurrency = settings.concurrency
        #: bytes sent in blocks by this store object (what a resumed upload saves shows here)
        self.sent = 0

    def close(self) -> None:
        self.service.close()

    def _error(self, what: str, key: str, e: Exception) -> StoreError:
        return StoreError(f"cannot {what} {key} in {self.url}: {type(e).__name__}: {str(e).splitlines()[0]}")

    def _upload(self, key: str, f: BinaryIO, size: int) -> Stored:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        blob = self.container.get_blob_client(self._key(key))
        part = part_size(size, self.part_size, MAX_BLOCKS)
        if size < min(part, SINGLE_PUT):
            return self._put_whole(key, blob, f.read())
        try:
            try:
                staged = {b.id: b.size for b in blob.get_block_list("uncommitted")[1]}
            except ResourceNotFoundError:
                staged = {}
            ids: list[str] = []
            with ThreadPoolExecutor(self.concurrency) as pool:
                pending: list[Future] = []
                while data := f.read(part):
                    md5 = hashlib.md5(data).digest()  # noqa: S324 - the service's check, not security
                    bid = block_id(len(ids), md5)
                    ids.append(bid)
                    if staged.get(bid) == len(data):
                        continue  # sent by an earlier attempt, and checked by the service then
                    if len(pending) >= self.concurrency:  # at most `concurrency` blocks in memory
                        pending.pop(0).result()
                    pending.append(pool.submit(self._stage, blob, bid, data, md5))
                for p in pending:
                    p.result()
            blob.commit_block_list(ids)
            stored = blob.get_blob_properties().size
        except AzureError as e:
            raise self._error("upload", key, e) from None
        if stored != size:
            raise self._wrong(key, f"held {stored} bytes after uploading {size}")
        return Stored(key, size)

    def _put_whole(self, key: str, blob: object, data: bytes) -> Stored:
        """One Put Blob for a blob smaller than a block, sent with its MD5 (Content-MD5), which the
        service checks before it keeps the blob (Azurite too: "Md5Mismatch"). Its answer carries the
        MD5 the service computed of the bytes it received, and that is the check; only an answer
        without one is followed by a look at the blob's size."""
        from azure.core.exceptions import AzureError

        md5 = hashlib.md5(data).digest()  # noqa: S324 - the service's check, not security
        try:
            answer = blob.upload_blob(  # type: ignore[attr-defined]
                data,
                overwrite=True,
                length=len(data),
                headers={"Content-MD5": base64.b64encode(md5).decode()},
            )
            self.sent += len(data)
            stored = answer.get("content_md5")
            if stored is None:
                held = blob.get_blob_properties().size  # type: ignore[attr-defined]
        except AzureError as e:
            raise self._error("upload", key, e) from None
        if stored is None and held != len(data):
            raise self._wrong(key, f"held {held} bytes after uploading {len(data)}")
        if stored is not None and bytes(stored) != md5:
            theirs, ours = (base64.b64encode(d).decode() for d in (bytes(stored), md5))
            raise self._wrong(key, f"had the MD5 {theirs}, not the uploaded bytes' {ours}")
        return Stored(key, len(data))

    def _stage(self, blob: object, bid: str, data: bytes, md5: bytes) -> None:
        # The block goes with its MD5 (Content-MD5), which the service checks before keeping it.
        # It is the MD5 the block's id names: the SDK's validate_content would hash it again.
        blob.stage_block(  # type: ignore[attr-defined]
            bid, data, length=len(data), transactional_content_md5=md5
        )
        self.sent += len(data)

    def size(self, key: str) -> int | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            return self.container.get_blob_client(self._key(key)).get_blob_properties().size
        except ResourceNotFoundError:
            return None
        except AzureError as e:
            raise self._error("look at", key, e) from None

    def open(self, key: str, start: int = 0, length: int | None = None) -> BinaryIO:
        from azure.core.exceptions import AzureError

        try:
            download = self.container.get_blob_client(self._key(key)).download_blob(
                offset=start or None, length=length, max_concurrency=1
            )
            return StreamBody(download.chunks())  # type: ignore[return-value]
        except AzureError as e:
            raise self._error("read", key, e) from None

    def delete(self, key: str) -> None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            self.container.get_blob_client(self._key(key)).delete_blob()
        except ResourceNotFoundError:
            pass
        except AzureError as e:
            raise self._error("delete", key, e) from None

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        for blob in self.container.list_blobs(name_starts_with=self._key(prefix)):
            yield self._unprefixed(blob.name), blob.size
