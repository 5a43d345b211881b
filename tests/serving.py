"""Run a kiln server (uvicorn, in a thread, on a free local port) for tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` on 127.0.0.1; yields the base URL. Stops the server (and its worker) on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.worker.stop()


def read_events(url: str, timeout: float = 120) -> list:
    """A job's server-sent events as [(event name, data)], up to and including the final (non-progress) one."""
    import json

    import requests

    events = []
    with requests.get(url, stream=True, timeout=timeout) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
                if name != "progress":
                    break
    return events
