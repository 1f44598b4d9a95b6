"""Uploads checked from the service's own answers, against real servers on 127.0.0.1.

S3 (SeaweedFS):
a single PutObject is one request: its answer echoes the CRC32 it was sent (once the service
has checked the body against it) or carries the MD5 of the body as the ETag, and that is the
check; an answer that proves nothing, and every object put in parts, is looked at with a HEAD.
The attacks change the body on its way (after it was hashed, before it was signed) or the
service's answer, and each would leave a wrong object in place without the check.

GCS (fake-gcs-server): the answers to an upload are the object's resource (size and CRC32C),
so no request follows the upload. Azure (Azurite): a blob smaller than a block is one Put Blob,
sent with its MD5 and answered with the MD5 the service computed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from corevault.config import S3Settings
from corevault.vault import blobs, s3put, s3upload, stores
from testbed import tamper, tls
from tests.test_stores import PART, azurite, open_cloud, weed  # noqa: F401 - the module's servers
from tests.waiting import wait_for

pytestmark = pytest.mark.servers
CHECKSUMS = ["when_supported", "when_required"]  # CRC32 per request, or Content-MD5 (OSS)


@pytest.fixture
def wire(weed) -> Iterator[tamper.Tamper]:  # noqa: F811
    """A proxy between the store's clients and SeaweedFS: what they send, as it is on the wire."""
    with tamper.tamper(weed.s3_port) as t:
        yield t


def open_s3(server: Any, checksums: str, endpoint: str | None = None) -> blobs.S3Store:
    s3 = S3Settings()
    s3.endpoint, s3.addressing, s3.part_size, s3.checksums = (
        endpoint or server.endpoint,
        "path",
        PART,
        checksums,
    )
    store = stores.open_store(f"s3://{server.bucket}/answers-{uuid.uuid4().hex[:8]}", s3)
    assert isinstance(store, blobs.S3Store)
    return store


def operation(request: tamper.Request) -> str:
    """The S3 operation of a request seen on the wire."""
    query = parse_qs(request.path.partition("?")[2], keep_blank_values=True)
    if request.method == "PUT":
        return "UploadPart" if "partNumber" in query else "PutObject"
    if request.method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    return {"HEAD": "HeadObject", "GET": "GetObject", "DELETE": "DeleteObject"}[request.method]


def operations(wire: tamper.Tamper) -> list[str]:
    return [operation(r) for r in wire.requests]


def on(op: str, change: Callable[..., None]) -> Callable[..., None]:
    """``change`` applied to the requests (or answers) of ``op`` alone."""
    return lambda request, *rest: change(request, *rest) if operation(request) == op else None


def _held(store: blobs.S3Store, key: str) -> bytes | None:
    if store.size(key) is None:
        return None
    with store.open(key) as f:
        return f.read()


def _header(headers: dict[str, str], name: str, value: str) -> None:
    for old in [k for k in headers if k.lower() == name.lower()]:
        del headers[old]
    headers[name] = value


# What a single PutObject carries: with flexible checksums it goes through obstore with the body's
# SHA-256; without (OSS), through boto3 with its Content-MD5.
CHECKSUM_HEADER = {"when_supported": "x-amz-checksum-sha256", "when_required": "Content-MD5"}


@pytest.mark.parametrize("checksums", CHECKSUMS)
def test_a_small_upload_is_one_request_and_one_in_parts_is_looked_at(weed, wire, checksums, tmp_path) -> None:  # noqa: F811
    store = open_s3(weed, checksums, wire.endpoint)
    data = os.urandom(80_000)
    assert store.put_bytes("crashes/x/core.zst", data).size == len(data)
    assert operations(wire) == ["PutObject"]
    sent = {k.lower(): v for k, v in wire.requests[0].headers.items()}
    digest = hashlib.sha256(data) if checksums == "when_supported" else hashlib.md5(data)  # noqa: S324
    assert sent[CHECKSUM_HEADER[checksums].lower()] == base64.b64encode(digest.digest()).decode()
    assert _held(store, "crashes/x/core.zst") == data

    wire.requests.clear()
    path = tmp_path / "core.zst"
    path.write_bytes(os.urandom(2 * PART + 5))
    store.put_file("crashes/y/core.zst", str(path))
    # no answer of the multipart calls gives the object's size: one HEAD after the completion
    assert operations(wire) == ["CreateMultipartUpload", "UploadPart", "UploadPart", "UploadPart",
                                "CompleteMultipartUpload", "HeadObject"]  # fmt: skip


