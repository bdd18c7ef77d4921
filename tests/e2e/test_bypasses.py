"""Issue 11: every way found to get plaintext into an encrypted repository (`demo/**`), each
tried through the real Envoy and registry, over HTTP/1.1 and HTTP/2 (h2c with prior knowledge).

The assertions are on OUTCOMES, read from the registry directly (its API at
`stack.registry_addr` and its storage directory): what is linked, stored, tagged or served.
Where the filter refuses, the answer must be its own: `x-ocicrypt-filter: refused` and an OCI
error body `{"errors":[{"code":…,"message":…}]}`.

Findings (numbered as in the issue):
1. mounts the filter does not see (percent-encoded keys, form-encoded bodies, repeated keys,
   semicolons);
2. the sniffer deciding on a first short chunk, or taking a tar for ciphertext;
3. HTTP/2 request trailers skipping the manifest / digest checks;
4. layer media types outside the allowlist;
5. the ledger: deletes of ledger manifests, forged ledger manifests, unbounded lookups;
6. a lying registry pointing an upload at another repository or another host.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import tarfile
import time
import uuid
from typing import Dict, List, Optional, Sequence

import pytest

import helpers
from helpers import MIB, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, Answer, H2Client, sha256_digest

pytestmark = [pytest.mark.filter]

LEDGER_ARTIFACT_TYPE = "application/vnd.ocicrypt-filter.ledger.v1"
LEDGER_TAG_PREFIX = "ocicrypt.sha256-"


# --------------------------------------------------------------------------------------------
# helpers


def assert_filter_refusal(ans: Answer, status: int, codes: Sequence[str] = ()) -> None:
    """`ans` is the filter's own refusal: `status`, header `x-ocicrypt-filter: refused`, an OCI
    error body whose codes include one of `codes` (when given)."""
    assert ans.status == status, \
        f"expected the filter's {status} refusal, got {ans.status} {ans.headers} {ans.body[:500]!r}"
    assert ans.headers.get("x-ocicrypt-filter") == "refused", \
        f"{ans.status} is not the filter's refusal: headers {ans.headers}, body {ans.body[:300]!r}"
    try:
        doc = json.loads(ans.body)
    except ValueError as err:
        raise AssertionError(f"refusal without an OCI error body: {ans.body[:500]!r}") from err
    errors = doc.get("errors") if isinstance(doc, dict) else None
    assert isinstance(errors, list) and errors, f"not an OCI error body: {doc!r}"
    assert all(isinstance(e.get("code"), str) and isinstance(e.get("message"), str)
               for e in errors), f"OCI errors need a code and a message: {doc!r}"
    if codes:
        got = [e["code"] for e in errors]
        assert set(got) & set(codes), f"codes {got}, expected one of {list(codes)}: {doc!r}"


def tar_bytes(members: Sequence[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 1700000000
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def marker_tar_gz(marker: str, filler: int = 16 * 1024) -> bytes:
    """A tar.gz layer holding `marker`. Stored (level 0) deflate blocks keep the marker's bytes
    as they are, so a scan of the registry's storage finds it if the layer is stored in
    plaintext."""
    tar = tar_bytes([("etc/marker.txt", marker.encode() + b"\n"),
                     ("data/filler.bin", os.urandom(filler))])
    data = gzip.compress(tar, compresslevel=0, mtime=0)
    assert marker.encode() in data
    return data


def push_blob(reg: helpers.Registry, repo: str, data: bytes) -> str:
    """POST + monolithic PUT ?digest= through `reg`; returns the (client's) digest."""
    r = reg.upload_monolithic(repo, data)
    assert r.status_code == 201, f"push of a blob to {repo}: {r.status_code} {r.text[:500]}"
    return sha256_digest(data)


def config_blob(label: str) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "config": {"Labels": {"e2e.bypass": label}},
                       "rootfs": {"type": "layers", "diff_ids": []}},
                      separators=(",", ":")).encode()


def manifest_bytes(config: bytes, layers: List[dict], **extra) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
           "config": {"mediaType": MT_CONFIG, "digest": sha256_digest(config),
                      "size": len(config)},
           "layers": layers, **extra}
    return json.dumps(doc, separators=(",", ":")).encode()


def not_linked_problems(stack, repo: str, digests: Sequence[str]) -> List[str]:
    """What is wrong if any of `digests` is linked into, or served from, `repo`."""
    problems = []
    direct = stack.direct()
    links = helpers.repo_layer_links(stack.storage, repo)
    for d in digests:
        if d in links:
            problems.append(f"{d} is linked into {repo} (registry storage)")
        r = direct.request("HEAD", f"/v2/{repo}/blobs/{d}")
        if r.status_code != 404:
            problems.append(f"registry: HEAD {repo}@{d} answered {r.status_code}, not 404")
        r = direct.request("GET", f"/v2/{repo}/blobs/{d}")
        if r.status_code != 404:
            problems.append(f"registry: GET {repo}@{d} answered {r.status_code}, not 404")
    return problems


def marker_problems(stack, marker: str) -> List[str]:
    hits = helpers.scan_for(stack.storage, [marker.encode()])
    return [f"plaintext marker stored in {p}" for p, _ in hits]


