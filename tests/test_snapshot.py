"""Snapshots of live processes in runc pods: written, kept and explained like crashes, the process going on.

These need root (runc, ptrace) but not the kernel's core settings: a snapshot never goes
through core_pattern.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corevault import spool
from testbed import runc

pytestmark = pytest.mark.crash

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
PATTERN = "/data/dump-a/core-%e-%p-%t"


@dataclass
class Node:
    config: str
    state: str
    volume: str

    @property
    def spool(self) -> str:
        return os.path.join(self.state, "spool")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, "-c", self.config, *args], capture_output=True, text=True, check=False)

    def journal(self) -> list[dict]:
        return [r for r in spool.read_journal(self.spool) if r.get("transport") == "snapshot"]

    def report(self, entry: str) -> dict:
        out = self.cli("analyze", entry, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def node(tmp_path) -> Node:
    state, volume = tmp_path / "state", tmp_path / "vol"
    volume.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{state}"\n')
    return Node(str(config), str(state), str(volume))


def pod(namespace: str, name: str, opted_in: bool = True) -> dict[str, str]:
    annotations = {
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": name,
        "io.kubernetes.container.name": "app",
    }
    if opted_in:
        annotations["corevault.io/core-pattern"] = PATTERN
    return annotations


#: a process name (its comm, which a pattern's ``%e`` expands to) that, printed as it is, sets
#: the terminal's title and clears its screen
HOSTILE = "h\x1b]2;pwn\x07\x1b[2J"


@pytest.fixture(scope="module")
def hostile_rootfs(programs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A root whose ``hang`` is named :data:`HOSTILE`."""
    return runc.build_rootfs(str(tmp_path_factory.mktemp("hostile") / "root"), {HOSTILE: programs["hang"]})


@pytest.fixture
def live(rootfs: str, node: Node) -> Iterator:
    """Start ``/app/hang MODE`` in a pod (``root``: another rootfs, and the program's name in it);
    yields (container, process)."""
    started = []

    def start(
        mode: str,
        *args: str,
        annotations: dict[str, str] | None = None,
        root: tuple[str, str] = (rootfs, "hang"),
    ):
        c = runc.Container(root[0], [f"/app/{root[1]}", mode, *args], volume=node.volume,
                           annotations=annotations or pod("shop", "stuck-0"))  # fmt: skip
        cm = c.running()
        proc = cm.__enter__()
        started.append(cm)
        return c, proc

    yield start
    for cm in reversed(started):
        cm.__exit__(None, None, None)


def release(node: Node, proc: subprocess.Popen) -> tuple[int, str]:
    """Let the process end by itself; its exit status and what it printed."""
    open(os.path.join(node.volume, "release"), "w").close()
    out, _ = proc.communicate(timeout=30)
    os.unlink(os.path.join(node.volume, "release"))
    return proc.returncode, out