@pytest.mark.parametrize("checksums", CHECKSUMS)
def test_seaweedfs_refuses_a_body_that_its_checksum_does_not_match(weed, wire, checksums) -> None:  # noqa: F811
    """The body changed after it was hashed and signed (a bit flipped on the way): the service
    checks it against the SHA-256 or Content-MD5 sent with it and refuses it (BadDigest; SeaweedFS
    does not compare the body with the signed x-amz-content-sha256); nothing is kept."""
    store = open_s3(weed, checksums, wire.endpoint)

    def flipped(request: tamper.Request) -> None:
        request.body = bytes([request.body[0] ^ 1]) + request.body[1:]

    wire.change_request = on("PutObject", flipped)
    with pytest.raises(blobs.StoreError, match="BadDigest"):
        store.put_bytes("k", os.urandom(4096))
    wire.change_request = None
    assert store.size("k") is None


@pytest.mark.parametrize("checksums", CHECKSUMS)
def test_a_checksum_changed_after_signing_is_refused_for_its_signature(weed, wire, checksums) -> None:  # noqa: F811
    """Both clients sign the checksum header they send (``x-amz-checksum-sha256``,
    ``Content-MD5``): one changed on the way fails the signature (SignatureDoesNotMatch) before
    any checksum is compared, so the attacks above change the body, which is not signed here."""
    store = open_s3(weed, checksums, wire.endpoint)
    header = CHECKSUM_HEADER[checksums]
    wrong = base64.b64encode(b"\1" * (32 if checksums == "when_supported" else 16)).decode()

    def replaced(request: tamper.Request) -> None:
        assert header.lower() in {k.lower() for k in request.headers}
        _header(request.headers, header, wrong)

    wire.change_request = on("PutObject", replaced)
    with pytest.raises(blobs.StoreError, match="SignatureDoesNotMatch"):
        store.put_bytes("k", os.urandom(4096))
    wire.change_request = None
    assert store.size("k") is None


@pytest.mark.parametrize("checksums", CHECKSUMS)
def test_an_answer_showing_other_bytes_deletes_the_object(weed, wire, checksums) -> None:  # noqa: F811
    """The answer names another MD5 as the ETag: boto3's answer says the object is not
    encrypted with a key of its own, so that proves other bytes and the object is deleted; obstore's
    says nothing of encryption, so the object is looked at first, and a HEAD that shows another
    SHA-256 deletes it. Either way a wrong object does not stay under the name."""
    store = open_s3(weed, checksums, wire.endpoint)
    other = os.urandom(100)
    etag = f'"{hashlib.md5(other).hexdigest()}"'  # noqa: S324
    sha256 = base64.b64encode(hashlib.sha256(other).digest()).decode()

    def lying(request: tamper.Request, headers: dict[str, str]) -> None:
        if operation(request) == "PutObject":
            _header(headers, "ETag", etag)
        elif operation(request) == "HeadObject" and "x-amz-checksum-sha256" in {k.lower() for k in headers}:
            _header(headers, "x-amz-checksum-sha256", sha256)

    wire.change_answer = lying
    with pytest.raises(blobs.StoreError, match="not the uploaded bytes'"):
        store.put_bytes("k", os.urandom(4096))
    wire.change_answer = None
    assert operations(wire)[-1] == "DeleteObject" and store.size("k") is None
    if checksums == "when_supported":
        assert operations(wire)[:3] == ["PutObject", "HeadObject", "DeleteObject"]


def test_an_other_etag_from_obstore_is_looked_at_and_the_head_decides(weed, wire) -> None:  # noqa: F811
    """obstore's answer carries no encryption header: an ETag that is not the body's MD5 may be
    S3's opaque one under SSE-KMS. The HEAD that follows reports the object's SHA-256; where that
    is the bytes sent, the object stays."""
    store = open_s3(weed, "when_supported", wire.endpoint)
    wire.change_answer = on("PutObject", lambda _, headers: _header(headers, "ETag", '"opaque"'))
    data = os.urandom(4096)
    assert store.put_bytes("k", data).size == len(data)
    assert operations(wire) == ["PutObject", "HeadObject"]
    wire.change_answer = None
    assert _held(store, "k") == data


