"""Recipient keys from the real key service: a python-tuf repository (scripts/keyservice) served
by nginx behind an Envoy cluster. Pushes use what verifies against the pinned root; every attack
on the served repository makes pushes fail closed (503, nothing stored); key and root rotations
are picked up by the filter's timer without restarting Envoy."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import helpers
from conftest import STARTED, _start_stack

pytestmark = [pytest.mark.filter]

KEYSERVICE = Path(__file__).resolve().parents[2] / "scripts" / "keyservice"
REFRESH = 2  # seconds between the filter's key-service refreshes in these stacks


def keyservice(stack, *args):
    proc = subprocess.run([sys.executable, str(KEYSERVICE), *args, "--repo",
                           str(stack.opts.keyservice_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def serve(stack, directory: Path):
    """Point what nginx serves at `directory` (atomically, nginx follows the link per request)."""
    link = stack.opts.keyservice_served
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(directory)
    os.replace(tmp, link)


def upload_start(stack, repo="demo/ks"):
    return requests.post(f"http://{stack.addr}/v2/{repo}/blobs/uploads/", timeout=30)


def wait_for_status(stack, want, timeout=20.0):
    """Poll until a push would get `want` at its first request (the timer refreshes every
    REFRESH seconds; a failing refresh turns the record into a refusal)."""
    deadline = time.monotonic() + timeout
    while True:
        r = upload_start(stack)
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


@pytest.fixture
def ks_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "keyservice", 50, filter=True,
                     keyservice_refresh_seconds=REFRESH)
    yield s
    STARTED.remove(s)
    s.gw.stop()


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-ks")
    return helpers.build_image(d / "layout", "v1", 1 * helpers.MIB, marker=helpers.new_marker())


def push(stack, image, ref, check=True):
    return helpers.skopeo_push(image, f"{stack.addr}/{ref}", extra=["--preserve-digests"],
                               check=check)


def test_push_with_keys_from_the_key_service_decrypts(ks_stack, small_image, tmp_path):
    plugin = json.loads((ks_stack.opts.state_dir / "plugin-config.json").read_text())
    assert "key_service" in plugin and "demo" not in plugin.get("projects", {}), \
        "the stack must take demo's recipients from the key service"
    push(ks_stack, small_image, "demo/ks:v1")
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{ks_stack.registry_addr}/demo/ks:v1", out, "v1",
                        keys=[ks_stack.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", small_image)
    stats = requests.get(f"http://{ks_stack.opts.admin_addr}/stats/prometheus", timeout=10).text
    assert "ocicrypt_keyservice_root_version" in stats


ATTACKS = ["tampered-target", "rollback", "rollback-targets", "freeze", "fast-forward",
           "mix-and-match", "bad-signature", "too-few-signatures", "substituted-key"]
#: What the filter's refusal must name for each attack (the TUF step that refused it).
ATTACK_REASONS = {
    "tampered-target": "projects/demo.json: sha256 ",
    "rollback": "timestamp version 1 where >= 2 was expected",
    "rollback-targets": "targets.json version 1 where >= 2 was expected",
    "freeze": "timestamp metadata expired at ",
    "fast-forward": "targets version 2 where 1002 was expected",
    "mix-and-match": "targets version 1 where 2 was expected",
    "bad-signature": "targets metadata is signed by 0 of the 1 required keys",
    "too-few-signatures": "root metadata is signed by 1 of the 2 required keys",
    "substituted-key": "targets metadata is signed by 0 of the 1 required keys",
}


@pytest.mark.parametrize("kind", ATTACKS)
def test_attacked_key_service_fails_closed(ks_stack, small_image, kind, tmp_path):
    attack = json.loads("{}")
    out = tmp_path / "attack"
    keyservice(ks_stack, "attack", "--out", str(out), "--kind", kind, "--project", "demo")
    attack = json.loads((out / "ATTACK.json").read_text())
    if attack["client"] != "cold":
        # The gateway has seen the genuine repository (warm), as a rollback needs.
        assert upload_start(ks_stack).status_code == 202
    serve(ks_stack, out)
    r = wait_for_status(ks_stack, 503)
    assert r.status_code == 503, f"{kind}: the attacked key service was trusted ({r.status_code})"
    body = r.json()
    assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "demo" in body["errors"][0]["message"]
    # The refusal names the TUF check that caught this attack, not just any failure.
    assert f"key service metadata did not verify: {ATTACK_REASONS[kind]}" in \
        body["errors"][0]["message"], body
    refused = push(ks_stack, small_image, f"demo/attacked-{kind}:v1", check=False)
    assert refused.returncode != 0
    assert stack_has_no_repo(ks_stack, f"demo/attacked-{kind}")


def stack_has_no_repo(stack, repo) -> bool:
    return not (stack.storage / "docker" / "registry" / "v2" / "repositories" / repo / "_layers").exists()


def test_key_service_down_fails_closed(ks_stack, small_image):
    assert upload_start(ks_stack).status_code == 202
    serve(ks_stack, ks_stack.opts.state_dir / "nothing-here")
    r = wait_for_status(ks_stack, 503)
    assert r.status_code == 503, r.text
    assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
    assert r.json()["errors"][0]["message"].startswith(
        'no verified recipient keys for project "demo": key service unreachable or failing '
        '(HTTP 404 for /metadata/timestamp.json)'), r.text
    # Back: the next refresh succeeds and pushes go on.
    serve(ks_stack, ks_stack.opts.keyservice_dir)
    assert wait_for_status(ks_stack, 202).status_code == 202


def test_unknown_project_fails_closed(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "keyservice-unknown", 60, filter=True,
                     keyservice_refresh_seconds=REFRESH,
                     extra_rules=[{"repositories": "ghost/**", "action": "encrypt"}])
    try:
        r = upload_start(s, "ghost/app")
        assert r.status_code == 503
        assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
        assert r.json()["errors"][0]["message"].startswith(
            'no verified recipient keys for project "ghost": the key service has no recipients '
            'for this project (target "projects/ghost.json" is not listed'), r.text
    finally:
        STARTED.remove(s)
        s.gw.stop()


def test_recipient_and_root_rotation_without_restart(ks_stack, small_image, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    push(ks_stack, small_image, "demo/rot:before")
    envoy_pid = next(p.pid for name, p in ks_stack.gw.procs if name == "envoy")

    new_key = ec.generate_private_key(ec.SECP384R1())
    priv = tmp_path / "new.pem"
    pub = tmp_path / "new.pub.pem"
    priv.write_bytes(new_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub.write_bytes(new_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    keyservice(ks_stack, "rotate-root")
    keyservice(ks_stack, "set-recipients", "--project", "demo", "--pem", str(pub))

    image2 = helpers.build_image(tmp_path / "img2", "v1", 1 * helpers.MIB,
                                 marker=helpers.new_marker())
    deadline = time.monotonic() + 30
    refused = []
    while True:
        # A refresh that ran while the key service was rewriting its files may fail verification
        # (its files are replaced one by one); the gateway then refuses pushes that need a lookup
        # for a few seconds (fail closed) and recovers at a later refresh. What must hold is that
        # it recovers, without a restart, well within the deadline.
        pushed = push(ks_stack, image2, "demo/rot:after", check=False)
        if pushed.returncode != 0:
            refused.append(pushed.stderr.strip().splitlines()[-1:])
            ok = pushed
        else:
            manifest = ks_stack.direct().get_manifest("demo/rot", "after").json()
            ok = helpers.skopeo_pull(f"{ks_stack.registry_addr}/demo/rot:after",
                                     tmp_path / "new-out", "v1", keys=[priv], check=False)
        if ok.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(REFRESH)
    assert ok.returncode == 0, \
        f"the rotated recipient was not picked up (pushes refused: {refused}):\n" + ok.stderr
    if refused:
        print(f"pushes refused while the rotation propagated: {refused}")
    assert manifest["layers"][0]["mediaType"].endswith("+encrypted")
    helpers.assert_decrypted_matches(tmp_path / "new-out", "v1", image2)
    # The old key is no recipient of the new image ...
    old = helpers.skopeo_pull(f"{ks_stack.registry_addr}/demo/rot:after", tmp_path / "old-new",
                              "v1", keys=[ks_stack.keys["rsa"]["private"]], check=False)
    assert old.returncode != 0
    # ... and still opens the image pushed before the rotation.
    helpers.skopeo_pull(f"{ks_stack.registry_addr}/demo/rot:before", tmp_path / "old-out", "v1",
                        keys=[ks_stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(tmp_path / "old-out", "v1", small_image)
    # Same Envoy all along, now trusting root v2.
    assert next(p.pid for name, p in ks_stack.gw.procs if name == "envoy") == envoy_pid
    stats = requests.get(f"http://{ks_stack.opts.admin_addr}/stats/prometheus", timeout=10).text
    versions = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in stats.splitlines()
                if l.startswith("ocicrypt_keyservice_root_version")}
    assert versions.get("ocicrypt_keyservice_root_version", 0) >= 2, versions
