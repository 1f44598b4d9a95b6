"""Real servers for the vault's tests and benchmarks: SeaweedFS (S3) and PostgreSQL.

Both listen on 127.0.0.1 only, on free ports, with their data in a temporary directory,
and are stopped (and their leftovers removed) by the context managers that start them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

# The one identity of the throwaway SeaweedFS that the tests start on 127.0.0.1.
KEY, SECRET = "corevault", "corevault-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on ``port``; with ``proc``, fail at once when it has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def connections_to(port: int) -> set[int]:
    """The sockets of this process connected to 127.0.0.1:``port`` (their inodes)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith("socket:["):
            mine.add(int(target[len("socket:[") : -1]))
    with open("/proc/self/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    # remote address 127.0.0.1:port, state 01 (established)
    return {int(r[9]) for r in rows if r[2] == f"0100007F:{port:04X}" and r[3] == "01" and int(r[9]) in mine}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def seaweed_base() -> int:
    """A first port for ``weed mini``: it and the next four free, and their gRPC ports (+10000).

    All of them stay below the kernel's ephemeral range, where any client connection of the
    machine may hold a port for a while: a port taken there made weed mini fail to start its S3
    gateway now and then.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    top = max(ephemeral, 20000) - 10010
    for _ in range(100):
        base = 10000 + free_port() % max(top - 10000, 1)
        if all(_bindable(p) for i in range(5) for p in (base + i, base + 10000 + i)):
            return base
    raise RuntimeError("no free range of ports for weed mini below the ephemeral range")


@dataclass
class Seaweed:
    """``weed mini``: master, volume, filer and S3 gateway in one process."""

    dir: str
    s3_port: int
    bucket: str = "corevault"
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def ports(self) -> list[int]:
        return [self.s3_port + i for i in range(0, 5)]

    def start(self) -> None:
        weed = os.path.join(os.path.dirname(sys.executable), "weed")
        master, volume, filer = self.s3_port + 1, self.s3_port + 2, self.s3_port + 3
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))} | {
            "GOMEMLIMIT": "1GiB"
        }
        identities = os.path.join(self.dir, "s3.json")
        with open(identities, "w") as f:
            json.dump({"identities": [{
                "name": "corevault",
                "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)  # fmt: skip
        self.proc = subprocess.Popen(
            [
                weed, f"-logdir={self.dir}/logs", "mini", f"-dir={self.dir}/data", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.port={self.s3_port}", f"-master.port={master}",
                f"-volume.port={volume}", f"-filer.port={filer}", "-admin.ui=false",
                f"-s3.config={identities}", "-master.telemetry=false",
            ],
            stdout=open(os.path.join(self.dir, "out.log"), "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        # weed mini starts its master, volume and filer before the gateway: under load, > 30 s.
        # Its port opening says little (the gateway has refused requests for a while after):
        # ready is when an object goes in and comes back out.
        wait_port(self.s3_port, timeout=90, proc=self.proc)
        wait_s3(self.endpoint, self.bucket, timeout=90, proc=self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        with suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        for port in (*self.ports, *(p + 10000 for p in self.ports)):
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with suppress(OSError):
                    os.unlink(sock)


def wait_s3(endpoint: str, bucket: str, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    """Wait until the S3 server at ``endpoint`` really answers: ``bucket`` made (or there
    already), and a small object written to it, read back whole and deleted, each with the
    tests' own credentials. A gateway that takes connections but drops them, refuses requests
    for now (its filer or volumes not up) or answers with another's data is not ready. With
    ``proc``, fail at once when it has exited."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=5,
                      read_timeout=10),
    )  # fmt: skip
    probe, body = f"ready-{os.getpid()}-{time.monotonic_ns()}", os.urandom(64)
    deadline = time.monotonic() + timeout
    while True:
        try:
            # there already: a restart over the same data
            with suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=probe, Body=body)
            if s3.get_object(Bucket=bucket, Key=probe)["Body"].read() == body:
                s3.delete_object(Bucket=bucket, Key=probe)
                return
            error: Exception = RuntimeError("the object read back is not the one written")
        except Exception as e:  # refused, dropped, not there yet: asked again until the deadline
            error = e
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering S3 requests")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no S3 answer from {endpoint} after {timeout}s: {error}")
        time.sleep(0.1)


#: times ``weed mini`` is started on fresh ports when it exits before it answers
SEAWEED_STARTS = 3


def _log_tail(path: str, size: int = 2000) -> str:
    with suppress(OSError), open(path, "rb") as f:
        f.seek(max(os.fstat(f.fileno()).st_size - size, 0))
        return f.read().decode(errors="replace").strip()
    return ""


@contextmanager
def seaweed() -> Iterator[Seaweed]:
    """A started ``weed mini``. One that exits before it answers (seen now and then: a port of
    its range taken between the check and its bind, by another process of the machine) is
    started again on other ports, with a fresh directory; the last failure says what its log said."""
    for attempt in range(SEAWEED_STARTS):
        d = tempfile.mkdtemp(prefix="cv-weed-")
        server = Seaweed(d, seaweed_base())
        try:
            server.start()
        except RuntimeError as e:
            exited = server.proc is not None and server.proc.poll() is not None
            log = _log_tail(os.path.join(d, "out.log"))
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
            if exited and attempt + 1 < SEAWEED_STARTS:
                print(f"weed mini exited before it answered, started again: {log[-300:]}", file=sys.stderr)
                continue
            raise RuntimeError(f"{e}; its log ends: {log}") from e
        except BaseException:
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
            raise
        try:
            yield server
        finally:
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
        return


@dataclass
class Postgres:
    dir: str
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://corevault@127.0.0.1:{self.port}/corevault"

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        # PostgreSQL refuses to run as root: root runs it as its own user, anyone else as themselves
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*user, os.path.join(bindir, args[0]), *args[1:]],
            capture_output=True, text=True, check=check, timeout=120,
        )  # fmt: skip

    def init(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._pg("initdb", "-D", f"{self.dir}/data", "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self._pg("createuser", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "corevault")
        self._pg(
            "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-O",
            "corevault",
            "corevault",
        )

    def database(self, name: str) -> str:
        """A new empty database owned by corevault; returns its URL."""
        self._pg(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-O", "corevault", name
        )
        return f"postgresql+psycopg://corevault@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=100"
        )
        self._pg("pg_ctl", "-D", f"{self.dir}/data", "-o", opts, "-l", f"{self.dir}/log", "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", f"{self.dir}/data", "-m", mode, "-w", "stop", check=False)


@contextmanager
def postgres() -> Iterator[Postgres]:
    d = tempfile.mkdtemp(prefix="cv-pg-")
    server = Postgres(d, free_port())
    try:
        server.init()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def asgi(
    app: object, http: str = "auto", loop: str = "auto", tls: tuple[str, str] | None = None
) -> Iterator[str]:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a thread of this process; yields its URL.
    ``http`` and ``loop`` as uvicorn takes them: by default what ``corevault serve`` runs
    (httptools and uvloop), ``"h11"`` and ``"asyncio"`` for its fallbacks; ``tls``: a certificate
    and its key to serve HTTPS with."""
    import threading

    import uvicorn

    from corevault.server import zerocopy

    zerocopy.install()  # as corevault serve runs it
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="auto",  # as corevault serve runs it: the app closes what it opened on the way out
            http=http,
            loop=loop,  # type: ignore[arg-type]
            ssl_certfile=tls and tls[0],
            ssl_keyfile=tls and tls[1],
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
