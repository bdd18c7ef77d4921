"""A key service that misbehaves on demand, in place of nginx in front of a stack's TUF
repository (tests/e2e/test_hostile_services.py).

It serves ``metadata/`` and ``targets/`` of a directory over TLS (the stack's
``keyservice-tls/server.{crt,key}``, so Envoy's key-service cluster validates it as it validates
nginx) and HTTP/1.1 keep-alive, like nginx does. With a fault set (``serve.fault = "drip"``)
it answers the requests whose path matches ``serve.only`` (default: every request) the hostile
way; others honestly. It counts every request it reads (``count``, ``paths``).

Bounded and loopback only: it listens on 127.0.0.1 alone, runs at most ``MAX_CONNECTIONS``
connections at once (more are closed at accept), and every fault stops after a bounded time
or size, or when the server stops.
"""
from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

MAX_CONNECTIONS = 32
#: Most bytes of a request head read before the connection is dropped.
MAX_HEAD = 64 * 1024

#: Faults, each with what it does (the docstring of the test module lists what each proves).
FAULTS = {
    "truncate": "200, Content-Length larger than what is sent, then close",
    "drip": "200 and the headers, then one body byte every half second (slower than timeout_ms)",
    "stall": "reads the request and answers nothing (no headers before timeout_ms)",
    "oversize": "200 with a 64 MiB body (over Envoy's buffer limit for a callout answer)",
    "reset": "reads the request, then resets the connection (RST)",
    "close": "reads the request, then closes without a byte",
    "junk": "200 text/html, a body that is neither JSON nor UTF-8",
    "huge-json": "200 application/json, a valid 3 MiB JSON array",
    "deep-json": "200 application/json, 200 000 nested arrays",
    "bad-headers": "200, header names and values that are not UTF-8, a junk body",
    "bad-headers-valid-body": "the real file, with header values that are not UTF-8",
    "wrong-content-type": "the real file as text/html; charset=\\xff",
    "redirect": "302 to another host",
    "notfound": "404 for everything",
    "error": "500 for everything",
    "bad-status": "a status line that is not HTTP",
    "not-tls": "plaintext HTTP where TLS is expected",
}

#: Faults after which the file content is still genuine: TUF accepts it, pushes go on.
HARMLESS = {"bad-headers-valid-body", "wrong-content-type"}


