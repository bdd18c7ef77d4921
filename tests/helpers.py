"""Helpers of the end-to-end suite: OCI image layouts built in Python, registry API calls,
client wrappers (skopeo, ctr, oras) and the independent decryption oracle (skopeo)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import urllib.parse
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import requests

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ANN_PUBOPTS = "org.opencontainers.image.enc.pubopts"
ANN_KEYS_JWE = "org.opencontainers.image.enc.keys.jwe"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_ACCEPT = ", ".join(
    [MT_MANIFEST, MT_INDEX, MT_DOCKER_MANIFEST,
     "application/vnd.docker.distribution.manifest.list.v2+json"]
)
MIB = 1024 * 1024
#: Seconds a client command (skopeo, ctr) may take. Pushes here take seconds; a client that
#: hangs (ctr 1.6 does when a manifest PUT is answered before its body was read) fails the
#: test after this long instead of stalling the suite.
CLIENT_TIMEOUT = float(os.environ.get("E2E_CLIENT_TIMEOUT", "180"))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def free_ports(n: int) -> List[int]:
    """n distinct loopback TCP ports nobody listens on right now (the kernel's picks)."""
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def new_marker() -> str:
    """A unique ASCII string to plant in a layer and look for in the registry's storage."""
    return f"OCICRYPT-E2E-MARKER-{uuid.uuid4().hex}-PLAINTEXT"


# --------------------------------------------------------------------------------------------
# images


@dataclass
class Blob:
    media_type: str
    digest: str
    size: int
    path: Path

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Image:
    """An OCI image layout on disk, with what the tests need to know about it."""

    layout: Path
    tag: str
    config: Blob
    layers: List[Blob]
    diff_ids: List[str]
    manifest_bytes: bytes
    manifest_digest: str
    marker: Optional[str] = None

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_bytes)

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def layer_digests(self) -> List[str]:
        return [layer.digest for layer in self.layers]

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    def oci_archive(self, dest: Path) -> Path:
        """A tar of the layout (what `ctr images import` takes)."""
        with tarfile.open(dest, "w") as tar:
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(self.layout / name, arcname=name)
        return dest


def _write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Blob(media_type, digest, len(data), path)


