"""The analysis sandbox's seccomp filter: system calls a parser of cores never needs.

Built with libseccomp (the system library that runc, podman and systemd use, loaded through
ctypes: no build step), exported as BPF into an anonymous file, and handed to bubblewrap
(``--seccomp FD``), which loads it before the worker's first instruction. Everything is
allowed except what would let code that took over the worker reach past its namespaces:
debugging or reading other processes, mounting, new namespaces, kernel keyrings, BPF,
performance counters, module loading, userfaultfd and io_uring, and user namespaces. Those
fail with EPERM.
Where libseccomp is missing the sandbox runs without the filter (its namespaces, uid and
empty capability sets still hold) and says so once in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
from collections.abc import Iterator

log = logging.getLogger("corevault.analysis")

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "acct", "swapon", "swapoff", "reboot", "settimeofday", "clock_settime",
)  # fmt: skip
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_MASKED_EQ = 7
CLONE_NEWUSER = 0x10000000


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        log.warning("libseccomp is not installed: the analysis sandbox runs without its syscall filter")
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


@contextlib.contextmanager
def _context(lib: ctypes.CDLL) -> Iterator[int]:
    """A libseccomp filter context holding the rules, released on exit."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        new_user = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        rules = [(name, errno.EPERM, None) for name in DENIED]
        # clone() may not make a user namespace (where the worker would hold capabilities);
        # clone3's flags are out of a filter's reach, and ENOSYS sends glibc back to clone()
        rules += [("clone", errno.EPERM, new_user), ("clone3", errno.ENOSYS, None)]
        for name, error, args in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a system call of this architecture
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO | error, nr, 1 if args else 0, args)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add({name}) failed")
        yield ctx
    finally:
        lib.seccomp_release(ctx)


def filter_fd() -> int | None:
    """An fd (at offset 0, inheritable) holding the BPF filter, or None without libseccomp."""
    lib = _library()
    if lib is None:
        return None
    with _context(lib) as ctx:
        fd = os.memfd_create("corevault-seccomp", 0)
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            os.close(fd)
            raise OSError(-rc, "seccomp_export_bpf failed")
        os.lseek(fd, 0, os.SEEK_SET)
        return fd


def load() -> None:
    """Load the filter into the calling process (single-threaded; ``no_new_privs`` is set
    with it); raises OSError without libseccomp or when the kernel refuses it."""
    lib = _library()
    if lib is None:
        raise OSError("libseccomp is not installed")
    with _context(lib) as ctx:
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load failed")
