"""The vault's object stores, each against a real server on 127.0.0.1: S3 (SeaweedFS), Azure
Blob Storage (Azurite) and Google Cloud Storage (fake-gcs-server).

The store contract (streamed multipart uploads checked against what the service reports,
byte-identical and ranged reads, idempotent re-uploads, deletion), uploads killed midway
and resumed with the parts the store holds, and abandoned uploads cleared run without root;
the agent's fault tests (killed mid-upload and resumed, the store down and back, two agents
racing, retention) use the real crashes of tests/test_vault.py, on every store.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from corevault import config
from corevault.config import CloudSettings
from corevault.vault import blobs, stores
from testbed import clouds, relay, servers, tamper
from tests.conftest import starts_servers

KINDS = ("s3", "azure", "gcs")
PART = 5 << 20  # S3's smallest part; a multiple of GCS's 256 KiB
RESUMED_PACE = 10 << 20  # bytes a second: the 48 MiB core of the killed agent's entry takes ~5 s
Server = clouds.Emulator | servers.Seaweed


@pytest.fixture(scope="module")
@starts_servers
def azurite() -> Iterator[clouds.Azurite]:
    with clouds.azurite() as server:
        old = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string
        try:
            yield server
        finally:
            if old is None:
                os.environ.pop("AZURE_STORAGE_CONNECTION_STRING", None)
            else:
                os.environ["AZURE_STORAGE_CONNECTION_STRING"] = old


@pytest.fixture(scope="module")
@starts_servers
def weed() -> Iterator[servers.Seaweed]:
    keys = {"AWS_ACCESS_KEY_ID": servers.KEY, "AWS_SECRET_ACCESS_KEY": servers.SECRET}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        with servers.seaweed() as w:
            yield w
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("kind", [pytest.param("s3", marks=pytest.mark.servers), "file"])
def test_the_older_stores_read_ranges_too(kind: str, tmp_path, request: pytest.FixtureRequest) -> None:
    from corevault.config import S3Settings

    if kind == "s3":
        weed = request.getfixturevalue("weed")
        s3 = S3Settings()
        s3.endpoint, s3.addressing, s3.part_size = weed.endpoint, "path", 5 << 20
        store = stores.open_store(f"s3://{weed.bucket}/ranges", s3)
    else:
        store = stores.open_store(f"file://{tmp_path}/vault")
    data = os.urandom(11 << 20)
    path = tmp_path / "core.zst"
    path.write_bytes(data)
    store.put_file("k", str(path))
    with store.open("k", (5 << 20) - 3, 10) as f:
        assert f.read() == data[(5 << 20) - 3 : (5 << 20) + 7]
    with store.open("k", len(data) - 5) as f:
        assert f.read() == data[-5:]
    assert [k for k, _ in store.keys("")] == ["k"]


@pytest.fixture(params=[pytest.param(k, marks=pytest.mark.servers) for k in KINDS])
def cloud(request: pytest.FixtureRequest) -> tuple[str, Server]:
    """A fresh container, bucket or (S3) prefix in the kind's server; (store URL, server)."""
    name = f"cv-{uuid.uuid4().hex[:12]}"
    if request.param == "s3":
        server = request.getfixturevalue("weed")
        return f"s3://{server.bucket}/{name}", server
    if request.param == "azure":
        server = request.getfixturevalue("azurite")
        server.create_container(name)
        return f"az://{name}/vault", server
    server = request.getfixturevalue("gcs")
    server.create_bucket(name)
    return f"gs://{name}/vault", server


def open_cloud(url: str, server: Server, concurrency: int = 2) -> blobs.BlobStore:
    from corevault.config import S3Settings

    settings, s3 = CloudSettings(), S3Settings()
    settings.part_size = s3.part_size = PART
    settings.concurrency = s3.concurrency = concurrency
    if isinstance(server, clouds.FakeGcs):
        settings.endpoint = server.endpoint
    if isinstance(server, servers.Seaweed):
        s3.endpoint, s3.addressing = server.endpoint, "path"
    return stores.open_store(url, s3=s3, azure=settings, gcs=settings)


