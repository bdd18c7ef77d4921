//! Plugin configuration: a good configuration compiles; every bad one is refused with the
//! field path and a fix.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use ocicrypt_core::config::policy::{Action, PatternError};
use ocicrypt_core::config::{Config, ConfigError, DEFAULT_MAX_MANIFEST_BYTES, DEFAULT_TIMEOUT_MS};
use ocicrypt_core::format::recipients::RecipientError;
use serde_json::{json, Value};

/// Test keys made with OpenSSL 3 for these tests only.
const RSA2048_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw5w4liQP/HQyK3O5+lyY
WzV7y0SrHjm8p1T+FDRhLjkP9OpYkANJtEpGzkeU6m0jqW/UbeoqJNGaKarHXCDZ
xYv7n42PBacoAfY4FBo0/k65WXAEFpm37OCvFz0tbHA4pea7a6vou3uZMhu8s1r+
Ph2LLAkRSH9UfvXER+M9ccNlugpu3GkcFbmvTMmuy0Pyy7wW6ySJQZx8fxkf27js
A+YUAX3eIkchF6o6ClN78abuHdRE1DsYt2H2WK16giK7+bfQpb5esRwhVIwRlvrr
EghrBp54TbnyBsWh9UfftRu+hnfGIN6a2EHQDHlekJjwwPLiuuSdIPZhGdTgp2XH
DQIDAQAB
-----END PUBLIC KEY-----
";

const RSA1024_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDrjzMbF77+c0EddNEYeoQYBbwu
PF6ICGOGTWWn9cJt2CxJse+m9Q/D43iyJPmHPnXY0Qj9amn8jxVUp8kqtlGBTugy
iBHKLtmXqiCL3Xu7sRLBrl5fUETxipXTPD1o9zJeRt9zQia+T4UEyP+KcWoVKvJO
zdCgPAlKhlGOT5nGFQIDAQAB
-----END PUBLIC KEY-----
";

const P256_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEcNn3PUprqNVkWXO67K+VEds97Yct
UVW68272q8uwrb8StEXb9SwjusxP0shKZqKtBJp8JkbDDOwBD4K1MrYzSQ==
-----END PUBLIC KEY-----
";

/// The same P-256 key as [`P256_PEM`], as a JWK.
fn p256_jwk() -> Value {
    json!({"kty": "EC", "crv": "P-256",
           "x": "cNn3PUprqNVkWXO67K-VEds97YctUVW68272q8uwrb8",
           "y": "ErRF2_UsI7rMT9LISmairQSafCZGwwzsAQ-CtTK2M0k"})
}

fn good() -> Value {
    json!({
        "registry": {"cluster": "registry", "timeout_ms": 30000},
        "policy": {
            "default": "passthrough",
            "rules": [
                {"repositories": "demo/public-*", "action": "passthrough"},
                {"repositories": "demo/**", "action": "encrypt"},
                {"repositories": "secret/**", "action": "encrypt"}
            ]
        },
        "projects": {
            "demo": {"recipients": [{"pem": RSA2048_PEM}, {"jwk": p256_jwk()}]},
            "team-b.x_y": {"recipients": [{"pem": P256_PEM}]}
        },
        "limits": {"max_manifest_bytes": 1048576, "keystream_prefetch_bytes": 8388608}
    })
}

fn parse(value: &Value) -> Result<Config, ConfigError> {
    Config::parse(&serde_json::to_vec(value).unwrap())
}

