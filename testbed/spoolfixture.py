"""Remake the checked-in spool entries of ``tests/fixtures/spool`` from real crashes.

    sudo .venv/bin/python -m testbed.spoolfixture [DEST]

Root is needed once, here: two programs of the crash corpus crash in runc containers with
Kubernetes cgroup paths while corevault's handler is installed (under the host-wide lock of
:mod:`testbed.sysctl`, the host's settings restored afterwards), and the handler captures
them as it captures any crash. The pods are known from the node's pod index, as the agent's
watch would have written it:

- ``crasher fpe`` in ``shop/web-1``: SIGFPE in ``divide`` called from ``main``;
- ``libuser`` (started by a shell with ``DB_PASSWORD`` in its environment) in
  ``shop/parser-1``: SIGSEGV in ``crashy_parse`` inside ``libcrashy.so``, called from
  ``main``.

DEST (default ``tests/fixtures/spool``) gets exactly what the node holds for them:
``ready/<id>/`` (``core.zst``, ``meta.json``, ``owner``) and ``store/buildid/<id>/<sha256>``,
the build-id files of the objects the processes mapped, except the C library: at 1.9 MB it
would be most of the fixture, and a report without it names its frames ``libc.so.6+0x…``,
as on a node that did not keep it. The dynamic loader stays: a captured binary without
DWARF. The tests ship these entries into vaults of their own without root
(``fixture_vault`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from corevault import podindex, spool
from testbed import build, runc
from testbed.capture import installed_capture

DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "spool")
#: left out of the fixture (see above): matched against the mapped object's path
LEFT_OUT = ("/libc.so.6",)
PATTERN = "/data/dump-a/core-%p-%t"
# pod name, container name, image, command
CRASHES = [
    ("web-1", "web", "registry.example/shop/web:1.4.2", ["/app/crasher", "fpe"]),
    ("parser-1", "parser", "registry.example/shop/parser:2.0.1",
     ["/bin/sh", "-c", "DB_PASSWORD=hunter2-secret-value exec /app/libuser"]),
]  # fmt: skip


def capture(work: str) -> str:
    """Crash the programs; the spool's ready/ and the build-id store, copied to ``work``."""
    programs = {name: build.build(name) for name in ("crasher", "libuser", "libcrashy.so")}
    rootfs = runc.build_rootfs(os.path.join(work, "rootfs"), programs)
    with installed_capture() as cap:
        for pod, container, image, args in CRASHES:
            annotations = {"corevault.io/core-pattern": PATTERN}
            c = runc.Container(rootfs, args, volume=cap.volume, annotations=annotations, hostname=pod)
            podindex.write_pod(cap.podindex, {
                "uid": c.pod_uid, "namespace": "shop", "name": pod, "annotations": annotations,
                "containers": {container: {"id": c.id, "image": image}},
            })  # fmt: skip
            result = c.run()
            if result.returncode == 0:
                raise SystemExit(f"{args} did not crash: {result.stdout}{result.stderr}")
        if len(spool.entries(cap.spool)) != len(CRASHES):
            raise SystemExit(f"expected {len(CRASHES)} spool entries; the journal says {cap.journal()}")
        shutil.copytree(spool.ready_dir(cap.spool), spool.ready_dir(work))
        shutil.copytree(cap.store, os.path.join(work, "store"))
    return work


def write(work: str, dest: str) -> None:
    """``work``'s entries and the build-id files they name into ``dest``, replacing what was there."""
    new = tempfile.mkdtemp(prefix=".spoolfixture-", dir=os.path.dirname(dest))
    try:
        kept: set[str] = set()
        for entry in sorted(os.listdir(spool.ready_dir(work))):
            shutil.copytree(os.path.join(spool.ready_dir(work), entry), os.path.join(new, "ready", entry))
            for m in spool.read_meta(work, entry)["modules"]:
                if m.get("sha256") and not m["path"].endswith(LEFT_OUT):
                    kept.add(os.path.join("buildid", m["key"], m["sha256"]))
        for rel in sorted(kept):
            os.makedirs(os.path.join(new, "store", os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(work, "store", rel), os.path.join(new, "store", rel))
        # readable by whoever runs the tests, as a checkout makes them (the spool's are root-only)
        for root, dirs, files in os.walk(new):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)  # noqa: S103
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        os.chmod(new, 0o755)  # noqa: S103
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(new, dest)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def main() -> int:
    dest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEST)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cv-spoolfixture-") as work:
        write(capture(work), dest)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"{dest}: {len(os.listdir(os.path.join(dest, 'ready')))} entries, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
