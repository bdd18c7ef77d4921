"""The registry behind htpasswd basic auth: clients send credentials through the gateway (the
filter's own callouts to the registry must carry them too)."""
from __future__ import annotations

import pytest

import helpers
from conftest import AUTH, Push, attempt_push, oras_push

pytestmark = [pytest.mark.filter, pytest.mark.auth, pytest.mark.clients]


@pytest.fixture(scope="session")
def auth_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-auth")
    return helpers.build_image(d / "layout", "v1", 8 * helpers.MIB, marker=helpers.new_marker())


def _check_encrypted_and_decrypts(stack, repo, image, tmp_path, exact=True):
    r = stack.direct().get_manifest(repo, "v1")
    assert r.status_code == 200, f"{repo}: {r.status_code} {r.text[:300]}"
    helpers.assert_encrypted_manifest(r.json(), image, exact=exact)
    for kind in ("rsa", "ec"):
        out = tmp_path / f"out-{kind}"
        helpers.skopeo_pull(f"{stack.addr}/{repo}:v1", out, "v1", creds=AUTH,
                            keys=[stack.keys[kind]["private"]])
        helpers.assert_decrypted_matches(out, "v1", image, exact=exact)


def test_unauthenticated_push_is_refused(auth_stack, auth_image):
    proc = helpers.skopeo_push(auth_image, f"{auth_stack.addr}/demo/noauth:v1", check=False)
    assert proc.returncode != 0
    assert auth_stack.direct().get_manifest("demo/noauth", "v1").status_code == 404
    r = auth_stack.via_gateway(creds=None).start_upload("demo/noauth")
    assert r.status_code == 401
    assert helpers.oci_error_codes(r) == ["UNAUTHORIZED"]


@pytest.fixture(scope="session")
def auth_push_skopeo(auth_stack, auth_image) -> Push:
    return attempt_push(auth_stack, "skopeo", "demo/app", auth_image, True,
                        lambda p: helpers.skopeo_push(auth_image, f"{auth_stack.addr}/{p.ref}",
                                                      creds=AUTH, extra=["--preserve-digests"]))


@pytest.fixture(scope="session")
def auth_push_ctr(auth_stack, containerd, auth_image) -> Push:
    ref = containerd.import_image(auth_image, "e2e.local/auth")
    return attempt_push(auth_stack, "ctr", "demo/ctr", auth_image, True,
                        lambda p: containerd.push(ref, f"{auth_stack.addr}/{p.ref}", creds=AUTH))


@pytest.fixture(scope="session", params=[False, True], ids=["monolithic", "chunked"])
def auth_push_oras(request, auth_stack, auth_image) -> Push:
    chunked = request.param
    return attempt_push(auth_stack, "oras", f"demo/oras-{'chunked' if chunked else 'mono'}",
                        auth_image, True,
                        lambda p: oras_push(auth_image, auth_stack.addr, p.ref, chunked=chunked,
                                            creds=AUTH, chunk_size=4 * helpers.MIB))


def test_skopeo_with_credentials(auth_stack, auth_push_skopeo, tmp_path):
    auth_push_skopeo.check()
    _check_encrypted_and_decrypts(auth_stack, "demo/app", auth_push_skopeo.image, tmp_path)


def test_ctr_with_credentials(auth_stack, auth_push_ctr, tmp_path):
    auth_push_ctr.check()
    _check_encrypted_and_decrypts(auth_stack, "demo/ctr", auth_push_ctr.image, tmp_path)


def test_oras_with_credentials(auth_stack, auth_push_oras, tmp_path):
    auth_push_oras.check()
    _check_encrypted_and_decrypts(auth_stack, auth_push_oras.repo, auth_push_oras.image, tmp_path)


def test_no_plaintext_in_auth_registry_storage(auth_stack, auth_image, auth_push_skopeo,
                                               auth_push_ctr):
    assert auth_push_skopeo.error is None or auth_push_ctr.error is None, \
        "nothing was pushed to the auth stack: the scan would prove nothing"
    hits = helpers.scan_for(auth_stack.storage, [auth_image.marker.encode()])
    assert not hits, f"plaintext marker in registry storage: {hits}"
    present = [d for d in auth_image.layer_digests
               if helpers.registry_blob_path(auth_stack.storage, d).exists()]
    assert not present, f"plaintext layer blobs stored: {present}"