@pytest.mark.parametrize("checksums", CHECKSUMS)
def test_an_answer_that_proves_nothing_is_followed_by_a_head(weed, wire, checksums) -> None:  # noqa: F811
    """A store that echoes no checksum and whose ETag is not an MD5 (S3 with SSE-KMS says so in
    its answer): the object is looked at, its size and checksum compared."""
    store = open_s3(weed, checksums, wire.endpoint)

    def kms(request: tamper.Request, headers: dict[str, str]) -> None:
        if operation(request) == "PutObject":
            headers.pop("x-amz-checksum-crc32", None)
            _header(headers, "ETag", '"opaque"')
            headers["x-amz-server-side-encryption"] = "aws:kms"

    wire.change_answer = kms
    data = os.urandom(4096)
    assert store.put_bytes("k", data).size == len(data)
    assert operations(wire) == ["PutObject", "HeadObject"]

    wire.requests.clear()

    def shorter(request: tamper.Request, headers: dict[str, str]) -> None:
        kms(request, headers)
        if operation(request) == "HeadObject":
            _header(headers, "Content-Length", "4095")

    wire.change_answer = shorter
    with pytest.raises(blobs.StoreError, match="held 4095 bytes after uploading 4096"):
        store.put_bytes("k", data)
    wire.change_answer = None
    assert operations(wire)[:2] == ["PutObject", "HeadObject"] and store.size("k") is None


def test_a_store_over_https_is_reached_only_with_its_certificate_trusted(weed, tmp_path, monkeypatch) -> None:  # noqa: F811
    """TLS is verified by both clients: without the store's certificate in botocore's CA bundle
    (``AWS_CA_BUNDLE``) the upload fails and nothing reaches the store; with it, the single
    request (obstore) and the HEAD (boto3) go through."""
    cert, key = tls.self_signed(str(tmp_path))
    data = os.urandom(4096)
    with tamper.tamper(weed.s3_port, tls=(cert, key)) as wire:
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        with pytest.raises(blobs.StoreError, match="(?i)certificate"):
            open_s3(weed, "when_supported", wire.endpoint).put_bytes("k", data)
        assert wire.requests == []

        monkeypatch.setenv("AWS_CA_BUNDLE", cert)
        store = open_s3(weed, "when_supported", wire.endpoint)
        assert store.put_bytes("k", data).size == len(data)
        assert store.size("k") == len(data)
        assert operations(wire) == ["PutObject", "HeadObject"]


@pytest.mark.parametrize(
    ("endpoint", "addressing", "region", "expected"),
    [
        ("http://127.0.0.1:9000", "path", None, ("http://127.0.0.1:9000", False)),
        ("http://127.0.0.1:9000", "auto", None, ("http://127.0.0.1:9000", False)),  # an IP: path
        ("https://s3.oss-cn-hangzhou.aliyuncs.com", "virtual", "oss-cn-hangzhou",
         ("https://corevault.s3.oss-cn-hangzhou.aliyuncs.com", True)),
        ("https://minio.example:9000/base", "path", None, ("https://minio.example:9000/base", False)),
        (None, "auto", "eu-west-1", ("https://corevault.s3.eu-west-1.amazonaws.com", True)),
        (None, "path", "eu-west-1", ("https://s3.eu-west-1.amazonaws.com", False)),
    ],
)  # fmt: skip
def test_obstore_reaches_the_bucket_where_botocore_does(
    endpoint, addressing, region, expected, monkeypatch
) -> None:
    """The single requests' URL is the one botocore makes for the settings (its endpoint rules
    choose the addressing ``auto`` means), read from a request it makes and is stopped from sending."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    s3 = S3Settings()
    s3.endpoint, s3.addressing, s3.region = endpoint, addressing, region
    store = stores.open_store("s3://corevault/prefix", s3)
    assert isinstance(store, blobs.S3Store)
    assert s3put.bucket_endpoint(store.client, "corevault") == expected


def test_which_etags_are_taken_for_the_md5_of_the_bytes() -> None:
    md5 = hashlib.md5(b"core").hexdigest()  # noqa: S324
    assert s3upload.md5_etag({"ETag": f'"{md5}"'}) == md5
    assert s3upload.md5_etag({"ETag": f'"{md5.upper()}"'}) == md5  # OSS answers in uppercase
    assert s3upload.md5_etag({"ETag": f'"{md5}"', "ServerSideEncryption": "AES256"}) == md5  # SSE-S3
    assert s3upload.md5_etag({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) is None
    assert s3upload.md5_etag({"ETag": f'"{md5}"', "SSECustomerAlgorithm": "AES256"}) is None
    assert s3upload.md5_etag({"ETag": f'"{md5}-2"'}) is None
    assert s3upload.md5_etag({"ETag": '"opaque"'}) is None
    assert s3upload.md5_etag({}) is None


def test_a_gcs_upload_is_checked_from_its_answers_alone(gcs, tmp_path) -> None:
    """One request for a small object, the session's and one per chunk for a large one: the
    size and CRC32C compared are those of the service's answers, and nothing is asked after."""
    name = f"cv-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    store = open_cloud(f"gs://{name}/vault", gcs)
    sent: list[str] = []
    bucket_reads: list[str] = []

    def answered(r: Any, *_: Any, **__: Any) -> None:
        sent.append(r.request.method)
        if r.request.method == "GET":
            bucket_reads.append(r.request.path_url.split("?")[0])

    # the client may share the store's session: each session hooked once, each answer counted once
    for session in {id(s): s for s in (store.client._http, store.http)}.values():  # type: ignore[attr-defined]
        session.hooks["response"].append(answered)
    # The library reads the bucket's resource once per client, on a thread of its own started by
    # the first request that names the bucket (its metadata for tracing spans): that read may be
    # answered before, during or after the upload. It is awaited here, so what follows is counted
    # alone.
    store.put_bytes("first", b"x")
    wait_for(lambda: "GET" in sent, timeout=30)
    assert sorted(sent) == ["GET", "POST"] and bucket_reads == [f"/storage/v1/b/{name}"], (sent, bucket_reads)
    sent.clear()
    data = os.urandom(4096)
    assert store.put_bytes("small", data).size == len(data)
    assert sent == ["POST"]
    sent.clear()
    path = tmp_path / "core.zst"
    path.write_bytes(os.urandom(2 * PART + 5))
    store.put_file("big", str(path))
    assert sent == ["POST", "PUT", "PUT", "PUT"]
    assert _held(store, "small") == data  # type: ignore[arg-type]


