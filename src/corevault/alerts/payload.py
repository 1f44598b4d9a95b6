"""What an alert says: the generic webhook's signed JSON body and the Slack-compatible message.

The webhook body (``version`` 1)::

    {"version": 1, "id": "42", "event": "new", "time": 1796122610,
     "group": {"signature": "…", "title": "SIGSEGV in parse ← main", "signal": "SIGSEGV",
               "state": "open", "url": "https://corevault…/groups/…"},
     "namespace": "shop", "image": "registry/shop/api:1.4", "crash": "…", "crash_url": "…",
     "count": 17, "window_count": null}

``count`` is the group's crashes in that namespace; ``window_count`` (spikes) the crashes in
the spike's window. Headers: ``X-Corevault-Event``, ``X-Corevault-Delivery`` (the id: a
retried delivery keeps it, so a receiver can drop a repeat), ``X-Corevault-Timestamp`` and
``X-Corevault-Signature: sha256=HEX``, the HMAC-SHA256 of ``TIMESTAMP.BODY`` under the
sink's secret (:func:`verify` is how a receiver checks it).

Titles, images and namespaces come from crashed processes: in Slack's mrkdwn ``&``, ``<``
and ``>`` are escaped, so a symbol name cannot become a link or a ``<!channel>`` mention;
every text object is ``verbatim``, so Slack neither turns a URL in a name into a link nor
parses an ``@channel`` in it; links are not unfurled (Slack would fetch a URL a crashed
process named); and each value is cut to :data:`SHOWN` characters, so a long function name
cannot take a text object past Slack's limits (3,000 characters, 2,000 in a field), which
refuses the whole message. Characters that are not printable (right-to-left overrides,
zero-width marks, control characters) are shown as their escapes, as everywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import quote

from corevault.printable import printable

WORDS = {"new": "New crash group", "regressed": "Regressed crash group", "spike": "Crash spike"}
#: characters of a title, namespace or image shown in a Slack message (each ``&`` is five once
#: escaped: 300 of them stay within a field's 2,000 characters and a section's 3,000)
SHOWN = 300


def body(delivery_id: int, event: dict, group: dict, base_url: str) -> dict:
    """The webhook body of one event (``event``: the group_events row plus ``count``)."""
    sig = event["signature"]
    crash = event.get("crash_id")
    return {
        "version": 1,
        "id": str(delivery_id),
        "event": event["kind"],
        "time": int(event["time"]),
        "group": {
            "signature": sig, "title": group.get("title"), "signal": group.get("signal_name"),
            "state": group.get("state", "open"), "url": f"{base_url}/groups/{quote(sig, safe='')}",
        },
        "namespace": event["namespace"] or None,
        "image": event.get("image"),
        "crash": crash,
        "crash_url": f"{base_url}/crashes/{quote(crash, safe='')}" if crash else None,
        "count": event.get("count_in_namespace"),
        "window_count": event.get("count") if event["kind"] == "spike" else None,
    }  # fmt: skip


def sign(secret: bytes, timestamp: int, raw: bytes) -> str:
    return "sha256=" + hmac.new(secret, str(timestamp).encode() + b"." + raw, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, raw: bytes, signature: str) -> bool:
    """What a receiver does with the headers: recompute and compare in constant time."""
    return hmac.compare_digest(sign(secret, int(timestamp), raw), signature)


def webhook(doc: dict, secret: bytes, now: int) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(doc, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Corevault-Event": doc["event"],
        "X-Corevault-Delivery": doc["id"],
        "X-Corevault-Timestamp": str(now),
        "X-Corevault-Signature": sign(secret, now, raw),
    }
    return raw, headers


def _mrkdwn(text: object) -> str:
    text = printable(str(text))  # a right-to-left override or a control character: its escape
    text = text if len(text) <= SHOWN else text[:SHOWN] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(text: str) -> dict:
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def slack(doc: dict) -> tuple[bytes, dict[str, str]]:
    """A Slack incoming-webhook message: title (linked to the group page), namespace, image, count."""
    group = doc["group"]
    title = _mrkdwn(group["title"] or group["signature"])
    head = f"{WORDS[doc['event']]}: <{group['url']}|{title}>"
    facts = [
        f"*Namespace:* {_mrkdwn(doc['namespace'] or 'host processes')}",
        f"*Image:* {_mrkdwn(doc['image'] or '-')}",
        f"*Crashes:* {doc['count'] if doc['count'] is not None else '?'}"
        + (f" ({doc['window_count']} in the spike window)" if doc["window_count"] else ""),
        f"*State:* {group['state']}",
    ]
    message = {
        "text": f"{WORDS[doc['event']]}: {title} in {_mrkdwn(doc['namespace'] or 'host processes')}",
        "blocks": [
            {"type": "section", "text": _text(head)},
            {"type": "section", "fields": [_text(f) for f in facts]},
        ],
        "unfurl_links": False,
        "unfurl_media": False,
    }
    return json.dumps(message).encode(), {"Content-Type": "application/json"}