#[test]
fn good_configuration_compiles() {
    let config = parse(&good()).unwrap();
    assert_eq!(config.registry.cluster, "registry");
    assert_eq!(config.registry.timeout_ms, 30000);
    assert_eq!(config.max_manifest_bytes, 1 << 20);
    assert_eq!(config.keystream_prefetch_bytes, 8 << 20);
    assert_eq!(config.policy.default, Action::Passthrough);
    assert_eq!(config.policy.rules.len(), 3);
    assert_eq!(config.policy.rules[1].pattern.as_str(), "demo/**");
    for (repo, action) in [
        ("demo/app", Action::Encrypt),
        ("demo/public-docs", Action::Passthrough),
        ("secret/x/y", Action::Encrypt),
        ("library/alpine", Action::Passthrough),
    ] {
        assert_eq!(config.policy.action(repo), action, "{repo}");
    }
    let demo = config.recipients("demo").unwrap();
    let kinds: Vec<String> = demo.iter().map(|r| r.describe()).collect();
    assert_eq!(kinds, ["RSA-2048", "EC P-256"]);
    assert_eq!(config.recipients("team-b.x_y").unwrap().len(), 1);
    // Encrypted by a rule but no keys configured: not a configuration error; the push is
    // refused later (fail closed) because there are no recipients.
    assert_eq!(config.policy.action("secret/app"), Action::Encrypt);
    assert!(config.recipients("secret").is_none());
}

#[test]
fn minimal_configuration_takes_the_defaults() {
    let config =
        parse(&json!({"registry": {"cluster": "outbound|5000||registry.svc.cluster.local"}}))
            .unwrap();
    assert_eq!(
        config.registry.cluster,
        "outbound|5000||registry.svc.cluster.local"
    );
    assert_eq!(config.registry.timeout_ms, DEFAULT_TIMEOUT_MS);
    assert_eq!(DEFAULT_TIMEOUT_MS, 60_000);
    assert_eq!(config.policy.default, Action::Passthrough);
    assert!(config.policy.rules.is_empty());
    assert!(config.projects.is_empty());
    assert_eq!(config.max_manifest_bytes, DEFAULT_MAX_MANIFEST_BYTES);
    assert_eq!(DEFAULT_MAX_MANIFEST_BYTES, 4 << 20);
    assert_eq!(config.keystream_prefetch_bytes, 32 << 20);
    assert_eq!(config.policy.action("anything/at/all"), Action::Passthrough);

    let config = parse(
        &json!({"registry": {"cluster": "r"}, "policy": {"default": "encrypt"}, "limits": {}}),
    )
    .unwrap();
    assert_eq!(config.policy.action("x/y"), Action::Encrypt);
    assert_eq!(config.max_manifest_bytes, DEFAULT_MAX_MANIFEST_BYTES);
    assert_eq!(config.keystream_prefetch_bytes, 32 << 20);
}

#[test]
fn limit_bounds_are_inclusive() {
    for (bytes, ok) in [
        (1023u64, false),
        (1024, true),
        (64 << 20, true),
        ((64 << 20) + 1, false),
    ] {
        let result =
            parse(&json!({"registry": {"cluster": "r"}, "limits": {"max_manifest_bytes": bytes}}));
        assert_eq!(result.is_ok(), ok, "{bytes}: {result:?}");
        if ok {
            assert_eq!(result.unwrap().max_manifest_bytes as u64, bytes);
        }
    }
    for (bytes, ok) in [(0u64, true), (256 << 20, true), ((256 << 20) + 1, false)] {
        let result = parse(
            &json!({"registry": {"cluster": "r"}, "limits": {"keystream_prefetch_bytes": bytes}}),
        );
        assert_eq!(result.is_ok(), ok, "{bytes}: {result:?}");
        if ok {
            assert_eq!(result.unwrap().keystream_prefetch_bytes, bytes);
        }
    }
    let result = parse(
        &json!({"registry": {"cluster": "r"}, "limits": {"keystream_prefetch_bytes": "32M"}}),
    );
    assert!(result.is_err());
    for (ms, ok) in [
        (0u64, false),
        (1, true),
        (3_600_000, true),
        (3_600_001, false),
    ] {
        let result = parse(&json!({"registry": {"cluster": "r", "timeout_ms": ms}}));
        assert_eq!(result.is_ok(), ok, "{ms}: {result:?}");
    }
}

/// Replaces the value at a JSON pointer of the good configuration (or removes it for `None`).
fn edit(pointer: &str, value: Option<Value>) -> Value {
    let mut config = good();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let key = key.replace("~1", "/").replace("~0", "~");
    let target = config.pointer_mut(parent).unwrap();
    match (target, value) {
        (Value::Object(map), Some(v)) => {
            map.insert(key, v);
        }
        (Value::Object(map), None) => {
            map.shift_remove(&key);
        }
        (Value::Array(items), Some(v)) => items[key.parse::<usize>().unwrap()] = v,
        (Value::Array(items), None) => {
            items.remove(key.parse::<usize>().unwrap());
        }
        _ => panic!("bad pointer {pointer}"),
    }
    config
}

