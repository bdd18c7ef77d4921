"""Hostile bytes in request headers (issue 13): HTTP/1.1 lets a header value carry bytes that are
not UTF-8 (obs-text 0x80-0xFF), Envoy forwards them, and the filter runs before any
authentication. Before the filter read headers through its own panic-free host bindings, one such
header on an encrypted-repository write trapped the plugin's VM and every later request through
that Envoy answered 503 with an empty body.

Each request below is sent on a raw socket (`requests` refuses such bytes) through the real
gateway, and after EACH one the gateway must still serve: every worker answers `GET /v2/` 200.
The request itself may be refused (a header the filter must interpret that is not UTF-8 is a
400 with an OCI error body), or reach the registry and get its normal answer; it must never go
unanswered or get Envoy's empty 5xx. At the end a real push to an encrypted repository still
stores a layer skopeo decrypts byte-identical.

With `failure_policy: FAIL_RELOAD` a trapped worker recovers about a second later, so a trap is
caught twice: by the probe that follows at once (well within Envoy's reload backoff), and by
conftest's `stacks_stay_healthy`, which fails any test during which Envoy logged a plugin panic.
Checked to fail on the build before the fix (88ffedf): the first request gets an empty 503 and
every probe after it finds a dead worker."""
from __future__ import annotations

import json
import os
from typing import Dict, Union

import pytest
import requests

import helpers
from helpers import MT_CONFIG, MT_LAYER_TAR, MT_MANIFEST, sha256_digest

pytestmark = pytest.mark.filter

#: Fresh connections per liveness probe: Envoy spreads connections over its workers (two in the
#: test stacks), and a trapped VM takes down only its own worker, so one probe is not enough.
PROBES = 12

Headers = Dict[str, Union[str, bytes]]


def manifest_body() -> bytes:
    """A well-formed OCI image manifest naming blobs nobody pushed."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256_digest(b"{}"), "size": 2},
        "layers": [{"mediaType": MT_LAYER_TAR, "digest": sha256_digest(os.urandom(32)),
                    "size": 1024}],
    }).encode()


def assert_serving(stack, after: str) -> None:
    """Every worker still answers: GET /v2/ on PROBES fresh connections, all 200."""
    bad = []
    for _ in range(PROBES):
        try:
            # requests.get opens (and closes) a connection of its own per call.
            r = requests.get(f"http://{stack.addr}/v2/", timeout=10)
            if r.status_code != 200:
                bad.append(f"{r.status_code} {r.content[:200]!r}")
        except requests.RequestException as err:
            bad.append(repr(err))
    assert not bad, f"after {after}, GET /v2/ failed on {len(bad)}/{PROBES} connections: {bad}"


def assert_answered(what: str, method: str, status: int, headers: Dict[str, str],
                    body: bytes) -> None:
    """An answer that follows the error rule: never Envoy's empty 5xx (what a trapped or failed
    plugin gives), and every refusal (the filter's, or the registry's) an OCI error body (an
    answer to HEAD has no body at all)."""
    assert not (status >= 500 and not body), \
        f"{what}: {status} with an empty body (the plugin failed): {headers}"
    assert status < 500, f"{what}: {status} {body[:500]!r}"
    if method == "HEAD":
        assert not body, f"{what}: a body in an answer to HEAD: {body[:200]!r}"
    elif status >= 400 or "x-ocicrypt-filter" in headers:
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise AssertionError(f"{what}: {status} without an OCI error body: {body[:500]!r}") \
                from err
        assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], \
            f"{what}: {status}, not an OCI error body: {doc!r}"
        assert all(isinstance(e, dict) and e.get("code") for e in doc["errors"]), doc


def send(stack, what: str, method: str, path: Union[str, bytes], body: bytes,
         headers: Headers) -> int:
    try:
        status, resp_headers, resp = helpers.raw_request(stack.addr, method, path, body, headers,
                                                         timeout=60)
    except (OSError, ValueError) as err:  # reset, timeout, or no HTTP answer at all
        raise AssertionError(f"{what}: no answer from the gateway: {err!r}") from err
    assert_answered(what, method, status, resp_headers, resp)
    return status


#: (id, method, path, body, headers): one hostile header per request, on the paths where the
#: filter reads headers (encrypted-repository writes) and where it must not (passthrough, /v2/).
CASES = [
    ("manifest-put-content-type-ff", "PUT", "/v2/demo/hostile/manifests/v1", manifest_body(),
     {"Content-Type": MT_MANIFEST.encode() + b"\xff"}),
    ("upload-start-authorization-ff", "POST", "/v2/demo/hostile/blobs/uploads/", b"",
     {"Authorization": b"Basic \xff"}),
    ("upload-start-authorization-obs-text", "POST", "/v2/demo/hostile/blobs/uploads/", b"",
     {"Authorization": b"Basic \x80\xe9t\xe9", "User-Agent": b"caf\xe9-client/1.0"}),
    ("monolithic-post-content-type-80", "POST",
     f"/v2/demo/hostile/blobs/uploads/?digest={sha256_digest(b'x' * 4096)}", b"x" * 4096,
     {"Content-Type": b"application/octet-stream\x80"}),
    ("blob-head-authorization-ff", "HEAD",
     f"/v2/demo/hostile/blobs/{sha256_digest(b'nothing')}", b"",
     {"Authorization": b"Bearer \xff\xfe"}),
    ("passthrough-manifest-put-content-type-ff", "PUT", "/v2/plain/hostile/manifests/v1",
     manifest_body(), {"Content-Type": MT_MANIFEST.encode() + b"\xff"}),
    ("passthrough-upload-start-authorization-ff", "POST", "/v2/plain/hostile/blobs/uploads/", b"",
     {"Authorization": b"Basic \xff"}),
    ("base-junk-headers", "GET", "/v2/", b"",
     {"Authorization": b"Bearer \xff\x80", "X-Junk": b"\x80\xfe\xff", "Accept": b"*/*\xa0"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_non_utf8_header_is_answered_and_gateway_keeps_serving(stack, case):
    what, method, path, body, headers = case
    assert_serving(stack, "nothing yet")
    send(stack, what, method, path, body, headers)
    assert_serving(stack, what)


def test_non_utf8_content_range_on_an_encrypted_upload(stack):
    """A PATCH of a real upload session, its Content-Range ending in 0xFF."""
    r = requests.post(f"http://{stack.addr}/v2/demo/hostile-range/blobs/uploads/", timeout=30)
    assert r.status_code == 202, f"{r.status_code} {r.text[:300]}"
    loc = helpers.location_path(r.headers["Location"])
    data = os.urandom(2048)
    send(stack, "patch-content-range-ff", "PATCH", loc, data,
         {"Content-Type": "application/octet-stream", "Content-Range": b"0-\xff"})
    assert_serving(stack, "patch-content-range-ff")


def h2_request(addr: str, method: bytes, path: bytes, headers, body: bytes = b"",
               timeout: float = 30):
    """One HTTP/2 cleartext request (prior knowledge) whose pseudo-headers and headers are sent
    as the raw bytes given (the `h2` package's checks off). Returns (status or None, body,
    reset error code or None)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", method), (b":scheme", b"http"),
                            (b":authority", addr.encode()), (b":path", path), *headers],
                      end_stream=not body)
    if body:
        conn.send_data(sid, body, end_stream=True)  # within the default 64 KiB window
    sock.sendall(conn.data_to_send())
    status, data, reset = None, b"", None
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            events = conn.receive_data(chunk)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    reset = ev.error_code
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    reset = reset or ev.error_code
            sock.sendall(conn.data_to_send())
            if reset is not None or any(isinstance(ev, h2.events.StreamEnded)
                                        and ev.stream_id == sid for ev in events):
                break
    finally:
        sock.close()
    return status, data, reset


