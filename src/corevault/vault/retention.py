"""Retention: which crashes the vault forgets, and the binaries nobody needs any more.

Rules, each optional, applied oldest first: crashes older than ``max_age_days``; then the
oldest crashes until the vault's cores take at most ``max_size``; then, per namespace, the
oldest of that namespace until it takes at most ``namespace_max_size``. A build-id object
is deleted only when no crash left in the catalog refers to it.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from corevault import config
from corevault.vault import blobs, catalog
from corevault.vault.ship import Vault


def select(conn: sa.Connection, settings: config.Settings, now: float) -> list[str]:
    """Ids of the crashes the rules remove."""
    c = catalog.crashes.c
    doomed: list[str] = []
    if settings.retention_max_age_days is not None:
        cutoff = now - settings.retention_max_age_days * 86400
        doomed += conn.execute(sa.select(c.id).where(c.time < cutoff)).scalars().all()
    gone = set(doomed)

    def trim(query: sa.Select, limit: int) -> None:
        rows = [r for r in conn.execute(query.order_by(c.time.desc(), c.id.desc())) if r.id not in gone]
        total = 0
        for r in rows:  # newest first: keep while under the limit
            total += r.stored_size or 0
            if total > limit:
                doomed.append(r.id)
                gone.add(r.id)

    if settings.retention_max_size is not None:
        trim(sa.select(c.id, c.stored_size), settings.retention_max_size)
    if settings.retention_namespace_max_size is not None:
        for (ns,) in conn.execute(sa.select(c.namespace).distinct()):
            trim(
                sa.select(c.id, c.stored_size).where(c.namespace == ns), settings.retention_namespace_max_size
            )
    return doomed


def vacuum(vault: Vault, settings: config.Settings, now: float | None = None, dry_run: bool = False) -> dict:
    """Apply the retention rules; returns what was (or would be) removed."""
    now = now or time.time()
    with vault.engine.connect() as conn:
        doomed = select(conn, settings, now)
    if not dry_run:
        for crash_id in doomed:
            for key in (blobs.core_key(crash_id), blobs.meta_key(crash_id), blobs.report_key(crash_id)):
                vault.store.delete(key)
            with vault.engine.begin() as conn:
                catalog.forget(conn, crash_id)
    orphans = _orphan_buildids(vault)
    if not dry_run:
        for build_id in orphans:
            with vault.engine.begin() as conn:
                still = conn.execute(
                    sa.select(sa.func.count()).where(catalog.crash_buildids.c.build_id == build_id)
                ).scalar()
                if still:
                    continue  # a crash shipped meanwhile needs it
                conn.execute(catalog.buildids.delete().where(catalog.buildids.c.build_id == build_id))
            vault.store.delete(blobs.buildid_key(build_id))
            vault.store.delete(blobs.debuginfo_key(build_id))
    return {"crashes": doomed, "buildids": orphans}


def _orphan_buildids(vault: Vault) -> list[str]:
    b, cb = catalog.buildids.c, catalog.crash_buildids.c
    query = sa.select(b.build_id).where(~sa.exists().where(cb.build_id == b.build_id))
    with vault.engine.connect() as conn:
        return list(conn.execute(query).scalars())