type Check = fn(&ConfigError) -> bool;

#[test]
fn refusals_name_the_field_and_the_fix() {
    let cases: Vec<(&str, Value, &str, Check, &[&str])> = vec![
        (
            "top level is an array",
            json!([]),
            "(top level)",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "an object",
                        found: "an array",
                        ..
                    }
                )
            },
            &["expected an object"],
        ),
        (
            "unknown top-level field",
            edit("/key_servce", Some(json!({}))),
            "(top level)",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `key_servce`", "registry"],
        ),
        (
            "registry missing",
            edit("/registry", None),
            "(top level)",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["missing field `registry`"],
        ),
        (
            "registry not an object",
            edit("/registry", Some(json!("registry"))),
            "registry",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        found: "a string",
                        ..
                    }
                )
            },
            &["expected an object"],
        ),
        (
            "registry null",
            edit("/registry", Some(Value::Null)),
            "registry",
            |e| matches!(e, ConfigError::Type { found: "null", .. }),
            &["expected an object"],
        ),
        (
            "unknown registry field",
            edit("/registry/authority", Some(json!("harbor"))),
            "registry",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `authority`", "cluster"],
        ),
        (
            "cluster missing",
            edit("/registry/cluster", None),
            "registry",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["missing field `cluster`"],
        ),
        (
            "cluster not a string",
            edit("/registry/cluster", Some(json!(5))),
            "registry.cluster",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "a string",
                        found: "a number",
                        ..
                    }
                )
            },
            &["expected a string"],
        ),
        (
            "cluster blank",
            edit("/registry/cluster", Some(json!("  "))),
            "registry.cluster",
            |e| matches!(e, ConfigError::Empty { .. }),
            &["must not be empty", "Envoy cluster"],
        ),
        (
            "timeout zero",
            edit("/registry/timeout_ms", Some(json!(0))),
            "registry.timeout_ms",
            |e| {
                matches!(
                    e,
                    ConfigError::Range {
                        value: 0,
                        min: 1,
                        ..
                    }
                )
            },
            &["out of range", "from 1 to 3600000"],
        ),
        (
            "timeout as a string",
            edit("/registry/timeout_ms", Some(json!("60000"))),
            "registry.timeout_ms",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        found: "a string",
                        ..
                    }
                )
            },
            &["non-negative integer"],
        ),
        (
            "timeout negative",
            edit("/registry/timeout_ms", Some(json!(-5))),
            "registry.timeout_ms",
            |e| matches!(e, ConfigError::Type { .. }),
            &["non-negative integer"],
        ),
        (
            "timeout fractional",
            edit("/registry/timeout_ms", Some(json!(1.5))),
            "registry.timeout_ms",
            |e| matches!(e, ConfigError::Type { .. }),
            &["non-negative integer"],
        ),
        (
            "policy not an object (old list shape)",
            edit("/policy", Some(json!([]))),
            "policy",
            |e| matches!(e, ConfigError::Type { .. }),
            &["expected an object"],
        ),
        (
            "unknown policy field",
            edit("/policy/fallback", Some(json!("encrypt"))),
            "policy",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `fallback`"],
        ),
        (
            "default action capitalised",
            edit("/policy/default", Some(json!("Encrypt"))),
            "policy.default",
            |e| matches!(e, ConfigError::Action { found, .. } if found == "Encrypt"),
            &["use \"encrypt\" or \"passthrough\""],
        ),
        (
            "rules not an array",
            edit("/policy/rules", Some(json!({}))),
            "policy.rules",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "an array",
                        ..
                    }
                )
            },
            &["expected an array"],
        ),
        (
            "rule with unknown field",
            edit("/policy/rules/1/repos", Some(json!("x"))),
            "policy.rules[1]",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `repos`"],
        ),
        (
            "rule without action",
            edit("/policy/rules/2/action", None),
            "policy.rules[2]",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["missing field `action`"],
        ),
        (
            "rule with unknown action",
            edit("/policy/rules/0/action", Some(json!("deny"))),
            "policy.rules[0].action",
            |e| matches!(e, ConfigError::Action { .. }),
            &["unknown action \"deny\""],
        ),
        (
            "rule pattern uppercase",
            edit("/policy/rules/1/repositories", Some(json!("Demo/**"))),
            "policy.rules[1].repositories",
            |e| {
                matches!(
                    e,
                    ConfigError::Pattern {
                        source: PatternError::InvalidCharacter { character: 'D', .. },
                        ..
                    }
                )
            },
            &["lowercase"],
        ),
        (
            "rule pattern empty",
            edit("/policy/rules/1/repositories", Some(json!(""))),
            "policy.rules[1].repositories",
            |e| {
                matches!(
                    e,
                    ConfigError::Pattern {
                        source: PatternError::Empty,
                        ..
                    }
                )
            },
            &["empty repository pattern"],
        ),
        (
            "rule pattern not a string",
            edit("/policy/rules/1/repositories", Some(json!(["demo/**"]))),
            "policy.rules[1].repositories",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        found: "an array",
                        ..
                    }
                )
            },
            &["expected a string"],
        ),
        (
            "projects not an object",
            edit("/projects", Some(json!([]))),
            "projects",
            |e| matches!(e, ConfigError::Type { .. }),
            &["expected an object"],
        ),
        (
            "project name uppercase",
            edit(
                "/projects/Demo",
                Some(json!({"recipients": [{"pem": P256_PEM}]})),
            ),
            "projects.Demo",
            |e| matches!(e, ConfigError::ProjectName { name, .. } if name == "Demo"),
            &["not a project name", "lowercase"],
        ),
        (
            "project name with a slash",
            edit(
                "/projects/demo~1app",
                Some(json!({"recipients": [{"pem": P256_PEM}]})),
            ),
            "projects.demo/app",
            |e| matches!(e, ConfigError::ProjectName { .. }),
            &["no '/'"],
        ),
        (
            "project name starting with a dash",
            edit(
                "/projects/-x",
                Some(json!({"recipients": [{"pem": P256_PEM}]})),
            ),
            "projects.-x",
            |e| matches!(e, ConfigError::ProjectName { .. }),
            &["not a project name"],
        ),
        (
            "unknown project field",
            edit("/projects/demo/keys", Some(json!([]))),
            "projects.demo",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `keys`"],
        ),
        (
            "project without recipients field",
            edit("/projects/demo/recipients", None),
            "projects.demo",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["missing field `recipients`"],
        ),
        (
            "empty recipient list",
            edit("/projects/demo/recipients", Some(json!([]))),
            "projects.demo.recipients",
            |e| matches!(e, ConfigError::NoRecipients { .. }),
            &["empty recipient list", "add at least one public key"],
        ),
        (
            "recipients not an array",
            edit("/projects/demo/recipients", Some(json!({"pem": P256_PEM}))),
            "projects.demo.recipients",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "an array",
                        ..
                    }
                )
            },
            &["expected an array"],
        ),
        (
            "recipient with neither pem nor jwk",
            edit("/projects/demo/recipients/1", Some(json!({}))),
            "projects.demo.recipients[1]",
            |e| matches!(e, ConfigError::RecipientForm { .. }),
            &["neither", "exactly one of \"pem\""],
        ),
        (
            "recipient with both",
            edit(
                "/projects/demo/recipients/0",
                Some(json!({"pem": P256_PEM, "jwk": p256_jwk()})),
            ),
            "projects.demo.recipients[0]",
            |e| matches!(e, ConfigError::RecipientForm { .. }),
            &["both", "exactly one"],
        ),
        (
            "recipient with an unknown field",
            edit("/projects/demo/recipients/0/kid", Some(json!("k1"))),
            "projects.demo.recipients[0]",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `kid`"],
        ),
        (
            "pem not a string",
            edit("/projects/demo/recipients/0/pem", Some(json!(5))),
            "projects.demo.recipients[0].pem",
            |e| matches!(e, ConfigError::Type { .. }),
            &["expected a string"],
        ),
        (
            "RSA key too small",
            edit(
                "/projects/demo/recipients/1",
                Some(json!({"pem": RSA1024_PEM})),
            ),
            "projects.demo.recipients[1].pem",
            |e| {
                matches!(
                    e,
                    ConfigError::Recipient {
                        source: RecipientError::RsaSize(1024),
                        ..
                    }
                )
            },
            &["1024 bits", "2048"],
        ),
        (
            "pem that is no PEM",
            edit(
                "/projects/demo/recipients/0/pem",
                Some(json!("ssh-rsa AAAA")),
            ),
            "projects.demo.recipients[0].pem",
            |e| {
                matches!(
                    e,
                    ConfigError::Recipient {
                        source: RecipientError::NotPem,
                        ..
                    }
                )
            },
            &["BEGIN PUBLIC KEY"],
        ),
        (
            "jwk not an object",
            edit("/projects/demo/recipients/1/jwk", Some(json!("EC"))),
            "projects.demo.recipients[1].jwk",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "an object",
                        ..
                    }
                )
            },
            &["expected an object"],
        ),
        (
            "private jwk",
            edit("/projects/demo/recipients/1/jwk/d", Some(json!("AAAA"))),
            "projects.demo.recipients[1].jwk",
            |e| {
                matches!(
                    e,
                    ConfigError::Recipient {
                        source: RecipientError::JwkPrivate("d"),
                        ..
                    }
                )
            },
            &["only public keys"],
        ),
        (
            "same key twice (PEM and JWK forms)",
            edit(
                "/projects/demo/recipients/0",
                Some(json!({"pem": P256_PEM})),
            ),
            "projects.demo.recipients[1]",
            |e| matches!(e, ConfigError::DuplicateRecipient { first, .. } if first == "projects.demo.recipients[0]"),
            &["same key as projects.demo.recipients[0]"],
        ),
        (
            "unknown limits field",
            edit("/limits/max_body_bytes", Some(json!(1))),
            "limits",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `max_body_bytes`"],
        ),
        (
            "manifest limit too small",
            edit("/limits/max_manifest_bytes", Some(json!(1000))),
            "limits.max_manifest_bytes",
            |e| {
                matches!(
                    e,
                    ConfigError::Range {
                        value: 1000,
                        min: 1024,
                        max: 67108864,
                        ..
                    }
                )
            },
            &["out of range", "from 1024 to 67108864"],
        ),
        (
            "manifest limit too large",
            edit("/limits/max_manifest_bytes", Some(json!(1u64 << 40))),
            "limits.max_manifest_bytes",
            |e| matches!(e, ConfigError::Range { .. }),
            &["out of range"],
        ),
    ];
    for (name, config, path, check, says) in cases {
        let err = match parse(&config) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => e,
        };
        assert!(check(&err), "{name}: wrong error {err:?}");
        assert_eq!(err.path(), path, "{name}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{path}: ")),
            "{name}: {message:?} does not start with the path"
        );
        for fragment in says {
            assert!(
                message.contains(fragment),
                "{name}: {message:?} lacks {fragment:?}"
            );
        }
    }
}

