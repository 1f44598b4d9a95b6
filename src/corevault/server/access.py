"""Who may see which crashes: the server's access control.

A core holds its process's whole memory, secrets included, so every list, page and
download is filtered by namespace, and a reader never learns that another namespace's crash
exists, not even through a count. Three ways to decide:

- :class:`Open`: everyone sees everything. Only for a server bound to the loopback
  address (the demo); :func:`check_open` refuses it anywhere else.
- :class:`StaticTokens`: bearer tokens from a TOML file, for plain hosts::

      [[token]]
      name = "alice"
      sha256 = "9f86d0…"          # of the token; or token = "…" in the clear
      namespaces = ["shop"]       # or ["*"]: every namespace and the hosts' own crashes
      delete = false              # may remove crashes
      update = false              # may resolve, ignore and reopen crash groups

  The file is read again when it changes; tokens are compared by their SHA-256 in
  constant time.
- :class:`KubeAccess`: the caller's own Kubernetes token, checked with a TokenReview;
  each namespace with a SubjectAccessReview of ``get pods`` (``delete pods`` to remove a
  crash, ``update pods`` to change a crash group's state) for that user and groups. Anyone allowed cluster-wide sees every namespace and the
  hosts' crashes. Answers are cached for ``ttl`` seconds per token, namespace and verb.

A :class:`Principal` is the answer for one request: ``visible`` is the set of namespaces it
may see, or None for all of them.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from corevault.errors import UserError

ALL = "*"

#: the cookie the login page sets: it carries a bearer token, for page reads only
COOKIE = "corevault_token"

RACY_NS = 2_000_000_000
MAX_FILE = (
    4 << 20
)  # bytes of a token file read at most  # a token file changed this recently is read again at the next request


class Denied(Exception):
    """The request carries no usable credentials (HTTP 401)."""


class AccessError(UserError):
    """An access configuration that cannot be used; the message says which and how."""


class Principal:
    """One request's reader: who it is and, asked lazily, which namespaces it may see or clean up.

    ``scope(verb)`` gives the namespaces where ``verb`` ("get" or "delete") is allowed, or
    None for all of them and the hosts' crashes; ``allows(verb, namespace)`` answers for
    one namespace without listing the others. Both are asked at most once per request.
    ``may_exec(namespace, pod)``: whether it may exec into that pod, which a snapshot of the
    pod's processes needs.
    """

    __slots__ = ("_allows", "_execs", "_memo", "_scope", "name")

    def __init__(
        self,
        name: str,
        scope: Callable[[str], frozenset[str] | None],
        allows: Callable[[str, str], bool] | None = None,
        execs: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.name = name
        self._scope = scope
        self._allows = allows
        self._execs = execs
        self._memo: dict[tuple[str, str | None], object] = {}

    @classmethod
    def fixed(
        cls,
        name: str,
        visible: frozenset[str] | None,
        deletable: frozenset[str] | None,
        updatable: frozenset[str] | None = frozenset(),
        execable: frozenset[str] | None = frozenset(),
    ) -> Principal:
        scopes = {"get": visible, "delete": deletable, "update": updatable}
        return cls(
            name,
            lambda verb: scopes.get(verb, frozenset()),
            execs=lambda namespace, _pod: execable is None or namespace in execable,
        )

    def may_exec(self, namespace: str, pod: str) -> bool:
        return self._execs is not None and self._execs(namespace, pod)

    def scope(self, verb: str = "get") -> frozenset[str] | None:
        if (verb, None) not in self._memo:
            self._memo[(verb, None)] = self._scope(verb)
        return self._memo[(verb, None)]  # type: ignore[return-value]

    @property
    def visible(self) -> frozenset[str] | None:
        return self.scope("get")

    def allowed(self, verb: str, namespace: str | None) -> bool:
        if (verb, None) in self._memo or self._allows is None or namespace is None:
            scope = self.scope(verb)
            return scope is None or (namespace is not None and namespace in scope)
        if (verb, namespace) not in self._memo:
            self._memo[(verb, namespace)] = self._allows(verb, "") or self._allows(verb, namespace)
        return bool(self._memo[(verb, namespace)])

    def sees(self, namespace: str | None) -> bool:
        return self.allowed("get", namespace)


class Access(abc.ABC):
    """Turns a request's bearer token into a :class:`Principal` or raises :class:`Denied`."""

    #: whether requests without a token are let in (the loopback demo only)
    open = False
    #: whether :meth:`principal` answers from this host alone, never waiting on another
    local = False

    @abc.abstractmethod
    def principal(self, token: str | None, namespaces: Callable[[], Iterable[str]]) -> Principal:
        """``namespaces`` lists the namespaces that have crashes, for readers scoped per namespace."""

    def close(self) -> None:  # noqa: B027 - most checks hold nothing open: nothing to do
        """Let go of what checking readers holds open (the server's shutdown calls it)."""


