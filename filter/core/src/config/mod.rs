//! Plugin configuration (Envoy `configuration` / Istio `pluginConfig`): JSON, read in two steps.
//!
//! 1. **Parse**: each JSON object is matched against a serde struct with
//!    `deny_unknown_fields`, so unknown and missing fields are refused level by level.
//! 2. **Compile**: values are type-checked and validated (ranges, repository patterns, project
//!    names, recipient keys) into a [`Config`] the filter uses as is.
//!
//! Every [`ConfigError`] names the field path (`projects.demo.recipients[1].pem`) and says how
//! to fix it. Shape:
//!
//! ```json
//! {
//!   "registry": { "cluster": "registry", "timeout_ms": 60000 },
//!   "policy": { "default": "passthrough",
//!               "rules": [ { "repositories": "demo/**", "action": "encrypt" },
//!                          { "repositories": "ci/**", "action": "encrypt", "accept_encrypted": true } ] },
//!   "projects": { "demo": { "recipients": [ { "pem": "-----BEGIN PUBLIC KEY-----\n…" },
//!                                           { "jwk": { "kty": "EC", "crv": "P-256", "x": "…", "y": "…" } } ] } },
//!   "limits": { "max_manifest_bytes": 4194304, "keystream_prefetch_bytes": 33554432,
//!               "max_ledger_lookups": 128, "upload_idle_seconds": 3600,
//!               "ledger_cache_entries": 16384 }
//! }
//! ```
//!
//! Only `registry.cluster` is required. A project that an `encrypt` rule covers but that has
//! no `projects` entry is not an error: its pushes fail closed (503) until keys are configured.
pub mod policy;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::format::recipients::{Recipient, RecipientError};
use policy::{Action, Pattern, PatternError, Policy, Rule};

/// Default time allowed for a callout to the registry, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Largest accepted `registry.timeout_ms` (one hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Default largest manifest the gateway holds in memory (4 MiB, distribution's own limit).
pub const DEFAULT_MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Smallest accepted `limits.max_manifest_bytes` (1 KiB).
pub const MIN_MAX_MANIFEST_BYTES: u64 = 1 << 10;
/// Largest accepted `limits.max_manifest_bytes` (64 MiB).
pub const MAX_MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Largest accepted `limits.keystream_prefetch_bytes` (256 MiB; 0 turns prefetch off).
pub const MAX_KEYSTREAM_PREFETCH_BYTES: u64 = 256 << 20;
/// Largest accepted `limits.upload_idle_seconds` (a week, distribution's default purge age).
pub const MAX_UPLOAD_IDLE_SECONDS: u64 = 7 * 24 * 3600;

/// Default `limits.max_ledger_lookups`:
/// [`crate::distribution::ledger::DEFAULT_MAX_LEDGER_LOOKUPS`].
pub const DEFAULT_MAX_LEDGER_LOOKUPS: usize =
    crate::distribution::ledger::DEFAULT_MAX_LEDGER_LOOKUPS;
/// Largest accepted `limits.max_ledger_lookups`.
pub const MAX_MAX_LEDGER_LOOKUPS: u64 = 1024;
/// Largest accepted `limits.ledger_cache_entries`.
pub const MAX_LEDGER_CACHE_ENTRIES: u64 = crate::distribution::ledger_cache::MAX_ENTRIES;
/// Default of `key_service.max_projects`.
pub const DEFAULT_MAX_PROJECTS: usize = 1024;

/// Where the filter finishes uploads and reads what it needs from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Envoy cluster of the registry, for callouts.
    pub cluster: String,
    /// Callout timeout in milliseconds (1..=[`MAX_TIMEOUT_MS`]).
    pub timeout_ms: u64,
}

/// The TUF key service the recipients come from (DESIGN §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyServiceConfig {
    /// Envoy cluster of the key service.
    pub cluster: String,
    /// `:authority` of the callouts.
    pub authority: String,
    /// Path prefix of the TUF metadata (`<prefix>/timestamp.json`, …).
    pub metadata_path: String,
    /// Path prefix of the targets (`<prefix>/projects/<p>.json`).
    pub targets_path: String,
    /// The pinned `root.json` (exact bytes): the only keys the gateway trusts at first.
    pub trusted_root: Vec<u8>,
    /// Seconds between refreshes.
    pub refresh_seconds: u64,
    /// Callout timeout in milliseconds.
    pub timeout_ms: u64,
    /// Seconds a verified answer may be used after its refresh (defaults to three refresh
    /// periods): past that, pushes wait for a refresh that succeeds.
    pub max_age_seconds: u64,
    /// Most projects whose lookups the gateway remembers (in use, or answered from memory for
    /// a while), see [`crate::keys::keyservice::ProjectTable`].
    pub max_projects: usize,
}

