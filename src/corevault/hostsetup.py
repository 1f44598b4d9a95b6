"""Installing the capture handler on a host, and leaving the host exactly as it was.

``install`` saves ``kernel.core_pattern``, ``kernel.core_pipe_limit`` and
``fs.suid_dumpable`` into a state file, then sets ours: a pipe pattern that passes every
specifier to the handler, a pipe limit so ``/proc/%P`` stays valid while the handler
works, and ``suid_dumpable=2`` so servers that drop privileges still dump (as root-only
cores). ``uninstall`` writes the saved values back. A pattern left pointing at a missing
handler silently loses every crash on the host, so ``status`` says when that is the case,
and ``install`` refuses to replace another tool's pipe handler unless forced.

Two modes: ``pipe`` (``|corevault-capture …``, a process per crash, any kernel) and
``socket`` (``@@<state>/coredump.sock``, Linux 6.17+, or ``@…`` on 6.16: the kernel connects to the agent's
listener, which may refuse a dump before a byte of it is written). In socket mode nothing
captures while no agent listens, so ``status`` checks the listener too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress

from corevault import atomic, bytecode, config
from corevault.errors import UserError
from corevault.pattern import MAX_PATTERN_LEN, SPECIFIERS

SYSCTLS = {
    "core_pattern": "/proc/sys/kernel/core_pattern",
    "core_pipe_limit": "/proc/sys/kernel/core_pipe_limit",
    "suid_dumpable": "/proc/sys/fs/suid_dumpable",
}
HANDLER_NAME = "corevault-capture"
#: the handler's launcher that starts Python isolated and without site (:func:`isolated_launcher`)
LAUNCHER_NAME = "corevault-capture-isolated"
#: beside the launcher: the compiled code of the modules it runs (:mod:`corevault.bytecode`)
BYTECODE_SUFFIX = ".modules"
FORWARDER_NAME = "corevault-forward"
STATE_NAME = "installed.json"
SOCKET_NAME = "coredump.sock"
MODES = ("auto", "socket", "pipe")


class SetupError(UserError):
    """Installing or uninstalling cannot go ahead; the message says what to do."""


def read_sysctls(paths: dict[str, str] = SYSCTLS) -> dict[str, str]:
    values = {}
    for key, path in paths.items():
        with open(path) as f:
            values[key] = f.read().rstrip("\n")
    return values


def write_sysctl(path: str, value: str) -> None:
    if value.startswith("@") and path == SYSCTLS["core_pattern"] and not _in_host_mount_namespace():
        _write_from_host_mount_namespace(path, value)
        return
    with open(path, "w") as f:
        f.write(value + "\n")


#: The host's initial namespaces, for an agent in a privileged hostPID pod to join: those of
#: kthreadd, PID 2 of the host, which are always the initial ones (PID 1 is an init that may
#: have moved, and whose namespace files may be closed even to root).
HOST_NAMESPACES = "/proc/2/ns"

# The kernel takes a coredump socket pattern only from a task in its initial mount namespace
# (where it resolves the socket's path): written from a container it is EINVAL. The agent
# writes it from a short-lived child that joined the host's mount namespace; a child, because
# a process with threads cannot change its mount namespace.
_HOST_MOUNT_NS_WRITE = """
import ctypes, os, sys
try:
    fd = os.open(sys.argv[2], os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "setns")
    with open(sys.argv[1], "w") as f:
        f.write(sys.stdin.read())
except OSError as e:
    sys.exit(e.errno or 1)
