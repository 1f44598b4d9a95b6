"""Two tenants on one node: pods in different namespaces, and what tests need to watch them."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress

from testbed import runc
from tests.waiting import wait_for

SEED = "/data/dump-a/core-%p"


def pod(namespace: str, name: str, pattern: str = SEED) -> dict[str, str]:
    """OCI annotations of a pod that opted in (runc carries them as the kubelet's runtime would)."""
    return {
        "corevault.io/core-pattern": pattern,
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": name,
    }


def processes(*needles: bytes) -> list[int]:
    """PIDs of the host's processes whose command line holds every one of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                found.append(int(entry))
    return found


RUN_SLACK = 0.05  # s: more than the slack of a container run's start (0.02) and a 10 ms tick


@contextmanager
def held_handler(
    handler: str,
    run: Callable[[], object],
    *,
    reading: bool,
    ready: Callable[[], bool] = lambda: True,
    besides: Collection[int] = (),
    crashed: Callable[[], int | None] | None = None,
) -> Iterator[list[int]]:
    """``run`` (a container's run) on a thread of its own, and its crash's handler, the launcher
    ``handler``, stopped (SIGSTOP) while it still reads the pipe (``reading``) or once it has let go
    of it, as soon as ``ready()``. Yields the stopped handlers: none when it ended first. On leaving
    they go on (SIGCONT), the run is joined and, unless the body failed, their end awaited.
    ``besides``: handlers held already (by an enclosing use), which are not this run's.
    ``crashed``: the crashed process's host PID once it is known (None until then); only the
    handler the kernel gave that PID (``%P``) is held, not one of another crash on the host (the
    pattern is the host's: any process that crashes meanwhile has its handler too)."""
    thread = threading.Thread(target=run)
    thread.start()
    held: list[int] = []

    def wanted(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:") == reading
        except (ProcessLookupError, FileNotFoundError):
            return False  # ended meanwhile

    known: list[int] = []  # the crashed PID, asked for until given

    def stopped() -> bool:
        needles = [handler.encode()]
        if crashed is not None:
            if not known and (host_pid := crashed()) is not None:
                known.append(host_pid)
            if not known:
                return not thread.is_alive()
            needles.append(b"\0%d\0" % known[0])
        if ready():
            for pid in set(processes(*needles)) - set(besides):
                if wanted(pid):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        # looked at again once stopped: it may have let go of the pipe in between
                        if wanted(pid):
                            held.append(pid)
                            return True
                        os.kill(pid, signal.SIGCONT)
        return not thread.is_alive()

    try:
        wait_for(stopped, timeout=120)
        # A container run waits for the kernel's helpers started since it began, with a tick of
        # slack (testbed.runc.Container.run): one begun within that tick of a held handler's start
        # would take the handler for its own and wait for it, while the handler waits for the
        # body to end. The body starts once the held handlers are older than that slack.
        wait_for(lambda: not set(held) & set(runc.dump_helpers(runc.uptime() - RUN_SLACK)), timeout=5)
        yield held
    finally:
        for pid in held:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        thread.join(180)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in held), timeout=60)


def of_namespace(records: list[dict], namespace: str) -> list[dict]:
    return [r for r in records if (r.get("pod") or {}).get("namespace") == namespace]


def node_of(capture, cfg: str):  # -> config.Settings
    """A node whose settings are ``cfg``, holding copies of ``capture``'s spool entries and stored binaries."""
    import shutil

    from corevault import config, spool

    settings = config.load(cfg)
    spool.ensure(settings.spool_dir)
    for entry in spool.entries(capture.spool):
        shutil.copytree(os.path.join(spool.ready_dir(capture.spool), entry),
                        os.path.join(spool.ready_dir(settings.spool_dir), entry))  # fmt: skip
    shutil.copytree(capture.store, settings.buildid_dir, dirs_exist_ok=True)
    return settings


def slack_sink(url: str) -> str:
    """Config sections for alerts to a Slack webhook at ``url``/slack, of tenant A's groups."""
    return (
        f'[alerts]\nurl = "https://corevault.example"\n'
        f'[[alerts.sink]]\nname = "chat"\nkind = "slack"\nurl = "{url}/slack"\nnamespaces = ["tenant-a"]\n'
    )


def analysed(capture, tmp_path, sections: str = ""):  # -> config.Settings
    """``capture``'s crashes after one pass of the agent of a node (config ``tmp_path``/c.toml,
    holding ``sections`` besides its state dir); the node's settings."""
    from corevault.agent.loop import Agent

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/node"\n[agent]\nmetrics = ""\n' + sections)
    settings = node_of(capture, str(cfg))
    Agent(settings).run(once=True)
    return settings


def crashes_of(settings) -> dict[str, dict]:
    """The catalog's crash of each namespace, in full (its report too)."""
    from corevault.vault import catalog

    with catalog.connect(settings.catalog_url).connect() as conn:
        return {c["namespace"]: catalog.get_crash(conn, c["id"]) for c in catalog.list_crashes(conn)}


def alerts_sent(settings) -> int:
    """Deliver the alerts the agent queued (one round of the outbox); how many went out."""
    import httpx

    from corevault.alerts import outbox, sinks
    from corevault.vault import catalog

    alerting = sinks.parse(settings.alerts)
    assert alerting is not None
    with httpx.Client(timeout=10) as client:
        return outbox.run_once(catalog.connect(settings.catalog_url), alerting, client)