class Open(Access):
    open = True
    local = True

    def principal(self, token: str | None, namespaces: Callable[[], Iterable[str]]) -> Principal:
        return Principal.fixed("anyone", None, None, None, None)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_open(host: str) -> None:
    if host not in LOOPBACK:
        raise AccessError(
            f"--no-auth would show every crash (whole process memory) to anyone who reaches {host}; "
            "it is allowed on 127.0.0.1 only: use --tokens FILE or --kubernetes"
        )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Token:
    name: str
    sha256: str
    namespaces: frozenset[str] | None
    delete: bool
    update: bool
    exec: bool


def _flag(entry: dict, key: str, where: str) -> bool:
    """A token's permission: true or false only (``bool("false")`` would grant it)."""
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise AccessError(f"{where}: {key} = {value!r} is not true or false; write {key} = false")
    return value


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's content may have: its identity, size and times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class StaticTokens(Access):
    local = True  # a stat of the token file per request, read again when it changed

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._tokens: list[_Token] = []
        self._load()

    def _load(self) -> None:
        # A stat per request; only a changed file is opened, and then its stamp, mode and text
        # are all taken from that one open (fstat), even when it is replaced meanwhile.
        try:
            if _stamp(os.stat(self.path)) == self._stamp:
                return
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise AccessError(
                f"token file {self.path}: {e.strerror}; create it (see docs/server.md)"
            ) from None
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            stamp = _stamp(st)
            if st.st_mode & 0o077:
                raise AccessError(f"token file {self.path} is readable by others; chmod 600 {self.path}")
            text = f.read(MAX_FILE + 1)
        try:
            if len(text) > MAX_FILE:
                raise ValueError(f"larger than {MAX_FILE} bytes")
            doc = tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError is a ValueError
            raise AccessError(f"token file {self.path} is not valid TOML: {e}") from None
        if not doc.get("token"):
            # An empty file is what a file being written in place looks like between its
            # truncation and its first write: said, not taken as "nobody".
            raise AccessError(f"token file {self.path} has no [[token]]; add one (see docs/server.md)")
        tokens = []
        for n, t in enumerate(doc.get("token", []), start=1):
            where = f"token file {self.path}, token {n}"
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise AccessError(f"{where}: needs a name")
            if not isinstance(t.get("namespaces"), list) or not all(
                isinstance(x, str) for x in t["namespaces"]
            ):
                raise AccessError(f'{where}: needs namespaces = ["ns", …] or ["*"]')
            if isinstance(t.get("sha256"), str) and len(t["sha256"]) == 64:
                digest = t["sha256"].lower()
            elif isinstance(t.get("token"), str) and len(t["token"]) >= 16:
                digest = _digest(t["token"])
            else:
                raise AccessError(
                    f"{where}: needs sha256 = the token's SHA-256, or a token of 16 characters or more"
                )
            ns = None if ALL in t["namespaces"] else frozenset(t["namespaces"])
            tokens.append(
                _Token(
                    t["name"],
                    digest,
                    ns,
                    _flag(t, "delete", where),
                    _flag(t, "update", where),
                    _flag(t, "exec", where),
                )
            )
        # A file changed within the last RACY_NS may change again within the same timestamp tick
        # (the kernel's clock for file times is coarse): it is read again at the next request
        # until it is older, so a revocation written right after another change still counts.
        racy = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS
        self._tokens, self._stamp = tokens, None if racy else stamp

    def principal(self, token: str | None, namespaces: Callable[[], Iterable[str]]) -> Principal:
        if not token:
            raise Denied("send Authorization: Bearer TOKEN")
        with self._lock:
            self._load()
            tokens = self._tokens
        digest = _digest(token)
        match = None
        for t in tokens:  # every entry is compared, so the time taken does not tell which matched
            if hmac.compare_digest(t.sha256, digest):
                match = t
        if match is None:
            raise Denied("unknown token")
        return Principal.fixed(
            match.name,
            match.namespaces,
            match.namespaces if match.delete else frozenset(),
            match.namespaces if match.update else frozenset(),
            match.namespaces if match.exec else frozenset(),
        )


