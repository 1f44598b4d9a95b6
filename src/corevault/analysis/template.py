"""A pre-imported analysis worker, forked per analysis into a sandbox of the child's own.

Starting a worker costs a fresh interpreter and its imports (drgn, the stdlib, corevault's
analysis modules): most of a small crash's analysis (docs/analysis.md). The template is
that worker started once, with its imports done and no input, in the sandbox every worker
runs in (:func:`corevault.analysis.sandbox.template_command`: bubblewrap's namespaces and
root, the worker's uid, no capability, ``no_new_privs``). It never reads a crash: for each
analysis it forks a child, and only that child, after it has made its sandbox complete,
receives the crash's files. So every analysis still runs in a process of its own that
never saw another crash, and a template never handles tenant data.

How a child gets as strict as a bubblewrap worker, and stricter where they share a parent:

- At start the template makes a user namespace of its own in which its uid is root (its
  uid on the host is the analysis uid); it makes it while still root on the host, so the
  kernel counts its processes in there alone (:mod:`corevault.analysis.userns`).
  bubblewrap's mounts become locked in there: no child can unmount, remount or move
  them, and the root, ``/dev`` and ``/usr`` stay owned
  by the host's root, which that namespace does not map, so nothing in it writes them.
- Per analysis the child (the "keeper") makes new mount, PID, network, IPC, UTS and cgroup
  namespaces and forks the analysis process, PID 1 of its own PID namespace: it sees no
  other process, can signal none, reaches no abstract socket of another analysis.
- That process starts a session (and process group) of its own: ``kill(0, …)`` reaches a
  process group across PID namespaces, and the template's holds every analysis.
- That process mounts a ``/proc`` of its own namespace over the template's (read-only), a
  private ``/tmp`` (size-capped), an empty ``/in`` and a ``/dev/pts`` of its own; receives
  from the agent, over a socket of its own, the request and the crash's files as open file descriptors, each
  reachable at its path under ``/in`` through ``/proc/1/fd`` (a symlink); makes ``/in``
  read-only; caps ``RLIMIT_DATA`` and ``RLIMIT_CORE``; empties every capability set (the
  bounding set included), locks the secure bits so that it cannot regain any, sets
  ``no_new_privs`` and loads the seccomp filter (:mod:`corevault.analysis.seccomp`). It
  checks all of that in ``/proc/self/status`` before it reads anything.
- The keeper sends the agent a pidfd of the analysis process before it reads anything, and
  its exit status after: the agent kills it (and its whole PID namespace, gdb included) when
  the time is up. With the status goes whether the analysis said, over a pipe to the keeper,
  that its sandbox was complete: only a child that did not is a sandbox that failed (the
  runner then stops using the template); an analysis that a core took over can end with any
  status, and it ran after saying so.
- Children share what a fork copies: the template's memory layout (address space
  randomisation) and Python's hash seed, which fresh workers would each draw anew. So a
  template serves at most :data:`MAX_FORKS` analyses; then a new one starts and the old one
  ends with the last analysis running in it.

The template needs ``/proc`` of the host to write its user namespace's maps and for its
children to mount a ``/proc`` of their own (the kernel mounts one in a user namespace only
where a complete one is visible); each child covers it with its own before it reads a
crash. Where any of this is refused (no user namespaces, no libseccomp, an input outside
``/in``) the runner starts a bubblewrap worker per analysis as before.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

from corevault import bounded
from corevault.analysis import sandbox, seccomp, slots, userns

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 1 << 12, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 24, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
#: NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE and KEEP_CAPS off, each locked
SECURE_BITS = 0b1110_1111
LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: how long a child may take to make its sandbox and say so
START_TIMEOUT = 30.0
#: how long a killed analysis's keeper may take to say its PID namespace is gone
END_TIMEOUT = 10.0
MAX_REQUEST = 1 << 20
FDS_PER_MESSAGE = 250  # the kernel's SCM_MAX_FD is 253
#: a child's exit status when it could not make its sandbox (before it ran anything)
SETUP_FAILED = 125
#: children of one template: its children share its memory layout (ASLR) and its hash seed,
#: so what one learns of them holds for at most this many others; then a new template starts
MAX_FORKS = 100


class TemplateError(Exception):
    """The template cannot serve: the runner starts a worker of its own instead."""


class NotForTemplate(TemplateError):
    """This analysis cannot run in a template's child (an input it cannot place); others can."""


