"""A pod that serves files over FUSE from its own server, in its own mount namespace.

The pod (:mod:`testbed.runc`) gets what a Kubernetes pod needs to run a FUSE server of its own:
the ``/dev/fuse`` device and ``CAP_SYS_ADMIN`` in its namespaces (privileged pods, or a device
plugin plus that capability). Its server is Debian's ``fuse-overlayfs`` (over a lower directory
on the pod's tmpfs), copied into the rootfs with its libraries. The pod copies busybox onto the
FUSE mount and runs ``sleep`` from there (so the executable the crashed process mapped lies on the
pod's own FUSE filesystem), or runs ``hang mapped`` on a file of the mount (the kernel itself then
reads from the server as it dumps), and on the test's word stops its server (SIGSTOP) and has that
process dump core (SIGABRT). No mount of it is visible in the host's mount namespace.

A filesystem the kernel reads from a file can be served by the pod's FUSE server under a name of
its own: :func:`on_erofs` mounts an erofs image (:data:`IMAGE`, made by :func:`rootfs` with
``mkfs.erofs``: busybox, padded with bytes no exec reads, and a data file) that lies on the FUSE
mount, with the kernel's file-backed erofs (no loop device needed, only ``CAP_SYS_ADMIN``), and
runs its command from there. Its pages come from the FUSE server, while maps, fdinfo and
mountinfo name an erofs mount alone.

:func:`abort_connections` ends the FUSE connections of a pod's own mounts through their
``abort`` file (:func:`corevault.agent.stuckdumps.abort`): every request waiting on the stopped
server fails, so whatever is stuck on it ends. Tests call it in a ``finally``.

:func:`hanging` is a pod whose server is not stopped but hangs: ``fusehang`` (a small server on
raw ``/dev/fuse``) reads the requests of one kind (``write``, ``fsync``, ``opendir``...) and never
answers them, answering every other. A request the server read is waited for whatever signal
comes, so a pipe handler's writer stays stuck on it after the handler's process exited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import suppress

from corevault.agent import stuckdumps
from testbed import build, runc

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
FUSE_DEVICE = ("/dev/fuse", 10, 229)
MOUNT = "/tmp/m"
#: the pod touches this file in its volume when it may go on: stop its server, then dump
GO = "go"

#: the pod's process run from its own FUSE mount: busybox (the executable lies on the mount)
FROM_FUSE = f"{MOUNT}/busybox sleep 1000"
#: a process that maps a file of the mount, never touched, and asks file mappings into its
#: core: the kernel reads that file's pages from the stopped server as it dumps
MAPPING = f"/app/hang mapped {MOUNT}/data"


def script(victim: str, prelude: str = "", on_go: str = "", mount: str = MOUNT) -> str:
    """The pod's shell: ``prelude``, its FUSE server on ``mount``, ``victim`` run, and on the
    word ``on_go`` run, its server stopped and the victim dumped."""
    return f"""
{prelude}
mkdir -p /tmp/lo {mount} || exit 1
busybox cp /bin/busybox /tmp/lo/busybox && busybox dd if=/dev/zero of=/tmp/lo/data bs=1M count=1 2>/dev/null
/app/fuse-overlayfs -f -o lowerdir=/tmp/lo {mount} & server=$!
while [ ! -x {mount}/busybox ]; do sleep 0.05; done
{victim} > /tmp/victim.out & victim=$!
case "{victim}" in
  */app/hang*|*/app/mapswap*) while ! busybox grep -q ready /tmp/victim.out; do sleep 0.05; done;;