def read_whole(store: blobs.BlobStore, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def test_a_closed_store_leaves_no_connection_to_its_server(cloud: tuple[str, Server]) -> None:
    """What a stopping server closes (corevault.vault.crashes.LocalVault.close): the store's clients."""
    url, server = cloud
    port = server.s3_port if isinstance(server, servers.Seaweed) else server.port
    before = servers.connections_to(port)  # the fixture's own clients'
    store = open_cloud(url, server)
    store.put_bytes("k", b"kept in the pool")
    assert read_whole(store, "k") == b"kept in the pool"  # the answer dropped, as a server drops it
    assert store.size("k") == len(b"kept in the pool")
    assert servers.connections_to(port) - before  # kept for the next request
    store.close()
    store.close()  # again, as corevault serve does once the app's shutdown closed it: harmless
    gc.collect()  # answers the clients' libraries dropped may hold a socket in a reference cycle
    assert servers.connections_to(port) - before == set()


def settings_lines(url: str, server: Server, through: relay.Relay | tamper.Tamper | None = None) -> str:
    """The [vault] settings of a node that uses this store (S3: ``through`` a relay, if given)."""
    if isinstance(server, servers.Seaweed):
        endpoint = through.endpoint if through else server.endpoint
        extra = f'[vault.s3]\nendpoint = "{endpoint}"\naddressing = "path"\npart_size = "5M"\n'
    elif isinstance(server, clouds.FakeGcs):
        extra = f'[vault.gcs]\nendpoint = "{server.endpoint}"\npart_size = "5M"\n'
    else:
        extra = '[vault.azure]\npart_size = "5M"\n'
    return f'[vault]\nstore = "{url}"\n' + extra


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_store_contract(cloud, tmp_path) -> None:
    url, server = cloud
    store = open_cloud(url, server)
    data = os.urandom(3 * PART + 12345)  # four parts, the last a short one
    path = tmp_path / "core.zst"
    path.write_bytes(data)
    assert store.put_file("crashes/x/core.zst", str(path)).size == len(data)
    assert store.size("crashes/x/core.zst") == len(data)
    with store.open("crashes/x/core.zst") as f:
        assert sha(f.read()) == sha(data)
    with store.open("crashes/x/core.zst", PART - 10, 100) as f:  # a range across a part's end
        assert f.read() == data[PART - 10 : PART + 90]
    with store.open("crashes/x/core.zst", len(data) - 7) as f:
        assert f.read() == data[-7:]
    store.put_bytes("crashes/x/meta.json", b'{"id": "x"}')
    assert sorted(store.keys("crashes/x/")) == [
        ("crashes/x/core.zst", len(data)),
        ("crashes/x/meta.json", 11),
    ]
    assert store.put_file("crashes/x/core.zst", str(path)).size == len(data)  # again: nothing changes
    with store.open("crashes/x/core.zst") as f:
        assert sha(f.read()) == sha(data)
    store.put_bytes("empty", b"")
    assert store.size("empty") == 0
    store.delete("crashes/x/core.zst")
    store.delete("crashes/x/core.zst")  # deleting what is gone is not an error (retention retries)
    assert store.size("crashes/x/core.zst") is None
    assert [k for k, _ in store.keys("crashes/")] == ["crashes/x/meta.json"]


KILLED_MIDWAY = """
import os, signal, sys
from corevault.config import CloudSettings, S3Settings
from corevault.vault import stores
settings, s3 = CloudSettings(), S3Settings()
settings.part_size = s3.part_size = {part}
settings.concurrency = s3.concurrency = {concurrency}
settings.endpoint = {gcs_endpoint!r}
s3.endpoint, s3.addressing = {s3_endpoint!r}, "path"
store = stores.open_store({url!r}, s3=s3, azure=settings, gcs=settings)
"""
KILL_AFTER = """
parts = [0]
def counted(real, report):
    def send(*args, **kw):
        if report:
            print(args[3][2], flush=True)  # a part's length, (file, start, length), as it is handed to the service
        result = real(*args, **kw)
        parts[0] += 1
        if parts[0] == {kill_at}:  # the agent dies with this many parts in the store
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return send
if hasattr(store, "uploads"):  # S3: killed as a part is stored, others perhaps in flight
    store.uploads._send_part = counted(store.uploads._send_part, True)
elif hasattr(store, "_stage"):  # Azure: killed as a block is stored
    store._stage = counted(store._stage, False)
else:  # GCS: killed between chunks (the emulator cannot say how much it holds)
    store._keep = counted(store._keep, False)
store.put_file("crashes/big/core.zst", {path!r})
"""


def kill_midway(url: str, server: Server, path: str, kill_at: int, concurrency: int) -> list[int]:
    """Upload ``path`` in a process killed after ``kill_at`` parts; the S3 parts' sizes it began to send."""
    script = KILLED_MIDWAY.format(
        part=PART,
        concurrency=concurrency,
        gcs_endpoint=server.endpoint if isinstance(server, clouds.FakeGcs) else None,
        s3_endpoint=server.endpoint if isinstance(server, servers.Seaweed) else None,
        url=url,
    ) + KILL_AFTER.format(path=path, kill_at=kill_at)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return [int(n) for n in killed.stdout.split()]


def test_an_upload_killed_midway_resumes_with_the_parts_the_store_holds(cloud, tmp_path) -> None:
    url, server = cloud
    data = os.urandom(6 * PART)
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(data)
    kill_at = (
        3 if isinstance(server, clouds.FakeGcs) else 2
    )  # GCS keeps its session once before the first chunk
    kill_midway(url, server, path, kill_at, concurrency=1)
    store = open_cloud(url, server)
    assert store.size("crashes/big/core.zst") is None  # nothing complete under the name
    store.put_file("crashes/big/core.zst", path)
    assert store.sent == len(data) - 2 * PART, "the two parts the store held were not sent again"
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)
    assert not os.path.exists(path + ".gcs-upload") and not os.path.exists(path + ".s3-upload")


