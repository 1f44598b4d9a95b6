"""core(5) patterns: validate and expand them exactly as the kernel does.

A pod opts in with a core_pattern-style path (``/data/dump-a/core-%E-%p-%t``). corevault
writes the core under the name the kernel itself would give that pattern in file mode, so
the rules here follow ``format_corename()`` in ``fs/coredump.c``:

- ``%%`` is a percent sign; ``%p %P %i %I %u %g %d %s %t %h %e %E %f %c %C`` print the
  crash's values; ``%F`` (a pidfd) only means something in pipe mode and vanishes in a file
  name; any other ``%X`` vanishes, and so does a trailing ``%``.
- ``%h %e %E %f`` go through ``cn_esc_printf()``: every ``/`` becomes ``!``, a value that is
  exactly ``.`` or ``..`` gets its first character replaced by ``!``, and an empty value
  prints ``!``, so no specifier can add a path component, an empty one or a ``..``.
- With ``core_uses_pid`` set and no ``%p`` in the pattern, ``.PID`` is appended.

The escaping is idempotent, so values that arrive already escaped (the pipe handler's
arguments) and raw values (read from /proc) expand to the same name.

Validation is stricter than the kernel: a pod may only name an absolute path below ``/``
with no ``..`` component, no pipe or socket, nothing the kernel would drop silently.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Mapping

#: Longest core_pattern the kernel accepts (CORENAME_MAX_SIZE is 128 with the NUL).
MAX_PATTERN_LEN = 127

#: Every specifier the kernel expands, in the order corevault passes them to its pipe handler.
SPECIFIERS = "PpiIstdugcChefEF"

#: Specifiers whose values go through the kernel's escaping (cn_esc_printf).
ESCAPED = frozenset("heEf")

_DESCRIPTIONS = {
    "%": "a literal %",
    "p": "PID in the process's namespace",
    "P": "PID in the initial namespace",
    "i": "TID in the process's namespace",
    "I": "TID in the initial namespace",
    "u": "real UID",
    "g": "real GID",
    "d": "dump mode (0, 1 or 2)",
    "s": "signal number",
    "t": "time of the dump, seconds since the epoch",
    "h": "UTS hostname",
    "e": "process name (comm, at most 15 bytes)",
    "E": "executable path, / written as !",
    "f": "executable file name",
    "c": "soft RLIMIT_CORE",
    "C": "CPU the crash ran on",
    "F": "pidfd (pipe mode only)",
}


class PatternError(ValueError):
    """A pattern a pod may not use; ``problems`` holds one message per problem."""

    def __init__(self, pattern: str, problems: list[str]) -> None:
        self.pattern = pattern
        self.problems = problems
        super().__init__(f"core pattern {pattern!r}: " + "; ".join(problems))


def escape(value: str) -> str:
    """Escape one specifier's value the way ``cn_esc_printf()`` does."""
    if value == "":
        return "!"
    if value in (".", ".."):
        value = "!" + value[1:]
    return value.replace("/", "!")


def expand(
    pattern: str,
    values: Mapping[str, str],
    *,
    pipe: bool = False,
    core_uses_pid: bool = False,
) -> str:
    """Return the name the kernel gives ``pattern`` for a crash with these values.

    ``values`` maps a specifier letter to its formatted value; a letter without a value
    expands to nothing. ``pipe`` keeps ``%F`` (it vanishes in file mode).
    """
    out: list[str] = []
    pid_in_pattern = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch != "%":
            out.append(ch)
            continue
        if i == n:
            break  # a trailing % vanishes
        spec = pattern[i]
        i += 1
        if spec == "%":
            out.append("%")
        elif spec in SPECIFIERS:
            if spec == "p":
                pid_in_pattern = True
            if spec == "F" and not pipe:
                continue
            value = values.get(spec, "")
            out.append(escape(value) if spec in ESCAPED else value)
        # any other specifier vanishes
    if core_uses_pid and not pid_in_pattern and not pipe:
        out.append("." + values.get("p", ""))
    return "".join(out)


def problems(pattern: str) -> list[str]:
    """Everything that keeps ``pattern`` from being a pod's core pattern (empty when none)."""
    found: list[str] = []
    if pattern == "":
        return ["is empty; give an absolute path such as /data/dump-a/core-%E-%p-%t"]
    if pattern[0] in "|@":
        found.append(f"starts with {pattern[0]!r}: a pod may only name a file path, not a pipe or socket")
    elif not pattern.startswith("/"):
        found.append("is not an absolute path; start it with / (for example /data/dump-a/core-%p)")
    if len(pattern.encode()) > MAX_PATTERN_LEN:
        found.append(f"is {len(pattern.encode())} bytes long; the kernel allows at most {MAX_PATTERN_LEN}")
    if any(ord(c) < 32 or c == "\x7f" for c in pattern):
        found.append("contains a control character")
    components = pattern.split("/")
    if ".." in components:
        found.append("has a '..' component; name a path without going up")
    if pattern.startswith("/") and len([c for c in components if c]) < 2:
        found.append("puts the core directly in /; name a directory such as /data/dump-a/")
    elif pattern.endswith("/"):
        found.append("ends with '/'; add a file name such as core-%e-%p-%t")
    i = 0
    while i < len(pattern):
        if pattern[i] == "%":
            if i + 1 == len(pattern):
                found.append("ends with a lone '%'; write '%%' for a percent sign")
                break
            spec = pattern[i + 1]
            if spec != "%" and spec not in SPECIFIERS:
                found.append(f"uses %{spec}, which the kernel does not know (known: {known_specifiers()})")
            i += 2
        else:
            i += 1
    return found


def check(pattern: str) -> str:
    """Return ``pattern`` if a pod may use it, else raise :class:`PatternError`."""
    found = problems(pattern)
    if found:
        raise PatternError(pattern, found)
    return pattern


def directory(pattern: str) -> str:
    """The directory a valid pattern writes into, up to its first component with a specifier.

    This is where a volume has to be mounted for the pattern's cores to land on it.
    """
    parts = pattern.split("/")[:-1]
    literal: list[str] = []
    for part in parts:
        if "%" in part:
            break
        literal.append(part)
    return "/".join(literal) or "/"


def known_specifiers() -> str:
    return " ".join("%" + s for s in "%" + SPECIFIERS)


def describe() -> dict[str, str]:
    """What each specifier expands to, for help texts."""
    return {"%" + k: v for k, v in _DESCRIPTIONS.items()}
