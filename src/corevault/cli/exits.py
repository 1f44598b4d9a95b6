"""The one place where errors become exit codes, for ``corevault`` and ``kubectl corevault``.

Exit codes: 0 success, 1 the operation failed (a check found problems, a store could not
be reached), 2 bad usage or input (a bad setting or pattern; click's own usage errors), 3
an environment problem (not root), 4 no such crash. An error a user can cause or fix is
one line on stderr, ``<program>: error: <message>``; a traceback is for bugs.
"""

from __future__ import annotations

import sys

import typer

from corevault.config import ConfigError
from corevault.errors import NotFound, UserError
from corevault.pattern import PatternError
from corevault.printable import printable

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_NOT_FOUND = 4


def run(app: typer.Typer, argv: list[str] | None, prog: str) -> int:
    """Run ``app`` as ``prog``; returns the exit code its outcome maps to."""
    try:
        app(args=argv, prog_name=prog)  # usage errors: click prints them, exits 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    except (ConfigError, PatternError) as e:
        return _error(prog, str(e), EXIT_USAGE)
    except NotFound as e:
        return _error(prog, str(e), EXIT_NOT_FOUND)
    except UserError as e:
        return _error(prog, str(e), EXIT_FAILED)
    except PermissionError as e:
        return _error(prog, f"{e.filename or 'operation'}: permission denied; run as root", EXIT_ENVIRONMENT)
    return 0


def _error(prog: str, message: str, code: int) -> int:
    # An error can quote what a crashed process named (a path, a symbol, a debugger's output): data only.
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)
    return code
