"""scripts/validate-configs: every shipped configuration validates, and the checks are real
(a manifest or an Envoy configuration with a bad field fails, naming the field)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VALIDATE = REPO / "scripts" / "validate-configs"
ISTIO = REPO / "envoy" / "istio"
SHARED_CRDS = (REPO.parent / "shared" / "reference"
               / "istio-crds-wasmplugin-serviceentry-destinationrule.yaml")


def validate(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VALIDATE), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def verdicts(out: str) -> dict:
    """{what: "ok"|"FAIL"} from the script's per-file lines."""
    got = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in ("ok", "FAIL") and line.startswith("  "):
            got[parts[1].split("  [")[0]] = parts[0]
    return got


def test_every_shipped_config_validates():
    proc = validate()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    got = verdicts(proc.stdout)
    istio = sorted(str(p.relative_to(REPO)) for p in ISTIO.glob("*.yaml"))
    assert len(istio) >= 3, istio
    for name in ["envoy/envoy.yaml",
                 "envoy/envoy-native.yaml",
                 "envoy/envoy.yaml rendered by scripts/gateway.py (filter on)",
                 "envoy/envoy.yaml rendered by scripts/gateway.py (native build, filter on)",
                 "envoy/envoy.yaml rendered by scripts/gateway.py (filter off)",
                 "envoy/observability/alerts.yaml",
                 "envoy/observability/alerts-test.yaml"]:
        assert got.get(name) == "ok", f"{name}: {got.get(name)}\n{proc.stdout}"
    # The Istio and Envoy Gateway manifests (a file of several objects gets a verdict per
    # document).
    # (the native variant's in envoy-gateway/native/ too; not the CRD schemas themselves)
    eg_dir = REPO / "envoy" / "envoy-gateway"
    eg = sorted(str(p.relative_to(REPO)) for p in eg_dir.rglob("*.yaml")
                if "crds" not in p.relative_to(eg_dir).parts)
    assert len(eg) >= 7 and "envoy/envoy-gateway/native/envoyextensionpolicy.yaml" in eg, eg
    for name in istio + eg:
        mine = [v for what, v in got.items() if what == name or what.startswith(name + " (")]
        assert mine and set(mine) == {"ok"}, f"{name}: {mine}\n{proc.stdout}"