def upload_location(ans: Answer) -> str:
    return helpers.location_path(ans.headers["location"])


def with_query(loc: str, query: str) -> str:
    return f"{loc}{'&' if '?' in loc else '?'}{query}"


def request(stack, proto: str, method: str, path: str, body: bytes = b"",
            headers: Optional[Dict[str, str]] = None) -> Answer:
    """One request to the gateway over HTTP/1.1 or HTTP/2 (h2c), the path sent byte for
    byte as given."""
    headers = dict(headers or {})
    if proto == "h2":
        if method in ("POST", "PUT", "PATCH"):
            headers.setdefault("content-length", str(len(body)))
        with H2Client(stack.addr) as c:
            return c.request(method, path, body, headers)
    # A raw socket: requests would re-quote the URL (`mo%75nt` becomes `mount`).
    status, hdrs, data = helpers.raw_request(stack.addr, method, path, body, headers)
    return Answer(status, hdrs, data)


# --------------------------------------------------------------------------------------------
# 1. mounts the filter does not see


@pytest.fixture(scope="module")
def plain_source(stack):
    """Two plaintext tar.gz layers (each with its marker) pushed to plain/bp-src
    (passthrough): the blobs an attacker tries to mount into demo/."""
    reg = stack.via_gateway()
    markers = [helpers.new_marker(), helpers.new_marker()]
    digests = [push_blob(reg, "plain/bp-src", marker_tar_gz(m)) for m in markers]
    for d in digests:
        assert stack.direct().blob_exists("plain/bp-src", d), "precondition: plain/bp-src has it"
    return {"repo": "plain/bp-src", "D": digests[0], "E": digests[1], "markers": markers}


#: Mount queries the registry (Go net/url) reads as `mount=<D>&from=<R>`.
ENCODED_MOUNTS = {
    "mo%75nt": "mo%75nt={D}&from={R}",
    "%6Dount": "%6Dount={D}&from={R}",
    "%6dount": "%6dount={D}&from={R}",
    "all-encoded": "%6D%6F%75%6E%74={D}&%66%72%6F%6D={R}",
}
#: Ambiguous mount queries: the filter may refuse them or make them a normal upload, but no
#: blob may be mounted (distribution takes the first of repeated keys; Go >= 1.17 drops a pair
#: holding `;`, older Go split on it).
AMBIGUOUS_MOUNTS = {
    "repeated": "mount={E}&mount={D}&from={R}",
    "repeated-reversed": "mount={D}&from={R}&mount={E}",
    "semicolon": "mount={D};from={R}",
    "encoded-from": "mount={D}&fr%6Fm={R}",
}


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("variant", list(ENCODED_MOUNTS))
def test_mount_with_percent_encoded_key_is_refused(stack, plain_source, variant, proto):
    """Finding 1: `POST /v2/demo/x/blobs/uploads/?mo%75nt=<D>&from=plain/y` (the registry
    decodes the key to `mount`) must not link the plaintext blob <D> into demo/x; the filter
    refuses the request (400)."""
    repo = f"demo/bp-mount-{re.sub('[^a-z0-9]', '', variant.lower())}-{proto}"
    query = ENCODED_MOUNTS[variant].format(D=plain_source["D"], R=plain_source["repo"])
    ans = request(stack, proto, "POST", f"/v2/{repo}/blobs/uploads/?{query}")
    problems = not_linked_problems(stack, repo, [plain_source["D"]])
    assert not problems, f"{ans.status} {ans.headers}: " + "; ".join(problems)
    assert ans.status != 201, f"mount honoured: {ans.status} {ans.headers}"
    assert_filter_refusal(ans, 400)


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_mount_in_form_encoded_body_is_refused(stack, plain_source, proto):
    """Finding 1: `mount=<D>&from=plain/y` as an application/x-www-form-urlencoded POST body
    (distribution's r.FormValue reads it, and prefers it over the query) must not link <D>
    into demo/x; the filter refuses (400)."""
    repo = f"demo/bp-mount-form-{proto}"
    body = f"mount={plain_source['D']}&from={plain_source['repo']}".encode()
    ans = request(stack, proto, "POST", f"/v2/{repo}/blobs/uploads/", body,
                  {"Content-Type": "application/x-www-form-urlencoded"})
    problems = not_linked_problems(stack, repo, [plain_source["D"]])
    assert not problems, f"{ans.status} {ans.headers}: " + "; ".join(problems)
    assert ans.status != 201, f"mount honoured: {ans.status} {ans.headers}"
    assert_filter_refusal(ans, 400)


def test_mount_in_form_body_beside_a_harmless_query_is_refused(stack, plain_source):
    """Finding 1: FormValue prefers the body: a query `mount=<digest the gateway knows
    nothing of>` beside a form body `mount=<D>&from=plain/y` must not mount <D>."""
    repo = "demo/bp-mount-form-query"
    unknown = "sha256:" + "3" * 64
    body = f"mount={plain_source['D']}&from={plain_source['repo']}".encode()
    ans = request(stack, "h1", "POST",
                  f"/v2/{repo}/blobs/uploads/?mount={unknown}&from={plain_source['repo']}",
                  body, {"Content-Type": "application/x-www-form-urlencoded"})
    problems = not_linked_problems(stack, repo, [plain_source["D"]])
    assert not problems, f"{ans.status} {ans.headers}: " + "; ".join(problems)
    assert_filter_refusal(ans, 400)


