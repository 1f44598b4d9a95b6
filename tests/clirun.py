"""``corevault`` run in the test's own process, for commands that read and print.

It is the installed command's entry point (``corevault.cli.app.main``, with its one ladder
from errors to exit codes), its stdout and stderr captured as a child's would be (not a
terminal, bytes decoded as text), so a test asserts on what a user sees. What it saves is
a new interpreter for every command: its start-up, importing the CLI, costs about 0.6 s of
CPU. A command that hands the terminal to another program (``corevault gdb`` runs gdb,
which writes to the file descriptors, not to ``sys.stdout``) or that serves (or must refuse
to: a regression would serve forever) still runs in a child, through ``tests.nodes.CLI``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from click.testing import CliRunner

from corevault.cli.app import main


def corevault(*args: str, env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """``corevault ARGS`` in this process; the result as ``subprocess.run(..., text=True)`` gives it.

    ``env`` sets variables (``None`` removes one) for the command's time only."""
    with CliRunner().isolation(env=env) as (out, err, _):
        try:
            code = main(list(args))
        finally:
            sys.stdout.flush()  # the captured streams buffer; read them whole
            sys.stderr.flush()
    return subprocess.CompletedProcess(
        ["corevault", *args], code, out.getvalue().decode(), err.getvalue().decode()
    )