def _tar_bytes(members: Sequence[Tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def build_image(
    layout: Path,
    tag: str = "v1",
    big_layer_bytes: int = 64 * MIB,
    marker: Optional[str] = None,
) -> Image:
    """Write an OCI image layout: layer 0 an uncompressed tar holding `big_layer_bytes` of random
    data (and, when given, a file whose content is `marker`), layer 1 a tiny gzip tar, and a
    config whose rootfs.diff_ids are right."""
    if layout.exists():
        shutil.rmtree(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    unique = uuid.uuid4().hex

    members: List[Tuple[str, bytes]] = [("data/random.bin", os.urandom(big_layer_bytes))]
    if marker is not None:
        members.append(("etc/marker.txt", marker.encode("ascii") + b"\n"))
    big_tar = _write_blob(layout, _tar_bytes(members), MT_LAYER_TAR)
    del members

    small_tar = _tar_bytes([("etc/hello.txt", f"hello {unique}\n".encode())])
    small_gz = gzip.compress(small_tar, mtime=0)
    small = _write_blob(layout, small_gz, MT_LAYER_GZIP)
    diff_ids = [big_tar.digest, sha256_digest(small_tar)]

    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"],
                   "Labels": {"e2e.unique": unique}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "e2e big layer"},
                    {"created": "2024-01-01T00:00:00Z", "created_by": "e2e small layer"}],
    }
    cfg = _write_blob(layout, json.dumps(config, separators=(",", ":")).encode(), MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": cfg.descriptor(),
        "layers": [big_tar.descriptor(), small.descriptor()],
    }
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    mblob = _write_blob(layout, mbytes, MT_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [dict(mblob.descriptor(), platform={"architecture": "amd64", "os": "linux"},
                           annotations={ANN_REF_NAME: tag})],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return Image(layout, tag, cfg, [big_tar, small], diff_ids, mbytes, mblob.digest, marker)


def read_layout(layout: Path, tag: Optional[str] = None) -> Tuple[dict, bytes, str]:
    """(manifest, manifest bytes, manifest digest) of `tag` (or the only image) in a layout."""
    index = json.loads((layout / "index.json").read_text())
    descs = index["manifests"]
    if tag is not None:
        descs = [d for d in descs if d.get("annotations", {}).get(ANN_REF_NAME) == tag]
    assert len(descs) == 1, f"expected one manifest for {tag!r} in {layout}: {index}"
    digest = descs[0]["digest"]
    data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    return json.loads(data), data, digest


# --------------------------------------------------------------------------------------------
# registry API


class BearerAuth(requests.auth.AuthBase):
    """Registry bearer-token auth for requests, as clients do it: a request is sent with the
    token last granted for its repository (none at first); a `401` with a `Bearer` challenge
    gets a token from the challenge's realm for its scope (HTTP basic `creds`), and the request
    is sent once more with it. `tokens` maps repository -> token (tests may age or swap them);
    `granted` lists every token response."""

    REPO = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")

    def __init__(self, creds: Optional[Tuple[str, str]]):
        self.creds = creds
        self.tokens: Dict[str, str] = {}
        self.granted: List[dict] = []

    @staticmethod
    def challenge(header: str) -> Dict[str, str]:
        """The parameters of a `Bearer realm="…",service="…",scope="…"` challenge."""
        kind, _, rest = header.partition(" ")
        if kind.lower() != "bearer":
            return {}
        return dict(re.findall(r'([a-z_]+)="([^"]*)"', rest))

    def fetch(self, params: Dict[str, str]) -> str:
        query = {"service": params.get("service", "")}
        if params.get("scope"):
            query["scope"] = params["scope"]
        r = requests.get(params["realm"], params=query, auth=self.creds, timeout=30)
        assert r.status_code == 200, f"token for {query}: {r.status_code} {r.text[:300]}"
        self.granted.append(r.json())
        return r.json()["token"]

    def _repo(self, url: str) -> Optional[str]:
        m = self.REPO.match(urllib.parse.urlsplit(url).path)
        return m.group(1) if m else None

    def __call__(self, r):
        repo = self._repo(r.url)
        if repo in self.tokens:
            r.headers["Authorization"] = f"Bearer {self.tokens[repo]}"
        r.register_hook("response", self._on_response)
        return r

    def _on_response(self, resp, **kw):
        params = self.challenge(resp.headers.get("WWW-Authenticate", ""))
        if resp.status_code != 401 or "realm" not in params or \
                getattr(resp.request, "_bearer_retried", False):
            return resp
        token = self.fetch(params)
        repo = self._repo(resp.request.url)
        if repo:
            self.tokens[repo] = token
        resp.content  # noqa: B018 - read the 401 so the connection can be reused
        prep = resp.request.copy()
        prep.headers["Authorization"] = f"Bearer {token}"
        prep._bearer_retried = True
        again = resp.connection.send(prep, **kw)
        again.history.append(resp)
        again.request = prep
        return again


class Registry:
    """Minimal distribution API client (requests) for assertions and raw pushes. `auth`: HTTP
    basic credentials, or any requests auth (e.g. BearerAuth)."""

    def __init__(self, base_url: str, auth=None):
        self.base = base_url.rstrip("/")
        self.s = requests.Session()
        if auth:
            self.s.auth = auth

    def url(self, path: str) -> str:
        if path.startswith("http://") or path.startswith("https://"):
            return path
        return self.base + path

    def request(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        kw.setdefault("allow_redirects", False)
        return self.s.request(method, self.url(path), **kw)

    def get_manifest(self, repo: str, ref: str) -> requests.Response:
        return self.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})

    def blob_exists(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        assert r.status_code in (200, 404), f"HEAD blob {repo}@{digest}: {r.status_code}"
        return r.status_code == 200

    def get_blob(self, repo: str, digest: str) -> bytes:
        r = self.request("GET", f"/v2/{repo}/blobs/{digest}", allow_redirects=True)
        assert r.status_code == 200, f"GET blob {repo}@{digest}: {r.status_code} {r.text[:300]}"
        return r.content

    def start_upload(self, repo: str, params: Optional[dict] = None) -> requests.Response:
        return self.request("POST", f"/v2/{repo}/blobs/uploads/", params=params,
                            headers={"Content-Length": "0"})

    def upload_monolithic(self, repo: str, data: bytes, digest: Optional[str] = None) -> requests.Response:
        """POST then one PUT ?digest= carrying the whole blob (containerd's way)."""
        r = self.start_upload(repo)
        assert r.status_code == 202, f"POST upload {repo}: {r.status_code} {r.text[:300]}"
        return self.request("PUT", r.headers["Location"],
                            params={"digest": digest or sha256_digest(data)}, data=data,
                            headers={"Content-Type": "application/octet-stream"})

    def upload_chunked(self, repo: str, data: bytes, digest: Optional[str] = None,
                       chunk: int = 16 * MIB, refused_patch_at: Optional[int] = None,
                       refused_how: str = "content-type") -> requests.Response:
        """POST, PATCHes with Content-Range, then an empty PUT ?digest= (oras's way).
        refused_patch_at=i: before chunk i, send a PATCH that the registry refuses:
        refused_how="content-type": other bytes with Content-Type text/plain (distribution 2.8
        takes only application/octet-stream: 500; it does not check Content-Range);
        refused_how="no-auth": the same chunk without credentials (401), as oras-py does before
        every request when the registry wants basic auth; refused_how="no-auth-put": the final
        PUT is first sent without credentials (401), then with them."""
        r = self.start_upload(repo)
        assert r.status_code == 202, f"POST upload {repo}: {r.status_code} {r.text[:300]}"
        loc = r.headers["Location"]
        for i, start in enumerate(range(0, len(data), chunk)):
            part = data[start:start + chunk]
            if i == refused_patch_at:
                rng = f"{start}-{start + len(part) - 1}"
                if refused_how == "no-auth":
                    bad = requests.request("PATCH", self.url(loc), data=part, timeout=120,
                                           allow_redirects=False, headers={
                                               "Content-Type": "application/octet-stream",
                                               "Content-Range": rng})
                else:
                    bad = self.request("PATCH", loc, data=os.urandom(len(part)), headers={
                        "Content-Type": "text/plain", "Content-Range": rng})
                assert bad.status_code >= 400, f"bad PATCH: {bad.status_code} {bad.text[:300]}"
            r = self.request("PATCH", loc, data=part, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(part) - 1}",
            })
            assert r.status_code == 202, f"PATCH {repo}: {r.status_code} {r.text[:300]}"
            loc = r.headers["Location"]
        params = {"digest": digest or sha256_digest(data)}
        if refused_how == "no-auth-put":
            bad = requests.request("PUT", self.url(loc), params=params, timeout=120,
                                   allow_redirects=False, headers={"Content-Length": "0"})
            assert bad.status_code == 401, f"PUT without credentials: {bad.status_code} {bad.text}"
        return self.request("PUT", loc, params=params, headers={"Content-Length": "0"})

    def put_manifest(self, repo: str, ref: str, body: bytes,
                     media_type: str = MT_MANIFEST) -> requests.Response:
        return self.request("PUT", f"/v2/{repo}/manifests/{ref}", data=body,
                            headers={"Content-Type": media_type})


