"""boto3's CPU per S3 request under each client setting that could cut it, against a real SeaweedFS.

    python -m bench.s3requests [--blocks 16] [--block 50]

What a shipped crash costs the agent is mostly boto3's fixed cost per request (two requests per
small crash: the core's PutObject and its metadata's). This measures that cost, as the agent's
process CPU time, for a PutObject of 80 KiB sent with its CRC32 (a small compressed core, as
the vault's store sends it) and for a HeadObject, under the client the vault's store makes
(:class:`corevault.vault.blobs.S3Store`, the baseline) and under each setting changed alone:

- ``request_checksum_calculation = "when_required"`` (botocore computes no checksum of its own;
  the store sends its own anyway),
- the retries' ``legacy`` mode, and a single attempt (no retry bookkeeping),
- ``payload_signing_enabled = False`` (no SHA-256 of the body for the signature over plain
  HTTP; over HTTPS botocore signs no body that carries a checksum already).

The client is made once and reused, as the agent does (credentials and the endpoint are
resolved when it is made, not per request). Blocks of ``--block`` requests of each setting
take turns, ``--blocks`` times; the medians are printed with the ratio to the baseline
(goal: a setting is worth taking below 0.9).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import time
import zlib
from typing import Any

from corevault.config import S3Settings
from corevault.vault import blobs
from testbed import servers

SIZE = 80 << 10


def clients(endpoint: str, bucket: str) -> dict[str, Any]:
    """The vault store's own client, and one per setting changed alone (same config otherwise)."""
    settings = S3Settings()
    settings.endpoint, settings.addressing = endpoint, "path"
    base = blobs.S3Store(bucket, "bench", settings).client
    config = base.meta.config
    changed = {
        "request_checksum_calculation when_required": {"request_checksum_calculation": "when_required"},
        "retries legacy mode": {"retries": {"max_attempts": 3, "mode": "legacy"}},
        "retries: one attempt": {"retries": {"max_attempts": 1, "mode": "standard"}},
        "payload_signing_enabled False": {"s3": {**config.s3, "payload_signing_enabled": False}},
    }
    import boto3
    from botocore.config import Config

    made = {"as the vault's store makes it (baseline)": base}
    for name, change in changed.items():
        made[name] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=config.region_name, config=config.merge(Config(**change))
        )
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--block", type=int, default=50)
    args = ap.parse_args()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
    data = os.urandom(SIZE)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    with servers.seaweed() as w:
        made = clients(w.endpoint, w.bucket)
        cpu: dict[tuple[str, str], list[float]] = {}
        for client in made.values():  # connections open, everything lazily made is made
            for i in range(10):
                client.put_object(Bucket=w.bucket, Key=f"bench/warm{i}", Body=data, ChecksumCRC32=crc)
                client.head_object(Bucket=w.bucket, Key=f"bench/warm{i}", ChecksumMode="ENABLED")
        for _ in range(args.blocks):
            for name, client in made.items():
                t = time.process_time()
                for i in range(args.block):
                    client.put_object(Bucket=w.bucket, Key=f"bench/k{i}", Body=data, ChecksumCRC32=crc)
                cpu.setdefault((name, "put"), []).append((time.process_time() - t) / args.block)
                t = time.process_time()
                for i in range(args.block):
                    client.head_object(Bucket=w.bucket, Key=f"bench/k{i}", ChecksumMode="ENABLED")
                cpu.setdefault((name, "head"), []).append((time.process_time() - t) / args.block)
    print(f"boto3's CPU per request, {SIZE >> 10} KiB PutObject with its CRC32 and HeadObject, SeaweedFS on "
          f"127.0.0.1; medians of {args.blocks} interleaved blocks of {args.block}; goal: below 0.9 x the baseline")  # fmt: skip
    first = next(iter(made))
    for name in made:
        put, head = (statistics.median(cpu[name, op]) for op in ("put", "head"))
        base_put, base_head = (statistics.median(cpu[first, op]) for op in ("put", "head"))
        print(f"  {name:<45} PutObject {put * 1000:.2f} ms ({put / base_put:.2f} x), "
              f"HeadObject {head * 1000:.2f} ms ({head / base_head:.2f} x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
