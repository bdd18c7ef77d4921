"""The fault relay: the lying registry's streaming proxy (tests/lying_registry.py), honest, on
the registry cluster between Envoy and the real registry, with two additions for the fault
matrix:

- kill points by bytes: ``at_bytes(n, fn, method="PATCH")`` calls ``fn`` once, in the thread
  forwarding the request, when a matching request has forwarded ``n`` body bytes to the
  registry (``fn`` may kill Envoy, the registry or the client; it may also block, which holds
  the stream there); ``skip=k`` lets the first ``k`` requests that reach ``n`` bytes pass (a
  client that sends a layer in several PATCHes);
- kill points by request: ``on_request(match, fn, then)`` holds the first request for which
  ``match(method, path, headers)`` is true before forwarding a byte of it, calls ``fn`` in its
  thread, then forwards it (``then="release"``: the registry acts on it, the answer goes to
  whoever still listens) or answers it with a misbehaviour (``"reset"``: dropped unforwarded);
- misbehaviour on chosen requests: ``misbehave(action, match, times=None)`` answers requests
  for which ``match(method, path, headers)`` is true (the first ``times`` of them, or all)
  with ``500``/``503`` (an OCI error body, as the registry would), ``reset`` (the connection
  closed with RST, nothing forwarded) or ``hang`` (no answer until ``hang_seconds`` have
  passed or ``heal()``, then RST).

``is_callout(headers)`` tells the filter's own callouts from the clients' requests: a callout
carries the filter's fixed ``Accept`` and no ``User-Agent`` (every client sends one).

When the registry goes away mid-request the relay resets Envoy's connection (as the registry's
own socket would), instead of the lying registry's 502.

In front of Envoy (clients push to it) the same relay keeps the error answers the clients got
(``errors``: method, path, status, headers, body), whose bodies clients do not always print.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable, List, Optional

from lying_registry import HOP_BY_HOP, LyingRegistry

#: The `Accept` of every registry callout of the filter (filter/core/src/gateway/mod.rs).
CALLOUT_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
ACTIONS = ("500", "503", "reset", "hang")


def is_callout(headers) -> bool:
    return headers.get("Accept") == CALLOUT_ACCEPT and headers.get("User-Agent") is None


def commit(method: str, path: str, headers) -> bool:
    """A `PUT <session>?digest=` that commits an upload: a chunked client's own final PUT (the
    filter forwards it with the ciphertext digest) or the filter's finishing callout."""
    return method == "PUT" and "/blobs/uploads/" in path and "digest=" in path


def finishing_callout(method: str, path: str, headers) -> bool:
    """The filter's `PUT <session>?digest=<ciphertext>` that commits a monolithic upload."""
    return commit(method, path, headers) and is_callout(headers)


def ledger_write(method: str, path: str, headers) -> bool:
    return method == "PUT" and "/manifests/ocicrypt." in path and is_callout(headers)


def ledger_read(method: str, path: str, headers) -> bool:
    return method == "GET" and "/manifests/ocicrypt." in path and is_callout(headers)