"""


def _in_host_mount_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/2/ns/mnt").st_ino
    except OSError:
        return True  # not ours to see: write here and let the kernel judge


def _write_from_host_mount_namespace(path: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-c", _HOST_MOUNT_NS_WRITE, path, f"{HOST_NAMESPACES}/mnt"],
        input=value + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        why = os.strerror(done.returncode)
        raise OSError(done.returncode, f"{why} (written from the host's mount namespace)")


def default_handler() -> str:
    """The handler for the kernel to run: :func:`isolated_launcher` beside this interpreter.

    Falls back to the ``corevault-capture`` script installed beside it (or on ``PATH``) where
    the launcher cannot be written (an interpreter directory that is not ours to write).
    """
    beside = os.path.join(os.path.dirname(sys.executable), HANDLER_NAME)
    try:
        return isolated_launcher(os.path.join(os.path.dirname(sys.executable), LAUNCHER_NAME))
    except OSError:
        return beside if os.path.exists(beside) else shutil.which(HANDLER_NAME) or beside


def isolated_launcher(path: str) -> str:
    """Write (when missing or stale) the handler's launcher at ``path``; returns ``path``.

    pip's ``corevault-capture`` script starts Python with ``site``: it reads every ``.pth``
    file of the environment and imports what they name, on every crash, while the crashed
    process waits. The launcher runs ``python -I -S`` instead, with the two directories the
    handler imports from (corevault's and zstandard's) written into it now, after the
    standard library's (so no standard module is looked for, or found, in them first), but for
    the two modules that read the compiled modules file (``corevault`` and ``corevault.bytecode``):
    corevault's directory is first while they alone are imported, as everything they import is
    built in or frozen (found before any directory is looked at), so that the standard library's
    directories are not searched for them (the import system lists ``lib-dynload``: ~0.15 ms). ``-I``
    also keeps ``PYTHON*`` variables, the user's site directory and the script's directory
    out of a root process. It ends with :func:`corevault.capture.handler.quick_exit`. The
    kernel gives shebang lines 256 bytes; a longer interpreter path raises OSError and the
    caller falls back to the ordinary script.
    """
    import corevault

    here = [os.path.dirname(os.path.dirname(os.path.abspath(corevault.__file__)))]
    with suppress(ImportError):
        from importlib.util import find_spec

        spec = find_spec("zstandard")
        if spec is not None and spec.origin:
            here.append(os.path.dirname(os.path.dirname(spec.origin)))
    shebang = f"#!{sys.executable} -IS\n"
    if len(shebang) > 256:
        raise OSError(f"interpreter path too long for a shebang line: {sys.executable}")
    modules = path + BYTECODE_SUFFIX
    path_line = f"sys.path += {list(dict.fromkeys(here))!r}\n"
    text = (
        shebang + "# corevault's pipe handler, written by corevault (hostsetup.isolated_launcher)\n"
        # no cyclic garbage collection: a short-lived process makes no cycles worth collecting,
        # and the collector's passes over every object made by the imports cost each crash CPU
        "import gc\ngc.disable()\n"
        f"import sys\nsys.path.insert(0, {here[0]!r})\nfrom corevault import bytecode\ndel sys.path[0]\n"
        + path_line
        # the crash path's modules from one file (corevault.bytecode), each while its source is unchanged
        + f"bytecode.install({modules!r})\n"
        "from corevault.capture.handler import main, quick_exit\nquick_exit(main())\n"
    )
    with suppress(OSError), open(path) as f:
        if f.read() == text and os.access(path, os.X_OK) and bytecode.is_current(modules):
            return path
    atomic.write(path, text, 0o755)  # as pip writes its scripts; nothing secret in it
    with suppress(OSError, subprocess.SubprocessError, ValueError):  # without it, ordinary imports
        bytecode.write(modules, _crash_path_modules(path_line))
    return path


def _crash_path_modules(path_line: str) -> dict[str, str]:
    """The modules compiled from source that the handler imports before its first crash, by name:
    their sources. corevault's, and the few of the standard library's that are not frozen into
    the interpreter (``struct``): the import system's search costs those as much as ours; and
    the extension modules among them, and the SHA-256 a small core is hashed with (imported at
    the crash), by their shared objects. Not what the launcher imports before the finder is in place.

    Asked of a fresh ``python -I -S`` with the launcher's path, as the kernel will start it:
    this process has imported much more than the handler does.
    """
    probe = (
        "import sys\n"
        + path_line
        + "from corevault import bytecode\n"  # what the launcher imports before the finder
        "before = set(sys.modules)\nimport corevault.capture.handler\n"
        "from corevault import hashing\nhashing.sha256(0)\n"
        "LOADERS = ('SourceFileLoader', 'ExtensionFileLoader')\n"
        "for n, m in list(sys.modules.items()):\n"
        "    if n not in before and type(m.__spec__.loader).__name__ in LOADERS:\n"
        "        print(n, m.__spec__.origin)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def pipe_pattern(handler: str, settings_file: str | None = None, forward_to: str | None = None) -> str:
    """``|HANDLER [-c CONFIG] %P %p …``: every specifier, in the handler's argument order.

    With ``forward_to``, the handler is corevault-forward and its first argument the agent's socket.
    """
    if not os.path.isabs(handler):
        raise SetupError(f"the handler path {handler!r} must be absolute: the kernel runs it from /")
    head = (
        [handler, forward_to] if forward_to else [handler] + (["-c", settings_file] if settings_file else [])
    )
    words = head + ["%" + s for s in SPECIFIERS]
    if any(" " in w for w in head):
        raise SetupError("the handler and config paths must not contain spaces (the kernel splits on them)")
    pattern = "|" + " ".join(words)
    if len(pattern.encode()) > MAX_PATTERN_LEN:
        raise SetupError(
            f"the core_pattern would be {len(pattern.encode())} bytes, the kernel takes {MAX_PATTERN_LEN}: "
            f"link the handler (and config) to shorter paths, e.g. /usr/local/sbin/{HANDLER_NAME}"
        )
    return pattern


def is_ours(pattern: str, state: dict | None = None) -> bool:
    """Whether ``pattern`` is corevault's: the one we installed, any corevault-capture, our socket."""
    if state is not None and pattern == state["installed"]["core_pattern"]:
        return True
    if pattern.startswith("@"):
        return os.path.basename(pattern.lstrip("@")) == SOCKET_NAME
    return pattern.startswith("|") and os.path.basename(pattern[1:].split(" ", 1)[0]) in (
        HANDLER_NAME,
        LAUNCHER_NAME,
        FORWARDER_NAME,
    )


