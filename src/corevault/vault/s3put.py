"""The single-request PutObject of an object below the part size, through obstore.

Most shipped crashes are two small objects (``core.zst`` and ``meta.json``), each one PutObject,
and what the agent spends on a crash is mostly the client's fixed cost per request: boto3's is
about 2 ms of CPU for 80 KiB, obstore's (the Rust ``object_store`` crate) about a fifth of it
(``python -m bench.s3requests``). So this one request goes through obstore; everything else
(multipart uploads, HEADs, reads, deletes, listings, presigned URLs) stays on the store's botocore
client, and both take what they need from that one client, resolved once by botocore:

- *where*: the URL botocore makes for an object of the bucket (its endpoint, the region's, the
  addressing style ``auto`` chooses, path or virtual-hosted), read from a request it makes and
  is stopped from sending; the region it signs for;
- *who*: the credentials of the store's botocore session (``credentials_file``, the AWS_*
  variables, the whole chain, refreshed by botocore), handed over to obstore as its provider for
  a boto3 session would, and asked for again every second;
- *TLS*: certificates are checked against the CA bundle botocore checks them with (the one
  configured, ``AWS_CA_BUNDLE`` or ``ca_bundle``, else botocore's default, certifi's), which
  obstore adds to the system's roots; a system without roots of its own (the slim image) is
  no failure;
- *retries and timeouts*: the botocore client's: as many attempts (its ``max_attempts`` of 3
  retries makes 4; three here made the two clients give up on a failing store after different
  counts), its connect and read timeouts;
- *proxy*: the one the store decided for both clients (:mod:`corevault.vault.s3proxy`), never
  obstore's own reading of the environment.

obstore can send a SHA-256 of the body (``x-amz-checksum-sha256``; it offers no CRC32 and no
Content-MD5): the service checks the body against it before it keeps anything (SeaweedFS answers
BadDigest, as S3 does). Its answer gives the ETag alone (no echoed checksum, no encryption
header), so the check is the ETag where it is the MD5 of the bytes sent; any other ETag proves
nothing by itself (S3 under SSE-KMS makes it opaque) and the caller looks at the object with a
HEAD, which reports its SHA-256. Stores without flexible checksums (``checksums =
"when_required"``, OSS) need the Content-MD5, which obstore cannot send: they stay on botocore.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlparse

from corevault.vault import s3proxy

#: how long obstore keeps credentials before it asks the botocore session again, which hands
#: over its own (refreshed by botocore when they near their expiry, whatever their lifetime):
#: a call a second costs nothing, and credentials never outlive botocore's view of them by more
CREDENTIALS_TTL = timedelta(seconds=1)
#: a whole request's limit: botocore has none, only its connect and read timeouts (given to
#: obstore too); obstore's default 30 s would cut an 8 MiB object short on a slow link
REQUEST_TIMEOUT = "15min"


class Unavailable(Exception):
    """obstore cannot take this store's requests (no credentials): botocore keeps them."""


class PutFailed(Exception):
    """The request failed; the message is obstore's, on one line."""


class _Resolved(Exception):
    """Raised where botocore would send the probe request: it is not sent."""


def bucket_endpoint(client: Any, bucket: str) -> tuple[str, bool]:
    """The URL of ``bucket``'s objects as botocore makes it, and whether it is virtual-hosted.

    Read from a request for an object that botocore makes and is stopped from sending, so the
    endpoint, the region's address and the addressing style are botocore's own choice for the
    requests it sends, ``auto`` included (a presigned URL may name another: the global endpoint
    of AWS, whatever the region). Other requests of the client go on meanwhile, untouched.
    """
    probe = f"corevault-endpoint-probe-{uuid.uuid4().hex}"
    seen: list[str] = []

    def stop(request: Any, **_: Any) -> None:
        if urlparse(request.url).path.endswith("/" + probe):
            seen.append(request.url)
            raise _Resolved

    client.meta.events.register("before-send.s3.PutObject", stop)
    try:
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
    except _Resolved:
        pass
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", stop)
    url = urlparse(seen[0])
    base, tail = f"{url.scheme}://{url.netloc}", url.path.removesuffix("/" + probe)
    if tail.endswith("/" + bucket):
        return base + tail.removesuffix("/" + bucket), False
    return base + tail, True


