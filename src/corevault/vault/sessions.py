"""Upload sessions kept beside the file they upload, so that the next attempt takes them up.

A store that can resume an upload (an S3 multipart upload id, a GCS resumable session URL)
writes what it needs into a small JSON file next to the spool file as soon as the service
gives it, and removes it once the object is complete. The file lives and dies with its
spool entry. One is taken up only when it names the same store, key and size, is younger
than the store keeps unfinished uploads, and holds values an upload of this file can have
(the store's own check: a part size above 0, a held count within the file); anything else
(unreadable, another file's, too old, corrupt) is dropped and the upload starts anew at once,
rather than failing every attempt until the unfinished upload is cleared as abandoned.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import suppress

from corevault import atomic


def load(
    path: str, max_age: float | None = None, valid: Callable[[dict], bool] | None = None, **expect: object
) -> dict | None:
    """The session kept at ``path`` if it matches ``expect``, is younger than ``max_age`` seconds
    and passes ``valid``; otherwise None, and the file is gone."""
    try:
        with open(path) as f:
            kept = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        drop(path)
        return None
    if not isinstance(kept, dict) or any(kept.get(k) != v for k, v in expect.items()):
        drop(path)
        return None
    started = kept.get("started")
    if max_age is not None and (not isinstance(started, int | float) or time.time() - started > max_age):
        drop(path)  # the service has let it go by now
        return None
    if valid is not None and not valid(kept):
        drop(path)  # not what this code writes (a torn disk block, a hand edit): start anew
        return None
    return kept


def keep(path: str, session: dict) -> None:
    """Write ``session`` to ``path`` whole (a temporary name, then renamed), with its start time."""
    session.setdefault("started", time.time())
    atomic.write(path, json.dumps(session), 0o600)  # an upload id or session URL is a credential


def drop(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
