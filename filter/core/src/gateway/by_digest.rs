//! A manifest pushed by digest (an index's platform manifests, referrers): rewriting changes its
//! digest, and the request line naming the old one cannot change once the body is seen. So
//! the gateway stores the rewritten manifest itself, `PUT /v2/<name>/manifests/<new digest>`
//! by callout with the client's credentials, and answers the client as the registry would
//! have for the digest it pushed. No tag of the gateway's keeps the manifest: it lives exactly
//! as long as the registry keeps an untagged manifest an index names (see the README,
//! "Garbage collection").
//!
//! The mapping from the client's digest to the stored one is ledgered, so that the index
//! pushed next names what the registry holds: in the process's cache, and with replicas in an
//! authenticated ledger record under the client's digest (written while the answer waits, as
//! for a blob; the record names the stored manifest in annotations only).
//!
//! A referrer (a manifest with a `subject`) is stored under the reserved tag of the client's
//! digest instead, as before: a registry without the referrers API (distribution 2.8) lists
//! it nowhere else, and `scripts/rotate` finds it there to point its `subject` at the rotated
//! manifest. Under that tag it is its own ledger record (read back as a manifest entry).
use crate::digest::Digest;
use crate::distribution::ledger::{self, LedgerEntry};
use crate::distribution::upload::Completion;
use crate::error::OciError;

use super::finish::Committing;
use super::ledgered;
use super::{CalloutAnswer, Command, Env, Flow, Level, Stream};

impl Stream {
    /// Stores the rewritten manifest under its own digest by callout; the client's request
    /// waits (its body goes nowhere).
    pub(super) fn store_by_digest(
        &mut self,
        repository: String,
        client_digest: Digest,
        entry: LedgerEntry,
        rewritten: Vec<u8>,
        env: &Env,
    ) -> Vec<Command> {
        let tagged = is_referrer(&rewritten);
        let reference = if tagged {
            ledger::ledger_tag(&client_digest)
        } else {
            entry.encrypted_digest.to_string()
        };
        let path = format!("/v2/{repository}/manifests/{reference}");
        let callout = self.registry_callout(
            env.config,
            "PUT",
            &path,
            Some(&rewritten),
            entry.media_type.as_deref(),
        );
        self.flow = Flow::Storing {
            callout: callout.id,
            repository,
            client_digest,
            entry,
            tagged,
        };
        vec![Command::Dispatch(callout), Command::Pause]
    }

    /// The registry answered the gateway's `PUT` of a manifest pushed by digest. Stored: it is
    /// ledgered (with replicas, recorded in the registry first) and the client answered `201`.
    /// The registry's own refusal (a 4xx with an OCI error body: a `401` and its challenge, a
    /// `MANIFEST_BLOB_UNKNOWN`) is the client's answer as the registry gave it; anything else,
    /// a failed callout included, is refused.
    pub(super) fn on_stored(
        &mut self,
        flow: Flow,
        answer: &CalloutAnswer,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let Flow::Storing {
            repository,
            client_digest,
            entry,
            tagged,
            ..
        } = flow
        else {
            self.flow = flow;
            return Ok(Vec::new());
        };
        let status = answer.status();
        let mut out = Vec::new();
        if !matches!(status.as_str(), "200" | "201" | "202" | "204") {
            self.relay_registry_refusal("store the rewritten manifest", answer, &mut out)?;
            return Ok(out);
        }
        if env.config.state_key.is_some() && !tagged {
            let committing = Committing {
                repository,
                completion: Completion {
                    client_digest,
                    stored_digest: entry.encrypted_digest,
                    ledger: Some(entry),
                },
                upload: None,
            };
            self.start_recording(committing, env, &mut out)?;
            return Ok(out);
        }
        out.extend(self.manifest_committed(&repository, &client_digest, &entry, env)?);
        Ok(out)
    }

    /// A manifest pushed by digest is stored (and, with replicas, recorded): ledgered in the
    /// process's cache, and the client answered as the registry answers a manifest `PUT` — `201`,
    /// `Location` and `Docker-Content-Digest` naming the digest the client pushed (containerd
    /// and oras compare it with their own), the stored one in `X-Ocicrypt-Stored-Digest`.
    pub(super) fn manifest_committed(
        &mut self,
        repository: &str,
        client_digest: &Digest,
        entry: &LedgerEntry,
        env: &Env,
    ) -> Result<Vec<Command>, OciError> {
        let mut out = ledgered::record(env, repository, client_digest, entry)?;
        out.push(Command::Log(
            Level::Info,
            format!(
                "{repository}: manifest {client_digest} stored as {}",
                entry.encrypted_digest
            ),
        ));
        self.flow = Flow::Pass;
        out.push(Command::Respond {
            status: 201,
            headers: vec![
                (
                    "location".to_string(),
                    format!("/v2/{repository}/manifests/{client_digest}"),
                ),
                (
                    "docker-content-digest".to_string(),
                    client_digest.to_string(),
                ),
                (
                    "x-ocicrypt-stored-digest".to_string(),
                    entry.encrypted_digest.to_string(),
                ),
            ],
            body: Vec::new(),
        });
        out.push(Command::Pause);
        Ok(out)
    }
}

/// Whether a manifest names a `subject` (a referrer: a signature, an SBOM, an attestation).
fn is_referrer(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|doc| doc.get("subject").is_some_and(serde_json::Value::is_object))
}
