"""``corevault groups [list] | show | resolve | ignore | reopen``: crash groups and their lifecycle.

A bare ``corevault groups`` lists what needs attention (open and regressed groups); the
state commands record who changed what (the local user, or the server's name for the
token) and work against the local vault or a server alike.
"""

from __future__ import annotations

import getpass
import json
import sys
import time

import typer

from corevault.cli.crashes import _console, _row, _when, parse_time, source
from corevault.printable import printable

app = typer.Typer(
    name="groups",
    help="Crash groups: list them, show one, resolve, ignore or reopen it.",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def register(root: typer.Typer) -> None:
    root.add_typer(
        app, epilog="Examples: corevault groups · corevault groups resolve SIG --in registry/app:1.4"
    )


def _list(
    ctx: typer.Context, limit: int, state: str | None, search: str | None, new_in: str | None, as_json: bool
) -> None:
    rows = source(ctx).groups(limit, state=state, search=search, new_in=new_in)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("SIGNATURE", "STATE", "COUNT", "FIRST SEEN", "LAST SEEN", "TITLE", box=None)
    for g in rows:
        title = (g["title"] or "") + (f"  [new in {g['new_in']}]" if g.get("new_in") else "")
        table.add_row(*_row(
            g["signature"], g.get("state", "open"), str(g["count"]), _when(g["first_seen"]),
            _when(g["last_seen"]), title,
        ))  # fmt: skip
    _console().print(table)
    if not rows:
        shown = "" if state else " (open and regressed ones; --state all shows every group)"
        print(f"no crash groups match{shown}", file=sys.stderr)


@app.callback()
def groups(
    ctx: typer.Context,
    limit: int = typer.Option(100, "-n", "--limit", min=1),
    state: str = typer.Option(
        None,
        "--state",
        help="open, resolved, ignored, regressed (comma-separated) or all \\[default: open,regressed].",
    ),
    search: str = typer.Option(None, "--search", help="Words that a crash of the group must hold."),
    new_in: str = typer.Option(None, "--new-in", help="Only groups new in this image."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Crash groups (signatures) with their counts, most recently seen first."""
    if ctx.invoked_subcommand is None:
        _list(ctx, limit, state, search, new_in, as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(100, "-n", "--limit", min=1),
    state: str = typer.Option(None, "--state", help="As for 'corevault groups'."),
    search: str = typer.Option(None, "--search"),
    new_in: str = typer.Option(None, "--new-in"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The same as a bare 'corevault groups'."""
    _list(ctx, limit, state, search, new_in, as_json)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def _show(group: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(group, indent=2))
        return
    st = group["status"]
    lines = [f"   Signature: {group['signature']}", f"       Title: {group['title'] or '-'}",
             f"       State: {st['state']}" + (f" (resolved in {st['resolved_in']})" if st.get("resolved_in") else ""),
             f"     Crashes: {group['count']}, first {_when(group['first_seen'])}, last {_when(group['last_seen'])} UTC"]  # fmt: skip
    if (
        len(st.get("namespaces") or ()) > 1
    ):  # the state is kept per namespace; the one above is the most urgent
        lines += [f"          in: {ns['namespace'] or 'host'}: {ns['state']}" for ns in st["namespaces"]]
    if group.get("new_in"):
        lines.append(f"      New in: {group['new_in']}")
    for i in group["per_image"]:
        lines.append(
            f"       Image: {i['image'] or '-'}  {i['count']} crash(es), last {_when(i['last_seen'])}"
        )
    for h in group["history"]:
        extra = "; ".join(
            f"{k} {h[k]}" for k in ("resolved_in", "until", "crashes", "comment", "crash") if h.get(k)
        )
        where = ", ".join(ns or "host" for ns in h.get("namespaces") or ())
        lines.append(
            f"     History: {_when(int(h['time']))} {h['actor']} → {h['state']}"
            + (f" in {where}" if where else "")
            + (f" ({extra})" if extra else "")
        )
    print("\n".join(printable(line) for line in lines))


@app.command()
def show(
    ctx: typer.Context,
    signature: str = typer.Argument(..., metavar="SIGNATURE"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One group: its state and history, its images, its counts."""
    _show(source(ctx).group(signature), as_json)


def _change(ctx: typer.Context, signature: str, change: dict) -> None:
    group = source(ctx).set_state(signature, change, _actor())
    print(f"{signature}: {group['status']['state']}")


@app.command()
def resolve(
    ctx: typer.Context,
    signature: str = typer.Argument(..., metavar="SIGNATURE"),
    in_image: str = typer.Option(
        None, "--in", help="Fixed in this image: older images' crashes do not regress it."
    ),
    comment: str = typer.Option(None, "--comment", "-m"),
) -> None:
    """Mark a group fixed; a later crash (of the fixed image or a newer one) marks it regressed."""
    _change(ctx, signature, {"state": "resolved", "resolved_in": in_image, "comment": comment})


@app.command()
def ignore(
    ctx: typer.Context,
    signature: str = typer.Argument(..., metavar="SIGNATURE"),
    until: str = typer.Option(
        None, "--until", help="Until this time: 2026-12-24, epoch seconds, or 7d from now."
    ),
    crashes: int = typer.Option(None, "--crashes", min=1, help="Until this many more crashes."),
    comment: str = typer.Option(None, "--comment", "-m"),
) -> None:
    """Hide a group from the default list, for good, until a time, or until N more crashes."""
    when = None
    if until is not None:
        ahead = until.strip()
        if ahead[:-1].isdigit() and ahead[-1:] in "smhdw":  # a duration counts forward here
            when = 2 * int(time.time()) - (parse_time(ahead, "--until") or 0)
        else:
            when = parse_time(until, "--until")
    _change(ctx, signature, {"state": "ignored", "until": when, "crashes": crashes, "comment": comment})


@app.command()
def reopen(
    ctx: typer.Context,
    signature: str = typer.Argument(..., metavar="SIGNATURE"),
    comment: str = typer.Option(None, "--comment", "-m"),
) -> None:
    """Mark a group open again."""
    _change(ctx, signature, {"state": "open", "comment": comment})
