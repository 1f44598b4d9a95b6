"""What the docs show works as shown: each settings example loads, each option in docs/cli.md exists.

A reader copies a TOML block into /etc/corevault/config.toml, or types a flag off the
SYNOPSIS; a renamed key or option must fail here, not at 3 a.m. on a node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from corevault import config
from corevault.cli import app as corevault_app
from corevault.cli import kubectl

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def toml_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```toml\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            found.append((f"{doc.name}:{line}", m.group(1)))
    return found


SETTINGS = [
    (where, block) for where, block in toml_blocks() if "[[token]]" not in block
]  # tokens: docs/server.md


def test_the_docs_show_settings() -> None:
    assert len(SETTINGS) >= 5  # the pattern above still finds the examples


@pytest.mark.parametrize(("where", "block"), SETTINGS, ids=[w for w, _ in SETTINGS])
def test_every_settings_example_in_the_docs_loads(where: str, block: str, tmp_path) -> None:
    settings = tmp_path / "config.toml"
    settings.write_text(f'state_dir = "{tmp_path}/state"\n' + block if "state_dir" not in block else block)
    config.load(str(settings))  # a ConfigError names the key and what to write instead


def options(command: Any) -> set[str]:  # a click command of typer's own copy of click
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def commands(group: Any, path: str) -> list[tuple[str, Any]]:
    """Every command under ``group``, by its full name (``corevault groups resolve``)."""
    found = []
    for name, command in group.commands.items():
        found.append((f"{path} {name}", command))
        if hasattr(command, "commands"):
            found += commands(command, f"{path} {name}")
    return found


PROGRAMS = {"corevault": get_command(corevault_app.app), "kubectl corevault": get_command(kubectl.app)}
CLI_MD = (ROOT / "docs" / "cli.md").read_text()


def synopsis_lines() -> list[tuple[str, str]]:
    """(the command a SYNOPSIS entry is of, the entry's text with its continuation lines)."""
    every = {
        name: c for prog, group in PROGRAMS.items() for name, c in [(prog, group), *commands(group, prog)]
    }
    entries: list[tuple[str, str]] = []
    for block in re.findall(r"## SYNOPSIS\n\n```\n(.*?)```", CLI_MD, re.S):
        for line in block.splitlines():
            if line.startswith(" ") and entries:
                entries[-1] = (entries[-1][0], entries[-1][1] + line)
                continue
            prog = "kubectl corevault" if line.startswith("kubectl corevault") else "corevault"
            words = re.sub(
                r"\[-c FILE\]|\[--token-file F\]|--server URL", "", line.removeprefix(prog)
            ).split()
            name = prog
            for w in words:
                if f"{name} {w}" not in every:
                    break
                name = f"{name} {w}"
            entries.append((name, line))
    return entries


def test_the_synopsis_names_only_options_its_commands_have() -> None:
    every = {
        name: c for prog, group in PROGRAMS.items() for name, c in [(prog, group), *commands(group, prog)]
    }
    entries = synopsis_lines()
    assert len(entries) > 20
    for name, text in entries:
        prog = "kubectl corevault" if name.startswith("kubectl") else "corevault"
        known = options(every[name]) | options(PROGRAMS[prog])
        named = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))
        assert named <= known, f"{name}: {sorted(named - known)} in docs/cli.md are not its options"


def test_every_option_of_every_command_is_in_docs_cli_md() -> None:
    missing = [
        f"{name} {option}"
        for prog, group in PROGRAMS.items()
        for name, command in [(prog, group), *commands(group, prog)]
        for option in options(command)
        if option.startswith("--") and option not in CLI_MD
    ]
    # long forms of options the SYNOPSIS gives short (-n, -o, -m), --attach of --no-attach, typer's own
    shown_short = {"--limit", "--output", "--comment", "--attach", "--help", "--show-completion"}
    assert [m for m in missing if m.rsplit(" ", 1)[1] not in shown_short] == []


def test_docs_server_md_lists_every_route_of_the_api_and_its_query_parameters(tmp_path) -> None:
    from corevault.server.access import Open
    from corevault.server.app import create_app

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    app = create_app(config.load(str(cfg)), Open())
    try:
        spec = app.openapi()
    finally:
        app.state.server.close()
    text = (ROOT / "docs" / "server.md").read_text()
    table = text[text.index("## The API") : text.index("## Downloads")]
    documented = {
        (method, path): set(re.findall(r"[?&]([a-z_]+)=", query))
        for row in re.findall(r"^\| (`.*?`) \| ", table, re.M)  # a row's requests, one or several
        for method, path, query in re.findall(r"`([A-Z]+) (/[^`?]*)(\?[^`]*)?`", row)
    }
    names = {"crash_id": "ID", "signature": "SIG", "rid": "ID", "build_id": "KEY"}
    missing = []
    for path, operations in spec["paths"].items():
        shown = re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), m.group(1)), path)
        for method, operation in operations.items():
            query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
            if (method.upper(), shown) not in documented:
                missing.append(f"{method.upper()} {shown}")
            elif query - documented[(method.upper(), shown)]:
                missing.append(
                    f"{method.upper()} {shown}: {sorted(query - documented[(method.upper(), shown)])}"
                )
    assert missing == [], "docs/server.md, The API, does not show these"
