"""An egress proxy on 127.0.0.1, as clusters put between their nodes and an object store: Debian's
tinyproxy (``tinyproxy-bin``), started on a free port and stopped by the context manager.

It lists the requests it passed, from its own log: a forwarded one as ``("PUT",
"http://host:port/bucket/key")``, a tunnel as ``("CONNECT", "host:port")``. ``refuse`` makes it
answer every request 403 (a filter that lists no host, as a proxy that does not allow the
store); ``credentials`` makes it ask for them (407) unless the client gives them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from testbed.servers import free_port, wait_port

REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclass
class Egress:
    port: int
    log: str
    #: the user and password it asks for, if any
    credentials: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        user, password = self.credentials or ("", "")
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """The requests it was sent so far, in order: (method, target)."""
        with open(self.log, errors="replace") as f:
            return [m.groups() for m in REQUEST.finditer(f.read())]


@contextmanager
def egress(*, refuse: bool = False, credentials: tuple[str, str] | None = None) -> Iterator[Egress]:
    d = tempfile.mkdtemp(prefix="cv-egress-")
    port = free_port()
    log = os.path.join(d, "tinyproxy.log")
    lines = [
        f"Port {port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 60", "MaxClients 64",
        "LogLevel Connect", f'LogFile "{log}"', "DisableViaHeader Yes",
    ]  # fmt: skip
    if refuse:
        open(os.path.join(d, "filter"), "w").close()
        lines += [f'Filter "{os.path.join(d, "filter")}"', "FilterDefaultDeny Yes"]
    if credentials is not None:
        lines.append("BasicAuth {} {}".format(*credentials))
    conf = os.path.join(d, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    open(log, "w").close()
    proc = subprocess.Popen(
        ["tinyproxy", "-d", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc=proc)
        yield Egress(port, log, credentials)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)