def http_filters(cfg: dict) -> list:
    (listener,) = cfg["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def test_native_example_is_the_wasm_example_with_the_module_swapped():
    """envoy/envoy-native.yaml is envoy/envoy.yaml with the wasm plugin replaced by the dynamic
    module, the same plugin configuration, the runtime flag for the metrics' Prometheus names,
    and nothing else changed: a fix to one example
    (a buffer limit, a timeout, the access log) that misses the other fails here."""
    wasm = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    native = yaml.safe_load((REPO / "envoy" / "envoy-native.yaml").read_text())
    (w,) = [i for i, f in enumerate(http_filters(wasm)) if f["name"] == "envoy.filters.http.wasm"]
    (n,) = [i for i, f in enumerate(http_filters(native))
            if f["name"] == "envoy.filters.http.dynamic_modules"]
    assert w == n, "the module sits where the wasm plugin sits (after set_filter_state)"
    plugin = http_filters(wasm)[w]["typed_config"]["config"]
    module = http_filters(native)[n]["typed_config"]
    assert json.loads(module["filter_config"]["value"]) == \
        json.loads(plugin["configuration"]["value"])
    assert module["filter_config"]["@type"] == plugin["configuration"]["@type"]
    assert module["dynamic_module_config"]["name"] == "ocicrypt_filter"  # libocicrypt_filter.so
    # The metrics keep the wasm build's names (the histogram buckets match on them).
    assert module["dynamic_module_config"]["metrics_namespace"] == "wasmcustom"
    assert any(b["match"]["exact"].startswith("wasmcustom.")
               for b in native["stats_config"]["histogram_bucket_settings"])
    # And the runtime flag that gives its stats the wasm build's Prometheus names.
    flag = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"
    assert native.pop("layered_runtime") == {
        "layers": [{"name": "ocicrypt-native", "static_layer": {flag: True}}]}
    http_filters(wasm).pop(w)
    http_filters(native).pop(n)
    assert native == wasm


def shared_crds() -> Path:
    if not SHARED_CRDS.is_file():
        pytest.skip(f"{SHARED_CRDS} is not beside the repository (CI always has it)")
    return SHARED_CRDS


def test_vendored_crds_match_the_reference():
    """envoy/istio/crds/istio-crds.yaml is what --vendor-crds derives from shared/reference."""
    proc = validate("--vendor-crds", shared_crds(), "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_istio_manifests_against_the_reference_crds():
    """The same verdict straight from the upstream CRD file, not only from the vendored copy."""
    # The reference holds WasmPlugin, ServiceEntry and DestinationRule; the edge's Gateway,
    # VirtualService and AuthorizationPolicy come from the same istio/api commit, vendored.
    proc = validate("--crds", shared_crds(), "--crds", ISTIO / "crds" / "istio-networking-crds.yaml",
                    *sorted(ISTIO.glob("*.yaml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def broken(edit):
    doc = yaml.safe_load((ISTIO / "wasmplugin.yaml").read_text())
    edit(doc)
    return doc


BAD_WASMPLUGINS = {
    # a field the CRD does not have (strict field validation, as kubectl --validate=strict)
    "unknown field": (lambda d: d["spec"].__setitem__("failstrategy", "FAIL_CLOSE"),
                      "spec: Additional properties are not allowed ('failstrategy'"),
    "unknown nested field": (lambda d: d["spec"]["match"][0].__setitem__("port", 443),
                             "spec.match[0]: Additional properties are not allowed ('port'"),
    "enum": (lambda d: d["spec"].__setitem__("phase", "BEFORE_ROUTER"),
             "spec.phase: 'BEFORE_ROUTER' is not one of"),
    "pattern": (lambda d: d["spec"].__setitem__("sha256", "sha256:" + "a" * 64),
                "spec.sha256: 'sha256:aaaa"),
    # (the shipped WasmPlugin matches every port, issue 13: these add a `ports` list)
    "type": (lambda d: d["spec"]["match"][0].__setitem__("ports", [{"number": "443"}]),
             "spec.match[0].ports[0].number: '443' is not of type 'integer'"),
    "bound": (lambda d: d["spec"]["match"][0].__setitem__("ports", [{"number": 70000}]),
              "spec.match[0].ports[0].number: 70000 is greater than the maximum of 65535"),
    "list-map key": (lambda d: d["spec"]["match"][0].__setitem__(
                         "ports", [{"number": 443}, {"number": 443}]),
                     "spec.match[0].ports[1]: duplicate entry for key {'number': 443}"),
    "required": (lambda d: d["spec"].pop("url"), "spec: 'url' is a required property"),
    "version": (lambda d: d.__setitem__("apiVersion", "extensions.istio.io/v1beta1"),
                "serves no version 'v1beta1' of WasmPlugin"),
    "name": (lambda d: d["metadata"].__setitem__("name", "OciCrypt"),
             "metadata.name: 'OciCrypt' must be a DNS-1123 subdomain"),
}


@pytest.mark.parametrize("case", sorted(BAD_WASMPLUGINS))
def test_bad_wasmplugin_fails(case, tmp_path):
    edit, message = BAD_WASMPLUGINS[case]
    path = tmp_path / "wasmplugin.yaml"
    path.write_text(yaml.safe_dump(broken(edit)))
    proc = validate(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  {path}" in proc.stdout, proc.stdout
    assert message in proc.stdout, proc.stdout


def test_the_unbroken_copy_passes(tmp_path):
    """The negative cases fail for their edit, not for being copied elsewhere."""
    path = tmp_path / "wasmplugin.yaml"
    path.write_text(yaml.safe_dump(broken(lambda d: None)))
    proc = validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_bad_document_in_a_stream_fails(tmp_path):
    good = yaml.safe_load((ISTIO / "serviceentry-keyservice.yaml").read_text())
    bad = copy.deepcopy(good)
    bad["spec"]["location"] = "OUTSIDE"
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all([good, bad]))
    proc = validate(path)
    assert proc.returncode == 1
    assert verdicts(proc.stdout) == {f"{path} (document 1)": "ok",
                                     f"{path} (document 2)": "FAIL"}, proc.stdout


def test_unrecognised_yaml_fails(tmp_path):
    path = tmp_path / "stray.yaml"
    path.write_text("just: a mapping\n")
    proc = validate(path)
    assert proc.returncode == 1
    assert "nothing can validate it" in proc.stdout


def test_bad_envoy_config_fails(tmp_path):
    """The Envoy check is Envoy's own: an unknown field in a bootstrap is refused."""
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": [{
            "name": "registry", "type": "STATIC", "connect_timeout": "5s",
            "per_connection_buffer_limit": 4194304,  # the real field ends in _bytes
        }]},
    }))
    proc = validate("--no-build", path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  {path}" in proc.stdout
    assert "per_connection_buffer_limit" in proc.stdout, proc.stdout


#: A pinned root.json the key-service fixtures were made with (the core's TUF tests use it).
GOOD_ROOT = REPO / "filter" / "core" / "tests" / "fixtures" / "tuf" / "good" / "metadata" / "1.root.json"


def _with_key_service(c: dict, root) -> None:
    c["key_service"] = {"cluster": "keyservice", "authority": "keyservice.local",
                        "trusted_root": root}


def _forged_root() -> dict:
    """The fixture root with one signed field changed: its signatures no longer verify."""
    root = json.loads(GOOD_ROOT.read_text())
    root["signed"]["consistent_snapshot"] = not root["signed"].get("consistent_snapshot", False)
    return root


#: (how the plugin configuration is broken, what Envoy's log or the script must name)
BROKEN_PLUGIN_CONFIGS = {
    "bad policy value": (lambda c: c["policy"].update({"default": "encrypt-ish"}),
                         "policy.default"),
    "unknown top-level field": (lambda c: c.update({"registy": {"cluster": "registry"}}),
                                "registy"),
    "unknown policy field": (lambda c: c["policy"].update({"defualt": "encrypt"}), "defualt"),
    "limit out of range": (lambda c: c["limits"].update({"max_manifest_bytes": 1}),
                           "limits.max_manifest_bytes"),
    "invalid JSON": ("{\"registry\": {\"cluster\": \"registry\"},", "not valid JSON"),
    "TUF root whose signatures do not verify": (
        lambda c: _with_key_service(c, _forged_root()), "the pinned root does not verify"),
    "TUF root that is not a root": (
        lambda c: _with_key_service(c, {"signed": {"_type": "targets"}, "signatures": []}),
        "key_service.trusted_root"),
}


def envoy_yaml_with_plugin_config(tmp_path, edit, build: str = "wasm") -> Path:
    """The shipped envoy.yaml loading the built wasm module (E2E_WASM_PATH's when set), or
    envoy-native.yaml (the native module, found by validate-configs' search path), with its
    plugin configuration edited (a function of the parsed JSON) or replaced (a string)."""
    from conftest import WASM_OVERRIDE

    name = "envoy-native.yaml" if build == "native" else "envoy.yaml"
    cfg = yaml.safe_load((REPO / "envoy" / name).read_text())
    if build == "native":
        (module,) = [f for f in http_filters(cfg)
                     if f["name"] == "envoy.filters.http.dynamic_modules"]
        holder = module["typed_config"]["filter_config"]
    else:
        (wasm,) = [f for f in http_filters(cfg) if f["name"] == "envoy.filters.http.wasm"]
        plugin = wasm["typed_config"]["config"]
        plugin["vm_config"]["code"]["local"]["filename"] = str(
            WASM_OVERRIDE or REPO / "target" / "wasm32-wasip1" / "release" / "ocicrypt_filter.wasm")
        holder = plugin["configuration"]
    if isinstance(edit, str):
        holder["value"] = edit
    elif edit is not None:
        doc = json.loads(holder["value"])
        edit(doc)
        holder["value"] = json.dumps(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("build", ["wasm", "native"])
@pytest.mark.parametrize("case", sorted(BROKEN_PLUGIN_CONFIGS))
def test_broken_plugin_configuration_fails_validation(tmp_path, case, build):
    """`envoy --mode validate` runs the module's own check (the wasm plugin's on_configure, the
    native module's config_new): the shipped example with a broken plugin configuration fails,
    and the log names the field (a module that accepted anything, or had no callbacks, would
    pass)."""
    edit, named = BROKEN_PLUGIN_CONFIGS[case]
    path = envoy_yaml_with_plugin_config(tmp_path, edit, build)
    proc = validate("--no-build", path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  {path}" in proc.stdout, proc.stdout
    assert named in proc.stdout + proc.stderr, proc.stdout[-3000:]


@pytest.mark.parametrize("build", ["wasm", "native"])
def test_the_unbroken_plugin_configuration_validates(tmp_path, build):
    """The same rendering with nothing broken passes (with the fixture root pinned too): the
    cases above fail for their edit, not for the way the file is made."""
    path = envoy_yaml_with_plugin_config(
        tmp_path, lambda c: _with_key_service(c, json.loads(GOOD_ROOT.read_text())), build)
    proc = validate("--no-build", path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
