//! The host calls the adapter makes, on top of our own panic-free ABI bindings
//! ([`crate::abi`]): a failing host call becomes `None`, `false` or an `OciError` (it refuses
//! the request, it never traps the VM), and header values are bytes until a caller decodes them.
//!
//! Host contract: a header value is whatever bytes the client sent (HTTP/1.1 allows obs-text,
//! 0x80–0xFF, and Envoy forwards it), so nothing here assumes UTF-8; a map or buffer the host
//! cannot serve at this point of the stream (e.g. the headers of a callout that got no
//! answer) is a status, not a crash. The only SDK host call left is `dispatch` (see there).
use std::time::Duration;

use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::store::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use crate::abi::{self, Status};

/// Logs, ignoring a failing logger (nothing better to do with that failure).
pub fn log(level: LogLevel, msg: &str) {
    let _ = abi::log(level, msg);
}

fn host_error(what: &str, status: Status) -> OciError {
    OciError::new(
        Code::Unknown,
        format!("gateway host call failed ({what}: {status}); nothing was stored, retry"),
    )
}

/// A request or response header as the bytes Envoy holds; `None` when absent or when the host
/// cannot read that map now.
pub fn header_bytes(map: MapType, name: &str) -> Option<Vec<u8>> {
    abi::header_map_value(map, name).ok().flatten()
}

/// Every header of `map` in order: names lowercased (Envoy's HTTP/1 and HTTP/2 codecs already
/// give them so), values as bytes; a name that is not UTF-8 is skipped. Empty when the host
/// cannot read that map now.
pub fn pairs(map: MapType) -> Vec<(String, Vec<u8>)> {
    abi::header_map_pairs(map)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, value)| {
            let name = String::from_utf8(name).ok()?;
            Some((name.to_ascii_lowercase(), value))
        })
        .collect()
}

/// Sets (or with `None` removes) a header.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> Result<(), OciError> {
    match value {
        Some(v) => abi::replace_header_map_value(map, name, v.as_bytes()),
        None => abi::remove_header_map_value(map, name),
    }
    .map_err(|s| host_error(&format!("set header {name}"), s))
}

/// The whole current body buffer.
pub fn body(kind: BufferType, size: usize) -> Result<Vec<u8>, OciError> {
    if size == 0 {
        return Ok(Vec::new());
    }
    match abi::buffer_bytes(kind, 0, size) {
        Ok(b) => Ok(b.unwrap_or_default()),
        Err(s) => Err(host_error("read body", s)),
    }
}

/// Replaces the current body buffer (`size` bytes of it) with `data`.
pub fn set_body(kind: BufferType, size: usize, data: &[u8]) -> Result<(), OciError> {
    abi::set_buffer_bytes(kind, 0, size, data).map_err(|s| host_error("write body", s))
}

/// The `:status` of the callout answer being delivered: `None` when there is none (Envoy
/// reports a reset, a timeout or an over-limit answer with no headers to read) or it is not a
/// three-digit status.
pub fn call_status() -> Option<u16> {
    parse_status(&header_bytes(MapType::HttpCallResponseHeaders, ":status")?)
}

fn parse_status(value: &[u8]) -> Option<u16> {
    if value.len() != 3 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let status = std::str::from_utf8(value).ok()?.parse().ok()?;
    (100..=599).contains(&status).then_some(status)
}

/// The body of the callout answer being delivered (`body_size` as Envoy announced it); `None`
/// when the host has no answer to read.
pub fn call_body(body_size: usize) -> Option<Vec<u8>> {
    if body_size == 0 {
        return Some(Vec::new());
    }
    abi::buffer_bytes(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
}

/// The plugin configuration Envoy passes to `on_configure`.
pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
    abi::buffer_bytes(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
}

fn send_reply(status: u32, marker: &[u8], body: &[u8], challenge: Option<&[u8]>) {
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("content-type", b"application/json"),
        ("x-ocicrypt-filter", marker),
    ];
    if let Some(c) = challenge {
        headers.push(("www-authenticate", c));
    }
    if let Err(s) = abi::send_local_response(status, &headers, body) {
        log(
            LogLevel::Warn,
            &format!("ocicrypt-filter: the local reply {status} was not sent ({s})"),
        );
    }
}

