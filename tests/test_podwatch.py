"""The node agent's Kubernetes side against the fake API server: pod index and Events.

The end-to-end test runs the seed's emptyDir pod for real: created through the fake API,
run as a runc container with that pod's uid and cgroup path, indexed by the agent's pod
watch, crashed, captured, shipped, and announced with a CoreDumped Event.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from corevault import config, podindex
from corevault.agent.loop import Agent
from corevault.kube.events import EventPoster
from corevault.kube.podwatch import PodWatch
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault
from testbed import runc
from testbed.fakekube import FakeKube
from tests.conftest import installed_capture
from tests.waiting import wait_for


@pytest.fixture
def api(tmp_path) -> Iterator[tuple[FakeKube, object]]:
    from kubernetes import client
    from kubernetes import config as kconfig

    fake = FakeKube().start()
    kconfig.load_kube_config(config_file=fake.kubeconfig(str(tmp_path / "kubeconfig")))
    yield fake, client.CoreV1Api()
    fake.stop()


def pod(
    name: str,
    node: str,
    container_id: str | None = None,
    uid: str | None = None,
    annotations: dict | None = None,
) -> dict:
    doc = {
        "metadata": {"name": name, "namespace": "shop", "uid": uid or os.urandom(16).hex(), "annotations": annotations or {}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.example/shop/app:2"}]},
        "status": {"phase": "Running"},
    }  # fmt: skip
    if container_id:
        doc["status"]["containerStatuses"] = [
            {"name": "app", "containerID": f"containerd://{container_id}", "image": "app"}
        ]
    return doc


@pytest.fixture
def watching(api, tmp_path) -> Iterator[tuple[FakeKube, PodWatch]]:
    fake, core = api
    w = PodWatch(core, "node-a", str(tmp_path / "pods"), keep_deleted=3600)
    t = threading.Thread(target=w.run, kwargs={"watch_seconds": 1}, daemon=True)
    t.start()
    yield fake, w
    w.stop.set()
    t.join(timeout=10)


def test_the_watch_keeps_the_nodes_pods_and_only_those(api, tmp_path) -> None:
    fake, core = api
    mine = fake.add("pods", pod("web-0", "node-a", "a" * 64))
    fake.add("pods", pod("elsewhere", "node-b", "b" * 64))
    w = PodWatch(core, "node-a", str(tmp_path / "pods"))
    w.relist()
    assert podindex.read_pod(w.index_dir, mine["metadata"]["uid"])["name"] == "web-0"
    assert podindex.read_container(w.index_dir, "a" * 64)["name"] == "app"
    assert podindex.read_container(w.index_dir, "b" * 64) is None


def test_additions_changes_and_deletions_arrive_through_the_watch(watching) -> None:
    fake, w = watching
    p = fake.add("pods", pod("web-1", "node-a"))
    uid = p["metadata"]["uid"]
    wait_for(lambda: podindex.read_pod(w.index_dir, uid) is not None, timeout=15, every=0.05)
    p["status"]["containerStatuses"] = [{"name": "app", "containerID": "containerd://" + "c" * 64}]
    fake.update("pods", p)
    wait_for(lambda: podindex.read_container(w.index_dir, "c" * 64) is not None, timeout=15, every=0.05)
    fake.delete("pods", "shop", "web-1")
    wait_for(
        lambda: (podindex.read_pod(w.index_dir, uid) or {}).get("deleted_at") is not None,
        timeout=15,
        every=0.05,
    )
    assert podindex.read_container(w.index_dir, "c" * 64) is not None  # late crashes still resolve
    assert w.sweep(now=time.time() + 7200) == [uid]
    assert podindex.read_pod(w.index_dir, uid) is None


def test_410_gone_makes_the_watch_list_again(watching) -> None:
    fake, w = watching
    wait_for(lambda: w.lists >= 1, timeout=15, every=0.05)
    before = w.lists
    late = fake.add("pods", pod("web-2", "node-a"), missed=True)  # while the watch was away…
    fake.compact()  # …and the server compacted its history: the next watch gets 410 Gone
    wait_for(
        lambda: podindex.read_pod(w.index_dir, late["metadata"]["uid"]) is not None, timeout=15, every=0.05
    )
    wait_for(lambda: w.lists > before, timeout=15, every=0.05)


def record(event: str = "captured", name: str = "web-0", **extra: object) -> dict:
    return {
        "event": event, "signal": 11, "exe": "/usr/sbin/nginx", "time": 1700000000, "volume": "/data/dump-a/core-x",
        "entry": "id-1", "pod": {"namespace": "shop", "name": name, "uid": "u-" + name, "container": "nginx"}, **extra,
    }  # fmt: skip


def test_events_for_captured_and_dropped_dumps(api) -> None:
    fake, core = api
    post = EventPoster(core, "node-a")
    assert post(record())
    assert post(
        record("dropped", reason="crash storm: 9 crashes of this container in 600s, at most 5 cores kept")
    )
    assert not post(record("skipped"))
    assert not post({**record(), "pod": {"namespace": None, "name": None}})  # a process outside Kubernetes
    first, second = fake.events
    assert first["reason"] == "CoreDumped" and first["type"] == "Warning"
    assert first["involvedObject"] == {
        "apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "u-web-0",
        "fieldPath": "spec.containers{nginx}",
    }  # fmt: skip
    assert (
        first["message"]
        == "container nginx: SIGSEGV in /usr/sbin/nginx; core at /data/dump-a/core-x and kept in the vault"
    )
    assert second["reason"] == "CoreDumpDropped" and "crash storm" in second["message"]


def test_events_are_rate_limited_in_a_storm(api) -> None:
    fake, core = api
    post = EventPoster(core, "node-a", per_minute=3)
    posted = [post(record()) for _ in range(10)]
    assert posted == [True] * 3 + [False] * 7
    post.sent.clear()  # a minute later
    assert post(record())
    assert "7 more crash events held back" in fake.events[-1]["message"]
    assert post(record(name="other-pod"))  # another pod has its own budget


@pytest.mark.crash
def test_seed_emptydir_pod_end_to_end(api, rootfs: str) -> None:
    """Created through the API, run for real, crashed: core in its volume, in the vault, and an Event."""
    fake, core = api
    with installed_capture() as cap:
        cid = runc.new_container_id()
        seed = pod(
            "coredump-emptydir-volume-test-7c9d8", os.uname().nodename, cid, uid=runc.new_pod_uid(),
            annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"},
        )  # fmt: skip
        seed["spec"]["containers"][0].update(
            name="nginx", image="registry.cn-hangzhou.aliyuncs.com/acs-sample/nginx:latest"
        )
        seed["status"]["containerStatuses"][0]["name"] = "nginx"
        fake.add("pods", seed)
        settings = config.load(cap.config)
        w = PodWatch(core, os.uname().nodename, settings.podindex_dir)
        w.relist()  # what the agent's watch thread does first
        c = cap.crash(
            rootfs, ["/app/crasher", "segv"], id=cid, pod_uid=seed["metadata"]["uid"]
        )  # no OCI annotations
        [name] = cap.volume_files()
        assert name.startswith("core-!app!crasher-1-")
        Agent(settings, on_record=EventPoster(core, os.uname().nodename)).run(once=True)
        with LocalVault(settings).engine.connect() as conn:
            [row] = catalog.list_crashes(conn)
    assert (row["namespace"], row["pod"], row["container"], row["image"]) == (
        "shop", "coredump-emptydir-volume-test-7c9d8", "nginx", "registry.cn-hangzhou.aliyuncs.com/acs-sample/nginx:latest",
    )  # fmt: skip
    assert row["signature"] and c.id == cid
    [event] = [e for e in fake.events if e["reason"] == "CoreDumped"]
    assert event["involvedObject"]["name"] == "coredump-emptydir-volume-test-7c9d8"
    assert f"core at /data/dump-a/{name}" in event["message"]


def test_agent_kubernetes_mode_indexes_pods_and_posts_events(api, tmp_path) -> None:
    """``corevault agent --kubernetes --once`` as a process: pod index from the API, Events for the journal."""
    import json
    import subprocess
    import sys

    fake, _ = api
    fake.add("pods", pod("web-0", "node-a", "d" * 64, uid="uid-web-0"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\n[agent]\nmetrics = ""\n')
    settings = config.load(str(cfg))
    os.makedirs(settings.spool_dir)
    with open(os.path.join(settings.spool_dir, "journal.jsonl"), "w") as f:
        f.write(json.dumps(record("dropped", reason="spool is full")) + "\n")
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig"), "NODE_NAME": "node-a"}
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "corevault"), "-c", str(cfg), "agent", "--kubernetes", "--once"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert podindex.read_container(settings.podindex_dir, "d" * 64)["name"] == "app"
    assert [e["reason"] for e in fake.events] == ["CoreDumpDropped"]