@pytest.mark.parametrize("variant", list(AMBIGUOUS_MOUNTS))
def test_ambiguous_mount_query_links_nothing(stack, plain_source, variant):
    """Finding 1: repeated `mount` keys, `;` separators and an encoded `from` key: neither
    plaintext blob ends up in demo/x; the answer is the filter's 400 or a normal upload
    (202 in demo/x), never a mount."""
    repo = f"demo/bp-mount-{variant}"
    query = AMBIGUOUS_MOUNTS[variant].format(D=plain_source["D"], E=plain_source["E"],
                                             R=plain_source["repo"])
    ans = request(stack, "h1", "POST", f"/v2/{repo}/blobs/uploads/?{query}")
    problems = not_linked_problems(stack, repo, [plain_source["D"], plain_source["E"]])
    assert not problems, f"{ans.status} {ans.headers}: " + "; ".join(problems)
    if ans.status == 202:
        assert f"/v2/{repo}/blobs/uploads/" in ans.headers.get("location", ""), ans.headers
    else:
        assert_filter_refusal(ans, 400)


def test_plain_mount_query_becomes_a_normal_upload(stack, plain_source):
    """Finding 1 (what keeps working): an unencoded `?mount=<D>&from=plain/y` is turned into a
    normal upload: 202 with a session in demo/x, nothing linked."""
    repo = "demo/bp-mount-plain"
    ans = request(stack, "h1", "POST",
                  f"/v2/{repo}/blobs/uploads/?mount={plain_source['D']}&from={plain_source['repo']}")
    problems = not_linked_problems(stack, repo, [plain_source["D"]])
    assert not problems, "; ".join(problems)
    assert ans.status == 202, f"{ans.status} {ans.body[:300]!r}"
    assert f"/v2/{repo}/blobs/uploads/" in ans.headers.get("location", ""), ans.headers


# --------------------------------------------------------------------------------------------
# 2. the sniffer


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_random_first_chunk_does_not_make_a_blob_passthrough(stack, proto):
    """Finding 2a: a chunked upload whose first PATCH is 40 random bytes and whose second
    PATCH is a tar.gz with a marker, finished with PUT ?digest=<plaintext digest>: the
    registry must not hold the plaintext digest in demo/x, and no marker is stored."""
    repo = f"demo/bp-split-{proto}"
    marker = helpers.new_marker()
    head, tail = os.urandom(40), marker_tar_gz(marker)
    digest = sha256_digest(head + tail)
    answers = []
    ans = request(stack, proto, "POST", f"/v2/{repo}/blobs/uploads/", b"")
    assert ans.status == 202, ans
    loc = upload_location(ans)
    offset = 0
    for part in (head, tail):
        ans = request(stack, proto, "PATCH", loc, part, {
            "content-type": "application/octet-stream",
            "content-range": f"{offset}-{offset + len(part) - 1}"})
        answers.append(f"PATCH {ans.status}")
        if ans.status != 202:
            break
        loc, offset = upload_location(ans), offset + len(part)
    else:
        ans = request(stack, proto, "PUT", with_query(loc, f"digest={digest}"), b"")
        answers.append(f"PUT {ans.status} {ans.headers.get('docker-content-digest')}")
    problems = not_linked_problems(stack, repo, [digest]) + marker_problems(stack, marker)
    assert not problems, f"answers {answers}: " + "; ".join(problems)
    if ans.status not in (201, 202):
        assert_filter_refusal(ans, ans.status)


def dribble_request(addr: str, method: str, path: str, body: bytes, piece: int,
                    headers: Dict[str, str]) -> Answer:
    """An HTTP/1.1 request whose body is written `piece` bytes at a time (TCP_NODELAY, a short
    pause between writes), so that Envoy hands the filter pieces that small."""
    import http.client
    import socket

    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = [f"{method} {path} HTTP/1.1", f"Host: {addr}", f"Content-Length: {len(body)}",
            "Connection: close"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    try:
        for i in range(0, len(body), piece):
            sock.sendall(body[i:i + piece])
            time.sleep(0.002)
    except OSError:
        pass  # answered early and closed
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    data = resp.read()
    sock.close()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)


@pytest.mark.parametrize("piece", [8, 31])
def test_pipeline_ciphertext_cannot_carry_plaintext_in_small_pieces(stack, piece):
    """Gateway-fuzzer finding (pipeline-tiny-pieces): under a rule that accepts pipeline
    ciphertext (demo/pipeline/**), a first PATCH of 1 KiB of random bytes, then a plaintext
    tar written 8 or 31 bytes at a time, was stored and committed verbatim (201): pieces
    under 32 bytes were never judged. Every 4 KiB window of such a blob is judged before it
    goes on now: the second PATCH is the filter's refusal, and no marker reaches storage."""
    repo = f"demo/pipeline/bp-dribble-{piece}"
    marker = helpers.new_marker()
    first = os.urandom(1024)
    while first.lstrip(b" \t\r\n\f\v")[:1] == b"{":  # opens like JSON: not ciphertext-like
        first = os.urandom(1024)
    tar = tar_bytes([("etc/secret.txt", marker.encode() + b"\n")])
    digest = sha256_digest(first + tar)
    ans = request(stack, "h1", "POST", f"/v2/{repo}/blobs/uploads/", b"")
    assert ans.status == 202, ans
    ans = request(stack, "h1", "PATCH", upload_location(ans), first,
                  {"content-type": "application/octet-stream"})
    assert ans.status == 202, f"random bytes under accept_encrypted: {ans}"
    ans = dribble_request(stack.addr, "PATCH", upload_location(ans), tar, piece,
                          {"content-type": "application/octet-stream"})
    problems = not_linked_problems(stack, repo, [digest]) + marker_problems(stack, marker)
    assert not problems, f"PATCH answered {ans.status}: " + "; ".join(problems)
    assert_filter_refusal(ans, 400, ["BLOB_UPLOAD_INVALID"])


