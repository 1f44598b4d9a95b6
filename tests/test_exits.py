"""Both programs, ``corevault`` and ``kubectl corevault``, map a failure to the same exit code and one line."""

from __future__ import annotations

import pytest
import typer

from corevault.cli import app as corevault_app
from corevault.cli import exits, kubectl
from corevault.config import ConfigError
from corevault.errors import NotFound, UserError
from corevault.pattern import PatternError
from corevault.vault.blobs import StoreError

PROGRAMS = ["corevault", "kubectl corevault"]

# (what the command raises, exit code, words of the one-line error)
FAILURES = [
    (ConfigError("/etc/corevault/config.toml: [vault] store: unknown"), 2, "[vault] store: unknown"),
    (PatternError("relative/core", ["not an absolute path"]), 2, "not an absolute path"),
    (NotFound("no crash 'x'; 'corevault list' shows the ids"), 4, "no crash 'x'"),
    (StoreError("cannot reach the store: refused"), 1, "cannot reach the store"),
    (UserError("pipe mode needs --forwarder BINARY"), 1, "needs --forwarder"),
    (PermissionError(13, "Permission denied", "/proc/sys/kernel/core_pattern"), 3, "run as root"),
]


def failing_app(error: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def fail() -> None:
        raise error

    @app.command()
    def other() -> None:  # two commands, so that "fail" is a subcommand as in both programs
        pass

    return app


@pytest.mark.parametrize("prog", PROGRAMS)
@pytest.mark.parametrize(("error", "code", "words"), FAILURES, ids=[type(e).__name__ for e, _, _ in FAILURES])
def test_a_failure_is_one_line_and_the_same_code_in_both_programs(
    prog: str, error: Exception, code: int, words: str, capsys
) -> None:
    assert exits.run(failing_app(error), ["fail"], prog) == code
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_quoted_name_is_printed_as_data(capsys) -> None:
    assert exits.run(failing_app(UserError("no symbol \x1b[2J\u202eevil")), ["fail"], "corevault") == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\\x1b[2J\\u202eevil" in err, err


@pytest.mark.parametrize("prog", PROGRAMS)
def test_usage_errors_and_explicit_exits_keep_their_codes(prog: str, capsys) -> None:
    assert exits.run(failing_app(typer.Exit(5)), ["fail"], prog) == 5
    assert exits.run(failing_app(UserError("unused")), ["no-such-command"], prog) == 2
    assert "No such command" in capsys.readouterr().err


@pytest.mark.parametrize("main", [corevault_app.main, kubectl.main], ids=PROGRAMS)
def test_both_entry_points_go_through_the_one_ladder(main, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(exits, "run", lambda app, argv, prog: seen.append((app, argv, prog)) or 7)
    assert main(["anything"]) == 7
    assert seen and seen[0][1] == ["anything"] and seen[0][2] in PROGRAMS
