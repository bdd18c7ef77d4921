//! `GET /v2/<name>/tags/list` in an encrypted repository: the gateway reads the list itself, by
//! callout with the client's credentials and query, and answers the client without its reserved
//! tags ([`crate::distribution::tags_list`]).
//!
//! Why a callout and a local answer rather than rewriting the registry's answer on its way:
//! Envoy 1.40 never hands a filter the body of an answer whose headers it holds (the stream
//! hangs, measured), so a filter that lets the headers go cannot refuse an answer over its
//! limit any more, nor replace a page of reserved tags only (which oras-py takes for the end
//! of the list) by the next one. Here the answer is whole before anything is sent.
//!
//! - `200`, unencoded, within `limits.max_manifest_bytes`: shown without the reserved tags,
//!   with the registry's `Content-Type` and `Link`. A page left empty whose `Link` leads on
//!   (in this repository's tags list) is skipped: the next page is read instead, at most
//!   [`MAX_SKIPPED_PAGES`] times.
//! - Over the limit: refused `502`, never shown with the reserved tags.
//! - Anything else (a `401` and its challenge, `404`, an encoded or unreadable body): the
//!   client's own request goes on, and the registry answers it as it would without the
//!   gateway. A callout that fails is refused `503`.
use crate::config::Config;
use crate::distribution::route;
use crate::distribution::tags_list;
use crate::error::{Code, OciError};

use super::{CalloutAnswer, Command, Env, Flow, Level, Stream};

/// Pages holding only reserved tags the gateway skips for one request before it shows an empty
/// one (each costs a registry request).
pub const MAX_SKIPPED_PAGES: u32 = 16;

impl Stream {
    /// Reads the tags list page at `path` by callout; the request waits.
    pub(super) fn read_tags(
        &mut self,
        config: &Config,
        repository: String,
        path: &str,
        skipped: u32,
    ) -> Vec<Command> {
        let callout = self.registry_callout(config, "GET", path, None, None);
        self.flow = Flow::TagsList {
            callout: callout.id,
            repository,
            skipped,
        };
        vec![Command::Dispatch(callout), Command::Pause]
    }

    /// The registry answered the read of a tags list page.
    pub(super) fn tags_page(
        &mut self,
        answer: &CalloutAnswer,
        repository: String,
        skipped: u32,
        env: &Env,
    ) -> Result<Vec<Command>, OciError> {
        if answer.header(":status").is_none() {
            return Err(super::unreachable_registry());
        }
        let unencoded = answer
            .header("content-encoding")
            .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
        if answer.status() != "200" || !unencoded {
            // The registry answers the client's own request as it would without the gateway.
            return Ok(vec![Command::Continue]);
        }
        let limit = env.config.max_manifest_bytes;
        if answer.body.len() > limit {
            return Err(OciError::new(
                Code::BadGateway,
                format!("the registry's tags list of {repository} is {} bytes, over the {limit} bytes the gateway reads to leave out its own tags (limits.max_manifest_bytes); ask for it in pages (?n=) or raise the limit", answer.body.len()),
            ));
        }
        let shown = match tags_list::shown(&answer.body) {
            Ok(shown) => shown,
            Err(e) => {
                return Ok(vec![
                    Command::Log(
                        Level::Warn,
                        format!("{repository}: the registry's tags list does not read as one ({e}); its own answer goes to the client"),
                    ),
                    Command::Continue,
                ]);
            }
        };
        let link = answer.header("link");
        if shown.kept == 0 && shown.removed > 0 && skipped < MAX_SKIPPED_PAGES {
            if let Some(next) = link.as_deref().and_then(|l| next_page(l, &repository)) {
                return Ok(self.read_tags(env.config, repository, &next, skipped + 1));
            }
        }
        let mut headers = vec![(
            "content-type".to_string(),
            answer
                .header("content-type")
                .unwrap_or_else(|| "application/json".to_string()),
        )];
        if let Some(link) = link {
            headers.push(("link".to_string(), link));
        }
        self.flow = Flow::Pass;
        Ok(vec![
            Command::Respond {
                status: 200,
                headers,
                body: shown.body.unwrap_or_else(|| answer.body.clone()),
            },
            Command::Pause,
        ])
    }
}

/// The path of the next page a `Link` header names (`<url>; rel="next"`), if it is this
/// repository's tags list: the gateway reads nothing else on a client's behalf.
fn next_page(link: &str, repository: &str) -> Option<String> {
    let target = link.trim().strip_prefix('<')?.split_once('>')?.0;
    let path = route::location_path(target)?;
    let expected = format!("/v2/{repository}/tags/list");
    (path.split('?').next() == Some(expected.as_str())).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_links_to_this_repositorys_tags_list_are_followed() {
        for (link, expected) in [
            (
                r#"</v2/demo/app/tags/list?last=b&n=2>; rel="next""#,
                Some("/v2/demo/app/tags/list?last=b&n=2"),
            ),
            (
                r#"<https://gw.example/v2/demo/app/tags/list?n=2&last=b>; rel="next""#,
                Some("/v2/demo/app/tags/list?n=2&last=b"),
            ),
            (r#"</v2/demo/other/tags/list?last=b>; rel="next""#, None),
            (r#"</v2/demo/app/manifests/v1>; rel="next""#, None),
            (r#"</v2/demo/app/tags/list/../../x>; rel="next""#, None),
            ("/v2/demo/app/tags/list?last=b", None),
            ("", None),
        ] {
            assert_eq!(next_page(link, "demo/app").as_deref(), expected, "{link}");
        }
    }
}
