"""An in-process Kubernetes API server over HTTP, for what corevault's kubectl side uses.

It behaves like the real one where corevault depends on it:
- GET and PATCH of pods, deployments, statefulsets and daemonsets, as JSON;
- the ``pods/{name}/ephemeralcontainers`` subresource with all three PATCH content types
  (strategic merge merges ephemeral containers by name, JSON merge replaces the list, JSON
  patch applies its operations), refusing a rename or removal as the real server does;
- ephemeral container status: ``waiting`` when added, ``running`` a moment later;
- strategic merge for pod templates: annotations merged, volumes and containers by name,
  volume mounts by mount path;
- PersistentVolumes and claims: created (refused with 422 Invalid where the real server's
  validation refuses their names, labels or label selector), read, and listed by a label selector
  of equalities;
- ``403 Forbidden`` Status objects for the requests a test forbids; 404 for what is missing;
- listing pods across namespaces with a ``spec.nodeName`` field selector, and watching them
  from a resourceVersion (events streamed as JSON lines; a version older than the server
  keeps gives the ERROR event with 410 Gone); creating Events;
- TokenReview (``authentication.k8s.io/v1``) from a table of tokens and their users, and
  SubjectAccessReview (``authorization.k8s.io/v1``) from explicit grants of a verb on a
  resource or subresource (``pods/exec``) in a namespace, or on one object of it (``ns/name``;
  ``*``: cluster-wide), for a user or one of its groups.

It does not emulate: authentication of its own callers, RBAC objects (Roles, bindings,
aggregation), watches of anything but pods, admission, exec/attach/port-forward streams
(``kubectl exec`` cannot connect to it), discovery beyond what kubectl's plugin dispatch
needs (none), or server-side validation of container specs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    content_type: str | None
    body: object


@dataclass
class FakeKube:
    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # (resource, ns, name)
    requests: list[Request] = field(default_factory=list)
    forbidden: set[tuple[str, str]] = field(default_factory=set)  # (method, path regex)
    running_after: int = 1  # GETs of the pod before an added ephemeral container runs
    ephemeral_supported: bool = True  # False: a cluster older than Kubernetes 1.23
    version: int = 100
    history: list[tuple[int, str, dict]] = field(default_factory=list)  # (rv, type, pod)
    compacted: int = 0  # watches from versions before this get 410 Gone
    events: list[dict] = field(default_factory=list)
    users: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # token -> (user, groups)
    grants: set[tuple[str, str, str, str]] = field(
        default_factory=set
    )  # (user or group, verb, resource[/subresource], ns|ns/name|*)
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, resource: str, obj: dict, kind: str = "ADDED", missed: bool = False) -> dict:
        """Store an object; ``missed``: a change that running watches never see (they must list)."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", os.urandom(16).hex())
        with self.changed:
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            self.objects[(resource, meta["namespace"], meta["name"])] = obj
            if resource == "pods" and not missed:
                self.history.append((self.version, kind, copy.deepcopy(obj)))
            self.changed.notify_all()
        return obj

    def update(self, resource: str, obj: dict) -> dict:
        return self.add(resource, obj, "MODIFIED")

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.changed:
            obj = self.objects.pop((resource, namespace, name))
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            if resource == "pods":
                self.history.append((self.version, "DELETED", copy.deepcopy(obj)))
            self.changed.notify_all()

    def compact(self) -> None:
        """Forget the change history, as etcd compaction does: older watches get 410 Gone."""
        with self.changed:
            self.compacted = self.version
            self.history.clear()

    def get(self, resource: str, namespace: str, name: str) -> dict:
        return self.objects[(resource, namespace, name)]

    def forbid(self, method: str, path_regex: str) -> None:
        self.forbidden.add((method, path_regex))

    def kubeconfig(self, path: str, namespace: str = "default", token: str = "fake-token") -> str:  # noqa: S107
        context = {"cluster": "fake", "user": "tester", "namespace": namespace}
        with open(path, "w") as f:
            json.dump(
                {
                    "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": token}}],
                    "contexts": [{"name": "fake", "context": context}],
                },
                f,
            )  # fmt: skip
        return path

    def start(self) -> FakeKube:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # stop() waits for the serving loop to look at its flag, every poll_interval (0.5 s by default)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- the API ------------------------------------------------------------------------------

    ROUTE = re.compile(
        r"^/(?:api/v1|apis/apps/v1)/namespaces/(?P<ns>[^/]+)/(?P<res>pods|deployments|statefulsets|daemonsets)"
        r"/(?P<name>[^/?]+)(?:/(?P<sub>[a-z]+))?$"
    )

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.requests.append(Request(method, path, h.headers.get("Content-Type"), body))
        if any(m == method and re.search(rx, path) for m, rx in self.forbidden):
            h._send(403, _status(403, "Forbidden", f"{method.lower()} {path} is forbidden"))  # type: ignore[attr-defined]
            return
        if method == "GET" and path == "/api/v1/pods":
            self._list_or_watch(h)
            return
        ev = re.match(r"^/api/v1/namespaces/([^/]+)/events$", path)
        if method == "POST" and ev:
            self.events.append(body)  # type: ignore[arg-type]
            h._send(201, body)  # type: ignore[attr-defined,arg-type]
            return
        if self._cluster_object(h, method, path, body):
            return
        if method == "POST" and self._review(h, path, body):
            return
        m = self.ROUTE.match(path)
        if m is None:
            h._send(404, _status(404, "NotFound", f"{path} not found"))  # type: ignore[attr-defined]
            return
        key = (m["res"], m["ns"], m["name"])
        obj = self.objects.get(key)
        if obj is None:
            h._send(404, _status(404, "NotFound", f'{m["res"]} "{m["name"]}" not found'))  # type: ignore[attr-defined]
            return
        if method == "GET":
            if m["res"] == "pods":
                self._progress(obj)
            h._send(200, obj)  # type: ignore[attr-defined]
            return
        ctype = (h.headers.get("Content-Type") or "").split(";")[0]
        if m["sub"] == "ephemeralcontainers" and not self.ephemeral_supported:
            h._send(404, _status(404, "NotFound", "the server could not find the requested resource"))  # type: ignore[attr-defined]
            return
        try:
            if m["res"] == "pods" and m["sub"] == "ephemeralcontainers":
                self._patch_ephemeral(obj, ctype, body)
            elif m["sub"] is None and m["res"] != "pods":
                if ctype != "application/strategic-merge-patch+json":
                    raise ValueError(f"this fake takes strategic merge patches of {m['res']}, not {ctype}")
                _strategic(obj, body)
            else:
                raise ValueError(f"PATCH {path} is not supported by this fake")
        except ValueError as e:
            h._send(422, _status(422, "Invalid", str(e)))  # type: ignore[attr-defined]
            return
        h._send(200, obj)  # type: ignore[attr-defined]

    SECRETS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?$")
    VOLUMES = re.compile(
        r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?(?P<res>persistentvolumes|persistentvolumeclaims)(?:/(?P<name>[^/]+))?$"
    )
    MWC = re.compile(r"^/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/(?P<name>[^/]+)$")

    def _cluster_object(self, h: BaseHTTPRequestHandler, method: str, path: str, body: object) -> bool:
        """Secrets (create, read, replace); volumes and claims (create, read); webhook configurations."""
        import jsonpatch

        send = h._send  # type: ignore[attr-defined]
        if m := self.SECRETS.match(path):
            ns = m["ns"]
            if method == "POST":
                name = body["metadata"]["name"]  # type: ignore[index]
                if ("secrets", ns, name) in self.objects:
                    send(409, _status(409, "AlreadyExists", f'secrets "{name}" already exists'))
                else:
                    send(201, self.add("secrets", copy.deepcopy(body)))  # type: ignore[arg-type]
                return True
            key = ("secrets", ns, m["name"])
            if key not in self.objects:
                send(404, _status(404, "NotFound", f'secrets "{m["name"]}" not found'))
            elif method == "GET":
                send(200, self.objects[key])
            elif method == "PUT":
                have = self.objects[key]["metadata"]["resourceVersion"]
                if body["metadata"].get("resourceVersion") != have:  # type: ignore[index]
                    send(409, _status(409, "Conflict", "the object has been modified"))
                else:
                    send(200, self.add("secrets", copy.deepcopy(body), "MODIFIED"))  # type: ignore[arg-type]
            return True
        if (m := self.VOLUMES.match(path)) and (m["res"] == "persistentvolumes") == (m["ns"] is None):
            ns = m["ns"] or ""  # persistent volumes belong to no namespace
            if method == "POST":
                obj = copy.deepcopy(body)
                obj["metadata"]["namespace"] = ns  # type: ignore[index]
                name = obj["metadata"]["name"]  # type: ignore[index]
                if (m["res"], ns, name) in self.objects:
                    send(409, _status(409, "AlreadyExists", f'{m["res"]} "{name}" already exists'))
                elif invalid := _invalid_metadata(obj):  # type: ignore[arg-type]
                    send(422, _status(422, "Invalid", f'{obj["kind"]} "{name}" is invalid: {invalid}'))  # type: ignore[index]
                else:
                    send(201, self.add(m["res"], obj))  # type: ignore[arg-type]
            elif method == "GET" and m["name"] is None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
                wanted = dict(
                    t.split("=", 1) for t in ",".join(query.get("labelSelector", [])).split(",") if t
                )
                items = [
                    o for (res, o_ns, _), o in sorted(self.objects.items())
                    if res == m["res"] and (m["ns"] is None or o_ns == ns)
                    and wanted.items() <= (o["metadata"].get("labels") or {}).items()
                ]  # fmt: skip
                send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
            elif method == "GET" and (m["res"], ns, m["name"]) in self.objects:
                send(200, self.objects[(m["res"], ns, m["name"])])
            else:
                send(404, _status(404, "NotFound", f'{m["res"]} "{m["name"]}" not found'))
            return True
        if m := self.MWC.match(path):
            key = ("mutatingwebhookconfigurations", "", m["name"])
            if key not in self.objects:
                send(404, _status(404, "NotFound", f'mutatingwebhookconfigurations "{m["name"]}" not found'))
            elif method == "GET":
                send(200, self.objects[key])
            elif method == "PATCH":
                patched = jsonpatch.apply_patch(self.objects[key], body)
                self.objects[key] = patched
                send(200, patched)
            return True
        return False

    def _review(self, h: BaseHTTPRequestHandler, path: str, body: dict) -> bool:  # type: ignore[type-arg]
        send = h._send  # type: ignore[attr-defined]
        if path == "/apis/authentication.k8s.io/v1/tokenreviews":
            user = self.users.get(body["spec"].get("token", ""))
            status = {"authenticated": False, "error": "invalid bearer token"}
            if user:
                status = {
                    "authenticated": True,
                    "user": {"username": user[0], "groups": user[1], "uid": user[0]},
                }
            send(201, {**body, "status": status})
            return True
        if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            spec = body["spec"]
            attrs = spec.get("resourceAttributes") or {}
            who = [spec.get("user", ""), *(spec.get("groups") or [])]
            ns = attrs.get("namespace") or ""
            sub, name = attrs.get("subresource"), attrs.get("name")
            resource = attrs.get("resource", "") + (f"/{sub}" if sub else "")
            scopes = {"*", ns, f"{ns}/{name}"} if ns and name else {"*", ns} if ns else {"*"}
            allowed = any(
                (w, attrs.get("verb"), resource, scope) in self.grants for w in who for scope in scopes
            )
            send(201, {**body, "status": {"allowed": allowed}})
            return True
        return False

    def _list_or_watch(self, h: BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlparse

        q = {k: v[0] for k, v in parse_qs(urlparse(h.path).query).items()}
        node = q.get("fieldSelector", "").removeprefix("spec.nodeName=") or None

        def selected(pod: dict) -> bool:
            return node is None or pod.get("spec", {}).get("nodeName") == node

        if q.get("watch", "").lower() not in ("true", "1"):  # the Python client sends "True"
            with self.changed:
                items = [
                    copy.deepcopy(o) for (r, _, _), o in self.objects.items() if r == "pods" and selected(o)
                ]
                doc = {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": items,
                }
            h._send(200, doc)  # type: ignore[attr-defined]
            return
        since = int(q.get("resourceVersion") or 0)
        deadline = time.monotonic() + min(float(q.get("timeoutSeconds") or 5), 5)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()
        if since < self.compacted:
            gone = {
                "type": "ERROR",
                "object": _status(410, "Expired", f"too old resource version: {since} ({self.compacted})"),
            }
            h.wfile.write(json.dumps(gone).encode() + b"\n")
            return
        sent = since
        while time.monotonic() < deadline:
            with self.changed:
                fresh = [(rv, t, o) for rv, t, o in self.history if rv > sent and selected(o)]
                if not fresh:
                    self.changed.wait(0.1)
                    continue
            for rv, kind, obj in fresh:
                try:
                    h.wfile.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    h.wfile.flush()
                except OSError:
                    return
                sent = rv

    def _patch_ephemeral(self, pod: dict, ctype: str, body: object) -> None:
        spec = pod.setdefault("spec", {})
        before = copy.deepcopy(spec.get("ephemeralContainers") or [])
        if ctype == "application/strategic-merge-patch+json":
            merged = {c["name"]: c for c in before}
            for c in (body or {}).get("spec", {}).get("ephemeralContainers", []):  # type: ignore[union-attr]
                merged[c["name"]] = {**merged.get(c["name"], {}), **c}
            after = list(merged.values())
        elif ctype == "application/merge-patch+json":
            after = (body or {}).get("spec", {}).get("ephemeralContainers", before)  # type: ignore[union-attr]
        elif ctype == "application/json-patch+json":
            after = copy.deepcopy(before)
            for op in body or []:  # type: ignore[union-attr]
                if op["op"] == "add" and op["path"] in (
                    "/spec/ephemeralContainers/-",
                    "/spec/ephemeralContainers",
                ):
                    after += op["value"] if isinstance(op["value"], list) else [op["value"]]
                else:
                    raise ValueError(f"unsupported JSON patch operation {op}")
        else:
            raise ValueError(f"unsupported content type {ctype!r}")
        names_before = [c["name"] for c in before]
        if [c["name"] for c in after][: len(before)] != names_before:
            raise ValueError("existing ephemeral containers may not be changed or removed")
        spec["ephemeralContainers"] = after
        statuses = pod.setdefault("status", {}).setdefault("ephemeralContainerStatuses", [])
        for c in after[len(before) :]:
            statuses.append(
                {"name": c["name"], "state": {"waiting": {"reason": "ContainerCreating"}}, "_gets": 0}
            )

    def _progress(self, pod: dict) -> None:
        for st in (pod.get("status") or {}).get("ephemeralContainerStatuses") or []:
            if "waiting" in st.get("state", {}) and st.get("_gets", 0) >= self.running_after:
                st["state"] = {"running": {"startedAt": "2026-11-28T00:00:00Z"}}
            st["_gets"] = st.get("_gets", 0) + 1


#: what the API server's validation takes as a label's value, and as a name (a DNS subdomain)
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


_NAME_RULE = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
_VALUE_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)


