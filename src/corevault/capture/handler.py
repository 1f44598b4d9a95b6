"""The capture handler: one short-lived process per crash, started by the kernel.

It runs as root in the host's initial namespaces with the core on fd 0 and nothing else
but the pidfd open, so it first points fds 1 and 2 at /dev/null (a file opened later must
not become "stdout") and arms a timeout so a crashing process is never held forever. A
crash of its own is not dumped: the kernel starts pipe helpers with RLIMIT_CORE 1, the
value it takes for "a helper crashed, do not call it again" (``umh_coredump_setup`` and
``do_coredump`` in fs/coredump.c; ``tests/test_handler_crash.py`` crashes such a helper).
Then, in this order, because /proc/%P is only guaranteed while the core has not been read
to the end:

1. open /proc/%P, prove with the pidfd it is the crashed task, read its facts (:mod:`.process`);
2. admit it or not (:mod:`.admission`): its container and pod, its pod's opt-in, its
   tenants' dump slots, the crash-storm limit;
3. deliver it (:mod:`.delivery`): open the targets and the mapped ELF objects, stream the
   core once into every target, publish the plain core, finish the spool entry, copy new
   binaries into the build-id store.

This module is the entry point of the pipe transport; the agent's coredump socket
(:mod:`.coresocket`) and snapshots (:mod:`.snapshot`) go through the same admission and
delivery.

It never talks to the network, the catalog or the API server. Everything that is dropped,
cut or refused is written to the spool's journal with the reason; a crash that did not opt
in is journaled as skipped and nothing else is written.
"""

from __future__ import annotations

# signal.py wraps this module only to turn numbers into enums; importing enum costs every crash ~5 ms
import _signal
import os
import sys
import time

from corevault import config
from corevault.capture import admission, delivery, process, stream
from corevault.capture.admission import journal


def _on_alarm(signum: int, frame: object) -> None:
    raise delivery.HandlerTimeout


def _quiet_stdio() -> None:
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def quick_exit(code: int) -> None:
    """Exit with ``code`` at once, without tearing the interpreter down (the launcher's last call).

    Everything the handler writes goes out with ``os.write`` and is fsynced and closed before
    :func:`main` returns, and stdout and stderr are /dev/null, so the interpreter's
    finalization (freeing every module and object) would only keep the crashed process
    waiting: ~2 ms of CPU on this kind of machine.
    """
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    _quiet_stdio()
    os.umask(0o077)
    args = sys.argv[1:] if argv is None else argv
    path = None
    if len(args) >= 2 and args[0] in ("-c", "--config"):
        path, args = args[1], args[2:]
    warnings: list[str] = []
    if path is None and os.path.exists(config.DEFAULT_SNAPSHOT):
        path = config.DEFAULT_SNAPSHOT
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        settings = config.Settings()
        warnings.append(f"{e}; using built-in defaults")
    _signal.signal(_signal.SIGALRM, _on_alarm)
    _signal.setitimer(_signal.ITIMER_REAL, settings.timeout)
    try:
        return capture(settings, args, 0, warnings)
    except Exception as e:  # a bug: say so in the journal rather than vanish
        journal(settings, {"event": "error", "reason": f"handler failed: {type(e).__name__}: {e}"})
        return 1
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)


def capture(
    settings: config.Settings,
    args: list[str],
    core_fd: int,
    warnings: list[str],
    pipe_size: int = stream.CHUNK,
) -> int:
    """The pipe transport: the kernel's arguments, the core on ``core_fd`` (a pipe given at
    least ``pipe_size`` bytes of buffer)."""
    started = time.monotonic()
    try:
        crash = process.Crash(process.parse_args(args))
    except ValueError as e:
        journal(settings, {"event": "error", "reason": f"bad handler arguments: {e}"})
        return 2
    pidfd_arg = crash.values.get("F", "")
    record = admission.new_record(settings, crash)
    try:
        process.open_process(crash, int(pidfd_arg) if pidfd_arg.isdigit() else None)
    except process.ProcessGone as e:
        journal(settings, {**record, "event": "refused", "reason": str(e), "exe": crash.exe})
        return 0
    admitted = None
    try:
        process.read_facts(crash)
        admitted = admission.admit(settings, crash, record, warnings)
        if admitted is None:
            return 0
        stream.enlarge_pipe(core_fd, pipe_size)
        delivery.deliver(admitted, core_fd, started)
        return 0
    finally:
        if admitted is not None:
            admitted.release()
        crash.close()