/// The compiled plugin configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Registry callouts.
    pub registry: RegistryConfig,
    /// Which repositories are encrypted.
    pub policy: Policy,
    /// Recipient public keys per Harbor project (each list non-empty).
    pub projects: BTreeMap<String, Vec<Recipient>>,
    /// Largest manifest body the gateway buffers and rewrites.
    pub max_manifest_bytes: usize,
    /// Keystream a worker may have asked other workers for and not yet used (0: off); see
    /// [`crate::format::keystream`].
    pub keystream_prefetch_bytes: u64,
    /// Most ledger records one manifest PUT may make the gateway read from the registry
    /// ([`crate::distribution::manifest::referenced_digests_bounded`]).
    pub max_ledger_lookups: usize,
    /// Seconds after which an upload session not continued loses its record in the gateway's
    /// own table (without `replicas`; see [`crate::distribution::upload_table`]).
    pub upload_idle_seconds: u64,
    /// Ledger entries the process keeps in its shared store at most (see
    /// [`crate::distribution::ledger_cache`]).
    pub ledger_cache_entries: usize,
    /// Where recipients come from for projects without inline recipients.
    pub key_service: Option<KeyServiceConfig>,
    /// Key the gateway replicas share to seal upload state into the `Location` clients echo,
    /// so an upload can continue on any replica (and across restarts).
    pub state_key: Option<StateKey>,
}

/// The replicas' shared sealing key; its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct StateKey(pub zeroize::Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

/// Why the configuration was refused. Each variant carries the field path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The configuration is not JSON at all.
    #[error("configuration is not valid JSON ({reason}): fix the syntax at the position given")]
    Json {
        /// Parser message with line and column.
        reason: String,
    },
    /// An unknown or missing field, found by the strict (`deny_unknown_fields`) parse.
    #[error("{path}: {reason}; fix the field name or add the missing field")]
    Shape {
        /// Object holding the field.
        path: String,
        /// serde's description (names the field and the allowed ones).
        reason: String,
    },
    /// A value of the wrong JSON type.
    #[error("{path}: expected {expected}, found {found}")]
    Type {
        /// The field.
        path: String,
        /// What the field must be.
        expected: &'static str,
        /// What it is.
        found: &'static str,
    },
    /// The pinned TUF root does not verify against its own keys.
    #[error("{path}: the pinned root does not verify ({reason}); pin the root.json the key service published (scripts/keyservice pin-root)")]
    TrustedRoot {
        /// Field path.
        path: String,
        /// Verification error.
        reason: String,
    },
    /// A number outside its allowed range.
    #[error("{path}: {value} is out of range: use a value from {min} to {max}")]
    Range {
        /// The field.
        path: String,
        /// The value given.
        value: u64,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// A string that must not be empty or blank.
    #[error("{path}: must not be empty: {hint}")]
    Empty {
        /// The field.
        path: String,
        /// What to put there.
        hint: &'static str,
    },
    /// `accept_encrypted: true` on a rule whose action is not `encrypt`.
    #[error(
        "{path}: accept_encrypted only applies to \"encrypt\" rules (a passthrough repository \
         stores whatever is pushed): remove it, or make the rule's action \"encrypt\""
    )]
    AcceptEncryptedOnPassthrough {
        /// The field.
        path: String,
    },
    /// An action other than `encrypt` or `passthrough`.
    #[error("{path}: unknown action {found:?}: use \"encrypt\" or \"passthrough\"")]
    Action {
        /// The field.
        path: String,
        /// The value given.
        found: String,
    },
    /// A repository pattern that does not compile.
    #[error("{path}: {source}")]
    Pattern {
        /// The field.
        path: String,
        /// Why the pattern was refused.
        source: PatternError,
    },
    /// A `projects` key that cannot be a Harbor project (first repository path segment).
    #[error(
        "{path}: {name:?} is not a project name: use the first path segment of the repositories \
         (lowercase letters, digits, '.', '_', '-', starting and ending with a letter or digit, no '/')"
    )]
    ProjectName {
        /// The `projects` entry.
        path: String,
        /// The key given.
        name: String,
    },
    /// `recipients: []`.
    #[error(
        "{path}: empty recipient list: add at least one public key, or remove the project \
         (pushes to it are then refused until keys are configured)"
    )]
    NoRecipients {
        /// The field.
        path: String,
    },
    /// A recipient entry with neither or both of `pem` and `jwk`.
    #[error("{path}: {found}: give exactly one of \"pem\" (PKIX public key PEM) or \"jwk\" (public JWK)")]
    RecipientForm {
        /// The entry.
        path: String,
        /// What the entry holds instead.
        found: &'static str,
    },
    /// The same key listed twice for one project.
    #[error("{path}: same key as {first}: list each recipient once")]
    DuplicateRecipient {
        /// The repeated entry.
        path: String,
        /// The entry it repeats.
        first: String,
    },
    /// A recipient key that cannot be used.
    #[error("{path}: {source}")]
    Recipient {
        /// The `pem` or `jwk` field.
        path: String,
        /// Why the key was refused.
        source: RecipientError,
    },
}

