"""Secret-looking values kept out of what corevault stores about a crash.

A crash's metadata (its environment and command line) is shown to everyone who may read
the crash, who are not always those who may read the pod's Secrets. So before anything is
written, the values of environment variables whose names look like they hold a secret
(``DB_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``GITHUB_TOKEN``, ``API_KEY``…), the values of
``--password=…``-style arguments, and the password in ``scheme://user:password@host`` URLs
are replaced by ``REDACTED``. The core itself is not touched: it is the process's memory.

No imports: the capture handler runs this once per crash.
"""

from __future__ import annotations

REDACTED = "REDACTED"

#: a name holding one of these (upper-cased) is taken for a secret
SECRET_WORDS = (
    "PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "APIKEY", "API_KEY", "ACCESS_KEY",
    "PRIVATE", "CREDENTIAL", "AUTH", "COOKIE", "SESSION", "SIGNING", "_KEY", "KEY_", "DSN",
)  # fmt: skip


def secret_name(name: str) -> bool:
    upper = name.upper().replace("-", "_")
    # map over a method, not a generator: the handler asks this of every environment variable
    return upper == "KEY" or any(map(upper.__contains__, SECRET_WORDS))


def _url(value: str) -> str:
    """``scheme://user:password@host…`` with the password replaced."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return value
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{REDACTED}@{host}{slash}{path}"


def environ(env: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if secret_name(k) else _url(v) for k, v in env.items()}


def cmdline(args: list[str]) -> list[str]:
    """``--password=x`` and ``--token x`` hide their values; URLs lose their passwords."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if arg.startswith("-") and secret_name(name.lstrip("-")):
            if eq:
                out.append(f"{name}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(_url(arg))
    return out


def meta(doc: dict) -> dict:
    """A crash's metadata with its process's environment and command line redacted."""
    proc = doc.get("process")
    if not isinstance(proc, dict):
        return doc
    proc = dict(proc)
    if isinstance(proc.get("environ"), dict):
        proc["environ"] = environ(proc["environ"])
    if isinstance(proc.get("cmdline"), list):
        proc["cmdline"] = cmdline(proc["cmdline"])
    return {**doc, "process": proc}
