"""Checks of the harness itself, against Envoy WITHOUT the filter: the stack starts, the real
clients push through Envoy as they should, the oracle decrypts what skopeo itself encrypted and
refuses a wrong key, the storage scanner finds plaintext when there is some, and the negative
checks see the registry's own OCI errors. If these fail, the filter tests mean nothing."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import gateway
import helpers
from conftest import AUTH, REPO, oras_push
from helpers import MT_MANIFEST, oci_error_codes, read_layout, sha256_digest

pytestmark = pytest.mark.harness

#: The smallest module Envoy loads as a proxy-wasm plugin: exports proxy_abi_version_0_2_1
#: (a no-op), malloc (always returns 1024) and a 2-page memory; every callback is absent.
MINIMAL_PROXY_WASM = bytes.fromhex(
    "0061736d0100000001090260000060017f017f03030200010503010002072d031770726f78795f6162695f7665"
    "7273696f6e5f305f325f310000066d616c6c6f630001066d656d6f727902000a0a0202000b05004180080b")


def test_gateway_answers_through_envoy(plain_stack):
    r = plain_stack.via_gateway().request("GET", "/v2/")
    assert r.status_code == 200
    assert r.headers.get("server") == "envoy"
    assert r.headers.get("docker-distribution-api-version") == "registry/2.0"
    import requests

    ready = requests.get(plain_stack.gw.admin_url + "/ready", timeout=5)
    assert ready.status_code == 200 and ready.text.strip() == "LIVE"
    cfg = (plain_stack.opts.state_dir / "envoy.yaml").read_text()
    assert "envoy.filters.http.wasm" not in cfg
    assert "set_filter_state" in cfg  # the access log's client-side method and path
    assert "per_connection_buffer_limit_bytes: 4194304" in cfg


@pytest.mark.only_build("wasm", reason="the rendering of the wasm filter (vm_config, FAIL_RELOAD)")
def test_rendered_config_with_filter(tmp_path):
    """Rendering (no processes): the wasm filter sits before the router, fail-closed (a VM that
    traps is reloaded: FAIL_RELOAD), with the plugin configuration JSON naming both demo
    recipients; keys are PKCS#8 / PKIX PEM."""
    import yaml

    opts = gateway.Options(state_dir=tmp_path / "state", wasm_path=tmp_path / "none.wasm",
                           build_wasm=False, keys_source="inline",
                           extra_rules=[{"repositories": "x/**", "action": "encrypt"}])
    keys = gateway.ensure_keys(opts.state_dir)
    cfg = gateway.envoy_config(opts, gateway.plugin_config(opts, keys))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.set_filter_state", "envoy.filters.http.wasm",
                     "envoy.filters.http.router"]
    wasm = hcm["http_filters"][1]["typed_config"]["config"]
    # Fail closed and reload a VM that trapped (the deprecated fail_open must not be set too:
    # Envoy refuses both).
    assert wasm["failure_policy"] == "FAIL_RELOAD" and "fail_open" not in wasm
    assert wasm["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    plugin = json.loads(wasm["configuration"]["value"])
    assert plugin["policy"]["rules"][0] == {"repositories": "x/**", "action": "encrypt"}
    pems = [r["pem"] for r in plugin["projects"]["demo"]["recipients"]]
    assert len(pems) == 2 and all(p.startswith("-----BEGIN PUBLIC KEY-----") for p in pems)
    assert plugin["limits"]["max_manifest_bytes"] <= 4194304
    for kind in ("rsa", "ec"):
        assert keys[kind]["private"].read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # keys are kept across runs
    before = keys["rsa"]["private"].read_bytes()
    assert gateway.ensure_keys(opts.state_dir)["rsa"]["private"].read_bytes() == before
    # The default: demo's recipients come from the key service, with its cluster.
    tuf = gateway.Options(state_dir=tmp_path / "state", wasm_path=tmp_path / "none.wasm",
                          build_wasm=False)
    plugin = gateway.plugin_config(tuf, keys, trusted_root="{}")
    assert "demo" not in plugin["projects"] and plugin["key_service"]["cluster"] == "keyservice"
    clusters = [c["name"] for c in gateway.envoy_config(tuf, plugin)["static_resources"]["clusters"]]
    assert clusters == ["registry", "keyservice"]
    # the committed template itself is valid YAML with the same shape
    tmpl = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    assert tmpl["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 4194304


@pytest.mark.only_build("wasm", reason="the wasm filter's rendering, loaded with a minimal proxy-wasm module")
def test_envoy_validates_rendered_config(tmp_path):
    """Envoy itself accepts the rendered configuration with the filter on (loaded with a
    minimal proxy-wasm module, so this does not depend on the real filter)."""
    wasm = tmp_path / "minimal.wasm"
    wasm.write_bytes(MINIMAL_PROXY_WASM)
    opts = gateway.Options(state_dir=tmp_path / "state", wasm_path=wasm, build_wasm=False)
    keys = gateway.ensure_keys(opts.state_dir)
    import yaml

    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(gateway.envoy_config(opts, gateway.plugin_config(opts, keys))))
    proc = subprocess.run([gateway.envoy_path(), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.clients
def test_skopeo_push_preserving_digests(plain_stack, secret_image, tmp_path):
    log = plain_stack.access_log()
    helpers.skopeo_push(secret_image, f"{plain_stack.addr}/demo/app:v1",
                        extra=["--preserve-digests"])
    r = plain_stack.direct().get_manifest("demo/app", "v1")
    assert r.status_code == 200
    assert r.content == secret_image.manifest_bytes
    assert r.headers["Docker-Content-Digest"] == secret_image.manifest_digest
    entries = log.entries()
    methods = [(e["method"], e["status"]) for e in entries]
    assert ("PATCH", 202) in methods and ("PUT", 201) in methods, log.summary(entries)
    # skopeo streams each blob as ONE PATCH (Content-Length known), then PUT ?digest= empty
    big = [e for e in entries if e["method"] == "PATCH" and
           e["bytes_received"] == secret_image.layers[0].size]
    assert len(big) == 1, log.summary(entries)
    # oracle on plaintext: identical image back
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{plain_stack.addr}/demo/app:v1", out, "v1")
    helpers.assert_decrypted_matches(out, "v1", secret_image, exact=True)
    # the storage scanner sees plaintext when it is there (so its silence means something)
    hits = helpers.scan_for(plain_stack.storage, [secret_image.marker.encode()])
    assert hits, "scanner did not find the marker in a plaintext push"
    assert helpers.registry_blob_path(plain_stack.storage, secret_image.layers[0].digest).exists()


@pytest.mark.clients
def test_skopeo_push_compresses_by_default(plain_stack, plain_image, tmp_path):
    """Without --preserve-digests skopeo gzips an uncompressed layer on the fly (chunked PATCH,
    new digest); the oracle still checks content through the config's diff_ids."""
    log = plain_stack.access_log()
    helpers.skopeo_push(plain_image, f"{plain_stack.addr}/plain/gz:v1")
    m = plain_stack.direct().get_manifest("plain/gz", "v1").json()
    assert m["layers"][0]["mediaType"] == helpers.MT_LAYER_GZIP
    assert m["layers"][0]["digest"] != plain_image.layers[0].digest
    entries = log.entries()
    chunked = [e for e in entries if e["method"] == "PATCH" and e["req_content_length"] is None]
    assert chunked, "expected a PATCH without Content-Length (chunked): " + log.summary(entries)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{plain_stack.addr}/plain/gz:v1", out, "v1")
    helpers.assert_decrypted_matches(out, "v1", plain_image, exact=False)


@pytest.mark.clients
def test_skopeo_cross_repo_mount(plain_stack, plain_image):
    """skopeo's blob-info cache makes it mount blobs it pushed elsewhere (POST ?mount=&from=)."""
    helpers.skopeo_push(plain_image, f"{plain_stack.addr}/plain/m1:v1", extra=["--preserve-digests"])
    log = plain_stack.access_log()
    helpers.skopeo_push(plain_image, f"{plain_stack.addr}/plain/m2:v1", extra=["--preserve-digests"])
    entries = log.entries()
    mounts = [e for e in entries if e["method"] == "POST" and "mount=" in e["path"]]
    assert mounts and all(e["status"] == 201 for e in mounts), log.summary(entries)
    assert any("from=plain%2Fm1" in e["path"] for e in mounts), log.summary(entries)
    r = plain_stack.direct().get_manifest("plain/m2", "v1")
    assert r.headers["Docker-Content-Digest"] == plain_image.manifest_digest


@pytest.mark.clients
@pytest.mark.parametrize("as_index", [False, True], ids=["manifest", "index"])
def test_ctr_push(plain_stack, containerd, plain_image, as_index):
    ref = containerd.import_image(plain_image, f"e2e.local/harness-{int(as_index)}", as_index)
    repo = f"plain/ctr{'-idx' if as_index else ''}"
    log = plain_stack.access_log()
    containerd.push(ref, f"{plain_stack.addr}/{repo}:v1")
    entries = log.entries()
    # containerd uploads monolithically: POST, then one PUT ?digest= carrying the blob
    puts = [e for e in entries if e["method"] == "PUT" and "/blobs/uploads/" in e["path"]]
    assert {e["bytes_received"] for e in puts} == {b.size for b in
                                                   [plain_image.config, *plain_image.layers]}, \
        log.summary(entries)
    assert not [e for e in entries if e["method"] == "PATCH"], log.summary(entries)
    direct = plain_stack.direct()
    r = direct.get_manifest(repo, "v1")
    assert r.status_code == 200
    if as_index:
        index = r.json()
        assert index["mediaType"] == helpers.MT_INDEX
        (child,) = index["manifests"]
        assert child["digest"] == plain_image.manifest_digest
        # the child manifest is pushed by digest before the index
        assert any(e["method"] == "PUT" and e["path"].endswith(
            f"/manifests/{plain_image.manifest_digest}") for e in entries), log.summary(entries)
    else:
        assert r.headers["Docker-Content-Digest"] == plain_image.manifest_digest
    for b in plain_image.layers:
        assert direct.blob_exists(repo, b.digest)


@pytest.mark.clients
@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
def test_oras_push(plain_stack, plain_image, chunked, tmp_path):
    repo = f"plain/oras-{'chunked' if chunked else 'mono'}"
    log = plain_stack.access_log()
    oras_push(plain_image, plain_stack.addr, f"{repo}:v1", chunked=chunked, chunk_size=1 * helpers.MIB)
    entries = log.entries()
    patches = [e for e in entries if e["method"] == "PATCH"]
    if chunked:
        assert len([e for e in patches if e["req_content_range"]]) >= 4, log.summary(entries)
        assert all(e["req_content_range"] for e in patches)
    else:
        assert not patches, log.summary(entries)
    m = plain_stack.direct().get_manifest(repo, "v1").json()
    assert [l["digest"] for l in m["layers"]] == plain_image.layer_digests
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{plain_stack.addr}/{repo}:v1", out, "v1")
    helpers.assert_decrypted_matches(out, "v1", plain_image, exact=True)


def test_oracle_decrypts_skopeo_encryption(plain_stack, plain_image, wrong_key, tmp_path):
    """The oracle's own behaviour, on an image skopeo (containers/ocicrypt) encrypted itself to
    both demo recipients: each private key alone decrypts; a foreign key fails; no key copies
    ciphertext (skopeo does not fail then: the test of 'no key' is 'no plaintext')."""
    keys = plain_stack.keys
    dest = f"{plain_stack.registry_addr}/demo/selfenc:v1"  # straight to the registry
    helpers.run(["skopeo", "copy", "--dest-tls-verify=false",
                 "--encryption-key", f"jwe:{keys['rsa']['public']}",
                 "--encryption-key", f"jwe:{keys['ec']['public']}",
                 plain_image.oci_ref, f"docker://{dest}"])
    m = plain_stack.direct().get_manifest("demo/selfenc", "v1").json()
    helpers.assert_encrypted_manifest(m, plain_image, exact=False)
    jwe = json.loads(base64.b64decode(
        m["layers"][0]["annotations"][helpers.ANN_KEYS_JWE]))
    algs = sorted(r["header"]["alg"] for r in jwe["recipients"])
    assert algs == ["ECDH-ES+A256KW", "RSA-OAEP"], jwe

    for kind in ("rsa", "ec"):
        out = tmp_path / f"out-{kind}"
        helpers.skopeo_pull(dest, out, "v1", keys=[keys[kind]["private"]])
        helpers.assert_decrypted_matches(out, "v1", plain_image, exact=False)

    proc = helpers.skopeo_pull(dest, tmp_path / "out-wrong", "v1", keys=[wrong_key], check=False)
    assert proc.returncode != 0 and "decrypt" in proc.stderr, proc.stderr

    out = tmp_path / "out-nokey"
    helpers.skopeo_pull(dest, out, "v1")
    nokey, _, _ = read_layout(out, "v1")
    assert all(l["mediaType"].endswith("+encrypted") for l in nokey["layers"])
    assert not helpers.scan_for(out, [plain_image.marker.encode()])


def test_registry_refusals_have_oci_error_bodies(plain_stack):
    """The negative checks' tools, on the registry's own answers through Envoy."""
    reg = plain_stack.via_gateway()
    data = os.urandom(100_000)
    wrong = sha256_digest(b"something else")
    r = reg.upload_monolithic("plain/neg", data, digest=wrong)
    assert r.status_code == 400 and "DIGEST_INVALID" in oci_error_codes(r)
    r = reg.upload_chunked("plain/neg", data, digest=wrong, chunk=30_000)
    assert r.status_code == 400 and "DIGEST_INVALID" in oci_error_codes(r)
    direct = plain_stack.direct()
    assert not direct.blob_exists("plain/neg", wrong)
    assert not direct.blob_exists("plain/neg", sha256_digest(data))
    r = reg.put_manifest("plain/neg", "v1", b'{"schemaVersion": 2, "layers": [')
    assert r.status_code == 400 and "MANIFEST_INVALID" in oci_error_codes(r)
    # the raw-socket client used for the oversized manifest
    status, _h, body = helpers.raw_request(plain_stack.addr, "PUT", "/v2/plain/neg/manifests/v1",
                                           b"{" * 1000, {"Content-Type": MT_MANIFEST})
    assert status == 400, body


@pytest.mark.auth
@pytest.mark.clients
def test_auth_stack_clients(plain_auth_stack, containerd, plain_image, tmp_path):
    s = plain_auth_stack
    r = s.via_gateway(creds=None).request("GET", "/v2/")
    assert r.status_code == 401 and "Basic" in r.headers.get("WWW-Authenticate", "")
    assert s.via_gateway().request("GET", "/v2/").status_code == 200
    # without credentials a push fails
    proc = helpers.skopeo_push(plain_image, f"{s.addr}/plain/noauth:v1", check=False)
    assert proc.returncode != 0
    helpers.skopeo_push(plain_image, f"{s.addr}/plain/app:v1", creds=AUTH,
                        extra=["--preserve-digests"])
    assert s.direct().get_manifest("plain/app", "v1").headers["Docker-Content-Digest"] == \
        plain_image.manifest_digest
    ref = containerd.import_image(plain_image, "e2e.local/harness-auth")
    containerd.push(ref, f"{s.addr}/plain/ctr:v1", creds=AUTH)
    assert s.direct().get_manifest("plain/ctr", "v1").headers["Docker-Content-Digest"] == \
        plain_image.manifest_digest
    oras_push(plain_image, s.addr, "plain/oras:v1", chunked=True, creds=AUTH,
              chunk_size=1 * helpers.MIB)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{s.addr}/plain/oras:v1", out, "v1", creds=AUTH)
    helpers.assert_decrypted_matches(out, "v1", plain_image, exact=True)


def test_run_script_detach_and_stop(tmp_path):
    """scripts/run --detach returns once the gateway answers, --stop stops exactly that."""
    import requests

    ports = helpers.free_ports(3)
    gw = f"127.0.0.1:{ports[0]}"
    env = dict(os.environ, GATEWAY_ADDR=gw, REGISTRY_ADDR=f"127.0.0.1:{ports[1]}",
               ENVOY_ADMIN_ADDR=f"127.0.0.1:{ports[2]}",
               GATEWAY_STATE=str(tmp_path / "state"))
    proc = subprocess.run([str(REPO / "scripts" / "run"), "--detach", "--no-filter"], env=env,
                          capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gw in proc.stdout and "demo-rsa.pem" in proc.stdout
        assert "--decryption-key" in proc.stdout
        assert requests.get(f"http://{gw}/v2/", timeout=5).status_code == 200
        pids = [e["pid"] for e in json.loads((tmp_path / "state" / "pids").read_text())]
        assert len(pids) == 2
    finally:
        stop = subprocess.run([str(REPO / "scripts" / "run"), "--stop"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for pid in pids:
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still running"
    assert not (tmp_path / "state" / "pids").exists()


def test_run_script_foreground_stops_on_ctrl_c(tmp_path):
    """scripts/run in the foreground: serves until SIGINT, then stops what it started."""
    import signal

    import requests

    ports = helpers.free_ports(3)
    gw = f"127.0.0.1:{ports[0]}"
    env = dict(os.environ, GATEWAY_ADDR=gw, REGISTRY_ADDR=f"127.0.0.1:{ports[1]}",
               ENVOY_ADMIN_ADDR=f"127.0.0.1:{ports[2]}",
               GATEWAY_STATE=str(tmp_path / "state"))
    proc = subprocess.Popen([str(REPO / "scripts" / "run"), "--no-filter"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    pids = []
    lines = []
    try:
        # up and serving once it says so (readline returns "" if it exits first)
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        assert requests.get(f"http://{gw}/v2/", timeout=5).status_code == 200
        pids = [e["pid"] for e in json.loads((tmp_path / "state" / "pids").read_text())]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        out = "".join(lines) + out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "gateway: stopped" in out
    assert len(pids) == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_refused_patch_then_resume(plain_stack):
    """The registry refuses a PATCH (wrong Content-Type: 400) and the upload goes on unharmed
    (what test_refusals checks through the filter)."""
    reg = plain_stack.via_gateway()
    data = os.urandom(3 * helpers.MIB)
    r = reg.upload_chunked("plain/resume", data, chunk=1 * helpers.MIB, refused_patch_at=1)
    assert r.status_code == 201, r.text
    assert plain_stack.direct().get_blob("plain/resume", sha256_digest(data)) == data
