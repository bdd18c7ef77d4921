#!/usr/bin/env python3
"""What scripts/load and scripts/soak share: two gateway replicas (each Envoy --concurrency 2,
sharing `replicas.state_key`, one registry) behind a round-robin front Envoy with no affinity
(one request per upstream connection, so consecutive requests of one upload land on either
replica); the pushing clients as processes of their own (skopeo, ctr, oras chunked and
monolithic, docker), each killable by its pid; images of several shapes; and the checks of
what the registry then holds (encrypted manifests, decryption with skopeo to the original
layers).

Run as a script it is only the oras client (`oras-push`), so that an oras push is a process
that can be killed like the others.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import gateway  # noqa: E402
import helpers  # noqa: E402
from helpers import MIB, Image  # noqa: E402
from procstat import rss_kib  # noqa: E402

FRONT = """
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    per_connection_buffer_limit_bytes: 4194304
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          request_timeout: 0s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: replicas
                  timeout: 0s{hash_policy}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: replicas
    type: STATIC
    lb_policy: {lb_policy}
    per_connection_buffer_limit_bytes: 4194304
    # One request per upstream connection: no stickiness of a connection to a replica.
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{max_requests_per_connection: 1}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: replicas
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {a}}}}}}}
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {b}}}}}}}
"""

#: Without replicas.state_key a push must stay on one replica (its upload records and ledger
#: are in that Envoy's shared data): the front hashes on the repository named in the path.
REPOSITORY_HASH = (
    "\n                  hash_policy:"
    "\n                  - header:"
    "\n                      header_name: \":path\""
    "\n                      regex_rewrite:"
    "\n                        pattern: {regex: \"^/v2/(.+)/(blobs|manifests|tags)/.*$\"}"
    "\n                        substitution: \"\\\\1\"")

#: The gauge of upload records the filter holds (without `replicas.state_key`; see
#: ReplicaSet.gauges).
INFLIGHT = "ocicrypt_uploads_in_flight"
#: What every planted marker starts with (helpers.new_marker): one needle finds any of them.
MARKER_PREFIX = b"OCICRYPT-E2E-MARKER-"


def stats(admin: str, prefix: str = "ocicrypt_") -> Dict[str, float]:
    """The filter's Prometheus stats of one Envoy (labels dropped)."""
    return helpers.envoy_stats(admin, prefix)


# --------------------------------------------------------------------------------------------
# the replica set