#[test]
fn not_json_is_refused_with_the_position() {
    for bytes in [
        &b""[..],
        b"{\"registry\": ",
        b"registry: {cluster: r}",
        b"\xff",
    ] {
        let err = Config::parse(bytes).unwrap_err();
        assert!(matches!(err, ConfigError::Json { .. }), "{err:?}");
        assert_eq!(err.path(), "");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }
    let err = Config::parse(b"{\n  \"registry\": {\"cluster\": \"r\"},\n  oops\n}").unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
}

#[test]
fn error_for_rsa_key_reads_well() {
    let config = edit(
        "/projects/demo/recipients/1",
        Some(json!({"pem": RSA1024_PEM})),
    );
    let message = parse(&config).unwrap_err().to_string();
    // e.g. "projects.demo.recipients[1].pem: RSA key of 1024 bits: use 2048 to 4096 bits"
    assert!(
        message.starts_with("projects.demo.recipients[1].pem: RSA key")
            && message.contains("1024")
            && message.contains("2048"),
        "{message}"
    );
}

#[test]
fn accept_encrypted_is_a_strict_per_rule_opt_in() {
    // Default: no rule accepts images encrypted before the push.
    let config = parse(&good()).unwrap();
    for repo in ["demo/app", "secret/x", "demo/public-docs", "other/x"] {
        assert!(!config.policy.accepts_encrypted(repo), "{repo}");
        assert!(!config.rewrite_options(repo).accept_encrypted, "{repo}");
    }
    assert!(config.policy.rules.iter().all(|r| !r.accept_encrypted));

    let config = parse(&edit("/policy/rules/2/accept_encrypted", Some(json!(true)))).unwrap();
    assert!(config.policy.rules[2].accept_encrypted);
    assert!(config.policy.accepts_encrypted("secret/x"));
    assert!(config.rewrite_options("secret/x").accept_encrypted);
    assert!(!config.policy.accepts_encrypted("demo/app"));
    // Explicit false, on any rule, is the default.
    let config = parse(&edit(
        "/policy/rules/0/accept_encrypted",
        Some(json!(false)),
    ))
    .unwrap();
    assert!(!config.policy.accepts_encrypted("demo/public-docs"));
    // null reads as absent, like every optional field.
    let config = parse(&edit("/policy/rules/1/accept_encrypted", Some(Value::Null))).unwrap();
    assert!(!config.policy.accepts_encrypted("demo/app"));

    let cases: Vec<(&str, Value, &str, Check, &[&str])> = vec![
        (
            "accept_encrypted not a boolean",
            edit("/policy/rules/1/accept_encrypted", Some(json!("yes"))),
            "policy.rules[1].accept_encrypted",
            |e| {
                matches!(
                    e,
                    ConfigError::Type {
                        expected: "true or false",
                        found: "a string",
                        ..
                    }
                )
            },
            &["expected true or false"],
        ),
        (
            "accept_encrypted on a passthrough rule",
            edit("/policy/rules/0/accept_encrypted", Some(json!(true))),
            "policy.rules[0].accept_encrypted",
            |e| matches!(e, ConfigError::AcceptEncryptedOnPassthrough { .. }),
            &["only applies to \"encrypt\" rules"],
        ),
        (
            "accept_encrypted misspelt",
            edit("/policy/rules/1/accept_encrypt", Some(json!(true))),
            "policy.rules[1]",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `accept_encrypt`", "accept_encrypted"],
        ),
        (
            "accept_encrypted as a policy-wide field",
            edit("/policy/accept_encrypted", Some(json!(true))),
            "policy",
            |e| matches!(e, ConfigError::Shape { .. }),
            &["unknown field `accept_encrypted`"],
        ),
    ];
    for (name, config, path, check, says) in cases {
        let err = match parse(&config) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => e,
        };
        assert!(check(&err), "{name}: wrong error {err:?}");
        assert_eq!(err.path(), path, "{name}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{path}: ")),
            "{name}: {message}"
        );
        for fragment in says {
            assert!(
                message.contains(fragment),
                "{name}: {message:?} lacks {fragment:?}"
            );
        }
    }
}

