"""The crash record's OpenAPI schema, built from :mod:`corevault.crashrecord`'s classes.

Those classes are TypedDicts to a type checker but plain dicts with string annotations at
run time (the capture handler cannot afford ``typing``). Here their annotations are
evaluated into ``typing_extensions`` TypedDicts, which pydantic takes on every Python
(on 3.11 it refuses ``typing.TypedDict``), so FastAPI validates the API's answers against
the very definition the handler writes and documents each field. Fields a newer handler
adds are passed through (``extra: allow``).
"""

from __future__ import annotations

import typing

import typing_extensions
from pydantic import ConfigDict

from corevault import crashrecord


def _build() -> dict[str, type]:
    built: dict[str, type] = {}
    names: dict[str, object] = {"NotRequired": typing_extensions.NotRequired, "Any": typing.Any}
    for name, cls in crashrecord.RECORDS.items():  # parts come before the records that hold them
        hints = typing.get_type_hints(cls, globalns=names, localns=built, include_extras=True)
        td = typing_extensions.TypedDict(name, hints)  # type: ignore[operator]
        td.__doc__ = cls.__doc__
        td.__pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[attr-defined]
        built[name] = td
    return built


_TYPES = _build()
CrashRecord = _TYPES["CrashRecord"]
