"""Upload styles not covered by the clients' own flows: the single-POST monolithic upload
(`POST ?digest=` with the blob) and a chunked upload finished by a `PUT ?digest=` that carries
the last chunk. Both must store ciphertext, answer in the client's digests and decrypt."""
import pytest
import requests

import helpers

pytestmark = [pytest.mark.filter]


@pytest.fixture(scope="module")
def styles_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-styles")
    return helpers.build_image(d / "layout", "v1", 3 * helpers.MIB, marker=helpers.new_marker())


def location_path(loc: str) -> str:
    return loc.split("://", 1)[1][loc.split("://", 1)[1].index("/"):] if "://" in loc else loc


def check_stored_and_decrypts(stack, repo, image, tmp_path):
    r = stack.via_gateway().put_manifest(repo, "v1", image.manifest_bytes)
    assert r.status_code == 201, r.text
    manifest = stack.direct().get_manifest(repo, "v1").json()
    helpers.assert_encrypted_manifest(manifest, image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/{repo}:v1", out, "v1",
                        keys=[stack.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image)
    assert not helpers.scan_for(stack.storage, [image.marker.encode()])


def test_single_post_upload(stack, styles_image, tmp_path):
    repo = "demo/single-post"
    for blob in [styles_image.config, *styles_image.layers]:
        data = blob.path.read_bytes()
        r = requests.post(f"http://{stack.addr}/v2/{repo}/blobs/uploads/",
                          params={"digest": blob.digest}, data=data,
                          headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == blob.digest
        assert r.headers["Location"].endswith(f"/v2/{repo}/blobs/{blob.digest}")
    check_stored_and_decrypts(stack, repo, styles_image, tmp_path)


def test_chunked_upload_finished_by_a_put_with_the_last_chunk(stack, styles_image, tmp_path):
    repo = "demo/put-last-chunk"
    base = f"http://{stack.addr}"
    for blob in [styles_image.config, *styles_image.layers]:
        data = blob.path.read_bytes()
        r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
        assert r.status_code == 202
        loc = location_path(r.headers["Location"])
        half = len(data) // 2
        r = requests.patch(base + loc, data=data[:half],
                           headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 202, r.text
        loc = location_path(r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{base}{loc}{sep}digest={blob.digest}", data=data[half:],
                         headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == blob.digest
    check_stored_and_decrypts(stack, repo, styles_image, tmp_path)
