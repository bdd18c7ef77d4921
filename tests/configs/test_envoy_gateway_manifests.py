"""The Envoy Gateway example under envoy/envoy-gateway/ holds together, offline:

- every manifest validates against Envoy Gateway's and the Gateway API's CRD schemas (vendored
  in envoy/envoy-gateway/crds/), and a manifest with a wrong field is refused, naming it;
- the EnvoyExtensionPolicy covers the whole Gateway, fails closed, carries the Envoy example's
  configuration with the callout clusters the EnvoyProxy's bootstrap declares (registry: the
  Service the HTTPRoute sends pushes to; key service: TLS to the authority it names), and the
  module's own image is in a passthrough repository;
- the listener's buffer limit holds the largest manifest the filter may buffer;
- the filter accepts the configuration in real Envoy (`envoy --mode validate`) with that
  bootstrap and the Wasm filter written the way Envoy Gateway translates the policy."""
from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_istio_manifests import (WASM, envoy_example_config, envoy_validate,  # noqa: F401
                                  glob_match, keys_of, wasm_gateway_bootstrap, with_real_keys)

REPO = Path(__file__).resolve().parents[2]
EG = REPO / "envoy" / "envoy-gateway"
VALIDATE = REPO / "scripts" / "validate-configs"
MANIFESTS = ["clienttrafficpolicy.yaml", "envoyextensionpolicy.yaml", "envoyproxy.yaml",
             "gateway.yaml", "httproute.yaml"]


def docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((EG / name).read_text()) if d]


def one(kind: str) -> dict:
    (found,) = [d for name in MANIFESTS for d in docs(name) if d["kind"] == kind]
    return found


