"""A lying registry for the end-to-end tests: a small threaded HTTP/1.1 reverse proxy placed
between Envoy and the real registry (distribution).

It forwards every request and answer as they are, streaming bodies in both directions (nothing
big is buffered), except the answer to ``POST /v2/<name>/blobs/uploads/`` for the repositories
it is told to lie about, whose ``Location`` it rewrites:

- ``mode = "other-repo"``: it opens an upload session of its own in ``other_repo`` (e.g.
  ``plain/x``, a passthrough repository) and answers with that session's ``Location``
  (``/v2/plain/x/blobs/uploads/<uuid>?_state=…``) and ``Docker-Upload-UUID``;
- ``mode = "other-host"``: it keeps the session but points the ``Location`` at another host
  (``http://<elsewhere>/v2/demo/x/blobs/uploads/<uuid>?_state=…``): a second listener of this
  proxy that forwards to the same registry, standing for a host that is not the gateway.

Or, ``mode = "drop-commit"``, it stands for a registry that cannot be reached at the end of an
upload: a ``PUT …/blobs/uploads/…?…digest=…`` in those repositories is read and answered by
closing the connection (nothing is forwarded).

Both listeners record every request (``requests``: listener, method, path, status) and every
request body that holds one of ``needles`` (``hits``), so a test can tell whether plaintext
ever reached the registry side.

    proxy = LyingRegistry(upstream="127.0.0.1:5001", listen="127.0.0.1:5011",
                          elsewhere="127.0.0.1:5012").start()
    proxy.lie("other-repo", about="demo/", other_repo="plain/x")
    ...
    proxy.honest()
    proxy.stop()
"""
from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Sequence, Tuple

#: Headers that belong to one hop and are not forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
              "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
#: Size of the pieces bodies are streamed in.
PIECE = 64 * 1024
UPLOAD_START = re.compile(r"^/v2/(?P<repo>.+)/blobs/uploads/?(?:\?.*)?$")


@dataclass
class Seen:
    """A request the proxy forwarded."""

    listener: str
    method: str
    path: str
    status: int = 0
    body_bytes: int = 0


class _Scanner:
    """Looks for needles in a stream of pieces (overlap-safe)."""

    def __init__(self, needles: Sequence[bytes]):
        self.needles = [n for n in needles if n]
        self.keep = max((len(n) for n in self.needles), default=1) - 1
        self.tail = b""
        self.found: List[bytes] = []

    def feed(self, piece: bytes) -> None:
        if not self.needles:
            return
        window = self.tail + piece
        for n in self.needles:
            if n not in self.found and n in window:
                self.found.append(n)
        self.tail = window[-self.keep:] if self.keep else b""


