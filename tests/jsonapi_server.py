"""A real HTTP server on 127.0.0.1 that speaks the SuiteCRM 8 / SugarCRM v8 JSON:API subset we use.

POST /Api/access_token (OAuth2 client credentials) → bearer token; GET /Api/V8/meta/modules;
GET /Api/V8/module/<Module>?page[number]=&page[size]=&filter[date_modified][gte]= → JSON:API pages.
``faults`` is a queue of misbehaviours applied to the next requests: ``429:<seconds>``, ``500``,
``503``, ``drop`` (close the socket without answering) and ``slow:<seconds>``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

CLIENT_ID, CLIENT_SECRET, TOKEN = "crm-migration", "s3cret-client", "token-abc123"


class SuiteCrmApi:
    """State shared by the handler threads: module records, the fault queue and a request log."""

    def __init__(self, modules: dict[str, list[dict[str, Any]]]) -> None:
        self.modules = modules
        self.faults: deque[str] = deque()
        self.requests: list[str] = []
        self.lock = threading.Lock()


def make_handler(api: SuiteCrmApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.api+json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _fault(self) -> bool:
            with api.lock:
                api.requests.append(f"{self.command} {self.path}")
                fault = api.faults.popleft() if api.faults else None
            if fault is None:
                return False
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return True
            if fault.startswith("slow:"):
                time.sleep(float(fault.split(":")[1]))  # the server is slow; the client times out
                return False
            status, _, retry_after = fault.partition(":")
            self._send(
                int(status),
                {"errors": [{"status": status}]},
                {"Retry-After": retry_after} if retry_after else None,
            )
            return True

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(
                self.rfile.read(length) or b"{}"
            )  # read first: keep-alive needs the body consumed
            if self._fault():
                return
            if self.path != "/Api/access_token":
                self._send(404, {"errors": [{"title": "not found"}]})
            elif body.get("client_id") == CLIENT_ID and body.get("client_secret") == CLIENT_SECRET:
                self._send(200, {"token_type": "Bearer", "expires_in": 3600, "access_token": TOKEN})
            else:
                self._send(401, {"error": "invalid_client"})

        def do_GET(self) -> None:
            if self._fault():
                return
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"errors": [{"title": "Access denied"}]})
                return
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/Api/V8/meta/modules":
                self._send(
                    200, {"data": {"type": "modules", "attributes": {m: {"label": m} for m in api.modules}}}
                )
                return
            module = url.path.removeprefix("/Api/V8/module/")
            if not url.path.startswith("/Api/V8/module/") or module not in api.modules:
                self._send(404, {"errors": [{"title": f"module {module} not found"}]})
                return
            records = [r for r in api.modules[module] if not r.get("deleted")]
            since = query.get("filter[date_modified][gte]")
            if since:
                records = [
                    r for r in records if str(r["date_modified"]).replace("T", " ") >= since.replace("T", " ")
                ]
            number, size = int(query.get("page[number]", 1)), int(query.get("page[size]", 20))
            page = records[(number - 1) * size : number * size]
            pages = max(1, -(-len(records) // size))
            self._send(200, {
                "meta": {"total-pages": pages},
                "data": [{"type": module, "id": r["id"], "attributes": {k: v for k, v in r.items() if k != "id"}} for r in page],
                "links": {"next": f"/Api/V8/module/{module}?page[number]={number + 1}&page[size]={size}"} if number < pages else {},
            })  # fmt: skip

    return Handler


@contextmanager
def serve(modules: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, SuiteCrmApi]]:
    """Run the API on a free port of 127.0.0.1; yield its base URL and state."""
    api = SuiteCrmApi(modules)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
