//! Answers of the registry: to the callouts the request-line flows make (a manifest read
//! before a delete, a ledger read for a `HEAD`, a session opened for a `POST ?digest=`), and
//! the check every answer in an encrypted repository passes before the client sees it.
use crate::config::Config;
use crate::distribution::ledger;
use crate::distribution::route;
use crate::distribution::session;
use crate::distribution::upload::{self, ChunkStream, Replica, UploadRecord};
use crate::distribution::upload_table;
use crate::error::{Code, OciError};

use super::request::patch_request;
use super::{
    CalloutAnswer, CalloutId, ChunkFlow, Command, Env, Finish, Flow, Level, Metric, ResponseHead,
    Stream,
};

impl Stream {
    /// Whether the stream waits for the answer to callout `id` (an answer nobody waits for is
    /// dropped unread).
    pub fn awaits(&self, id: CalloutId) -> bool {
        self.flow.callout() == Some(id) || self.reads_ledger(id) || self.is_key_fetch(id)
    }

    /// A callout this machine dispatched is answered. An answer nobody waits for (a
    /// best-effort cleanup) is dropped.
    pub fn on_callout(
        &mut self,
        id: CalloutId,
        answer: &CalloutAnswer,
        env: &mut Env,
    ) -> Vec<Command> {
        let read = if self.is_key_fetch(id) {
            return self.on_key_answer(super::fetch_status(answer), &answer.body, env);
        } else if self.flow.callout() == Some(id) {
            self.on_answer(answer, env)
        } else if self.reads_ledger(id) {
            self.on_ledger_read(id, answer, env)
        } else {
            return Vec::new();
        };
        match read {
            Ok(commands) => commands,
            Err(e) => self.refuse(e),
        }
    }

    fn on_answer(
        &mut self,
        answer: &CalloutAnswer,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let status = answer.status();
        match std::mem::take(&mut self.flow) {
            Flow::DeleteCheck { repository, .. } => {
                if status == "200" && ledger::is_ledger_record(&answer.body) {
                    return Err(OciError::new(
                        Code::Denied,
                        format!("this manifest of {repository} is the encrypting gateway's ledger; clients cannot delete it"),
                    ));
                }
                match status.as_str() {
                    // Read and not the ledger's, or not there (the delete is answered 404 too).
                    "200" | "404" => Ok(vec![Command::Continue]),
                    // No credentials: the registry answers the delete with its own challenge,
                    // which the client needs to get credentials at all.
                    "401" if self.authorization.is_none() => Ok(vec![Command::Continue]),
                    // Credentials that may delete but not read (a bearer token scoped to
                    // `delete` alone): the gateway cannot tell a ledger record, so no delete.
                    "401" | "403" => Err(OciError::new(
                        Code::Denied,
                        format!("deleting a manifest by digest in encrypted repository {repository} needs pull as well as delete: the gateway reads it first (its own ledger records cannot be deleted) and the registry answered {status} to that read with these credentials; use credentials (a token scope) with pull,delete on {repository}"),
                    )),
                    _ => Err(registry_refusal(
                        "read the manifest before its delete",
                        &status,
                    )),
                }
            }
            Flow::TagsList {
                repository,
                skipped,
                ..
            } => self.tags_page(answer, repository, skipped, env),
            Flow::HeadLookup {
                repository, digest, ..
            } => {
                let mut out = Vec::new();
                if let (true, Some(key)) = (status == "200", env.config.state_key.as_ref()) {
                    match ledger::read_stored(&key.0, &repository, &digest, &answer.body) {
                        Ok(entry) => out.extend(super::ledgered::record_read_back(
                            env,
                            &mut self.read_back,
                            &repository,
                            digest,
                            entry,
                        )?),
                        Err(ledger::StoredEntryError::Unauthenticated) => {
                            // Not the gateway's: the blob counts as unknown (it is uploaded,
                            // and encrypted, again).
                            out.push(Command::Log(
                                Level::Warn,
                                format!("{repository}: ledger record for {digest} is not the gateway's; ignored"),
                            ));
                        }
                        // An earlier build's record: unknown, so the blob is uploaded again
                        // and its new record replaces the old one.
                        Err(
                            ledger::StoredEntryError::NotJson
                            | ledger::StoredEntryError::Superseded,
                        ) => {}
                    }
                }
                out.extend(self.redecide(env));
                Ok(out)
            }
            Flow::OpeningSession {
                repository,
                client_digest,
                recipients,
                ..
            } => {
                if status != "202" {
                    return Err(registry_refusal("open an upload session", &status)
                        .with_challenge(challenge_of(&status, answer)));
                }
                let mut out = Vec::new();
                let location = answer.header("location");
                if let Err(e) =
                    self.check_answer(env.config, &status, location.as_deref(), &mut out)
                {
                    out.extend(self.refuse(e));
                    return Ok(out);
                }
                let location =
                    location
                        .and_then(|l| route::location_path(&l))
                        .ok_or_else(|| {
                            OciError::new(
                                Code::Unknown,
                                "the registry opened a session without a Location",
                            )
                        })?;
                let id = route::upload_id_of_location(&location);
                let stream = ChunkStream::new(UploadRecord::new(&repository), None)?;
                out.extend(patch_request(location));
                self.flow = Flow::Chunk(Box::new(ChunkFlow {
                    repository,
                    had_state: false,
                    upload_id: id,
                    stream: Some(stream),
                    finish: Some(Finish {
                        client_digest,
                        recipients,
                        completion: None,
                    }),
                }));
                out.push(Command::Continue);
                Ok(out)
            }
            flow @ Flow::Storing { .. } => self.on_stored(flow, answer, env),
            flow @ (Flow::Finishing { .. } | Flow::Recording { .. }) => {
                Ok(self.on_finishing_answer(flow, answer, env))
            }
            other => {
                self.flow = other;
                Ok(Vec::new())
            }
        }
    }

