"""How much of the node spool one pod can take, with and without tenant shares, in one run.

    python -m bench.spool_shares [--max-mib 64]

Tenant A's pod (a runc container with a Kubernetes cgroup path) floods the spool with
incompressible cores of shrinking sizes until one of its smallest cores finds no room, the
way an attacker fills it to the last byte; then tenant B's pod crashes with a 1 MiB core.
Run three times: with every share at 1 (the baseline: no shares, as before they existed),
with the node's defaults (``pod_share = 0.25``), and with the defaults while every crash of A
comes from a new pod of its namespace (``namespace_share = 0.5`` binds). Printed: the part
of the spool A holds (goal: at most its share) and whether B's core got its spool copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from corevault import hostsetup, spool
from testbed import build, runc, sysctl

GOAL = 0.25
NS_GOAL = 0.5


def pod(namespace: str) -> dict[str, str]:
    return {
        "corevault.io/core-pattern": "/data/dump-a/core-%p",
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": namespace + "-0",
    }


def flood(rootfs: str, max_bytes: int, shares: str, one_pod: bool = True) -> tuple[float, bool]:
    """(the part of the spool tenant A holds after its flood, whether B's core was kept).

    With ``one_pod`` false, every crash of A comes from a new pod of its namespace.
    """
    a_pod = runc.new_pod_uid()
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    try:
        handler = os.path.join(d, "h")
        os.symlink(hostsetup.default_handler(), handler)
        os.mkdir(os.path.join(d, "vol"))
        cfg = os.path.join(d, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{d}/state"\n[spool]\nmax_size = {max_bytes}\nkeep_free = 0\n{shares}')
        spool_dir = os.path.join(d, "state", "spool")
        with sysctl.core_settings():
            hostsetup.install(handler, config_path=cfg)
            try:
                kib = max_bytes >> 11
                while True:
                    c = runc.Container(rootfs, ["/app/crasher", "noise", str(kib)], volume=os.path.join(d, "vol"),
                                       annotations=pod("tenant-a"),
                                       pod_uid=a_pod if one_pod else runc.new_pod_uid())  # fmt: skip
                    c.run()
                    [last] = [r for r in spool.read_journal(spool_dir)
                              if r["event"] == "captured" and r["pod"]["container_id"] == c.id]  # fmt: skip
                    if last["entry"] is None:  # its spool copy found no room: halve, down to nothing
                        if kib == 0:
                            break
                        kib = kib // 2 if kib > 16 else 0
                runc.Container(rootfs, ["/app/crasher", "noise", "1024"], volume=os.path.join(d, "vol"),
                               annotations=pod("tenant-b")).run()  # fmt: skip
            finally:
                hostsetup.uninstall(os.path.join(d, "state", hostsetup.STATE_NAME))
        _, owned = spool.usage_by_owner(spool_dir)
        kept_b = any(
            r.get("event") == "captured"
            and r.get("entry")
            and (r.get("pod") or {}).get("namespace") == "tenant-b"
            for r in spool.read_journal(spool_dir)
        )
        return owned.get("n-tenant-a", 0) / max_bytes, kept_b
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mib", type=int, default=64, help="the spool's max_size for the run")
    args = parser.parse_args()
    rootfs = runc.build_rootfs(
        os.path.join(runc.WORK, "bench-spool-shares-root"), {"crasher": build.build("crasher")}
    )
    max_bytes = args.max_mib << 20
    base_part, base_b = flood(rootfs, max_bytes, "pod_share = 1\nnamespace_share = 1\n")
    part, kept_b = flood(rootfs, max_bytes, "")
    ns_part, ns_kept_b = flood(rootfs, max_bytes, "", one_pod=False)
    yes = {True: "yes", False: "no"}
    print(f"a flood of incompressible cores, spool max_size {args.max_mib} MiB; baseline: no shares")
    print(f"  one pod:  part of the spool it holds  baseline {base_part:.2f}  shares {part:.2f}  "
          f"ratio {part / base_part:.2f}  goal <= {GOAL}")  # fmt: skip
    print(f"            the other pod's core kept   baseline {yes[base_b]}  shares {yes[kept_b]}  goal yes")
    print(f"  one namespace, a new pod per crash:  part it holds {ns_part:.2f}  goal <= {NS_GOAL}; "
          f"the other namespace's core kept {yes[ns_kept_b]}  goal yes")  # fmt: skip


if __name__ == "__main__":
    main()
