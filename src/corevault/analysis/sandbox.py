"""The analysis worker's sandbox: a user of its own, no capabilities, and none of the host.

The worker parses a tenant's core and binaries (ELF, DWARF, notes) with drgn, gdb and
pyelftools, so it is treated as if that tenant could run code in it. It is started under
bubblewrap (``bwrap``), which builds, before the worker's first instruction:

- a mount namespace whose root is an empty tmpfs holding read-only binds of what runs
  the worker (``/usr`` and its ``/bin``/``/lib`` links, ``/etc/ld.so.cache``, the Python
  installation and the corevault package) and of the inputs the caller names, each at a
  path of its own under ``/in``; a private ``/tmp`` (size-capped tmpfs), ``/proc`` of its
  own PID namespace, a minimal ``/dev``. Nothing else of the host exists in there: not the
  spool, not the catalog, not other tenants' binaries (the agent binds only the build-ids
  the crash itself mapped), not ``/etc`` or ``/root``;
- new network, IPC, UTS, PID and cgroup namespaces: no network, not even loopback;
- then ``setpriv`` (util-linux) switches to a dedicated uid and gid, drops supplementary
  groups, empties every capability set (the bounding set included) and sets
  ``no_new_privs``, so nothing inside can regain privilege (where a template runs, the
  worker does that itself, in a user namespace made by root, and loads its filter:
  :func:`corevault.analysis.template.drop_to`);
- a seccomp filter (:mod:`corevault.analysis.seccomp`), loaded by bwrap, refuses the system
  calls that reach past those namespaces (ptrace, mount, user namespaces, bpf…).

The worker's interpreter starts isolated (``-I -S -B``): no ``site`` (no ``.pth`` file of
the installation runs, no user site), no environment variable read, no current directory on
its path, no bytecode written; its module path is the stdlib's plus the trusted parent's
own package directories, fixed by the parent (:func:`python`). The bytecode it reads is the
installation's, compiled when corevault was installed (root-owned, read-only in here):
without it every worker would compile corevault's modules again.

Inputs must be readable by that uid: the runner hands over a copy of the core that root
owns and the uid's group may read (0440: an owner could make it writable again) and the
build-id store's files are world-readable (0644 in 0755 directories, as the handler writes
them). Started by an unprivileged user,
the same sandbox is built in a user namespace and the user's own uid is kept.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import corevault

#: uid and gid the worker runs as when the agent is root: used by nothing else on the host
DEFAULT_UID = 64_900
TMP_SIZE = 64 << 20
#: where the inputs are bound
INPUTS = "/in"
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


class SandboxError(Exception):
    """The sandbox cannot be built on this host; the message says what to install."""


@dataclass(frozen=True, slots=True)
class Bind:
    """A host path the worker may read, and where it sees it."""

    source: str
    dest: str


def runtime_paths() -> list[str]:
    """What running ``python -m corevault.analysis.worker`` needs besides /usr."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(corevault.__file__)))
    paths = {sys.prefix, sys.base_prefix, package_root, os.path.dirname(os.path.abspath(sys.executable))}
    paths = {p for p in paths if not (p + "/").startswith("/usr/")}
    # a path inside another one is already there
    return sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))


def _module_path() -> list[str]:
    """The parent's module path the worker needs besides the stdlib: its package directories
    (site-packages, the editable source tree), as far as the sandbox binds them."""
    stdlib = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    stdlib |= {os.path.join(p, "lib-dynload") for p in stdlib if p}
    roots = [*runtime_paths(), "/usr"]
    return [
        p
        for p in dict.fromkeys(sys.path)
        if p and os.path.isabs(p) and p not in stdlib and not p.endswith(".zip")
        and any(p == r or p.startswith(r + "/") for r in roots) and os.path.isdir(p)
    ]  # fmt: skip


def python(code: str, args: Sequence[str] = ()) -> list[str]:
    """``python -c code args`` as the sandbox runs it: isolated, without ``site``, writing no
    bytecode, with the parent's package directories on its module path."""
    return [
        sys.executable,
        "-I",
        "-S",
        "-B",
        "-c",
        f"import sys; sys.path += {_module_path()!r}; {code}",
        *args,
    ]


