//! Recording a committed blob (or a manifest stored under its new digest) in the registry's ledger (replicas share it through the registry,
//! `replicas.state_key`): an authenticated ledger manifest under the blob's ledger tag, whose
//! config is the empty config every ledger manifest of a repository shares — uploaded once per
//! repository, then marked in the store. The client's answer waits for the recording, so a
//! push another replica finishes finds every blob it names.
use crate::digest::Digest;
use crate::distribution::ledger;
use crate::distribution::route;
use crate::error::{Code, OciError};
use crate::spec;

use super::answer::registry_refusal;
use super::finish::{commit, Committing};
use super::{Callout, CalloutAnswer, Command, Env, Flow, RecordingStage, Stream};

impl Stream {
    /// Starts recording a committed blob: straight to the ledger manifest when the repository
    /// holds the empty config already, else a session for the empty config first.
    pub(super) fn start_recording(
        &mut self,
        committing: Committing,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let marked = env
            .store
            .get(&empty_config_key(&committing.repository))
            .is_some_and(|v| !v.is_empty());
        let (stage, callout) = if marked {
            (
                RecordingStage::Manifest,
                self.ledger_manifest_put(&committing, env)?,
            )
        } else {
            let path = format!("/v2/{}/blobs/uploads/", committing.repository);
            let post = self.registry_callout(env.config, "POST", &path, None, None);
            (RecordingStage::ConfigSession, post)
        };
        self.await_stage(committing, stage, callout, out);
        Ok(())
    }

    /// The recording waits for `stage`'s callout.
    fn await_stage(
        &mut self,
        committing: Committing,
        stage: RecordingStage,
        callout: Callout,
        out: &mut Vec<Command>,
    ) {
        self.flow = Flow::Recording {
            repository: committing.repository,
            completion: committing.completion,
            upload: committing.upload,
            stage,
            callout: callout.id,
        };
        out.push(Command::Dispatch(callout));
    }

    /// The answer to one recording stage: the next stage's callout, or (the ledger manifest
    /// stored) the commit and the held answer resumed.
    pub(super) fn recording_answered(
        &mut self,
        committing: Committing,
        stage: RecordingStage,
        answer: &CalloutAnswer,
        env: &mut Env,
        out: &mut Vec<Command>,
    ) -> Result<(), OciError> {
        let status = answer.status();
        let (stage, callout) = match stage {
            RecordingStage::ConfigSession => {
                let location = answer.header("location");
                self.check_answer(env.config, &status, location.as_deref(), out)?;
                let location = location
                    .filter(|_| status == "202")
                    .and_then(|l| route::location_path(&l))
                    .ok_or_else(|| {
                        ledger_refusal(
                            &committing,
                            "open a session for the ledger's empty config",
                            &status,
                        )
                    })?;
                let empty = Digest::of(ledger::EMPTY_CONFIG).to_string();
                let path = route::rewrite_query(&location, &["digest"], &[("digest", &empty)]);
                let put = self.registry_callout(
                    env.config,
                    "PUT",
                    &path,
                    Some(ledger::EMPTY_CONFIG),
                    Some("application/octet-stream"),
                );
                (RecordingStage::Config, put)
            }
            RecordingStage::Config => {
                if status != "201" {
                    return Err(ledger_refusal(
                        &committing,
                        "store the ledger's empty config",
                        &status,
                    ));
                }
                env.store
                    .set(&empty_config_key(&committing.repository), b"1")?;
                let put = self.ledger_manifest_put(&committing, env)?;
                (RecordingStage::Manifest, put)
            }
            RecordingStage::Manifest => {
                if status != "201" {
                    let what = format!(
                        "record the {} in the registry's ledger",
                        stored(&committing)
                    );
                    return Err(ledger_refusal(&committing, &what, &status));
                }
                if let Some(entry) = committing
                    .completion
                    .ledger
                    .as_ref()
                    .filter(|e| e.is_manifest())
                {
                    // A manifest pushed by digest: the gateway answers the client itself.
                    out.extend(self.manifest_committed(
                        &committing.repository,
                        &committing.completion.client_digest,
                        entry,
                        env,
                    )?);
                    return Ok(());
                }
                commit(&committing, env, out)?;
                out.push(Command::ResumeResponse);
                return Ok(());
            }
        };
        self.await_stage(committing, stage, callout, out);
        Ok(())
    }

    /// The `PUT` of the blob's ledger manifest, authenticated with the replicas' state key.
    fn ledger_manifest_put(
        &mut self,
        committing: &Committing,
        env: &Env,
    ) -> Result<Callout, OciError> {
        let Committing {
            repository,
            completion,
            ..
        } = committing;
        let entry = completion.ledger.as_ref().ok_or_else(|| {
            OciError::new(Code::Unknown, "recording a blob without a ledger entry")
        })?;
        let key = env
            .config
            .state_key
            .as_ref()
            .ok_or_else(|| OciError::new(Code::Unknown, "ledger write without a state key"))?;
        let body = ledger::ledger_manifest_authenticated(
            &key.0,
            repository,
            &completion.client_digest,
            entry,
        );
        let path = format!(
            "/v2/{repository}/manifests/{}",
            ledger::ledger_tag(&completion.client_digest)
        );
        Ok(self.registry_callout(
            env.config,
            "PUT",
            &path,
            Some(&body),
            Some(spec::MEDIA_TYPE_OCI_MANIFEST),
        ))
    }
}

/// What is being recorded, in a refusal's words.
fn stored(committing: &Committing) -> &'static str {
    match &committing.completion.ledger {
        Some(entry) if entry.is_manifest() => "manifest",
        _ => "encrypted blob",
    }
}

/// A failure while recording a committed blob (or a stored manifest) in the registry's ledger:
/// it is stored (orphaned until garbage collection), so "nothing was stored" would mislead.
fn ledger_refusal(committing: &Committing, what: &str, status: &str) -> OciError {
    OciError::new(
        registry_refusal(what, status).code,
        format!(
            "the registry answered {status} when the gateway tried to {what}; the {} was stored but not recorded, push again",
            stored(committing)
        ),
    )
}

/// The store's mark that a repository holds the ledger manifests' empty config.
pub fn empty_config_key(repository: &str) -> String {
    format!("ocicrypt/ledger-config/{repository}")
}
