"""A crash group's state is kept per namespace: one tenant's crash never alters another's state.

A group is a signature, a hash of function names the crashing binary chooses: a pod of
tenant-a running the same public image, or copying tenant-b's symbol names, crashes into
tenant-b's group. Its crash regresses, reopens and counts toward an ignore in tenant-a only,
and tenant-b's readers keep changing the state in tenant-b. Also here: the migration that
copied each group's one state (schema v3-v16) to every namespace it crashed in.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest
import sqlalchemy as sa

from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import catalog, lifecycle, migrations
from testbed import runc, servers
from tests.conftest import Capture, catalog_at
from tests.tenants import analysed, pod
from tests.triage_data import add

NOW = 1_790_000_000
HOUR = 3600
TOKENS = {"a": "tenant-a-ops-token-0123456789", "b": "tenant-b-ops-token-0123456789"}


def _next_second() -> None:
    """Wait for the next whole second: a crash's time is in seconds, and one in the second a state
    was set in counts as before it (analysed late), which would pass these tests for the wrong reason."""
    time.sleep(1.001 - time.time() % 1)


def _ship_new(capture: Capture, settings, shipped: set[str]) -> None:
    """Hand the node's agent the capture's entries it has not had yet, and run one pass of it."""
    from corevault import spool
    from corevault.agent.loop import Agent

    for entry in spool.entries(capture.spool):
        if entry not in shipped:
            shutil.copytree(os.path.join(spool.ready_dir(capture.spool), entry),
                            os.path.join(spool.ready_dir(settings.spool_dir), entry))  # fmt: skip
            shipped.add(entry)
    shutil.copytree(capture.store, settings.buildid_dir, dirs_exist_ok=True)
    Agent(settings).run(once=True)


@pytest.mark.crash
def test_a_pod_crashing_into_another_tenants_group_leaves_that_tenants_state_alone(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    from corevault import spool

    root = runc.build_rootfs(str(tmp_path / "root"), {"crasher": programs["crasher"]})
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "web-b-0"))
    settings = analysed(capture, tmp_path)
    shipped = set(spool.entries(capture.spool))
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nname = "ann"\ntoken = "{TOKENS["a"]}"\nnamespaces = ["tenant-a"]\nupdate = true\n'
        f'[[token]]\nname = "bob"\ntoken = "{TOKENS["b"]}"\nnamespaces = ["tenant-b"]\nupdate = true\n'
    )
    tokens.chmod(0o600)

    def call(who: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKENS[who]}"}
        return httpx.request(method, url + path, headers=headers, json=body, timeout=30)

    with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as url:
        [group] = call("b", "GET", "/api/v1/groups").json()["items"]
        sig = group["signature"]
        ignore = {"state": "ignored", "crashes": 2}
        assert call("b", "POST", f"/api/v1/groups/{sig}/state", {"state": "resolved"}).status_code == 200

        # tenant-a's pod runs the same binary and crashes the same way, after the fix was declared
        _next_second()
        capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-a", "web-a-0"))
        _ship_new(capture, settings, shipped)
        seen_by_b = call("b", "GET", f"/api/v1/groups/{sig}").json()
        assert seen_by_b["status"]["state"] == "resolved" and seen_by_b["status"]["actor"] == "bob"
        assert [h["state"] for h in seen_by_b["history"]] == ["resolved"]
        assert call("b", "GET", "/api/v1/groups").json()["items"] == []  # not back in b's list
        seen_by_a = call("a", "GET", f"/api/v1/groups/{sig}").json()
        assert seen_by_a["status"]["state"] == "open"  # new to tenant-a: nothing of b's resolve shows
        assert "bob" not in json.dumps(seen_by_a)

        # b may still change it (in b), and ignores it for 2 more crashes; a's crashes do not count
        r = call("b", "POST", f"/api/v1/groups/{sig}/state", ignore)
        assert r.status_code == 200 and r.json()["changes_in"] == ["tenant-b"]
        assert r.json()["status"]["ignore_until_count"] == 3
        for _ in range(2):
            capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-a", "web-a-0"))
        _ship_new(capture, settings, shipped)
        assert call("b", "GET", f"/api/v1/groups/{sig}").json()["status"]["state"] == "ignored"
        assert call("a", "GET", f"/api/v1/groups/{sig}").json()["count"] == 3
        # a's own resolve is a's alone, and b's crash regresses b's state only
        assert call("a", "POST", f"/api/v1/groups/{sig}/state", {"state": "resolved"}).status_code == 200
        assert call("b", "POST", f"/api/v1/groups/{sig}/state", {"state": "resolved"}).status_code == 200
        _next_second()
        capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "web-b-0"))
        _ship_new(capture, settings, shipped)
        assert call("b", "GET", f"/api/v1/groups/{sig}").json()["status"]["state"] == "regressed"
        assert call("a", "GET", f"/api/v1/groups/{sig}").json()["status"]["state"] == "resolved"
    with catalog.connect(settings.catalog_url).connect() as conn:
        events = conn.execute(sa.select(lifecycle.group_events.c.kind, lifecycle.group_events.c.namespace))
        assert ("regressed", "tenant-a") not in set(events)


def test_an_ignore_counts_the_crashes_of_its_own_namespace(engine: sa.Engine) -> None:
    add(engine, signature="g", frames=["f"], namespace="a", when=NOW - 5 * HOUR)
    add(engine, signature="g", frames=["f"], namespace="b", when=NOW - 5 * HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "g", lifecycle.Change("ignored", crashes=2), "alice", namespaces=["a", "b"])
    for i in range(3):
        add(engine, signature="g", frames=["f"], namespace="b", when=NOW - HOUR + i)
    add(engine, signature="g", frames=["f"], namespace="a", when=NOW - HOUR)
    with engine.connect() as conn:
        each = {s["namespace"]: s["state"] for s in lifecycle.state_of(conn, "g", now=NOW)["namespaces"]}
        assert each == {"a": "ignored", "b": "open"}
        a_only = catalog.list_groups(conn, visible={"a"}, states=["ignored"], now=NOW)
        assert [g["state"] for g in a_only] == ["ignored"]
        assert [g["state"] for g in catalog.list_groups(conn, now=NOW)] == ["open"]  # the most urgent
        with pytest.raises(lifecycle.StateError, match="no crash in the namespaces"):
            lifecycle.change(conn, "g", lifecycle.Change("open"), "eve", namespaces=["c"])


def test_an_image_known_in_another_namespace_does_not_hide_a_regression(engine: sa.Engine) -> None:
    old, new = "registry.example/web:1", "registry.example/web:2"
    add(engine, signature="x", frames=["other"], namespace="a", image=old, when=NOW - 9 * HOUR)
    add(engine, signature="g", frames=["f"], namespace="b", image=new, when=NOW - 5 * HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "g", lifecycle.Change("resolved", resolved_in=new), "bob", NOW - 4 * HOUR)
    add(engine, signature="g", frames=["f"], namespace="b", image=old, when=NOW - HOUR)
    with engine.connect() as conn:
        assert lifecycle.state_of(conn, "g", ["b"])["state"] == "regressed"


def test_version_17_copies_each_groups_state_to_every_namespace_it_crashed_in(catalog_url: str) -> None:
    engine = catalog_at(catalog_url, 16)
    for sig, ns, n in (("r", "a", 1), ("r", "b", 1), ("i", "a", 2), ("i", "b", 1), ("o", "a", 1)):
        for k in range(n):
            add(engine, signature=sig, frames=[sig], namespace=ns, when=NOW - HOUR + k)
    with engine.begin() as conn:  # the tables as schema v16 had them: one state per group
        conn.exec_driver_sql("DROP TABLE group_states")
        conn.exec_driver_sql(
            "CREATE TABLE group_states (signature VARCHAR(32) PRIMARY KEY, state VARCHAR(16) NOT NULL, "
            "since FLOAT NOT NULL, actor VARCHAR(255), resolved_in VARCHAR(512), ignore_until BIGINT, "
            "ignore_until_count INTEGER)"
        )
        conn.exec_driver_sql("ALTER TABLE group_history DROP COLUMN namespace")
        conn.exec_driver_sql(
            "INSERT INTO group_states VALUES ('r', 'resolved', 100.0, 'alice', 'registry.example/web:2', NULL, NULL),"
            " ('i', 'ignored', 200.0, 'bob', NULL, NULL, 5)"
        )
        conn.exec_driver_sql(
            "INSERT INTO group_history (signature, time, actor, state, detail) VALUES "
            "('r', 100.0, 'alice', 'resolved', '{}'), ('i', 200.0, 'bob', 'ignored', '{\"crashes\": 2}')"
        )
    engine.dispose()
    engine = catalog.connect(catalog_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.max(migrations.schema.c.version))).scalar() == 17
        rows = conn.execute(sa.select(lifecycle.group_states).order_by("signature", "namespace")).all()
        got = {
            (r.signature, r.namespace): (r.state, r.actor, r.resolved_in, r.ignore_until_count) for r in rows
        }
        assert got == {
            ("i", "a"): ("ignored", "bob", None, 4),  # 2 more crashes (of the group's 3, until 5) in each
            ("i", "b"): ("ignored", "bob", None, 3),
            ("r", "a"): ("resolved", "alice", "registry.example/web:2", None),
            ("r", "b"): ("resolved", "alice", "registry.example/web:2", None),
        }
        assert [(h["state"], h["namespaces"]) for h in lifecycle.history(conn, "i")] == [
            ("ignored", ["a", "b"])
        ]
        assert [h["namespaces"] for h in lifecycle.history(conn, "r", {"b"})] == [["b"]]
        h = lifecycle.group_history.c
        assert conn.execute(sa.select(sa.func.count()).where(h.namespace.is_(None))).scalar() == 0
    add(engine, signature="i", frames=["i"], namespace="b", when=NOW)
    add(engine, signature="r", frames=["r"], namespace="a", when=NOW)
    with engine.connect() as conn:
        each = {s["namespace"]: s["state"] for s in lifecycle.state_of(conn, "i")["namespaces"]}
        assert each == {"a": "ignored", "b": "ignored"}  # b: 2 of its 3, one more to go
        each = {s["namespace"]: s["state"] for s in lifecycle.state_of(conn, "r")["namespaces"]}
        assert each == {"a": "regressed", "b": "resolved"}
    engine.dispose()
