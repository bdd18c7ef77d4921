//! `GET /v2/<name>/tags/list` in an encrypted repository: the registry's answer body is held
//! up to `limits.max_manifest_bytes` (counted against the worker's manifest budget) and sent
//! without the gateway's reserved tags ([`crate::tags_list`]).
//!
//! Host contract (Envoy 1.40, measured): response headers held while the body is read never see
//! the body (the stream hangs), so the headers go on at once, without their `Content-Length`
//! (the body's length changes), and only the body is held.
//!
//! Only a `200` with an unencoded body is read (the request goes without `Accept-Encoding`);
//! anything else passes as the registry sent it. So does an answer the gateway cannot read, and
//! one over the limit (logged): the headers are gone by then, a refusal could only cut the
//! answer, and the reserved tags are no secret (anyone who may pull reads them from the
//! registry; their ledger records name the same digests).
use crate::error::OciError;
use crate::tags_list;

use super::request::budget_room;
use super::{Command, Env, Flow, Level, ResponseHead, Stream};

impl Stream {
    /// The registry's response headers to a tags list: its body is held when it is to be read.
    pub(super) fn tags_answer(
        &mut self,
        head: &ResponseHead,
        repository: String,
        env: &Env,
        mut out: Vec<Command>,
    ) -> Result<Vec<Command>, OciError> {
        let unencoded = head
            .header("content-encoding")
            .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
        if head.status() != "200" || head.end_of_stream || !unencoded {
            out.push(Command::Continue);
            return Ok(out);
        }
        let limit = env.config.max_manifest_bytes;
        let declared = head
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(len) = declared.filter(|len| *len > limit) {
            out.push(over_limit(&repository, len, limit));
            out.push(Command::Continue);
            return Ok(out);
        }
        // Held in memory until its end, like a manifest being pushed.
        let bytes = declared.unwrap_or(limit);
        budget_room(env, bytes, limit)?;
        env.held_manifest_bytes
            .set(env.held_manifest_bytes.get().saturating_add(bytes));
        self.manifest_reserved = self.manifest_reserved.saturating_add(bytes);
        self.flow = Flow::HoldingTags { repository };
        out.push(Command::RemoveResponseHeader("content-length".into()));
        out.push(Command::Continue);
        Ok(out)
    }

    /// Response body bytes arrived: `size` bytes are buffered by the host, `read` copies them
    /// out. Only a tags list being read holds them.
    pub fn on_response_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: &dyn Fn() -> Result<Vec<u8>, OciError>,
        env: &mut Env,
    ) -> Vec<Command> {
        let Flow::HoldingTags { repository } = &self.flow else {
            return vec![Command::Continue];
        };
        let repository = repository.clone();
        let limit = env.config.max_manifest_bytes;
        if size > limit {
            // What is held goes on, and the rest as it comes.
            self.flow = Flow::Pass;
            return vec![over_limit(&repository, size, limit), Command::Continue];
        }
        if !end_of_stream {
            return vec![Command::Pause];
        }
        self.flow = Flow::Pass;
        let body = match read() {
            Ok(body) => body,
            Err(e) => return self.refuse(e),
        };
        match tags_list::without_reserved(&body) {
            Ok(Some(filtered)) => vec![
                Command::ReplaceResponseBody(size, filtered),
                Command::Continue,
            ],
            Ok(None) => vec![Command::Continue],
            Err(e) => vec![
                Command::Log(
                    Level::Warn,
                    format!("{repository}: the registry's tags list does not read as one ({e}); passed as it came"),
                ),
                Command::Continue,
            ],
        }
    }
}

/// The log line of a tags list over the limit, passed as the registry sent it.
fn over_limit(repository: &str, len: usize, limit: usize) -> Command {
    Command::Log(
        Level::Warn,
        format!("{repository}: the registry's tags list is over {limit} bytes ({len} so far; limits.max_manifest_bytes): passed with the gateway's reserved tags"),
    )
}
