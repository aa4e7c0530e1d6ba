"""A real HTTP server on 127.0.0.1 that records the JSON bodies posted to it, like a chat robot's webhook.

``faults`` is a queue of misbehaviours applied to the next requests: ``500`` (answer HTTP 500; any
status code given as digits, e.g. ``429`` or ``400``, is answered the same way), ``stall``
(hold the request until ``release`` is set, so the client times out; no sleeping), and ``robot:<code>``
(answer HTTP 200 with ``{"errcode": <code>, "errmsg": …}`` as a WeCom/DingTalk robot refusing a message
does). ``answer`` is the body of a normal answer (WeCom and DingTalk say ``{"errcode":0,"errmsg":"ok"}``).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

STALL_LIMIT = 30.0  # a stalled request gives up by itself if a test forgets to release it


@dataclass(frozen=True)
class Received:
    """One request the receiver got: its path, its query parameters and its JSON body."""

    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class Receiver:
    """State shared by the handler threads; ``url`` is set once the server listens."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    faults: deque[str] = field(default_factory=deque)
    answer: dict[str, Any] = field(default_factory=lambda: {"errcode": 0, "errmsg": "ok"})
    errmsg: str = "refused"
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: int = 0

    def requests(self) -> int:
        """Return how many requests arrived so far, refused ones included."""
        with self.lock:
            return self.attempts

    def bodies(self) -> list[Any]:
        """Return the JSON bodies received so far, oldest first."""
        with self.lock:
            return [r.body for r in self.received]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # the request line carries the robot's key; keep it out of the test output

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout) before the answer

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            with receiver.lock:
                receiver.attempts += 1
                fault = receiver.faults.popleft() if receiver.faults else None
            if fault == "stall":
                receiver.stalled.set()
                receiver.release.wait(STALL_LIMIT)
                self.close_connection = True
                return
            if fault is not None and fault.isdigit():
                self._send(int(fault), {"error": f"HTTP {fault} from the receiver"})
                return
            parts = urlsplit(self.path)
            with receiver.lock:
                receiver.received.append(Received(parts.path, parse_qs(parts.query), json.loads(raw)))
            if fault and fault.startswith("robot:"):
                self._send(200, {"errcode": int(fault.split(":")[1]), "errmsg": receiver.errmsg})
                return
            self._send(200, receiver.answer)

    return Handler


@contextmanager
def serve() -> Iterator[Receiver]:
    """Run a receiver on an ephemeral port of 127.0.0.1 for the duration of the block."""
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port_url() -> str:
    """Return the URL of a port that nothing listens on any more (a receiver that is down)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}"
