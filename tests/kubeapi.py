"""A recorded-API fake of the Kubernetes API server's Node endpoints, for the node labeler: no
API server can run on these machines. It serves GET and PATCH /api/v1/nodes/NAME over real
HTTP, so the official client is exercised whole; it applies a JSON merge patch as RFC 7386
says, answers a wrong content type 415 and an unknown node 404 as the API server does, and
records every request for the test to check."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NODE = Path(__file__).parent / "data" / "node.json"


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str | None
    body: Any


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


class FakeApiServer:
    def __init__(self) -> None:
        node = json.loads(NODE.read_text())
        self.nodes: dict[str, Any] = {node["metadata"]["name"]: node}
        self.requests: list[Recorded] = []
        self.fail_next = 0  # answer this many requests 503
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._serve(self, None)

            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                fake._serve(self, json.loads(self.rfile.read(length)))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def labels(self, node: str) -> dict[str, str]:
        return dict(self.nodes[node]["metadata"].get("labels", {}))

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    def _serve(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        content_type = handler.headers.get("Content-Type")
        self.requests.append(Recorded(handler.command, handler.path, content_type, body))
        prefix = "/api/v1/nodes/"
        name = handler.path[len(prefix) :] if handler.path.startswith(prefix) else None
        if self.fail_next:
            self.fail_next -= 1
            return _answer(handler, 503, _status(503, "ServiceUnavailable", "etcd is away"))
        if name not in self.nodes:
            return _answer(handler, 404, _status(404, "NotFound", f'nodes "{name}" not found'))
        if handler.command == "PATCH":
            if content_type != "application/merge-patch+json":
                message = f"the body of the request was in an unknown format: {content_type}"
                return _answer(handler, 415, _status(415, "UnsupportedMediaType", message))
            self.nodes[name] = merge(self.nodes[name], body)
        _answer(handler, 200, self.nodes[name])


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _answer(handler: BaseHTTPRequestHandler, code: int, body: Any) -> None:
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
