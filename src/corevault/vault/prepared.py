"""Selects run on one database connection of their own, each compiled once.

A download looks up one row before its bytes go out, and on a local catalog (SQLite) that
lookup is a few microseconds of SQLite inside tens of SQLAlchemy's: the pool's checkout and
reset, the statement's cache key, the expansion of an ``IN`` list, the parameters' and the
rows' processing (``docs/server.md``: 59 µs against 7 µs for the same lookup). :class:`Prepared`
takes the statement as SQLAlchemy builds it (the one definition of the query), compiles it once,
expands it for each call's parameters with SQLAlchemy's own ``construct_expanded_state`` (an
``IN`` list's length picks the text, bind processors convert the values) and runs that text on
a DBAPI connection that it keeps: the sqlite3 module keeps each text's prepared statement with
the connection, so a lookup is a bind, a step and the rows. The rows are converted by the
columns' own result processors, so they read as SQLAlchemy's would (a Boolean is a bool).

One :class:`Prepared` serves one thread at a time (the server's event loop). A read holds no
transaction: with the sqlite3 module's default transaction handling a ``SELECT`` starts none,
and the rows are all fetched, which ends the statement and lets go of its snapshot, so the next
lookup sees what writers committed meanwhile (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.sql.compiler import SQLCompiler


class Prepared:
    """``rows(query, params)`` as ``[dict(row._mapping) for row in conn.execute(query, params)]``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Any = None
        #: query → its compiled form, the names of its columns and their result processors
        self._compiled: dict[sa.Select, tuple[SQLCompiler, list[str], list[Callable | None]]] = {}

    def rows(self, query: sa.Select, params: Mapping[str, Any]) -> list[dict]:
        compiled, names, processors = self._compiled.get(query) or self._compile(query)
        # the text for these parameters (an IN list's length picks it) and their values in its order
        state = compiled.construct_expanded_state(dict(params))
        values = state.positional_parameters if compiled.positional else state.parameters
        if self._conn is None:
            # kept out of the pool: the engine's own setup of a new connection (pragmas) ran on it
            self._conn = self.engine.raw_connection()
        cursor = self._conn.driver_connection.cursor()
        try:
            cursor.execute(state.statement, values)
            found = cursor.fetchall()
        finally:
            cursor.close()
        return [
            {n: (p(v) if p is not None else v) for n, p, v in zip(names, processors, row, strict=True)}
            for row in found
        ]

    def _compile(self, query: sa.Select) -> tuple[SQLCompiler, list[str], list[Callable | None]]:
        dialect = self.engine.dialect
        columns = list(query.selected_columns)
        entry = (
            query.compile(dialect=dialect),
            [c.key for c in columns],
            [c.type.result_processor(dialect, None) for c in columns],
        )
        self._compiled[query] = entry  # a module's statements, built once each: a handful
        return entry

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
