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

/// The host's imports, with every enum as the `u32` it is on the wire.
#[cfg(target_arch = "wasm32")]
mod sys {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            buffer_data: *const u8,
            buffer_size: usize,
        ) -> u32;
        #[allow(clippy::too_many_arguments)] // the ABI's signature
        pub fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_register_shared_queue(
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_enqueue_shared_queue(
            queue_id: u32,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_dequeue_shared_queue(
            queue_id: u32,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    }
}

/// Native builds (host `cargo test`, clippy) have no proxy-wasm host: every call answers
/// `NotFound` and writes nothing, as the SDK's own native stubs do.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)] // same contract as the wasm imports above
mod sys {
    use super::NOT_FOUND;

    pub unsafe fn proxy_log(_: u32, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_current_time_nanoseconds(_: *mut u64) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_set_tick_period_milliseconds(_: u32) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_header_map_pairs(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_replace_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_remove_header_map_value(_: u32, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_buffer_bytes(
        _: u32,
        _: usize,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_set_buffer_bytes(
        _: u32,
        _: usize,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        NOT_FOUND
    }
    #[allow(clippy::too_many_arguments)] // the ABI's signature
    pub unsafe fn proxy_send_local_response(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: i32,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_continue_stream(_: u32) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_get_shared_data(
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
        _: *mut u32,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_set_shared_data(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
    ) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_register_shared_queue(_: *const u8, _: usize, _: *mut u32) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_enqueue_shared_queue(_: u32, _: *const u8, _: usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_dequeue_shared_queue(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_increment_metric(_: u32, _: i64) -> u32 {
        NOT_FOUND
    }
    pub unsafe fn proxy_record_metric(_: u32, _: u64) -> u32 {
        NOT_FOUND
    }
}

fn ok(status: u32) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Whether `size` bytes at `data` lie inside the module's linear memory (the host is trusted
/// to hand over memory it got from `proxy_on_memory_allocate`; this catches a host that
/// points anywhere else before any byte is read).
#[cfg(target_arch = "wasm32")]
fn in_linear_memory(data: *const u8, size: usize) -> bool {
    let memory = core::arch::wasm32::memory_size::<0>().saturating_mul(65536);
    (data as usize)
        .checked_add(size)
        .is_some_and(|end| end <= memory)
}

#[cfg(not(target_arch = "wasm32"))]
fn in_linear_memory(_data: *const u8, _size: usize) -> bool {
    true
}

/// Takes ownership of the `size` bytes the host returned at `data`.
///
/// # Safety
/// `data` is null, or it is the pointer this module's `proxy_on_memory_allocate(size)`
/// returned to the host during the call that produced it, for this same `size`, the host
/// copied `size` bytes into it, and nothing else owns it: the ABI's contract for every
/// `return_*_data`/`return_*_size` pair (module header).
///
/// Why `Vec::from_raw_parts(data, size, size)` is then sound: the memory was allocated by the
/// global allocator (a `Vec<MaybeUninit<u8>>` with capacity `size`, boxed without
/// reallocating), so with the layout of `size` `u8`s (alignment 1), which is what a
/// `Vec<u8>` of capacity `size` frees; the `size` bytes are initialised (the host wrote all of
/// them); and the host keeps no pointer to it, so the `Vec` is its only owner.
unsafe fn take(data: *mut u8, size: usize) -> Result<Vec<u8>, Status> {
    if data.is_null() || size == 0 {
        // Nothing allocated: the host allocates only for non-empty values (and
        // `proxy_on_memory_allocate(0)` returns a dangling pointer of an empty box, which owns
        // nothing).
        return Ok(Vec::new());
    }
    if !in_linear_memory(data, size) {
        return Err(Status::INVALID_MEMORY_ACCESS);
    }
    // SAFETY: the function's contract, explained above.
    Ok(unsafe { Vec::from_raw_parts(data, size, size) })
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

/// Reads a little-endian `u32` at `at`.
fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

/// The `len` bytes at `*at`, which must be followed by a NUL; moves `*at` past the NUL.
fn field<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(len)?;
    let value = bytes.get(*at..end)?;
    if *bytes.get(end)? != 0 {
        return None;
    }
    *at = end.checked_add(1)?;
    Some(value)
}

/// Decodes the ABI's serialized header map: a little-endian `u32` count N, then N pairs of
/// `u32` lengths (name, value), then each name and value in that order, each followed by a
/// NUL byte. `None` when the bytes do not frame exactly that way (a count or a length that
/// points past the end, a missing NUL); nothing in the input can make it panic or allocate
/// more than the input's size. Empty input is an empty map (the host's null).
pub fn parse_map(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    // The length table alone must fit: bounds the count (and the allocation) by the input.
    let table_end = count.checked_mul(8)?.checked_add(4)?;
    if table_end > bytes.len() {
        return None;
    }
    let mut at = table_end;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let entry = i.checked_mul(8)?.checked_add(4)?;
        let name_len = u32_at(bytes, entry)?;
        let value_len = u32_at(bytes, entry.checked_add(4)?)?;
        let name = field(bytes, &mut at, name_len)?;
        let value = field(bytes, &mut at, value_len)?;
        pairs.push((name.to_vec(), value.to_vec()));
    }
    Some(pairs)
}

/// Encodes pairs in the ABI's serialized map format ([`parse_map`]'s input); `None` only
/// when a length does not fit a `u32`.
pub fn serialize_map(pairs: &[(&str, &[u8])]) -> Option<Vec<u8>> {
    let mut size: usize = 4;
    for (name, value) in pairs {
        size = size
            .checked_add(name.len())?
            .checked_add(value.len())?
            .checked_add(10)?;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&u32::try_from(pairs.len()).ok()?.to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&u32::try_from(name.len()).ok()?.to_le_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &[u8])]) -> Pairs {
        list.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn map_round_trips_with_any_bytes() {
        let list: &[(&str, &[u8])] = &[
            (":status", b"200"),
            ("content-type", b"application/json\xff"),
            ("x-empty", b""),
            ("x-nul-free-obs-text", b"\x80\xfe caf\xe9"),
        ];
        let bytes = serialize_map(list).unwrap();
        assert_eq!(parse_map(&bytes).unwrap(), pairs(list));
        assert_eq!(parse_map(&serialize_map(&[]).unwrap()).unwrap(), vec![]);
        assert_eq!(parse_map(&[]).unwrap(), vec![]);
    }

    #[test]
    fn known_encoding() {
        // count 1, lengths (1, 2), "a\0", "bc\0"
        let bytes = [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0];
        assert_eq!(parse_map(&bytes).unwrap(), pairs(&[("a", b"bc")]));
        assert_eq!(serialize_map(&[("a", b"bc")]).unwrap(), bytes);
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = serialize_map(&[("name", b"value"), ("n2", b"v2")]).unwrap();
        // Every truncation is refused.
        for cut in 1..good.len() {
            assert!(parse_map(&good[..cut]).is_none(), "cut at {cut}");
        }
        // A count the table cannot hold (no huge allocation either).
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map(&huge).is_none());
        // A length past the end.
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map(&long).is_none());
        // A missing NUL terminator.
        let mut unterminated = good.clone();
        let nul = 4 + 16 + "name".len();
        assert_eq!(unterminated[nul], 0);
        unterminated[nul] = b'x';
        assert!(parse_map(&unterminated).is_none());
        // Short count word.
        assert!(parse_map(&[1, 0]).is_none());
    }

    #[test]
    fn random_and_mutated_maps_never_panic() {
        // xorshift: deterministic, no dependency.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = serialize_map(&[(":status", b"200"), ("location", b"/v2/x\xff")]).unwrap();
        for _ in 0..20_000 {
            let mut bytes = base.clone();
            let edits = next() % 4;
            for _ in 0..=edits {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            if let Some(map) = parse_map(&bytes[..cut]) {
                let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
                assert!(total <= cut);
            }
            let random: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = parse_map(&random);
        }
    }

    #[test]
    fn take_owns_what_the_allocator_gave() {
        // What the SDK's proxy_on_memory_allocate does, then the host's copy.
        let size = 5;
        let mut block: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(size);
        block.resize(size, std::mem::MaybeUninit::new(0));
        let ptr = Box::into_raw(block.into_boxed_slice()).cast::<u8>();
        unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), ptr, size) };
        assert_eq!(unsafe { take(ptr, size) }.unwrap(), b"hello");
        assert_eq!(unsafe { take(std::ptr::null_mut(), 0) }.unwrap(), b"");
        assert_eq!(unsafe { take(std::ptr::null_mut(), 7) }.unwrap(), b"");
    }

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