#[test]
fn max_ledger_lookups_limit() {
    use ocicrypt_core::config::DEFAULT_MAX_LEDGER_LOOKUPS;
    assert_eq!(DEFAULT_MAX_LEDGER_LOOKUPS, 128);
    assert_eq!(parse(&good()).unwrap().max_ledger_lookups, 128);
    let minimal = parse(&json!({"registry": {"cluster": "r"}})).unwrap();
    assert_eq!(minimal.max_ledger_lookups, 128);
    for (n, ok) in [
        (0u64, false),
        (1, true),
        (128, true),
        (1024, true),
        (1025, false),
    ] {
        let result = parse(&edit("/limits/max_ledger_lookups", Some(json!(n))));
        assert_eq!(result.is_ok(), ok, "{n}: {result:?}");
        match result {
            Ok(config) => assert_eq!(config.max_ledger_lookups as u64, n),
            Err(e) => {
                assert_eq!(e.path(), "limits.max_ledger_lookups");
                assert!(e.to_string().contains("from 1 to 1024"), "{e}");
            }
        }
    }
    let err = parse(&edit("/limits/max_ledger_lookups", Some(json!("128")))).unwrap_err();
    assert!(matches!(err, ConfigError::Type { .. }), "{err:?}");
    // The other limits are unaffected.
    let config = parse(&edit("/limits/max_ledger_lookups", Some(json!(64)))).unwrap();
    assert_eq!(config.max_manifest_bytes, 1 << 20);
    assert_eq!(config.keystream_prefetch_bytes, 8 << 20);
}

