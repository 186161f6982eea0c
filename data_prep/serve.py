"""A loopback HTTP server for a directory of files: the download tests, benchmark and demo fetch from it.

    with LoopbackServer("images/", delays={"slow/003.jpg": 5.0}) as server:
        url = f"{server.base_url}/000.jpg"      # http://127.0.0.1:PORT/000.jpg
        ...
        server.requests["000.jpg"]              # how many times that path was asked for

It listens on 127.0.0.1 only, on a free port unless one is given, one thread per request.
A path in `delays` waits that many seconds before answering (a slow server); a missing file
answers 404 as any file server would. Request logging is off: it would drown the test output.
`mplug data serve DIR` runs one until Ctrl-C.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOOPBACK = "127.0.0.1"


def _normalise(path: str) -> str:
    """'/a/b.jpg?x=1' and 'a/b.jpg' name the same file: 'a/b.jpg'."""
    return unquote(urlsplit(path).path).lstrip("/")


class _Handler(SimpleHTTPRequestHandler):
    """Serves files from the server's directory, counting and optionally delaying each request."""

    server: _CountingServer

    def _record(self) -> None:
        path = _normalise(self.path)
        with self.server.lock:
            self.server.requests[path] += 1
        delay = self.server.delays.get(path, 0.0)
        if delay > 0:
            time.sleep(delay)

    def do_GET(self) -> None:  # the method name http.server dispatches GET to
        self._record()
        try:
            super().do_GET()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout ran out during a delay): nothing to answer

    def do_HEAD(self) -> None:
        self._record()
        super().do_HEAD()

    def log_message(self, format: str, *args) -> None:  # the base class's signature
        pass  # one line per request would drown the output of the tests


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True  # a request still sleeping in a delay must not block shutdown
    block_on_close = False
    # socketserver's default backlog of 5 drops the connects of a downloader with dozens of
    # threads (each retried after 1 s, 3 s, ...: timeouts that are the server's fault).
    request_queue_size = 1024

    def __init__(self, address, handler, delays: dict[str, float], requests: Counter[str], lock):
        super().__init__(address, handler)
        self.delays = delays
        self.requests = requests
        self.lock = lock

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
        # else a client hung up mid-answer (its timeout ran out): expected here, not an error


class LoopbackServer:
    """Serves `root` on http://127.0.0.1:PORT/ from a background thread; a context manager.

    `delays` maps a path relative to `root` ('slow/1.jpg') to seconds to wait before answering.
    `requests` counts the requests per path (relative, no leading slash), 404s included.
    """

    def __init__(self, root: str | Path, port: int = 0, delays: dict[str, float] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"cannot serve {self.root}: it is not a directory; give a folder of files")
        self.port = port
        self.delays = {_normalise(path): float(seconds) for path, seconds in (delays or {}).items()}
        self._requests: Counter[str] = Counter()  # kept after stop(), for the assertions that follow
        self._lock = threading.Lock()
        self._server: _CountingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running; use it as `with LoopbackServer(root) as server:`")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def requests(self) -> Counter[str]:
        """A snapshot of the requests per path so far."""
        with self._lock:
            return Counter(self._requests)

    def url(self, path: str) -> str:
        """The URL of `path` (relative to `root`) on this server."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def start(self) -> LoopbackServer:
        handler = functools.partial(_Handler, directory=str(self.root))
        try:
            self._server = _CountingServer(
                (LOOPBACK, self.port), handler, self.delays, self._requests, self._lock
            )
        except OSError as error:
            raise OSError(
                f"cannot listen on {LOOPBACK}:{self.port} ({error}); pick another --port, or 0 for any free one"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
            name=f"loopback-server-{self._server.server_address[1]}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
