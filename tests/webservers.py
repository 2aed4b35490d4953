"""Small HTTP servers on loopback, for the URL-download tests. They only ever listen on 127.x."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, routes: dict):
        self.routes = routes
        self.hits: list[str] = []
        super().__init__((host, 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        route(self)


def body(data: bytes, content_type: str = "image/jpeg", status: int = 200):
    def handler(h):
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return handler


def redirect(location: str, status: int = 302):
    def handler(h):
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return handler


def endless(chunk: bytes = b"\xff" * 65536):
    """Streams without a Content-Length until the client gives up."""
    def handler(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.end_headers()
        try:
            for _ in range(10000):
                h.wfile.write(chunk)
        except OSError:
            pass
    return handler


def trickle(data: bytes, delay: float):
    """Sends one byte every ``delay`` seconds: a slow server."""
    def handler(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        try:
            for b in data:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(delay)
        except OSError:
            pass
    return handler
