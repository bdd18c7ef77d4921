"""Multi-platform images: `skopeo copy --all` of an OCI layout whose tag names an image index
(children pushed by digest, then the index by tag). Every child is rewritten and stored by the
gateway's own `PUT` under its new digest (no tag), the index is rewritten to name them, and every
platform pulls back and decrypts."""
import hashlib
import json
import shutil

import pytest

import helpers

pytestmark = [pytest.mark.filter, pytest.mark.clients]

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def multi_layout(tmp_path_factory):
    base = tmp_path_factory.mktemp("multi")
    platforms = [("amd64", None), ("arm64", "v8")]
    images = {}
    layout = base / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    children = []
    for arch, variant in platforms:
        img = helpers.build_image(base / arch, "v1", 1 * helpers.MIB, marker=helpers.new_marker())
        for blob in (base / arch / "blobs" / "sha256").iterdir():
            shutil.copy(blob, layout / "blobs" / "sha256" / blob.name)
        platform = {"architecture": arch, "os": "linux"}
        if variant:
            platform["variant"] = variant
        children.append({"mediaType": MT_MANIFEST, "digest": img.manifest_digest,
                         "size": len(img.manifest_bytes), "platform": platform})
        images[arch] = img
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": children},
                       separators=(",", ":")).encode()
    (layout / "blobs" / "sha256" / sha(index).split(":")[1]).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{"mediaType": MT_INDEX, "digest": sha(index), "size": len(index),
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return layout, images


def test_multi_platform_index_push_and_decrypt_every_platform(stack, multi_layout, tmp_path):
    layout, images = multi_layout
    helpers.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                 f"oci:{layout}:v1", f"docker://{stack.addr}/demo/multi:v1"],
                timeout=helpers.CLIENT_TIMEOUT)
    reg = stack.direct()
    r = reg.get_manifest("demo/multi", "v1")
    index = r.json()
    assert index["mediaType"] == MT_INDEX, index
    assert len(index["manifests"]) == 2
    for child in index["manifests"]:
        arch = child["platform"]["architecture"]
        # Rewritten: the child's digest is no longer the one pushed.
        assert child["digest"] != images[arch].manifest_digest
        m = reg.get_manifest("demo/multi", child["digest"]).json()
        helpers.assert_encrypted_manifest(m, images[arch])

    # Each child stored under its new digest by the gateway, and under no tag of its own: the
    # index is what keeps it (issue 19: deleting the image frees its platforms).
    tags = helpers.tags(reg, "demo/multi")
    for img in images.values():
        assert "ocicrypt.sha256-" + img.manifest_digest.split(":")[1] not in tags, tags

    helpers.skopeo_pull_all(f"{stack.registry_addr}/demo/multi:v1", tmp_path / "out",
                            stack.keys["rsa"]["private"], images)
    assert not helpers.scan_for(stack.storage, [images[a].marker.encode() for a in images])
