"""A pod that serves files over FUSE from its own server, in its own mount namespace.

The pod (:mod:`testbed.runc`) gets what a Kubernetes pod needs to run a FUSE server of its own:
the ``/dev/fuse`` device and ``CAP_SYS_ADMIN`` in its namespaces (privileged pods, or a device
plugin plus that capability). Its server is Debian's ``fuse-overlayfs`` (over a lower directory
on the pod's tmpfs), copied into the rootfs with its libraries. The pod copies busybox onto the
FUSE mount, runs ``sleep`` from there (so the executable the crashed process mapped lies on the
pod's own FUSE filesystem), and on the test's word stops its server (SIGSTOP) and has that
process dump core (SIGABRT). No mount of it is visible in the host's mount namespace.

:func:`abort_connections` ends the FUSE connections of a pod's own mounts through
``/sys/fs/fuse/connections/<dev>/abort``: every request waiting on the stopped server fails,
so whatever is stuck on it ends. Tests call it in a ``finally``.
"""

from __future__ import annotations

import os
from contextlib import suppress

from testbed import runc

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
FUSE_DEVICE = ("/dev/fuse", 10, 229)
MOUNT = "/tmp/m"
#: the pod touches this file in its volume when it may go on: stop its server, then dump
GO = "go"

SCRIPT = f"""
mkdir -p /tmp/lo {MOUNT} && busybox cp /bin/busybox /tmp/lo/busybox || exit 1
/app/fuse-overlayfs -f -o lowerdir=/tmp/lo {MOUNT} & server=$!
while [ ! -x {MOUNT}/busybox ]; do sleep 0.05; done
{MOUNT}/busybox sleep 1000 & victim=$!
echo ready $server $victim
while [ ! -e {runc.VOLUME_PATH}/{GO} ]; do sleep 0.05; done
kill -STOP $server
kill -ABRT $victim
sleep 1000
"""


def rootfs(path: str) -> str:
    """A busybox root with the FUSE server at /app/fuse-overlayfs."""
    return runc.build_rootfs(path, {"fuse-overlayfs": FUSE_OVERLAYFS})


def container(root: str, volume: str, annotations: dict[str, str]) -> runc.Container:
    """The pod: its own tmpfs at /tmp, /dev/fuse and CAP_SYS_ADMIN; run it with ``running()``."""
    tmpfs = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=1777"]}
    return runc.Container(
        root,
        ["/bin/sh", "-c", SCRIPT],
        volume=volume,
        annotations=annotations,
        mounts=[tmpfs],
        extra_caps=["CAP_SYS_ADMIN"],
        devices=[FUSE_DEVICE],
    )


def go(volume: str) -> None:
    """Tell the pod to stop its server and dump."""
    with open(os.path.join(volume, GO), "w"):
        pass


def connections(pid: int) -> list[str]:
    """The ``/sys/fs/fuse/connections`` entries of the FUSE mounts in the mount namespace of ``pid``."""
    found = []
    with suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            kind = line.partition(" - ")[2].split(" ", 1)[0]
            if kind.partition(".")[0] in ("fuse", "fuseblk"):
                major, minor = (int(x) for x in fields[2].split(":"))
                found.append(os.path.join("/sys/fs/fuse/connections", str(major << 20 | minor)))
    return found


def abort_connections(paths: list[str]) -> None:
    """Abort those FUSE connections (gone ones are skipped)."""
    for path in paths:
        with suppress(FileNotFoundError), open(os.path.join(path, "abort"), "w") as f:
            f.write("1")