/// Answers the client with `status`, `headers` and `body` (a local reply the gateway makes on
/// the registry's behalf, such as a tags list without the reserved tags).
pub fn respond(status: u16, headers: &[(String, String)], body: &[u8]) {
    let mut all: Vec<(&str, &[u8])> = vec![("x-ocicrypt-filter", b"answered")];
    all.extend(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
    if let Err(s) = abi::send_local_response(u32::from(status), &all, body) {
        log(
            LogLevel::Warn,
            &format!("ocicrypt-filter: the local answer {status} was not sent ({s})"),
        );
    }
}

/// Sends a local reply carrying an OCI error body.
pub fn reply_error(err: &OciError) {
    send_reply(
        u32::from(err.status()),
        b"refused",
        &err.body(),
        err.challenge.as_deref().map(str::as_bytes),
    );
}

/// Sends a local reply with a body that already is an OCI error document, and the registry's
/// `WWW-Authenticate` challenge when it gave one.
pub fn reply_raw(status: u32, body: &[u8], challenge: Option<&[u8]>) {
    send_reply(status, b"registry-refused", body, challenge);
}

/// Lets the paused request go on.
pub fn resume_request() -> Result<(), OciError> {
    abi::continue_stream(false).map_err(|s| host_error("resume the request", s))
}

/// Lets the paused response go on.
pub fn resume_response() -> Result<(), OciError> {
    abi::continue_stream(true).map_err(|s| host_error("resume the response", s))
}

/// Sends an HTTP callout; its token, or `Err` when the host refused it.
///
/// Host contract: this one goes through the SDK's `dispatch_http_call`, because the SDK's
/// dispatcher must record the token (it routes `on_http_call_response` to the context that
/// asked, and `expect`s a token it knows). It panics only on a host status other than Ok,
/// BadArgument and InternalFailure; Envoy's `proxy_http_call` returns just those three for the
/// arguments the SDK builds itself (InvalidMemoryAccess would need a pointer outside memory).
/// The timeout saturates at `i32::MAX` ms (Envoy reads it as a signed `int` and refuses a
/// negative one; the SDK would truncate it to `u32`).
pub fn dispatch(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, ()> {
    let timeout = timeout.min(Duration::from_millis(u64::from(i32::MAX.unsigned_abs())));
    hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout).map_err(|_| ())
}

/// The host's clock since the Unix epoch; `None` when the host fails.
pub fn now_since_epoch() -> Option<Duration> {
    abi::current_time_nanos().ok().map(Duration::from_nanos)
}

/// Sets the root context's timer; `false` when the host refused.
pub fn set_tick_period(period: Duration) -> bool {
    let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    abi::set_tick_period_ms(millis).is_ok()
}

/// Defines a metric; its id, or 0 when the host refused (updates of 0 are skipped).
pub fn define_metric(kind: MetricType, name: &str) -> u32 {
    abi::define_metric(kind, name).unwrap_or(0)
}

/// Adds `n` to a counter or gauge (metric id 0: nothing).
pub fn increment_metric(id: u32, n: i64) {
    if id != 0 {
        let _ = abi::increment_metric(id, n);
    }
}

/// Records a histogram value or sets a gauge (metric id 0: nothing).
pub fn record_metric(id: u32, value: u64) {
    if id != 0 {
        let _ = abi::record_metric(id, value);
    }
}

/// Registers this VM's shared queue `name`; `None` when the host refused.
pub fn register_queue(name: &str) -> Option<u32> {
    abi::register_shared_queue(name).ok()
}

/// Puts `value` on shared queue `queue`; `false` when the host refused (unknown queue).
pub fn enqueue(queue: u32, value: &[u8]) -> bool {
    abi::enqueue_shared_queue(queue, value).is_ok()
}

/// The next item of shared queue `queue`; `None` when it is empty or the host refused.
pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
    abi::dequeue_shared_queue(queue).ok().flatten()
}

/// Envoy shared data: one map per process, visible to every worker VM.
pub struct SharedData;

impl SharedData {
    /// The value of `key` (`None` when absent) and its compare-and-swap token; `None` when the
    /// host fails.
    pub fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        abi::shared_data(key).ok()
    }

    /// Writes `key` if nobody wrote it since `cas` was read (0: unconditionally); `false` when
    /// another worker did, or the host refused.
    pub fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        abi::set_shared_data(key, value, cas).is_ok()
    }
}

impl Store for SharedData {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        abi::shared_data(key).ok().and_then(|(v, _)| v)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError> {
        abi::set_shared_data(key, value, 0).map_err(|s| host_error("shared data", s))
    }

    fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        SharedData::get_cas(self, key)
    }

    fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        SharedData::set_cas(self, key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_three_digits() {
        assert_eq!(parse_status(b"200"), Some(200));
        assert_eq!(parse_status(b"599"), Some(599));
        for bad in [
            &b""[..],
            b"20",
            b"2000",
            b"+20",
            b" 200",
            b"099",
            b"600",
            b"20\xff",
            b"\xff\xff\xff",
        ] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_without_a_host_are_absent_never_a_panic() {
        // Native builds answer NotFound to everything (abi/native_stubs.rs): the same paths as a host that
        // has no such header, map or answer.
        assert_eq!(
            header_bytes(MapType::HttpRequestHeaders, "content-type"),
            None
        );
        assert!(pairs(MapType::HttpCallResponseHeaders).is_empty());
        assert_eq!(call_status(), None);
        assert_eq!(call_body(0), Some(Vec::new()));
        assert_eq!(call_body(10), None);
        assert_eq!(body(BufferType::HttpRequestBody, 10), Ok(Vec::new()));
        assert!(set_header(MapType::HttpRequestHeaders, ":path", Some("/")).is_err());
        assert_eq!(SharedData.get("k"), None);
        assert!(!SharedData.set_cas("k", b"v", 0));
        assert_eq!(dequeue(1), None);
    }
}
