"""Serving the workbench from several processes that share one duplicate-check index.

One uvicorn process answers one request at a time (Python's interpreter lock), and a look-up is about a
millisecond of CPU: with many concurrent API clients, requests wait for each other. ``fork_workers``
builds the index once, in the parent, then forks worker processes that all accept on one listening
socket; each inherits the index (copy-on-write: its memory is shared until a refresh replaces rows) and
refreshes its own copy in the background. POSIX only (``os.fork``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket the workers inherit (port 0: an ephemeral port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def fork_workers(app: Any, sock: socket.socket, workers: int, log_level: str = "warning") -> list[int]:
    """Build the app's match index, then fork ``workers`` uvicorn processes serving ``app`` on ``sock``.

    Returns their process ids (stop them with :func:`stop_workers`). Call it before starting any thread:
    a fork copies only the calling thread.
    """
    import uvicorn

    workbench = app.state.workbench
    if not workbench.match.ready:
        workbench.match.build()  # once, before the fork: the workers share it
    pids: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                workbench.engine.dispose(close=False)  # the parent's pooled connections are not ours
                config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False)
                uvicorn.Server(config).run(sockets=[sock])
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def stop_workers(pids: list[int]) -> None:
    """Ask the workers to finish (SIGTERM: uvicorn's graceful shutdown) and wait for them."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