#[test]
fn ledger_cache_entries_is_bounded() {
    assert_eq!(parse(&good()).unwrap().ledger_cache_entries, 16_384);
    for (n, ok) in [
        (0u64, false),
        (1, true),
        (16_384, true),
        (1 << 20, true),
        ((1 << 20) + 1, false),
    ] {
        let result = parse(&edit("/limits/ledger_cache_entries", Some(json!(n))));
        assert_eq!(result.is_ok(), ok, "{n}: {result:?}");
        match result {
            Ok(config) => {
                assert_eq!(config.ledger_cache_entries as u64, n);
                assert!(config.ledger_cache().capacity() as u64 <= n);
            }
            Err(e) => {
                assert_eq!(e.path(), "limits.ledger_cache_entries");
                assert!(e.to_string().contains("from 1 to 1048576"), "{e}");
            }
        }
    }
    for bad in [json!("16384"), json!(-1), json!(1.5)] {
        let err = parse(&edit("/limits/ledger_cache_entries", Some(bad.clone()))).unwrap_err();
        assert_eq!(err.path(), "limits.ledger_cache_entries", "{bad}: {err}");
    }
}

fn with_replicas(replicas: Value) -> Vec<u8> {
    let mut cfg = good();
    cfg["replicas"] = replicas;
    serde_json::to_vec(&cfg).unwrap()
}

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