class HostileKeyService:
    def __init__(self, listen: str, served: Path, certfile: Path, keyfile: Path,
                 fault: Optional[str] = None, only: Optional[str] = None):
        host, _, port = listen.rpartition(":")
        if host != "127.0.0.1":
            raise ValueError("the hostile key service listens on 127.0.0.1 only")
        self.addr = (host, int(port))
        self.served = Path(served)
        self.fault = fault
        #: regex on the request path: the fault applies to matching requests only
        self.only = only
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certfile), str(keyfile))
        self.lock = threading.Lock()
        self.paths: List[Tuple[float, str, Optional[str]]] = []
        self.sock: Optional[socket.socket] = None
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []
        self.active = 0
        self.conns: set = set()

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> "HostileKeyService":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 20
        while True:
            try:
                s.bind(self.addr)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        s.listen(64)
        s.settimeout(0.2)
        self.sock = s
        self.stopping.clear()
        t = threading.Thread(target=self._accept_loop, name="hostile-ks-accept", daemon=True)
        t.start()
        self.threads = [t]
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in list(self.threads):
            t.join(timeout=10)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def set(self, fault: Optional[str], only: Optional[str] = None) -> None:
        """Changes the fault, and ends the connections open now (Envoy keeps idle ones in its
        pool): the next fetches meet the fault from their first byte, TLS handshake included."""
        with self.lock:
            self.fault, self.only = fault, only
            open_now = list(self.conns)
        for c in open_now:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if open_now:
            time.sleep(0.3)  # Envoy sees the FINs before its next request

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.paths)

    def requests_since(self, n: int) -> List[Tuple[float, str, Optional[str]]]:
        with self.lock:
            return list(self.paths[n:])

    # serving ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                busy = self.active >= MAX_CONNECTIONS
                if not busy:
                    self.active += 1
            if busy:
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        conn: socket.socket = raw
        with self.lock:
            self.conns.add(raw)
        try:
            raw.settimeout(5)
            with self.lock:
                fault_now = self.fault
            if fault_now == "not-tls" and self.only is None:
                raw.recv(4096)  # the client's TLS hello, answered in plaintext
                with self.lock:
                    self.paths.append((time.time(), "(TLS hello)", fault_now))
                raw.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                return
            conn = self.ctx.wrap_socket(raw, server_side=True)
            while not self.stopping.is_set():
                head = self._read_head(conn)
                if head is None:
                    return
                path = self._path(head)
                with self.lock:
                    fault = self.fault
                    if fault and self.only and not re.search(self.only, path):
                        fault = None
                    self.paths.append((time.time(), path, fault))
                if not self._answer(conn, path, fault):
                    return
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self.lock:
                self.active -= 1
                self.conns.discard(raw)

    def _read_head(self, conn) -> Optional[bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD or self.stopping.is_set():
                return None
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                if buf:
                    return None
                continue
            if not chunk:
                return None
            buf += chunk
        return buf.split(b"\r\n\r\n", 1)[0]

    @staticmethod
    def _path(head: bytes) -> str:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        return parts[1] if len(parts) >= 2 else ""

    def _file(self, path: str) -> Optional[bytes]:
        path = path.split("?", 1)[0]
        if not (path.startswith("/metadata/") or path.startswith("/targets/")) or ".." in path:
            return None
        target = (self.served / path.lstrip("/")).resolve()
        try:
            target.relative_to(self.served.resolve())
        except ValueError:
            return None
        return target.read_bytes() if target.is_file() else None

    def _send(self, conn, status: bytes, headers: List[bytes], body: bytes) -> None:
        head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
        conn.sendall(head + b"\r\n" + body)

    def _answer(self, conn, path: str, fault: Optional[str]) -> bool:
        """Answers one request; False when the connection must end."""
        data = self._file(path)
        if fault is None:
            if data is None:
                self._send(conn, b"404 Not Found", [b"Content-Length: 0"], b"")
            else:
                self._send(conn, b"200 OK", [b"Content-Type: application/json",
                                             b"Content-Length: %d" % len(data)], data)
            return True
        real = data if data is not None else b'{"signed": {}, "signatures": []}'
        if fault == "truncate":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(real) + 100_000) + real[: len(real) // 2])
            return False
        if fault == "drip":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(real))
            for b in real[:40]:  # at most 20 s of drip, far beyond any timeout_ms used here
                if self.stopping.wait(0.5):
                    break
                conn.sendall(bytes([b]))
            return False
        if fault == "stall":
            self.stopping.wait(20)
            return False
        if fault == "oversize":
            size = 64 * 1024 * 1024
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)
            chunk = b" " * (1024 * 1024)
            for _ in range(size // len(chunk)):
                if self.stopping.is_set():
                    break
                conn.sendall(chunk)
            return False
        if fault == "reset":
            # Linger 0: close() sends RST instead of FIN (TLS close_notify is not sent either).
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault == "close":
            return False
        if fault == "junk":
            body = b"<html>\xff\xfe\x00 captive portal \xc3\x28</html>" * 20
            self._send(conn, b"200 OK", [b"Content-Type: text/html",
                                         b"Content-Length: %d" % len(body)], body)
            return True
        if fault == "huge-json":
            body = b"[" + b",".join(b"%d" % i for i in range(450_000)) + b"]"
            self._send(conn, b"200 OK", [b"Content-Type: application/json",
                                         b"Content-Length: %d" % len(body)], body)
            return True
        if fault == "deep-json":
            body = b"[" * 200_000 + b"]" * 200_000
            self._send(conn, b"200 OK", [b"Content-Type: application/json",
                                         b"Content-Length: %d" % len(body)], body)
            return True
        if fault == "bad-headers":
            body = b"\xff\xfe{not json"
            self._send(conn, b"200 OK", [b"Content-Type: application/\xffjson",
                                         b"X-\xc3\x28: \xff\xfe\xfd",
                                         b"X-Ocicrypt-Note: \x80\x81\x82",
                                         b"Content-Length: %d" % len(body)], body)
            return True
        if fault == "bad-headers-valid-body":
            if data is None:
                self._send(conn, b"404 Not Found", [b"X-Why: \xff\xfe", b"Content-Length: 0"], b"")
            else:
                self._send(conn, b"200 OK", [b"Content-Type: application/json",
                                             b"X-Junk: \xff\xfe\xfd\x80",
                                             b"Content-Length: %d" % len(data)], data)
            return True
        if fault == "wrong-content-type":
            if data is None:
                self._send(conn, b"404 Not Found", [b"Content-Length: 0"], b"")
            else:
                self._send(conn, b"200 OK", [b"Content-Type: text/html; charset=\xff",
                                             b"Content-Length: %d" % len(data)], data)
            return True
        if fault == "redirect":
            self._send(conn, b"302 Found", [b"Location: https://elsewhere.invalid" + path.encode(),
                                            b"Content-Length: 0"], b"")
            return True
        if fault == "notfound":
            self._send(conn, b"404 Not Found", [b"Content-Length: 9"], b"not found")
            return True
        if fault == "error":
            self._send(conn, b"500 Internal Server Error", [b"Content-Length: 5"], b"oops\n")
            return True
        if fault == "not-tls":
            # A connection made before the fault: end it; the next one gets plaintext.
            return False
        if fault == "bad-status":
            conn.sendall(b"HTTP/1.1 2OO 0K\xff\r\nContent-Length: 2\r\n\r\n{}")
            return False
        raise ValueError(f"unknown fault {fault!r}")
