"""Cores into buckets mounted through FUSE, as the seed's OSS volume does it, for real.

Each test mounts a SeaweedFS bucket on 127.0.0.1 through a real FUSE filesystem (s3fs,
the code ossfs comes from; ``rclone mount`` without cache and with ``--vfs-cache-mode
writes``) as a runc pod's ``/data/dump-a``, crashes a real process in it, and checks the
result through the bucket's own API (boto3), never through the mount: an object exists
under the kernel's name only when it holds the whole core, byte for byte the core the
spool got, and gdb reads it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator

import boto3
import pytest
import yaml
from botocore.config import Config

from testbed import fusefs, servers
from tests.conftest import Capture, gdb_backtrace, installed_capture, starts_servers

pytestmark = pytest.mark.crash

SEED = {"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"}
OSS_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "deploy", "examples", "oss.yaml")
# rclone mount has no symbolic links (it answers EIO): a link cannot be planted through it.
HAS_SYMLINKS = {"s3fs": True, "rclone": False, "rclone-writes": False}


@pytest.fixture(scope="module")
def installed() -> Iterator[Capture]:
    """One installation (and one turn of the host-wide core_pattern lock) for the whole module."""
    with installed_capture() as cap:
        yield cap


@pytest.fixture
def capture(installed: Capture) -> Capture:
    """The module's installation with an empty spool: each test sees its own crashes only."""
    shutil.rmtree(installed.spool, ignore_errors=True)
    return installed


@pytest.fixture(scope="module")
@starts_servers
def weed() -> Iterator[servers.Seaweed]:
    with servers.seaweed() as w:
        yield w


@pytest.fixture(scope="module")
def s3(weed: servers.Seaweed):  # -> a boto3 S3 client
    return boto3.client(
        "s3", endpoint_url=weed.endpoint, aws_access_key_id=servers.KEY, aws_secret_access_key=servers.SECRET,
        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
    )  # fmt: skip


def new_bucket(s3, name: str | None = None) -> str:
    bucket = name or f"cores-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=fusefs.KINDS)
def volume(request: pytest.FixtureRequest, weed: servers.Seaweed, s3) -> Iterator[fusefs.Mount]:
    with fusefs.mounted(request.param, weed, new_bucket(s3)) as m:
        yield m


def objects(s3, bucket: str) -> dict[str, int]:
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["Size"] for o in listing}


