//! Outside tools some tests need (python3 with `cryptography`, skopeo).

/// Whether the test may go on: a missing tool fails the test, so that a run without it cannot
/// pass unseen. `OCICRYPT_ALLOW_MISSING_TOOLS=1` (a local opt-out, never set by CI) turns the
/// failure into a printed skip.
pub fn require(test: &str, ready: Result<(), String>) -> bool {
    match ready {
        Ok(()) => true,
        Err(reason) if std::env::var_os("OCICRYPT_ALLOW_MISSING_TOOLS").is_some() => {
            println!("SKIPPED {test}: {reason} (OCICRYPT_ALLOW_MISSING_TOOLS is set)");
            false
        }
        Err(reason) => panic!(
            "{test} needs an outside tool: {reason}; install it (scripts/setup), or set \
             OCICRYPT_ALLOW_MISSING_TOOLS=1 to skip it in a local run"
        ),
    }
}