def chi_square(data: bytes) -> float:
    counts = [0] * 256
    for b in data:
        counts[b] += 1
    expected = len(data) / 256
    return sum((c - expected) ** 2 / expected for c in counts)


def spaced_checksum_tar(marker: str) -> bytes:
    """A valid tar (Python's tarfile, GNU tar and Go's archive/tar read it) whose first header
    looks random: the name, linkname, uname, gname and prefix fields and the bytes past each
    numeric field's NUL are random, and the checksum field starts with a space (`" 123456\\0"`).
    Its first 512 bytes have a byte-value and neighbour-difference chi-square as low as
    random bytes have."""
    content = marker.encode() + b"\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("placeholder")
        info.size, info.mode, info.mtime = len(content), 0o644, 1700000000
        tar.addfile(info, io.BytesIO(content))
    data = bytearray(buf.getvalue())
    # Fill only with byte values the fixed fields do not use, so the histogram stays flat.
    fixed = set(b"01234567 ustar\x00/")
    alphabet = bytes(b for b in range(256) if b not in fixed)
    size_field = b"%o\x00" % len(content)

    def rand(n: int) -> bytes:
        return bytes(alphabet[b % len(alphabet)] for b in os.urandom(n))

    for _ in range(200):
        h = bytearray(data[:512])
        h[0:100] = b"x" + rand(99)                                   # name (no NUL: 100 bytes)
        h[100:108] = b"644\x00" + rand(4)                            # mode
        h[108:116] = b"1\x00" + rand(6)                              # uid
        h[116:124] = b"2\x00" + rand(6)                              # gid
        h[124:136] = size_field + rand(12 - len(size_field))         # size
        h[136:148] = b"14525453400\x00"                              # mtime
        h[156:157] = b"0"                                            # typeflag: regular file
        h[157:257] = rand(100)                                       # linkname
        # 257:265 magic "ustar\0" and version "00" stay
        h[265:297] = rand(32)                                        # uname
        h[297:329] = rand(32)                                        # gname
        h[329:337] = b"0\x00" + rand(6)                              # devmajor
        h[337:345] = b"0\x00" + rand(6)                              # devminor
        h[345:500] = rand(155)                                       # prefix
        h[500:512] = rand(12)                                        # padding
        h[148:156] = b" " * 8
        h[148:156] = b" %06o\x00" % sum(h)                           # checksum, leading space
        diffs = bytes((h[i + 1] - h[i]) & 0xFF for i in range(511))
        if chi_square(bytes(h)) < 340 and chi_square(diffs) < 340:
            data[:512] = h
            return bytes(data)
    raise AssertionError("could not make a random-looking tar header")


def test_spaced_checksum_tar_is_checked_by_real_readers(tmp_path):
    """Finding 2b (the input is what it claims): the crafted tar is read by Python's tarfile
    and GNU tar, and its first header's checksum field starts with a space."""
    marker = helpers.new_marker()
    data = spaced_checksum_tar(marker)
    assert data[148:149] == b" "
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        assert len(members) == 1 and members[0].isfile()
        assert tar.extractfile(members[0]).read() == marker.encode() + b"\n"
    path = tmp_path / "crafted.tar"
    path.write_bytes(data)
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip(), "GNU tar listed no member"
    out = subprocess.run(["tar", "-xOf", str(path)], capture_output=True)
    assert out.returncode == 0 and out.stdout == marker.encode() + b"\n", out.stderr


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_tar_with_spaced_checksum_is_not_stored_in_plaintext(stack, proto):
    """Finding 2b: a valid tar whose first header's checksum starts with a space and whose
    name fields are random bytes, pushed monolithically (PUT ?digest=), is not stored as
    plaintext: the digest is not linked in demo/x and no marker is in storage."""
    repo = f"demo/bp-tar-{proto}"
    marker = helpers.new_marker()
    data = spaced_checksum_tar(marker)
    digest = sha256_digest(data)
    start = request(stack, proto, "POST", f"/v2/{repo}/blobs/uploads/")
    assert start.status == 202, start
    ans = request(stack, proto, "PUT", with_query(upload_location(start), f"digest={digest}"),
                  data, {"Content-Type": "application/octet-stream"})
    problems = not_linked_problems(stack, repo, [digest]) + marker_problems(stack, marker)
    assert not problems, f"PUT answered {ans.status}: " + "; ".join(problems)
    if ans.status != 201:
        assert_filter_refusal(ans, ans.status)


