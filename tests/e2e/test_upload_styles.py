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


def check_stored_and_decrypts(stack, repo, image, tmp_path):
    r = stack.via_gateway().put_manifest(repo, "v1", image.manifest_bytes)
    assert r.status_code == 201, r.text
    helpers.check_stored_encrypted_and_decrypts(stack, repo, image, tmp_path / "out",
                                                stack.keys["ec"]["private"])


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
        loc = helpers.location_path(r.headers["Location"])
        half = len(data) // 2
        r = requests.patch(base + loc, data=data[:half],
                           headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 202, r.text
        loc = helpers.location_path(r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{base}{loc}{sep}digest={blob.digest}", data=data[half:],
                         headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == blob.digest
    check_stored_and_decrypts(stack, repo, styles_image, tmp_path)
