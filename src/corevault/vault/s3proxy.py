"""The HTTP proxy an S3 store's requests go through: decided once, handed to both clients.

Many clusters reach their object store only through an egress proxy, named in the agent's
environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``). The store's two clients, botocore
and obstore (:mod:`corevault.vault.s3put`), each read those variables by rules of their own,
and left alone they disagree (tried against tinyproxy in front of SeaweedFS, the store's
endpoint ``http://127.0.0.1:PORT``; tests/test_s3proxy.py):

==============================  ======================  ======================
the environment                 botocore (urllib's)     obstore (reqwest's)
==============================  ======================  ======================
``NO_PROXY=*``                  direct                  through the proxy
``NO_PROXY=127.0.0.1:PORT``     direct                  through the proxy
``NO_PROXY=.0.0.1``             direct                  through the proxy
``NO_PROXY=127.0.0.0/8``        through the proxy       direct
``ALL_PROXY`` alone             direct                  through the proxy
``HTTP_PROXY`` and              ``http_proxy``'s        ``HTTP_PROXY``'s
``http_proxy`` both set
==============================  ======================  ======================

So half of a shipping run could go around a proxy that the other half goes through. Here the
store decides once, and gives both clients the answer explicitly (botocore's ``proxies``;
obstore's ``proxy_url``), so that neither reads the variables itself:

- ``[vault.s3] proxy`` when set: its URL, or ``"none"`` for no proxy whatever the environment
  says (the store's proxy beside its endpoint, leaving the agent's other clients, such as the
  upstream debuginfod fetches, to the environment);
- else the environment, read by the standard library's rules, which botocore and most Python
  tools share (lower-case names before upper-case ones; the variable of the endpoint's scheme;
  ``NO_PROXY`` names hosts, ``host:port``, domain suffixes, or ``*``), and address ranges
  (``10.0.0.0/8``) as well, which Kubernetes nodes' ``NO_PROXY`` lists commonly hold and which
  urllib does not know. ``NO_PROXY`` is matched against the endpoint's host, as botocore
  matches it (a bucket's virtual-hosted address is a subdomain of it).

A request the proxy refuses (an answer that is not the store's, 403 or 407) or cannot carry (the
proxy away, its tunnel refused) is a one-line error that names the proxy (without its
credentials) and says what to do.

The other stores take the same decision for their endpoints (the environment's, as they have no
``proxy`` setting), and so does the server's check of the store's address downloads are
redirected to (:mod:`corevault.server.redirects`, with ``[vault.s3] proxy``): left to
themselves, requests (GCS, Azure) and httpx (the check) honour ``ALL_PROXY``, which urllib and
botocore do not, and httpx takes ``NO_PROXY=127.0.0.0/8`` for a host name, not a range. They are
given the decided proxy, or none, and told not to read the variables (:func:`requests_options`;
httpx's ``trust_env=False``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.request
from typing import Any
from urllib.parse import urlparse

#: the ``[vault.s3] proxy`` value for no proxy, whatever the environment says
NONE = "none"
#: headers of an S3 service's answers, never of a proxy's own (a HEAD's answer has no body, so
#: botocore makes its error code the HTTP status: these tell the store's 403 from the proxy's)
STORE_ANSWERED = frozenset({"x-amz-request-id", "x-oss-request-id"})


def for_endpoint(setting: str | None, endpoint: str) -> str | None:
    """The proxy URL of the requests to ``endpoint``, or None for direct ones."""
    if setting is not None:
        return None if setting == NONE else setting
    proxies = urllib.request.getproxies_environment()
    url = urlparse(endpoint)
    proxy = proxies.get(url.scheme)
    if not proxy or bypassed(url.netloc, proxies.get("no", "")):
        return None
    # urllib takes "host:port" for http://host:port, as botocore does
    return proxy if "://" in proxy else "http://" + proxy


def requests_options(proxy: str | None) -> tuple[dict[str, str], str | bool]:
    """The ``proxies`` and ``verify`` of a requests session that must not read the environment
    (``trust_env = False``): the decided proxy, and the CA bundle that requests would have taken
    from ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (which turning the environment off turns
    off too), else its own."""
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    return proxies, os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def aws_endpoint(region: str) -> str:
    """The endpoint botocore makes the requests of a region's S3 to, when none is configured."""
    return "https://s3.amazonaws.com" if region == "us-east-1" else f"https://s3.{region}.amazonaws.com"


