"""scripts/package end to end: the module packed in both forms Istio pulls, pushed to a real
registry (Debian docker-registry, the CNCF distribution), pulled back with standard clients
(skopeo for both, oras for the artifact) and checked the way Istio's fetcher reads them
(istio/istio pkg/wasm/imagefetcher.go): layer media types, layer counts, plugin.wasm in the
tar, and the module's sha256 against the built one. The native build (libocicrypt_filter.so)
the same way: its file and checksum beside the layout (`sha256sum -c`), and its OCI artifact
pulled back with oras, byte for byte the module cargo built.

Then the same script against the real gateway (Envoy + filter): a passthrough repository
keeps the images byte for byte; an encrypted one makes the script fail, as the README says.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List

import pytest
import requests

import helpers

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "scripts" / "package"
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "ocicrypt_filter.wasm"
NATIVE = REPO / "target" / "native" / "libocicrypt_filter.so"
REPOSITORY = "plain/ocicrypt-filter"
TAG = "v0.0.0-test"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
MT_WASM_CONTENT = "application/vnd.module.wasm.content.layer.v1+wasm"
MT_NATIVE_CONFIG = "application/vnd.ocicrypt-filter.envoy-dynamic-module.config.v1+json"
MT_NATIVE_CONTENT = "application/vnd.ocicrypt-filter.envoy-dynamic-module.v1+so"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry on a free loopback port, storage in a temporary directory."""
    d = tmp_path_factory.mktemp("pkg-registry")
    addr = f"127.0.0.1:{free_port()}"
    (d / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {d / 'storage'}}}}}\n"
        f"http: {{addr: {addr}}}\n")
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(d / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (d / "registry.log").read_text()[-2000:]
        try:
            if requests.get(f"http://{addr}/v2/", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "registry did not start"
        time.sleep(0.1)
    yield addr
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(15)


def package(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return helpers.run([sys.executable, PACKAGE, *args], check=check, timeout=1200)


@pytest.fixture(scope="module")
def packaged(registry, tmp_path_factory):
    """scripts/package run as an operator would (it builds the module itself)."""
    out = tmp_path_factory.mktemp("pkg-out")
    proc = package("--registry", registry, "--repository", REPOSITORY, "--tag", TAG,
                   "--insecure", "--out", str(out))
    digests = json.loads((out / "digests.json").read_text())
    return {"stdout": proc.stdout, "digests": digests, "out": out,
            "images": {img["form"]: img for img in digests["images"]}}


@pytest.fixture(scope="module")
def module_bytes(packaged) -> bytes:
    """The module cargo built (read after scripts/package built it)."""
    return WASM.read_bytes()


def pull(registry: str, ref: str, dest: Path) -> Path:
    """skopeo copy docker://… oci:… (the digests must not change on the way)."""
    helpers.run(["skopeo", "copy", "--src-tls-verify=false", "--preserve-digests",
                 f"docker://{registry}/{REPOSITORY}:{ref}", f"oci:{dest}:{ref}"])
    return dest


def blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    assert f"sha256:{sha256_hex(data)}" == digest, f"blob {digest} in {layout} is corrupt"
    return data


def istio_module(layout: Path, manifest: dict) -> bytes:
    """The module as Istio's fetcher takes it from an OCI manifest: the "compat" form when the
    LAST layer is tar+gzip (first file whose base name is plugin.wasm), else the "oci" artifact
    form, which needs exactly two layers, one of them the wasm content type."""
    layers = manifest["layers"]
    assert layers, "Istio refuses an image without layers"
    last = layers[-1]
    if last["mediaType"] == MT_LAYER_TGZ:
        tar = gzip.decompress(blob(layout, last["digest"]))
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            for member in t:
                if os.path.basename(member.name) == "plugin.wasm":
                    return t.extractfile(member).read()
        raise AssertionError("no plugin.wasm in the compat layer")
    assert len(layers) == 2, f"Istio needs exactly 2 layers in the artifact form, got {len(layers)}"
    wasm = [d for d in layers if d["mediaType"] == MT_WASM_CONTENT]
    assert wasm, f"no {MT_WASM_CONTENT} layer"
    return blob(layout, wasm[0]["digest"])


def test_prints_what_istio_needs(packaged, module_bytes, registry):
    out, d = packaged["stdout"], packaged["digests"]
    module_sha = sha256_hex(module_bytes)
    assert d["module"]["sha256"] == module_sha
    assert f"sha256:{module_sha}" in out, out
    compat = packaged["images"]["compat"]
    # WasmPlugin.sha256 for an oci:// URL is the manifest digest, bare hex (the CRD's pattern)
    assert d["wasmplugin"] == {"url": f"oci://{registry}/{REPOSITORY}:{TAG}",
                               "sha256": compat["digest"].split(":", 1)[1]}
    assert f"  sha256: {d['wasmplugin']['sha256']}\n" in out, out
    for img in packaged["images"].values():
        assert img["pushed"] is True
        assert img["digest"] in out


def test_registry_serves_the_printed_digests(packaged, registry):
    for img in packaged["images"].values():
        resp = requests.head(f"http://{registry}/v2/{REPOSITORY}/manifests/{img['ref']}",
                             headers={"Accept": MT_MANIFEST}, timeout=10)
        assert resp.status_code == 200, resp.status_code
        assert resp.headers["Docker-Content-Digest"] == img["digest"]


def test_compat_image_round_trip(packaged, module_bytes, registry, tmp_path):
    img = packaged["images"]["compat"]
    layout = pull(registry, img["ref"], tmp_path / "pulled")
    manifest, _, digest = helpers.read_layout(layout, img["ref"])
    assert digest == img["digest"]
    assert manifest["mediaType"] == MT_MANIFEST
    assert manifest["config"]["mediaType"] == MT_IMAGE_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MT_LAYER_TGZ]

    tar = gzip.decompress(blob(layout, manifest["layers"][0]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        inside = t.extractfile(members[0]).read()
    assert sha256_hex(inside) == sha256_hex(module_bytes)

    config = json.loads(blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{sha256_hex(tar)}"]}
    assert (config["os"], config["architecture"]) == ("wasip1", "wasm")
    assert istio_module(layout, manifest) == module_bytes


def test_artifact_image_round_trip(packaged, module_bytes, registry, tmp_path):
    img = packaged["images"]["artifact"]
    layout = pull(registry, img["ref"], tmp_path / "pulled")
    manifest, _, digest = helpers.read_layout(layout, img["ref"])
    assert digest == img["digest"]
    assert manifest["config"]["mediaType"] == MT_WASM_CONFIG
    types = [layer["mediaType"] for layer in manifest["layers"]]
    assert sorted(types) == sorted([MT_WASM_CONFIG, MT_WASM_CONTENT]), types

    (wasm,) = [d for d in manifest["layers"] if d["mediaType"] == MT_WASM_CONTENT]
    assert wasm["digest"] == f"sha256:{sha256_hex(module_bytes)}"
    assert wasm["size"] == len(module_bytes)
    runtime = json.loads(blob(layout, manifest["config"]["digest"]))
    assert runtime["type"] == "envoy_proxy"
    assert runtime["config"]["root_ids"] == ["ocicrypt"]
    assert runtime["abiVersions"] == [packaged["digests"]["module"]["abi"]]
    assert istio_module(layout, manifest) == module_bytes


def test_artifact_pulled_with_oras(packaged, module_bytes, registry, tmp_path):
    """A second, independent client: oras (Python) pulls the layers by their titles."""
    import oras.client

    client = oras.client.OrasClient(hostname=registry, insecure=True)
    files = client.pull(target=f"{registry}/{REPOSITORY}:{packaged['images']['artifact']['ref']}",
                        outdir=str(tmp_path))
    by_name: Dict[str, bytes] = {Path(f).name: Path(f).read_bytes() for f in files}
    assert set(by_name) == {"plugin.wasm", "runtime-config.json"}
    assert sha256_hex(by_name["plugin.wasm"]) == sha256_hex(module_bytes)


def test_native_module_and_checksum(packaged):
    """The native module beside the layout is the one cargo built, and its checksum file is
    what `sha256sum -c` (an operator's check before copying it to Envoy's search path)
    accepts; a changed byte makes the same check fail."""
    native = packaged["digests"]["native"]
    built = NATIVE.read_bytes()
    so = packaged["out"] / "native" / "libocicrypt_filter.so"
    assert Path(native["path"]) == so and so.read_bytes() == built
    assert native["sha256"] == sha256_hex(built) and native["size"] == len(built)
    assert f"sha256:{native['sha256']}" in packaged["stdout"]
    assert native["architecture"] in ("amd64", "arm64")
    assert native["envoy"].startswith("1."), native["envoy"]
    checksum = so.parent / "libocicrypt_filter.so.sha256"
    assert checksum.read_text() == f"{sha256_hex(built)}  libocicrypt_filter.so\n"
    ok = subprocess.run(["sha256sum", "-c", checksum.name], cwd=so.parent,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "libocicrypt_filter.so: OK" in ok.stdout, ok.stdout + ok.stderr
    tampered = so.parent.parent / "tampered"
    tampered.mkdir()
    (tampered / so.name).write_bytes(built[:-1] + bytes([built[-1] ^ 1]))
    (tampered / checksum.name).write_text(checksum.read_text())
    bad = subprocess.run(["sha256sum", "-c", checksum.name], cwd=tampered,
                         capture_output=True, text=True)
    assert bad.returncode != 0, bad.stdout


def test_native_artifact_round_trip(packaged, registry, tmp_path):
    """The native artifact, pulled back by skopeo (digests kept) and by oras (by its title),
    is byte for byte the built module, with a config naming its platform and Envoy."""
    import oras.client

    img = packaged["images"]["native"]
    assert img["ref"] == f"{TAG}-native" and img["pushed"] is True
    built = NATIVE.read_bytes()
    layout = pull(registry, img["ref"], tmp_path / "pulled")
    manifest, _, digest = helpers.read_layout(layout, img["ref"])
    assert digest == img["digest"]
    assert manifest["config"]["mediaType"] == MT_NATIVE_CONFIG
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == MT_NATIVE_CONTENT
    assert layer["annotations"]["org.opencontainers.image.title"] == "libocicrypt_filter.so"
    assert blob(layout, layer["digest"]) == built
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    native = packaged["digests"]["native"]
    assert config == {"architecture": native["architecture"], "os": "linux",
                      "envoy": native["envoy"], "filter_name": "ocicrypt",
                      "module_name": "ocicrypt_filter"}
    client = oras.client.OrasClient(hostname=registry, insecure=True)
    files = client.pull(target=f"{registry}/{REPOSITORY}:{img['ref']}",
                        outdir=str(tmp_path / "oras"))
    assert [Path(f).name for f in files] == ["libocicrypt_filter.so"]
    assert Path(files[0]).read_bytes() == built


def test_layout_is_reproducible(packaged, tmp_path):
    """The same modules give the same digests (so a digest can be re-derived from a build)."""
    package("--wasm", str(WASM), "--native", str(NATIVE), "--tag", TAG, "--out",
            str(tmp_path), "--no-push")
    again = json.loads((tmp_path / "digests.json").read_text())
    assert [(i["form"], i["digest"]) for i in again["images"]] == \
        [(i["form"], i["digest"]) for i in packaged["digests"]["images"]]
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] \
        == [TAG, f"{TAG}-wasm", f"{TAG}-native"]
    # --no-native: the wasm images alone, with the same digests.
    package("--wasm", str(WASM), "--no-native", "--tag", TAG, "--out", str(tmp_path / "w"),
            "--no-push")
    wasm_only = json.loads((tmp_path / "w" / "digests.json").read_text())
    assert "native" not in wasm_only
    assert [(i["form"], i["digest"]) for i in wasm_only["images"]] == \
        [(i["form"], i["digest"]) for i in packaged["digests"]["images"]
         if i["form"] != "native"]


# ---------------------------------------------------------------------------------------------
# through the gateway


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory):
    """The local gateway (registry + Envoy + filter, demo policy) on free ports, of its own so
    that these pushes change nothing another test's stack counts."""
    import gateway
    from conftest import WASM_OVERRIDE

    extra = {"wasm_path": WASM_OVERRIDE} if WASM_OVERRIDE is not None else {}
    # Every address picked at once (distinct), the key service's too: its default (the
    # gateway's port + 3) may be anyone's port on a busy machine.
    gw_port, registry_port, admin_port, keyservice_port = helpers.free_ports(4)
    opts = gateway.Options(state_dir=tmp_path_factory.mktemp("pkg-gateway"),
                           gateway_addr=f"127.0.0.1:{gw_port}",
                           registry_addr=f"127.0.0.1:{registry_port}",
                           admin_addr=f"127.0.0.1:{admin_port}",
                           keyservice_addr=f"127.0.0.1:{keyservice_port}", **extra)
    gw = gateway.Gateway(opts, log=lambda m: print(m, file=sys.stderr))
    try:
        gw.start()
    except gateway.GatewayError as err:
        pytest.fail(f"the gateway did not start: {err}", pytrace=False)
    yield gw
    gw.stop()


@pytest.mark.filter
def test_passthrough_repository_through_gateway(gateway_stack, tmp_path):
    """plain/** is passed through: the registry behind Envoy holds the very same manifests."""
    proc = package("--registry", gateway_stack.opts.gateway_addr, "--repository", REPOSITORY,
                   "--tag", TAG, "--insecure", "--wasm", str(WASM), "--native", str(NATIVE),
                   "--out", str(tmp_path))
    got = json.loads((tmp_path / "digests.json").read_text())
    direct = helpers.Registry(gateway_stack.registry_url)
    assert [i["form"] for i in got["images"]] == ["compat", "artifact", "native"]
    for img in got["images"]:
        assert img["pushed"] is True, proc.stdout
        stored = direct.get_manifest(REPOSITORY, img["ref"])
        assert stored.status_code == 200
        assert f"sha256:{sha256_hex(stored.content)}" == img["digest"]


@pytest.mark.filter
def test_encrypted_repository_through_gateway_fails(gateway_stack, tmp_path):
    """demo/** is encrypted: the module would not be loadable, so the script must fail for that
    reason (the registry holds another manifest than the one pushed, with the layer encrypted)
    and say to use a passthrough repository; a failure of any other kind (skopeo missing, the
    gateway down) does not pass."""
    import re

    repository = "demo/ocicrypt-filter"
    proc = package("--registry", gateway_stack.opts.gateway_addr, "--repository",
                   repository, "--tag", TAG, "--insecure", "--wasm", str(WASM),
                   "--native", str(NATIVE), "--out", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = re.search(r"the registry holds \S+:(\S+) as (sha256:[0-9a-f]{64}), not the manifest "
                      r"pushed \((sha256:[0-9a-f]{64})\): something rewrote it\..*passthrough",
                      proc.stderr, re.S)
    assert found, proc.stderr
    ref, stored_digest, pushed_digest = found.groups()
    assert ref == TAG, proc.stderr
    direct = helpers.Registry(gateway_stack.registry_url)
    stored = direct.get_manifest(repository, ref)
    assert stored.status_code == 200
    assert f"sha256:{sha256_hex(stored.content)}" == stored_digest
    # The one layer (the module's tar.gz) is stored encrypted; the pushed plaintext is not.
    pushed = json.loads(blob(tmp_path / "oci", pushed_digest))
    (layer,) = stored.json()["layers"]
    assert layer["mediaType"] == MT_LAYER_TGZ + "+encrypted", layer
    assert not direct.blob_exists(repository, pushed["layers"][0]["digest"])
    # The script stopped at the first image: the artifact form was never pushed.
    assert direct.get_manifest(repository, f"{TAG}-wasm").status_code == 404
    assert direct.get_manifest(repository, f"{TAG}-native").status_code == 404
    assert not (tmp_path / "digests.json").exists()