class ReplicaSet:
    """Replicas `a` and `b` (a starts the registry, b uses it) and the front Envoy.

        rs = ReplicaSet(tmp).start()
        ... push to rs.front_addr, read from rs.registry_addr ...
        rs.stop()
    """

    def __init__(self, tmp: Path, wasm: Optional[Path] = None,
                 upload_idle_seconds: Optional[int] = None, log: Callable[[str], None] = None,
                 state_key: bool = True, ledger_cache_entries: Optional[int] = None):
        self.tmp = Path(tmp)
        #: limits.ledger_cache_entries of both replicas (None: the filter's default).
        self.ledger_cache_entries = ledger_cache_entries
        #: False: no replicas.state_key; the front then sends every request naming one
        #: repository to one replica (RING_HASH on the repository) instead of round-robin.
        self.with_state_key = state_key
        self.wasm = wasm
        self.upload_idle_seconds = upload_idle_seconds
        self.log = log or (lambda m: None)
        self.replicas: List[gateway.Gateway] = []
        self.front: Optional[subprocess.Popen] = None
        self.ports = helpers.free_ports(8)
        self.front_addr = f"127.0.0.1:{self.ports[7]}"
        self.registry_addr = f"127.0.0.1:{self.ports[1]}"

    def _options(self, name: str, gw: int, admin: int, ks: int, **kw) -> gateway.Options:
        extra = {}
        if self.wasm is not None:
            extra = {"wasm_path": self.wasm, "build_wasm": False}
        return gateway.Options(
            state_dir=self.tmp / name, gateway_addr=f"127.0.0.1:{self.ports[gw]}",
            registry_addr=self.registry_addr, admin_addr=f"127.0.0.1:{self.ports[admin]}",
            keyservice_addr=f"127.0.0.1:{self.ports[ks]}", state_key=self.state_key,
            keys_source="inline", upload_idle_seconds=self.upload_idle_seconds,
            ledger_cache_entries=self.ledger_cache_entries, **extra, **kw)

    def start(self) -> "ReplicaSet":
        import requests

        self.state_key = (base64.b64encode(os.urandom(32)).decode() if self.with_state_key
                          else None)
        try:
            a = gateway.Gateway(self._options("a", 0, 2, 3), log=self.log)
            a.start()
            self.replicas.append(a)
            shutil.copytree(self.tmp / "a" / "keys", self.tmp / "b" / "keys")
            b = gateway.Gateway(self._options("b", 4, 5, 6, start_registry=False), log=self.log)
            b.start()
            self.replicas.append(b)
            cfg = self.tmp / "front.yaml"
            cfg.write_text(FRONT.format(
                port=self.ports[7], a=self.ports[0], b=self.ports[4],
                lb_policy="ROUND_ROBIN" if self.with_state_key else "RING_HASH",
                hash_policy="" if self.with_state_key else REPOSITORY_HASH))
            self.front = subprocess.Popen(
                [gateway.envoy_path(), "-c", str(cfg), "--concurrency", "2",
                 "--disable-hot-restart", "--log-level", "warn"],
                stdout=subprocess.DEVNULL, stderr=open(self.tmp / "front.log", "wb"),
                stdin=subprocess.DEVNULL, start_new_session=True)
            for _ in range(200):
                try:
                    if requests.get(f"http://{self.front_addr}/v2/", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if self.front.poll() is not None:
                    raise gateway.GatewayError(
                        "the front Envoy exited: " + (self.tmp / "front.log").read_text()[-2000:])
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def keys(self) -> Dict[str, Dict[str, Path]]:
        return self.replicas[0].keys

    @property
    def storage(self) -> Path:
        return self.replicas[0].opts.registry_dir

    def names(self) -> List[str]:
        return ["a", "b"][:len(self.replicas)]

    def envoy_pids(self) -> Dict[str, Optional[int]]:
        """Each replica's Envoy pid, by replica name."""
        return {n: g.pid("envoy") for n, g in zip(self.names(), self.replicas)}

    def rss_kib(self) -> Dict[str, int]:
        """Each replica's Envoy resident memory now, KiB (0 for one that is gone)."""
        return {n: rss_kib(p) for n, p in self.envoy_pids().items()}

    def gauges(self) -> Dict[str, float]:
        """`ocicrypt_uploads_in_flight` of each replica. With `replicas.state_key` (the default
        here) the filter keeps no record per upload — the state is sealed in the Location the client
        echoes — so the gauge counts only records of a gateway without the key: 0 throughout
        here, whatever the clients do. The one thing a replica holds per upload is the claim
        of a session for the length of one request (not metered)."""
        return {n: stats(g.opts.admin_addr, INFLIGHT).get(INFLIGHT, 0.0)
                for n, g in zip(self.names(), self.replicas)}

    def dead(self) -> List[str]:
        out = [f"{n}:{p}" for n, g in zip(self.names(), self.replicas) for p in g.dead()]
        if self.front is not None and self.front.poll() is not None:
            out.append("front")
        return out

    def envoy_logs(self) -> Dict[str, Path]:
        return {n: g.opts.state_dir / "envoy.log" for n, g in zip(self.names(), self.replicas)}

    def stop(self) -> None:
        if self.front is not None and self.front.poll() is None:
            self.front.terminate()
            try:
                self.front.wait(10)
            except subprocess.TimeoutExpired:
                self.front.kill()
                self.front.wait()
        for g in reversed(self.replicas):
            g.stop()


# --------------------------------------------------------------------------------------------
# images


def build_layers_image(layout: Path, tag: str, sizes: Sequence[int], marker: str,
                       arch: str = "amd64") -> Image:
    """An OCI layout whose image has one uncompressed tar layer per size in `sizes` (random
    bytes; the first also holds a file whose content is `marker`) and a tiny gzip layer last."""
    if layout.exists():
        shutil.rmtree(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    unique = uuid.uuid4().hex
    layers, diff_ids = [], []
    for i, size in enumerate(sizes):
        members = [(f"data/random{i}.bin", os.urandom(size))]
        if i == 0:
            members.append(("etc/marker.txt", marker.encode("ascii") + b"\n"))
        blob = helpers._write_blob(layout, helpers._tar_bytes(members), helpers.MT_LAYER_TAR)
        layers.append(blob)
        diff_ids.append(blob.digest)
    small = helpers._tar_bytes([("etc/hello.txt", f"hello {unique}\n".encode())])
    layers.append(helpers._write_blob(layout, gzip.compress(small, mtime=0),
                                      helpers.MT_LAYER_GZIP))
    diff_ids.append(helpers.sha256_digest(small))
    config = {
        "created": "2024-01-01T00:00:00Z", "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"soak.unique": unique}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                    for i in range(len(layers))],
    }
    cfg = helpers._write_blob(layout, json.dumps(config, separators=(",", ":")).encode(),
                              helpers.MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": helpers.MT_MANIFEST,
                "config": cfg.descriptor(), "layers": [b.descriptor() for b in layers]}
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    mblob = helpers._write_blob(layout, mbytes, helpers.MT_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": helpers.MT_INDEX,
             "manifests": [dict(mblob.descriptor(), platform={"architecture": arch, "os": "linux"},
                                annotations={helpers.ANN_REF_NAME: tag})]}
    (layout / "index.json").write_text(json.dumps(index))
    return Image(layout, tag, cfg, layers, diff_ids, mbytes, mblob.digest, marker)


@dataclass
class MultiImage:
    """A layout whose tag names an OCI index of one image per platform."""

    layout: Path
    tag: str
    children: Dict[str, Image]
    marker: str = ""

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def build_index(base: Path, tag: str, sizes: Sequence[int],
                arches: Sequence[str] = ("amd64", "arm64")) -> MultiImage:
    """An index of `arches`, each child its own image (own marker) built like
    build_layers_image, all in one layout under base/layout."""
    layout = base / "layout"
    if layout.exists():
        shutil.rmtree(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    children, descs = {}, []
    for arch in arches:
        img = build_layers_image(base / arch, tag, sizes, helpers.new_marker(), arch=arch)
        for blob in (base / arch / "blobs" / "sha256").iterdir():
            shutil.copy(blob, layout / "blobs" / "sha256" / blob.name)
        descs.append({"mediaType": helpers.MT_MANIFEST, "digest": img.manifest_digest,
                      "size": len(img.manifest_bytes),
                      "platform": {"architecture": arch, "os": "linux"}})
        children[arch] = img
    index = json.dumps({"schemaVersion": 2, "mediaType": helpers.MT_INDEX, "manifests": descs},
                       separators=(",", ":")).encode()
    digest = helpers.sha256_digest(index)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": helpers.MT_INDEX,
        "manifests": [{"mediaType": helpers.MT_INDEX, "digest": digest, "size": len(index),
                       "annotations": {helpers.ANN_REF_NAME: tag}}]}))
    return MultiImage(layout, tag, children, children[arches[0]].marker)


