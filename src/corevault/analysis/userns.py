"""The analysis template's user namespace: made by root, so that only the analysis counts.

The kernel counts ``RLIMIT_NPROC`` per user namespace and uid, and charges each process
again to whoever made each enclosing user namespace, held there to the limit that maker had.
A template that first dropped to its analysis uid on the host and then made its namespace
would share its count with every host process of that uid; and any pod may run as any uid
(``runAsUser``, an image's ``USER``, root in its container calling ``setuid``), an analysis
uid included. Measured before this module: a pod holding ``analysis_processes`` processes
as an analysis uid left that uid's analyses none, so not even the template could start.

So the template makes its namespace while it is still root on the host, inside bubblewrap's
namespaces: the namespace is owned by root, whose count has no limit, and a process of it
is counted only with the namespace's own processes of its uid, held to the template's
``RLIMIT_NPROC``. Its one uid (0 inside) is the analysis uid on the host, so files and
``/proc`` still name that uid. Writing a map to another uid takes ``CAP_SETUID`` where the
namespace was made: a child forked before the ``unshare`` does it, still root there, and
exits; then the template becomes that uid, root of its own namespace alone.

The namespace being root's also means that a host process of the analysis uid holds no
capability in it (a namespace made by that uid would have given it all).
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE = 4


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def enter(uid: int) -> None:
    """Make this process the first of a user namespace of its own where it is root and, on
    the host, ``uid`` (root) or its own uid (another user, whose namespace is its own anyway)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.getuid() != 0:
        me, group = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise _fail("unshare(CLONE_NEWUSER)")
        own = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
        try:
            _write_maps(own, me, group)
        finally:
            os.close(own)
        return
    os.setgroups([])  # before the namespace: in it, with setgroups denied, they would stay
    own = os.open(
        "/proc/self", os.O_PATH | os.O_DIRECTORY
    )  # /proc/PID of this process, as the mapper sees it
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mapper: root in the host's namespace
        status = 1
        try:
            os.close(go_w)
            if os.read(go_r, 1) == b"1":
                _write_maps(own, uid, uid)
                status = 0
        finally:
            os._exit(status)
    os.close(go_r)
    try:
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise _fail("unshare(CLONE_NEWUSER)")
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        os.close(own)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(f"the user namespace's maps to uid {uid} could not be written")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # a change of uid makes the process non-dumpable: its children (gdb, addr2line) would
    # then not reach the crash's files at /proc/1/fd of the analysis, as they must
    if libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_DUMPABLE)")


def _write_maps(proc_dir: int, uid: int, gid: int) -> None:
    """0 in the namespace of the process at ``proc_dir`` is ``uid``/``gid`` outside; no setgroups."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        fd = os.open(name, os.O_WRONLY, dir_fd=proc_dir)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