def mode_of(pattern: str) -> str | None:
    return "socket" if pattern.startswith("@") else "pipe" if pattern.startswith("|") else None


def socket_path(state_dir: str) -> str:
    """Where the agent listens for the kernel in socket mode."""
    return os.path.join(state_dir, SOCKET_NAME)


def kernel_socket_mode(release: str | None = None) -> str | None:
    """``@@`` on kernels with the request protocol (6.17+), ``@`` on 6.16, else None."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (6, 17):
        return "@@"
    return "@" if (major, minor) >= (6, 16) else None


def listening(path: str) -> bool:
    """Whether a Unix socket bound at ``path`` is listening (read from /proc/net/unix)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON when listening
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, StopIteration, ValueError):
        return False
    return False


def choose_mode(mode: str, state_dir: str) -> str:
    """The mode ``install --mode`` means on this host now; an error says why not when it cannot."""
    if mode not in MODES:
        raise SetupError(f"--mode {mode!r}: use auto, socket or pipe")
    if mode == "pipe":
        return "pipe"
    kernel = kernel_socket_mode()
    listener = listening(socket_path(state_dir))
    if mode == "auto":
        return "socket" if kernel and listener else "pipe"
    if kernel is None:
        raise SetupError(
            f"this kernel ({os.uname().release}) has no coredump socket (Linux 6.16+); use --mode pipe"
        )
    if not listener:
        raise SetupError(
            f"nothing listens on {socket_path(state_dir)}: start 'corevault agent' first "
            "(it listens for the kernel), or use --mode pipe"
        )
    return "socket"


def state_path(settings: config.Settings) -> str:
    """Where an installation records what it saved and set."""
    return os.path.join(settings.state_dir, STATE_NAME)


def forwarder_paths(state_dir: str) -> tuple[str, str]:
    """Where an agent puts corevault-forward and the socket it listens on, under its state hostPath."""
    return os.path.join(state_dir, "bin", FORWARDER_NAME), os.path.join(state_dir, "agent.sock")


def install(
    handler: str | None,
    *,
    config_path: str | None = None,
    pipe_limit: int = 16,
    suid_dumpable: int = 2,
    force: bool = False,
    forward_to: str | None = None,
    socket: str | None = None,
    requests: bool = True,
    resume_socket: str | None = None,
    paths: dict[str, str] = SYSCTLS,
) -> dict:
    """Set our sysctls, saving the host's first; returns the state that ``uninstall`` uses.

    With ``forward_to`` (an agent's socket) the handler is corevault-forward. With
    ``socket`` the pattern is ``@@SOCKET`` (socket mode; ``@SOCKET`` without ``requests``, for
    Linux 6.16) and there is no handler.
    ``resume_socket`` records the socket pattern that a pipe stands in for (:func:`hand_over`).

    The settings at ``config_path`` are validated and written as the handler's snapshot.
    Installing again over our own installation keeps the originally saved values, and is
    how changed settings reach the handler.
    """
    if socket is None and (handler is None or not os.access(handler, os.X_OK)):
        raise SetupError(f"handler {handler} is not an executable file; install corevault first")
    if suid_dumpable not in (0, 1, 2):
        raise SetupError(f"suid_dumpable must be 0, 1 or 2, not {suid_dumpable}")
    if pipe_limit < 0:
        raise SetupError(f"core_pipe_limit must be 0 or more, not {pipe_limit}")
    settings, snapshot = config.write_snapshot(config_path)
    if socket is not None:
        pattern = ("@@" if requests else "@") + socket
        if len(pattern.encode()) > MAX_PATTERN_LEN or " " in socket:
            raise SetupError(f"the socket path {socket!r} is too long for core_pattern or has spaces")
    else:
        assert handler is not None
        pattern = pipe_pattern(handler, None if snapshot == config.DEFAULT_SNAPSHOT else snapshot, forward_to)
    state_file = state_path(settings)
    current = read_sysctls(paths)
    previous = load_state(state_file)
    if previous is not None and is_ours(current["core_pattern"], previous):
        saved = previous["saved"]
    else:
        if current["core_pattern"].startswith("|") and not is_ours(current["core_pattern"]) and not force:
            other = current["core_pattern"].split(" ")[0][1:]
            raise SetupError(
                f"core_pattern already pipes to another handler ({other}); "
                "use --force to replace it (uninstall will put it back)"
            )
        saved = current
    ours = {"core_pattern": pattern, "core_pipe_limit": str(pipe_limit), "suid_dumpable": str(suid_dumpable)}
    state = {"saved": saved, "installed": ours, "handler": handler, "snapshot": snapshot, "time": time.time()}
    if resume_socket:
        state["resume_socket"] = resume_socket
    _save_state(state_file, state)
    try:
        for key, value in ours.items():
            write_sysctl(paths[key], value)
    except OSError as e:
        _restore(saved, paths)
        os.unlink(state_file)
        raise SetupError(f"cannot set {key}: {e.strerror}; run as root on the host") from None
    return state