# --------------------------------------------------------------------------------------------
# clients, each a process of its own


@dataclass
class ClientRun:
    """One client process: its exit status, what it printed, whether it was killed on purpose
    (`aborted`: SIGKILLed before it exited) or ran past its timeout (`timed_out`)."""

    argv: List[str]
    returncode: Optional[int] = None
    output: str = ""
    aborted: bool = False
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.aborted and not self.timed_out

    def describe(self) -> str:
        how = ("killed by the soak (abort)" if self.aborted else
               f"timed out after {self.seconds:.0f} s" if self.timed_out else
               f"exit status {self.returncode}")
        return f"$ {' '.join(self.argv)}\n{how}\n{self.output[-4000:]}"


def run_client(argv: Sequence[str], env: Optional[dict] = None,
               abort_after: Optional[float] = None,
               timeout: float = helpers.CLIENT_TIMEOUT) -> ClientRun:
    """Runs one client process; with `abort_after`, SIGKILLs it (by its pid, nothing else) that
    many seconds after it started if it is still running."""
    argv = [str(a) for a in argv]
    run = ClientRun(argv)
    out = tempfile.TemporaryFile()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    abort = abort_after is not None and abort_after < timeout
    try:
        proc.wait(abort_after if abort else timeout)
    except subprocess.TimeoutExpired:
        # Not yet waited for, the pid cannot be another process's: a client that exited just
        # now is a zombie, which the signal does not change (its own status is kept).
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        run.aborted = abort and proc.returncode == -signal.SIGKILL
        run.timed_out = not abort
    run.returncode = proc.returncode
    run.seconds = time.monotonic() - t0
    out.seek(0)
    run.output = out.read().decode(errors="replace")
    out.close()
    return run


