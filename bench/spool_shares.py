"""How much of the node spool one pod can take, with and without tenant shares, in one run.

    python -m bench.spool_shares [--max-mib 64]

Tenant A's pod (a runc container with a Kubernetes cgroup path) floods the spool with
incompressible cores of shrinking sizes until one of its smallest cores finds no room, the
way an attacker fills it to the last byte; then tenant B's pod crashes with a 1 MiB core.
Run twice: once with every share at 1 (the baseline: no shares, as before they existed),
once with the node's defaults (``pod_share = 0.25``). Printed: the part of the spool A holds
(goal: at most ``pod_share``) and whether B's core got its spool copy (goal: yes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from corevault import hostsetup, spool
from testbed import build, runc, sysctl

GOAL = 0.25


def pod(namespace: str) -> dict[str, str]:
    return {
        "corevault.io/core-pattern": "/data/dump-a/core-%p",
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": namespace + "-0",
    }


def flood(rootfs: str, max_bytes: int, shares: str) -> tuple[float, bool]:
    """(the part of the spool tenant A holds after its flood, whether B's core was kept)."""
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
                                       annotations=pod("tenant-a"))  # fmt: skip
                    c.run()
                    last = spool.read_journal(spool_dir)[-1]
                    if kib == 0 and last["event"] == "dropped":
                        break
                    kib //= 2
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
    print(f"one pod's flood, spool max_size {args.max_mib} MiB")
    print(f"  part of the spool it holds  baseline {base_part:.2f}  shares {part:.2f}  "
          f"ratio {part / base_part:.2f}  goal <= {GOAL}")  # fmt: skip
    print(f"  the other pod's core kept   baseline {'yes' if base_b else 'no'}  shares {'yes' if kept_b else 'no'}  "
          "goal yes")  # fmt: skip


if __name__ == "__main__":
    main()
