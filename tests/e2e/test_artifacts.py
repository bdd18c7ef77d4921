"""Artifacts next to an encrypted image: cosign-style signature tags and referrers with a
`subject` pass (their blobs are JSON) and a `subject` naming the rewritten image is repointed to
what was stored; a Helm chart (a gzip layer no decryptor knows) is refused, and its bytes are
not stored in plaintext."""
import base64
import gzip
import hashlib
import io
import json
import tarfile

import pytest

import helpers

pytestmark = [pytest.mark.filter]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(reg, repo, data: bytes) -> dict:
    r = reg.upload_monolithic(repo, data, digest=sha(data))
    assert r.status_code == 201, r.text
    return {"digest": sha(data), "size": len(data)}


@pytest.fixture(scope="module")
def signed_image(stack, tmp_path_factory):
    image = helpers.build_image(tmp_path_factory.mktemp("signed") / "layout", "v1",
                                1 * helpers.MIB, marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{stack.addr}/demo/signed:v1", extra=["--preserve-digests"])
    stored = stack.direct().get_manifest("demo/signed", "v1")
    return image, stored.headers["Docker-Content-Digest"], len(stored.content)


def test_cosign_style_signature_tag_passes_unchanged(stack, signed_image):
    image, stored_digest, _ = signed_image
    reg = stack.via_gateway()
    payload = json.dumps({"critical": {"identity": {"docker-reference": f"{stack.addr}/demo/signed"},
                                       "image": {"docker-manifest-digest": stored_digest},
                                       "type": "cosign container image signature"},
                          "optional": None}).encode()
    layer = blob(reg, "demo/signed", payload)
    config = blob(reg, "demo/signed", b'{"architecture":"","os":"","rootfs":{"type":"layers","diff_ids":[]}}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", **layer,
                    "annotations": {"dev.cosignproject.cosign/signature":
                                    base64.b64encode(b"not-a-real-signature").decode()}}],
    }, separators=(",", ":")).encode()
    tag = stored_digest.replace(":", "-") + ".sig"
    r = reg.put_manifest("demo/signed", tag, manifest)
    assert r.status_code == 201, r.text
    got = stack.direct().get_manifest("demo/signed", tag)
    assert got.content == manifest, "the signature manifest was changed"
    assert stack.direct().get_blob("demo/signed", layer["digest"]) == payload


def test_referrer_subject_is_repointed_to_the_stored_image(stack, signed_image):
    image, stored_digest, stored_size = signed_image
    reg = stack.via_gateway()
    sbom = blob(reg, "demo/signed", b'{"spdxVersion":"SPDX-2.3","name":"demo"}')
    empty = blob(reg, "demo/signed", b"{}")
    referrer = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", **empty},
        "layers": [{"mediaType": "application/spdx+json", **sbom}],
        # The client names the image by the digest it pushed (the plaintext manifest).
        "subject": {"mediaType": MT_MANIFEST, "digest": image.manifest_digest,
                    "size": len(image.manifest_bytes)},
    }, separators=(",", ":")).encode()
    r = reg.put_manifest("demo/signed", sha(referrer), referrer)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha(referrer)
    stored = stack.direct().get_manifest("demo/signed", r.headers["X-Ocicrypt-Stored-Digest"]).json()
    assert stored["subject"]["digest"] == stored_digest
    assert stored["subject"]["size"] == stored_size


def test_helm_chart_is_refused_and_not_stored_in_plaintext(stack):
    reg = stack.via_gateway()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"apiVersion: v2\nname: secret-chart\nversion: 0.1.0\n"
        info = tarfile.TarInfo("secret-chart/Chart.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    chart = gzip.compress(buf.getvalue(), mtime=0)
    layer = blob(reg, "demo/charts", chart)
    config = blob(reg, "demo/charts", b'{"name":"secret-chart","version":"0.1.0","apiVersion":"v2"}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", **layer}],
    }, separators=(",", ":")).encode()
    r = reg.put_manifest("demo/charts", "0.1.0", manifest)
    assert r.status_code == 400, r.text
    assert helpers.oci_error_codes(r) == ["MANIFEST_INVALID"]
    assert "unencrypted repository" in r.text or "passthrough" in r.text, r.text
    assert stack.direct().get_manifest("demo/charts", "0.1.0").status_code == 404
    # The chart's bytes went to the registry encrypted: its plaintext digest is not there.
    assert not stack.direct().blob_exists("demo/charts", layer["digest"])
    assert not helpers.scan_for(stack.storage, [b"secret-chart/Chart.yaml"])
