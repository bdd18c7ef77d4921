//! Our own bindings to the proxy-wasm host ABI (0.2.1), for the host calls the adapter makes.
//!
//! Why not `proxy_wasm::hostcalls` (0.2.5): every function there ends in
//! `status => panic!("unexpected status")` for any status but the one or two it expects, its
//! string getters `unwrap()` `String::from_utf8` of what the host returns (a header value with
//! a byte 0xFF traps the VM), and it receives the host's status as the SDK's `Status` enum,
//! which lacks values the host can return (proxy-wasm-cpp-host's `WasmResult` 5, 6, 9, 11, 12:
//! an invalid enum value is undefined behaviour). Here a status is the plain `u32` the host
//! returned, every function returns `Result` and never panics, and bytes stay bytes.
//!
//! Not bound here: `proxy_http_call` (the SDK's `dispatch_http_call` must stay the one to
//! dispatch, as it records the token for its dispatcher, which routes the answer to the
//! context that asked: see `host::dispatch`). Nor anything the adapter does not call.
//!
//! This is the only module where `unsafe` is allowed (the crate denies it elsewhere). The
//! invariants every `unsafe` block relies on:
//! - Arguments: pointers and lengths of live Rust slices (`&str`, `&[u8]`) and of local
//!   out-variables, valid for the whole call; the host only reads the inputs and writes the
//!   out-variables (one word each) before it returns, and keeps no pointer after it.
//! - Returned memory (`return_*_data`, `return_*_size`): when the host has bytes to return, it
//!   allocates them inside this module by calling the module's exported
//!   `proxy_on_memory_allocate(size)` (the SDK's `allocator.rs`: a `Vec<MaybeUninit<u8>>` of
//!   capacity and length `size`, turned into a `Box<[_]>` and leaked), copies exactly `size`
//!   bytes into it, and writes the pointer and `size` to the out-variables. Ownership passes to
//!   us: see [`take`] for why `Vec::from_raw_parts` on it is sound. With nothing to return
//!   (an empty value, a status other than Ok) the host allocates nothing and writes nothing,
//!   or writes a null pointer: the out-variables keep or get null and 0, and we read no memory.
#![allow(unsafe_code)] // the host ABI is raw pointers; every block's invariant is stated here

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

/// A host status other than the ones a call treats as an answer (`Ok`, and where it has a
/// meaning, `NotFound` or `Empty`). Any `u32` the host returns can be one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u32);

/// Header names and values as bytes, in the host's order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const EMPTY: u32 = 7;

impl Status {
    /// A value or argument the host cannot take (also: a malformed serialized map from it).
    pub const BAD_ARGUMENT: Status = Status(2);
    /// The host pointed outside the module's memory.
    pub const INVALID_MEMORY_ACCESS: Status = Status(6);
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0 => "Ok",
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            5 => "BadExpression",
            6 => "InvalidMemoryAccess",
            7 => "Empty",
            8 => "CasMismatch",
            9 => "ResultMismatch",
            10 => "InternalFailure",
            11 => "BrokenConnection",
            12 => "Unimplemented",
            _ => "unknown",
        };
        write!(f, "host status {} ({name})", self.0)
    }
}

mod map;
mod memory;
#[cfg(not(target_arch = "wasm32"))]
#[path = "native_stubs.rs"]
mod sys;
#[cfg(target_arch = "wasm32")]
#[path = "wasm_imports.rs"]
mod sys;

pub use map::{parse_map, serialize_map};
use memory::take;

fn ok(status: u32) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// The ABI's number of each enum (the SDK's types are `#[repr(u32)]` with the ABI's values).
fn map_type(map: MapType) -> u32 {
    map as u32
}

fn buffer_type(buffer: BufferType) -> u32 {
    buffer as u32
}

/// Writes a log line.
pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    // SAFETY: a live `&str` (module header: arguments).
    ok(unsafe { sys::proxy_log(level as u32, message.as_ptr(), message.len()) })
}

