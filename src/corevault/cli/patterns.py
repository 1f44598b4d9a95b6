"""``corevault pattern check | expand``: what the kernel would make of a core pattern."""

from __future__ import annotations

import time

import typer

from corevault import pattern

pattern_app = typer.Typer(help="Check a pod's core pattern and see the name the kernel would give it.")


def register(app: typer.Typer) -> None:
    app.add_typer(pattern_app, name="pattern")


@pattern_app.command(epilog="Example: corevault pattern check '/data/dump-a/core-%E-%p-%t'")
def check(value: str = typer.Argument(..., metavar="PATTERN")) -> None:
    """Validate PATTERN as a pod's core pattern; exit 2 with one message per problem."""
    pattern.check(value)
    print(f"ok: cores go to {pattern.directory(value)}/ (mount the volume there)")


@pattern_app.command(
    epilog="Example: corevault pattern expand '/data/dump-a/core-%E-%p-%t' --exe /usr/sbin/nginx"
)
def expand(
    value: str = typer.Argument(..., metavar="PATTERN"),
    pid: int = typer.Option(1, min=1, help="%p and %i"),
    exe: str = typer.Option("/usr/bin/app", help="%E, %f and (cut to 15 bytes) %e"),
    signal: int = typer.Option(11, min=1, max=64, help="%s"),
    uid: int = typer.Option(0, min=0, help="%u"),
    hostname: str = typer.Option("pod-0", help="%h"),
) -> None:
    """Print the file name the kernel would give PATTERN for a crash with these values."""
    pattern.check(value)
    base = exe.rsplit("/", 1)[-1]
    values = {
        "p": str(pid), "P": str(pid), "i": str(pid), "I": str(pid), "u": str(uid), "g": str(uid),
        "d": "1", "s": str(signal), "t": str(int(time.time())), "h": hostname, "e": base[:15],
        "E": exe, "f": base, "c": str((1 << 64) - 1), "C": "0",
    }  # fmt: skip
    print(pattern.expand(value, values))


@pattern_app.command(epilog="Example: corevault pattern specifiers")
def specifiers() -> None:
    """List the specifiers a core pattern may use."""
    for spec, meaning in pattern.describe().items():
        print(f"{spec}  {meaning}")
