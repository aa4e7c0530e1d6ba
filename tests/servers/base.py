"""The plumbing the local test servers share: a quiet threaded HTTP server over a database, run on a
background thread by tests or in the foreground by a documented command."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import sqlalchemy as sa


class Releasable(Protocol):
    """A server's state: it can let go of answers a test stalled."""

    def release(self) -> None:
        """Let every stalled answer go."""
        ...


ApiT = TypeVar("ApiT", bound=Releasable)


class FaultsAndLog:
    """What a test server's state shares: queued faults, answers held back (stalls) and the request log.

    Mixed into the servers' dataclasses, which set ``lock``, ``faults``, ``stall_limit``, ``requests`` and
    ``_stalls``.
    """

    lock: threading.Lock
    faults: deque[str]
    stall_limit: float
    requests: list[Any]
    _stalls: list[threading.Event]

    def stall(self) -> None:
        """Hold the current answer until :meth:`release` (bounded by ``stall_limit``)."""
        event = threading.Event()
        with self.lock:
            self._stalls.append(event)
        event.wait(self.stall_limit)

    def release(self) -> None:
        """Let every stalled answer go."""
        with self.lock:
            stalls, self._stalls = self._stalls, []
        for event in stalls:
            event.set()

    def log(self, entry: Any) -> None:
        """Append to the request log."""
        with self.lock:
            self.requests.append(entry)


class JsonHandler(BaseHTTPRequestHandler):
    """A keep-alive JSON request handler: quiet, no Nagle delay, and the ``/_test/`` control endpoints.

    Subclasses set ``api`` (a :class:`FaultsAndLog`) and may set ``control_ok`` (fields every control
    answer carries) and override :meth:`encode` and :meth:`not_found`.
    """

    protocol_version = "HTTP/1.1"
    api: ClassVar[Any]
    control_ok: ClassVar[dict[str, Any]] = {}

    def setup(self) -> None:
        """Set TCP_NODELAY: headers and body go out in two writes, and Nagle + delayed ACK cost 40 ms."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (tests read the server's own request log)."""
        return

    def encode(self, body: Any) -> bytes:
        """Return the answer's bytes."""
        return json.dumps(body, ensure_ascii=False).encode()

    def not_found(self, message: str) -> dict[str, Any]:
        """Return the body of a 404 answer."""
        return {"message": message}

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = self.encode(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout): nothing to answer
            self.close_connection = True

    def _control(self, path: str, raw: bytes | None) -> None:
        """``/_test/faults`` queues faults (``{"faults": [...]}``), ``/_test/release`` lets stalls go."""
        if path == "/_test/faults":
            faults = json.loads(raw or b"{}").get("faults", [])
            with self.api.lock:
                self.api.faults.extend(str(f) for f in faults)
            self._send(200, {**self.control_ok, "queued": len(self.api.faults)})
        elif path == "/_test/release":
            self.api.release()
            self._send(200, dict(self.control_ok))
        else:
            self._send(404, self.not_found(f"no control endpoint {path}"))


class QuietThreadingServer(ThreadingHTTPServer):
    """A threaded HTTP server whose request threads die with it and that does not log clients hanging up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Print the traceback of a real server error; a client that hung up is not one."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def wal_engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite files in WAL mode without a sync per commit (readers run beside the writer)."""
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


class ThreadedServer(Generic[ApiT]):
    """A test server on its own thread over database ``db``: :meth:`start`, :meth:`stop`; ``url`` and ``api``.

    ``make_api`` builds the server's state (creating its tables), ``make_handler`` its request handler;
    ``path`` is appended to the URL (a site path such as ``/k3cloud``).
    """

    def __init__(
        self,
        db: str | sa.Engine,
        make_api: Callable[[sa.Engine], ApiT],
        make_handler: Callable[[ApiT], type[BaseHTTPRequestHandler]],
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "",
    ) -> None:
        self._owns_engine = isinstance(db, str)
        self.engine = wal_engine(db) if isinstance(db, str) else db
        self.api = make_api(self.engine)
        self._httpd = QuietThreadingServer((host, port), make_handler(self.api))
        self.url = f"http://{host}:{self._httpd.server_address[1]}{path}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=name, daemon=True
        )

    def on_start(self) -> None:
        """Start what the server runs beside its requests (none by default)."""

    def on_stop(self) -> None:
        """Stop what :meth:`on_start` started (none by default)."""

    def start(self) -> ThreadedServer[ApiT]:
        """Serve requests on a background thread."""
        self.on_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release stalled answers and close the database."""
        self.api.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self.on_stop()
        if self._owns_engine:
            self.engine.dispose()


@contextmanager
def serving(server: ThreadedServer[ApiT]) -> Iterator[tuple[str, ApiT]]:
    """Run ``server`` for the duration of the block; yield its URL and state."""
    server.start()
    try:
        yield server.url, server.api
    finally:
        server.stop()


def run_in_foreground(server: ThreadedServer[Any]) -> None:
    """Serve until SIGTERM or Ctrl-C; print the URL on one line when ready (scripts read it)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    print(server.url, flush=True)
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