class LyingRegistry:
    """See the module docstring."""

    def __init__(self, upstream: str, listen: str, elsewhere: str):
        self.upstream = upstream
        self.listen = listen
        self.elsewhere = elsewhere
        self.mode: Optional[str] = None
        self.about = "demo/"
        self.other_repo = "plain/x"
        self.needles: List[bytes] = []
        self.requests: List[Seen] = []
        self.hits: List[Tuple[Seen, bytes]] = []
        #: Locations handed out in place of the registry's (original, lie).
        self.lies: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._servers: List[ThreadingHTTPServer] = []
        self._threads: List[threading.Thread] = []

    # configuration --------------------------------------------------------------------
    def lie(self, mode: str, about: str = "demo/", other_repo: str = "plain/x",
            needles: Sequence[bytes] = ()) -> None:
        """Start lying (mode "other-repo", "other-host" or "drop-commit") about repositories
        starting with `about`; record request bodies holding any of `needles`."""
        assert mode in ("other-repo", "other-host", "drop-commit"), mode
        with self._lock:
            self.mode, self.about, self.other_repo = mode, about, other_repo
            self.needles = list(needles)
            self.requests.clear()
            self.hits.clear()
            self.lies.clear()

    def honest(self) -> None:
        with self._lock:
            self.mode = None
            self.needles = []

    def watch(self, needles: Sequence[bytes]) -> None:
        """Record request bodies holding any of `needles` (and clear what was recorded)."""
        with self._lock:
            self.needles = list(needles)
            self.requests.clear()
            self.hits.clear()
            self.lies.clear()

    def seen(self, method: Optional[str] = None, path_re: Optional[str] = None) -> List[Seen]:
        with self._lock:
            return [s for s in self.requests
                    if (method is None or s.method == method)
                    and (path_re is None or re.search(path_re, s.path))]

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> "LyingRegistry":
        for name, addr in (("gateway-side", self.listen), ("elsewhere", self.elsewhere)):
            host, port = addr.rsplit(":", 1)
            server = ThreadingHTTPServer((host, int(port)), self._handler(name))
            server.daemon_threads = True
            t = threading.Thread(target=server.serve_forever, name=f"lying-{name}", daemon=True)
            t.start()
            self._servers.append(server)
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(5)
        self._servers.clear()
        self._threads.clear()

    # the proxy --------------------------------------------------------------------------
    def _handler(self, listener: str):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args):  # quiet
                pass

            def do_any(self):
                proxy._forward(self, listener)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_any

        return Handler

    def _upstream(self) -> http.client.HTTPConnection:
        host, port = self.upstream.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=120)

    def _forward(self, h: BaseHTTPRequestHandler, listener: str) -> None:
        seen = Seen(listener, h.command, h.path)
        with self._lock:
            self.requests.append(seen)
            scanner = _Scanner(self.needles)
            drop = self.mode == "drop-commit" and h.command == "PUT" \
                and h.path.startswith(f"/v2/{self.about}") and "/blobs/uploads/" in h.path \
                and "digest=" in h.path
        if drop:
            chunked_in = "chunked" in h.headers.get("Transfer-Encoding", "").lower()
            for piece in self._request_body(h, chunked_in, int(h.headers.get("Content-Length") or 0)):
                seen.body_bytes += len(piece)
            h.close_connection = True
            return
        up = self._upstream()
        try:
            up.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "expect"):
                    up.putheader(k, v)
            chunked_in = "chunked" in h.headers.get("Transfer-Encoding", "").lower()
            length = int(h.headers.get("Content-Length") or 0)
            if chunked_in:
                up.putheader("Transfer-Encoding", "chunked")
            elif length or h.command in ("POST", "PUT", "PATCH"):
                up.putheader("Content-Length", str(length))
            up.putheader("Connection", "close")
            up.endheaders()
            for piece in self._request_body(h, chunked_in, length):
                scanner.feed(piece)
                seen.body_bytes += len(piece)
                up.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked_in else piece)
            if chunked_in:
                up.send(b"0\r\n\r\n")
            resp = up.getresponse()
        except (OSError, http.client.HTTPException) as err:
            up.close()
            seen.status = 502
            self._answer_plain(h, 502, f"lying registry: upstream failed: {err}".encode())
            return
        with self._lock:
            for n in scanner.found:
                self.hits.append((seen, n))
        try:
            self._answer(h, listener, seen, resp)
        except OSError:  # Envoy went away mid-answer: drop the connection
            h.close_connection = True
        finally:
            up.close()

    def _answer(self, h: BaseHTTPRequestHandler, listener: str, seen: Seen,
                resp: http.client.HTTPResponse) -> None:
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        lie = self._lie_about(h, listener, resp.status, headers)
        if lie is not None:
            headers = lie
        seen.status = resp.status
        h.send_response_only(resp.status, resp.reason)
        has_body = h.command != "HEAD" and resp.status not in (204, 304) \
            and not 100 <= resp.status < 200
        length_known = any(k.lower() == "content-length" for k, _ in headers)
        for k, v in headers:
            h.send_header(k, v)
        if has_body and not length_known:
            h.send_header("Transfer-Encoding", "chunked")
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        if has_body:
            while True:
                piece = resp.read(PIECE)
                if not piece:
                    break
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if not length_known
                              else piece)
            if not length_known:
                h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    @staticmethod
    def _request_body(h: BaseHTTPRequestHandler, chunked: bool, length: int):
        """The request body, in pieces as they arrive."""
        if chunked:
            while True:
                line = h.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers: dropped
                    return
                left = size
                while left:
                    piece = h.rfile.read(min(PIECE, left))
                    if not piece:
                        raise OSError("client closed mid-chunk")
                    left -= len(piece)
                    yield piece
                h.rfile.readline(16)
        left = length
        while left > 0:
            piece = h.rfile.read(min(PIECE, left))
            if not piece:
                raise OSError("client closed mid-body")
            left -= len(piece)
            yield piece

    def _lie_about(self, h: BaseHTTPRequestHandler, listener: str, status: int,
                   headers: List[Tuple[str, str]]) -> Optional[List[Tuple[str, str]]]:
        """The headers of a lying answer to an upload start, or None to answer honestly."""
        with self._lock:
            mode, about, other_repo = self.mode, self.about, self.other_repo
        m = UPLOAD_START.match(h.path)
        if mode not in ("other-repo", "other-host") or listener != "gateway-side" \
                or h.command != "POST" or status != 202 \
                or not m or not m.group("repo").startswith(about):
            return None
        original = next((v for k, v in headers if k.lower() == "location"), "")
        rest = [(k, v) for k, v in headers if k.lower() not in ("location", "docker-upload-uuid")]
        if mode == "other-repo":
            up = self._upstream()
            try:
                up.putrequest("POST", f"/v2/{other_repo}/blobs/uploads/", skip_host=True,
                              skip_accept_encoding=True)
                up.putheader("Host", h.headers.get("Host", self.listen))
                auth = h.headers.get("Authorization")
                if auth:
                    up.putheader("Authorization", auth)
                up.putheader("Content-Length", "0")
                up.endheaders()
                r = up.getresponse()
                r.read()
                if r.status != 202:
                    return None
                location = r.getheader("Location") or ""
                uuid = r.getheader("Docker-Upload-UUID") or ""
            finally:
                up.close()
            if "://" in location:  # answer it as a path: /v2/<other_repo>/blobs/uploads/…
                location = location.split("://", 1)[1]
                location = location[location.index("/"):]
            lie = rest + [("Location", location), ("Docker-Upload-UUID", uuid)]
        else:
            path = original.split("://", 1)[1] if "://" in original else original
            path = path[path.index("/"):] if "://" in original else path
            location = f"http://{self.elsewhere}{path}"
            lie = rest + [("Location", location)] + [(k, v) for k, v in headers
                                                    if k.lower() == "docker-upload-uuid"]
        with self._lock:
            self.lies.append((original, location))
        return lie

    @staticmethod
    def _answer_plain(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            h.send_response_only(status)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True
        except OSError:
            pass
