"""Which blob store a URL names: the one place that chooses among the back-ends.

It sits above every back-end (:mod:`corevault.vault.blobs` for files and S3,
:mod:`corevault.vault.gcs`, :mod:`corevault.vault.azure`), which share their base in
:mod:`corevault.vault.blobs` and never import each other; only the SDK of the kind of store
a URL names is imported.
"""

from __future__ import annotations

from urllib.parse import urlparse

from corevault.config import CloudSettings, S3Settings, Settings
from corevault.vault import blobs

STORES = "file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or azure://account/container/prefix"


def open_store(
    url: str,
    s3: S3Settings | None = None,
    azure: CloudSettings | None = None,
    gcs: CloudSettings | None = None,
) -> blobs.BlobStore:
    """The store named by ``url``; only the SDK of that kind of store is imported."""
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.path:
        return blobs.FsStore(parsed.path)
    if parsed.scheme == "s3" and parsed.netloc:
        return blobs.S3Store(parsed.netloc, parsed.path, s3 or S3Settings())
    if parsed.scheme == "gs" and parsed.netloc:
        from corevault.vault.gcs import GcsStore

        return GcsStore(parsed.netloc, parsed.path, gcs or CloudSettings())
    if parsed.scheme == "az" and parsed.netloc:
        from corevault.vault.azure import AzureStore

        settings = azure or CloudSettings()
        return AzureStore(settings.endpoint, parsed.netloc, parsed.path, settings)
    if parsed.scheme == "azure" and parsed.netloc and parsed.path.strip("/"):
        from corevault.vault.azure import AzureStore

        container, _, prefix = parsed.path.strip("/").partition("/")
        account = f"https://{parsed.netloc}.blob.core.windows.net"
        return AzureStore(account, container, prefix, azure or CloudSettings())
    raise blobs.StoreError(f"unknown store {url!r}; use {STORES}")


def vault_store(settings: Settings) -> blobs.BlobStore:
    """The vault's store, as the settings name and configure it."""
    return open_store(settings.vault_store, settings.s3, settings.azure, settings.gcs)
