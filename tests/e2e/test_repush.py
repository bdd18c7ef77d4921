"""Re-pushes and pushes of the same image into another repository of the same project: the
gateway answers HEAD of a plaintext digest and cross-repository mounts from what it already
encrypted for the project's recipients, so clients skip the upload; never across projects."""
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import helpers
from conftest import STARTED, _start_stack

pytestmark = [pytest.mark.filter, pytest.mark.clients]

UPLOAD_METHODS = ("PATCH", "PUT")


def uploaded_blob_bytes(entries):
    """Request body bytes of blob uploads (manifest PUTs excluded)."""
    return sum(int(e["bytes_received"] or 0) for e in entries
               if e["method"] in UPLOAD_METHODS and "/blobs/uploads/" in (e["path"] or ""))


@pytest.fixture(scope="module")
def repush_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-repush")
    return helpers.build_image(d / "layout", "v1", 8 * helpers.MIB, marker=helpers.new_marker())


def test_repush_uploads_no_layer_bytes(stack, repush_image, tmp_path):
    first = stack.access_log()
    helpers.skopeo_push(repush_image, f"{stack.addr}/demo/rp:v1", extra=["--preserve-digests"])
    first_bytes = uploaded_blob_bytes(first.entries())
    assert first_bytes >= repush_image.layers[0].size, "the first push did not upload the layers"

    again = stack.access_log()
    helpers.skopeo_push(repush_image, f"{stack.addr}/demo/rp:v2", extra=["--preserve-digests"])
    entries = again.entries()
    heads = [e for e in entries if e["method"] == "HEAD" and "/blobs/" in (e["path"] or "")]
    assert heads, helpers.AccessLog.summary(entries)
    assert uploaded_blob_bytes(entries) == 0, helpers.AccessLog.summary(entries)
    print(f"re-push: {first_bytes} bytes uploaded the first time, 0 the second time")

    manifest = stack.direct().get_manifest("demo/rp", "v2").json()
    helpers.assert_encrypted_manifest(manifest, repush_image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/demo/rp:v2", out, "v2",
                        keys=[stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v2", repush_image)


def test_push_to_another_repository_of_the_project_mounts_the_ciphertext(stack, repush_image,
                                                                          tmp_path):
    helpers.skopeo_push(repush_image, f"{stack.addr}/demo/rp-src:v1", extra=["--preserve-digests"])
    log = stack.access_log()
    helpers.skopeo_push(repush_image, f"{stack.addr}/demo/rp-dst:v1", extra=["--preserve-digests"])
    entries = log.entries()
    mounted = [e for e in entries if e["method"] == "POST" and "mount=" in (e["path"] or "")
               and e["status"] == 201]
    assert mounted, "no mount succeeded:\n" + helpers.AccessLog.summary(entries)
    big = repush_image.layers[0].size
    assert uploaded_blob_bytes(entries) < big, helpers.AccessLog.summary(entries)

    manifest = stack.direct().get_manifest("demo/rp-dst", "v1").json()
    helpers.assert_encrypted_manifest(manifest, repush_image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/demo/rp-dst:v1", out, "v1",
                        keys=[stack.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", repush_image)


@pytest.fixture(scope="module")
def two_projects(tmp_path_factory):
    """A stack where project `other` is encrypted to a key of its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    d = tmp_path_factory.mktemp("other-key")
    (d / "other.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    s = _start_stack(tmp_path_factory, "two-projects", 40, filter=True,
                     extra_rules=[{"repositories": "other/**", "action": "encrypt"}],
                     extra_projects={"other": {"recipients": [{"pem": pub}]}})
    s.other_key = d / "other.pem"
    yield s
    STARTED.remove(s)
    s.gw.stop()


def test_no_mount_across_projects(two_projects, repush_image, tmp_path):
    s = two_projects
    helpers.skopeo_push(repush_image, f"{s.addr}/demo/x:v1", extra=["--preserve-digests"])
    log = s.access_log()
    helpers.skopeo_push(repush_image, f"{s.addr}/other/x:v1", extra=["--preserve-digests"])
    entries = log.entries()
    assert not [e for e in entries if e["method"] == "POST" and e["status"] == 201
                and "mount=" in (e["path"] or "")], helpers.AccessLog.summary(entries)
    assert uploaded_blob_bytes(entries) >= repush_image.layers[0].size
    out = tmp_path / "out"
    # Only `other`'s key decrypts other/x; demo's keys are no recipients of it.
    helpers.skopeo_pull(f"{s.registry_addr}/other/x:v1", out, "v1", keys=[s.other_key])
    helpers.assert_decrypted_matches(out, "v1", repush_image)
    refused = helpers.skopeo_pull(f"{s.registry_addr}/other/x:v1", tmp_path / "no", "v1",
                                  keys=[s.keys["rsa"]["private"]], check=False)
    assert refused.returncode != 0


def test_metrics_after_a_push(stack, tmp_path):
    """The filter's stats appear on Envoy's Prometheus endpoint and move with a push."""
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB,
                                marker=helpers.new_marker())

    def scrape():
        return helpers.envoy_stats(stack.opts.admin_addr)

    before = scrape()
    helpers.skopeo_push(image, f"{stack.addr}/demo/metrics:v1", extra=["--preserve-digests"])
    after = scrape()
    assert after["ocicrypt_layers_encrypted"] >= before["ocicrypt_layers_encrypted"] + 2
    assert after["ocicrypt_bytes_encrypted"] >= before["ocicrypt_bytes_encrypted"] \
        + image.layers[0].size
    assert after["ocicrypt_manifests_rewritten"] >= before["ocicrypt_manifests_rewritten"] + 1
    # This push left no upload state behind (other tests' abandoned uploads may have).
    assert after["ocicrypt_uploads_in_flight"] == before["ocicrypt_uploads_in_flight"]


def _pipeline_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / "pipeline.pem", tmp_path / "pipeline.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_image_encrypted_by_the_pipeline_passes_unchanged(stack, tmp_path):
    """skopeo encrypts in the pipeline (its own recipient); in a repository whose policy rule
    opts in (`accept_encrypted`, demo/pipeline/** in the test stack) the layers are recognised as
    ciphertext, pass as they are, and the image decrypts with the pipeline's key."""
    priv, pub = _pipeline_key(tmp_path)
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB,
                                marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{stack.addr}/demo/pipeline/pre:v1",
                        extra=["--encryption-key", f"jwe:{pub}"])
    manifest = stack.direct().get_manifest("demo/pipeline/pre", "v1").json()
    assert all(l["mediaType"].endswith("+encrypted") for l in manifest["layers"]), manifest
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/demo/pipeline/pre:v1", out, "v1", keys=[priv])
    helpers.assert_decrypted_matches(out, "v1", image, exact=False)
    assert not helpers.scan_for(stack.storage, [image.marker.encode()])


def test_image_encrypted_by_the_pipeline_is_encrypted_again_without_opt_in(stack, tmp_path):
    """Without the opt-in every non-JSON blob is encrypted by the gateway, whatever it looks
    like (a random-looking first chunk once let a plaintext blob through): the OCI manifest that
    declares the layers `+encrypted` itself is refused; skopeo then falls back to a Docker
    manifest, which the gateway stores with its own encryption over the pipeline's. Nothing
    passed as the pipeline pushed it: the pipeline's key alone cannot open what is stored."""
    priv, pub = _pipeline_key(tmp_path)
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * helpers.MIB,
                                marker=helpers.new_marker())
    log = helpers.AccessLog(stack.opts.access_log)
    log.mark()
    helpers.skopeo_push(image, f"{stack.addr}/demo/pre-no:v1",
                        extra=["--encryption-key", f"jwe:{pub}"], check=False)
    refused = [e for e in log.entries()
               if e["method"] == "PUT" and str(e["status"]) == "400"
               and "/manifests/" in (e.get("upstream_path") or e.get("path") or "")]
    assert refused, helpers.AccessLog.summary(log.entries())
    assert not helpers.scan_for(stack.storage, [image.marker.encode()])
    stored = stack.direct().get_manifest("demo/pre-no", "v1")
    if stored.status_code == 200:
        res = helpers.skopeo_pull(f"{stack.registry_addr}/demo/pre-no:v1", tmp_path / "out",
                                  "v1", keys=[priv], check=False)
        assert res.returncode != 0, "the pipeline's ciphertext was stored as it was pushed"