    /// Checks an answer of the registry to a request in an encrypted repository before the
    /// client sees it: the registry is not trusted with plaintext, so it cannot send the client
    /// (and its next chunk) elsewhere — no redirect, no `Location` out of the repository or off
    /// the gateway. A session it opened elsewhere is deleted where the gateway can reach it
    /// (a callout pushed on `out`, whose answer nobody waits for).
    pub fn check_answer(
        &mut self,
        config: &Config,
        status: &str,
        location: Option<&str>,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let Some(repository) = self.encrypted.clone() else {
            return Ok(());
        };
        if status.starts_with('3') {
            return Err(OciError::new(
                Code::BadGateway,
                format!("the registry answered a redirect ({status}) to a write in encrypted repository {repository}; the gateway does not follow it, nothing more was sent"),
            ));
        }
        match location {
            Some(l) if !route::location_stays(l, &self.authority, &repository) => {
                if let Some(path) = route::location_path(l).filter(|_| {
                    l.starts_with('/') || l.contains(&format!("://{}/", self.authority))
                }) {
                    // Best effort: nothing was sent to that session.
                    out.push(Command::Dispatch(
                        self.registry_callout(config, "DELETE", &path, None, None),
                    ));
                }
                Err(OciError::new(
                    Code::BadGateway,
                    format!("the registry answered a Location outside encrypted repository {repository} (or off this gateway); the gateway does not follow it, nothing more was sent"),
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Stream {
    /// The registry's answer to a chunk the gateway encrypted (a `PATCH`, not the last part of
    /// an upload it finishes itself). On `202` the registry must hold exactly the bytes the
    /// gateway sent — a state kept for another offset would reuse keystream — and then the
    /// session's state goes where the next request finds it: sealed into the `Location` the
    /// client echoes (replicas), or into the store. The session's claim is released first:
    /// the client's next request may come as soon as it sees this answer, on any worker.
    pub(super) fn chunk_answered(
        &mut self,
        flow: ChunkFlow,
        head: &ResponseHead,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let (Some(id), Some(stream)) = (flow.upload_id, flow.stream) else {
            return Ok(());
        };
        if head.status() != "202" {
            return Ok(());
        }
        let range = head.header("range");
        if !range
            .as_deref()
            .is_some_and(|r| route::range_matches(r, stream.offset()))
        {
            out.push(self.abandon_session(env.config, head.header("location").as_deref()));
            return Err(OciError::new(
                Code::BadGateway,
                format!("the registry's Range ({}) does not match the {} bytes the gateway sent for this upload; the upload is abandoned, push again", range.as_deref().unwrap_or("none"), stream.offset()),
            ));
        }
        let record = match stream.into_record() {
            Ok(record) => record,
            Err(e) => {
                out.push(self.abandon_session(env.config, head.header("location").as_deref()));
                return Err(e);
            }
        };
        if let Some(claimed) = self.claimed.take() {
            session::release_in(env.store, &claimed);
        }
        let Some(key) = env.config.state_key.as_ref() else {
            let delta = upload_table::save_in(
                env.store,
                &id,
                &record,
                env.now,
                env.config.upload_idle_seconds,
            )?;
            if delta != 0 {
                out.push(Command::Metric(Metric::UploadState(delta)));
            }
            return Ok(());
        };
        // The state travels with the client, and only there: the next request of this upload
        // may reach another replica, or this one after a restart, and no replica keeps
        // anything per upload.
        let mut rng = &mut *env.rng;
        let replica = Replica::of_this_process(env.store, &mut rng).ok_or_else(|| {
            OciError::new(
                Code::Unavailable,
                "the gateway could not read its replica id from Envoy's shared data; push again",
            )
        })?;
        let token = upload::seal(&key.0, &id, &record, replica, &mut rng);
        let location = head.header("location").ok_or_else(|| {
            OciError::new(
                Code::Unknown,
                "the registry answered a PATCH without a Location",
            )
        })?;
        out.push(Command::SetResponseHeader(
            "location".into(),
            upload::session_location(&location, &id, Some(&token)),
        ));
        Ok(())
    }

    /// A best-effort `DELETE` of this request's upload session, whose bytes at the registry
    /// no longer match the gateway's state. Sent to the `Location` the registry just answered
    /// when there is one: its `_state` names the registry's offset, and distribution (v3)
    /// refuses a `_state` at another offset without cancelling anything.
    pub fn abandon_session(&mut self, config: &Config, location: Option<&str>) -> Command {
        let path = location
            .and_then(route::location_path)
            .unwrap_or_else(|| self.upstream_path.clone());
        Command::Dispatch(self.registry_callout(config, "DELETE", &path, None, None))
    }

    /// A session the registry opened in an encrypted repository (a `POST`, or a mount it could
    /// not do) is named in the `Location` the client gets, for the load balancer in front of
    /// replicas (see [`upload::SESSION_PARAM`]); the chunk flow names it itself, along with the
    /// sealed state. `None` when there is nothing to name.
    pub fn session_named(
        &self,
        config: &Config,
        status: &str,
        location: Option<&str>,
    ) -> Option<Command> {
        // A chunk's answer names the session along with its sealed state.
        if status != "202"
            || config.state_key.is_none()
            || self.encrypted.is_none()
            || matches!(self.flow, Flow::Chunk(_))
        {
            return None;
        }
        let location = location?;
        let id = route::upload_id_of_location(location)?;
        Some(Command::SetResponseHeader(
            "location".into(),
            upload::session_location(location, &id, None),
        ))
    }
}

/// The registry's challenge on a `401` answer to a callout made with the client's
/// credentials: the client needs it to fetch a token (Harbor, distribution's `auth: token`).
fn challenge_of(status: &str, answer: &CalloutAnswer) -> Option<String> {
    (status == "401")
        .then(|| answer.header("www-authenticate"))
        .flatten()
}

/// The refusal when the registry would not do what the gateway asked it on the client's
/// behalf.
pub fn registry_refusal(what: &str, status: &str) -> OciError {
    let code = match status {
        "401" | "403" => Code::Denied,
        _ => Code::Unavailable,
    };
    OciError::new(
        code,
        format!(
            "the registry answered {status} when the gateway tried to {what}; nothing was stored"
        ),
    )
}
