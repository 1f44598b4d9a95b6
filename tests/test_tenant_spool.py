"""One pod's flood of cores never costs another pod its copy in the node spool.

Tenant A's pod crashes with incompressible memory, again and again, its cores halving
whenever one finds no room, until even its smallest core finds none: the way to fill a
spool to the last block. Then tenant B's pod (another namespace) crashes with a 1 MiB core. Nothing
ships meanwhile (no agent runs), as when the vault is unreachable.
"""

from __future__ import annotations

import pytest

from corevault import spool
from testbed import runc
from tests.conftest import Capture
from tests.tenants import of_namespace, pod

pytestmark = pytest.mark.crash
MAX = 16 << 20


def test_a_pods_flood_never_costs_another_pod_its_spool_copy(capture: Capture, rootfs: str) -> None:
    capture.configure(f"[spool]\nmax_size = {MAX}\nkeep_free = 0\n")
    kib = (
        MAX >> 11
    )  # half the spool, then halves whenever a core finds no room: the spool fills to the last block
    a_pod = runc.new_pod_uid()
    for _ in range(60):
        c = capture.crash(
            rootfs, ["/app/crasher", "noise", str(kib)], annotations=pod("tenant-a", "a-0"), pod_uid=a_pod
        )
        [last] = [
            r for r in capture.journal() if r["event"] == "captured" and r["pod"]["container_id"] == c.id
        ]
        if last["entry"] is None:  # its vault copy found no room (the pod's own volume copy is written)
            if kib == 0:
                break  # A has filled all the room it can get
            kib = kib // 2 if kib > 16 else 0
    else:
        pytest.fail(f"tenant A's smallest cores never ran out of room: {capture.journal()[-3:]}")
    assert any("spool is full" in r["reason"] for r in capture.journal() if r["event"] == "dropped")

    capture.crash(rootfs, ["/app/crasher", "noise", "1024"], annotations=pod("tenant-b", "b-0"))
    b = of_namespace(capture.journal(), "tenant-b")
    assert [r["event"] for r in b] == ["captured"] and b[0]["entry"], b
    assert [m["pod"]["namespace"] for m in capture.entries()].count("tenant-b") == 1

    total, owned = spool.usage_by_owner(capture.spool)
    assert owned["n-tenant-a"] <= MAX // 4 + (1 << 20), owned  # A's pod share, its metadata files aside
    assert total <= MAX
