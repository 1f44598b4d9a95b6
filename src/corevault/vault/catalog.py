"""The catalog: where the vault keeps what it knows of crashes, opened and used through one name.

SQLAlchemy Core over SQLite (WAL; the default for one machine) or PostgreSQL (by URL, when
many nodes' agents share one catalog). The catalog is made of parts, each importing only
those below it:

- ``tables``: the tables and the per-dialect SQL (the bottom);
- ``lifecycle`` (groups' states and events), ``search`` (the crash search index) and
  ``snapshots`` (snapshot requests): their own tables, beside each other; ``prepared``
  (a query's statement run on a connection of its own, for the downloads' lookups);
- ``recording`` (crashes, analyses, objects, dropped dumps) and ``queries`` (lists, one
  crash, groups as a reader sees them), above those;
- ``migrations`` (the schema's versions), above every part whose tables it creates;
- this module at the top: ``connect`` opens a catalog and brings its schema up to date, and
  the functions callers use are re-exported here, so that a caller needs one import; code
  that builds its own statements takes the tables from ``tables``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from corevault.errors import UserError
from corevault.vault.migrations import MIGRATIONS, migrate
from corevault.vault.queries import (
    LIST_COLUMNS,
    SIGNAL_PATTERN,
    Filters,
    analysis_state,
    core_of,
    get_crash,
    group_detail,
    known_objects,
    list_crashes,
    list_dropped,
    list_groups,
    list_namespaces,
    object_for,
    report_of,
    repository,
)
from corevault.vault.recording import (
    add_crash,
    add_crashes,
    add_dropped,
    add_object,
    forget,
    match_sample,
    rebuild_group_counts,
    record_analysis,
    record_analysis_failure,
    shared_key,
)

__all__ = [
    "SIGNAL_PATTERN",
    "LIST_COLUMNS",
    "MIGRATIONS",
    "CatalogError",
    "Filters",
    "add_crash",
    "add_crashes",
    "add_dropped",
    "add_object",
    "analysis_state",
    "connect",
    "core_of",
    "forget",
    "get_crash",
    "group_detail",
    "known_objects",
    "list_crashes",
    "list_dropped",
    "list_groups",
    "list_namespaces",
    "match_sample",
    "migrate",
    "object_for",
    "rebuild_group_counts",
    "record_analysis",
    "record_analysis_failure",
    "report_of",
    "repository",
    "shared_key",
]


class CatalogError(UserError):
    """The catalog cannot be reached or used; the message says which and how."""


def connect(url: str) -> Engine:
    """An engine for ``url`` with the schema brought up to date."""
    if url.startswith("sqlite:///"):
        import os

        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi: object, _record: object) -> None:
            cur = dbapi.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    else:
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
            raise CatalogError(
                f"catalog URL {url!r} is not usable ({e}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            ) from None
    # add_crash and friends read an INSERT's rowcount (new, or there already?); SQLAlchemy 2.1
    # leaves it at -1 on psycopg unless asked, and a PostgreSQL catalog then never learnt a namespace
    engine = engine.execution_options(preserve_rowcount=True)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        why = " ".join(str(e.orig).split())  # libpq's message spans lines, indented with tabs
        raise CatalogError(f"cannot open the catalog at {engine.url!r}: {why}") from None
    return engine