KILLED_AFTER_COMPLETING = """
real = store.client.complete_multipart_upload
def complete(**kw):
    real(**kw)  # carried out by the service: the agent dies before it drops its kept session
    os.kill(os.getpid(), signal.SIGKILL)
store.client.complete_multipart_upload = complete
store.put_file("crashes/big/core.zst", {path!r})
"""


def test_an_s3_upload_completed_as_its_agent_died_is_not_sent_again(weed, tmp_path) -> None:
    url = f"s3://{weed.bucket}/completed-{uuid.uuid4().hex[:8]}"
    data = os.urandom(3 * PART)
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(data)
    script = KILLED_MIDWAY.format(
        part=PART, concurrency=1, gcs_endpoint=None, s3_endpoint=weed.endpoint, url=url
    )
    killed = subprocess.run([sys.executable, "-c", script + KILLED_AFTER_COMPLETING.format(path=path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(path + ".s3-upload")  # kept, naming an upload the service has completed
    store = open_cloud(url, weed)
    assert store.put_file("crashes/big/core.zst", path).size == len(data)
    assert store.sent == 0, "the object the store held whole was sent again"
    assert not os.path.exists(path + ".s3-upload")
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)
    # A kept session whose upload was completed with other bytes of the same size: that object
    # is not taken for this file's, the file is uploaded anew.
    with open(path, "wb") as f:
        f.write(os.urandom(len(data)))
    subprocess.run([sys.executable, "-c", script + KILLED_AFTER_COMPLETING.format(path=path)], check=False)
    assert os.path.exists(path + ".s3-upload")
    with open(path, "wb") as f:
        f.write(data)
    store = open_cloud(url, weed)
    store.put_file("crashes/big/core.zst", path)
    assert store.sent == len(data)
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)


@functools.cache
def s3_client(endpoint: str) -> Any:
    """One client per endpoint: making one costs more than the requests a poll makes with it."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))  # fmt: skip


def list_uploads(server: servers.Seaweed, prefix: str) -> list[dict]:
    client = s3_client(server.endpoint)
    return client.list_multipart_uploads(Bucket=server.bucket, Prefix=prefix).get("Uploads", [])


def held_parts(server: servers.Seaweed, session_file: str) -> int:
    """How many parts the store holds of the upload kept in ``session_file`` (0: none kept yet)."""
    import json

    try:
        with open(session_file) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return 0
    client = s3_client(server.endpoint)
    name = kept["store"].split("/", 3)[3] + "/" + kept["key"]
    answer = client.list_parts(Bucket=server.bucket, Key=name, UploadId=kept["upload"])
    return len(answer.get("Parts", []))


def test_s3_resends_at_most_the_parts_in_flight_when_killed(weed, tmp_path) -> None:
    """Killed with two parts stored and two in flight, an upload sends again only those in flight."""
    concurrency = 2
    url = f"s3://{weed.bucket}/resend-{uuid.uuid4().hex[:8]}"
    data = os.urandom(9 * PART + 4321)  # ten parts, the last a short one
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(data)
    first = kill_midway(url, weed, path, kill_at=2, concurrency=concurrency)
    assert os.path.exists(path + ".s3-upload"), "the upload was not kept beside the file"
    assert len(list_uploads(weed, url.split("/", 3)[3] + "/")) == 1
    store = open_cloud(url, weed, concurrency)
    assert store.size("crashes/big/core.zst") is None
    store.put_file("crashes/big/core.zst", path)
    resent = sum(first) + store.sent - len(data)
    assert 0 <= resent <= PART * concurrency, (first, store.sent)
    assert store.sent <= len(data) - 2 * PART  # at least the two stored parts were kept
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)
    assert not os.path.exists(path + ".s3-upload")
    assert list_uploads(weed, url.split("/", 3)[3] + "/") == []  # completed, nothing left behind


def test_s3_upload_of_a_changed_file_is_not_taken_from_the_store(weed, tmp_path) -> None:
    """A part is reused only when the local bytes at its place hash to the store's ETag."""
    url = f"s3://{weed.bucket}/changed-{uuid.uuid4().hex[:8]}"
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * PART))
    kill_midway(url, weed, path, kill_at=2, concurrency=1)
    data = bytearray(open(path, "rb").read())  # noqa: SIM115
    data[PART + 7] ^= 0xFF  # the second stored part no longer matches the file
    with open(path, "wb") as f:
        f.write(data)
    store = open_cloud(url, weed, 1)
    store.put_file("crashes/big/core.zst", path)
    assert store.sent == 3 * PART  # parts 2, 3 and 4; part 1 was the file's own
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(bytes(data))