def skopeo_argv(src_ref: str, dest: str, all_images: bool = False) -> List[str]:
    argv = ["skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests"]
    if all_images:
        argv.append("--all")
    return argv + [src_ref, f"docker://{dest}"]


def oras_argv(image: Image, addr: str, repo_tag: str, chunked: bool,
              chunk_size: int = 1 * MIB) -> List[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "oras-push", "--layout",
            str(image.layout), "--tag", image.tag, "--addr", addr, "--ref", repo_tag,
            "--chunk-size", str(chunk_size)]
    return argv + (["--chunked"] if chunked else [])


def _oras_main(argv: Sequence[str]) -> int:
    from types import SimpleNamespace

    from conftest import oras_push

    ap = argparse.ArgumentParser(prog="replicaset.py oras-push")
    ap.add_argument("--layout", required=True, type=Path)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--chunked", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=MIB)
    args = ap.parse_args(argv)
    manifest, _raw, _digest = helpers.read_layout(args.layout, args.tag)
    image = SimpleNamespace(
        manifest=manifest,
        blob_path=lambda d: args.layout / "blobs" / "sha256" / d.split(":", 1)[1])
    oras_push(image, args.addr, args.ref, chunked=args.chunked, chunk_size=args.chunk_size)
    print(f"oras-push: {args.ref} pushed ({'chunked' if args.chunked else 'monolithic'})")
    return 0


class Ctr:
    """A private containerd (tests/conftest.py's Containerd) for ctr pushes."""

    def __init__(self, base: Path):
        from conftest import Containerd

        base.mkdir(parents=True, exist_ok=True)
        self.ctd = Containerd(base).start()

    def prepare(self, image: Image, name: str) -> str:
        return self.ctd.import_image(image, name)

    def push_argv(self, ref: str, dest: str) -> List[str]:
        return ["ctr", "-a", str(self.ctd.sock), "images", "push", "--plain-http", dest, ref]

    def forget(self, ref: str) -> None:
        self.ctd.ctr("images", "rm", ref, check=False)

    def stop(self) -> None:
        self.ctd.stop()


class Docker:
    """A private dockerd (tests/e2e/test_docker.py's Dockerd) and its CLI; `available` is False
    with the reason when it cannot run here."""

    def __init__(self, base: Path):
        self.d = None
        self.reason = ""
        try:
            from test_docker import Dockerd

            base.mkdir(parents=True, exist_ok=True)
            self.d = Dockerd(base)
            self.d.start()
        except BaseException as err:  # noqa: BLE001 - pytest.fail/skip are BaseExceptions
            self.reason = f"{type(err).__name__}: {err}"
            if self.d is not None:
                self.d.stop()
            self.d = None

    @property
    def available(self) -> bool:
        return self.d is not None

    def load(self, image: Image, name: str) -> None:
        self.d.load(image, name)

    def push(self, local: str, dest: str, abort_after: Optional[float]) -> ClientRun:
        """Tags `local` as `dest` and pushes it with the docker CLI (the process killed on abort;
        dockerd may finish or drop the push it was doing)."""
        self.d.docker("tag", local, dest)
        try:
            return run_client([self.d.cli, "push", dest], env=self.d.env, abort_after=abort_after)
        finally:
            self.d.docker("rmi", dest, check=False)

    def stop(self) -> None:
        if self.d is not None:
            self.d.stop()


