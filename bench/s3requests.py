"""The agent's CPU per S3 request under each client that could cut it, against a real SeaweedFS.

    python -m bench.s3requests [--blocks 16] [--block 50]

What a shipped crash costs the agent is mostly the client's fixed cost per request (two requests
per small crash: the core's PutObject and its metadata's). This measures that cost, as the
agent's process CPU time (every thread's, obstore's runtime included), for a PutObject of 80 KiB
sent with its checksum (a small compressed core, as the vault's store sends it) and for a
HeadObject. The baseline is botocore's client as the vault's store makes it, sending the CRC32
(what sent every single PutObject before obstore); beside it:

- the store's own single upload (``S3Store.uploads.put_small``: obstore's PutObject with the
  body's SHA-256 and the ETag compared with the body's MD5, :mod:`corevault.vault.s3put`), which
  is what ships a small object now (goal: at most 0.5 x the baseline, the bar it was taken at);
- obstore's PutObject alone (the same store, no check of the answer);
- boto3's client (botocore's with boto3's layer over it, which the store made before; same
  configuration);
- the client with one setting changed alone: ``request_checksum_calculation =
  "when_required"``, the retries' ``legacy`` mode, a single attempt, ``payload_signing_enabled
  = False`` (goal: a setting is worth taking below 0.9).

Each client is made once and reused, as the agent does (credentials and the endpoint are
resolved when it is made, not per request). Blocks of ``--block`` requests of each take turns,
``--blocks`` times; the medians are printed with the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

from corevault.config import S3Settings
from corevault.vault import blobs
from testbed import servers

SIZE = 80 << 10


Put = Callable[[int], object]


def clients(endpoint: str, bucket: str, data: bytes) -> dict[str, tuple[Put, Put | None]]:
    """Each way to send a request: its PutObject of ``data`` and its HeadObject (None: not measured)."""
    settings = S3Settings()
    settings.endpoint, settings.addressing = endpoint, "path"
    store = blobs.S3Store(bucket, "bench", settings)
    base = store.client
    config = base.meta.config
    changed = {
        "request_checksum_calculation when_required": {"request_checksum_calculation": "when_required"},
        "retries legacy mode": {"retries": {"max_attempts": 3, "mode": "legacy"}},
        "retries: one attempt": {"retries": {"max_attempts": 1, "mode": "standard"}},
        "payload_signing_enabled False": {"s3": {**config.s3, "payload_signing_enabled": False}},
    }
    import boto3
    import botocore.session
    import obstore
    from botocore.config import Config

    def boto(client: Any) -> tuple[Put, Put]:
        def put(i: int) -> object:
            crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
            return client.put_object(Bucket=bucket, Key=f"bench/k{i}", Body=data, ChecksumCRC32=crc)

        return put, lambda i: client.head_object(Bucket=bucket, Key=f"bench/k{i}", ChecksumMode="ENABLED")

    made = {"botocore, as the vault's store makes it (baseline)": boto(base)}
    small = store.uploads._small_store()
    made["the vault's store: obstore, its answer checked"] = (
        lambda i: store.uploads.put_small(f"bench/s{i}", data),
        None,
    )
    made["obstore's PutObject alone"] = (
        lambda i: obstore.put(small, f"bench/o{i}", data, use_multipart=False),
        None,
    )
    layered = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=config.region_name, config=config
    )
    made["boto3's client (botocore's, boto3's layer over it)"] = boto(layered)
    for name, change in changed.items():
        made[name] = boto(botocore.session.Session().create_client(
            "s3", endpoint_url=endpoint, region_name=config.region_name, config=config.merge(Config(**change))
        ))  # fmt: skip
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--block", type=int, default=50)
    args = ap.parse_args()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
    data = os.urandom(SIZE)
    with servers.seaweed() as w:
        made = clients(w.endpoint, w.bucket, data)
        cpu: dict[tuple[str, str], list[float]] = {}
        for put, head in made.values():  # connections open, everything lazily made is made
            for i in range(10):
                put(i)
                if head is not None:
                    head(i)
        for _ in range(args.blocks):
            for name, (put, head) in made.items():
                for op, send in (("put", put), ("head", head)):
                    if send is None:
                        continue
                    t = time.process_time()
                    for i in range(args.block):
                        send(i)
                    cpu.setdefault((name, op), []).append((time.process_time() - t) / args.block)
    print(f"the agent's CPU per request, {SIZE >> 10} KiB PutObject with its checksum and HeadObject, SeaweedFS "
          f"on 127.0.0.1; medians of {args.blocks} interleaved blocks of {args.block}; goals: the store's "
          "single upload at most 0.5 x the baseline, a client setting below 0.9 x")  # fmt: skip
    first = next(iter(made))
    base_put, base_head = (statistics.median(cpu[first, op]) for op in ("put", "head"))
    for name in made:
        put = statistics.median(cpu[name, "put"])
        line = f"  {name:<50} PutObject {put * 1000:.2f} ms ({put / base_put:.2f} x)"
        if (name, "head") in cpu:
            head = statistics.median(cpu[name, "head"])
            line += f", HeadObject {head * 1000:.2f} ms ({head / base_head:.2f} x)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