def test_abandoned_s3_uploads_are_aborted_and_only_this_vaults(weed, tmp_path) -> None:
    import time

    from corevault.vault import retention

    mine, other = (f"abandoned-{uuid.uuid4().hex[:8]}" for _ in range(2))
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PART))
    kill_midway(f"s3://{weed.bucket}/{mine}", weed, path, kill_at=1, concurrency=1)
    os.unlink(path + ".s3-upload")  # its spool entry is gone: nobody takes the upload up again
    kill_midway(f"s3://{weed.bucket}/{other}", weed, path, kill_at=1, concurrency=1)
    store = open_cloud(f"s3://{weed.bucket}/{mine}", weed)
    assert store.abort_abandoned(3600) == []  # younger than an hour: maybe an agent's upload in progress
    assert len(list_uploads(weed, mine + "/")) == 1
    settings = config.Settings(str(tmp_path))
    settings.vault_abandoned_days = 0.5 / 86400
    time.sleep(1)
    assert retention.abandoned(store, settings) == ["crashes/big/core.zst"]
    assert list_uploads(weed, mine + "/") == []
    assert len(list_uploads(weed, other + "/")) == 1, "another vault's upload in the same bucket was aborted"
    # The other vault's kept upload still resumes; once aborted, its next attempt starts anew.
    other_store = open_cloud(f"s3://{weed.bucket}/{other}", weed)
    other_store.abort_abandoned(0)
    other_store.put_file("crashes/big/core.zst", path)
    assert other_store.sent == 3 * PART
    with other_store.open("crashes/big/core.zst") as f, open(path, "rb") as local:
        assert sha(f.read()) == sha(local.read())


def test_an_old_s3_upload_taken_up_again_is_not_aborted_as_abandoned(weed, tmp_path) -> None:
    """The store's times are whole seconds (a part stored at 12.9 s reads 12.0), and under load
    each step here (a process that imports boto3, a new client) may take seconds: the cut-offs
    are placed between the times this test saw, a second off each, never as ages from now."""
    import time

    def until(when: float) -> None:
        while (left := when - time.time()) > 0:
            time.sleep(left)

    prefix = f"takenup-{uuid.uuid4().hex[:8]}"
    url = f"s3://{weed.bucket}/{prefix}"
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PART))
    kill_midway(url, weed, path, kill_at=1, concurrency=1)
    begun = time.time()  # the upload was begun before this ...
    until(begun + 4)
    taken_up = time.time()
    kill_midway(url, weed, path, kill_at=1, concurrency=1)  # ... and taken up again: a part sent after this
    sent = time.time()  # and before this
    assert len(list_uploads(weed, prefix + "/")) == 1
    store = open_cloud(url, weed)
    # begun before the cut-off, but a part came since (the part's time reads at most a second early)
    assert store.abort_abandoned(time.time() - (taken_up - 2)) == []
    until(sent + 1.5)
    assert store.abort_abandoned(time.time() - (sent + 1)) == ["crashes/big/core.zst"]  # nothing sent since
    assert list_uploads(weed, prefix + "/") == []


def test_the_file_store_clears_temporary_files_of_cut_writes(tmp_path) -> None:
    store = stores.open_store(f"file://{tmp_path}/vault")
    store.put_bytes("crashes/a/meta.json", b"{}")
    left = tmp_path / "vault" / "crashes" / "b" / "core.zst.4242.4243.tmp"  # an agent killed while writing
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    assert store.abort_abandoned(3600) == []
    os.utime(left, (0, 0))
    assert store.abort_abandoned(3600) == ["crashes/b/core.zst"]
    assert not left.exists() and store.size("crashes/a/meta.json") == 2


