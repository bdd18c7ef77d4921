//! A manifest `PUT` after its request line: the body held within the limit, checked against
//! the digest it was pushed by, rewritten with the ledger (with replicas, the records this
//! process lacks are read from the registry first, a bounded number), and the registry's `201`
//! answered in the client's digest and ledgered.
use crate::config::policy::project_of;
use crate::digest::Digest;
use crate::distribution::ledger::{self, LedgerEntry};
use crate::distribution::manifest;
use crate::error::{Code, OciError};

use super::finish::{Answer, Committing};
use super::ledgered::{self, ledger_entry};
use super::request::too_large;
use super::{CalloutAnswer, CalloutId, Command, Env, Flow, Level, Metric, ResponseHead, Stream};

impl Stream {
    /// Request body bytes arrived for a flow the machine carries past the request line (an
    /// upload chunk, a manifest being pushed, a refusal being drained): `size` bytes are
    /// buffered by the host, `read` copies them out when the machine needs them.
    pub fn on_request_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: &dyn Fn() -> Result<Vec<u8>, OciError>,
        env: &mut Env,
    ) -> Vec<Command> {
        let result = match &self.flow {
            Flow::Manifest { .. } => self.manifest_body(size, end_of_stream, read, env),
            Flow::Chunk(_) => Ok(self.chunk_body(size, end_of_stream, read, env)),
            Flow::Refused => Ok(vec![Command::Pause]),
            Flow::Draining(e) if end_of_stream => Err(e.clone()),
            Flow::Draining(_) => Ok(vec![
                Command::ReplaceRequestBody(size, Vec::new()),
                Command::Continue,
            ]),
            _ => Ok(vec![Command::Continue]),
        };
        match result {
            Ok(commands) => commands,
            Err(e) => self.refuse(e),
        }
    }

    fn manifest_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: &dyn Fn() -> Result<Vec<u8>, OciError>,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let limit = env.config.max_manifest_bytes;
        if size > limit {
            let err = too_large(size, limit);
            if end_of_stream {
                return Err(err);
            }
            // Drop what was held and the rest as it comes; answer at the end (see Draining).
            self.flow = Flow::Draining(err);
            return Ok(vec![
                Command::ReplaceRequestBody(size, Vec::new()),
                Command::Continue,
            ]);
        }
        if !end_of_stream {
            return Ok(vec![Command::Pause]);
        }
        let Flow::Manifest {
            repository,
            by_digest,
            client_digest,
            ..
        } = &mut self.flow
        else {
            return Ok(vec![Command::Continue]);
        };
        let body = read()?;
        if let Some(pushed) = by_digest {
            // The registry no longer checks the body against the digest (the path names a
            // tag now): check it here, or a client could point a digest at any manifest.
            manifest::verify_pushed_digest(&body, pushed).map_err(|e| e.to_oci())?;
        }
        *client_digest = Some(Digest::of(&body));
        // Before anything parses it: a body of countless tiny values would grow the VM for good.
        manifest::check_value_count(&body, manifest::MAX_JSON_VALUES).map_err(|e| e.to_oci())?;
        let repo = repository.clone();
        if env.config.state_key.is_some() {
            // Replicas: what another replica (or this one before a restart) encrypted is in the
            // registry's ledger; fetch what this process does not know, then rewrite.
            // Bounded: a manifest naming many unknown digests is refused before any lookup.
            let known = |d: &Digest| ledger_entry(env, &[], &repo, d).is_some();
            let missing =
                manifest::referenced_digests_bounded(&body, &known, env.config.max_ledger_lookups)
                    .map_err(|e| e.to_oci())?;
            if !missing.is_empty() {
                let mut out = Vec::new();
                for d in missing {
                    let path = format!("/v2/{repo}/manifests/{}", ledger::ledger_tag(&d));
                    let callout = self.registry_callout(env.config, "GET", &path, None, None);
                    self.ledger_reads.push((callout.id, d));
                    out.push(Command::Dispatch(callout));
                }
                self.held_manifest = Some(body);
                out.push(Command::Pause);
                return Ok(out);
            }
        }
        let (mut out, rewritten) = self.rewrite_manifest(&body, env)?;
        out.extend(self.rewritten_onward(size, rewritten, env)?);
        Ok(out)
    }

    /// The rewritten manifest goes on: pushed by tag, as the request's new body; pushed by
    /// digest, in a `PUT` of the gateway's own under its new digest (see
    /// [`Stream::store_by_digest`]).
    fn rewritten_onward(
        &mut self,
        size: usize,
        rewritten: Vec<u8>,
        env: &Env,
    ) -> Result<Vec<Command>, OciError> {
        if let Flow::Manifest {
            repository,
            by_digest: Some(client_digest),
            entry: Some(entry),
            ..
        } = &self.flow
        {
            let (repository, client_digest, entry) =
                (repository.clone(), *client_digest, entry.clone());
            return Ok(self.store_by_digest(repository, client_digest, entry, rewritten, env));
        }
        Ok(vec![
            Command::ReplaceRequestBody(size, rewritten),
            Command::Continue,
        ])
    }

    /// Whether the held manifest waits for this ledger read.
    pub(super) fn reads_ledger(&self, id: CalloutId) -> bool {
        self.ledger_reads.iter().any(|(i, _)| *i == id)
    }

    /// One of the held manifest's ledger reads is answered; once all are, it is rewritten.
    pub(super) fn on_ledger_read(
        &mut self,
        id: CalloutId,
        answer: &CalloutAnswer,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let Some(i) = self.ledger_reads.iter().position(|(t, _)| *t == id) else {
            return Ok(Vec::new());
        };
        let (_, digest) = self.ledger_reads.swap_remove(i);
        let mut out = Vec::new();
        if let Flow::Manifest { repository, .. } = &self.flow {
            let key = env.config.state_key.as_ref();
            if let (true, Some(key)) = (answer.status() == "200", key) {
                match ledger::read_stored(&key.0, repository, &digest, &answer.body) {
                    Ok(entry) => out.extend(ledgered::record_read_back(
                        env,
                        &mut self.read_back,
                        repository,
                        digest,
                        entry,
                    )?),
                    Err(ledger::StoredEntryError::Unauthenticated) => {
                        // Not written by the gateway: stop here, trust none of it.
                        return Err(OciError::new(
                            Code::ManifestInvalid,
                            format!("the registry's ledger record for {digest} in {repository} was not written by this gateway (or was altered); nothing was stored"),
                        ));
                    }
                    // An earlier build's record (its layer kept the ciphertext from garbage
                    // collection): unknown; the client uploads the layer again.
                    Err(
                        ledger::StoredEntryError::NotJson | ledger::StoredEntryError::Superseded,
                    ) => {}
                }
            }
        }
        if !self.ledger_reads.is_empty() {
            return Ok(out);
        }
        let held = self.held_manifest.take().unwrap_or_default();
        // A refusal still carries the cache's metrics of the entries just recorded.
        match self
            .rewrite_manifest(&held, env)
            .and_then(|(rewrite, rewritten)| {
                let onward = self.rewritten_onward(held.len(), rewritten, env)?;
                Ok(rewrite.into_iter().chain(onward))
            }) {
            Ok(commands) => out.extend(commands),
            Err(e) => out.extend(self.refuse(e)),
        }
        Ok(out)
    }

    /// Rewrites the manifest the stream holds with the ledger as it is now: the metric and log
    /// line to emit, and the new body.
    fn rewrite_manifest(
        &mut self,
        body: &[u8],
        env: &Env,
    ) -> Result<(Vec<Command>, Vec<u8>), OciError> {
        let Flow::Manifest {
            repository,
            content_type,
            entry,
            recipients,
            ..
        } = &mut self.flow
        else {
            return Err(OciError::new(
                Code::Unknown,
                "manifest rewrite outside a manifest push",
            ));
        };
        let repo = repository.clone();
        let read_back = &self.read_back;
        // A layer wrapped for recipients the project no longer has is not reused: the image
        // would open only with the removed keys. The client uploads it again (its HEAD now
        // answers 404), to be encrypted for the current ones.
        let stale = std::cell::RefCell::new(Vec::new());
        let lookup = |d: &Digest| {
            let found = ledger_entry(env, read_back, &repo, d)?;
            if found.media_type.is_none()
                && found.recipients.as_deref() != Some(recipients.as_str())
            {
                stale.borrow_mut().push(*d);
                return None;
            }
            Some(found)
        };
        let options = env.config.rewrite_options(&repo);
        let rewritten = manifest::rewrite_with(body, content_type, &lookup, &options).map_err(|e| {
            match stale.borrow().first() {
                Some(d) => OciError::new(
                    Code::ManifestInvalid,
                    format!("layer {d} was encrypted for recipients project {:?} no longer has (a key rotation); push the image again and the gateway encrypts it for the current ones", project_of(&repo)),
                ),
                None => e.to_oci(),
            }
        })?;
        *entry = Some(LedgerEntry::for_manifest(&rewritten));
        let out = vec![
            Command::Metric(Metric::ManifestRewritten),
            Command::Log(
                Level::Info,
                format!(
                    "{repo}: manifest rewritten ({} encrypted layers, {} bytes, stored as {})",
                    rewritten.encrypted_layers,
                    rewritten.body.len(),
                    Digest::of(&rewritten.body)
                ),
            ),
        ];
        Ok((out, rewritten.body))
    }

    /// The registry's response headers, for flows the machine carries to the answer (a manifest
    /// push, passthrough, refusals): checked (see [`Stream::check_answer`]), and a stored
    /// manifest ledgered and answered in the client's digest.
    pub fn on_response_headers(&mut self, head: &ResponseHead, env: &mut Env) -> Vec<Command> {
        match self.response(head, env) {
            Ok(commands) => commands,
            Err(e) => self.refuse(e),
        }
    }

    fn response(&mut self, head: &ResponseHead, env: &mut Env) -> Result<Vec<Command>, OciError> {
        let status = head.status();
        let mut out = Vec::new();
        if !matches!(self.flow, Flow::Refused) {
            let location = head.header("location");
            if let Err(e) = self.check_answer(env.config, &status, location.as_deref(), &mut out) {
                out.extend(self.refuse(e));
                return Ok(out);
            }
            out.extend(self.session_named(env.config, &status, location.as_deref()));
        }
        let answered = match std::mem::take(&mut self.flow) {
            Flow::Chunk(flow) if flow.finish.is_none() => self
                .chunk_answered(*flow, head, env, &mut out)
                .map(|()| Answer::Now),
            Flow::Chunk(flow) => self.monolithic_answered(*flow, head, env, &mut out),
            Flow::Finishing {
                repository,
                completion,
                upload,
                ..
            } if status == "201" => {
                let committing = Committing {
                    repository,
                    completion,
                    upload,
                };
                self.blob_committed(committing, env, &mut out)
            }
            known @ Flow::Known { .. } => self.known_answered(known, &status, env, &mut out),
            // (A manifest pushed by digest never goes on: the gateway stores it itself.)
            Flow::Manifest {
                repository,
                by_digest: None,
                client_digest: Some(client_digest),
                entry,
                ..
            } if status == "201" => manifest_stored(
                &repository,
                &client_digest,
                entry.as_ref(),
                head,
                env,
                &mut out,
            )
            .map(|()| Answer::Now),
            _ => Ok(Answer::Now),
        };
        // A refusal here keeps the cleanup callout queued before it.
        match answered {
            Ok(Answer::Now) => out.push(Command::Continue),
            Ok(Answer::Held) => out.push(Command::Pause),
            Err(e) => out.extend(self.refuse(e)),
        }
        Ok(out)
    }
}

/// The registry stored a pushed manifest: every stored manifest is ledgered, so an index naming
/// it as a child, or a referrer naming it as `subject`, can be rewritten to what was stored.
fn manifest_stored(
    repository: &str,
    client_digest: &Digest,
    entry: Option<&LedgerEntry>,
    head: &ResponseHead,
    env: &Env,
    out: &mut Vec<Command>,
) -> Result<(), OciError> {
    if let Some(entry) = entry {
        out.extend(ledgered::record(env, repository, client_digest, entry)?);
    }
    // What was stored has another digest; say it in a header of our own, and keep the
    // client's in Docker-Content-Digest (containerd refuses any other).
    if let Some(stored) = head.header("docker-content-digest") {
        out.push(Command::SetResponseHeader(
            "x-ocicrypt-stored-digest".into(),
            stored,
        ));
    }
    out.push(Command::SetResponseHeader(
        "docker-content-digest".into(),
        client_digest.to_string(),
    ));
    Ok(())
}
