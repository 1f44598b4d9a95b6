"""The clouds' object stores as vaults: Azure Blob Storage (Azurite) and Google Cloud Storage
(fake-gcs-server), both real emulators on 127.0.0.1.

The store contract (streamed multipart uploads checked against what the service reports,
byte-identical and ranged reads, idempotent re-uploads, deletion) runs without root; the
agent's fault tests (killed mid-upload and resumed, the store down and back, two agents
racing, retention) use the real crashes of tests/test_vault.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from corevault.config import CloudSettings
from corevault.vault import blobs
from testbed import clouds, servers

KINDS = ("azure", "gcs")
PART = 4 << 20


@pytest.fixture(scope="module")
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
def gcs() -> Iterator[clouds.FakeGcs]:
    with clouds.fake_gcs() as server:
        yield server


@pytest.fixture(scope="module")
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


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_the_older_stores_read_ranges_too(kind: str, tmp_path, request: pytest.FixtureRequest) -> None:
    from corevault.config import S3Settings

    if kind == "s3":
        weed = request.getfixturevalue("weed")
        s3 = S3Settings()
        s3.endpoint, s3.addressing, s3.part_size = weed.endpoint, "path", 5 << 20
        store = blobs.open_store(f"s3://{weed.bucket}/ranges", s3)
    else:
        store = blobs.open_store(f"file://{tmp_path}/vault")
    data = os.urandom(11 << 20)
    path = tmp_path / "core.zst"
    path.write_bytes(data)
    store.put_file("k", str(path))
    with store.open("k", (5 << 20) - 3, 10) as f:
        assert f.read() == data[(5 << 20) - 3 : (5 << 20) + 7]
    with store.open("k", len(data) - 5) as f:
        assert f.read() == data[-5:]
    assert [k for k, _ in store.keys("")] == ["k"]


@pytest.fixture(params=KINDS)
def cloud(request: pytest.FixtureRequest) -> tuple[str, clouds.Emulator]:
    """A fresh container or bucket in the kind's emulator; (store URL, emulator)."""
    name = f"cv-{uuid.uuid4().hex[:12]}"
    if request.param == "azure":
        server = request.getfixturevalue("azurite")
        server.create_container(name)
        return f"az://{name}/vault", server
    server = request.getfixturevalue("gcs")
    server.create_bucket(name)
    return f"gs://{name}/vault", server


def open_cloud(url: str, server: clouds.Emulator) -> blobs.BlobStore:
    settings = CloudSettings()
    settings.part_size = PART
    if isinstance(server, clouds.FakeGcs):
        settings.endpoint = server.endpoint
    return blobs.open_store(url, azure=settings, gcs=settings)


def settings_lines(url: str, server: clouds.Emulator) -> str:
    """The [vault] settings of a node that uses this store."""
    extra = (
        f'[vault.gcs]\nendpoint = "{server.endpoint}"\npart_size = "4M"\n'
        if isinstance(server, clouds.FakeGcs)
        else '[vault.azure]\npart_size = "4M"\n'
    )
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


KILL_AFTER_TWO_PARTS = """
import os, signal, sys
from corevault.config import CloudSettings
from corevault.vault import blobs
settings = CloudSettings()
settings.part_size = {part}
settings.endpoint = {endpoint!r}
settings.concurrency = 1
store = blobs.open_store({url!r}, azure=settings, gcs=settings)
parts = [0]
def counted(real):
    def send(*args, **kw):
        result = real(*args, **kw)
        parts[0] += 1
        if parts[0] == {kill_at}:  # the agent dies with two parts in the store
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return send
if hasattr(store, "_stage"):  # Azure: killed as a block is stored
    store._stage = counted(store._stage)
else:  # GCS: killed between chunks (the emulator cannot say how much it holds)
    store._keep = counted(store._keep)
store.put_file("crashes/big/core.zst", {path!r})
"""


def test_an_upload_killed_midway_resumes_with_the_parts_the_store_holds(cloud, tmp_path) -> None:
    url, server = cloud
    data = os.urandom(6 * PART)
    path = str(tmp_path / "core.zst")
    with open(path, "wb") as f:
        f.write(data)
    endpoint = server.endpoint if isinstance(server, clouds.FakeGcs) else None
    kill_at = 2 if endpoint is None else 3  # GCS keeps its session once before the first chunk
    script = KILL_AFTER_TWO_PARTS.format(part=PART, endpoint=endpoint, url=url, path=path, kill_at=kill_at)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = open_cloud(url, server)
    assert store.size("crashes/big/core.zst") is None  # nothing complete under the name
    store.put_file("crashes/big/core.zst", path)
    assert store.sent == len(data) - 2 * PART, "the two parts the store held were not sent again"
    with store.open("crashes/big/core.zst") as f:
        assert sha(f.read()) == sha(data)
    assert not os.path.exists(path + ".gcs-upload")


def test_a_bad_store_url_or_setting_is_one_clear_error(tmp_path) -> None:
    from corevault import config

    for url in ("gcs://b/p", "az://", "azure://account"):
        with pytest.raises(blobs.StoreError, match="unknown store"):
            blobs.open_store(url)
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
    import time

    from corevault import spool
    from corevault.agent.loop import Agent
    from corevault.vault import retention

    url, server = cloud
    node = make_node(material, settings_lines(url, server), "analyze = false\n")
    entry = big_entry(node, 48)
    digest = spool_sha(node, entry)
    agent = node.agent()
    deadline = time.monotonic() + 60
    while not node.crashes() and time.monotonic() < deadline:
        time.sleep(0.05)  # the small entries are in: the big one is on its way
    time.sleep(0.2)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    # Killed in the middle of a chunk, fake-gcs-server appends the chunk sent again rather
    # than taking it from the offset given; the object's size and CRC32C then differ, it is
    # deleted and the next try uploads it anew. So a try or two more, each after its backoff.
    for _ in range(4):
        if Agent(node.settings).run(once=True) == 0:
            break
        time.sleep(2)
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
    entry = big_entry(node, 96)
    digest = spool_sha(node, entry)
    through_an_outage(node, server.stop, server.start, after=1.0)
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