def _reset(sock: socket.socket) -> None:
    """Closes with RST (SO_LINGER 0): the peer sees a reset, not an orderly end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultRelay(LyingRegistry):
    """See the module docstring."""

    def __init__(self, upstream: str, listen: str, elsewhere: str):
        super().__init__(upstream, listen, elsewhere)
        self._trigger = None  # (threshold, fn, method_re)
        self._fault = None  # (action, match, times)
        self._hold = None  # (match, fn, then)
        self._skip = 0
        self._healed = threading.Event()
        self.hang_seconds = 30.0
        #: Requests answered by a fault (method, path, action) and bytes at which a kill fired.
        self.misbehaved: List[tuple] = []
        self.fired: List[tuple] = []
        #: Requests held by on_request (method, path).
        self.held: List[tuple] = []
        #: Error answers forwarded: (method, path, status, headers lower-cased, body).
        self.errors: List[tuple] = []

    # configuration --------------------------------------------------------------------
    def at_bytes(self, threshold: int, fn: Callable[[], None], method: str = "PATCH",
                 path_re: str = r"/blobs/uploads/", skip: int = 0) -> None:
        with self._lock:
            self._trigger = (threshold, fn, method, re.compile(path_re))
            self._skip = skip
            self.fired.clear()

    def on_request(self, match, fn: Callable[[], None], then: str = "release") -> None:
        assert then == "release" or then in ACTIONS, then
        with self._lock:
            self._hold = (match, fn, then)
            self.held.clear()

    def misbehave(self, action: str, match, times: Optional[int] = None) -> None:
        """`times`: misbehave on that many matching requests, then forward the others."""
        assert action in ACTIONS, action
        with self._lock:
            self._fault = (action, match, times)
            self.misbehaved.clear()
        self._healed.clear()

    def heal(self) -> None:
        """Honest again: no trigger, no fault, hung requests released (with a reset)."""
        with self._lock:
            self._trigger = None
            self._fault = None
            self._hold = None
        self._healed.set()

    # the proxy --------------------------------------------------------------------------
    def _forward(self, h: BaseHTTPRequestHandler, listener: str) -> None:
        with self._lock:
            hold = self._hold
            if hold is not None and hold[0](h.command, h.path, h.headers):
                self._hold = None
                self.held.append((h.command, h.path))
            else:
                hold = None
        if hold is not None:
            hold[1]()
            if hold[2] != "release":
                self._misbehave(h, hold[2])
                return
            super()._forward(h, listener)
            return
        with self._lock:
            fault = self._fault
            if fault is not None and fault[1](h.command, h.path, h.headers) \
                    and (fault[2] is None or len(self.misbehaved) < fault[2]):
                self.misbehaved.append((h.command, h.path, fault[0]))
            else:
                fault = None
        if fault is not None:
            self._misbehave(h, fault[0])
            return
        super()._forward(h, listener)

    def _misbehave(self, h: BaseHTTPRequestHandler, action: str) -> None:
        h.close_connection = True
        length = int(h.headers.get("Content-Length") or 0)
        if 0 < length <= 4 * 1024 * 1024:
            h.rfile.read(length)
        if action in ("500", "503"):
            body = json.dumps({"errors": [{"code": "UNKNOWN" if action == "500" else "UNAVAILABLE",
                                           "message": f"fault relay: injected {action}",
                                           "detail": None}]}).encode()
            h.send_response_only(int(action))
            h.send_header("Content-Type", "application/json; charset=utf-8")
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
            return
        if action == "hang":
            self._healed.wait(self.hang_seconds)
        _reset(h.connection)

    def _answer(self, h: BaseHTTPRequestHandler, listener: str, seen, resp) -> None:
        if resp.status < 400 or h.command == "HEAD":
            return super()._answer(h, listener, seen, resp)
        body = resp.read(1 << 20)
        with self._lock:
            self.errors.append((h.command, h.path, resp.status,
                                {k.lower(): v for k, v in resp.getheaders()}, body))
        seen.status = resp.status
        h.close_connection = True
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def _request_body(self, h: BaseHTTPRequestHandler, chunked: bool, length: int):
        with self._lock:
            trigger = self._trigger
        armed = trigger is not None and h.command == trigger[2] and trigger[3].search(h.path)
        sent = 0
        for piece in LyingRegistry._request_body(h, chunked, length):
            yield piece
            sent += len(piece)
            if armed and sent >= trigger[0]:
                armed = False
                with self._lock:
                    if self._trigger is not trigger:
                        continue
                    if self._skip > 0:
                        self._skip -= 1
                        continue
                    self._trigger = None
                    self.fired.append((h.command, h.path, sent))
                trigger[1]()

    def _answer_plain(self, h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        # The registry (or the client side) went away mid-request: Envoy sees the reset a real
        # registry's socket would give, not an answer.
        h.close_connection = True
        _reset(h.connection)