def on_the_wire(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[Any, Any], None] | None = None
) -> list[str]:
    """The methods of the HTTP requests the process sends from now on (Azure's SDK sends through
    requests); ``change(request, response)`` may edit each request before it goes and its answer."""
    import requests

    sent: list[str] = []
    send = requests.Session.send

    def counted(session: Any, request: Any, **kwargs: Any) -> Any:
        sent.append(request.method)
        if change is not None:
            change(request, None)
        response = send(session, request, **kwargs)
        if change is not None:
            change(request, response)
        return response

    monkeypatch.setattr(requests.Session, "send", counted)
    return sent


def open_azure(server: Any) -> blobs.BucketStore:
    name = f"cv-{uuid.uuid4().hex[:12]}"
    server.create_container(name)
    return open_cloud(f"az://{name}/vault", server)  # type: ignore[return-value]


def test_a_small_azure_blob_is_one_request_checked_from_its_answer(azurite, monkeypatch, tmp_path) -> None:  # noqa: F811
    store = open_azure(azurite)
    sent = on_the_wire(monkeypatch)
    data = os.urandom(80_000)
    assert store.put_bytes("crashes/x/core.zst", data).size == len(data)
    assert sent == ["PUT"]
    assert _held(store, "crashes/x/core.zst") == data  # type: ignore[arg-type]

    sent.clear()
    path = tmp_path / "core.zst"
    path.write_bytes(os.urandom(2 * PART + 5))
    store.put_file("crashes/y/core.zst", str(path))
    # the uncommitted blocks listed, three blocks, the commit, and the blob's size read
    assert sent == ["GET", "PUT", "PUT", "PUT", "PUT", "HEAD"]


def test_azure_refuses_a_changed_blob_and_deletes_one_answered_with_another_md5(azurite, monkeypatch) -> None:  # noqa: F811
    store = open_azure(azurite)

    def flipped(request: Any, response: Any) -> None:
        if response is None and request.method == "PUT":
            request.body = bytes([request.body[0] ^ 1]) + request.body[1:]

    on_the_wire(monkeypatch, flipped)
    with pytest.raises(blobs.StoreError, match="Md5Mismatch|MD5"):
        store.put_bytes("k", os.urandom(4096))
    monkeypatch.undo()
    assert store.size("k") is None

    other = base64.b64encode(hashlib.md5(b"other").digest()).decode()  # noqa: S324

    def another(request: Any, response: Any) -> None:
        if response is not None and request.method == "PUT":
            response.headers["Content-MD5"] = other

    on_the_wire(monkeypatch, another)
    with pytest.raises(blobs.StoreError, match=f"had the MD5 {other}"):
        store.put_bytes("k", os.urandom(4096))
    monkeypatch.undo()
    assert store.size("k") is None