#[test]
fn state_key_comes_inline_or_from_the_environment() {
    let inline = Config::parse(&with_replicas(json!({"state_key": KEY_B64}))).unwrap();
    let key = inline.state_key.unwrap();
    assert_eq!(key.0[31], 31);

    let env = |name: &str| (name == "OCICRYPT_STATE_KEY").then(|| KEY_B64.to_string());
    let from_env = Config::parse_with_env(
        &with_replicas(json!({"state_key_env": "OCICRYPT_STATE_KEY"})),
        &env,
    )
    .unwrap();
    assert_eq!(*from_env.state_key.unwrap().0, *key.0);
}

#[test]
fn state_key_refusals_name_the_field() {
    let env = |name: &str| match name {
        "OCICRYPT_STATE_KEY" => Some(KEY_B64.to_string()),
        "SHORT" => Some("c2hvcnQ=".to_string()),
        _ => None,
    };
    let cases = [
        (json!({"state_key_env": "UNSET"}), "replicas.state_key_env"),
        (
            json!({"state_key_env": "bad name"}),
            "replicas.state_key_env",
        ),
        (json!({"state_key_env": "SHORT"}), "replicas.state_key_env"),
        (json!({"state_key_env": 5}), "replicas.state_key_env"),
        (
            json!({"state_key": KEY_B64, "state_key_env": "OCICRYPT_STATE_KEY"}),
            "replicas",
        ),
        (json!({}), "replicas"),
        (json!({"state_key": "c2hvcnQ="}), "replicas.state_key"),
        (json!({"state_key": KEY_B64, "extra": 1}), "replicas"),
    ];
    for (replicas, path) in cases {
        let err = match Config::parse_with_env(&with_replicas(replicas.clone()), &env) {
            Err(e) => e,
            Ok(_) => panic!("accepted {replicas}"),
        };
        assert!(
            err.path().starts_with(path),
            "{replicas}: {err} ({})",
            err.path()
        );
        assert!(!err.to_string().contains(KEY_B64), "{err}");
    }
}
