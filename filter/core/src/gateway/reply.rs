//! Local replies as the host sends them, and what a failed host call does to the stream.
use crate::error::{Code, OciError};

use super::{Command, Stream};

/// A local reply: the gateway answers the client itself, the request goes no further.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Headers, values as bytes (a registry's challenge is relayed as it came).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

/// The header that says who answered: `refused` (the gateway's OCI error), `registry-refused`
/// (the registry's own refusal of a callout, relayed), `answered` (the gateway's answer on
/// the registry's behalf).
pub const MARKER: &str = "x-ocicrypt-filter";

fn json_reply(status: u16, marker: &str, body: Vec<u8>, challenge: Option<&[u8]>) -> LocalReply {
    let mut headers = vec![
        ("content-type".to_string(), b"application/json".to_vec()),
        (MARKER.to_string(), marker.as_bytes().to_vec()),
    ];
    if let Some(c) = challenge {
        headers.push(("www-authenticate".to_string(), c.to_vec()));
    }
    LocalReply {
        status,
        headers,
        body,
    }
}

impl Command {
    /// The local reply this command sends ([`Command::Reply`], [`Command::Relay`],
    /// [`Command::Respond`]); `None` for every other command.
    pub fn local_reply(&self) -> Option<LocalReply> {
        match self {
            Command::Reply(err) => Some(json_reply(
                err.status(),
                "refused",
                err.body(),
                err.challenge.as_deref().map(str::as_bytes),
            )),
            Command::Relay {
                status,
                body,
                challenge,
            } => Some(json_reply(
                *status,
                "registry-refused",
                body.clone(),
                challenge.as_deref(),
            )),
            Command::Respond {
                status,
                headers,
                body,
            } => {
                let mut all = vec![(MARKER.to_string(), b"answered".to_vec())];
                all.extend(
                    headers
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_bytes().to_vec())),
                );
                Some(LocalReply {
                    status: *status,
                    headers: all,
                    body: body.clone(),
                })
            }
            _ => None,
        }
    }
}

/// The refusal when a host call the gateway needed failed (`what`: the call and the host's
/// status): a `500`, nothing half-done goes on.
pub fn host_failure(what: &str) -> OciError {
    OciError::new(
        Code::Unknown,
        format!("gateway host call failed ({what}); nothing was stored, retry"),
    )
}

impl Stream {
    /// A host call the stream's commands needed failed: the request is refused.
    pub fn on_host_failed(&mut self, what: &str) -> Vec<Command> {
        self.refuse(host_failure(what))
    }
}