def hand_over(state_dir: str, config_path: str | None, handler: str) -> bool:
    """Socket mode, while its listener stops: let the pipe handler capture until it is back.

    Only when core_pattern is our socket and the standalone handler is installed (a host, not
    a node that has only the agent's forwarder); returns whether it handed over.
    """
    state_file = os.path.join(state_dir, STATE_NAME)
    state = load_state(state_file)
    current = read_sysctls()["core_pattern"]
    ours = current.startswith("@") and current.lstrip("@") == socket_path(state_dir)
    if state is None or not ours or not os.access(handler, os.X_OK):
        return False
    install(handler, config_path=config_path, resume_socket=current)
    return True


def take_back(state_dir: str, config_path: str | None) -> bool:
    """The listener is back: socket mode again, if :func:`hand_over` had put the pipe in its place."""
    state = load_state(os.path.join(state_dir, STATE_NAME))
    if (
        state is None
        or not state.get("resume_socket")
        or read_sysctls()["core_pattern"] != state["installed"]["core_pattern"]
    ):
        return False
    pattern = state["resume_socket"]
    install(None, config_path=config_path, socket=pattern.lstrip("@"), requests=pattern.startswith("@@"))
    return True


def uninstall(state_file: str, paths: dict[str, str] = SYSCTLS) -> dict | None:
    """Put the saved sysctls back; None when corevault was not installed."""
    state = load_state(state_file)
    if state is None:
        return None
    current = read_sysctls(paths)
    if not is_ours(current["core_pattern"], state):
        # Someone else took over since: leave their pattern, restore only what is still ours.
        saved = {k: v for k, v in state["saved"].items() if current[k] == state["installed"][k]}
    else:
        saved = state["saved"]
    _restore(saved, paths)
    os.unlink(state_file)
    if state.get("snapshot"):
        with suppress(FileNotFoundError):
            os.unlink(state["snapshot"])
    return state


def _restore(saved: dict[str, str], paths: dict[str, str]) -> None:
    for key in ("core_pattern", "core_pipe_limit", "suid_dumpable"):
        if key in saved:
            write_sysctl(paths[key], saved[key])


def status(state_file: str, paths: dict[str, str] = SYSCTLS) -> dict:
    """What is installed now, what was saved, and whether the host loses crashes."""
    current = read_sysctls(paths)
    state = load_state(state_file)
    pattern = current["core_pattern"]
    problems = []
    if pattern.startswith("|"):
        handler = pattern[1:].split(" ", 1)[0]
        if not os.access(handler, os.X_OK):
            problems.append(f"core_pattern pipes to {handler}, which is missing: every crash is lost")
    elif pattern.startswith("@") and not listening(pattern.lstrip("@")):
        problems.append(
            f"core_pattern sends cores to {pattern.lstrip('@')}, where nothing listens: every crash is lost "
            "until the agent runs again"
        )
    ours = is_ours(pattern, state)
    if state is not None and not ours:
        problems.append("corevault's state says installed, but core_pattern is no longer ours")
    if state is not None and ours and config.snapshot_is_stale(state["snapshot"]):
        problems.append("the settings file changed since install; run 'corevault install' again to apply it")
    return {
        "installed": ours,
        "mode": mode_of(pattern) if ours else None,
        "current": current,
        "saved": state["saved"] if state else None,
        "snapshot": state.get("snapshot") if state else None,
        "problems": problems,
    }


def load_state(state_file: str) -> dict | None:
    try:
        with open(state_file) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save_state(state_file: str, state: dict) -> None:
    os.makedirs(os.path.dirname(state_file) or ".", mode=0o700, exist_ok=True)
    atomic.write(state_file, json.dumps(state, indent=1))