def oci_error_codes(resp: requests.Response) -> List[str]:
    """The `code`s of an OCI error body; fails the test when the body is not one."""
    try:
        body = resp.json()
    except ValueError as err:
        raise AssertionError(
            f"{resp.request.method} {resp.url}: {resp.status_code} without an OCI error JSON "
            f"body: {resp.text[:500]!r}") from err
    assert isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"], \
        f"not an OCI error body: {body!r}"
    return [e.get("code") for e in body["errors"]]


def location_path(loc: str) -> str:
    """The path (and query) of an upload `Location`, absolute or not."""
    return loc.split("://", 1)[1][loc.split("://", 1)[1].index("/"):] if "://" in loc else loc


def envoy_stats(admin_addr: str, prefix: str = "ocicrypt_") -> Dict[str, float]:
    """Envoy's Prometheus stats whose names start with `prefix`, labels dropped."""
    text = requests.get(f"http://{admin_addr}/stats/prometheus", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


def check_stored_encrypted_and_decrypts(stack, repo: str, image: "Image", out: Path,
                                        key: Path) -> None:
    """The registry holds `repo:v1` encrypted, skopeo decrypts it with `key` to the
    byte-identical `image`, and no plaintext marker is anywhere in storage."""
    manifest = stack.direct().get_manifest(repo, "v1").json()
    assert_encrypted_manifest(manifest, image)
    skopeo_pull(f"{stack.registry_addr}/{repo}:v1", out, "v1", keys=[key])
    assert_decrypted_matches(out, "v1", image)
    assert not scan_for(stack.storage, [image.marker.encode()])


# --------------------------------------------------------------------------------------------
# storage inspection


def registry_blob_path(storage: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def scan_for(storage: Path, needles: Iterable[bytes]) -> List[Tuple[Path, bytes]]:
    """Files under `storage` that contain any of `needles` (streamed, overlap-safe)."""
    needles = [n for n in needles if n]
    keep = max(len(n) for n in needles) - 1
    hits = []
    for dirpath, _dirs, files in os.walk(storage):
        for name in files:
            path = Path(dirpath) / name
            tail = b""
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue  # removed since the walk listed it (an upload the registry purged)
            with f:
                while True:
                    chunk = f.read(8 * MIB)
                    if not chunk:
                        break
                    window = tail + chunk
                    for n in needles:
                        if n in window:
                            hits.append((path, n))
                    tail = window[-keep:] if keep else b""
    return hits


def repo_layer_links(storage: Path, repo: str) -> List[str]:
    """Digests linked into a repository (its _layers links)."""
    d = storage / "docker" / "registry" / "v2" / "repositories" / repo / "_layers" / "sha256"
    return sorted("sha256:" + p.name for p in d.iterdir()) if d.exists() else []


# --------------------------------------------------------------------------------------------
# processes


def run(argv: Sequence[str], timeout: float = 600, check: bool = True, env: Optional[dict] = None,
        **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def skopeo_push(image: Image, dest: str, creds: Optional[Tuple[str, str]] = None,
                extra: Sequence[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    argv = ["skopeo", "copy", "--dest-tls-verify=false", *extra]
    if creds:
        argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    return run(argv + [image.oci_ref, f"docker://{dest}"], check=check, timeout=CLIENT_TIMEOUT)


def skopeo_pull(src: str, out: Path, tag: str, keys: Sequence[Path] = (),
                creds: Optional[Tuple[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """The oracle: skopeo (containers/ocicrypt) copies `src` into an OCI layout, decrypting with
    `keys`. Without keys skopeo copies an encrypted image as it is (ciphertext, +encrypted media
    types) and succeeds; with a key that is no recipient it fails."""
    if out.exists():
        shutil.rmtree(out)
    # --dest-oci-accept-uncompressed-layers: keep uncompressed layers as they are (the oci
    # transport would otherwise gzip them and change their digests).
    argv = ["skopeo", "copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]
    for k in keys:
        argv += ["--decryption-key", str(k)]
    if creds:
        argv += ["--src-creds", f"{creds[0]}:{creds[1]}"]
    return run(argv + [f"docker://{src}", f"oci:{out}:{tag}"], check=check,
               timeout=CLIENT_TIMEOUT)


def skopeo_pull_all(src: str, out: Path, key: Path, images: Dict[str, "Image"],
                    creds: Optional[Tuple[str, str]] = None) -> None:
    """The oracle for an image index: `skopeo copy --all` of `src` decrypting with `key`; each
    platform (by architecture) holds the layers of `images[arch]` as pushed, none encrypted."""
    argv = ["skopeo", "copy", "--all", "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers", "--decryption-key", str(key)]
    if creds:
        argv += ["--src-creds", f"{creds[0]}:{creds[1]}"]
    run(argv + [f"docker://{src}", f"oci:{out}:v1"], timeout=CLIENT_TIMEOUT)
    blobs = out / "blobs" / "sha256"
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    pulled = json.loads((blobs / top["digest"].split(":")[1]).read_text())
    assert len(pulled["manifests"]) == len(images)
    for child in pulled["manifests"]:
        arch = child["platform"]["architecture"]
        m = json.loads((blobs / child["digest"].split(":")[1]).read_text())
        assert [x["digest"] for x in m["layers"]] == images[arch].layer_digests, arch
        assert not any("+encrypted" in x["mediaType"] for x in m["layers"])


def _with_query(entry: dict) -> dict:
    """The access log keeps upload state out (paths are logged without their query); the query
    parameters worth reading are logged one by one. Put them back on `path`, as the client sent
    them, so that tests read requests as a client wrote them."""
    params = [(k, entry.get(f"client_{k}")) for k in ("digest", "mount", "from")]
    query = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in params
                     if v not in (None, "", "-"))
    if query and entry.get("path"):
        entry["path"] = f"{entry['path']}?{query}"
    return entry


class AccessLog:
    """Envoy's JSON access log of one stack, read from a mark on."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        time.sleep(0.3)  # --file-flush-interval-msec 100
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def entries(self) -> List[dict]:
        time.sleep(0.3)
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        return [_with_query(json.loads(line)) for line in data.decode().splitlines()
                if line.strip()]

    @staticmethod
    def summary(entries: List[dict]) -> str:
        rows = []
        for e in entries:
            rows.append(
                f"{e['method']:6} {e['status']} {e['path'][:110]} in={e['bytes_received']} "
                f"out={e['bytes_sent']} cl={e.get('req_content_length')} "
                f"te={e.get('req_transfer_encoding')} cr={e.get('req_content_range')} "
                f"ua={(e.get('user_agent') or '')[:30]}")
        return "\n".join(rows)


class RegistryLog:
    """The registry's own access log (distribution's combined-format lines in its log), read
    from a mark on: what really reached the registry, from clients through Envoy and from the
    filter's callouts alike. Distribution writes a request's line before its answer leaves, so
    every request answered before `requests()` is in it."""

    LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) ')

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    @classmethod
    def of(cls, stack) -> "RegistryLog":
        """The log of `stack`'s registry, marked now."""
        path = getattr(stack, "registry_log", None) or stack.opts.state_dir / "registry.log"
        log = cls(Path(path))
        log.mark()
        return log

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def requests(self) -> List[Tuple[str, str, int]]:
        """(method, path with query, status) of every request since the mark."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3))) for m in self.LINE.finditer(data)]

    def blob_writes(self) -> List[Tuple[str, str, int]]:
        """Requests that write blob bytes: PATCH and PUT of upload sessions."""
        return [r for r in self.requests()
                if r[0] in ("PATCH", "PUT") and "/blobs/uploads/" in r[1]]


def raw_request(addr: str, method: str, path: Union[str, bytes], body: bytes,
                headers: Dict[str, Union[str, bytes]],
                timeout: float = 60) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP/1.1 request on a raw socket, the body sent from a thread while the response is
    read, so an early answer (e.g. 413 before the whole body was taken) is seen even when the
    server stops reading. Header values (and the path) may be bytes, sent exactly as given:
    bytes that are not UTF-8 (obs-text, 0xFF), which `requests` refuses to send. Returns
    (status, headers lower-cased, body)."""
    import http.client
    import socket
    import threading

    def raw(v: Union[str, bytes]) -> bytes:
        return v if isinstance(v, bytes) else v.encode()

    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    head = [method.encode() + b" " + raw(path) + b" HTTP/1.1", f"Host: {addr}".encode(),
            f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    head += [raw(k) + b": " + raw(v) for k, v in headers.items()]
    sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")

    def send_body():
        try:
            view = memoryview(body)
            for i in range(0, len(body), 64 * 1024):
                sock.sendall(view[i:i + 64 * 1024])
        except OSError:
            pass  # the server answered and closed early

    t = threading.Thread(target=send_body, daemon=True)
    t.start()
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    data = resp.read()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    sock.close()
    t.join(5)
    return resp.status, hdrs, data


def uncompressed_digest(path: Path, media_type: str) -> str:
    """sha256 of a layer's tar stream (its diff_id)."""
    h = hashlib.sha256()
    opener = gzip.open if media_type.endswith("+gzip") else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def assert_decrypted_matches(out: Path, tag: str, image: Image, exact: bool = True) -> dict:
    """What the oracle wrote under `out` is `image` in plaintext: config identical; layers not
    encrypted; every blob's sha256 is its name; layer digests equal the original ones (exact),
    or, for a client that recompressed on push, their uncompressed digests equal the config's
    diff_ids. Returns the manifest."""
    manifest, _raw, _digest = read_layout(out, tag)
    blobs = out / "blobs" / "sha256"
    for p in blobs.iterdir():
        assert file_digest(p) == "sha256:" + p.name, f"{p} does not hash to its name"
    assert manifest["config"]["digest"] == image.config.digest, "config changed"
    assert (blobs / image.config.digest.split(":")[1]).read_bytes() == image.config.path.read_bytes()
    layers = manifest["layers"]
    assert len(layers) == len(image.layers)
    for got, want in zip(layers, image.layers):
        assert "+encrypted" not in got["mediaType"], f"still encrypted: {got}"
        assert not any(k.startswith("org.opencontainers.image.enc.")
                       for k in got.get("annotations", {})), got
    if exact:
        assert [l["digest"] for l in layers] == image.layer_digests
        assert [l["size"] for l in layers] == [l.size for l in image.layers]
        assert [l["mediaType"] for l in layers] == [l.media_type for l in image.layers]
    diff_ids = [uncompressed_digest(blobs / l["digest"].split(":")[1], l["mediaType"])
                for l in layers]
    assert diff_ids == image.diff_ids, "decrypted layers do not unpack to the original tars"
    return manifest


def assert_encrypted_manifest(manifest: dict, image: Image, exact: bool = True) -> None:
    """The stored manifest has every layer encrypted (ocicrypt annotations, new digests, same
    sizes when the client pushed the layers as they are) and the config untouched."""
    import base64

    assert manifest["mediaType"] == MT_MANIFEST, manifest.get("mediaType")
    assert manifest["config"]["digest"] == image.config.digest, "config must never change"
    plaintext = set(image.layer_digests)
    assert len(manifest["layers"]) == len(image.layers)
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith("+encrypted"), layer
        ann = layer.get("annotations", {})
        assert ANN_PUBOPTS in ann and ANN_KEYS_JWE in ann, layer
        assert layer["digest"] not in plaintext, f"plaintext digest kept: {layer}"
        pubopts = json.loads(base64.b64decode(ann[ANN_PUBOPTS]))
        assert pubopts["cipher"] == "AES_256_CTR_HMAC_SHA256", pubopts
        assert base64.b64decode(pubopts["hmac"]) and len(base64.b64decode(pubopts["hmac"])) == 32
        json.loads(base64.b64decode(ann[ANN_KEYS_JWE]))  # a JWE in JSON serialization
    if exact:
        assert [l["size"] for l in manifest["layers"]] == [l.size for l in image.layers], \
            "AES-CTR keeps the length: sizes must not change"


# --------------------------------------------------------------------------------------------
# HTTP/2 cleartext (prior knowledge) and other raw requests


@dataclass
class Answer:
    """An HTTP answer, whatever client got it: status, headers (names lower-cased), body."""

    status: int
    headers: Dict[str, str]
    body: bytes
    trailers: Dict[str, str] = field(default_factory=dict)
    reset: bool = False

    @classmethod
    def of(cls, resp: requests.Response) -> "Answer":
        return cls(resp.status_code, {k.lower(): v for k, v in resp.headers.items()},
                   resp.content)

    def json(self):
        return json.loads(self.body)


class H2Client:
    """One HTTP/2 cleartext connection with prior knowledge (Envoy's listener has codec AUTO),
    made with the `h2` package: requests one after another, bodies sent within the flow-control
    windows, optional request trailers.

        with H2Client("127.0.0.1:5000") as c:
            a = c.request("PUT", "/v2/demo/x/manifests/v1", body, {"content-type": MT_MANIFEST},
                          trailers={"x-end": "1"})
    """

    def __init__(self, addr: str, timeout: float = 60):
        import socket

        import h2.config
        import h2.connection

        host, port = addr.rsplit(":", 1)
        self.addr = addr
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()
        self.streams: Dict[int, Answer] = {}
        self.ended: Dict[int, bool] = {}
        self.closed = False

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.sock.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> None:
        """Reads what the server sent and handles its events."""
        import h2.events

        data = self.sock.recv(256 * 1024)
        if not data:
            self.closed = True
            for sid in self.streams:
                self.ended[sid] = True
            return
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            ans = self.streams.get(sid) if sid is not None else None
            if isinstance(ev, h2.events.ResponseReceived) and ans is not None:
                hdrs = dict(ev.headers)
                ans.status = int(hdrs.pop(":status"))
                ans.headers = {k.lower(): v for k, v in hdrs.items()}
            elif isinstance(ev, h2.events.DataReceived):
                if ans is not None:
                    ans.body += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and ans is not None:
                ans.trailers = {k.lower(): v for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded) and ans is not None:
                self.ended[sid] = True
            elif isinstance(ev, h2.events.StreamReset) and ans is not None:
                ans.reset = True
                self.ended[sid] = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                for s in self.streams:
                    self.ended[s] = True
        self._flush()

    def _wait(self, sid: int, seconds: float) -> None:
        """Reads what the server sends for `seconds`, or until stream `sid` ends."""
        import select

        deadline = time.monotonic() + seconds
        while not self.ended[sid] and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return
            self._pump()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Optional[Dict[str, str]] = None,
                trailers: Optional[Dict[str, str]] = None,
                trailers_after: float = 0.0) -> Answer:
        """One request; `trailers` are sent as a HEADERS frame ending the stream after the
        body, `trailers_after` seconds after its last byte (reading the server meanwhile, so
        an answer that comes before the trailers is seen). Returns the answer (status 0 if the
        stream was reset before one)."""
        import h2.exceptions

        sid = self.conn.get_next_available_stream_id()
        ans = self.streams[sid] = Answer(0, {}, b"")
        self.ended[sid] = False
        hdrs = [(":method", method), (":scheme", "http"), (":authority", self.addr),
                (":path", path)]
        hdrs += [(k.lower(), v) for k, v in (headers or {}).items()]
        self.conn.send_headers(sid, hdrs, end_stream=not body and not trailers)
        self._flush()
        view = memoryview(body)
        off = 0
        try:
            while off < len(body) and not self.ended[sid]:
                room = min(self.conn.local_flow_control_window(sid),
                           self.conn.max_outbound_frame_size, len(body) - off)
                if room <= 0:
                    self._pump()
                    continue
                last = off + room == len(body) and not trailers
                self.conn.send_data(sid, bytes(view[off:off + room]), end_stream=last)
                self._flush()
                off += room
            if trailers and trailers_after:
                self._wait(sid, trailers_after)
            if trailers and not self.ended[sid]:
                self.conn.send_headers(sid, [(k.lower(), v) for k, v in trailers.items()],
                                       end_stream=True)
                self._flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
            pass  # the server answered (or reset the stream) before the whole body was sent
        while not self.ended[sid] and not self.closed:
            self._pump()
        return ans


def tags(reg: "Registry", repo: str) -> List[str]:
    """The repository's tags as the registry lists them (none when it has none)."""
    r = reg.request("GET", f"/v2/{repo}/tags/list")
    if r.status_code == 404:
        return []
    assert r.status_code == 200, f"tags/list {repo}: {r.status_code} {r.text[:300]}"
    return r.json().get("tags") or []
