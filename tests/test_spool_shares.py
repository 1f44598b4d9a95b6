"""The spool's room for a new entry: its own limits, and what is left of its tenants' shares."""

from __future__ import annotations

import os

from corevault import spool

MIB = 1 << 20


def entry(root: str, name: str, size: int, owners: list[str]) -> None:
    d = os.path.join(spool.ready_dir(root), name)
    os.mkdir(d)
    with open(os.path.join(d, spool.CORE_NAME), "wb") as f:
        f.write(os.urandom(size))  # not sparse: the blocks are counted
    spool.write_owner(d, owners)


def test_a_pods_room_is_what_is_left_of_its_share(tmp_path) -> None:
    root = str(tmp_path)
    spool.ensure(root)
    entry(root, "a1", 3 * MIB, ["p-a", "n-x"])
    entry(root, "b1", 1 * MIB, ["p-b", "n-x"])
    total, owned = spool.usage_by_owner(root)
    assert owned["p-a"] >= 3 * MIB and owned["n-x"] == owned["p-a"] + owned["p-b"] and total >= 4 * MIB

    room, binding = spool.room(root, 16 * MIB, 0, {"p-a": 0.25, "n-x": 0.5})
    assert binding == "p-a" and room == 4 * MIB - owned["p-a"]
    room, binding = spool.room(root, 16 * MIB, 0, {"p-c": 0.25, "n-y": 0.5})
    assert binding == "p-c" and room == 4 * MIB  # a pod with nothing in the spool has all its share
    room, binding = spool.room(root, 16 * MIB, 0, {"p-c": 0.9, "n-x": 0.5})
    assert binding == "n-x" and room == 8 * MIB - owned["n-x"]
    room, binding = spool.room(root, 16 * MIB, 0, {})
    assert binding is None and room == 16 * MIB - total


def test_an_entry_without_owners_counts_for_the_spool_only(tmp_path) -> None:
    root = str(tmp_path)
    spool.ensure(root)
    os.mkdir(os.path.join(spool.tmp_dir(root), "old"))
    with open(os.path.join(spool.tmp_dir(root), "old", spool.CORE_NAME), "wb") as f:
        f.write(os.urandom(MIB))
    total, owned = spool.usage_by_owner(root)
    assert total >= MIB and owned == {}