impl ConfigError {
    /// The field path the error is about (empty for a JSON syntax error).
    pub fn path(&self) -> &str {
        match self {
            ConfigError::Json { .. } => "",
            ConfigError::Shape { path, .. }
            | ConfigError::Type { path, .. }
            | ConfigError::Range { path, .. }
            | ConfigError::Empty { path, .. }
            | ConfigError::Action { path, .. }
            | ConfigError::AcceptEncryptedOnPassthrough { path }
            | ConfigError::Pattern { path, .. }
            | ConfigError::ProjectName { path, .. }
            | ConfigError::NoRecipients { path }
            | ConfigError::RecipientForm { path, .. }
            | ConfigError::DuplicateRecipient { path, .. }
            | ConfigError::Recipient { path, .. }
            | ConfigError::TrustedRoot { path, .. } => path,
        }
    }
}

/// Step 1: the document's objects, strictly (unknown fields refused). Leaves stay JSON values
/// so that step 2 can report type errors with the exact field path.
mod raw {
    use serde_json::Value;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Top {
        pub(super) registry: Value,
        #[serde(default)]
        pub(super) policy: Option<Value>,
        #[serde(default)]
        pub(super) projects: Option<Value>,
        #[serde(default)]
        pub(super) limits: Option<Value>,
        #[serde(default)]
        pub(super) key_service: Option<Value>,
        #[serde(default)]
        pub(super) replicas: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Replicas {
        pub(super) state_key: Option<Value>,
        pub(super) state_key_env: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct KeyService {
        pub(super) cluster: Value,
        #[serde(default)]
        pub(super) authority: Option<Value>,
        #[serde(default)]
        pub(super) metadata_path: Option<Value>,
        #[serde(default)]
        pub(super) targets_path: Option<Value>,
        pub(super) trusted_root: Value,
        #[serde(default)]
        pub(super) refresh_seconds: Option<Value>,
        #[serde(default)]
        pub(super) timeout_ms: Option<Value>,
        #[serde(default)]
        pub(super) max_age_seconds: Option<Value>,
        #[serde(default)]
        pub(super) max_projects: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Registry {
        pub(super) cluster: Value,
        #[serde(default)]
        pub(super) timeout_ms: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Policy {
        #[serde(default)]
        pub(super) default: Option<Value>,
        #[serde(default)]
        pub(super) rules: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Rule {
        pub(super) repositories: Value,
        pub(super) action: Value,
        #[serde(default)]
        pub(super) accept_encrypted: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Project {
        pub(super) recipients: Value,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RecipientEntry {
        #[serde(default)]
        pub(super) pem: Option<Value>,
        #[serde(default)]
        pub(super) jwk: Option<Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Limits {
        #[serde(default)]
        pub(super) max_manifest_bytes: Option<Value>,
        #[serde(default)]
        pub(super) keystream_prefetch_bytes: Option<Value>,
        #[serde(default)]
        pub(super) max_ledger_lookups: Option<Value>,
        #[serde(default)]
        pub(super) upload_idle_seconds: Option<Value>,
        #[serde(default)]
        pub(super) ledger_cache_entries: Option<Value>,
    }
}

/// Name of a JSON value's type, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads one JSON object into its strict step-1 struct.
fn object<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, ConfigError> {
    if !value.is_object() {
        return Err(ConfigError::Type {
            path: path.to_string(),
            expected: "an object",
            found: kind(&value),
        });
    }
    serde_json::from_value(value).map_err(|e| ConfigError::Shape {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

fn string(value: Value, path: &str) -> Result<String, ConfigError> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(ConfigError::Type {
            path: path.to_string(),
            expected: "a string",
            found: kind(&other),
        }),
    }
}

fn array(value: Value, path: &str) -> Result<Vec<Value>, ConfigError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(ConfigError::Type {
            path: path.to_string(),
            expected: "an array",
            found: kind(&other),
        }),
    }
}

/// A non-negative integer within `min..=max`.
fn integer(value: &Value, path: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n = value.as_u64().ok_or_else(|| ConfigError::Type {
        path: path.to_string(),
        expected: "a non-negative integer",
        found: if value.is_number() {
            "a negative or fractional number"
        } else {
            kind(value)
        },
    })?;
    if !(min..=max).contains(&n) {
        return Err(ConfigError::Range {
            path: path.to_string(),
            value: n,
            min,
            max,
        });
    }
    Ok(n)
}

fn boolean(value: Value, path: &str) -> Result<bool, ConfigError> {
    match value {
        Value::Bool(b) => Ok(b),
        other => Err(ConfigError::Type {
            path: path.to_string(),
            expected: "true or false",
            found: kind(&other),
        }),
    }
}

fn action(value: Value, path: &str) -> Result<Action, ConfigError> {
    match string(value, path)?.as_str() {
        "encrypt" => Ok(Action::Encrypt),
        "passthrough" => Ok(Action::Passthrough),
        other => Err(ConfigError::Action {
            path: path.to_string(),
            found: other.to_string(),
        }),
    }
}

/// True for names that can be the first path segment of a repository (a Harbor project).
pub fn is_project_name(name: &str) -> bool {
    let edges_ok =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 255
        && edges_ok(name.chars().next())
        && edges_ok(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Self::parse_with_env(bytes, &|_| None)
    }

    /// [`Config::parse`] where `env` answers the VM's environment variables (secrets such as
    /// `replicas.state_key_env` are taken from there, so that they never sit in the plugin
    /// configuration Envoy's `/config_dump` and Istio's `WasmPlugin` show).
    pub fn parse_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let document: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError::Json {
            reason: e.to_string(),
        })?;
        let top: raw::Top = object(document, "(top level)")?;
        let registry = compile_registry(top.registry)?;
        let policy = match top.policy {
            Some(value) => compile_policy(value)?,
            None => Policy::new(Vec::new(), Action::Passthrough),
        };
        let projects = match top.projects {
            Some(value) => compile_projects(value)?,
            None => BTreeMap::new(),
        };
        let limits = match top.limits {
            Some(value) => compile_limits(value)?,
            None => Limits::default(),
        };
        let key_service = match top.key_service {
            Some(value) => Some(compile_key_service(value)?),
            None => None,
        };
        let state_key = match top.replicas {
            Some(value) => Some(compile_replicas(value, env)?),
            None => None,
        };
        Ok(Config {
            registry,
            policy,
            projects,
            max_manifest_bytes: limits.max_manifest_bytes,
            keystream_prefetch_bytes: limits.keystream_prefetch_bytes,
            max_ledger_lookups: limits.max_ledger_lookups,
            upload_idle_seconds: limits.upload_idle_seconds,
            ledger_cache_entries: limits.ledger_cache_entries,
            key_service,
            state_key,
        })
    }

    /// How the ledger cache is laid out in the shared store.
    pub fn ledger_cache(&self) -> crate::distribution::ledger_cache::Shape {
        crate::distribution::ledger_cache::Shape::for_entries(self.ledger_cache_entries)
    }

    /// The manifest rewrite's options for a repository (its policy rule's `accept_encrypted`).
    pub fn rewrite_options(
        &self,
        repository: &str,
    ) -> crate::distribution::manifest::RewriteOptions {
        crate::distribution::manifest::RewriteOptions {
            accept_encrypted: self.policy.accepts_encrypted(repository),
        }
    }

    /// The recipients configured for a Harbor project (never an empty slice), or `None` when
    /// the project has none: pushes to an encrypted repository of it must then be refused.
    pub fn recipients(&self, project: &str) -> Option<&[Recipient]> {
        self.projects.get(project).map(Vec::as_slice)
    }
}

fn compile_registry(value: Value) -> Result<RegistryConfig, ConfigError> {
    let registry: raw::Registry = object(value, "registry")?;
    let cluster = string(registry.cluster, "registry.cluster")?;
    if cluster.trim().is_empty() {
        return Err(ConfigError::Empty {
            path: "registry.cluster".to_string(),
            hint: "name the Envoy cluster that reaches the registry (e.g. \"registry\")",
        });
    }
    let timeout_ms = match registry.timeout_ms {
        Some(value) => integer(&value, "registry.timeout_ms", 1, MAX_TIMEOUT_MS)?,
        None => DEFAULT_TIMEOUT_MS,
    };
    Ok(RegistryConfig {
        cluster,
        timeout_ms,
    })
}

fn compile_policy(value: Value) -> Result<Policy, ConfigError> {
    let policy: raw::Policy = object(value, "policy")?;
    let default = match policy.default {
        Some(value) => action(value, "policy.default")?,
        None => Action::Passthrough,
    };
    let mut rules = Vec::new();
    if let Some(value) = policy.rules {
        for (index, item) in array(value, "policy.rules")?.into_iter().enumerate() {
            let path = format!("policy.rules[{index}]");
            let rule: raw::Rule = object(item, &path)?;
            let repositories_path = format!("{path}.repositories");
            let source = string(rule.repositories, &repositories_path)?;
            let pattern = Pattern::parse(&source).map_err(|source| ConfigError::Pattern {
                path: repositories_path,
                source,
            })?;
            let action = action(rule.action, &format!("{path}.action"))?;
            let accept_path = format!("{path}.accept_encrypted");
            let accept_encrypted = match rule.accept_encrypted {
                Some(value) => boolean(value, &accept_path)?,
                None => false,
            };
            if accept_encrypted && action != Action::Encrypt {
                return Err(ConfigError::AcceptEncryptedOnPassthrough { path: accept_path });
            }
            rules.push(Rule {
                pattern,
                action,
                accept_encrypted,
            });
        }
    }
    Ok(Policy::new(rules, default))
}

fn compile_projects(value: Value) -> Result<BTreeMap<String, Vec<Recipient>>, ConfigError> {
    let Value::Object(entries) = value else {
        return Err(ConfigError::Type {
            path: "projects".to_string(),
            expected: "an object",
            found: kind(&value),
        });
    };
    let mut projects = BTreeMap::new();
    for (name, value) in entries {
        let path = format!("projects.{name}");
        if !is_project_name(&name) {
            return Err(ConfigError::ProjectName { path, name });
        }
        let project: raw::Project = object(value, &path)?;
        let recipients = compile_recipients(project.recipients, &format!("{path}.recipients"))?;
        projects.insert(name, recipients);
    }
    Ok(projects)
}

fn compile_replicas(
    value: Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StateKey, ConfigError> {
    use base64::Engine as _;
    let replicas: raw::Replicas = object(value, "replicas")?;
    let (path, text) = match (
        replicas.state_key.filter(|v| !v.is_null()),
        replicas.state_key_env.filter(|v| !v.is_null()),
    ) {
        (Some(inline), None) => (
            "replicas.state_key",
            zeroize::Zeroizing::new(string(inline, "replicas.state_key")?),
        ),
        (None, Some(name)) => {
            let path = "replicas.state_key_env";
            let name = string(name, path)?;
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            let value = valid.then(|| env(&name)).flatten();
            let Some(value) = value else {
                return Err(ConfigError::Empty {
                    path: path.to_string(),
                    hint: "name an environment variable (A-Z, 0-9, _) that the VM is given and that holds the key: Envoy vm_config.environment_variables.host_env_keys, Istio WasmPlugin vmConfig.env",
                });
            };
            (path, zeroize::Zeroizing::new(value))
        }
        _ => {
            return Err(ConfigError::Empty {
                path: "replicas".to_string(),
                hint: "give exactly one of state_key_env (the environment variable holding the key: recommended) and state_key (the key inline)",
            })
        }
    };
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .unwrap_or_default(),
    );
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| ConfigError::Empty {
        path: path.to_string(),
        hint: "give 32 random bytes in standard base64, the same on every replica (e.g. `openssl rand -base64 32`)",
    })?;
    Ok(StateKey(zeroize::Zeroizing::new(key)))
}

fn compile_key_service(value: Value) -> Result<KeyServiceConfig, ConfigError> {
    let ks: raw::KeyService = object(value, "key_service")?;
    let cluster = string(ks.cluster, "key_service.cluster")?;
    if cluster.trim().is_empty() {
        return Err(ConfigError::Empty {
            path: "key_service.cluster".to_string(),
            hint: "name the Envoy cluster that reaches the key service (e.g. \"keyservice\")",
        });
    }
    let opt_string = |v: Option<Value>, path: &str, default: &str| match v {
        Some(v) => string(v, path),
        None => Ok(default.to_string()),
    };
    let authority = opt_string(ks.authority, "key_service.authority", &cluster)?;
    let metadata_path = opt_string(ks.metadata_path, "key_service.metadata_path", "/metadata")?;
    let targets_path = opt_string(ks.targets_path, "key_service.targets_path", "/targets")?;
    for (path, value) in [
        ("key_service.metadata_path", &metadata_path),
        ("key_service.targets_path", &targets_path),
    ] {
        if !value.starts_with('/') {
            return Err(ConfigError::Empty {
                path: path.to_string(),
                hint: "give an absolute path starting with /",
            });
        }
    }
    // The pinned root may be given as the root.json object itself or as its text.
    let trusted_root = match ks.trusted_root {
        Value::String(text) => text.into_bytes(),
        other @ Value::Object(_) => serde_json::to_vec(&other).unwrap_or_default(),
        other => {
            return Err(ConfigError::Type {
                path: "key_service.trusted_root".to_string(),
                expected: "the root.json object or its text",
                found: kind(&other),
            })
        }
    };
    crate::tuf::TrustedMetadataSet::new(&trusted_root, 0).map_err(|e| {
        ConfigError::TrustedRoot {
            path: "key_service.trusted_root".to_string(),
            reason: e.to_string(),
        }
    })?;
    let refresh_seconds = match ks.refresh_seconds {
        Some(v) => integer(&v, "key_service.refresh_seconds", 1, 86_400)?,
        None => 60,
    };
    let timeout_ms = match ks.timeout_ms {
        Some(v) => integer(&v, "key_service.timeout_ms", 1, MAX_TIMEOUT_MS)?,
        None => 5000,
    };
    let max_age_seconds = match ks.max_age_seconds {
        Some(v) => integer(&v, "key_service.max_age_seconds", 1, 7 * 86_400)?,
        None => refresh_seconds.saturating_mul(3),
    };
    let max_projects = match ks.max_projects {
        Some(v) => integer(&v, "key_service.max_projects", 1, 16_384)?,
        None => DEFAULT_MAX_PROJECTS as u64,
    };
    Ok(KeyServiceConfig {
        cluster,
        authority,
        metadata_path,
        targets_path,
        trusted_root,
        refresh_seconds,
        timeout_ms,
        max_age_seconds,
        max_projects: usize::try_from(max_projects).unwrap_or(usize::MAX),
    })
}

/// Compiles a recipients list (also the one of a key-service document).
pub(crate) fn compile_recipients(value: Value, path: &str) -> Result<Vec<Recipient>, ConfigError> {
    let items = array(value, path)?;
    if items.is_empty() {
        return Err(ConfigError::NoRecipients {
            path: path.to_string(),
        });
    }
    let mut recipients: Vec<Recipient> = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let entry_path = format!("{path}[{index}]");
        let entry: raw::RecipientEntry = object(item, &entry_path)?;
        let recipient = match (entry.pem, entry.jwk) {
            (Some(pem), None) => {
                let field = format!("{entry_path}.pem");
                let text = string(pem, &field)?;
                Recipient::from_pem(&text).map_err(|source| ConfigError::Recipient {
                    path: field,
                    source,
                })?
            }
            (None, Some(jwk)) => {
                let field = format!("{entry_path}.jwk");
                if !jwk.is_object() {
                    return Err(ConfigError::Type {
                        path: field,
                        expected: "an object",
                        found: kind(&jwk),
                    });
                }
                Recipient::from_jwk(&jwk).map_err(|source| ConfigError::Recipient {
                    path: field,
                    source,
                })?
            }
            (None, None) => {
                return Err(ConfigError::RecipientForm {
                    path: entry_path,
                    found: "neither \"pem\" nor \"jwk\"",
                })
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::RecipientForm {
                    path: entry_path,
                    found: "both \"pem\" and \"jwk\"",
                })
            }
        };
        if let Some(first) = recipients.iter().position(|r| *r == recipient) {
            return Err(ConfigError::DuplicateRecipient {
                path: entry_path,
                first: format!("{path}[{first}]"),
            });
        }
        recipients.push(recipient);
    }
    Ok(recipients)
}

/// The `limits` section, compiled.
struct Limits {
    max_manifest_bytes: usize,
    keystream_prefetch_bytes: u64,
    max_ledger_lookups: usize,
    upload_idle_seconds: u64,
    ledger_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            keystream_prefetch_bytes: crate::format::keystream::BUDGET_BYTES,
            max_ledger_lookups: DEFAULT_MAX_LEDGER_LOOKUPS,
            upload_idle_seconds: crate::distribution::upload_table::DEFAULT_IDLE_SECONDS,
            ledger_cache_entries: crate::distribution::ledger_cache::DEFAULT_ENTRIES,
        }
    }
}