def test_h2_request_line_with_ff_never_lets_plaintext_through(stack):
    """Envoy's HTTP/1 codec refuses a request line holding 0xFF, but over HTTP/2 it forwards
    such a `:path` to the filter and on to the registry. A PATCH of an upload to an encrypted
    repository whose query holds 0xFF must be refused or encrypted: never stored as sent (a
    filter that read the undecodable `:path` as absent took the write for "not an upload")."""
    r = requests.post(f"http://{stack.addr}/v2/demo/hostile-h2/blobs/uploads/", timeout=30)
    assert r.status_code == 202, f"{r.status_code} {r.text[:300]}"
    loc = helpers.location_path(r.headers["Location"]).encode()
    marker = helpers.new_marker().encode()
    status, body, reset = h2_request(
        stack.addr, b"PATCH", loc + (b"&" if b"?" in loc else b"?") + b"junk=\xff",
        [(b"content-type", b"application/octet-stream")], marker * 16)
    assert status is not None or reset is not None, "no answer"
    if status is not None:
        assert_answered("h2-patch-query-ff", "PATCH", status, {}, body)
    hits = helpers.scan_for(stack.storage, [marker])
    assert not hits, f"plaintext stored: {hits}"
    assert_serving(stack, "h2-patch-query-ff")


@pytest.mark.clients
def test_every_hostile_header_again_then_a_push_still_encrypts(stack, tmp_path):
    """All of the above once more in a row, then the liveness probe that matters: a real push
    to an encrypted repository, stored encrypted, decrypting byte-identical."""
    for what, method, path, body, headers in CASES:
        send(stack, what, method, path, body, headers)
    assert_serving(stack, "every hostile request in a row")
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB,
                                marker=helpers.new_marker())
    repo = "demo/hostile-after"
    helpers.skopeo_push(image, f"{stack.addr}/{repo}:v1", extra=["--preserve-digests"])
    helpers.check_stored_encrypted_and_decrypts(stack, repo, image, tmp_path / "out",
                                                stack.keys["rsa"]["private"])