def bypassed(netloc: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names the host (``netloc``: ``host[:port]``): urllib's rules, and
    address ranges."""
    if not no_proxy:
        return False
    if urllib.request.proxy_bypass_environment(netloc, {"no": no_proxy}):
        return True
    host = urlparse("//" + netloc).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            continue  # a host name: urllib's part
    return False


def botocore_config(proxy: str | None, ca_bundle: str) -> dict[str, Any]:
    """botocore's ``proxies`` (an empty one is no proxy, where None would have it read the
    environment again by its own rules), and for an ``https://`` proxy the CA bundle its
    certificate is checked against: the store's, as obstore checks it. Without one, botocore
    (1.44) speaks TLS to the proxy without checking its certificate at all, credentials
    included."""
    if not proxy:
        return {"proxies": {}}
    settings = {"proxy_ca_bundle": ca_bundle} if proxy.startswith("https://") else {}
    return {"proxies": {"http": proxy, "https": proxy}, "proxies_config": settings}


def obstore_options(proxy: str | None, bucket_url: str) -> dict[str, str]:
    """obstore's client options for ``proxy``. Without one, obstore would read the environment by
    reqwest's rules; a proxy of its own turns that off, and it has no option for none: so the
    bucket's host is excluded from a proxy that is then never used (reqwest ignores a ``*``
    among the exclusions)."""
    if proxy:
        return {"proxy_url": proxy}
    host = urlparse(bucket_url).hostname or ""
    return {"proxy_url": bucket_url, "proxy_excludes": host}


def shown(proxy: str) -> str:
    """The proxy's URL without the credentials it may carry."""
    url = urlparse(proxy)
    return f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")


def explain(error: Exception, proxy: str | None, endpoint: str) -> str | None:
    """What went wrong and what to do, in one line, when ``error`` came from ``proxy`` rather than
    from the store; None when no proxy is in the way or the store itself answered."""
    if proxy is None:
        return None
    from botocore.exceptions import ClientError, ProxyConnectionError

    host = urlparse(endpoint).hostname
    where = f"the proxy {shown(proxy)}"
    advice = f"allow {host} on it, or name {host} in NO_PROXY to reach the store directly"
    credentials = (
        f"{where} asks for credentials (HTTP 407): give them in its URL (http://user:password@host:port)"
    )
    if isinstance(error, ClientError):  # a forwarded request's answer
        response: dict[str, Any] = error.response
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 407:
            return credentials
        code = response.get("Error", {}).get("Code") or ""
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if (code and not code.isdigit()) or STORE_ANSWERED & set(headers):
            return None  # the store's own answer, through the proxy
        return _answered(where, host, f"HTTP {status}", status or 0, advice)
    text = " ".join(str(error).split())
    if isinstance(error, ProxyConnectionError):
        cause = " ".join(str(error.kwargs.get("error", error)).split())
        tunnel = re.search(r"Tunnel connection failed: (\d+)([^'\")]*)", cause)
        if tunnel and tunnel[1] == "407":
            return credentials
        if tunnel:
            return f"{where} refused the tunnel to {host} (HTTP {tunnel[1]}{tunnel[2]}): {advice}"
        return f"cannot go through {where} to {host} ({cause}): check that it runs, and {advice}"
    if "<Code>" in text:
        return None  # the store's own answer, through the proxy (obstore's error quotes it)
    if "TunnelUnsuccessful" in text:  # obstore gives no status of a refused CONNECT
        unsaid = "if it asks for credentials, give them in its URL"
        return f"{where} refused the tunnel to {host}: {advice} ({unsaid})"
    # obstore's error without its request's line: what failed, as far as it tells
    cause = text.rpartition(" - ")[2]
    if status := re.search(r"with status (\d{3})", text):
        return _answered(where, host, cause, int(status[1]), advice)
    # obstore sees a forwarded request refused as the proxy closing the connection
    return f"cannot go through {where} to {host} ({cause}): check that it runs, and {advice}"


def _answered(where: str, host: str | None, answer: str, status: int, advice: str) -> str:
    """A proxy's own answer: a refusal (4xx), or the store out of its reach (5xx: its gateway
    errors, which the clients retried first)."""
    if status >= 500:
        todo = "check that the store runs and that the proxy reaches it"
        return f"{where} could not reach {host} ({answer}): {todo}"
    return f"{where} refused the request to {host} ({answer}): {advice}"