class Busy(NotForTemplate):
    """The template could not fork for this analysis now (the uid's processes or the memory
    ran out, perhaps taken by an analysis running): a worker of its own runs it; the template
    serves the next one."""


#: why a fork fails for a while rather than for good
_TRANSIENT = (errno.EAGAIN, errno.ENOMEM)


def _busy(ctl_fd: int, e: OSError) -> None:
    """Tell the agent that this request's fork failed for a while, on ``ctl_fd``; ``e`` again if for good."""
    if e.errno not in _TRANSIENT:
        raise e
    with contextlib.suppress(OSError):
        os.write(ctl_fd, b"B" + str(e).encode()[:200])


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_UNDER_TMP: tuple[str, ...] = ()  # see serve()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _receive(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * 4))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# -- inside the sandbox: the template, its keepers and their analyses -------------------------


def serve(control_fd: int, under_tmp: tuple[str, ...] = (), uid: int = sandbox.DEFAULT_UID) -> int:
    """The template's loop: one keeper forked per request on ``control_fd``, until it closes.

    Started as root (the agent's), it runs as ``uid`` in a user namespace of its own made
    by root (:mod:`corevault.analysis.userns`).

    ``under_tmp``: the runtime's directories below /tmp (an environment made there), as the
    parent found them; each analysis binds them again over its own /tmp."""
    global _UNDER_TMP  # noqa: PLW0603 - set once, before any fork
    _UNDER_TMP = under_tmp
    control = socket.socket(fileno=control_fd)
    try:
        import drgn  # noqa: F401

        import corevault.analysis.worker  # noqa: F401 - what every child would import again

        libc = _libc()
        if seccomp._library() is None:
            raise TemplateError("libseccomp is not installed")
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        userns.enter(uid)
    except Exception as e:  # said to the agent, which falls back
        _send(control, b"E" + f"{type(e).__name__}: {e}".encode()[:1000])
        return 1
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    # with its PID namespace, which it and its keepers share and no analysis does
    _send(control, b"R" + os.readlink("/proc/self/ns/pid").encode())
    while True:
        data, fds = _receive(control, 16, 2)
        if not data:
            return 0
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        try:
            pid = os.fork()
        except OSError as e:  # out of processes: this request goes elsewhere, not every running one
            pid = -1
            _busy(fds[0], e)
        if pid == 0:
            try:
                control.close()
                _keeper(libc, fds[0], fds[1], last_cap)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)