# --------------------------------------------------------------------------------------------
# what the registry holds


def verify_image(registry_addr: str, repo_tag: str, image: Image, key: Path, out: Path,
                 exact: bool = True) -> None:
    """The registry holds `repo_tag` as an encrypted manifest of `image`, and skopeo decrypts it
    with `key` to the original layers (`exact`: the same digests; else the same uncompressed
    digests, for clients that recompress). Raises AssertionError."""
    repo, tag = repo_tag.rsplit(":", 1)
    reg = helpers.Registry(f"http://{registry_addr}")
    r = reg.get_manifest(repo, tag)
    assert r.status_code == 200, f"GET manifest {repo_tag}: {r.status_code} {r.text[:300]}"
    helpers.assert_encrypted_manifest(r.json(), image, exact=exact)
    try:
        helpers.skopeo_pull(f"{registry_addr}/{repo_tag}", out, tag, keys=[key])
        helpers.assert_decrypted_matches(out, tag, image, exact=exact)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def verify_index(registry_addr: str, repo_tag: str, multi: MultiImage, key: Path,
                 out: Path) -> None:
    """The registry holds `repo_tag` as an index naming each platform's encrypted image, and
    `skopeo copy --all --decryption-key` gives back every platform's original layers."""
    repo, tag = repo_tag.rsplit(":", 1)
    reg = helpers.Registry(f"http://{registry_addr}")
    r = reg.get_manifest(repo, tag)
    assert r.status_code == 200, f"GET index {repo_tag}: {r.status_code} {r.text[:300]}"
    index = r.json()
    assert index.get("mediaType") == helpers.MT_INDEX, index
    stored = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert sorted(stored) == sorted(multi.children), index
    for arch, digest in stored.items():
        m = reg.get_manifest(repo, digest)
        assert m.status_code == 200, f"GET {repo}@{digest}: {m.status_code}"
        helpers.assert_encrypted_manifest(m.json(), multi.children[arch])
    try:
        helpers.run(["skopeo", "copy", "--all", "--src-tls-verify=false",
                     "--dest-oci-accept-uncompressed-layers", "--decryption-key", str(key),
                     f"docker://{registry_addr}/{repo_tag}", f"oci:{out}:{tag}"],
                    timeout=helpers.CLIENT_TIMEOUT)
        blobs = out / "blobs" / "sha256"
        top = json.loads((out / "index.json").read_text())["manifests"][0]
        pulled = json.loads((blobs / top["digest"].split(":")[1]).read_text())
        assert len(pulled["manifests"]) == len(multi.children), pulled
        for child in pulled["manifests"]:
            img = multi.children[child["platform"]["architecture"]]
            m = json.loads((blobs / child["digest"].split(":")[1]).read_text())
            assert m["config"]["digest"] == img.config.digest, "config changed"
            assert [l["digest"] for l in m["layers"]] == img.layer_digests, \
                f"{child['platform']}: layers {[l['digest'] for l in m['layers']]} " \
                f"!= {img.layer_digests}"
            for l in m["layers"]:
                p = blobs / l["digest"].split(":")[1]
                assert helpers.file_digest(p) == l["digest"], f"{p} does not hash to its name"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def registry_open_uploads(storage: Path) -> int:
    """Upload sessions the registry still holds (`_uploads` entries of every repository):
    sessions whose client went away; distribution's upload purging removes them after 24 h."""
    root = storage / "docker" / "registry" / "v2" / "repositories"
    return sum(1 for d in root.glob("**/_uploads/*") if d.is_dir()) if root.exists() else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "oras-push":
        sys.exit(_oras_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