def _invalid_metadata(obj: dict) -> str | None:
    """What the real API server refuses in an object's name, labels and label selector, as it says it."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        return f'metadata.name: Invalid value: "{name}": {_NAME_RULE}'
    selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    for where, labels in (
        ("metadata.labels", meta.get("labels") or {}),
        ("spec.selector.matchLabels", selector),
    ):
        for key, value in labels.items():
            prefix, _, short = key.rpartition("/")
            if (
                len(short) > 63
                or not short
                or not _LABEL_VALUE.match(short)
                or (prefix and not _SUBDOMAIN.match(prefix))
            ):
                return f'{where}: Invalid value: "{key}": name part must be a valid label name'
            if len(value) > 63:
                return f'{where}: Invalid value: "{value}": must be no more than 63 characters'
            if not _LABEL_VALUE.match(value):
                return f'{where}: Invalid value: "{value}": {_VALUE_RULE}'
    return None


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _strategic(obj: dict, patch: dict) -> None:
    """Strategic merge of the parts of a pod template corevault patches."""
    for key, value in patch.items():
        if key in ("containers", "volumes", "volumeMounts") and isinstance(value, list):
            merge_key = "mountPath" if key == "volumeMounts" else "name"
            current = obj.setdefault(key, [])
            for item in value:
                existing = next((c for c in current if c.get(merge_key) == item.get(merge_key)), None)
                if existing is None:
                    current.append(copy.deepcopy(item))
                else:
                    _strategic(existing, item)
        elif isinstance(value, dict) and isinstance(obj.get(key), dict):
            _strategic(obj[key], value)
        else:
            obj[key] = copy.deepcopy(value)