class KubeAccess(Access):
    """TokenReview and SubjectAccessReview against the cluster's API server."""

    def __init__(self, api_client: object, ttl: float = 60.0, resource: str = "pods") -> None:
        from kubernetes import client

        self.auth = client.AuthenticationV1Api(api_client)
        self.authz = client.AuthorizationV1Api(api_client)
        self.ttl = ttl
        self.resource = resource
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connections to the API server (the client's own close leaves its pool open)."""
        api = self.auth.api_client
        api.close()
        api.rest_client.pool_manager.clear()

    def _cached(self, key: tuple, compute: Callable[[], object]) -> object:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[key] = (now, value)
        return value

    def _user(self, token: str) -> tuple[str, tuple[str, ...], str]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        try:
            status = self.auth.create_token_review(review).status
        except ApiException as e:
            raise AccessError(
                f"TokenReview failed ({e.status} {e.reason}); the server needs system:auth-delegator"
            ) from None
        if not status or not status.authenticated or not status.user:
            raise Denied("the cluster does not accept this token")
        return status.user.username, tuple(status.user.groups or ()), status.user.uid or ""

    def _allowed(
        self, user: tuple[str, tuple[str, ...], str], namespace: str, verb: str, pod: str | None = None
    ) -> bool:
        """A SubjectAccessReview of ``verb`` on pods in ``namespace``; with ``pod``, of exec into it."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        attributes = client.V1ResourceAttributes(
            namespace=namespace or None, verb=verb, resource=self.resource
        )
        if pod is not None:
            attributes.subresource, attributes.name = "exec", pod
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user[0], groups=list(user[1]), uid=user[2] or None, resource_attributes=attributes
            )
        )
        try:
            return bool(self.authz.create_subject_access_review(review).status.allowed)
        except ApiException as e:
            raise AccessError(f"SubjectAccessReview failed ({e.status} {e.reason})") from None

    def principal(self, token: str | None, namespaces: Callable[[], Iterable[str]]) -> Principal:
        if not token:
            raise Denied("send Authorization: Bearer TOKEN (a Kubernetes token, e.g. kubectl create token)")
        key = _digest(token)
        user = self._cached(("user", key), lambda: self._user(token))
        assert isinstance(user, tuple)

        def allows(verb: str, ns: str) -> bool:
            return bool(self._cached((verb, key, ns), lambda: self._allowed(user, ns, verb)))

        def scope(verb: str) -> frozenset[str] | None:
            if allows(verb, ""):
                return None
            names = list(namespaces())
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:  # reviews in parallel
                return frozenset(
                    ns
                    for ns, ok in zip(names, pool.map(lambda ns: allows(verb, ns), names), strict=True)
                    if ok
                )

        def execs(ns: str, pod: str) -> bool:
            return bool(self._cached(("exec", key, ns, pod), lambda: self._allowed(user, ns, "create", pod)))

        return Principal(user[0], scope, allows, execs)
