"""Issue 12, finding 5: the replicas' state key seals upload state (layer keys) into Locations;
whoever holds it opens every sealed token. It reaches the VM through its environment and must
appear in nothing Envoy shows or writes: /config_dump, the rendered configuration, the logs."""
from __future__ import annotations

import base64

import pytest
import requests

import helpers

pytestmark = pytest.mark.filter


def _key_forms(key_b64: str):
    raw = base64.b64decode(key_b64)
    return [key_b64.encode(), key_b64.rstrip("=").encode(), raw,
            base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode()]


def test_state_key_is_in_no_config_dump_and_no_log(ledger_stack, tmp_path):
    """A push through a stack with a state key works (the VM got the key from its environment),
    and the key is in neither the admin config dump, the rendered envoy.yaml, nor any log."""
    key = ledger_stack.opts.state_key
    assert key
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB,
                                marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{ledger_stack.addr}/demo/secrets:v1")
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{ledger_stack.registry_addr}/demo/secrets:v1", out, "v1",
                        keys=[ledger_stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image, exact=False)

    dump = requests.get(f"http://{ledger_stack.opts.admin_addr}/config_dump"
                        "?include_eds", timeout=10).content
    # The configuration names the variable, not the key.
    assert b"state_key_env" in dump and b"OCICRYPT_STATE_KEY" in dump
    state_dir = ledger_stack.opts.state_dir
    places = {"config_dump": dump}
    for f in ["envoy.yaml", "envoy.log", "envoy-access.log", "registry.log"]:
        p = state_dir / f
        if p.exists():
            places[f] = p.read_bytes()
    for name, data in places.items():
        for form in _key_forms(key):
            assert form not in data, f"the state key is in {name}"
