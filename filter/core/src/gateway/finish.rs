//! The end of a blob upload in an encrypted repository: the registry's answer to the request
//! that completes it (a monolithic body's `202`, a finishing `PUT`'s `201`, a mount or `HEAD`
//! of a blob the ledger knows), the finishing `PUT` the gateway sends itself after a monolithic
//! body, and the commit: the upload's state dropped, the blob ledgered, and the answer speaking
//! of the digest the client pushed.
use crate::digest::Digest;
use crate::distribution::route;
use crate::distribution::upload::Completion;
use crate::distribution::upload_table;
use crate::error::{Code, OciError};

use super::answer::registry_refusal;
use super::ledgered;
use super::{CalloutAnswer, ChunkFlow, Command, Env, Flow, Level, Metric, ResponseHead, Stream};

/// Whether the registry's answer goes on to the client now, or is held while the gateway's own
/// callouts (the finishing `PUT`, the ledger recording) run.
pub(super) enum Answer {
    Now,
    Held,
}

/// A blob the registry stored, on its way to the commit.
pub(super) struct Committing {
    pub(super) repository: String,
    pub(super) completion: Completion,
    /// The session whose saved state the commit drops, and whether the store had state for it.
    pub(super) upload: Option<(String, bool)>,
}

impl Stream {
    /// The registry's answer to a monolithic body sent as a `PATCH`: on `202` the gateway
    /// finishes the upload itself with a `PUT ?digest=<ciphertext>` while the answer waits.
    pub(super) fn monolithic_answered(
        &mut self,
        flow: ChunkFlow,
        head: &ResponseHead,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<Answer, OciError> {
        let Some(finish) = flow.finish else {
            return Ok(Answer::Now);
        };
        if head.status() != "202" {
            return Ok(Answer::Now);
        }
        let Some(completion) = finish.completion else {
            // The registry took the declared length before the body ended here: over HTTP/2,
            // request trailers follow it. What it holds is an unfinished encryption; the
            // session goes, and nothing is finished.
            out.push(self.abandon_session(env.config, head.header("location").as_deref()));
            return Err(OciError::new(
                Code::BlobUploadInvalid,
                "the upload's body did not end where the registry's did (request trailers are refused on writes to an encrypted repository); the upload is abandoned, push again without trailers",
            ));
        };
        let location = head
            .header("location")
            .and_then(|l| route::location_path(&l))
            .ok_or_else(|| {
                OciError::new(
                    Code::Unknown,
                    "the registry answered the upload without a Location",
                )
            })?;
        let stored = completion.stored_digest.to_string();
        let path = route::rewrite_query(&location, &["digest"], &[("digest", &stored)]);
        let callout = self.registry_callout(env.config, "PUT", &path, None, None);
        self.flow = Flow::Finishing {
            callout: Some(callout.id),
            repository: flow.repository,
            completion,
            upload: flow.upload_id.map(|id| (id, flow.had_state)),
        };
        out.push(Command::Dispatch(callout));
        Ok(Answer::Held)
    }

    /// The registry committed the blob (`201`): with replicas an encrypted blob is first
    /// recorded in the registry's ledger while the answer waits; otherwise it is committed now.
    pub(super) fn blob_committed(
        &mut self,
        committing: Committing,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<Answer, OciError> {
        if env.config.state_key.is_some() && committing.completion.ledger.is_some() {
            self.start_recording(committing, env, out)?;
            return Ok(Answer::Held);
        }
        commit(&committing, env, out)?;
        Ok(Answer::Now)
    }

    /// The registry's answer about a blob the ledger knows, asked as its ciphertext: a mount
    /// (`201`) records the blob in this repository; a `HEAD` (`200`) is answered as if the
    /// client's own digest were there. Any other answer goes to the client as it is.
    pub(super) fn known_answered(
        &mut self,
        known: Flow,
        status: &str,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<Answer, OciError> {
        let Flow::Known {
            repository,
            client_digest,
            entry,
            mounted,
        } = known
        else {
            return Ok(Answer::Now);
        };
        if status != if mounted { "201" } else { "200" } {
            return Ok(Answer::Now);
        }
        if mounted && env.config.state_key.is_some() {
            // Ledgered in the registry like an upload, so any replica finishes the push; the
            // client's 201 waits for it.
            let completion = Completion {
                client_digest,
                stored_digest: entry.encrypted_digest,
                ledger: Some(entry),
            };
            let committing = Committing {
                repository,
                completion,
                upload: None,
            };
            self.start_recording(committing, env, out)?;
            return Ok(Answer::Held);
        }
        if mounted {
            out.extend(ledgered::record(env, &repository, &client_digest, &entry)?);
        }
        out.extend(answer_as_pushed(&repository, &client_digest, mounted));
        Ok(Answer::Now)
    }

    /// An answer to one of the callouts that end an upload (the finishing `PUT`, a recording
    /// stage). A failure refuses the request; the cleanup it queued is kept.
    pub(super) fn on_finishing_answer(
        &mut self,
        flow: Flow,
        answer: &CalloutAnswer,
        env: &mut Env,
    ) -> Vec<Command> {
        let mut out = Vec::new();
        let done = match flow {
            Flow::Finishing {
                repository,
                completion,
                upload,
                ..
            } => {
                let committing = Committing {
                    repository,
                    completion,
                    upload,
                };
                self.finishing_put_answered(committing, answer, env, &mut out)
            }
            Flow::Recording {
                repository,
                completion,
                upload,
                stage,
                ..
            } => {
                let committing = Committing {
                    repository,
                    completion,
                    upload,
                };
                self.recording_answered(committing, stage, answer, env, &mut out)
            }
            other => {
                self.flow = other;
                Ok(())
            }
        };
        if let Err(e) = done {
            out.extend(self.refuse(e));
        }
        out
    }

    /// The registry answered the finishing `PUT`: its `201` turns the held `202` into the
    /// client's `201`; its own refusal (a 4xx with an OCI body) is the client's answer, as
    /// without the gateway.
    fn finishing_put_answered(
        &mut self,
        committing: Committing,
        answer: &CalloutAnswer,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let status = answer.status();
        if status != "201" {
            // E.g. DIGEST_INVALID for a JSON blob whose digest the client got wrong, or a token
            // that expired while the body streamed.
            return self.relay_registry_refusal("commit the encrypted blob", answer, out);
        }
        // The held answer is the registry's 202 to the PATCH: make it the 201 of a commit.
        out.extend([
            Command::SetResponseHeader(":status".into(), "201".into()),
            Command::RemoveResponseHeader("range".into()),
            Command::RemoveResponseHeader("docker-upload-uuid".into()),
            Command::SetResponseHeader("content-length".into(), "0".into()),
        ]);
        if let Answer::Now = self.blob_committed(committing, env, out)? {
            out.push(Command::ResumeResponse);
        }
        Ok(())
    }
}

/// Commits a blob the registry stored: the upload's saved state is dropped, an encrypted blob
/// ledgered (under the client's digest and the ciphertext's), and the answer made to speak of
/// what the client pushed.
pub(super) fn commit(
    committing: &Committing,
    env: &mut Env,
    out: &mut Vec<Command>,
) -> Result<(), OciError> {
    let Committing {
        repository,
        completion,
        upload,
    } = committing;
    if let Some((id, true)) = upload {
        let idle = env.config.upload_idle_seconds;
        let gone = upload_table::remove_in(env.store, id, env.now, idle)?;
        if gone != 0 {
            out.push(Command::Metric(Metric::UploadState(-gone)));
        }
    }
    match &completion.ledger {
        Some(entry) => {
            out.extend(ledgered::record(
                env,
                repository,
                &completion.client_digest,
                entry,
            )?);
            // Also under the ciphertext's digest: a re-push (or re-tag) of the image as stored
            // names the ciphertext, which the rewrite then recognises as the gateway's own.
            out.extend(ledgered::record(
                env,
                repository,
                &entry.encrypted_digest,
                entry,
            )?);
            out.push(Command::Log(
                Level::Info,
                format!(
                    "{repository}: blob {} stored encrypted as {} ({} bytes)",
                    completion.client_digest, entry.encrypted_digest, entry.size
                ),
            ));
            out.push(Command::Metric(Metric::LayerEncrypted(entry.size)));
        }
        None => out.push(Command::Metric(Metric::BlobPassed)),
    }
    out.extend(answer_as_pushed(
        repository,
        &completion.client_digest,
        true,
    ));
    Ok(())
}

/// Makes the held answer speak of what the client pushed: `Docker-Content-Digest` is the
/// client's digest (containerd refuses any other) and, when `location`, so is the `Location`.
fn answer_as_pushed(repository: &str, digest: &Digest, location: bool) -> Vec<Command> {
    let mut out = vec![Command::SetResponseHeader(
        "docker-content-digest".into(),
        digest.to_string(),
    )];
    if location {
        out.push(Command::SetResponseHeader(
            "location".into(),
            format!("/v2/{repository}/blobs/{digest}"),
        ));
    }
    out
}

impl Stream {
    /// Ends the stream with the registry's own refusal of what the gateway asked it on the
    /// client's behalf, when that is a 4xx with an OCI error body: the client gets it as it is,
    /// and a 401 keeps its challenge (the client fetches the token it names). Any other answer
    /// is the gateway's refusal to do `what`.
    pub(super) fn relay_registry_refusal(
        &mut self,
        what: &str,
        answer: &CalloutAnswer,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let status = answer.status();
        let Some(code) = registry_error(&status, &answer.body) else {
            return Err(registry_refusal(what, &status));
        };
        out.push(Command::Log(
            Level::Warn,
            format!("refused {}: the registry answered {code}", self.request),
        ));
        let challenge = (code == 401)
            .then(|| {
                answer
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                    .map(|(_, v)| v.clone())
            })
            .flatten();
        out.extend([
            Command::Relay {
                status: code,
                body: answer.body.clone(),
                challenge,
            },
            Command::Pause,
        ]);
        self.flow = Flow::Refused;
        Ok(())
    }
}

/// The status of a 4xx answer of the registry whose body is an OCI error document, which the
/// client gets as it is.
fn registry_error(status: &str, body: &[u8]) -> Option<u16> {
    let code: u16 = status.parse().ok().filter(|c| (400..500).contains(c))?;
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    doc.get("errors")?.as_array()?;
    Some(code)
}
