"""Issue 13.6: buffered manifests share a memory budget per worker, and a manifest of countless
tiny JSON values is refused before it is parsed (a parsed document grows the worker VM's memory
for good: wasm memory does not shrink)."""
from __future__ import annotations

import json
import socket

import pytest

import helpers
from helpers import MT_MANIFEST

pytestmark = pytest.mark.filter

BUDGET_PER_WORKER = 32 * helpers.MIB  # filter/core/src/gateway/mod.rs MANIFEST_BUDGET_PER_WORKER


def _open_manifest_put(addr: str, path: str, body: bytes) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=60)
    head = (f"PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {MT_MANIFEST}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    s.sendall(head + body[:-1])  # all but the last byte: the filter holds the rest
    return s


def _answer(s: socket.socket, last: bytes) -> tuple:
    s.sendall(last)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_held_manifests_share_a_budget(stack):
    """20 manifest PUTs of 4 MiB held at once through Envoy's 2 workers: at most the budget
    (32 MiB per worker: 8 such manifests each) is held; the others are refused with the
    filter's 503 once their body has been taken, holding nothing. Afterwards the budget is
    back: a manifest push works."""
    n, size = 20, 4 * helpers.MIB - 1024
    body = b"{" + b" " * (size - 2) + b"}"
    conns = [_open_manifest_put(stack.addr, f"/v2/demo/budget/manifests/t{i}", body)
             for i in range(n)]
    answers = [_answer(c, body[-1:]) for c in conns]
    over = [b for st, b in answers if st == 503 and b"bytes of manifests being pushed" in b]
    held = [st for st, b in answers if st != 503]
    assert len(over) >= n - 2 * (BUDGET_PER_WORKER // size), [st for st, _ in answers]
    assert held, "every manifest refused: the budget held nothing"
    for _, b in answers:
        assert json.loads(b)["errors"], b[:200]
    # The budget is released when the streams end.
    reg = stack.via_gateway()
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    assert reg.upload_monolithic("demo/budget", config).status_code == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                           "config": {"mediaType": helpers.MT_CONFIG,
                                      "digest": helpers.sha256_digest(config),
                                      "size": len(config)},
                           "layers": []}).encode()
    r = reg.put_manifest("demo/budget", "after", manifest)
    assert r.status_code == 201, r.text[:300]


def test_manifest_of_countless_values_is_refused_unparsed(stack):
    """A 3 MiB manifest of `{}` objects is refused (400 MANIFEST_INVALID) before it is parsed,
    and the gateway keeps serving."""
    objects = b"{}," * (1024 * 1024)
    body = b'{"schemaVersion":2,"mediaType":"' + MT_MANIFEST.encode() + \
        b'","annotations":{},"x":[' + objects + b'{}]}'
    status, headers, resp = helpers.raw_request(stack.addr, "PUT",
                                                "/v2/demo/values/manifests/v1", body,
                                                {"Content-Type": MT_MANIFEST})
    assert status == 400, (status, resp[:300])
    assert headers.get("x-ocicrypt-filter") == "refused"
    (err,) = json.loads(resp)["errors"]
    assert err["code"] == "MANIFEST_INVALID" and "JSON values" in err["message"], err
    assert stack.direct().get_manifest("demo/values", "v1").status_code == 404
