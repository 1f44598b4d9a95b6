"""A real elfutils ``debuginfod`` on 127.0.0.1, standing in for a distribution's server.

debuginfod 0.188 has no option for its listening address (it binds every interface), so
it runs in a network namespace of its own that has nothing but a loopback device, and a
forwarder thread of this process relays a free port on the host's 127.0.0.1 to it: the
thread enters the namespace (``setns`` moves only the calling thread) after the
listening socket was made outside it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

CLONE_NEWNET = 0x40000000
INNER_PORT = 8002


def _relay(src: socket.socket, dst: socket.socket) -> None:
    with suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _forward(listener: socket.socket, netns: str, stop: threading.Event) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            outer, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        try:
            inner = socket.create_connection(("127.0.0.1", INNER_PORT), timeout=10)
        except OSError:
            outer.close()
            continue
        outer.settimeout(None)
        inner.settimeout(None)
        for a, b in ((outer, inner), (inner, outer)):
            threading.Thread(target=_relay, args=(a, b), daemon=True).start()


@contextmanager
def serve(files: list[str], ready_build_id: str, timeout: float = 60) -> Iterator[str]:
    """Serve the ELF files ``files`` (debug files included); yields the server's URL.

    Returns once the server answers for ``ready_build_id`` (its first scan is done).
    """
    work = tempfile.mkdtemp(prefix="cv-debuginfod-")
    tree = os.path.join(work, "files")
    os.mkdir(tree)
    for i, path in enumerate(files):
        os.symlink(path, os.path.join(tree, f"{i}-{os.path.basename(path)}"))
    script = (
        "ip link set lo up && exec debuginfod -F -L --disable-source-scan -t 0 -g 0 -c 1 "
        f"-p {INNER_PORT} -d {work}/db.sqlite {tree}"
    )
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "log"), "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()
    forwarder = None
    try:
        time.sleep(0.1)  # unshare has made the namespace before it execs sh
        forwarder = threading.Thread(
            target=_forward, args=(listener, f"/proc/{proc.pid}/ns/net", stop), daemon=True
        )
        forwarder.start()
        _wait_ready(f"{url}/buildid/{ready_build_id}/debuginfo", proc, work, timeout)
        yield url
    finally:
        stop.set()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if forwarder is not None:
            forwarder.join(5)
        listener.close()
        shutil.rmtree(work, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen, work: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=5) as response:
            if response.status_code == 200:  # debuginfod answers HEAD with 400
                return
        time.sleep(0.2)
    with open(os.path.join(work, "log"), "rb") as f:
        log = f.read()[-500:].decode(errors="replace")
    raise RuntimeError(f"debuginfod did not serve {url} within {timeout}s: {log}")
