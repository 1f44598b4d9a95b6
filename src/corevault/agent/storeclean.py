"""Evicting binaries from the node's store once nothing on the node needs them.

The capture handler keeps every object a crashed process mapped (:mod:`corevault.nodestore`)
so that analysis and shipping can use it after the pod and its image are gone. Once a
crash is shipped and analysed, the vault holds its objects and its spool entry is removed:
a stored file is needed only while some spool entry (being written, waiting to be shipped,
or shipped and waiting for its analysis, or set aside in quarantine) names it.
Everything else is removed, after a grace period that covers a handler which found a file
already stored but has not finished its spool entry yet.
"""

from __future__ import annotations

import json
import os
import time

from corevault import config, nodestore, spool

GRACE_AFTER_TIMEOUT = 60.0


def spool_records(spool_dir: str) -> list[dict]:
    """The metadata of every spool entry (being written, waiting, shipped and waiting for its
    analysis) that has some."""
    metas = []
    parents = (spool.tmp_dir(spool_dir), spool.ready_dir(spool_dir), spool.shipped_dir(spool_dir),
               spool.quarantine_dir(spool_dir))  # fmt: skip
    for parent in parents:
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            continue
        for name in names:
            try:
                with open(os.path.join(parent, name, spool.META_NAME), "rb") as f:
                    metas.append(json.loads(f.read()))
            except (OSError, ValueError):
                continue
    return metas


def evict(settings: config.Settings, now: float | None = None) -> list[str]:
    """Remove the stored binaries no spool entry names; returns their paths."""
    keep = nodestore.needed(spool_records(settings.spool_dir))
    grace = settings.timeout + GRACE_AFTER_TIMEOUT
    return nodestore.evict(settings.buildid_dir, keep, grace, time.time() if now is None else now)
