"""Selects run on one database connection of their own, each compiled and expanded once.

A download looks up one row before its bytes go out, and on a local catalog (SQLite) that
lookup is a few microseconds of SQLite inside tens of SQLAlchemy's: the pool's checkout and
reset, the statement's cache key, the expansion of an ``IN`` list, the parameters' and the
rows' processing (``docs/server.md``). :class:`Prepared` takes the statement as SQLAlchemy
builds it (the one definition of the query), compiles it once and has SQLAlchemy expand it
(``construct_expanded_state``) once per shape of parameters (an ``IN`` list's length picks the
text); a call then only places its values, and the text runs on a DBAPI connection that it
keeps: the sqlite3 module keeps each text's prepared statement with the connection, so a lookup
is a bind, a step and the rows. The rows are converted by the columns' own result processors,
so they read as SQLAlchemy's would (a Boolean is a bool). A statement whose values SQLAlchemy
would convert on their way (bind processors) is refused rather than run with them unconverted.

One :class:`Prepared` serves one thread at a time (the server's event loop). A read holds no
transaction: with the sqlite3 module's default transaction handling a ``SELECT`` starts none,
and the rows are all fetched, which ends the statement and lets go of its snapshot, so the next
lookup sees what writers committed meanwhile (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.sql.compiler import SQLCompiler

#: where a value of an expanded text comes from: (parameter, None, None), (list parameter,
#: index, None) or (None, None, the statement's own constant)
Pick = tuple[str | None, int | None, Any]

#: expanded texts kept: one per statement and length of its ``IN`` list (a reader's namespaces)
MAX_TEXTS = 256


class Unprepared(ValueError):
    """A statement that :class:`Prepared` does not run: run it on a connection of the engine."""


class Prepared:
    """``rows(query, params)`` as ``[dict(row._mapping) for row in conn.execute(query, params)]``,
    for statements whose values go to the database as they are (no bind processor: strings and
    numbers, as the downloads' lookups have) on a driver of positional parameters (SQLite's);
    others raise :class:`Unprepared`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Any = None
        #: query → its compiled form, the names of its columns and their result processors
        self._compiled: dict[sa.Select, tuple[SQLCompiler, list[str], list[Callable | None]]] = {}
        #: (query, its parameters' names and lists' lengths) → the expanded text and where each
        #: of its values comes from
        self._texts: dict[tuple, tuple[str, tuple[Pick, ...]]] = {}

    def rows(self, query: sa.Select, params: Mapping[str, Any]) -> list[dict]:
        compiled, names, processors = self._compiled.get(query) or self._compile(query)
        shape = (query, *((k, len(v)) if isinstance(v, list) else k for k, v in params.items()))
        sql, picks = self._texts.get(shape) or self._expand(shape, compiled, params)
        if self._conn is None:
            # kept out of the pool: the engine's own setup of a new connection (pragmas) ran on it
            self._conn = self.engine.raw_connection()
        cursor = self._conn.driver_connection.cursor()
        try:
            cursor.execute(sql, _values(picks, params))
            found = cursor.fetchall()
        finally:
            cursor.close()
        return [
            {n: (p(v) if p is not None else v) for n, p, v in zip(names, processors, row, strict=True)}
            for row in found
        ]

    def _compile(self, query: sa.Select) -> tuple[SQLCompiler, list[str], list[Callable | None]]:
        dialect = self.engine.dialect
        compiled = query.compile(dialect=dialect)
        if not compiled.positional:
            raise Unprepared(f"the {dialect.name} driver's parameters are named, not positional")
        converted = [n for n, b in compiled.binds.items() if b.type.bind_processor(dialect) is not None]
        if converted:
            raise Unprepared(f"parameters {', '.join(converted)} are converted on their way to the database")
        columns = list(query.selected_columns)
        entry = (
            compiled,
            [c.key for c in columns],
            [c.type.result_processor(dialect, None) for c in columns],
        )
        self._compiled[query] = entry  # a module's statements, built once each: a handful
        return entry

    def _expand(
        self, shape: tuple, compiled: SQLCompiler, params: Mapping[str, Any]
    ) -> tuple[str, tuple[Pick, ...]]:
        """The text SQLAlchemy expands for this shape of parameters, and for each of its
        positions where its value comes from: a parameter, an item of a list parameter (the
        position SQLAlchemy names ``visible_2`` is ``visible[1]``) or a constant of the statement
        (a ``LIMIT``); checked against SQLAlchemy's own values for this call."""
        state = compiled.construct_expanded_state(dict(params))
        lists = {k for k, v in params.items() if isinstance(v, list)}
        picks: list[Pick] = []
        for name in state.positiontup or ():
            base, _, n = name.rpartition("_")
            if name in params and name not in lists:
                picks.append((name, None, None))
            elif base in lists and n.isdigit():
                picks.append((base, int(n) - 1, None))
            else:
                picks.append((None, None, state.parameters[name]))
        if _values(picks, params) != tuple(state.positional_parameters):
            raise Unprepared(f"cannot tell where the values of {state.positiontup} come from")
        if len(self._texts) >= MAX_TEXTS:
            self._texts.clear()
        self._texts[shape] = (state.statement, tuple(picks))
        return self._texts[shape]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _values(picks: Iterable[Pick], params: Mapping[str, Any]) -> tuple:
    return tuple(
        value if name is None else params[name] if at is None else params[name][at]
        for name, at, value in picks
    )
