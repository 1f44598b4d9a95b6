"""Text that came from a crashed process, made safe to show: data, never control sequences.

A crashed process controls its executable's path, its comm, argv and environment, and the
symbol names in its binaries. Printed as they are, an ESC starts a terminal control
sequence (colours, cursor moves, window titles, hyperlinks), a carriage return or a
backspace overwrites what was printed before it, and a right-to-left override turns the
rest of a line around. So every character that is not printable (``str.isprintable``:
control characters C0 and C1, format characters such as bidirectional overrides and
zero-width marks, line and paragraph separators, unassigned code points) is shown as its
escape (``\\x1b``, ``\\u202e``), the way Python's ``repr`` shows it. Ordinary text, including
non-ASCII letters, is left alone.

Markup is the other half: Rich parses ``[red]`` in strings, so the command line prints
untrusted strings with markup and emoji codes turned off (see :mod:`corevault.cli.crashes`).

No imports: this runs in the agent's log formatter and in Events as well as in the CLI.
"""

from __future__ import annotations

import logging


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character replaced by its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def valid_text(value: object) -> object:
    """``value`` (text, or lists and dicts of it) with each unpaired surrogate as U+FFFD.

    A surrogate is how Python carries a byte that was not UTF-8 (``surrogateescape``) or a
    ``\\udcff`` that a JSON document spelled out: no database, terminal or UTF-8 encoder takes
    it as text. Entries written by older handlers may hold them.
    """
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            # UTF-16 joins the pairs a JSON escape may have left apart and replaces the rest one by one
            return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return value
    if isinstance(value, dict):
        return {valid_text(k): valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [valid_text(v) for v in value]
    return value


def lines(text: str) -> str:
    """Each line of ``text`` made printable; the line breaks themselves are kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


class Formatter(logging.Formatter):
    """A log formatter that escapes control characters in the message (not in tracebacks).

    A log line is one line: a newline in a crashed process's name would otherwise forge a
    second, made-up log record.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)