# --------------------------------------------------------------------------------------------
# 3. HTTP/2 request trailers

TRAILERS = {"x-e2e-trailer": "end"}


@pytest.fixture(scope="module")
def h2_base(stack, tmp_path_factory):
    """A small image pushed (HTTP/1.1) to demo/bp-h2tr: its stored (encrypted) manifest names
    ciphertext blobs that are linked in the repository."""
    image = helpers.build_image(tmp_path_factory.mktemp("h2tr") / "layout", "v1", 256 * 1024,
                                marker=helpers.new_marker())
    reg = stack.via_gateway()
    for blob in [image.config, *image.layers]:
        push_blob(reg, "demo/bp-h2tr", blob.path.read_bytes())
    r = reg.put_manifest("demo/bp-h2tr", "v1", image.manifest_bytes)
    assert r.status_code == 201, r.text
    stored = stack.direct().get_manifest("demo/bp-h2tr", "v1")
    assert stored.status_code == 200
    return {"repo": "demo/bp-h2tr", "image": image, "stored": stored.json()}


def plaintext_manifest_problems(stack, repo: str, tag: str, plaintext: Sequence[str]) -> List[str]:
    """What is wrong if `repo:tag` is stored naming a layer that is not encrypted."""
    r = stack.direct().get_manifest(repo, tag)
    if r.status_code == 404:
        return []
    if r.status_code != 200:
        return [f"registry: GET {repo}:{tag} answered {r.status_code}"]
    problems = []
    for layer in r.json().get("layers", []):
        ann = layer.get("annotations") or {}
        if not layer.get("mediaType", "").endswith("+encrypted") \
                or helpers.ANN_KEYS_JWE not in ann or helpers.ANN_PUBOPTS not in ann:
            problems.append(f"{repo}:{tag} is stored naming an unencrypted layer: {layer}")
        if layer.get("digest") in plaintext:
            problems.append(f"{repo}:{tag} names the plaintext digest {layer['digest']}")
    return problems


def test_h2_manifest_with_trailers_is_not_stored_unrewritten(stack, h2_base):
    """Finding 3a: over HTTP/2, `PUT /v2/demo/x/manifests/v1` naming a layer as plain
    `tar+gzip`, sent with request trailers: no manifest naming an unencrypted layer is
    stored (registry GET of the tag: 404 or an encrypted manifest)."""
    repo, image, stored = h2_base["repo"], h2_base["image"], h2_base["stored"]
    cipher = stored["layers"][1]
    body = manifest_bytes(image.config.path.read_bytes(),
                          [{"mediaType": MT_LAYER_GZIP, "digest": cipher["digest"],
                            "size": cipher["size"]}])
    with H2Client(stack.addr) as c:
        ans = c.request("PUT", f"/v2/{repo}/manifests/trailers-a", body,
                        {"content-type": MT_MANIFEST, "content-length": str(len(body))},
                        trailers=TRAILERS)
    problems = plaintext_manifest_problems(stack, repo, "trailers-a", image.layer_digests)
    assert not problems, f"answer {ans.status} {ans.body[:300]!r}: " + "; ".join(problems)
    assert ans.status != 201, f"manifest accepted: {ans}"
    assert_filter_refusal(ans, 400)


def test_h2_manifest_by_wrong_digest_with_trailers_forges_no_ledger_tag(stack, h2_base):
    """Finding 3b: over HTTP/2, `PUT /v2/demo/x/manifests/sha256:<X>` with a body that does
    not hash to X, sent with request trailers: no tag `ocicrypt.sha256-<X>` in demo/x."""
    repo, stored = h2_base["repo"], h2_base["stored"]
    body = json.dumps(dict(stored, annotations={"e2e.forged": uuid.uuid4().hex}),
                      separators=(",", ":")).encode()
    x = sha256_digest(os.urandom(32))
    assert x != sha256_digest(body)
    with H2Client(stack.addr) as c:
        ans = c.request("PUT", f"/v2/{repo}/manifests/{x}", body,
                        {"content-type": MT_MANIFEST, "content-length": str(len(body))},
                        trailers=TRAILERS)
    tag = LEDGER_TAG_PREFIX + x.split(":", 1)[1]
    problems = []
    if tag in helpers.tags(stack.direct(), repo):
        problems.append(f"tag {tag} exists in {repo}")
    r = stack.direct().get_manifest(repo, tag)
    if r.status_code != 404:
        problems.append(f"registry: GET {repo}:{tag} answered {r.status_code}")
    assert not problems, f"answer {ans.status} {ans.body[:300]!r}: " + "; ".join(problems)
    assert_filter_refusal(ans, 400)


