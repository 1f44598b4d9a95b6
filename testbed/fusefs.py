"""Buckets mounted through FUSE, as a pod's volume: s3fs-fuse and ``rclone mount``.

Both run in the foreground as children of the test, over a SeaweedFS bucket on 127.0.0.1
(:mod:`testbed.servers`), so every mount is ours to end: the context managers unmount with
``fusermount3 -u`` (``umount -l`` when the mount is still busy), stop the daemon and
remove its cache, also when the test fails. s3fs is the code ossfs was forked from (the
OSS CSI driver's FUSE filesystem); rclone is tried without its cache (it uploads while
the file is written and accepts only sequential writes) and with ``--vfs-cache-mode
writes`` (it writes to a node-local cache and uploads after close).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from testbed.servers import KEY, SECRET, Seaweed

KINDS = ("s3fs", "rclone", "rclone-writes")


@dataclass
class Mount:
    kind: str
    path: str
    bucket: str
    cache: str  # the node-side cache (s3fs's tmpdir, rclone's --cache-dir)
    log: str
    pid: int  # the FUSE daemon


def _environment() -> dict[str, str]:
    # The host's CA bundle variables make rclone refuse a plain-HTTP endpoint.
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}


def _command(
    kind: str, server: Seaweed, bucket: str, path: str, work: str, *, options: list[str]
) -> list[str]:
    if kind == "s3fs":
        passwd = os.path.join(work, "passwd")
        with open(os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"{KEY}:{SECRET}\n")
        own = [
            f"passwd_file={passwd}", f"url={server.endpoint}", "use_path_request_style",
            f"tmpdir={work}/cache", "retries=1", "dbglevel=info", f"logfile={work}/log",
        ]  # fmt: skip
        return ["s3fs", bucket, path, "-f", "-o", ",".join(own), *options]
    remote = (
        f":s3,provider=SeaweedFS,access_key_id={KEY},secret_access_key={SECRET},"
        f"endpoint='{server.endpoint}':{bucket}"
    )
    # Uploads start a second after close instead of rclone's 5 s, so tests wait less.
    mode = ["writes", "--vfs-write-back", "1s"] if kind == "rclone-writes" else ["off"]
    return [
        "rclone", "mount", remote, path, "--config", "/dev/null", "--vfs-cache-mode", *mode,
        "--cache-dir", f"{work}/cache", "--log-file", f"{work}/log", "-v", "--low-level-retries", "1",
        "--retries", "1", *options,
    ]  # fmt: skip


@contextmanager
def mounted(kind: str, server: Seaweed, bucket: str, options: list[str] | None = None) -> Iterator[Mount]:
    """``bucket`` mounted through ``kind`` (one of :data:`KINDS`) at a new directory."""
    if kind not in KINDS:
        raise ValueError(f"unknown FUSE filesystem {kind!r}: use one of {', '.join(KINDS)}")
    work = tempfile.mkdtemp(prefix=f"cv-{kind}-")
    path = os.path.join(work, "mnt")
    os.mkdir(path)
    os.mkdir(os.path.join(work, "cache"))
    if options is None:  # readable by the pod's other users, as the seed's otherOpts ask
        options = ["-o", "allow_other"] if kind == "s3fs" else ["--allow-other"]
    cmd = _command(kind, server, bucket, path, work, options=options)
    with _served(cmd, kind, work, bucket) as mount:
        yield mount


@contextmanager
def local(source: str) -> Iterator[Mount]:
    """The local directory ``source`` served through FUSE (``rclone mount``, no cache) at a new directory.

    A FUSE server the test can make stop answering (SIGSTOP its ``pid``), as a pod that serves
    a filesystem itself may: every request to it then waits. On the way out the server goes on
    (SIGCONT) before the mount is removed, also on failure.
    """
    work = tempfile.mkdtemp(prefix="cv-local-")
    os.mkdir(os.path.join(work, "mnt"))
    cmd = [
        "rclone", "mount", source, f"{work}/mnt", "--config", "/dev/null", "--vfs-cache-mode", "off",
        "--allow-other", "--file-perms", "0755", "--log-file", f"{work}/log", "-v",
    ]  # fmt: skip
    with _served(cmd, "rclone-local", work, "") as mount:
        yield mount


@contextmanager
def _served(cmd: list[str], kind: str, work: str, bucket: str) -> Iterator[Mount]:
    """Run the FUSE daemon ``cmd`` until it has mounted ``work``/mnt; then unmount (lazily when
    still busy), stop it and remove ``work``, also when the test fails."""
    path = os.path.join(work, "mnt")
    with open(os.path.join(work, "out"), "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_environment())
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(cmd[:3])} did not mount: {_tail(work)}")
            time.sleep(0.05)
        yield Mount(kind, path, bucket, os.path.join(work, "cache"), os.path.join(work, "log"), proc.pid)
    finally:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a server a test stopped answers its unmount
        unmount(path)
        with suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(path):
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def unmount(path: str) -> None:
    """Unmount ``path``; a mount that stays busy is detached lazily so nothing is left behind."""
    for _ in range(20):
        if not os.path.ismount(path):
            return
        if subprocess.run(["fusermount3", "-u", path], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _tail(work: str) -> str:
    for name in ("out", "log"):
        with suppress(OSError), open(os.path.join(work, name), errors="replace") as f:
            text = f.read()[-2000:].strip()
            if text:
                return text
    return "(no output)"


def exceed_quota(server: Seaweed, bucket: str, timeout: float = 60) -> None:
    """Make ``bucket`` full the way SeaweedFS does it: a quota below its use, then enforced.

    An enforced quota turns the bucket read-only, so every later upload fails (S3 answers
    500). SeaweedFS counts a bucket's use from volume heartbeats: enforce until it bites.
    """
    import sys

    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
        region_name="us-east-1", config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip
    s3.put_object(Bucket=bucket, Key="filler", Body=os.urandom(2 << 20))  # random: SeaweedFS compresses
    weed = os.path.join(os.path.dirname(sys.executable), "weed")
    shell = [
        weed,
        "shell",
        f"-master=127.0.0.1:{server.s3_port + 1}",
        f"-filer=127.0.0.1:{server.s3_port + 3}",
    ]
    commands = f"s3.bucket.quota -name={bucket} -op=set -sizeMB=1\ns3.bucket.quota.enforce -apply\n"
    deadline = time.monotonic() + timeout
    while True:
        subprocess.run(shell, input=commands, capture_output=True, text=True, timeout=60, check=False)
        try:
            s3.put_object(Bucket=bucket, Key="probe", Body=b"x")
        except Exception:  # what a full bucket answers is the point here
            return
        s3.delete_object(Bucket=bucket, Key="probe")
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS did not enforce the quota on {bucket} within {timeout}s")
        time.sleep(1)