def test_the_file_store_keeps_a_files_holes_and_its_zeros_as_holes_and_its_bytes_as_they_are(
    tmp_path,
) -> None:
    """A pod's binary may be a 1 GiB hole (testbed/hostile.py): written out, it cost the vault's
    disk a GiB and the agent ~19 s an object, for nothing but zeros."""
    src = tmp_path / "binary"
    with open(src, "wb") as f:  # data, a hole, written zeros, data, a hole of 56 MiB, data
        f.write(os.urandom(100_000))
        f.seek(5 << 20)
        f.write(bytes(3 << 20) + b"x" * 5000)
        f.seek(64 << 20)
        f.write(b"tail")
    store = stores.open_store(f"file://{tmp_path}/vault")
    assert store.put_file("objects/k/s", str(src)).size == (64 << 20) + 4
    held = tmp_path / "vault" / "objects" / "k" / "s"
    assert held.stat().st_blocks * 512 < 1 << 20  # neither the hole nor the 3 MiB of zeros written
    with open(src, "rb") as a, open(held, "rb") as b:
        assert hashlib.file_digest(a, "sha256").digest() == hashlib.file_digest(b, "sha256").digest()
    store.put_bytes("crashes/c/core", b"abc" + bytes(3 << 20) + b"d")
    assert (tmp_path / "vault" / "crashes" / "c" / "core").read_bytes() == b"abc" + bytes(3 << 20) + b"d"
    store.put_bytes("crashes/c/empty", b"")
    assert store.size("crashes/c/empty") == 0