def snapshot(node: Node, *args: str) -> dict:
    out = node.cli("snapshot", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def thread_functions(report: dict) -> list[list[str]]:
    return [[f.get("function") or "" for f in t["frames"]] for t in report["threads"]]


def test_deadlock_snapshot_shows_both_threads_in_the_lock_and_the_process_goes_on(live, node: Node) -> None:
    c, proc = live("deadlock")
    outcome = snapshot(node, "--pod", "shop/stuck-0", "--reason", "requests hang")
    assert outcome["pid"] == c.pid() and not outcome["killed"]
    assert proc.poll() is None, "the process must keep running after its snapshot"

    [core] = [n for n in os.listdir(node.volume) if n.startswith("core-hang-1-")]
    assert os.stat(os.path.join(node.volume, core)).st_size == outcome["size"]
    meta = spool.read_meta(node.spool, outcome["entry"])
    assert meta["snapshot"]["reason"] == "requests hang" and meta["snapshot"]["requested_by"]
    assert meta["snapshot"]["stopped_seconds"] > 0
    assert meta["pod"]["namespace"] == "shop" and meta["pod"]["name"] == "stuck-0"

    report = node.report(outcome["entry"])
    assert report["signal"]["number"] == 0 and report["signal"]["description"] == "snapshot of a live process"
    assert not any(t["crashed"] for t in report["threads"])
    blocked = {}
    for names in thread_functions(report):
        for mine in ("take_first_then_second", "take_second_then_first"):
            if mine in names:
                blocked[mine] = names[: names.index(mine)]
    assert set(blocked) == {"take_first_then_second", "take_second_then_first"}
    for inner in blocked.values():  # each program function waits inside the mutex lock
        assert any("mutex_lock" in n or "lll_lock" in n for n in inner), inner
    assert report["title"].startswith("snapshot: 3 threads in ")
    [record] = [r for r in node.journal() if r["event"] == "captured"]
    assert record["snapshot"]["reason"] == "requests hang"

    assert release(node, proc)[0] == 0, "the snapshotted process must later exit normally"


def test_the_same_deadlock_twice_is_one_group_and_a_busy_loop_another(live, node: Node) -> None:
    signatures = []
    for name in ("stuck-1", "stuck-2"):
        _, proc = live("deadlock", annotations=pod("shop", name))
        signatures.append(node.report(snapshot(node, "--pod", f"shop/{name}")["entry"])["signature"])
        release(node, proc)
    _, proc = live("spin", annotations=pod("shop", "busy-0"))
    spin = node.report(snapshot(node, "--pod", "shop/busy-0")["entry"])
    assert signatures[0] == signatures[1]
    assert spin["signature"] != signatures[0]
    assert any("spin_forever" in names for names in thread_functions(spin))
    status, out = release(node, proc)
    assert status == 0
    # The spinner measured its own longest pause: the process was stopped, and not for long.
    pause_us = int(out.split("longest pause ")[1].split()[0])
    assert pause_us > 0


def test_a_process_name_with_terminal_escapes_is_printed_as_text(
    live, node: Node, hostile_rootfs: str
) -> None:
    """The core's path in the pod holds the process's name (``%e``): printed as data."""
    live("deadlock", root=(hostile_rootfs, HOSTILE))
    out = node.cli("snapshot", "--pod", "shop/stuck-0")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout, out.stdout
    assert "core in the pod: /data/dump-a/core-h\\x1b]2;pwn\\x07\\x1b[2J-1-" in out.stdout, out.stdout


def test_kill_ends_the_process_after_its_core_is_kept(live, node: Node) -> None:
    _, proc = live("deadlock")
    outcome = snapshot(node, "--pod", "shop/stuck-0", "--kill")
    assert outcome["killed"]
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert spool.read_meta(node.spool, outcome["entry"])["snapshot"]["kill"] is True


def test_a_pod_that_did_not_opt_in_is_refused_and_left_alone(live, node: Node) -> None:
    _, proc = live("deadlock", annotations=pod("shop", "private-0", opted_in=False))
    out = node.cli("snapshot", "--pod", "shop/private-0")
    assert out.returncode == 1
    assert (
        out.stderr.startswith("corevault: error: ")
        and "opt" in out.stderr
        and len(out.stderr.splitlines()) == 1
    )
    assert spool.entries(node.spool) == [] and os.listdir(node.volume) == []
    [record] = node.journal()
    assert record["event"] == "skipped" and record["snapshot"]["requested_by"]
    assert proc.poll() is None
    assert release(node, proc)[0] == 0


def test_one_snapshot_at_a_time_per_container(live, node: Node) -> None:
    c, proc = live("deadlock")
    lock_dir = os.path.join(node.state, "snapshots")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, c.id + ".0"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a snapshot of this container in progress
        out = node.cli("snapshot", "--pod", "shop/stuck-0")
    assert out.returncode == 1 and "already being taken" in out.stderr
    assert [r["event"] for r in node.journal()] == ["refused"]
    assert snapshot(node, "--pod", "shop/stuck-0")["entry"]  # and once it is over, it works
    assert release(node, proc)[0] == 0


def test_a_snapshot_over_its_time_or_size_resumes_the_process(live, node: Node) -> None:
    _, proc = live("alloc", "64")
    pid = proc.pid  # runc's own pid; the container's process is found by pod
    assert pid
    out = node.cli("snapshot", "--pod", "shop/stuck-0", "--max-size", "8M")
    assert out.returncode == 1 and "larger than the snapshot cap" in out.stderr
    out = node.cli("snapshot", "--pod", "shop/stuck-0", "--timeout", "0.001")  # gdb alone starts in more
    assert out.returncode == 1 and "longer than 0.001s" in out.stderr
    assert [r["event"] for r in node.journal()] == ["refused", "refused"]
    assert spool.entries(node.spool) == [] and os.listdir(node.volume) == []
    time.sleep(0.2)
    assert proc.poll() is None
    assert release(node, proc)[0] == 0, "the process was resumed after each refusal"


def test_kubectl_snapshot_asks_the_pods_node_through_the_server_for_readers_who_may_exec(
    live, node: Node, tmp_path, hostile_rootfs: str
) -> None:
    """kubectl → corevault server (SubjectAccessReview of create pods/exec) → the agent of the pod's node.
    The process's name drives a terminal: kubectl prints the core's path in the pod, which holds it, as data."""
    import httpx

    from corevault import config
    from corevault.kube import cluster
    from corevault.server.access import KubeAccess
    from corevault.server.app import create_app
    from corevault.vault import snapshots
    from testbed import servers
    from testbed.fakekube import FakeKube

    with open(node.config, "a") as f:
        f.write(f'[vault]\nstore = "file://{node.state}/vault"\ncatalog = "sqlite:///{node.state}/catalog.db"\n'
                '[agent]\npoll_interval = 0.2\nmetrics = ""\n')  # fmt: skip
    settings = config.load(node.config)
    fake = FakeKube().start()
    agent = subprocess.Popen(
        [CLI, "-c", node.config, "agent"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        fake.users = {"alice-token": ("alice", ["dev"]), "bob-token": ("bob", ["dev"])}
        fake.grants = {("dev", "get", "pods", "shop"), ("alice", "create", "pods/exec", "shop/stuck-0")}
        fake.add("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stuck-0", "namespace": "shop"},
                          "spec": {"containers": [{"name": "app", "image": "hang"}]}, "status": {"phase": "Running"}})  # fmt: skip
        _, proc = live("deadlock", root=(hostile_rootfs, HOSTILE))
        app = create_app(settings, KubeAccess(cluster.api_client(fake.kubeconfig(str(tmp_path / "admin")))))
        with servers.asgi(app) as url:

            def kubectl(token: str, *args: str) -> subprocess.CompletedProcess:
                env = {**os.environ, "KUBECONFIG": fake.kubeconfig(str(tmp_path / token), "shop", token),
                       "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}  # fmt: skip
                env.pop("COREVAULT_TOKEN", None)
                return subprocess.run(["kubectl", "corevault", "snapshot", *args, "--server", url],
                                      capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip

            denied = kubectl("bob-token", "stuck-0", "--reason", "curious")
            assert denied.returncode == 1
            assert (
                "may not exec into pod shop/stuck-0" in denied.stderr and len(denied.stderr.splitlines()) == 1
            )

            out = kubectl("alice-token", "stuck-0", "--reason", "requests hang")
            assert out.returncode == 0, out.stderr
            assert f"taken on node {settings.node_name}" in out.stdout
            assert "\x1b" not in out.stdout and "\x07" not in out.stdout, out.stdout
            assert "core in the pod: /data/dump-a/core-h\\x1b]2;pwn\\x07\\x1b[2J-1-" in out.stdout, out.stdout
            crash_id = out.stdout.split("crash ")[1].split(":")[0]
            assert proc.poll() is None, "the process goes on"

            headers = {"Authorization": "Bearer alice-token"}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the agent ships and analyses it like a crash
                r = httpx.get(f"{url}/api/v1/crashes/{crash_id}", headers=headers)
                if r.status_code == 200 and r.json().get("analysis") == "done":
                    break
                time.sleep(0.3)
            crash = r.json()
            assert crash["analysis"] == "done" and crash["title"].startswith("snapshot: 3 threads in ")
            report = httpx.get(f"{url}/api/v1/crashes/{crash_id}/report", headers=headers).json()
            assert any("take_second_then_first" in names for names in thread_functions(report))
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        fake.stop()
    engine = __import__("corevault.vault.catalog", fromlist=["connect"]).connect(settings.catalog_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(snapshots.snapshot_requests.select()).mappings()]
    assert [(r["requested_by"], r["state"], r["reason"]) for r in rows] == [
        ("alice", "done", "requests hang")
    ]
    exec_reviews = [
        r.body["spec"]["resourceAttributes"] for r in fake.requests  # type: ignore[index]
        if r.path.endswith("subjectaccessreviews") and r.body["spec"]["resourceAttributes"].get("subresource")  # type: ignore[index]
    ]  # fmt: skip
    assert {(a["verb"], a["subresource"], a["namespace"], a["name"]) for a in exec_reviews} == {
        ("create", "exec", "shop", "stuck-0")
    }
    assert release(node, proc)[0] == 0
