//! The host calls the adapter makes, on top of our own panic-free ABI bindings
//! ([`crate::abi`]): a failing host call becomes `None`, `false` or an `OciError` (it refuses
//! the request, it never traps the VM), and header values are bytes until a caller decodes them.
//!
//! Host contract: a header value is whatever bytes the client sent (HTTP/1.1 allows obs-text,
//! 0x80–0xFF, and Envoy forwards it), so nothing here assumes UTF-8; a map or buffer the host
//! cannot serve at this point of the stream (e.g. the headers of a callout that got no
//! answer) is a status, not a crash. The only SDK host call left is `dispatch` (see there).
use std::time::Duration;

use ocicrypt_core::error::OciError;
use ocicrypt_core::gateway::prefetch::SharedQueues;
use ocicrypt_core::gateway::{host_failure, LocalReply};
use ocicrypt_core::store::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use crate::abi::{self, Status};

/// Logs, ignoring a failing logger (nothing better to do with that failure).
pub fn log(level: LogLevel, msg: &str) {
    let _ = abi::log(level, msg);
}

/// A host call that failed: what was called and the host's status (the stream turns it into
/// its refusal).
pub type Failed = String;

fn failed(what: &str, status: Status) -> Failed {
    format!("{what}: {status}")
}

/// A request or response header as the bytes Envoy holds; `None` when absent or when the host
/// cannot read that map now.
#[cfg(any(test, feature = "test-trap"))]
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
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> Result<(), Failed> {
    match value {
        Some(v) => abi::replace_header_map_value(map, name, v.as_bytes()),
        None => abi::remove_header_map_value(map, name),
    }
    .map_err(|s| failed(&format!("set header {name}"), s))
}

/// The whole current body buffer.
pub fn body(kind: BufferType, size: usize) -> Result<Vec<u8>, Failed> {
    if size == 0 {
        return Ok(Vec::new());
    }
    match abi::buffer_bytes(kind, 0, size) {
        Ok(b) => Ok(b.unwrap_or_default()),
        Err(s) => Err(failed("read body", s)),
    }
}

/// [`body`] for the core's body event, whose reader fails with the refusal itself.
pub fn request_body(size: usize) -> Result<Vec<u8>, OciError> {
    body(BufferType::HttpRequestBody, size).map_err(|what| host_failure(&what))
}

/// Replaces the current body buffer (`size` bytes of it) with `data`.
pub fn set_body(kind: BufferType, size: usize, data: &[u8]) -> Result<(), Failed> {
    abi::set_buffer_bytes(kind, 0, size, data).map_err(|s| failed("write body", s))
}

/// The plugin configuration Envoy passes to `on_configure`.
pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
    abi::buffer_bytes(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
}

/// Sends a local reply; a host that refuses it is logged (the request is answered by then or
/// reset by Envoy: nothing else to do).
pub fn send_local_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &[u8])> = reply
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    if let Err(s) = abi::send_local_response(u32::from(reply.status), &headers, &reply.body) {
        log(
            LogLevel::Warn,
            &format!(
                "ocicrypt-filter: the local reply {} was not sent ({s})",
                reply.status
            ),
        );
    }
}

/// Lets the paused request go on.
pub fn resume_request() -> Result<(), Failed> {
    abi::continue_stream(false).map_err(|s| failed("resume the request", s))
}

/// Lets the paused response go on.
pub fn resume_response() -> Result<(), Failed> {
    abi::continue_stream(true).map_err(|s| failed("resume the response", s))
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

/// Unix seconds from the host clock (0 when the host fails: every record then looks old,
/// which fails closed).
pub fn now() -> u64 {
    abi::current_time_nanos().map_or(0, |n| Duration::from_nanos(n).as_secs())
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

/// Envoy's shared queues. Host contract: a queue registered by a VM is read by that VM only
/// (its `on_queue_ready` runs on its own thread); any VM of the process may enqueue to it.
pub struct HostQueues;

impl SharedQueues for HostQueues {
    fn register(&mut self, name: &str) -> Option<u32> {
        abi::register_shared_queue(name).ok()
    }

    fn enqueue(&mut self, queue: u32, message: &[u8]) -> bool {
        abi::enqueue_shared_queue(queue, message).is_ok()
    }

    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        abi::dequeue_shared_queue(queue).ok().flatten()
    }
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
        abi::set_shared_data(key, value, 0).map_err(|s| host_failure(&failed("shared data", s)))
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
    fn reads_without_a_host_are_absent_never_a_panic() {
        // Native builds answer NotFound to everything (abi/native_stubs.rs): the same paths as a host that
        // has no such header, map or answer.
        assert_eq!(
            header_bytes(MapType::HttpRequestHeaders, "content-type"),
            None
        );
        assert!(pairs(MapType::HttpCallResponseHeaders).is_empty());
        assert_eq!(body(BufferType::HttpRequestBody, 10), Ok(Vec::new()));
        assert!(set_header(MapType::HttpRequestHeaders, ":path", Some("/")).is_err());
        assert_eq!(SharedData.get("k"), None);
        assert!(!SharedData.set_cas("k", b"v", 0));
        assert_eq!(HostQueues.dequeue(1), None);
    }
}
