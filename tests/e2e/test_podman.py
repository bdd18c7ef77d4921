"""podman push through the gateway (Debian podman 4.3): images pulled from an OCI layout into a
private podman storage (its own --root and --runroot in a temporary directory, vfs driver), then
`podman push` to an encrypted repository. podman gzips the uncompressed layers as it pushes
(layer digests change, their uncompressed content does not), so the oracle compares
uncompressed digests: skopeo `--decryption-key` pulls each image back with each recipient's key
alone and every layer unpacks to the original. The planted marker is nowhere in the registry's
storage. A missing podman fails the test (OCICRYPT_ALLOW_MISSING_TOOLS=1 turns that into a
skip for a local run)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

import helpers
from helpers import MIB
from test_multiplatform import multi_layout  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.filter, pytest.mark.clients]


class Podman:
    """podman with a storage of its own (root, runroot, vfs), nothing shared with the host's."""

    def __init__(self, base: Path):
        found = shutil.which("podman")
        if found is None:
            reason = "podman is missing: install Debian podman (scripts/setup)"
            if os.environ.get("OCICRYPT_ALLOW_MISSING_TOOLS"):
                pytest.skip(f"{reason} (OCICRYPT_ALLOW_MISSING_TOOLS is set)")
            pytest.fail(f"{reason}, or set OCICRYPT_ALLOW_MISSING_TOOLS=1 to skip it in a local "
                        "run", pytrace=False)
        self.argv = [found, "--root", str(base / "root"), "--runroot", str(base / "run"),
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "none"]

    def __call__(self, *args, check: bool = True):
        return helpers.run([*self.argv, *args], check=check, timeout=helpers.CLIENT_TIMEOUT)

    def load(self, image: helpers.Image, name: str) -> str:
        """The layout's image in podman's storage as `name`; returns the local reference."""
        self("pull", "-q", image.oci_ref)
        ref = f"localhost/{name}:{image.tag}"
        image_id = self("images", "-q", "--no-trunc", "--filter",
                        f"label=e2e.unique={_label(image)}").stdout.split()
        assert image_id, self("images").stdout
        self("tag", image_id[0], ref)
        return ref


def _label(image: helpers.Image) -> str:
    config = json.loads(image.blob_path(image.config.digest).read_bytes())
    return config["config"]["Labels"]["e2e.unique"]


def single_layer_image(layout: Path, size: int, marker: str) -> helpers.Image:
    """An OCI layout of one uncompressed layer (random data and the marker) and its config."""
    image = helpers.build_image(layout, "v1", size, marker=marker)
    big = image.layers[0]
    config = json.loads(image.blob_path(image.config.digest).read_bytes())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:1]
    config["history"] = config["history"][:1]
    cfg = helpers._write_blob(layout, json.dumps(config, separators=(",", ":")).encode(),
                              helpers.MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": helpers.MT_MANIFEST,
                "config": cfg.descriptor(), "layers": [big.descriptor()]}
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    mblob = helpers._write_blob(layout, mbytes, helpers.MT_MANIFEST)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(mblob.descriptor())
    (layout / "index.json").write_text(json.dumps(index))
    return helpers.Image(layout, "v1", cfg, [big], config["rootfs"]["diff_ids"], mbytes,
                         mblob.digest, marker)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    return Podman(tmp_path_factory.mktemp("podman"))


def push_and_check(stack, podman: Podman, layers: int, tmp_path: Path, creds=None) -> None:
    """podman pushes a new image of `layers` layers to demo/; the registry holds it encrypted,
    skopeo decrypts it with each demo key alone to the original layers, no marker is stored."""
    marker = helpers.new_marker()
    layout = tmp_path / "layout"
    image = (single_layer_image(layout, 6 * MIB, marker) if layers == 1
             else helpers.build_image(layout, "v1", 6 * MIB, marker=marker))
    assert len(image.layers) == layers
    ref = podman.load(image, f"e2e/podman-{layers}")
    repo = f"demo/podman-{layers}{'-creds' if creds else ''}"
    log = stack.access_log()
    extra = ["--creds", f"{creds[0]}:{creds[1]}"] if creds else []
    podman("push", "--tls-verify=false", *extra, ref, f"docker://{stack.addr}/{repo}:v1")
    entries = log.entries()
    # The big layer went through the gateway (podman gzips it as it sends: no Content-Length).
    assert any(e["method"] == "PATCH" and int(e["bytes_received"] or 0) > MIB
               for e in entries), helpers.AccessLog.summary(entries)

    stored = stack.via_gateway().get_manifest(repo, "v1")
    assert stored.status_code == 200, stored.text
    manifest = stored.json()
    assert len(manifest["layers"]) == layers
    helpers.assert_encrypted_manifest(manifest, image, exact=False)
    for kind in ("rsa", "ec"):
        out = tmp_path / f"out-{kind}"
        helpers.skopeo_pull(f"{stack.addr}/{repo}:v1", out, "v1", creds=creds,
                            keys=[stack.keys[kind]["private"]])
        helpers.assert_decrypted_matches(out, "v1", image, exact=False)
    assert not helpers.scan_for(stack.storage, [marker.encode()])