/// A limit that counts things: an integer from 1 to `max`, `default` when absent.
fn count_limit(
    value: Option<Value>,
    path: &str,
    max: u64,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let n = integer(&value, path, 1, max)?;
    usize::try_from(n).map_err(|_| ConfigError::Range {
        path: path.to_string(),
        value: n,
        min: 1,
        max,
    })
}

fn compile_limits(value: Value) -> Result<Limits, ConfigError> {
    let limits: raw::Limits = object(value, "limits")?;
    let max_ledger_lookups = count_limit(
        limits.max_ledger_lookups,
        "limits.max_ledger_lookups",
        MAX_MAX_LEDGER_LOOKUPS,
        DEFAULT_MAX_LEDGER_LOOKUPS,
    )?;
    let prefetch = match limits.keystream_prefetch_bytes {
        Some(value) => integer(
            &value,
            "limits.keystream_prefetch_bytes",
            0,
            MAX_KEYSTREAM_PREFETCH_BYTES,
        )?,
        None => crate::format::keystream::BUDGET_BYTES,
    };
    let upload_idle_seconds = match limits.upload_idle_seconds {
        Some(value) => integer(
            &value,
            "limits.upload_idle_seconds",
            1,
            MAX_UPLOAD_IDLE_SECONDS,
        )?,
        None => crate::distribution::upload_table::DEFAULT_IDLE_SECONDS,
    };
    let ledger_cache_entries = count_limit(
        limits.ledger_cache_entries,
        "limits.ledger_cache_entries",
        MAX_LEDGER_CACHE_ENTRIES,
        crate::distribution::ledger_cache::DEFAULT_ENTRIES,
    )?;
    let Some(value) = limits.max_manifest_bytes else {
        return Ok(Limits {
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            keystream_prefetch_bytes: prefetch,
            max_ledger_lookups,
            upload_idle_seconds,
            ledger_cache_entries,
        });
    };
    let path = "limits.max_manifest_bytes";
    let n = integer(&value, path, MIN_MAX_MANIFEST_BYTES, MAX_MAX_MANIFEST_BYTES)?;
    let manifest = usize::try_from(n).map_err(|_| ConfigError::Range {
        path: path.to_string(),
        value: n,
        min: MIN_MAX_MANIFEST_BYTES,
        max: MAX_MAX_MANIFEST_BYTES,
    })?;
    Ok(Limits {
        max_manifest_bytes: manifest,
        keystream_prefetch_bytes: prefetch,
        max_ledger_lookups,
        upload_idle_seconds,
        ledger_cache_entries,
    })
}