def _keeper(libc: ctypes.CDLL, ctl_fd: int, data_fd: int, last_cap: int) -> None:
    """Make the analysis's namespaces, start it, pass its pidfd and then its exit status on."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.closerange(3, min(ctl_fd, data_fd))
    os.closerange(max(ctl_fd, data_fd) + 1, 1 << 16)
    os.closerange(min(ctl_fd, data_fd) + 1, max(ctl_fd, data_fd))
    ctl = socket.socket(fileno=ctl_fd)
    namespaces = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    try:
        _check(libc.unshare(namespaces), "unshare")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as e:
        _busy(ctl_fd, e)
        os._exit(1)
    if pid == 0:
        try:
            ctl.close()
            os.close(ready_r)
            _analysis(libc, socket.socket(fileno=data_fd), last_cap, ready_w)
        except BaseException:  # whatever it is, the agent reads it
            traceback.print_exc()
        finally:
            os._exit(1)
    os.close(data_fd)
    os.close(ready_w)
    pidfd = os.pidfd_open(pid)
    _send(ctl, b"P", [pidfd])
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    ready = os.read(ready_r, 1) == b"1"  # its end is closed: it ended
    _send(ctl, b"S" + struct.pack("i?", os.waitstatus_to_exitcode(status), ready))
    os._exit(0)


def _analysis(libc: ctypes.CDLL, data: socket.socket, last_cap: int, ready: int) -> None:
    """PID 1 of its namespace: build the rest of the sandbox, then receive the crash and run;
    tells the keeper on ``ready`` that its sandbox is complete before it runs anything."""
    try:
        code, args = _sandbox(libc, data, last_cap)
        os.write(ready, b"1")
        os.close(ready)
    except BaseException:  # said on stderr; the agent starts a worker of its own instead
        traceback.print_exc()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(SETUP_FAILED)
    sys.argv = ["-c", *args]
    status = 0
    try:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "sys": sys})  # noqa: S102
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as the interpreter would report it
        traceback.print_exc()
        status = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def _sandbox(libc: ctypes.CDLL, data: socket.socket, last_cap: int) -> tuple[str, list[str]]:
    """The analysis's own mounts, its request and files, then every restriction; what to run."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    # a session and process group of its own: kill(0, …) reaches its process group whatever
    # PID namespace the members are in, and the template's holds the template, every keeper
    # and every other analysis (of the same uid: the kernel lets the signal through)
    os.setsid()
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(libc.mount(b"proc", b"/proc", b"proc", flags | MS_RDONLY, None), "mount /proc")
    size = f"size={sandbox.TMP_SIZE},mode=1777".encode()
    # what runs from under /tmp (an environment made there) is bound again over the new /tmp
    held = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in _UNDER_TMP}
    _check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, size), "mount /tmp")
    for path, fd in held.items():
        os.makedirs(path, mode=0o755)
        where = f"/proc/self/fd/{fd}".encode()
        _check(libc.mount(where, path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
        os.close(fd)
        if not os.statvfs(path).f_flag & os.ST_RDONLY:  # a bind keeps its source's read-only flag
            raise TemplateError(f"{path} was bound writable")
    _check(libc.mount(b"tmpfs", sandbox.INPUTS.encode(), b"tmpfs", flags, b"size=1m,mode=0755"), "mount /in")
    # terminals of its own: bubblewrap's /dev/pts is one instance for every child of the template
    pts = b"newinstance,ptmxmode=0666,mode=0620"
    _check(libc.mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC, pts), "mount /dev/pts")

    header, fds = _receive(data, MAX_REQUEST, FDS_PER_MESSAGE)
    request = json.loads(header)
    while len(fds) < 2 + len(request["inputs"]):
        _, got = _receive(data, 1, FDS_PER_MESSAGE)
        if not got:
            raise TemplateError("the request's files did not arrive")
        fds += got
    stdout, stderr, inputs = fds[0], fds[1], fds[2:]
    for dest, fd in zip(request["inputs"], inputs, strict=True):
        # by path: the link leads to this process's descriptor, which gdb, addr2line and
        # c++filt (its children, same uid) reach too, and no other analysis sees
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        os.symlink(f"/proc/1/fd/{fd}", dest)
    _check(libc.mount(None, sandbox.INPUTS.encode(), None, MS_REMOUNT | MS_RDONLY | flags, None), "/in ro")
    null = os.open("/dev/null", os.O_RDONLY)
    for fd, to in ((null, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, to)
        os.close(fd)
    data.close()
    memory = int(request["memory"])
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir("/tmp")
    _drop(libc, last_cap)
    return request["code"], request["args"]


def _drop(libc: ctypes.CDLL, last_cap: int) -> None:
    """Give up every capability for good, then load the seccomp filter; check it all."""
    _check(libc.prctl(PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    for cap in range(last_cap + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT)")
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    empty = (ctypes.c_uint32 * 6)()
    _check(libc.capset(header, empty), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    seccomp.load()
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    zero = "0" * 16
    wanted = {"CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": zero, "CapAmb": zero}
    wanted |= {"NoNewPrivs": "1", "Seccomp": "2"}
    wrong = {k: status.get(k) for k, v in wanted.items() if status.get(k) != v}
    if os.getpgrp() != os.getpid():
        wrong["process group"] = str(os.getpgrp())
    if wrong:
        raise TemplateError(f"the analysis's sandbox is not complete: {wrong}")


def drop_to(uid: int) -> None:
    """A worker of its own, started as root by bubblewrap where a template runs: as ``uid`` in
    a user namespace made by root, as a template is (:mod:`corevault.analysis.userns`: its
    processes counted there alone), then as strict as a template's child (:func:`_drop`)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    userns.enter(uid)
    with contextlib.suppress(PermissionError):  # already leading its own process group
        os.setsid()
    _drop(_libc(), last_cap)


# -- in the agent: starting the template and running analyses in it ---------------------------


class Template:
    """A running template for one uid; :meth:`run` is safe from several threads at once.

    ``processes``: its ``RLIMIT_NPROC``, set before it drops to ``uid`` (the kernel counts
    it per uid: it bounds the template, its keepers and its analyses together)."""

    def __init__(self, uid: int, processes: int = slots.DEFAULT_PROCESSES) -> None:
        self.uid = uid
        #: its PID namespace (``pid:[inode]``), where it and its keepers run and no analysis does
        self.pid_ns: str | None = None
        self.owner = os.getpid()
        self.forks = 0
        self._lock = threading.Lock()
        self._uses = threading.Lock()
        self._running = 0
        self._retired = False
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        under_tmp = tuple(p for p in sandbox.runtime_paths() if p.startswith("/tmp/"))
        serve = f"serve({theirs.fileno()}, {under_tmp!r}, {uid})"
        code = f"from corevault.analysis.template import serve; sys.exit({serve})"
        cmd = sandbox.template_command(sandbox.python(code), uid)
        limits = [(resource.RLIMIT_CORE, 0)]
        if os.geteuid() == 0:  # set before setpriv drops to the uid (root is held to none)
            limits.append((resource.RLIMIT_NPROC, processes))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
            preexec_fn=lambda: [resource.setrlimit(k, (v, v)) for k, v in limits],  # noqa: PLW1509
        )
        theirs.close()
        self._control.settimeout(START_TIMEOUT)
        try:
            ready, _ = _receive(self._control, 1024, 0)
        except OSError as e:
            self.close()
            raise TemplateError(f"the analysis template did not start: {e}") from None
        if ready[:1] != b"R":
            self.close()
            why = ready[1:].decode(errors="replace") if ready[:1] == b"E" else "it ended"
            raise TemplateError(f"the analysis template did not start: {why}")
        self.pid_ns = ready[1:].decode(errors="replace")
        self._control.settimeout(None)

    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def retired(self) -> bool:
        return self._retired

    def retire(self) -> None:
        """Fork no more; end once the analyses running in it are done."""
        with self._uses:
            self._retired = True
            done = self._running == 0
        if done:
            self.close()

    def close(self) -> None:
        self._control.close()
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def run(
        self,
        code: str,
        args: list[str],
        inputs: list[sandbox.Bind],
        *,
        memory: int,
        timeout: float,
        max_output: int | None = None,
    ) -> tuple[bytes, bytes, int]:
        """``code`` run as ``python -c code args`` in a child with ``inputs``; its output,
        errors and exit status. Raises ``subprocess.TimeoutExpired`` once ``timeout`` passed
        and :class:`bounded.TooMuchOutput` past ``max_output`` bytes (the child killed either
        way), :class:`TemplateError` where the template could not start it."""
        outside = [b.dest for b in inputs if not b.dest.startswith(sandbox.INPUTS + "/") or ".." in b.dest]
        if outside:
            raise NotForTemplate(f"an input outside {sandbox.INPUTS}: {outside[0]}")
        with self._uses:
            if self._retired:
                raise TemplateError("the analysis template was retired")
            self._running += 1
            self.forks += 1
        try:
            return self._run(code, args, inputs, memory=memory, timeout=timeout, max_output=max_output)
        finally:
            with self._uses:
                self._running -= 1
                done = self._retired and self._running == 0
            if done:
                self.close()

    def _run(
        self,
        code: str,
        args: list[str],
        inputs: list[sandbox.Bind],
        *,
        memory: int,
        timeout: float,
        max_output: int | None,
    ) -> tuple[bytes, bytes, int]:
        deadline = time.monotonic() + timeout
        opened: list[int] = []
        mine: list[socket.socket] = []
        pipes: list[int] = []
        try:
            for b in inputs:
                opened.append(os.open(b.source, os.O_RDONLY | os.O_CLOEXEC))
            ctl, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            data, data_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            mine += [ctl, data, ctl_theirs, data_theirs]
            try:
                with self._lock:
                    _send(self._control, b"F", [ctl_theirs.fileno(), data_theirs.fileno()])
            except OSError as e:
                raise TemplateError(f"the analysis template is gone: {e}") from None
            ctl_theirs.close()
            data_theirs.close()
            ctl.settimeout(START_TIMEOUT)
            try:
                message, got = _receive(ctl, 16, 1)
            except OSError as e:
                raise TemplateError(f"the analysis template did not fork: {e}") from None
            if message[:1] == b"B":
                raise Busy(
                    f"the analysis template could not fork now: {message[1:].decode(errors='replace')}"
                )
            if message != b"P" or len(got) != 1:
                for fd in got:
                    os.close(fd)
                raise TemplateError("the analysis template did not fork")
            pidfd = got[0]
            try:
                return self._serve(ctl, data, pidfd, code, args, inputs, opened, memory, deadline, max_output)
            finally:
                os.close(pidfd)
        finally:
            for fd in opened + pipes:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for s in mine:
                s.close()

    def _serve(  # noqa: PLR0917
        self,
        ctl: socket.socket,
        data: socket.socket,
        pidfd: int,
        code: str,
        args: list[str],
        inputs: list[sandbox.Bind],
        opened: list[int],
        memory: int,
        deadline: float,
        max_output: int | None,
    ) -> tuple[bytes, bytes, int]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            request = {"code": code, "args": args, "inputs": [b.dest for b in inputs], "memory": memory}
            fds = [out_w, err_w, *opened]
            _send(data, json.dumps(request).encode(), fds[:FDS_PER_MESSAGE])
            for at in range(FDS_PER_MESSAGE, len(fds), FDS_PER_MESSAGE):
                _send(data, b".", fds[at : at + FDS_PER_MESSAGE])
        except OSError:
            pass  # it died while being given its files: its status says how
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            out, err = bounded.read_both(out_r, err_r, deadline, max_output)
        except (subprocess.TimeoutExpired, bounded.TooMuchOutput):
            self._kill(ctl, pidfd)
            raise
        finally:
            os.close(out_r)
            os.close(err_r)
        # its end, by its time as its output was: one that closed both and ran on is killed too
        ctl.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            message, _ = _receive(ctl, 16, 0)
        except TimeoutError:
            self._kill(ctl, pidfd)
            raise subprocess.TimeoutExpired("analysis", 0) from None
        except OSError:
            message = b""
        if message[:1] != b"S":
            slots.suspect(self.uid, self.pid_ns)  # its keeper is gone without a word: its end is not proven
        # its status, and whether it said its sandbox was complete (a keeper that said nothing: killed)
        status, ready = (
            struct.unpack("i?", message[1:]) if message[:1] == b"S" and len(message) == 6 else (-9, True)
        )
        if status == SETUP_FAILED and not ready:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise TemplateError(f"a template's child could not make its sandbox: {last[0]}")
        return out, err, status

    def _kill(self, ctl: socket.socket, pidfd: int) -> None:
        """Kill the analysis (its PID namespace with it) and wait for its keeper to say it is
        gone, so that its uid's processes are free again; where the keeper does not say so,
        the analysis's uid is left to :func:`slots.suspect`."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        ctl.settimeout(END_TIMEOUT)
        try:
            message, _ = _receive(ctl, 16, 0)
        except OSError:
            message = b""
        if message[:1] != b"S":
            slots.suspect(self.uid, self.pid_ns)


def pid_namespace(uid: int) -> str | None:
    """The PID namespace of this process's running template for ``uid``, if there is one."""
    t = _templates.get(uid)
    return t.pid_ns if t is not None and t.alive() else None


_templates: dict[int, Template] = {}
_refused: dict[int, str] = {}
_start_lock = threading.Lock()
#: the thread templates are started from, alive as long as this process: bubblewrap's
#: --die-with-parent follows the thread that started it, and an analysis thread may end
_starter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis-template")


def refuse(uid: int, why: str) -> None:
    """Stop using the template for ``uid`` in this process: it failed where it should not."""
    import logging

    with _start_lock:
        t = _templates.pop(uid, None)
        _refused[uid] = why
    if t is not None:
        t.close()
    logging.getLogger("corevault.analysis").warning(
        "analysis template stopped (%s): each analysis starts a worker of its own", why
    )


def shared(uid: int, processes: int = slots.DEFAULT_PROCESSES) -> Template | None:
    """This process's template for ``uid`` (its processes bounded by ``processes``), started
    on first use (again if it died); None where it cannot start here (the reason is logged once)."""
    with _start_lock:
        if any(t.owner != os.getpid() for t in _templates.values()):
            _templates.clear()  # a forked copy of this process: those are its parent's
        if uid in _refused:
            return None
        t = _templates.get(uid)
        if t is not None and t.alive() and t.forks < MAX_FORKS:
            return t
        if t is not None:
            t.retire()
        try:
            _templates[uid] = _starter.submit(Template, uid, processes).result()
        except (TemplateError, sandbox.SandboxError, OSError) as e:
            import logging

            _refused[uid] = str(e)
            # expected of an unprivileged user's analysis (the CLI's); on a node, worth a look
            level = logging.WARNING if os.geteuid() == 0 else logging.INFO
            logging.getLogger("corevault.analysis").log(
                level, "analysis template not available (%s): each analysis starts a worker of its own", e
            )
            return None
        return _templates[uid]
