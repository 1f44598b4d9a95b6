"""The testbed's SeaweedFS is ready for the tests only once it stores and reads an object.

``weed mini`` opens its S3 port before its gateway can serve a request, and has been seen to
drop connections and refuse requests for a while after. A proxy in front of a real SeaweedFS
plays that phase: it drops the first connections without an answer, then takes CreateBucket
but refuses the first PUTs, as a gateway whose volumes are not up yet. A readiness check that
stopped at the open port or at the bucket would let the test's first request meet a refusal.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from testbed import servers, tamper
from tests.conftest import starts_servers

DROPPED, REFUSED_PUTS = 3, 3


@pytest.fixture(scope="module")
@starts_servers
def weed() -> Iterator[servers.Seaweed]:
    with servers.seaweed() as w:
        yield w


def test_seaweedfs_is_ready_only_when_an_object_goes_in_and_comes_out(weed: servers.Seaweed) -> None:
    seen = {"requests": 0, "puts": 0}

    def not_ready_yet(request: tamper.Request) -> int | None:
        seen["requests"] += 1
        if seen["requests"] <= DROPPED:
            return 0  # the port is open, nothing answers behind it
        if request.method == "PUT" and "?" not in request.path and request.path.count("/") > 1:
            seen["puts"] += 1  # an object's PUT, not the bucket's
            if seen["puts"] <= REFUSED_PUTS:
                return 503
        return None

    bucket = f"ready-{uuid.uuid4().hex[:8]}"
    with tamper.tamper(weed.s3_port) as front:
        front.refuse = not_ready_yet
        servers.wait_s3(front.endpoint, bucket, timeout=60)
        first = boto3.client(
            "s3", endpoint_url=front.endpoint, aws_access_key_id=servers.KEY,
            aws_secret_access_key=servers.SECRET, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )  # fmt: skip
        first.put_object(Bucket=bucket, Key="first", Body=b"the test's first request")  # no retry needed
        assert seen["requests"] > DROPPED and seen["puts"] > REFUSED_PUTS  # the wait met both refusals
        assert first.get_object(Bucket=bucket, Key="first")["Body"].read() == b"the test's first request"
        # the probe it wrote is gone: a test listing the bucket sees only its own objects
        assert [o["Key"] for o in first.list_objects_v2(Bucket=bucket)["Contents"]] == ["first"]


def test_waiting_for_seaweedfs_ends_at_once_when_it_exited() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(RuntimeError, match="exited with 0 before answering S3 requests"):
        servers.wait_s3(f"http://127.0.0.1:{servers.free_port()}", "never", timeout=30, proc=gone)
