"""The admission webhook: pods that ask for cores get a valid pattern and a volume to hold them.

For a pod carrying ``corevault.io/core-pattern`` or ``alibabacloud.com/core-pattern`` (the
key that counts is :func:`corevault.podannotations.core_pattern`'s, as for the handler):

- the pattern is validated and the pod denied with the validator's messages when it is
  not usable (a relative path, ``..``, a pipe, an unknown specifier…);
- every container without a volume at the pattern's directory gets one mounted there: an
  emptyDir with a size limit, or what ``corevault.io/volume`` names (``pvc:CLAIM``,
  ``nfs:SERVER:/PATH``, or a bucket's claim: ``oss:BUCKET``, ``s3fs:BUCKET``). Without
  it, cores would land in the container's writable layer and fill the node's disk. The
  patch is computed from what the pod already has, so a pod admitted twice is left as it is.

Pods without the annotation are allowed untouched. Responses are AdmissionReview v1.
The server is plain ``http.server`` over TLS: one small JSON endpoint needs nothing more.
"""

from __future__ import annotations

import base64
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from corevault import pattern, podannotations
from corevault.errors import UserError
from corevault.kube import volumes

MAX_BODY = 4 << 20


def review(doc: dict) -> dict:
    """The AdmissionReview response for an AdmissionReview request."""
    request = doc.get("request") or {}
    response: dict = {"uid": request.get("uid", ""), "allowed": True}
    pod = request.get("object") or {}
    if request.get("kind", {}).get("kind") == "Pod":
        try:
            patch = mutate(pod)
        except (pattern.PatternError, UserError) as e:
            response["allowed"] = False
            response["status"] = {"code": 400, "reason": "Invalid", "message": f"corevault: {e}"}
        else:
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def mutate(pod: dict) -> list[dict]:
    """JSON Patch operations that give the pod's containers a volume at the cores' directory."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    asked = podannotations.core_pattern(annotations)
    if asked is None:
        return []
    _, pat = asked
    pattern.check(pat)
    directory = pattern.directory(pat)
    spec = pod.get("spec") or {}
    ops: list[dict] = []
    have = {v.get("name") for v in spec.get("volumes") or []}
    containers = spec.get("containers") or []
    needy = [i for i, c in enumerate(containers) if volumes.mount_for(c, directory) is None]
    if not needy:
        return []
    if volumes.VOLUME_NAME not in have:
        volume = volumes.volume_source(annotations.get(podannotations.VOLUME, "emptydir"))
        if spec.get("volumes"):
            ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
        else:
            ops.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    mount = {"name": volumes.VOLUME_NAME, "mountPath": directory}
    for i in needy:
        if containers[i].get("volumeMounts"):
            ops.append({"op": "add", "path": f"/spec/containers/{i}/volumeMounts/-", "value": mount})
        else:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/volumeMounts", "value": [mount]})
    return ops


def serve(host: str, port: int, cert: str, key: str) -> ThreadingHTTPServer:
    """An HTTPS server answering AdmissionReviews on any path (the configuration names /mutate)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a client that stalls loses its connection, not the server's time

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self.send_error(413 if length else 400)
                return
            try:
                doc = json.loads(self.rfile.read(length))
            except ValueError:
                self.send_error(400, "not JSON")
                return
            data = json.dumps(review(doc)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # /healthz for probes
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer((host, port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    server.tls = context  # type: ignore[attr-defined]  # load_cert_chain again to rotate
    # The TLS handshake happens in each connection's thread, so a slow client cannot stall accept().
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server