esac
echo ready $server $victim
while [ ! -e {runc.VOLUME_PATH}/{GO} ]; do sleep 0.05; done
{on_go}
kill -STOP $server
kill -ABRT $victim
sleep 1000
"""


#: the erofs image in the rootfs's /app, copied onto the FUSE mount's lower directory by
#: :data:`WITH_IMAGE` and mounted by :func:`on_erofs`
IMAGE = "img.erofs"
#: where :func:`on_erofs` mounts the image in the pod
EROFS = "/tmp/e"
#: a prelude that puts the image on the FUSE mount (its lower directory, before the server starts)
WITH_IMAGE = f"mkdir -p /tmp/lo && busybox cp /app/{IMAGE} /tmp/lo/{IMAGE} || exit 1"


def on_erofs(command: str) -> str:
    """A victim that mounts the image on the FUSE mount as erofs and runs ``command`` (whose
    files are under :data:`EROFS`) from there."""
    return f"busybox sh -c 'mkdir -p {EROFS} && /app/fsmount erofs {MOUNT}/{IMAGE} {EROFS} && exec {command}'"


def rootfs(path: str) -> str:
    """A busybox root with the FUSE server at /app/fuse-overlayfs, ``hang``, ``fsmount`` and the
    erofs image."""
    root = runc.build_rootfs(
        path,
        {
            "fuse-overlayfs": FUSE_OVERLAYFS,
            "hang": build.build("hang"),
            "fsmount": build.build("fsmount"),
            "mapswap": build.build("mapswap"),
        },
    )
    tree = f"{path}.erofs"
    os.makedirs(tree, exist_ok=True)
    # busybox with 4 MiB after it that exec never reads: a hash of the whole file asks the server
    shutil.copy2(runc.BUSYBOX, f"{tree}/busybox")
    with open(f"{tree}/busybox", "ab") as f:
        f.write(os.urandom(4 << 20))
    with open(f"{tree}/data", "wb") as f:
        f.write(os.urandom(1 << 20))
    subprocess.run(["mkfs.erofs", f"{root}/app/{IMAGE}", tree], check=True, capture_output=True)
    shutil.rmtree(tree)
    return root


def pad_mountinfo(mounts: int = 1500) -> str:
    """A prelude that lists ``mounts`` tmpfs mounts under a path of about 3,000 bytes before the
    FUSE server's: the pod's mountinfo grows past 4 MiB with its FUSE mount at the end."""
    deep = "/".join(["p" * 250] * 12)
    return f"""mkdir -p /tmp/pad/{deep} && cd /tmp/pad/{deep} && mkdir $(busybox seq {mounts}) || exit 1
for i in $(busybox seq {mounts}); do mount -t tmpfs -o size=4k pad $i || exit 1; done
cd /"""


def container(
    root: str,
    volume: str,
    annotations: dict[str, str],
    *,
    victim: str = FROM_FUSE,
    prelude: str = "",
    on_go: str = "",
    mount: str = MOUNT,
) -> runc.Container:
    """The pod: its own tmpfs at /tmp, /dev/fuse and CAP_SYS_ADMIN, ``prelude`` run first and
    ``on_go`` on the word, its FUSE server on ``mount`` (:func:`script`); run it with
    ``running()``."""
    tmpfs = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=1777"]}
    return runc.Container(
        root,
        ["/bin/sh", "-c", script(victim, prelude, on_go, mount)],
        volume=volume,
        annotations=annotations,
        mounts=[tmpfs],
        extra_caps=["CAP_SYS_ADMIN"],
        devices=[FUSE_DEVICE],
    )


#: what :data:`HANGING_SCRIPT`'s server prints once it took a request of its opcode
HUNG = "hanging"

#: the pod of :func:`hanging`: its server ``fusehang`` on the mount, a victim that touches no
#: file of it, and on the word: the victim dumped, then ``after`` once the server took a request
#: it never answers
HANGING_SCRIPT = """
mkdir -p {mount} || exit 1
/app/fusehang {mount} {opcode} > /tmp/server.out & server=$!
while ! busybox grep -q mounted /tmp/server.out; do sleep 0.05; done
busybox sleep 1000 & victim=$!
echo ready $server $victim
while [ ! -e {volume}/{go} ]; do sleep 0.05; done
kill -ABRT $victim
while ! busybox grep -q {hung} /tmp/server.out; do sleep 0.05; done
{after}
sleep 1000
"""


def hanging_rootfs(path: str) -> str:
    """A busybox root with ``fusehang`` (testbed/programs/fusehang.c) at /app/fusehang."""
    return runc.build_rootfs(path, {"fusehang": build.build("fusehang")})


def hanging(
    root: str, volume: str, annotations: dict[str, str], mount: str, opcode: str, *, after: str = ""
) -> runc.Container:
    """A pod whose own FUSE server on ``mount`` reads every request of ``opcode`` and never
    answers it (a server that hangs, not one stopped: a pipe handler's writer of the pod's core
    then waits uninterruptibly, and the handler's process cannot end); on the word (:func:`go`)
    it dumps a process and runs ``after`` once the server took such a request."""
    tmpfs = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=1777"]}
    text = HANGING_SCRIPT.format(
        mount=mount, opcode=opcode, volume=runc.VOLUME_PATH, go=GO, hung=HUNG, after=after
    )
    return runc.Container(
        root,
        ["/bin/sh", "-c", text],
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


def connections(pid: int) -> list[bytes]:
    """The devices (``major:minor``) of the FUSE mounts in the mount namespace of ``pid``."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return list(stuckdumps.fuse_mounts(f))


def abort_connections(devs: list[bytes]) -> None:
    """Abort those FUSE connections (one gone already is no failure)."""
    for dev in devs:
        with suppress(OSError):
            stuckdumps.abort(dev)