@pytest.mark.parametrize("layers", [1, 2], ids=["single-layer", "multi-layer"])
def test_podman_push_is_encrypted_and_decrypts(stack, podman, layers, tmp_path):
    push_and_check(stack, podman, layers, tmp_path)


@pytest.mark.auth
def test_podman_push_with_bearer_tokens(token_stack, podman, tmp_path):
    """The same through the token stack (tests/e2e/test_token_auth.py): podman gets its token
    from the gateway's /service/token."""
    from conftest import AUTH

    push_and_check(token_stack, podman, 2, tmp_path, creds=AUTH)


def test_podman_manifest_push_of_a_two_platform_image(stack, podman, multi_layout, tmp_path):
    """`podman manifest push --all`: each platform manifest pushed by digest (the gateway stores
    it under its new digest and answers podman in podman's digest), then the list by tag
    (rewritten to name the stored platforms). Every platform decrypts with skopeo `--all`."""
    layout, images = multi_layout
    name = "localhost/e2e-podman-list"
    podman("manifest", "rm", name, check=False)
    podman("manifest", "create", name)
    for arch, image in images.items():
        variant = ["--variant", "v8"] if arch == "arm64" else []
        podman("manifest", "add", "--arch", arch, "--os", "linux", *variant, name,
               image.oci_ref)
    repo = "demo/podman-multi"
    log = stack.access_log()
    podman("manifest", "push", "--all", "--tls-verify=false", name,
           f"docker://{stack.addr}/{repo}:v1")
    entries = log.entries()
    by_digest = [e for e in entries if e["method"] == "PUT"
                 and e["path"].startswith(f"/v2/{repo}/manifests/sha256:")]
    assert [e["status"] for e in by_digest] == [201, 201], helpers.AccessLog.summary(entries)
    index = stack.direct().get_manifest(repo, "v1").json()
    assert len(index["manifests"]) == 2, index
    for child in index["manifests"]:
        m = stack.direct().get_manifest(repo, child["digest"])
        assert m.status_code == 200, child
        assert all(x["mediaType"].endswith("+encrypted") for x in m.json()["layers"]), m.text
    out = tmp_path / "out"
    helpers.run(["skopeo", "copy", "--all", "--src-tls-verify=false",
                 "--dest-oci-accept-uncompressed-layers", "--decryption-key",
                 str(stack.keys["ec"]["private"]), f"docker://{stack.registry_addr}/{repo}:v1",
                 f"oci:{out}:v1"], timeout=helpers.CLIENT_TIMEOUT)
    blobs = out / "blobs" / "sha256"
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    pulled = json.loads((blobs / top["digest"].split(":")[1]).read_text())
    for child in pulled["manifests"]:
        image = images[child["platform"]["architecture"]]
        m = json.loads((blobs / child["digest"].split(":")[1]).read_text())
        assert not any("+encrypted" in x["mediaType"] for x in m["layers"])
        # podman may compress on push: compared by content (uncompressed), as diff_ids.
        config = json.loads((blobs / m["config"]["digest"].split(":")[1]).read_text())
        assert config["rootfs"]["diff_ids"] == image.diff_ids, child
        for layer, diff_id in zip(m["layers"], image.diff_ids):
            data = (blobs / layer["digest"].split(":")[1]).read_bytes()
            if layer["mediaType"].endswith("gzip"):
                data = gzip.decompress(data)
            assert helpers.sha256_digest(data) == diff_id, layer
    assert not helpers.scan_for(stack.storage, [i.marker.encode() for i in images.values()])
