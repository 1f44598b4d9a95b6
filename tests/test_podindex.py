"""The node-local pod index that the agent writes and the handler reads."""

from __future__ import annotations

import os

from corevault import podindex

POD = {
    "uid": "2635b91a-c212-48d1-802f-cc23cb6d12af",
    "namespace": "shop",
    "name": "cart-0",
    "annotations": {"corevault.io/core-pattern": "/data/c"},
    "containers": {"cart": {"id": "a" * 64, "image": "cart:1"}, "sidecar": {"id": None, "image": "envoy"}},
}


def test_round_trip_by_pod_and_by_container(tmp_path) -> None:
    podindex.write_pod(str(tmp_path), POD)
    pod = podindex.read_pod(str(tmp_path), POD["uid"])
    assert pod is not None and pod["annotations"] == POD["annotations"] and pod["deleted_at"] is None
    container = podindex.read_container(str(tmp_path), "a" * 64)
    assert container == {
        "version": 1,
        "id": "a" * 64,
        "pod_uid": POD["uid"],
        "name": "cart",
        "image": "cart:1",
    }
    assert sorted(os.listdir(tmp_path / "containers")) == ["a" * 64 + ".json"]


def test_keys_never_leave_the_index(tmp_path) -> None:
    (tmp_path / "secret.json").write_text("{}")
    assert podindex.read_pod(str(tmp_path / "pods"), "../secret") is None
    assert podindex.read_container(str(tmp_path), "../secret") is None
    assert podindex.read_pod(str(tmp_path), ".hidden") is None


def test_unreadable_entries_are_unknown(tmp_path) -> None:
    (tmp_path / "pods").mkdir()
    (tmp_path / "pods" / "x.json").write_text("{not json")
    assert podindex.read_pod(str(tmp_path), "x") is None