def open_store(client: Any, bucket: str, session: Any, proxy: str | None = None) -> Any:
    """An obstore ``S3Store`` that reaches ``bucket`` where ``client`` does, through ``proxy`` (or
    none), with the credentials of ``session`` (the botocore session that made ``client``), its
    retries and timeouts; :class:`Unavailable` when the session finds no credentials (botocore
    then fails the request with its own word for it)."""
    from obstore.exceptions import BaseError
    from obstore.store import S3Store

    credentials = session.get_credentials()
    if credentials is None:
        raise Unavailable(f"no credentials for s3://{bucket}")
    endpoint, virtual = bucket_endpoint(client, bucket)
    options: dict[str, Any] = {
        **client_options(client.meta.config),
        **s3proxy.obstore_options(proxy, endpoint),
    }
    if endpoint.startswith("http://"):
        options["allow_http"] = True
    try:
        # always: where the system has no certificates of its own (a slim image without
        # ca-certificates), obstore's client cannot be built without one. They verify an
        # https:// proxy's certificate too, as botocore's client is told to (S3Store)
        with open(ca_bundle(session)) as f:
            options["root_certificate"] = f.read()
        return S3Store(
            bucket,
            endpoint=endpoint,
            virtual_hosted_style_request=virtual,
            region=client.meta.region_name,
            checksum_algorithm="sha256",
            credential_provider=partial(handed_over, credentials),
            client_options=options,
            retry_config={"max_retries": retries(client.meta.config)},
        )
    except (OSError, BaseError) as e:
        raise PutFailed(f"cannot reach {endpoint} with obstore: {error_text(e)}") from None


def ca_bundle(session: Any) -> str:
    """The CA bundle botocore verifies the store's certificates with: the configured one
    (``AWS_CA_BUNDLE``, ``ca_bundle``), else its default (certifi's)."""
    from botocore.httpsession import get_cert_path

    return os.path.expanduser(session.get_config_variable("ca_bundle") or get_cert_path(True))


def client_options(config: Any) -> dict[str, str]:
    """botocore's connect and read timeouts (seconds; 60 each unless configured) as obstore's."""
    return {
        "connect_timeout": f"{round(float(config.connect_timeout) * 1000)}ms",
        "read_timeout": f"{round(float(config.read_timeout) * 1000)}ms",
        "timeout": REQUEST_TIMEOUT,
    }


def retries(config: Any) -> int:
    """The retries of the botocore client's ``config`` after a first attempt: its attempts less one
    (botocore's ``standard`` mode makes 3 when no ``max_attempts`` is configured)."""
    return (config.retries or {}).get("total_max_attempts", 3) - 1


def handed_over(credentials: Any) -> dict:
    """botocore's credentials as obstore takes them, for :data:`CREDENTIALS_TTL`: what obstore's
    own provider for a boto3 session does, without importing boto3 (the store has none)."""
    frozen = credentials.get_frozen_credentials()  # refreshed by botocore when near their expiry
    return {
        "access_key_id": frozen.access_key,
        "secret_access_key": frozen.secret_key,
        "token": frozen.token,
        "expires_at": datetime.now(UTC) + CREDENTIALS_TTL,
    }


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
    """obstore's error as one line: what failed, and the innermost cause of its debug dump
    (``InvalidCertificate(UnknownIssuer)``, ``Connection refused``, a proxy's refused tunnel
    ``TunnelUnsuccessful``), which its message leaves out."""
    head, _, dump = " ".join(str(e).split()).partition(" Debug source: ")
    causes = re.findall(r'message: "([^"]+)"|error: (\w+)\( (\w+)|legacy::Error\( \w+, (\w+)', dump)
    if not causes:
        return head
    message, kind, detail, connect = causes[-1]
    return f"{head} ({message or connect or f'{kind}({detail})'})"
