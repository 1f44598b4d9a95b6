"""The vault's stores against each cloud SDK's own upload, and boto3 against obstore for S3.

    python -m bench.stores [--size-mib 256] [--runs 3]

Each upload of one incompressible ``--size-mib`` MiB file runs in a process of its own (so
its peak RSS is its own), against real servers on 127.0.0.1: SeaweedFS (S3), fake-gcs-server
(GCS) and Azurite (Azure). Medians over ``--runs``, baseline and subject interleaved:

- corevault's store ÷ the SDK's plain upload, as throughput (goal >= 0.95), and both RSS
  (goal <= 128 MiB): boto3 ``upload_fileobj``, google-cloud-storage ``upload_from_filename``,
  azure-storage-blob ``upload_blob``, each with the same part size and concurrency;
- S3 through obstore (the Rust object_store crate) ÷ boto3, the library the stores could move to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from testbed import clouds, servers

PART = 8 << 20
CONCURRENCY = 2

SETUP = """
import os, sys
kind, url, endpoint, path = sys.argv[1:5]
part, concurrency = {part}, {concurrency}
"""
OURS = (
    SETUP
    + """
from corevault.config import CloudSettings, S3Settings
from corevault.vault import stores
s3 = S3Settings(); s3.endpoint = endpoint; s3.addressing = "path"; s3.part_size = part
cloud = CloudSettings(); cloud.part_size = part; cloud.endpoint = endpoint if kind == "gcs" else None
stores.open_store(url, s3, cloud, cloud).put_file("bench/ours", path)
"""
)
PLAIN = (
    SETUP
    + """
if kind == "s3":
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={{"addressing_style": "path"}}))
    cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency)
    with open(path, "rb") as f:
        s3.upload_fileobj(f, url.split("/")[2], "bench/plain", Config=cfg)
elif kind == "gcs":
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client("bench", AnonymousCredentials(), client_options={{"api_endpoint": endpoint}})
    client.bucket(url.split("/")[2]).blob("bench/plain", chunk_size=part).upload_from_filename(path)
else:
    from azure.storage.blob import BlobServiceClient
    service = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"],
                                                       max_block_size=part, max_single_put_size=part)
    with open(path, "rb") as f:
        service.get_blob_client(url.split("/")[2], "bench/plain").upload_blob(f, overwrite=True, max_concurrency=concurrency)
"""
)
OBSTORE = (
    SETUP
    + """
import obstore
from obstore.store import S3Store
store = S3Store(url.split("/")[2], endpoint=endpoint, region="us-east-1", virtual_hosted_style_request=False,
                client_options={{"allow_http": True}})
with open(path, "rb") as f:
    obstore.put(store, "bench/obstore", f, chunk_size=part, max_concurrency=concurrency)
"""
)


# The upload's own peak RSS: its process's VmHWM. (ru_maxrss of a child counts the memory of
# the process that started it, which a child of this bench would inherit as its floor.)
PEAK = """
with open("/proc/self/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
"""


def run(script: str, args: list[str], env: dict) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of one upload in a process of its own."""
    code = script.format(part=PART, concurrency=CONCURRENCY) + PEAK
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"upload failed: {out.stderr[-800:]}")
    return took, int(out.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cv-bench-stores-")
    path = os.path.join(work, "core.zst")
    with open(path, "wb") as f:
        for _ in range(a.size_mib):
            f.write(os.urandom(1 << 20))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": servers.KEY, "AWS_SECRET_ACCESS_KEY": servers.SECRET}
    print(
        f"upload of {a.size_mib} MiB, {PART >> 20} MiB parts, concurrency {CONCURRENCY}, median of {a.runs}"
    )
    try:
        with ExitStack() as stack:
            weed = stack.enter_context(servers.seaweed())
            gcs = stack.enter_context(clouds.fake_gcs())
            azure = stack.enter_context(clouds.azurite())
            gcs.create_bucket("corevault-bench")
            azure.create_container("corevault-bench")
            env["AZURE_STORAGE_CONNECTION_STRING"] = azure.connection_string
            targets = {
                "s3": (f"s3://{weed.bucket}/bench", weed.endpoint),
                "gcs": ("gs://corevault-bench/bench", gcs.endpoint),
                "azure": ("az://corevault-bench/bench", ""),
            }
            for kind, (url, endpoint) in targets.items():
                args = [kind, url, endpoint, path]
                ours, plain, obstore = [], [], []
                for _ in range(a.runs):
                    plain.append(run(PLAIN, args, env))
                    ours.append(run(OURS, args, env))
                    if kind == "s3":
                        obstore.append(run(OBSTORE, args, env))
                o, p = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in plain)
                o_rss, p_rss = max(r for _, r in ours) >> 10, max(r for _, r in plain) >> 10
                print(f"  {kind:<5} corevault {a.size_mib / o:6.0f} MiB/s, RSS {o_rss:4d} MiB | SDK "
                      f"{a.size_mib / p:6.0f} MiB/s, RSS {p_rss:4d} MiB | throughput ratio {p / o:.2f} "
                      "(goal >= 0.95; RSS goal <= 128 MiB)")  # fmt: skip
                if obstore:
                    b = statistics.median(t for t, _ in obstore)
                    b_rss = max(r for _, r in obstore) >> 10
                    print(f"        obstore {a.size_mib / b:6.0f} MiB/s, RSS {b_rss:4d} MiB | "
                          f"obstore ÷ boto3 throughput {p / b:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
