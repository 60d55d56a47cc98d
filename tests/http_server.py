"""A real HTTP server on 127.0.0.1 for download tests, with misbehaviours on demand.

Each served path has a mode:

* ``normal``: 200 with Content-Length, or 206 with Content-Range for ``Range: bytes=N-``;
* ``drop``: the first request sends the headers for the whole body, half the bytes, then closes the
  connection; later requests behave as ``normal`` (so a client must resume with Range);
* ``norange``: ignores Range and always answers 200 with the whole file;
* ``wrong``: serves other bytes of the same length;
* ``404`` / ``500``: answers that status;
* ``reset``: the first request sends the headers and half the bytes, then resets the connection (TCP RST);
  later requests behave as ``normal``;
* ``stall``: the first request sends the headers and half the bytes, then goes silent without closing
  (until the server shuts down); later requests behave as ``normal``;
* ``hang``: every request is accepted and then never answered (until the server shuts down).

Every request is recorded as ``(path, range_header_or_None)`` in ``server.requests``.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def wrong_bytes(body: bytes) -> bytes:
    """What ``wrong`` mode serves instead of ``body``: every byte plus one."""
    return body.translate(bytes((i + 1) % 256 for i in range(256)))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up early (as the tests make it) is not an error worth printing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        with server.lock:
            server.requests.append((path, range_header))
            count = server.counts[path] = server.counts.get(path, 0) + 1
        if path not in server.files:
            self.send_error(404, "Not Found")
            return
        body, mode = server.files[path]
        if mode == "hang":
            server.released.wait()
            return
        if mode == "404":
            self.send_error(404, "Not Found")
            return
        if mode == "500":
            self.send_error(500, "Internal Server Error")
            return
        if mode == "wrong":
            body = wrong_bytes(body)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and mode != "norange":
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "none" if mode == "norange" else "bytes")
        self.end_headers()
        if mode in ("drop", "reset", "stall") and count == 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            if mode == "stall":
                server.released.wait()
            elif mode == "reset":  # linger 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(payload)


class FileServer:
    """``with FileServer() as server: server.add("/f.bin", data, mode="drop"); url = server.url("/f.bin")``"""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.released = threading.Event()  # lets stalled handlers go when the server shuts down
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def add(self, path: str, body: bytes, mode: str = "normal") -> str:
        assert mode in ("normal", "drop", "norange", "wrong", "404", "500", "reset", "stall", "hang"), mode
        self.files[path] = (body, mode)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests_for(self, path: str) -> list[str | None]:
        """The Range header of every request for ``path`` (None when there was none)."""
        return [rng for p, rng in self.requests if p == path]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
