"""Whether the store answers the presigned URLs that downloads are redirected to.

With ``[vault.s3] redirect_downloads`` on, a binary's download is a 307 to a presigned URL of
the store, at ``public_endpoint`` (or ``endpoint``). Where that address does not answer as
the store (it resolves only inside the cluster, or another service listens there), nothing
fails loudly: libdebuginfod caches the failed fetch as an empty file and gdb prints ``??``.
So ``corevault serve`` fetches such a URL itself before it serves, and ``/healthz`` again
(at most once every :data:`EVERY` seconds), and says in one line what to set.

The URL fetched is that of one byte of an object the catalog names, as a reader would get
it; in a vault with no object yet, that of a key nobody wrote, which the store must answer
with its own "no such key" (or "access denied", for credentials that may not list the
bucket). A server that reaches the address is no proof that every reader does: readers
outside the cluster are the ones ``public_endpoint`` is for.
"""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa

from corevault.vault import blobs, s3proxy, tables
from corevault.vault.crashes import LocalVault

EVERY = 60.0  # seconds /healthz reuses the last answer for
TIMEOUT = 5.0
#: the codes of an S3 error document that only the store itself answers a missing key with
STORE_ANSWERS = ("<Code>NoSuchKey</Code>", "<Code>AccessDenied</Code>")


def problem(vault: LocalVault) -> str | None:
    """Why readers redirected to the store would not get their file, in one line; None if they would."""
    store = vault.store
    presign = getattr(store, "presign", None)
    if presign is None:
        return None
    with vault.engine.connect() as conn:
        row = conn.execute(sa.select(tables.objects.c.key, tables.objects.c.sha256).limit(1)).first()
    key = blobs.object_key(row.key, row.sha256) if row else f"corevault-check/{uuid.uuid4().hex}"
    try:
        url = presign(key)
    except blobs.StoreError as e:
        return str(e)
    if url is None:
        return None  # downloads are not redirected
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.netloc}"
    # the proxy the store's own requests would take to that address, not the one httpx would
    # read from the variables by rules of its own (corevault.vault.s3proxy); the environment's
    # CA certificates (SSL_CERT_FILE, SSL_CERT_DIR) still count
    proxy = s3proxy.for_endpoint(getattr(store, "proxy_setting", None), url)
    verify = httpx.create_ssl_context(trust_env=True)
    try:
        with httpx.Client(proxy=proxy, trust_env=False, verify=verify, timeout=TIMEOUT) as client:
            response = client.get(url, headers={"Range": "bytes=0-0"})
    except httpx.HTTPError as e:
        why = f"{type(e).__name__}: {e}"
    else:
        body = response.text[:2000]
        if row is not None and response.status_code in (200, 206):
            return None
        if row is None and response.status_code in (403, 404) and any(a in body for a in STORE_ANSWERS):
            return None
        why = f"{response.status_code} {' '.join(body.split())[:120]!r}"
    return (
        f"downloads are redirected to {where}, which did not answer as the store ({why}): set "
        "[vault.s3] public_endpoint to the store's address as readers reach it, or "
        "redirect_downloads = false to have the server stream binaries itself"
    )


class Check:
    """:func:`problem`, asked again at most every ``every`` seconds (the health check's)."""

    def __init__(self, vault: LocalVault, every: float = EVERY) -> None:
        self.vault = vault
        self.every = every
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._answer: str | None = None

    def problem(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._at >= self.every:
                self._answer = problem(self.vault)
                self._at = time.monotonic()
            return self._answer
