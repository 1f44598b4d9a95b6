"""A crashed process's symbol names reach chat and the web as text, never as markup.

A pod's program crashes in a function whose ELF symbol is a Slack mention, a link and an
HTML tag. It goes through the real capture handler in a runc container, the agent's
analysis and the catalog; then the alerts (Slack-compatible and webhook, to a local
receiver) and the group page must carry the name as text: no ``<!channel>`` that pings a
channel, no link Slack would render or fetch, no tag a browser would parse.
"""

from __future__ import annotations

import json

import httpx
import pytest

from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from testbed import runc, servers
from tests.conftest import Capture
from tests.tenants import alerts_sent, analysed, crashes_of, pod, slack_sink
from tests.test_triage_alerts import Receiver

pytestmark = pytest.mark.crash
SYMBOL = "crash<!channel><https://evil.example/x|click><img/src=x>"
ADMIN = "admin-token-0123456789"


def test_a_symbol_name_is_text_in_slack_webhooks_and_the_group_page(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    root = runc.build_rootfs(str(tmp_path / "root"), {"mention": programs["mention"]})
    capture.crash(root, ["/app/mention"], annotations=pod("tenant-a", "chatty-0"))
    assert len(capture.entries()) == 1, capture.journal()

    with Receiver(servers.free_port()) as receiver:
        hook = (
            f'[[alerts.sink]]\nname = "hook"\nkind = "webhook"\nurl = "{receiver.url}/hook"\nnamespaces = ["*"]\n'
            f'secret = "a-webhook-secret-0123456789"\n'
        )
        settings = analysed(capture, tmp_path, slack_sink(receiver.url) + hook)
        [crash] = crashes_of(settings).values()
        assert SYMBOL in (crash["title"] or ""), crash  # the analysis named the frame by the symbol
        assert alerts_sent(settings) == 2
    [slack] = receiver.bodies("/slack")
    text = json.dumps(slack)
    assert "<!channel>" not in text and "<https://evil.example" not in text and "<img" not in text
    assert "crash&lt;!channel&gt;&lt;https://evil.example/x|click&gt;" in text
    # Slack links a URL and parses mentions in text that is not verbatim, and fetches the links
    # of a message it unfurls: the name's URL would be a link, and a request to its host
    texts = [
        t for b in slack["blocks"] for t in [*([b["text"]] if "text" in b else []), *b.get("fields", [])]
    ]
    assert texts and all(t["type"] == "mrkdwn" and t["verbatim"] is True for t in texts), slack
    assert slack["unfurl_links"] is False and slack["unfurl_media"] is False
    [hook] = receiver.bodies("/hook")
    assert hook["group"]["title"] == crash["title"]  # JSON carries the name as it is: a string

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{ADMIN}"\nnamespaces = ["*"]\n')
    tokens.chmod(0o600)
    with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as url:
        page = httpx.get(f"{url}/groups/{crash['signature']}", headers={"Authorization": f"Bearer {ADMIN}"})
        listing = httpx.get(f"{url}/?q=channel", headers={"Authorization": f"Bearer {ADMIN}"})
    for html in (page.text, listing.text):
        assert "<img/src=x>" not in html and "<!channel>" not in html
        assert "crash&lt;!channel&gt;&lt;https://evil.example/x|click&gt;&lt;img/src=x&gt;" in html
