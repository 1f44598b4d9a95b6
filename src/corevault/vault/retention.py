"""Retention: which crashes the vault forgets, and the binaries nobody needs any more.

Rules, each optional, applied oldest first: crashes older than ``max_age_days``; then the
oldest crashes until the vault's cores take at most ``max_size``; then, per namespace, the
oldest of that namespace until it takes at most ``namespace_max_size``. A build-id object
is deleted only when no crash left in the catalog refers to it. Uploads nobody finished are
cleared once old enough (:func:`abandoned`), with or without rules.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from corevault import config
from corevault.vault import blobs, tables
from corevault.vault.crashes import LocalVault


def select(conn: sa.Connection, settings: config.Settings, now: float) -> list[str]:
    """Ids of the crashes the rules remove."""
    c = tables.crashes.c
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


def vacuum(
    vault: LocalVault, settings: config.Settings, now: float | None = None, dry_run: bool = False
) -> dict:
    """Apply the retention rules; returns what was (or would be) removed."""
    now = now or time.time()
    with vault.engine.connect() as conn:
        doomed = select(conn, settings, now)
    if not dry_run:
        for crash_id in doomed:
            vault.remove(crash_id)
    uploads = [] if dry_run else abandoned(vault.store, settings)
    orphans = _orphan_objects(vault)
    if not dry_run:
        o, co = tables.objects.c, tables.crash_objects.c
        for key, sha in orphans:
            with vault.engine.begin() as conn:
                still = conn.execute(
                    sa.select(sa.func.count()).where(co.key == key, co.sha256 == sha)
                ).scalar()
                if still:
                    continue  # a crash shipped meanwhile needs it
                conn.execute(tables.objects.delete().where(o.key == key, o.sha256 == sha))
                others = conn.execute(sa.select(sa.func.count()).where(o.key == key)).scalar()
            vault.store.delete(blobs.object_key(key, sha))
            if sha:
                vault.store.delete(blobs.debuginfo_key(key, sha))  # an upstream debug file for it
            if not others:
                vault.store.delete(blobs.legacy_debuginfo_key(key))  # one kept by build-id alone
    return {
        "crashes": doomed,
        "buildids": [f"{key}/{sha or 'executable'}" for key, sha in orphans],
        "uploads": uploads,
    }


def abandoned(store: blobs.BlobStore, settings: config.Settings) -> list[str]:
    """Clear the uploads begun ``[vault] abandoned_upload_days`` ago and never finished; their keys.

    An agent takes up its own cut-short upload when it retries the entry; one whose entry
    is gone (the node's disk lost, the spool cleared) would keep its parts forever.
    """
    return store.abort_abandoned(settings.vault_abandoned_days * 86400)


def _orphan_objects(vault: LocalVault) -> list[tuple[str, str]]:
    o, co = tables.objects.c, tables.crash_objects.c
    query = sa.select(o.key, o.sha256).where(~sa.exists().where(co.key == o.key, co.sha256 == o.sha256))
    with vault.engine.connect() as conn:
        return [(k, s) for k, s in conn.execute(query)]
