//! An upload request's body (`PATCH`, or a `PUT`/`POST` turned into one): each chunk is
//! encrypted as it streams (CTR keeps its length, so `Content-Length` and `Content-Range` stay
//! true) or passed as it is (JSON, ciphertext the policy accepts), and at the end of a
//! monolithic body the blob is completed: its plaintext checked against the client's digest
//! and its key wrapped to the recipients resolved before the body (a body callback cannot wait
//! for the key service).
use crate::distribution::upload::{self, BodyVerdict};
use crate::error::OciError;
use crate::gateway::prefetch::{Report, Worker};

use super::{Command, Env, Flow, Metric, Stream};

impl Stream {
    /// A chunk of an upload body: `size` bytes the host buffers, copied out by `read`.
    ///
    /// Answers the chunk's replacement (when its bytes change: ciphertext, or bytes held back
    /// while the blob's first window decides its treatment) and `Continue`; a refusal keeps the
    /// chunk where it is (the request goes no further).
    pub(super) fn chunk_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: &dyn Fn() -> Result<Vec<u8>, OciError>,
        env: &mut Env,
    ) -> Vec<Command> {
        let Flow::Chunk(flow) = &mut self.flow else {
            return vec![Command::Continue];
        };
        let Some(chunks) = flow.stream.as_mut() else {
            return vec![Command::Continue];
        };
        let mut buf = match read() {
            Ok(buf) => buf,
            Err(e) => return self.refuse(e),
        };
        if let Some(helpers) = env.hashing.as_deref_mut() {
            chunks.hash_beside(helpers);
        }
        let encrypted = self.prefetch.encrypt(
            env.keystream.as_mut(),
            env.store,
            chunks,
            &mut buf,
            end_of_stream,
            self.content_length,
            env.now,
            &mut *env.rng,
        );
        let verdict = match encrypted {
            Ok(verdict) => verdict,
            Err(e) => return self.refuse(e),
        };
        // The first chunk decides whether the blob is encrypted: its helper can start now.
        if let Some(helpers) = env.hashing.as_deref_mut() {
            chunks.hash_beside(helpers);
        }
        let mut out = Vec::new();
        if end_of_stream {
            if let Some(keystream) = env.keystream.as_mut() {
                let report = self.prefetch.end(keystream.worker);
                if report != Report::default() {
                    out.push(Command::Metric(Metric::Keystream(report)));
                }
            }
        }
        if verdict == BodyVerdict::Replaced {
            out.push(Command::ReplaceRequestBody(size, buf));
        }
        if end_of_stream {
            // A monolithic upload: the finishing PUT, once the registry took the body, names
            // the ciphertext this completion describes.
            if let Some(finish) = flow.finish.as_mut() {
                if let Some(chunks) = flow.stream.take() {
                    let mut rng = &mut *env.rng;
                    match chunks.into_record().and_then(|record| {
                        upload::complete(record, finish.client_digest, &finish.recipients, &mut rng)
                    }) {
                        Ok(completion) => finish.completion = Some(completion),
                        // The chunk in hand is already ciphertext; nothing goes on past the
                        // refusal either way.
                        Err(e) => {
                            out.extend(self.refuse(e));
                            return out;
                        }
                    }
                }
            }
        }
        out.push(Command::Continue);
        out
    }

    /// The stream ends: its keystream prefetch job (if any) ends with it; the worker's report
    /// since the last one.
    pub fn end_keystream(&mut self, worker: &mut Worker) -> Report {
        self.prefetch.end(worker)
    }
}