@pytest.mark.parametrize("trailers_after", [0.0, 2.0], ids=["trailers-at-once", "trailers-late"])
def test_h2_monolithic_blob_with_trailers_stores_no_plaintext(stack, trailers_after):
    """Finding 3c: over HTTP/2, a monolithic blob `PUT ?digest=` (a tar with a marker) sent
    with request trailers stores nothing in plaintext: the digest is not linked in demo/x and
    no marker is in storage. Sent late, the trailers come after the registry has answered the
    body (it took the declared length): the gateway still refuses, the session is gone."""
    repo = f"demo/bp-h2tr-blob-{int(trailers_after)}"
    marker = helpers.new_marker()
    data = tar_bytes([("etc/marker.txt", marker.encode() + b"\n"),
                      ("data/filler.bin", os.urandom(300 * 1024))])
    digest = sha256_digest(data)
    with H2Client(stack.addr) as c:
        start = c.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert start.status == 202, start
        ans = c.request("PUT", with_query(upload_location(start), f"digest={digest}"), data,
                        {"content-type": "application/octet-stream",
                         "content-length": str(len(data))}, trailers=TRAILERS,
                        trailers_after=trailers_after)
    problems = not_linked_problems(stack, repo, [digest]) + marker_problems(stack, marker)
    assert not problems, f"PUT answered {ans.status}: " + "; ".join(problems)
    if ans.status != 201:
        assert_filter_refusal(ans, 400)
    if trailers_after:
        # Refused after the registry took the bytes: the session is deleted there (the
        # registry knows no upload of that id: 404, where a live one at another offset is 400).
        session = stack.direct().request("GET", upload_location(start))
        assert session.status_code == 404, (session.status_code, session.text[:300])


def h2_push(addr: str, repo: str, image: helpers.Image, chunk: int = 256 * 1024) -> None:
    """Push `image` over one HTTP/2 connection: per blob POST, PATCHes (Content-Range),
    PUT ?digest=; then the manifest by tag."""
    with H2Client(addr) as c:
        for blob in [image.config, *image.layers]:
            data = blob.path.read_bytes()
            a = c.request("POST", f"/v2/{repo}/blobs/uploads/")
            assert a.status == 202, a
            loc = upload_location(a)
            for start in range(0, len(data), chunk):
                part = data[start:start + chunk]
                a = c.request("PATCH", loc, part, {
                    "content-type": "application/octet-stream",
                    "content-length": str(len(part)),
                    "content-range": f"{start}-{start + len(part) - 1}"})
                assert a.status == 202, a
                loc = upload_location(a)
            a = c.request("PUT", with_query(loc, f"digest={blob.digest}"))
            assert a.status == 201, a
            assert a.headers["docker-content-digest"] == blob.digest
        a = c.request("PUT", f"/v2/{repo}/manifests/{image.tag}", image.manifest_bytes,
                      {"content-type": MT_MANIFEST,
                       "content-length": str(len(image.manifest_bytes))})
        assert a.status == 201, a


def test_h2_push_is_encrypted_end_to_end(stack, tmp_path):
    """Finding 3 (what keeps working): a normal push over HTTP/2 (POST, PATCH, PUT ?digest=,
    manifest PUT, no trailers) succeeds, stores ciphertext and decrypts (skopeo) to the
    original image; no marker in storage."""
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * MIB, marker=helpers.new_marker())
    h2_push(stack.addr, "demo/bp-h2-push", image)
    helpers.check_stored_encrypted_and_decrypts(stack, "demo/bp-h2-push", image, tmp_path / "out",
                                                stack.keys["rsa"]["private"])


# --------------------------------------------------------------------------------------------
# 4. layer media types


@pytest.fixture(scope="module")
def mt_repo(stack):
    """demo/bp-mt with a config, a tar.gz layer and a random-looking blob pushed through the
    gateway (each encrypted, or taken for ciphertext by an older sniffer)."""
    reg = stack.via_gateway()
    repo = "demo/bp-mt"
    config = config_blob("media-types")
    push_blob(reg, repo, config)
    layer = marker_tar_gz(helpers.new_marker())
    random_blob = os.urandom(8192)
    return {"repo": repo, "config": config,
            "blobs": {"layer": (push_blob(reg, repo, layer), len(layer)),
                      "random": (push_blob(reg, repo, random_blob), len(random_blob))}}


REFUSED_LAYER_TYPES = [
    "application/vnd.oci.image.layer.v1.tar+gzip ",
    "APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR+GZIP",
    "application/octet-stream",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
]


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("kind", ["layer", "random"])
@pytest.mark.parametrize("media_type", REFUSED_LAYER_TYPES,
                         ids=["trailing-space", "upper-case", "octet-stream", "docker-foreign",
                              "oci-nondistributable", "encrypted-without-annotations"])
def test_layer_media_type_outside_the_allowlist_is_refused(stack, mt_repo, media_type, kind,
                                                           proto):
    """Finding 4: a manifest naming a blob pushed through the gateway (a tar.gz layer, or
    random-looking bytes) under a media type outside the exact allowlist is refused by the
    filter (400 MANIFEST_INVALID) and the tag does not exist in the registry."""
    repo = mt_repo["repo"]
    digest, size = mt_repo["blobs"][kind]
    tag = f"mt{REFUSED_LAYER_TYPES.index(media_type)}-{kind}-{proto}"
    body = manifest_bytes(mt_repo["config"], [{"mediaType": media_type, "digest": digest,
                                               "size": size}])
    ans = request(stack, proto, "PUT", f"/v2/{repo}/manifests/{tag}", body,
                  {"content-type": MT_MANIFEST})
    stored = stack.direct().get_manifest(repo, tag)
    assert stored.status_code == 404, \
        f"{repo}:{tag} stored ({ans.status} from the gateway): {stored.text[:500]}"
    assert_filter_refusal(ans, 400, ["MANIFEST_INVALID"])