def validate(*files) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VALIDATE), "--no-build", *map(str, files)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_every_manifest_validates_against_the_crds():
    proc = validate(*(EG / m for m in MANIFESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kind in ("EnvoyExtensionPolicy gateway.envoyproxy.io/v1alpha1",
                 "EnvoyProxy gateway.envoyproxy.io/v1alpha1",
                 "ClientTrafficPolicy gateway.envoyproxy.io/v1alpha1",
                 "Gateway gateway.networking.k8s.io/v1", "HTTPRoute gateway.networking.k8s.io/v1",
                 "ReferenceGrant gateway.networking.k8s.io/v1beta1"):
        assert f"[{kind} " in proc.stdout, (kind, proc.stdout)
    assert f"ok    envoy/envoy-gateway/{MANIFESTS[1]}" in proc.stdout


def test_vendored_crds_name_their_source():
    crds = EG / "crds" / "envoy-gateway-crds.yaml"
    header = "".join(line for line in crds.read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    assert "github.com/envoyproxy/gateway, tag v1.9.0" in header, header
    assert "39763b1c07ec30a5526fe70434a2cfe4181de642" in header
    assert "Gateway API v1.6.1, standard channel" in header
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(crds.read_text()) if d]
    assert sorted(kinds) == sorted(["EnvoyExtensionPolicy", "EnvoyProxy", "ClientTrafficPolicy",
                                    "Gateway", "HTTPRoute", "ReferenceGrant"]), kinds


def _set(doc: dict, path: str, value) -> dict:
    """A copy of doc with the value at a dotted path (list items by index) set."""
    doc = copy.deepcopy(doc)
    node = doc
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return doc


#: (manifest, dotted path, wrong value, what the validator must name in its refusal)
WRONG = [
    ("envoyextensionpolicy.yaml", "spec.wasm.0.failurePolicy", "FAIL_RELOAD",
     "spec.wasm[0]: Additional properties are not allowed ('failurePolicy' was unexpected)"),
    ("envoyextensionpolicy.yaml", "spec.wasm.0.failOpen", "false",
     "spec.wasm[0].failOpen: 'false' is not of type 'boolean'"),
    ("envoyextensionpolicy.yaml", "spec.wasm.0.code.type", "OCI",
     "spec.wasm[0].code.type: 'OCI' is not one of"),
    ("envoyextensionpolicy.yaml", "spec.wasm.0.code.image.digest", "sha256:00",
     "spec.wasm[0].code.image: Additional properties are not allowed ('digest' was unexpected)"),
    ("envoyproxy.yaml", "spec.bootstrap.type", "Patch",
     "spec.bootstrap.type: 'Patch' is not one of"),
    ("envoyproxy.yaml", "spec.provider.kubernetes.envoyDeployment.container.env.0.valueFrom",
     "HOST", "spec.provider.kubernetes.envoyDeployment.container.env[0].valueFrom: 'HOST' is "
     "not of type 'object'"),
    ("clienttrafficpolicy.yaml", "spec.connection.bufferLimits", "4Mi",
     "spec.connection: Additional properties are not allowed ('bufferLimits' was unexpected)"),
    ("gateway.yaml", "spec.listeners.0.port", 70000,
     "spec.listeners[0].port: 70000 is greater than the maximum of 65535"),
    ("httproute.yaml", "spec.rules.0.timeouts.requestTimeout", "0s",
     "spec.rules[0].timeouts: Additional properties are not allowed ('requestTimeout' was "
     "unexpected)"),
]


@pytest.mark.parametrize("name,path,value,message", WRONG,
                         ids=[f"{w[0]}:{w[1]}" for w in WRONG])
def test_a_wrong_field_is_refused(name, path, value, message, tmp_path):
    (doc,) = docs(name)[:1]
    bad = tmp_path / name
    bad.write_text(yaml.safe_dump(_set(doc, path, value)))
    proc = validate(bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stdout, proc.stdout


def test_the_policy_covers_the_whole_gateway_and_fails_closed():
    policy, gateway, route = one("EnvoyExtensionPolicy"), one("Gateway"), one("HTTPRoute")
    ns = gateway["metadata"]["namespace"]
    for d in (policy, route, one("EnvoyProxy"), one("ClientTrafficPolicy")):
        assert d["metadata"]["namespace"] == ns, d["metadata"]
    # The Gateway, not a route: the filter runs on every route of it (a route the policy does
    # not reach gets the filter disabled).
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway",
         "name": gateway["metadata"]["name"]}]
    assert "targetRef" not in policy["spec"] and "targetSelectors" not in policy["spec"]
    (wasm,) = policy["spec"]["wasm"]
    assert wasm["failOpen"] is False
    assert wasm["name"] == "ocicrypt"  # envoy_wasm_ocicrypt_vm_reload_* (alerts.yaml)
    assert re.fullmatch(r"[0-9a-f]{64}", wasm["code"]["image"]["sha256"])
    # Routes only from this namespace: no route elsewhere can bring a policy of its own.
    for listener in gateway["spec"]["listeners"]:
        assert listener["allowedRoutes"]["namespaces"] == {"from": "Same"}, listener
    assert gateway["spec"]["infrastructure"]["parametersRef"] == {
        "group": "gateway.envoyproxy.io", "kind": "EnvoyProxy",
        "name": one("EnvoyProxy")["metadata"]["name"]}
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    assert route["spec"]["hostnames"] == [gateway["spec"]["listeners"][0]["hostname"]]
    # Nothing else in the folder attaches a policy to a route.
    kinds = [d["kind"] for m in MANIFESTS for d in docs(m)]
    assert kinds.count("EnvoyExtensionPolicy") == 1


def test_config_mirrors_the_envoy_example(envoy_example_config):
    example = envoy_example_config
    cfg = one("EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"]
    site = ("key_service", "replicas")
    assert keys_of({k: v for k, v in cfg.items() if k not in site}) == \
        keys_of({k: v for k, v in example.items() if k not in site})
    assert cfg["policy"] == example["policy"]
    # The module's own image is pushed through this gateway: it must not be encrypted.
    url = one("EnvoyExtensionPolicy")["spec"]["wasm"][0]["code"]["image"]["url"]
    repository = url.split("/", 1)[1].rsplit(":", 1)[0]
    action = next((r["action"] for r in cfg["policy"]["rules"]
                   if glob_match(r["repositories"], repository)), cfg["policy"]["default"])
    assert action == "passthrough", f"{repository} would be {action}ed"


def bootstrap_fragment() -> dict:
    spec = one("EnvoyProxy")["spec"]["bootstrap"]
    assert spec["type"] == "Merge"
    return yaml.safe_load(spec["value"])


def test_callout_clusters_are_declared():
    cfg = one("EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"]
    clusters = {c["name"]: c for c in bootstrap_fragment()["static_resources"]["clusters"]}
    registry = clusters[cfg["registry"]["cluster"]]
    ks = clusters[cfg["key_service"]["cluster"]]

    def address(cluster):
        (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        sa = ep["endpoint"]["address"]["socket_address"]
        return sa["address"], sa["port_value"]

    # The callouts reach the registry the HTTPRoute sends pushes to.
    (backend,) = one("HTTPRoute")["spec"]["rules"][0]["backendRefs"]
    assert address(registry) == (
        f"{backend['name']}.{backend['namespace']}.svc.cluster.local", backend["port"])
    # ... which lets the route name it across namespaces.
    (grant,) = [d for d in docs("httproute.yaml") if d["kind"] == "ReferenceGrant"]
    assert grant["metadata"]["namespace"] == backend["namespace"]
    assert {"group": "", "kind": "Service", "name": backend["name"]} in grant["spec"]["to"]
    # The key service over TLS, its certificate checked for the name the filter asks for.
    host = cfg["key_service"]["authority"]
    assert address(ks) == (host, 443)
    tls = ks["transport_socket"]["typed_config"]
    assert tls["sni"] == host
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": host}}]
    assert "trusted_ca" in validation


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", q)
    assert m, q
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


def test_buffer_limit_holds_the_largest_manifest():
    limit = quantity_bytes(one("ClientTrafficPolicy")["spec"]["connection"]["bufferLimit"])
    cfg = one("EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"]
    assert cfg["limits"]["max_manifest_bytes"] <= limit
    assert limit > 32 * 1024, "Envoy Gateway's default (32 KiB) is too small for manifests"
    buckets = bootstrap_fragment()["stats_config"]["histogram_bucket_settings"]
    assert buckets[0]["match"] == {"exact": "wasmcustom.ocicrypt.layer_bytes"}


def test_the_filter_accepts_the_policy_in_envoy(tmp_path):
    """The policy's configuration and the EnvoyProxy's bootstrap clusters in real Envoy, the
    Wasm filter written as Envoy Gateway v1.9.0 translates an EnvoyExtensionPolicy
    (internal/xds/translator/wasm.go, wasmConfig: vm_id and filter name from the policy,
    config.name from wasm.name, the config as a JSON StringValue, fail_open, host_env_keys)."""
    policy = one("EnvoyExtensionPolicy")
    (wasm,) = policy["spec"]["wasm"]
    ir_name = f"envoyextensionpolicy/{policy['metadata']['namespace']}/" \
              f"{policy['metadata']['name']}/wasm/0"
    pc = with_real_keys(wasm["config"])
    fragment = bootstrap_fragment()
    bootstrap = wasm_gateway_bootstrap({
        "name": wasm["name"],
        "root_id": wasm["rootID"],
        "vm_config": {"vm_id": ir_name, "runtime": "envoy.wasm.runtime.v8",
                      "code": {"local": {"filename": str(WASM)}},
                      "environment_variables": {"host_env_keys": wasm["env"]["hostKeys"]}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps(pc)},
        "fail_open": wasm["failOpen"]},
        pc["registry"]["cluster"], fragment["static_resources"]["clusters"])
    bootstrap["stats_config"] = fragment["stats_config"]
    bootstrap["overload_manager"] = fragment["overload_manager"]
    env = {**os.environ, "OCICRYPT_STATE_KEY": base64.b64encode(os.urandom(32)).decode()}
    path = tmp_path / "envoy-gateway-like.yaml"
    proc = envoy_validate(bootstrap, path, env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The check is real: a configuration the filter refuses fails Envoy's load, naming the field.
    pc["limits"]["max_manifest_bytes"] = "4 MiB"
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]["typed_config"]["config"]["configuration"][
        "value"] = json.dumps(pc)
    proc = envoy_validate(bootstrap, path, env)
    assert proc.returncode != 0 and "max_manifest_bytes" in proc.stdout + proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