def wait_objects(s3, bucket: str, keys: set[str], timeout: float = 90) -> dict[str, int]:
    """The bucket's objects once ``keys`` are all there (rclone's cache uploads after close)."""
    deadline = time.monotonic() + timeout
    while True:
        found = objects(s3, bucket)
        if keys <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def download(s3, bucket: str, key: str, path: str) -> str:
    s3.download_file(bucket, key, path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def crash_in(capture: Capture, rootfs: str, volume: fusefs.Mount, args: list[str], **kw: object):
    kw.setdefault("annotations", SEED)
    return capture.crash(rootfs, args, volume=volume.path, **kw)


def assert_core_in_bucket(s3, capture: Capture, rootfs: str, bucket: str, *, key: str, tmp_path) -> dict:
    """The object ``key`` is the spool's core, complete, and gdb reads it; returns the entry."""
    [meta] = capture.entries()
    found = wait_objects(s3, bucket, {key})
    assert found.get(key) == meta["core"]["size"], (found, meta["core"]["size"], meta["volume"])
    local = str(tmp_path / key)
    assert download(s3, bucket, key, local) == meta["core"]["sha256"]
    bt = gdb_backtrace(os.path.join(rootfs, "app/crasher"), local, rootfs)
    assert re.search(r"#0 .*crash_here", bt), bt
    assert not [k for k in found if k.startswith(".corevault-")], found
    return meta


def test_small_core_lands_whole_under_the_kernels_name(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    crash_in(capture, rootfs, volume, ["/app/crasher", "segv"])
    [meta] = capture.entries()
    key = f"core-!app!crasher-1-{meta['time']}"
    assert_core_in_bucket(s3, capture, rootfs, volume.bucket, key=key, tmp_path=tmp_path)
    assert meta["volume"]["path"] == f"/data/dump-a/{key}" and meta["volume"]["written"]
    assert [r["event"] for r in capture.journal()] == ["captured"]


def test_300_mib_mostly_zero_core_lands_whole(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    # 38 threads whose 8 MiB stacks are untouched: the kernel sends ~300 MiB of zero pages.
    crash_in(capture, rootfs, volume, ["/app/crasher", "threads", "37"])
    [meta] = capture.entries()
    assert meta["core"]["size"] >= 300 << 20 and not meta["core"]["truncated"]
    assert meta["core"]["stored_size"] < meta["core"]["size"] // 20  # mostly zeros
    assert_core_in_bucket(
        s3, capture, rootfs, volume.bucket, key=f"core-!app!crasher-1-{meta['time']}", tmp_path=tmp_path
    )


def test_a_taken_name_gets_a_suffix_and_is_left_alone(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    crash_in(
        capture, rootfs, volume, ["/bin/sh", "-c", "echo old > /data/dump-a/core && exec /app/crasher segv"],
        annotations={"corevault.io/core-pattern": "/data/dump-a/core"},
    )  # fmt: skip
    assert_core_in_bucket(s3, capture, rootfs, volume.bucket, key="core.1", tmp_path=tmp_path)
    assert s3.get_object(Bucket=volume.bucket, Key="core")["Body"].read() == b"old\n"


def test_symlink_at_the_core_name_is_not_followed(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    secret = str(tmp_path / "host-secret")
    with open(secret, "w") as f:
        f.write("secret\n")
    crash_in(
        capture, rootfs, volume,
        ["/bin/sh", "-c", f"ln -s {secret} /data/dump-a/core; ls -l /data/dump-a; exec /app/crasher segv"],
        annotations={"corevault.io/core-pattern": "/data/dump-a/core"},
    )  # fmt: skip
    with open(secret) as f:
        assert f.read() == "secret\n"
    if HAS_SYMLINKS[volume.kind]:
        assert os.readlink(os.path.join(volume.path, "core")) == secret
        assert_core_in_bucket(s3, capture, rootfs, volume.bucket, key="core.1", tmp_path=tmp_path)
    else:  # nothing could be planted: the core takes its own name
        assert not os.path.islink(os.path.join(volume.path, "core"))
        assert_core_in_bucket(s3, capture, rootfs, volume.bucket, key="core", tmp_path=tmp_path)


def test_symlinked_directory_on_the_way_is_refused(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    hostdir = str(tmp_path / "hostdir")
    os.mkdir(hostdir)
    crash_in(
        capture, rootfs, volume, ["/bin/sh", "-c", f"ln -s {hostdir} /data/dump-a/sub; exec /app/crasher segv"],
        annotations={"corevault.io/core-pattern": "/data/dump-a/sub/core"},
    )  # fmt: skip
    assert os.listdir(hostdir) == []
    [meta] = capture.entries()  # the spool copy is still taken
    assert not meta["volume"]["written"]
    reasons = [r["reason"] for r in capture.journal() if r["event"] == "dropped"]
    if HAS_SYMLINKS[volume.kind]:
        assert any("/data/dump-a/sub is a symbolic link" in r for r in reasons), reasons
    else:
        assert any("/data/dump-a/sub does not exist" in r for r in reasons), reasons
    assert not [k for k in objects(s3, volume.bucket) if "core" in k]


def test_dotdot_cannot_leave_the_bucket(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3, tmp_path
) -> None:
    outside = str(tmp_path / "escaped")
    crash_in(
        capture, rootfs, volume, ["/app/crasher", "segv"],
        annotations={"corevault.io/core-pattern": "/data/dump-a/../../../../../../" + outside.lstrip("/")},
    )  # fmt: skip
    assert not os.path.exists(outside) and capture.entries() == []
    [record] = capture.journal()
    assert record["event"] == "refused" and "'..' component" in record["reason"]
    # A process named ".." gets the kernel's escaped name, inside the bucket.
    crash_in(
        capture, rootfs, volume, ["/app/crasher", "comm", ".."],
        annotations={"corevault.io/core-pattern": "/data/dump-a/%e"},
    )  # fmt: skip
    assert wait_objects(s3, volume.bucket, {"!."}).keys() == {"!."}, capture.journal()
    assert os.listdir(tmp_path) == []


def test_size_cap_is_honoured_before_the_upload(
    capture: Capture, rootfs: str, volume: fusefs.Mount, s3
) -> None:
    crash_in(
        capture, rootfs, volume, ["/app/crasher", "alloc", "16"],
        annotations={**SEED, "corevault.io/max-core-size": "1M"},
    )  # fmt: skip
    [meta] = capture.entries()
    assert meta["core"]["truncated"] and meta["core"]["size"] == 1 << 20
    key = f"core-!app!crasher-1-{meta['time']}"
    assert wait_objects(s3, volume.bucket, {key})[key] == 1 << 20
    assert any(r["event"] == "truncated" for r in capture.journal())


@pytest.mark.parametrize("kind", ["s3fs", "rclone"])
def test_full_bucket_at_close_is_journaled_and_nothing_is_published(
    capture: Capture, rootfs: str, weed: servers.Seaweed, s3, kind: str
) -> None:
    bucket = new_bucket(s3)
    fusefs.exceed_quota(weed, bucket)
    with fusefs.mounted(kind, weed, bucket) as volume:
        crash_in(capture, rootfs, volume, ["/app/crasher", "segv"])
    [meta] = capture.entries()  # the spool copy survives
    assert meta["core"]["size"] > 0 and not meta["volume"]["written"]
    [dropped] = [r for r in capture.journal() if r["event"] == "dropped"]
    # s3fs uploads at fsync; rclone while the core is written, and at close
    assert re.fullmatch(r"volume: .* failed.*: Input/output error", dropped["reason"]), dropped
    assert dropped["reason"] == f"volume: {meta['volume']['error']}"
    assert set(objects(s3, bucket)) == {"filler"}


def test_full_bucket_behind_a_write_back_cache_keeps_nothing_partial(
    capture: Capture, rootfs: str, weed: servers.Seaweed, s3
) -> None:
    """rclone's write cache uploads after close returned: the error reaches only rclone's log.

    What corevault can promise there is what the bucket shows: no partial object under
    the core's name, and the spool copy kept for the vault.
    """
    bucket = new_bucket(s3)
    fusefs.exceed_quota(weed, bucket)
    with fusefs.mounted("rclone-writes", weed, bucket) as volume:
        crash_in(capture, rootfs, volume, ["/app/crasher", "segv"])
        [meta] = capture.entries()
        assert meta["volume"]["written"]  # close succeeded: the upload had not started
        deadline = time.monotonic() + 30
        while "Failed to copy" not in read_text(volume.log):
            assert time.monotonic() < deadline, "rclone never tried the upload"
            time.sleep(0.3)
        assert set(objects(s3, bucket)) == {"filler"}


def test_the_seed_oss_example_pod_gets_its_core_in_the_bucket(
    capture: Capture, rootfs: str, weed: servers.Seaweed, s3, tmp_path
) -> None:
    """deploy/examples/oss.yaml as it is, the OSS CSI driver replaced by s3fs over SeaweedFS.

    The pod's annotation, volume mount and the PV's bucket and ``otherOpts`` are read from
    the example; the image is the testbed's crasher (no registry is reachable here).
    """
    with open(OSS_EXAMPLE) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    template = docs["Deployment"]["spec"]["template"]
    [container] = template["spec"]["containers"]
    [mount] = container["volumeMounts"]
    [pod_volume] = template["spec"]["volumes"]
    assert mount["name"] == pod_volume["name"]
    assert (
        pod_volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    csi = docs["PersistentVolume"]["spec"]["csi"]
    assert csi["driver"] == "ossplugin.csi.alibabacloud.com"
    attributes = csi["volumeAttributes"]
    bucket = new_bucket(s3, attributes["bucket"])
    with fusefs.mounted("s3fs", weed, bucket, options=attributes["otherOpts"].split()) as volume:
        crash_in(
            capture, rootfs, volume, ["/app/crasher", "segv"],
            annotations=template["metadata"]["annotations"], volume_path=mount["mountPath"],
        )  # fmt: skip
        [meta] = capture.entries()
        key = f"core-!app!crasher-1-{meta['time']}"
        assert_core_in_bucket(s3, capture, rootfs, bucket, key=key, tmp_path=tmp_path)
        assert os.listdir(volume.path) == [key]


def test_a_temporary_file_swapped_during_the_rename_is_not_published(
    capture: Capture, rootfs: str, weed: servers.Seaweed, s3
) -> None:
    """On a bucket without hard links the core's name is reserved (a directory), then the core's
    temporary file renamed to it. The tenant learns both names from inotify and, the moment the
    reservation appears, renames a file of its own over the temporary one: the handler's rename
    then moves the tenant's file to the core's name. What the name holds after the rename is
    checked to be the file written, so the tenant's file is taken away and the core is journaled
    as not delivered, never reported as written where the tenant's bytes lie.

    The volume's writer runs on a thread of its own, and now and then its rename comes before the
    tenant's swap: the core published is then the handler's own, whole, and the tenant's file lies
    under the temporary name it no longer holds. The crash is repeated until the tenant's swap
    comes first, the invariant checked on every one."""
    for _ in range(6):
        bucket = new_bucket(s3)
        seen = {m["id"] for m in capture.entries()}
        with fusefs.mounted("s3fs", weed, bucket) as volume:
            crash_in(
                capture, rootfs, volume, ["/app/racer", "/data/dump-a", "core", "/app/crasher", "segv"],
                annotations={"corevault.io/core-pattern": "/data/dump-a/core"},
            )  # fmt: skip
        found = objects(s3, bucket)
        [meta] = [m for m in capture.entries() if m["id"] not in seen]  # the spool copy is taken all the same
        if "core" in found:
            assert b"tenant" not in s3.get_object(Bucket=bucket, Key="core")["Body"].read()
        if meta["volume"]["written"]:  # the handler's rename came first: its own core, whole
            assert found.get("core") == meta["core"]["size"], (found, meta["volume"])
            continue
        assert "planted" not in found, f"the tenant's swap did not happen in time: {found}"
        reasons = [r["reason"] for r in capture.journal() if r["event"] == "dropped"]
        assert any("replaced while it was renamed" in r for r in reasons), reasons
        return
    pytest.fail("in six crashes the tenant's swap never came before the handler's rename")