# --------------------------------------------------------------------------------------------
# 5. the ledger (a stack with replicas.state_key keeps it in the registry)


def ledger_tags(stack, repo: str) -> List[str]:
    return sorted(t for t in helpers.tags(stack.direct(), repo) if t.startswith("ocicrypt."))


def pushed_with_ledger_entry(stack, repo: str) -> dict:
    """Pushes a tar.gz layer through the gateway; returns its plaintext digest, its ledger
    tag, the ledger manifest's body and digest (read from the registry)."""
    d = push_blob(stack.via_gateway(), repo, marker_tar_gz(helpers.new_marker()))
    tag = LEDGER_TAG_PREFIX + d.split(":", 1)[1]
    assert tag in helpers.tags(stack.direct(), repo), \
        f"precondition: the gateway wrote ledger tag {tag}: {helpers.tags(stack.direct(), repo)}"
    r = stack.direct().get_manifest(repo, tag)
    assert r.status_code == 200, r.text
    assert r.json().get("artifactType") == LEDGER_ARTIFACT_TYPE, r.text
    return {"digest": d, "tag": tag, "body": r.content,
            "manifest_digest": r.headers["Docker-Content-Digest"]}


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_delete_of_ledger_manifest_by_digest_is_refused(ledger_stack, proto):
    """Finding 5a: `DELETE /v2/demo/x/manifests/<digest of a ledger manifest>` is refused by
    the filter (403) and the ledger tag still exists in the registry."""
    repo = f"demo/bp-ledger-del-{proto}"
    entry = pushed_with_ledger_entry(ledger_stack, repo)
    ans = request(ledger_stack, proto, "DELETE", f"/v2/{repo}/manifests/{entry['manifest_digest']}")
    problems = []
    if entry["tag"] not in helpers.tags(ledger_stack.direct(), repo):
        problems.append(f"ledger tag {entry['tag']} is gone")
    r = ledger_stack.direct().get_manifest(repo, entry["tag"])
    if r.status_code != 200:
        problems.append(f"registry: GET {repo}:{entry['tag']} answered {r.status_code}")
    assert not problems, f"DELETE answered {ans.status}: " + "; ".join(problems)
    assert_filter_refusal(ans, 403, ["DENIED"])


def test_manifest_by_digest_with_ledger_artifact_type_is_no_ledger_entry(ledger_stack):
    """Finding 5b: a manifest pushed BY DIGEST with the ledger's artifactType, naming a
    plaintext blob as its layer, is refused (no new `ocicrypt.` tag); and even had it been
    stored, after a gateway restart a HEAD of its digest through the gateway is not 200."""
    s = ledger_stack
    repo = "demo/bp-ledger-forge"
    real = pushed_with_ledger_entry(s, repo)
    # A plaintext blob linked in the repository: JSON passes unencrypted.
    plaintext = json.dumps({"e2e.forged": uuid.uuid4().hex}).encode()
    p = push_blob(s.via_gateway(), repo, plaintext)
    assert s.direct().blob_exists(repo, p), "precondition: the JSON blob is stored as it is"
    forged = json.loads(real["body"])
    forged["layers"][0]["digest"] = p
    forged["layers"][0]["size"] = len(plaintext)
    body = json.dumps(forged, separators=(",", ":")).encode()
    m = sha256_digest(body)
    before = ledger_tags(s, repo)
    ans = Answer.of(s.via_gateway().put_manifest(repo, m, body))
    after = ledger_tags(s, repo)
    s.gw.stop()
    s.gw.start()
    head = s.via_gateway().request("HEAD", f"/v2/{repo}/blobs/{m}")
    problems = []
    if set(after) - set(before):
        problems.append(f"new ledger tags {sorted(set(after) - set(before))}")
    if head.status_code == 200:
        problems.append(f"after a restart the gateway answers HEAD {m} with 200 "
                        f"({dict(head.headers)})")
    if ans.status < 400:
        problems.append(f"the forged ledger manifest was accepted: {ans.status}")
    assert not problems, "; ".join(problems)
    assert_filter_refusal(ans, ans.status)
    assert 400 <= ans.status < 500, ans


def registry_log_lines(path, offset: int) -> List[str]:
    time.sleep(0.3)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def test_ledger_lookups_per_manifest_are_bounded(ledger_stack):
    """Finding 5c: a manifest naming 500 digests the gateway does not know is refused without
    the gateway making more than 128 ledger lookups in the registry (counted in the
    registry's access log: every GET/HEAD while the PUT is handled)."""
    s = ledger_stack
    repo = "demo/bp-ledger-flood"
    config = config_blob("flood")
    push_blob(s.via_gateway(), repo, config)
    layers = [{"mediaType": MT_LAYER_GZIP, "digest": sha256_digest(os.urandom(16)),
               "size": 1024} for _ in range(500)]
    body = manifest_bytes(config, layers)
    log = s.opts.state_dir / "registry.log"
    offset = log.stat().st_size
    ans = Answer.of(s.via_gateway().put_manifest(repo, "v1", body))
    lines = registry_log_lines(log, offset)
    # Every read the registry logged while the PUT was handled (nothing else runs on this
    # stack meanwhile), wherever the ledger is kept: ledger tags, other repositories, blobs.
    pattern = re.compile(r'"(?:GET|HEAD) /v2/[^ "]+ HTTP/')
    lookups = sum(1 for line in lines if pattern.search(line))
    assert s.direct().get_manifest(repo, "v1").status_code == 404
    assert lookups <= 128, f"{lookups} ledger lookups in the registry for one manifest " \
        f"(answer {ans.status} {ans.body[:200]!r})"
    assert 400 <= ans.status < 500, ans
    assert_filter_refusal(ans, ans.status)