def test_the_file_store_keeps_every_byte_where_a_files_blocks_are_larger_than_its_holes(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python buffers a file by its ``st_blksize`` (NFS's is its wsize, up to 1 MiB): a read-ahead
    past a 4 KiB hole, then the look for the next extent (which moves the fd's offset), and the
    bytes after the read-ahead came from another place of the file."""
    import io

    from corevault.vault import blobs

    def big_blocks(path: str, mode: str = "r", buffering: int = -1) -> io.IOBase:
        return open(path, mode, buffering=1 << 16 if buffering == -1 else buffering)

    src = tmp_path / "binary"
    with open(src, "wb") as f:  # 4 KiB of data, a 4 KiB hole, 256 KiB of data, a hole, data
        f.write(os.urandom(4096))
        f.seek(8192)
        f.write(os.urandom(256 << 10))
        f.seek(1 << 20)
        f.write(os.urandom(4096))
    monkeypatch.setattr(blobs, "open", big_blocks, raising=False)
    store = stores.open_store(f"file://{tmp_path}/vault")
    store.put_file("objects/k/s", str(src))
    assert (tmp_path / "vault" / "objects" / "k" / "s").read_bytes() == src.read_bytes()


def test_a_bad_store_url_or_setting_is_one_clear_error(tmp_path) -> None:
    from corevault import config

    for url in ("gcs://b/p", "az://", "azure://account"):
        with pytest.raises(blobs.StoreError, match="unknown store"):
            stores.open_store(url)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[vault]\nstore = "gs://b/p"\n[vault.gcs]\npart_size = "100K"\n')
    with pytest.raises(config.ConfigError, match=r"\[vault.gcs\] part_size: at least 1M"):
        config.load(str(cfg))


# The agent against each store, with the real spool entries of tests/test_vault.py.
from tests.test_vault import (  # noqa: E402
    assert_vault_holds_spool_copies,
    big_entry,
    make_node,
    material,  # noqa: F401 - a fixture
    spool_sha,
    stored_sha,
    through_an_outage,
)


@pytest.mark.crash
def test_agent_ships_exactly_once_resumes_after_a_kill_and_retention_empties(cloud, material) -> None:  # noqa: F811
    url, server = cloud
    if isinstance(server, servers.Seaweed):
        # what the agents send to S3, counted on the wire; paced, so that the upload is still
        # under way when the test, polling the parts the store holds, stops the agent
        with relay.relay(server.s3_port, pace=RESUMED_PACE) as counted:
            killed_and_resumed(url, server, material, counted)
    else:
        killed_and_resumed(url, server, material, None)


def killed_and_resumed(url: str, server: Server, material: dict, counted: relay.Relay | None) -> None:  # noqa: F811
    import time

    from corevault import spool
    from corevault.agent.loop import Agent
    from corevault.vault import retention

    node = make_node(material, settings_lines(url, server, counted), "analyze = false\n")
    entry = big_entry(node, 48)
    digest = spool_sha(node, entry)
    session = os.path.join(spool.ready_dir(node.spool), entry, spool.CORE_NAME + ".s3-upload")
    agent = node.agent()
    deadline = time.monotonic() + 60
    if isinstance(server, servers.Seaweed):  # killed once the store holds three of the core's parts
        while held_parts(server, session) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        while not node.crashes() and time.monotonic() < deadline:
            time.sleep(0.05)  # the small entries are in: the big one is on its way
        time.sleep(0.2)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    assert entry in spool.entries(node.spool), "the agent was not killed mid-upload"
    held = held_parts(server, session) * PART if isinstance(server, servers.Seaweed) else 0
    # Killed in the middle of a chunk, fake-gcs-server appends the chunk sent again rather
    # than taking it from the offset given; the object's size and CRC32C then differ, it is
    # deleted and the next try uploads it anew. So a try or two more, each after its backoff.
    sent = 0
    for _ in range(4):
        again = Agent(node.settings)
        waiting = again.run(once=True)
        sent += getattr(again.vault.store if again.vault else None, "sent", 0)
        if waiting == 0:
            break
        time.sleep(2)
    if counted is not None:
        assert held >= 3 * PART and sent <= (48 << 20) - held, "parts the store held were sent again"
        # Everything both agents put on the wire, less every byte the vault holds, is what was
        # sent twice (the parts the killed agent had in flight) plus the requests' headers.
        stored = sum(size for _, size in node.vault().store.keys(""))
        twice = counted.settle() - stored
        assert 0 < twice <= 2 * PART + (256 << 10), f"{twice} bytes sent twice, more than the parts in flight"
    assert spool.entries(node.spool) == []
    ids = [r["id"] for r in node.crashes()]
    assert sorted(ids) == sorted([*material["ids"], entry]) and len(ids) == len(set(ids))
    assert_vault_holds_spool_copies(node, material)
    assert stored_sha(node, entry) == digest
    node.settings.retention_max_age_days = 1
    gone = retention.vacuum(node.vault(), node.settings, now=time.time() + 3 * 86400)
    assert sorted(gone["crashes"]) == sorted(ids)
    assert [k for k, _ in node.vault().store.keys("crashes/")] == []


@pytest.mark.crash
def test_the_store_down_mid_upload_then_back(cloud, material) -> None:  # noqa: F811
    from corevault import spool

    url, server = cloud
    node = make_node(material, settings_lines(url, server), "analyze = false\n")
    entry = big_entry(node, 96)  # seconds of uploading: the server goes away in the middle
    digest = spool_sha(node, entry)
    in_flight = []

    def stop() -> None:
        in_flight.append(entry in spool.entries(node.spool))
        server.stop()

    through_an_outage(node, stop, server.start, after=1.0)
    assert in_flight == [True]
    assert spool.entries(node.spool) == []
    ids = [r["id"] for r in node.crashes()]
    assert sorted(ids) == sorted([*material["ids"], entry]) and len(ids) == len(set(ids))
    assert stored_sha(node, entry) == digest


@pytest.mark.crash
def test_two_agents_race_on_one_spool(cloud, material) -> None:  # noqa: F811
    from corevault import spool

    url, server = cloud
    node = make_node(material, settings_lines(url, server), "analyze = false\n")
    extra = [big_entry(node, 2) for _ in range(6)]
    digests = {entry: spool_sha(node, entry) for entry in extra}
    agents = [node.agent("--once") for _ in range(2)]
    for a in agents:
        a.wait(timeout=300)
    assert spool.entries(node.spool) == []
    ids = [r["id"] for r in node.crashes()]
    assert sorted(ids) == sorted(material["ids"] + extra) and len(ids) == len(set(ids))
    assert {entry: stored_sha(node, entry) for entry in extra} == digests


def test_an_azure_block_goes_with_the_md5_its_id_names(azurite) -> None:
    """The block's MD5 is computed once, for its id and the service's check: a block whose bytes
    are not that MD5 (corrupted on the way) is refused rather than kept."""
    from azure.core.exceptions import HttpResponseError

    name = f"cv-{uuid.uuid4().hex[:12]}"
    azurite.create_container(name)
    store = stores.open_store(f"az://{name}/vault")
    blob = store.container.get_blob_client("vault/x")  # type: ignore[attr-defined]
    good = hashlib.md5(b"block").digest()  # noqa: S324
    store._stage(blob, "b1", b"block", good)  # type: ignore[attr-defined]
    with pytest.raises(HttpResponseError, match="Md5Mismatch|MD5"):
        store._stage(blob, "b2", b"bl0ck", good)  # type: ignore[attr-defined]
    assert [b.id for b in blob.get_block_list("uncommitted")[1]] == ["b1"]


def test_s3_without_flexible_checksums_sends_md5s_and_checks_the_etag(weed, tmp_path) -> None:
    """Stores such as OSS take no flexible checksums: each part goes with Content-MD5, the object's
    multipart ETag is compared, and a killed upload resumes the same way."""
    from corevault.config import S3Settings

    s3 = S3Settings()
    s3.endpoint, s3.addressing, s3.part_size, s3.checksums = weed.endpoint, "path", PART, "when_required"
    store = stores.open_store(f"s3://{weed.bucket}/md5-{uuid.uuid4().hex[:8]}", s3)
    data = os.urandom(2 * PART + 99)
    path = tmp_path / "core.zst"
    path.write_bytes(data)
    assert store.put_file("k", str(path)).size == len(data)
    assert store.put_bytes("small", b"hello").size == 5
    with store.open("k") as f:
        assert sha(f.read()) == sha(data)
    etag = store.client.head_object(Bucket=weed.bucket, Key=store._key("k"))["ETag"]  # type: ignore[attr-defined]
    assert etag.strip('"').endswith("-3")


@pytest.mark.servers
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_kept_session_that_cannot_be_taken_up_starts_anew(kind, tmp_path, request) -> None:
    """A session file that is garbage, names an upload the service does not know, is older than
    the service keeps sessions, or does not validate (a part size or a held count no upload of
    this file can have) never fails the upload nor waits to be cleared as abandoned: it is
    dropped and the upload starts anew at once."""
    import json
    import time

    if kind == "s3":
        server = request.getfixturevalue("weed")
        url, suffix = f"s3://{server.bucket}/kept-{uuid.uuid4().hex[:8]}", ".s3-upload"
    else:
        server = request.getfixturevalue("gcs")
        name = f"cv-{uuid.uuid4().hex[:12]}"
        server.create_bucket(name)
        url, suffix = f"gs://{name}/vault", ".gcs-upload"
    data = os.urandom(2 * PART)
    path = tmp_path / "core.zst"
    path.write_bytes(data)
    session = tmp_path / ("core.zst" + suffix)
    unknown = {"store": url, "key": "k", "size": len(data), "held": 0, "part": PART, "started": time.time()}
    if kind == "s3":
        unknown["upload"] = "no-such-upload"
    else:  # a session URL of this service that was never started, and one older than a week
        unknown["session"] = f"{server.endpoint}/upload/resumable/nothing"
        unknown["started"] = time.time() - 8 * 86400
    # Sessions this code could have written that do not validate: an S3 part size of 0 or
    # below (or too small for S3's 10,000 parts), a GCS count of held bytes outside the file.
    started = {"store": url, "key": "k", "size": len(data), "started": time.time()}
    if kind == "s3":
        s3 = open_cloud(url, server).client  # type: ignore[attr-defined]
        upload = s3.create_multipart_upload(Bucket=server.bucket, Key=f"{url.split('/', 3)[3]}/k")["UploadId"]
        corrupt = [{**started, "algorithm": "crc32", "upload": upload, "part": p} for p in (0, -PART, 1)]
    else:
        live = open_cloud(url, server).bucket.blob("vault/k").create_resumable_upload_session(size=len(data))  # type: ignore[attr-defined]
        corrupt = [{**started, "session": live, "held": h} for h in (-1, len(data), len(data) + PART)]
    for kept in (b"\x00garbage", json.dumps(unknown).encode(), *(json.dumps(c).encode() for c in corrupt)):
        session.write_bytes(kept)
        store = open_cloud(url, server)
        store.put_file("k", str(path))
        assert store.sent == len(data) and not session.exists()
        with store.open("k") as f:
            assert sha(f.read()) == sha(data)


def test_two_uploads_of_one_file_to_s3_take_turns(weed, tmp_path) -> None:
    """Two agents shipping crashes that map the same large binary upload one file at once: each
    holds the file's lock in turn, so they never share (and complete twice) one upload."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    prefix = f"turns-{uuid.uuid4().hex[:8]}"
    data = os.urandom(8 * PART)
    path = tmp_path / "binary"
    path.write_bytes(data)
    stores = [open_cloud(f"s3://{weed.bucket}/{prefix}", weed, concurrency=1) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stores[0].put_file, "buildid/k/sha", str(path))
        while not os.path.exists(f"{path}.s3-upload") and not first.done():
            time.sleep(0.001)  # the first upload is under way and kept: the second comes now
        second = pool.submit(stores[1].put_file, "buildid/k/sha", str(path))
        done = [first.result(), second.result()]
    assert [d.size for d in done] == [len(data), len(data)]
    assert list_uploads(weed, prefix + "/") == [] and not os.path.exists(f"{path}.s3-upload")
    with stores[0].open("buildid/k/sha") as f:
        assert sha(f.read()) == sha(data)


def test_the_agent_aborts_abandoned_uploads_without_retention_rules(weed, tmp_path) -> None:
    import time

    from corevault.agent.loop import Agent

    prefix = f"agent-{uuid.uuid4().hex[:8]}"
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(os.urandom(2 * PART))
    kill_midway(f"s3://{weed.bucket}/{prefix}", weed, path, kill_at=1, concurrency=1)
    assert len(list_uploads(weed, prefix + "/")) == 1
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/state"\n'
        + settings_lines(f"s3://{weed.bucket}/{prefix}", weed).replace(
            "[vault]\n", "[vault]\nabandoned_upload_days = 0.00001\n", 1
        )
        + '[agent]\nmetrics = ""\nanalyze = false\n'
    )
    settings = config.load(str(cfg))
    time.sleep(1)  # older than 0.00001 days (0.86 s)
    assert Agent(settings).run(once=True) == 0
    assert list_uploads(weed, prefix + "/") == []


def test_an_upload_kept_by_a_store_of_other_checksums_starts_anew(weed, tmp_path) -> None:
    """A node whose [vault.s3] checksums changed while an upload was cut short does not take that
    upload up: its parts were sent with the other checksum, which completing it would not name."""
    from corevault.config import S3Settings

    url = f"s3://{weed.bucket}/algo-{uuid.uuid4().hex[:8]}"
    data = os.urandom(4 * PART)
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(data)
    kill_midway(url, weed, path, kill_at=2, concurrency=1)  # CRC32 parts (the default)
    s3 = S3Settings()
    s3.endpoint, s3.addressing, s3.part_size, s3.checksums = weed.endpoint, "path", PART, "when_required"
    store = stores.open_store(url, s3)
    store.put_file("crashes/big/core.zst", path)
    assert store.sent == len(data), "parts sent with CRC32 were taken into an upload of MD5s"
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)
    etag = store.client.head_object(Bucket=weed.bucket, Key=store._key("crashes/big/core.zst"))["ETag"]  # type: ignore[attr-defined]
    assert etag.strip('"').endswith("-4") and not os.path.exists(path + ".s3-upload")


def test_an_s3_object_that_fails_the_final_check_is_deleted_and_shipped_again(weed) -> None:
    """The store ends up holding other bytes than the agent sent under a binary's name (a store
    that mangled them after it checked what it received): the check of what it holds (here the
    MD5 ETag of the store's answer, which no checksum echo vouches for, then the HEAD of the
    object) fails, the object is deleted, not left for the next pass to find in place and take as
    stored, and the next pass ships the crash and uploads that binary again, byte for byte the node's."""
    import boto3
    from botocore.config import Config

    from corevault import nodestore, objectid, spool
    from corevault.agent.loop import Agent
    from tests.conftest import FIXTURE_SPOOL
    from tests.nodes import make_node

    url = f"s3://{weed.bucket}/wrong-{uuid.uuid4().hex[:8]}"
    entry = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))[0]
    direct = boto3.client(
        "s3",
        endpoint_url=weed.endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    changed = []

    def mangling(request: tamper.Request, headers: dict[str, str]) -> None:
        """After the store kept a binary's upload, the object's first byte changed in the store,
        and the answer names the MD5 of what it now holds."""
        path = request.path.partition("?")[0]
        if request.method != "PUT" or "/buildid/" not in path or "partNumber" in request.path:
            return
        body = bytes([request.body[0] ^ 0xFF]) + request.body[1:]
        direct.put_object(Bucket=weed.bucket, Key=path.split("/", 2)[2], Body=body)
        headers.pop("ETag", None)
        headers["ETag"] = f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324
        changed.append(path)

    with tamper.tamper(weed.s3_port) as wire:
        wire.change_answer = mangling
        node = make_node(
            {"dir": FIXTURE_SPOOL, "ids": [entry]}, settings_lines(url, weed, wire), "analyze = false\n"
        )
        record = spool.read_meta(node.spool, entry)
        binaries = [
            blobs.object_key(m["key"], m["sha256"])
            for m in record["modules"]
            if objectid.is_object(m["key"], m["sha256"])
            and nodestore.record_path(node.settings.buildid_dir, m)
        ]
        assert binaries, "the fixture entry maps no binary the node kept"

        first = Agent(node.settings)
        store = first.connect().store
        assert first.run(once=True) == 1, "the entry was shipped over a wrong object"
        assert changed, "no upload of a binary was changed in the store"
        assert node.crashes() == []
        assert [store.size(key) for key in binaries] == [None] * len(binaries), "a wrong object was left"
        wire.change_answer = None

        assert Agent(node.settings).run(once=True) == 0
        assert [c["id"] for c in node.crashes()] == [record["id"]]
        for key in binaries:
            with store.open(key) as f:
                assert sha(f.read()) == key.rsplit("/", 1)[1], key  # the node's file, by its content hash
