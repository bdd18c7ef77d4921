//! `config::Config::parse` on fuzzed plugin configurations.
//!
//! Properties: it never panics; a refusal other than a JSON syntax error names the field
//! path; a configuration that parses parses again to the same configuration, also from its
//! JSON written back out (key order and spacing do not matter), and is internally consistent
//! (limits within their ranges, no project with an empty recipient list).
#![no_main]

use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::config::{
    Config, ConfigError, MAX_KEYSTREAM_PREFETCH_BYTES, MAX_LEDGER_CACHE_ENTRIES,
    MAX_MAX_LEDGER_LOOKUPS, MAX_MAX_MANIFEST_BYTES, MAX_UPLOAD_IDLE_SECONDS,
    MIN_MAX_MANIFEST_BYTES,
};

fuzz_target!(|data: &[u8]| {
    let parsed = Config::parse(data);
    match &parsed {
        Err(e) => {
            check!(!e.to_string().is_empty(), "an error without a message");
            if !matches!(e, ConfigError::Json { .. }) {
                check!(!e.path().is_empty(), "error without a field path: {e}");
            }
        }
        Ok(config) => {
            check!(
                (MIN_MAX_MANIFEST_BYTES..=MAX_MAX_MANIFEST_BYTES)
                    .contains(&(config.max_manifest_bytes as u64)),
                "max_manifest_bytes {} out of range",
                config.max_manifest_bytes
            );
            check!(
                config.keystream_prefetch_bytes <= MAX_KEYSTREAM_PREFETCH_BYTES,
                "keystream_prefetch_bytes {} out of range",
                config.keystream_prefetch_bytes
            );
            check!(
                (1..=MAX_MAX_LEDGER_LOOKUPS).contains(&(config.max_ledger_lookups as u64)),
                "max_ledger_lookups {} out of range",
                config.max_ledger_lookups
            );
            check!(
                (1..=MAX_UPLOAD_IDLE_SECONDS).contains(&config.upload_idle_seconds),
                "upload_idle_seconds {} out of range",
                config.upload_idle_seconds
            );
            check!(
                (1..=MAX_LEDGER_CACHE_ENTRIES).contains(&(config.ledger_cache_entries as u64))
                    && config.ledger_cache().capacity() <= config.ledger_cache_entries,
                "ledger_cache_entries {} out of range",
                config.ledger_cache_entries
            );
            for (project, recipients) in &config.projects {
                check!(
                    !recipients.is_empty(),
                    "project {project} with no recipients"
                );
                check!(
                    config
                        .recipients(project)
                        .is_some_and(|r| r.len() == recipients.len()),
                    "recipients({project}) disagrees with projects"
                );
            }
            let again = Config::parse(data);
            check!(
                again.as_ref().map(|c| format!("{c:?}")).ok() == Some(format!("{config:?}")),
                "parsing the same configuration twice gave two answers"
            );
            // Written back out (compact, and pretty), it is the same configuration.
            let value: serde_json::Value = match serde_json::from_slice(data) {
                Ok(v) => v,
                Err(e) => panic!("property broken: a configuration that is not JSON parsed ({e})"),
            };
            for text in [
                serde_json::to_vec(&value).unwrap_or_default(),
                serde_json::to_vec_pretty(&value).unwrap_or_default(),
            ] {
                let reparsed = Config::parse(&text);
                check!(
                    reparsed.as_ref().map(|c| format!("{c:?}")).ok() == Some(format!("{config:?}")),
                    "the configuration written back out parses differently: {:?}",
                    reparsed.err()
                );
            }
        }
    }
});