# --------------------------------------------------------------------------------------------
# 6. a lying registry


def h2_blob_push(stack, repo: str, image: helpers.Image) -> List[Answer]:
    """The blob uploads of `image` over HTTP/2 (h2c) through the gateway, each as POST then a
    PATCH to the answered Location (followed only on the gateway: h2c cannot go elsewhere).
    Returns the answers to the blob POSTs."""
    starts = []
    for blob in [image.config, *image.layers]:
        data = blob.path.read_bytes()
        ans = request(stack, "h2", "POST", f"/v2/{repo}/blobs/uploads/", b"")
        starts.append(ans)
        if ans.status != 202:
            continue
        loc = upload_location(ans)
        ans = request(stack, "h2", "PATCH", loc, data, {
            "content-type": "application/octet-stream",
            "content-range": f"0-{len(data) - 1}"})
        if ans.status == 202:
            request(stack, "h2", "PUT", with_query(upload_location(ans), f"digest={blob.digest}"),
                    b"")
    return starts


def requests_push(stack, repo: str, image: helpers.Image, chunk: int = 256 * 1024) -> List[Answer]:
    """A chunked push driven with requests, following whatever `Location` the gateway gives
    (as clients do, even to another host). Returns the answers to the blob POSTs."""
    reg = stack.via_gateway()
    starts = []
    for blob in [image.config, *image.layers]:
        data = blob.path.read_bytes()
        r = reg.start_upload(repo)
        starts.append(Answer.of(r))
        if r.status_code != 202:
            continue
        loc = r.headers["Location"]
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            r = reg.request("PATCH", loc, data=part, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(part) - 1}"})
            if r.status_code != 202:
                break
            loc = r.headers["Location"]
        else:
            reg.request("PUT", loc, params={"digest": blob.digest},
                        headers={"Content-Length": "0"})
    reg.put_manifest(repo, image.tag, image.manifest_bytes)
    return starts


@pytest.mark.parametrize("client", ["requests", "skopeo", "h2"])
@pytest.mark.parametrize("mode", ["other-repo", "other-host"])
def test_lying_registry_location_is_refused(lying_stack, tmp_path, mode, client):
    """Finding 6: the registry answers `POST /v2/demo/x/blobs/uploads/` with a `Location` in
    plain/x (a session it opened there) or on another host. The push of an image with a
    marker layer fails with the filter's 502 OCI error; afterwards no marker is in storage,
    nothing is linked in plain/x, and the registry side saw no request body with plaintext."""
    s = lying_stack
    tag = f"{mode}-{client}"
    repo, other = f"demo/bp-lie-{tag}", f"plain/bp-lie-{tag}"
    image = helpers.build_image(tmp_path / "layout", "v1", 512 * 1024, marker=helpers.new_marker())
    s.proxy.lie(mode, about=repo, other_repo=other, needles=[image.marker.encode()])
    refused0 = helpers.envoy_stats(s.opts.admin_addr).get("ocicrypt_refusals_bad_gateway", 0)
    try:
        if client == "requests":
            starts = requests_push(s, repo, image)
            proc = None
        elif client == "h2":
            starts = h2_blob_push(s, repo, image)
            proc = None
        else:
            starts = []
            proc = helpers.skopeo_push(image, f"{s.addr}/{repo}:v1",
                                       extra=["--preserve-digests"], check=False)
    finally:
        s.proxy.honest()
    assert s.proxy.lies, "the lying registry was never asked to start an upload"
    problems = marker_problems(s, image.marker)
    if helpers.repo_layer_links(s.storage, other):
        problems.append(f"{other} has blobs linked: {helpers.repo_layer_links(s.storage, other)}")
    problems += not_linked_problems(s, repo, image.layer_digests)
    for seen, needle in s.proxy.hits:
        problems.append(f"the registry side ({seen.listener}) got plaintext in "
                        f"{seen.method} {seen.path[:120]}")
    if proc is not None and proc.returncode == 0:
        problems.append("skopeo push succeeded")
    assert not problems, "; ".join(problems)
    for ans in starts:
        assert_filter_refusal(ans, 502)
    if proc is not None:
        assert "502" in proc.stderr or "Bad Gateway" in proc.stderr, proc.stderr[-1500:]
    # Counted apart from the gateway's own 500s (both go out as UNKNOWN).
    refused = helpers.envoy_stats(s.opts.admin_addr).get("ocicrypt_refusals_bad_gateway", 0)
    if proc is None:
        assert refused - refused0 == len(starts), (refused0, refused, len(starts))
    else:
        assert refused - refused0 >= 1, (refused0, refused)