def main_code(module: str) -> str:
    """The code that runs ``python -m module``: its ``main()``, whose value is the exit status."""
    return f"from {module} import main; sys.exit(main())"


def python_main(module: str, args: Sequence[str]) -> list[str]:
    """``python -m module args`` as the sandbox runs it (:func:`python`)."""
    return python(main_code(module), args)


def _parents(dest: str, made: set[str]) -> list[str]:
    """Directories leading to ``dest``, readable by the worker (bwrap's own are 0700)."""
    out = []
    parent = os.path.dirname(dest)
    chain = []
    while parent not in made:
        chain.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(chain):
        out += ["--perms", "0755", "--dir", d]
        made.add(d)
    return out


def _tools() -> tuple[str, str]:
    bwrap = shutil.which("bwrap")
    setpriv = shutil.which("setpriv")
    if bwrap is None or setpriv is None:
        raise SandboxError(
            "the analysis sandbox needs bubblewrap and util-linux's setpriv: "
            "install them (apt-get install bubblewrap util-linux)"
        )
    return bwrap, setpriv


def _bwrap(bwrap: str, binds: list[Bind], *, user_ns: bool, host_proc: bool = False) -> list[str]:
    """bubblewrap building the sandbox's namespaces and its root, which holds ``binds``."""
    cmd = [bwrap, "--die-with-parent", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    cmd += ["--unshare-cgroup-try", "--hostname", "corevault-analysis", "--clearenv"]
    if user_ns:
        cmd += ["--unshare-user"]
    for name, value in ENV.items():
        cmd += ["--setenv", name, value]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    cmd += ["--bind", "/proc", "/proc"] if host_proc else ["--proc", "/proc"]
    cmd += ["--dev", "/dev", "--size", str(TMP_SIZE)]
    cmd += ["--perms", "1777", "--tmpfs", "/tmp"]
    cmd += ["--perms", "0755", "--dir", INPUTS]
    made = {"/", "/tmp", "/etc", INPUTS}
    for b in [Bind(p, p) for p in runtime_paths()] + binds:
        cmd += [*_parents(b.dest, made), "--ro-bind", b.source, b.dest]
    return cmd


def command(
    argv: list[str],
    binds: list[Bind],
    uid: int = DEFAULT_UID,
    seccomp_fd: int | None = None,
    *,
    drops_itself: bool = False,
) -> list[str]:
    """``argv`` wrapped so that it runs sandboxed, seeing only ``binds`` (read-only) of the host.

    ``seccomp_fd`` (:func:`corevault.analysis.seccomp.filter_fd`; pass it to the child) is
    loaded as the sandbox's system call filter. ``drops_itself``: ``argv``, started as root,
    drops to ``uid`` and loads its filter itself (:func:`corevault.analysis.template.drop_to`).
    """
    bwrap, setpriv = _tools()
    cmd = _bwrap(bwrap, binds, user_ns=os.geteuid() != 0)
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    cmd += ["--chdir", "/tmp", "--"]
    if os.geteuid() == 0 and not drops_itself:
        cmd += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        cmd += ["--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return cmd + argv


def template_command(argv: list[str], uid: int = DEFAULT_UID) -> list[str]:
    """``argv`` as the analysis template (:mod:`corevault.analysis.template`) runs: the
    sandbox of :func:`command` without inputs and without the seccomp filter (the template
    makes a user namespace, its children their own namespaces, then each loads the filter),
    with the host's ``/proc`` in place of one of its own (see that module). Started by root,
    it is root until it makes its user namespace, where it becomes ``uid``
    (:mod:`corevault.analysis.userns`: made by root, its processes are counted there alone)."""
    bwrap, _ = _tools()
    cmd = _bwrap(bwrap, [], user_ns=os.geteuid() != 0, host_proc=True)
    return [*cmd, "--chdir", "/tmp", "--", *argv]