/// The host's clock, nanoseconds since the Unix epoch.
pub fn current_time_nanos() -> Result<u64, Status> {
    let mut nanos: u64 = 0;
    // SAFETY: a local out-variable (module header: arguments).
    ok(unsafe { sys::proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(nanos)
}

/// Sets the root context's timer period (0 stops it).
pub fn set_tick_period_ms(millis: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { sys::proxy_set_tick_period_milliseconds(millis) })
}

/// The first value of header `key` in `map`, as the bytes Envoy holds; `None` when absent.
/// (Streams read every header at once, [`header_map_pairs`]; this serves the test trap.)
#[cfg(any(test, feature = "test-trap"))]
pub fn header_map_value(map: MapType, key: &str) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: a live `&str` and local out-variables (module header: arguments).
    let status = unsafe {
        sys::proxy_get_header_map_value(
            map_type(map),
            key.as_ptr(),
            key.len(),
            &mut data,
            &mut size,
        )
    };
    match status {
        // SAFETY: what the host returned with Ok (module header: returned memory).
        OK => unsafe { take(data, size) }.map(Some),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// Every header of `map`, in order, names and values as bytes. A map the host cannot serve
/// right now is an `Err` (Envoy 1.40 answers an empty list there); a serialized map that does
/// not parse is `Err(BAD_ARGUMENT)`.
pub fn header_map_pairs(map: MapType) -> Result<Pairs, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: local out-variables (module header: arguments).
    let status = unsafe { sys::proxy_get_header_map_pairs(map_type(map), &mut data, &mut size) };
    match status {
        OK => {
            // SAFETY: what the host returned with Ok (module header: returned memory).
            let bytes = unsafe { take(data, size) }?;
            parse_map(&bytes).ok_or(Status::BAD_ARGUMENT)
        }
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// Sets header `key` of `map` to `value` (replacing every value it had).
pub fn replace_header_map_value(map: MapType, key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: live slices (module header: arguments).
    ok(unsafe {
        sys::proxy_replace_header_map_value(
            map_type(map),
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes header `key` from `map`.
pub fn remove_header_map_value(map: MapType, key: &str) -> Result<(), Status> {
    // SAFETY: a live `&str` (module header: arguments).
    ok(unsafe { sys::proxy_remove_header_map_value(map_type(map), key.as_ptr(), key.len()) })
}

/// Up to `max_size` bytes of buffer `kind` from `start`; `None` when the host has no such
/// buffer now (e.g. the body of a callout that got no answer).
pub fn buffer_bytes(
    kind: BufferType,
    start: usize,
    max_size: usize,
) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: local out-variables (module header: arguments).
    let status = unsafe {
        sys::proxy_get_buffer_bytes(buffer_type(kind), start, max_size, &mut data, &mut size)
    };
    match status {
        // SAFETY: what the host returned with Ok (module header: returned memory).
        OK => unsafe { take(data, size) }.map(Some),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// Replaces `size` bytes of buffer `kind` from `start` with `data`.
pub fn set_buffer_bytes(
    kind: BufferType,
    start: usize,
    size: usize,
    data: &[u8],
) -> Result<(), Status> {
    // SAFETY: a live slice (module header: arguments).
    ok(unsafe {
        sys::proxy_set_buffer_bytes(buffer_type(kind), start, size, data.as_ptr(), data.len())
    })
}

/// Sends a local reply (the stream's answer, instead of the upstream's).
pub fn send_local_response(
    status_code: u32,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<(), Status> {
    let headers = serialize_map(headers).ok_or(Status::BAD_ARGUMENT)?;
    // SAFETY: live slices; an empty details string (module header: arguments).
    ok(unsafe {
        sys::proxy_send_local_response(
            status_code,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Lets the paused request (`response` false) or response (`response` true) go on.
pub fn continue_stream(response: bool) -> Result<(), Status> {
    // SAFETY: no pointers. Stream types: 0 HTTP request, 1 HTTP response.
    ok(unsafe { sys::proxy_continue_stream(u32::from(response)) })
}

/// The value of shared-data `key` and its compare-and-swap token (`(None, 0)` when absent).
pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: a live `&str` and local out-variables (module header: arguments).
    let status = unsafe {
        sys::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
    };
    match status {
        // SAFETY: what the host returned with Ok (module header: returned memory).
        OK => Ok((Some(unsafe { take(data, size) }?), cas)),
        NOT_FOUND => Ok((None, 0)),
        other => Err(Status(other)),
    }
}

/// Sets shared-data `key`, only if its token is still `cas` (0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: live slices (module header: arguments).
    ok(unsafe {
        sys::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Registers (or finds) this VM's shared queue `name`; its id.
pub fn register_shared_queue(name: &str) -> Result<u32, Status> {
    let mut id: u32 = 0;
    // SAFETY: a live `&str` and a local out-variable (module header: arguments).
    ok(unsafe { sys::proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Puts `value` on shared queue `queue`.
pub fn enqueue_shared_queue(queue: u32, value: &[u8]) -> Result<(), Status> {
    // SAFETY: a live slice (module header: arguments).
    ok(unsafe { sys::proxy_enqueue_shared_queue(queue, value.as_ptr(), value.len()) })
}

/// Takes the next item of shared queue `queue`; `None` when it is empty.
pub fn dequeue_shared_queue(queue: u32) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: local out-variables (module header: arguments).
    let status = unsafe { sys::proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
    match status {
        // SAFETY: what the host returned with Ok (module header: returned memory).
        OK => unsafe { take(data, size) }.map(Some),
        EMPTY => Ok(None),
        other => Err(Status(other)),
    }
}

/// Defines a metric; its id.
pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id: u32 = 0;
    // SAFETY: a live `&str` and a local out-variable (module header: arguments).
    ok(unsafe { sys::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds `offset` to a counter or gauge.
pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { sys::proxy_increment_metric(id, offset) })
}

/// Sets a gauge, or records a histogram value.
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { sys::proxy_record_metric(id, value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_builds_answer_not_found() {
        assert_eq!(
            header_map_value(MapType::HttpRequestHeaders, ":path"),
            Ok(None)
        );
        assert_eq!(header_map_pairs(MapType::HttpRequestHeaders), Ok(vec![]));
        assert_eq!(
            buffer_bytes(BufferType::HttpCallResponseBody, 0, 10),
            Ok(None)
        );
        assert_eq!(shared_data("k"), Ok((None, 0)));
        assert_eq!(current_time_nanos(), Err(Status(NOT_FOUND)));
        assert_eq!(Status(6).to_string(), "host status 6 (InvalidMemoryAccess)");
    }
}
