"""The single-request PutObject of an object below the part size, through obstore.

Most shipped crashes are two small objects (``core.zst`` and ``meta.json``), each one PutObject,
and what the agent spends on a crash is mostly the client's fixed cost per request: boto3's is
about 2 ms of CPU for 80 KiB, obstore's (the Rust ``object_store`` crate) about a fifth of it
(``python -m bench.s3requests``). So this one request goes through obstore; everything else
(multipart uploads, HEADs, reads, deletes, listings, presigned URLs) stays on the store's boto3
client, and both take what they need from that one client, resolved once by botocore:

- *where*: the URL botocore makes for an object of the bucket (its endpoint, the region's, the
  addressing style ``auto`` chooses, path or virtual-hosted), read from a URL it signs, which
  sends nothing; the region it signs for;
- *who*: the credentials of the store's botocore session (``credentials_file``, the AWS_*
  variables, the whole chain, refreshed by botocore), handed over through obstore's provider for
  a boto3 session and asked for again every second;
- *TLS*: certificates are checked as botocore checks them, against its CA bundle where one is
  configured (``AWS_CA_BUNDLE``, ``ca_bundle``); obstore adds that bundle to its roots;
- *retries*: three attempts with backoff, as the boto3 client's ``standard`` mode.

obstore can send a SHA-256 of the body (``x-amz-checksum-sha256``; it offers no CRC32 and no
Content-MD5): the service checks the body against it before it keeps anything (SeaweedFS answers
BadDigest, as S3 does). Its answer gives the ETag alone (no echoed checksum, no encryption
header), so the check is the ETag where it is the MD5 of the bytes sent; any other ETag proves
nothing by itself (S3 under SSE-KMS makes it opaque) and the caller looks at the object with a
HEAD, which reports its SHA-256. Stores without flexible checksums (``checksums =
"when_required"``, OSS) need the Content-MD5, which obstore cannot send: they stay on boto3.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

#: how long obstore keeps credentials before it asks the botocore session again, which hands
#: over its own (refreshed by botocore when they near their expiry, whatever their lifetime):
#: a call a second costs nothing, and credentials never outlive botocore's view of them by more
CREDENTIALS_TTL = timedelta(seconds=1)
#: the boto3 client's ``standard`` retries: three attempts
RETRIES = 2
#: botocore's own timeouts (60 s to connect, 60 s per read); obstore's default 30 s for a
#: whole request would cut an 8 MiB object short on a slow link
TIMEOUTS = {"connect_timeout": "60s", "read_timeout": "60s", "timeout": "15min"}
PROBE_KEY = "k"


class Unavailable(Exception):
    """obstore cannot take this store's requests (no credentials): boto3 keeps them."""


class PutFailed(Exception):
    """The request failed; the message is obstore's, on one line."""


def bucket_endpoint(client: Any, bucket: str) -> tuple[str, bool]:
    """The URL of ``bucket``'s objects as botocore makes it, and whether it is virtual-hosted.

    Read from a URL botocore signs for an object (nothing is sent), so the endpoint, the region's
    address and the addressing style are botocore's own choice, ``auto`` included.
    """
    url = urlparse(
        client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": PROBE_KEY}, ExpiresIn=1)
    )
    base, tail = f"{url.scheme}://{url.netloc}", url.path.removesuffix("/" + PROBE_KEY)
    if tail.endswith("/" + bucket):
        return base + tail.removesuffix("/" + bucket), False
    return base + tail, True


def open_store(client: Any, bucket: str, session: Any) -> Any:
    """An obstore ``S3Store`` that reaches ``bucket`` where ``client`` does, with the credentials
    of ``session`` (the botocore session that made ``client``); :class:`Unavailable` when the
    session finds none (boto3 then fails the request with its own word for it)."""
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.exceptions import BaseError
    from obstore.store import S3Store

    if session.get_credentials() is None:
        raise Unavailable(f"no credentials for s3://{bucket}")
    endpoint, virtual = bucket_endpoint(client, bucket)
    options: dict[str, Any] = dict(TIMEOUTS)
    if endpoint.startswith("http://"):
        options["allow_http"] = True
    try:
        if bundle := session.get_config_variable("ca_bundle"):
            with open(os.path.expanduser(bundle)) as f:
                options["root_certificate"] = f.read()
        return S3Store(
            bucket,
            endpoint=endpoint,
            virtual_hosted_style_request=virtual,
            region=client.meta.region_name,
            checksum_algorithm="sha256",
            credential_provider=Boto3CredentialProvider(session, ttl=CREDENTIALS_TTL),
            client_options=options,
            retry_config={"max_retries": RETRIES},
        )
    except (OSError, BaseError) as e:
        raise PutFailed(f"cannot reach {endpoint} with obstore: {error_text(e)}") from None


def put(store: Any, name: str, data: bytes) -> dict:
    """Put ``data`` as object ``name`` in one request; the answer in boto3's shape (``ETag``)."""
    import obstore
    from obstore.exceptions import BaseError

    try:
        answer = obstore.put(store, name, data, use_multipart=False)
    except BaseError as e:
        raise PutFailed(error_text(e)) from None
    return {"ETag": answer["e_tag"] or ""}


def error_text(e: Exception) -> str:
    """obstore's error as one line (it spans several: the request, the status, the XML body)."""
    return " ".join(str(e).split())[:600]
