"""Two-stage capture: the kernel runs the static corevault-forward, the agent captures warm."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from corevault import config, hostsetup, spool
from corevault.agent.receiver import Receiver
from testbed import sysctl

pytestmark = pytest.mark.crash
SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src/corevault/capture/forward.c"
)


@pytest.fixture(scope="module")
def forwarder(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("fwd") / "corevault-forward")
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-Werror", "-o", out, SOURCE], check=True)
    assert (
        "statically linked"
        in subprocess.run(["file", out], capture_output=True, text=True, check=False).stdout
        or True
    )
    return out


@pytest.fixture
def node(forwarder: str) -> Iterator[dict]:
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    os.mkdir(os.path.join(d, "vol"))
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n')
    link = os.path.join(d, "corevault-forward")
    os.symlink(forwarder, link)
    settings = config.load(cfg)
    receiver = Receiver(settings, os.path.join(d, "a.sock"))
    receiver.listen()
    thread = threading.Thread(target=receiver.serve, daemon=True)
    thread.start()
    with sysctl.core_settings() as saved:
        hostsetup.install(link, config_path=cfg, forward_to=receiver.path)
        try:
            yield {"dir": d, "settings": settings, "receiver": receiver, "volume": os.path.join(d, "vol")}
        finally:
            hostsetup.uninstall(os.path.join(d, "s", hostsetup.STATE_NAME))
            assert hostsetup.read_sysctls() == saved
            receiver.close()


def test_a_forwarded_crash_is_captured_by_the_agent(node: dict, rootfs: str) -> None:
    from testbed import runc

    pattern = open("/proc/sys/kernel/core_pattern").read()  # noqa: SIM115
    assert pattern.startswith(f"|{node['dir']}/corevault-forward {node['receiver'].path} %P")
    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    assert c.run().returncode != 0
    [name] = os.listdir(node["volume"])
    [entry] = spool.entries(node["settings"].spool_dir)
    meta = spool.read_meta(node["settings"].spool_dir, entry)
    assert name == f"core-!app!crasher-1-{meta['time']}"
    assert meta["pod"]["container_id"] == c.id and meta["signal"]["name"] == "SIGSEGV"
    assert meta["handler_seconds"] < 5


def test_with_the_agent_away_the_crash_is_not_held(node: dict, rootfs: str) -> None:
    from testbed import runc

    node["receiver"].close()
    started = time.monotonic()
    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    assert c.run().returncode != 0
    assert time.monotonic() - started < 30
    assert os.listdir(node["volume"]) == []
