"""The one place where errors become exit codes, for ``corevault`` and ``kubectl corevault``.

Exit codes: 0 success, 1 the operation failed (a check found problems, a store could not
be reached, a file could not be written), 2 bad usage or input (a bad setting, pattern,
filter or flag, click's own usage errors), 3 an environment problem (not root), 4 no such
crash, 130 interrupted (Ctrl-C). An error a user can cause or fix is one line on stderr,
``<program>: error: <message>``; a traceback is for bugs.

Click's usage errors are caught here too (the app runs outside click's standalone mode), so
a typo'd flag is one line like every other error instead of a framed box, and Ctrl-C says
that it stopped the command instead of exiting silently.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import typer

from corevault.config import ConfigError
from corevault.errors import BadInput, NotFound, UserError
from corevault.pattern import PatternError
from corevault.printable import printable

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def run(app: typer.Typer, argv: list[str] | None, prog: str) -> int:
    """Run ``app`` as ``prog``; returns the exit code its outcome maps to."""
    interrupted: list[int] = []
    with _noting_interrupts(interrupted):
        try:
            code = app(args=argv, prog_name=prog, standalone_mode=False)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else EXIT_FAILED
        except typer.TyperException as e:  # click's (typer's own copy) usage errors: a flag, an argument
            ctx = getattr(e, "ctx", None)
            if (
                type(e).__name__ == "NoArgsIsHelpError" and ctx is not None
            ):  # as typer names it: no public class
                text = ctx.get_help()  # typer's rich help prints itself and returns nothing
                if text:
                    print(text)
                return EXIT_USAGE
            hint = f"; see '{ctx.command_path} -h'" if ctx is not None else ""
            return _error(prog, e.format_message().rstrip(".") + hint, e.exit_code)
        except typer.Abort:  # a prompt's EOF
            return _error(prog, "aborted", EXIT_FAILED)
        except (ConfigError, PatternError, BadInput) as e:
            return _error(prog, str(e), EXIT_USAGE)
        except NotFound as e:
            return _error(prog, str(e), EXIT_NOT_FOUND)
        except UserError as e:
            return _error(prog, str(e), EXIT_FAILED)
        except PermissionError as e:
            return _error(
                prog, f"{e.filename or 'operation'}: permission denied; run as root", EXIT_ENVIRONMENT
            )
        except OSError as e:  # a file the user named (an output path, a directory) that cannot be used
            where = f"{e.filename}: " if e.filename else ""
            return _error(prog, f"{where}{e.strerror or e}", EXIT_FAILED)
    if code == EXIT_INTERRUPTED and interrupted:
        # typer turns Ctrl-C into exit 130 silently; files being written were dropped whole
        return _error(prog, "interrupted; nothing half-written was kept: run the command again", code)
    return code if isinstance(code, int) else 0


@contextlib.contextmanager
def _noting_interrupts(seen: list[int]) -> Iterator[None]:
    """Python's own SIGINT handling (KeyboardInterrupt), noting that it happened.

    Left alone where SIGINT is ignored (``nohup``, a background job) or handled by someone else."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    if before is not signal.default_int_handler:
        yield
        return

    def note(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _error(prog: str, message: str, code: int) -> int:
    # An error can quote what a crashed process named (a path, a symbol, a debugger's output): data only.
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)
    return code
