//! Envoy's dynamic-module ABI as Envoy 1.40 implements it (ABI `v0.2.0`), declared by us, and
//! the one place of this crate with `unsafe` code.
//!
//! Two halves:
//! - the callbacks Envoy exports (`envoy_dynamic_module_callback_*`) that the module calls, each
//!   wrapped in a safe method of [`StreamHost`], [`ConfigHost`] or [`Scheduler`];
//! - the hooks the module exports (`envoy_dynamic_module_on_*`) that Envoy calls, each turning
//!   its raw pointers into those safe handles and calling [`crate::module`] or
//!   [`crate::stream`] inside [`guard`], so that a panic fails one request (closed), never the
//!   process.
//!
//! Signatures were taken from the ABI's documentation and checked against the exports of the
//! Envoy binary the project runs (argument registers of each callback we use, and end-to-end
//! probes: `tests/e2e/test_native.py`). Types mirror the C layouts: a buffer is
//! `{ptr, len}`, a header `{key_ptr, key_len, value_ptr, value_len}`, enums are C `int`s and
//! `bool` is C `_Bool`.
//!
//! # Invariants the `unsafe` blocks rely on
//! - (E1) Envoy's filter pointer (`*_envoy_ptr` of a stream) is valid for the whole hook it is
//!   passed to, and only then: a [`StreamHost`] is built per hook and borrows nothing past it.
//! - (E2) Memory Envoy lends (header names and values, body chunks, callout answers) is valid
//!   until the hook returns or until the module changes what it came from; every read copies
//!   it into owned `Vec`s before any further callback.
//! - (E3) Memory the module lends (names, values, bodies) is read by Envoy during the call only.
//! - (E4) The module pointer of a stream is the `Box<Filter>` made in `on_http_filter_new`,
//!   freed exactly once in `on_http_filter_destroy`; Envoy calls a stream's hooks on one thread,
//!   never concurrently. The configuration pointer is the `Box<Module>` made in `config_new`,
//!   freed in `config_destroy` after every stream of it is gone; `Module` is `Sync`.
//! - (E5) The configuration's Envoy pointer is valid until `config_destroy`; its metric
//!   callbacks only read the table `config_new` filled and bump Envoy's atomic stats, so they
//!   may be called from any thread while the configuration lives.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::module::Module;
use crate::stream::Filter;

/// Bytes Envoy lends to the module.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    len: usize,
}

/// Bytes the module lends to Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    len: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The null buffer (a header value meaning "remove").
    fn null() -> Self {
        ModuleBuffer {
            ptr: std::ptr::null(),
            len: 0,
        }
    }
}

/// A header Envoy lends.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key_ptr: *const u8,
    key_len: usize,
    value_ptr: *const u8,
    value_len: usize,
}

impl EnvoyHeader {
    const EMPTY: EnvoyHeader = EnvoyHeader {
        key_ptr: std::ptr::null(),
        key_len: 0,
        value_ptr: std::ptr::null(),
        value_len: 0,
    };
}

/// A header the module lends.
#[repr(C)]
struct ModuleHeader {
    key_ptr: *const u8,
    key_len: usize,
    value_ptr: *const u8,
    value_len: usize,
}

impl ModuleHeader {
    fn of(name: &[u8], value: &[u8]) -> Self {
        ModuleHeader {
            key_ptr: name.as_ptr(),
            key_len: name.len(),
            value_ptr: value.as_ptr(),
            value_len: value.len(),
        }
    }
}

type FilterEnvoyPtr = *mut c_void;
type ConfigEnvoyPtr = *mut c_void;
type SchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderMap {
    /// Request headers.
    Request = 0,
    /// Response headers.
    Response = 2,
}

/// `envoy_dynamic_module_type_http_body_type`.
#[derive(Clone, Copy)]
enum BodyKind {
    ReceivedRequest = 0,
    BufferedRequest = 1,
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Critical.
    Critical = 5,
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_OK: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
const CALLOUT_OK: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
const CALLOUT_DONE_OK: u32 = 0;

#[cfg_attr(test, allow(dead_code))]
extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    fn envoy_dynamic_module_callback_http_get_headers_size(f: FilterEnvoyPtr, map: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        f: FilterEnvoyPtr,
        map: u32,
        out: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        f: FilterEnvoyPtr,
        map: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        f: FilterEnvoyPtr,
        status: u32,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_get_body_size(f: FilterEnvoyPtr, kind: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        f: FilterEnvoyPtr,
        kind: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        f: FilterEnvoyPtr,
        kind: u32,
        out: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        f: FilterEnvoyPtr,
        kind: u32,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        f: FilterEnvoyPtr,
        kind: u32,
        len: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(f: FilterEnvoyPtr)
        -> bool;

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        f: FilterEnvoyPtr,
        id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(f: FilterEnvoyPtr);
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(f: FilterEnvoyPtr);

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        c: ConfigEnvoyPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        c: ConfigEnvoyPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        c: ConfigEnvoyPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        c: ConfigEnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        c: ConfigEnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        c: ConfigEnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        c: ConfigEnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        c: ConfigEnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        c: ConfigEnvoyPtr,
        id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        c: ConfigEnvoyPtr,
    ) -> SchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        s: SchedulerPtr,
        event: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(s: SchedulerPtr);
}

// ---------------------------------------------------------------------------------------------
// Safe wrappers

/// Copies `len` bytes Envoy lends at `ptr` (null or empty: none).
///
/// SAFETY (for callers): `ptr` points to `len` readable bytes (E2), or is null.
unsafe fn copy(ptr: *const u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
}

/// Copies the headers Envoy lends.
///
/// SAFETY (for callers): `headers` points to `len` headers (E2), or is null.
unsafe fn copy_headers(headers: *const EnvoyHeader, len: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    if headers.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the caller's contract.
    let headers = unsafe { std::slice::from_raw_parts(headers, len) };
    headers
        .iter()
        // SAFETY: each header's pointers come from Envoy with their lengths (E2).
        .map(|h| unsafe { (copy(h.key_ptr, h.key_len), copy(h.value_ptr, h.value_len)) })
        .collect()
}

/// Concatenates the chunks Envoy lends.
///
/// SAFETY (for callers): `chunks` points to `len` buffers (E2), or is null.
unsafe fn copy_chunks(chunks: *const EnvoyBuffer, len: usize) -> Vec<u8> {
    if chunks.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the caller's contract.
    let chunks = unsafe { std::slice::from_raw_parts(chunks, len) };
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.len).sum());
    for c in chunks {
        if !c.ptr.is_null() && c.len > 0 {
            // SAFETY: each chunk's pointer comes from Envoy with its length (E2).
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(c.ptr, c.len) });
        }
    }
    out
}

fn module_headers(headers: &[(&[u8], &[u8])]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader::of(k, v))
        .collect()
}

/// Logs a line in Envoy's `dynamic_modules` log.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: a live slice (E3).
    unsafe { envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes())) }
}

/// One stream's Envoy side, for the length of one hook (E1).
pub struct StreamHost<'a> {
    ptr: FilterEnvoyPtr,
    /// Inside a request-body hook, the received chunk is apart from what Envoy buffered.
    in_body_hook: bool,
    _hook: PhantomData<&'a ()>,
}

impl StreamHost<'_> {
    /// Every header of `map` in order, as bytes (empty when Envoy has none to read now).
    pub fn headers(&self, map: HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
        // SAFETY: E1.
        let n =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.ptr, map as u32) };
        if n == 0 {
            return Vec::new();
        }
        let mut out = vec![EnvoyHeader::EMPTY; n];
        // SAFETY: E1; `out` holds the `n` headers Envoy said it has.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(self.ptr, map as u32, out.as_mut_ptr())
        };
        if !ok {
            return Vec::new();
        }
        // SAFETY: Envoy filled `out` (E2).
        unsafe { copy_headers(out.as_ptr(), out.len()) }
    }

    /// Sets header `name` (every value replaced), or removes it with `None`.
    pub fn set_header(&self, map: HeaderMap, name: &str, value: Option<&[u8]>) -> bool {
        let value = value.map_or(ModuleBuffer::null(), ModuleBuffer::of);
        // SAFETY: E1, E3.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                map as u32,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    /// Answers the client (a local reply).
    pub fn send_response(&self, status: u32, headers: &[(&[u8], &[u8])], body: &[u8]) {
        let mut headers = module_headers(headers);
        // SAFETY: E1, E3: `headers` and `body` outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                status,
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(b"ocicrypt_filter"),
            )
        }
    }

    fn body_of(&self, kind: BodyKind) -> Vec<u8> {
        // SAFETY: E1.
        let n = unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks_size(self.ptr, kind as u32)
        };
        if n == 0 {
            return Vec::new();
        }
        let mut chunks = vec![
            EnvoyBuffer {
                ptr: std::ptr::null(),
                len: 0
            };
            n
        ];
        // SAFETY: E1; `chunks` holds the `n` buffers Envoy said it has.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks(
                self.ptr,
                kind as u32,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        // SAFETY: Envoy filled `chunks` (E2).
        unsafe { copy_chunks(chunks.as_ptr(), chunks.len()) }
    }

    fn body_size(&self, kind: BodyKind) -> usize {
        // SAFETY: E1.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.ptr, kind as u32) }
    }

    /// Whether the chunk of this body hook is the body Envoy buffered (an earlier filter held
    /// it), so that the two must not be counted twice.
    fn received_is_buffered(&self) -> bool {
        // SAFETY: E1.
        self.in_body_hook
            && unsafe {
                envoy_dynamic_module_callback_http_received_buffered_request_body(self.ptr)
            }
    }

    /// The request body as the filter sees it now: what Envoy buffered for it (it paused
    /// before), then, inside a body hook, the chunk just received.
    pub fn request_body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        if !self.received_is_buffered() {
            body = self.body_of(BodyKind::BufferedRequest);
        }
        if self.in_body_hook {
            body.extend(self.body_of(BodyKind::ReceivedRequest));
        }
        body
    }

    /// The size of [`Self::request_body`].
    pub fn request_body_size(&self) -> usize {
        let mut n = 0;
        if !self.received_is_buffered() {
            n = self.body_size(BodyKind::BufferedRequest);
        }
        if self.in_body_hook {
            n = n.saturating_add(self.body_size(BodyKind::ReceivedRequest));
        }
        n
    }

    /// Drops the whole request body Envoy holds; whether every part of it went.
    pub fn drop_request_body(&self) -> bool {
        let mut ok = true;
        let mut kinds = vec![BodyKind::BufferedRequest];
        if self.in_body_hook {
            kinds.push(BodyKind::ReceivedRequest);
        }
        for kind in kinds {
            let n = self.body_size(kind);
            if n > 0 {
                // SAFETY: E1.
                ok &= unsafe {
                    envoy_dynamic_module_callback_http_drain_body(self.ptr, kind as u32, n)
                };
            }
        }
        ok
    }

    /// Replaces the whole request body with `body`. Inside a body hook the new bytes go where
    /// the received chunk was (Envoy moves it behind what it buffered when the filter goes on).
    pub fn replace_request_body(&self, body: &[u8]) -> bool {
        if !self.drop_request_body() {
            return false;
        }
        if body.is_empty() {
            return true;
        }
        let kind = if self.in_body_hook {
            BodyKind::ReceivedRequest
        } else {
            BodyKind::BufferedRequest
        };
        // SAFETY: E1, E3.
        unsafe {
            envoy_dynamic_module_callback_http_append_body(
                self.ptr,
                kind as u32,
                ModuleBuffer::of(body),
            )
        }
    }

    /// Sends a callout on `cluster`; Envoy's id for it, or `None` when Envoy refused it.
    pub fn callout(
        &self,
        cluster: &str,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u64> {
        let mut headers = module_headers(headers);
        let mut id: u64 = 0;
        // SAFETY: E1, E3; `id` is a local out-variable.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.ptr,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        (result == CALLOUT_OK).then_some(id)
    }

    /// Lets the paused request go on.
    pub fn continue_request(&self) {
        // SAFETY: E1.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    /// Lets the paused response go on.
    pub fn continue_response(&self) {
        // SAFETY: E1.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(self.ptr) }
    }
}

/// A metric kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Counter.
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram.
    Histogram,
}

/// The configuration's Envoy side, valid while the configuration lives (E5).
#[derive(Clone, Copy)]
pub struct ConfigHost {
    ptr: ConfigEnvoyPtr,
}

// SAFETY: E5: the pointer is valid while the configuration lives, and the callbacks made
// through it from other threads (metrics) only read what `config_new` wrote.
unsafe impl Send for ConfigHost {}
// SAFETY: as for Send.
unsafe impl Sync for ConfigHost {}

impl ConfigHost {
    /// Defines a metric (only inside `config_new`); its id, or `None` when Envoy refused.
    pub fn define(&self, kind: MetricKind, name: &str) -> Option<usize> {
        let mut id: usize = 0;
        let name = ModuleBuffer::of(name.as_bytes());
        let none = std::ptr::null_mut();
        // SAFETY: E5, E3; no labels; `id` is a local out-variable.
        let result = unsafe {
            match kind {
                MetricKind::Counter => {
                    envoy_dynamic_module_callback_http_filter_config_define_counter(
                        self.ptr, name, none, 0, &mut id,
                    )
                }
                MetricKind::Gauge => envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.ptr, name, none, 0, &mut id,
                ),
                MetricKind::Histogram => {
                    envoy_dynamic_module_callback_http_filter_config_define_histogram(
                        self.ptr, name, none, 0, &mut id,
                    )
                }
            }
        };
        (result == METRICS_OK).then_some(id)
    }

    /// Adds `n` to counter `id`.
    pub fn count(&self, id: usize, n: u64) {
        // SAFETY: E5.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.ptr,
                id,
                std::ptr::null_mut(),
                0,
                n,
            );
        }
    }

    /// Moves gauge `id` by `delta`.
    pub fn gauge_add(&self, id: usize, delta: i64) {
        let n = delta.unsigned_abs();
        // SAFETY: E5.
        unsafe {
            if delta >= 0 {
                envoy_dynamic_module_callback_http_filter_config_increment_gauge(
                    self.ptr,
                    id,
                    std::ptr::null_mut(),
                    0,
                    n,
                );
            } else {
                envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
                    self.ptr,
                    id,
                    std::ptr::null_mut(),
                    0,
                    n,
                );
            }
        }
    }

    /// Sets gauge `id`.
    pub fn gauge_set(&self, id: usize, value: u64) {
        // SAFETY: E5.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.ptr,
                id,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }

    /// Records `value` in histogram `id`.
    pub fn record(&self, id: usize, value: u64) {
        // SAFETY: E5.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                self.ptr,
                id,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }

    /// Sends a callout that belongs to the configuration (main thread); its id, or `None`.
    pub fn callout(
        &self,
        cluster: &str,
        headers: &[(&[u8], &[u8])],
        timeout_ms: u64,
    ) -> Option<u64> {
        let mut headers = module_headers(headers);
        let mut id: u64 = 0;
        // SAFETY: E5, E3; `id` is a local out-variable.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.ptr,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(&[]),
                timeout_ms,
            )
        };
        (result == CALLOUT_OK).then_some(id)
    }

    /// A scheduler that runs `on_http_filter_config_scheduled` on the main thread.
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: E5.
        let ptr =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.ptr) };
        (!ptr.is_null()).then_some(Scheduler { ptr })
    }
}

/// The configuration's scheduler: commits from any thread run on Envoy's main thread.
pub struct Scheduler {
    ptr: SchedulerPtr,
}

// SAFETY: Envoy documents the commit as callable from any thread; the pointer is deleted once,
// by Drop, after the thread that commits has stopped (Module::drop joins it first).
unsafe impl Send for Scheduler {}
// SAFETY: as for Send.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    /// Asks for `on_http_filter_config_scheduled(event)` on the main thread.
    pub fn commit(&self, event: u64) {
        // SAFETY: a scheduler from scheduler_new, not yet deleted.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.ptr, event)
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: deleted exactly once.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.ptr) }
    }
}

/// A callout's answer as Envoy delivered it, copied.
pub struct Answer {
    /// Envoy's id of the callout.
    pub id: u64,
    /// Whether it was answered (else reset, or over the buffer limit: no headers).
    pub answered: bool,
    /// Response headers (with `:status`).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// Runs a hook's body; a panic inside becomes `fallback` (the panic hook already logged it).
pub fn guard<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

// ---------------------------------------------------------------------------------------------
// Hooks Envoy calls

/// SAFETY (for callers): E2 for `b`.
unsafe fn envoy_bytes(b: EnvoyBuffer) -> Vec<u8> {
    // SAFETY: the caller's contract.
    unsafe { copy(b.ptr, b.len) }
}

/// The stream behind a module pointer.
///
/// SAFETY (for callers): `ptr` is a live `Box<Filter>` of `on_http_filter_new` (E4).
unsafe fn filter<'a>(ptr: *const c_void) -> Option<&'a Filter> {
    // SAFETY: the caller's contract; `Filter` is used through shared references only.
    unsafe { ptr.cast::<Filter>().as_ref() }
}

/// The configuration behind a module pointer.
///
/// SAFETY (for callers): `ptr` is a live `Box<Module>` of `config_new` (E4).
unsafe fn module<'a>(ptr: *const c_void) -> Option<&'a Module> {
    // SAFETY: the caller's contract.
    unsafe { ptr.cast::<Module>().as_ref() }
}

fn host<'a>(ptr: FilterEnvoyPtr, in_body_hook: bool) -> StreamHost<'a> {
    StreamHost {
        ptr,
        in_body_hook,
        _hook: PhantomData,
    }
}

/// The ABI version this module is built for (Envoy 1.40).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

/// A filter configuration: our JSON, parsed and checked; NULL refuses it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: E2: both buffers are Envoy's for this hook.
        let (name, config) = unsafe { (envoy_bytes(name), envoy_bytes(config)) };
        match Module::new(ConfigHost { ptr: config_envoy }, &name, &config) {
            Some(m) => Box::into_raw(Box::new(m)).cast_const().cast(),
            None => std::ptr::null(),
        }
    })
}

/// The configuration is gone (its streams first).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard((), || {
        if !config.is_null() {
            // SAFETY: E4: the Box of config_new, freed once here.
            drop(unsafe { Box::from_raw(config.cast_mut().cast::<Module>()) });
        }
    })
}

/// The configuration's scheduled event, on the main thread.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: ConfigEnvoyPtr,
    config: *const c_void,
    event: u64,
) {
    guard((), || {
        // SAFETY: E4.
        if let Some(m) = unsafe { module(config) } {
            m.on_scheduled(event);
        }
    })
}

/// A configuration callout's answer (the key-service refresh), on the main thread.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: ConfigEnvoyPtr,
    config: *const c_void,
    id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    guard((), || {
        // SAFETY: E2 for the answer; E4 for the configuration.
        let answer = unsafe { answer(id, result, headers, headers_len, chunks, chunks_len) };
        // SAFETY: E4.
        if let Some(m) = unsafe { module(config) } {
            m.on_callout_done(answer);
        }
    })
}

/// SAFETY (for callers): E2 for `headers` and `chunks`.
unsafe fn answer(
    id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) -> Answer {
    let answered = result == CALLOUT_DONE_OK;
    // SAFETY: the caller's contract.
    let (headers, body) = unsafe {
        (
            copy_headers(headers, headers_len),
            copy_chunks(chunks, chunks_len),
        )
    };
    Answer {
        id,
        answered,
        headers: if answered { headers } else { Vec::new() },
        body: if answered { body } else { Vec::new() },
    }
}

/// A new stream.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: FilterEnvoyPtr,
) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: E4.
        match unsafe { module(config) } {
            Some(m) => Box::into_raw(Box::new(Filter::new(m.shared())))
                .cast_const()
                .cast(),
            None => std::ptr::null(),
        }
    })
}

/// The stream is gone.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(f: *const c_void) {
    guard((), || {
        if !f.is_null() {
            // SAFETY: E4: the Box of on_http_filter_new, freed once here.
            drop(unsafe { Box::from_raw(f.cast_mut().cast::<Filter>()) });
        }
    })
}

/// Header statuses: Continue 0, StopAllIterationAndWatermark 4 (see `stream.rs`).
const HEADERS_STOP: u32 = 4;
/// Body statuses: Continue 0, StopIterationAndBuffer 1.
const BODY_BUFFER: u32 = 1;
/// Trailer statuses: Continue 0, StopIteration 1.
const TRAILERS_STOP: u32 = 1;

/// Request headers.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    fe: FilterEnvoyPtr,
    f: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: E4.
    let Some(f) = (unsafe { filter(f) }) else {
        return HEADERS_STOP;
    };
    let h = host(fe, false);
    f.guarded(&h, HEADERS_STOP, |f| {
        f.on_request_headers(&h, end_of_stream)
    })
}

/// A request body chunk.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    fe: FilterEnvoyPtr,
    f: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: E4.
    let Some(f) = (unsafe { filter(f) }) else {
        return BODY_BUFFER;
    };
    let h = host(fe, true);
    f.guarded(&h, BODY_BUFFER, |f| f.on_request_body(&h, end_of_stream))
}

/// Request trailers.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    fe: FilterEnvoyPtr,
    f: *const c_void,
) -> u32 {
    // SAFETY: E4.
    let Some(f) = (unsafe { filter(f) }) else {
        return TRAILERS_STOP;
    };
    let h = host(fe, false);
    f.guarded(&h, TRAILERS_STOP, |f| f.on_request_trailers(&h))
}

/// Response headers.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    fe: FilterEnvoyPtr,
    f: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: E4.
    let Some(f) = (unsafe { filter(f) }) else {
        return HEADERS_STOP;
    };
    let h = host(fe, false);
    f.guarded(&h, HEADERS_STOP, |f| f.on_response_headers(&h))
}

/// A response body chunk: the gateway reads none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    0
}

/// Response trailers: the gateway reads none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
) -> u32 {
    0
}

/// The stream is complete (before destroy; it may never have been decoded).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _fe: FilterEnvoyPtr,
    f: *const c_void,
) {
    guard((), || {
        // SAFETY: E4.
        if let Some(f) = unsafe { filter(f) } {
            f.on_complete();
        }
    })
}

/// A stream callout's answer.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    fe: FilterEnvoyPtr,
    f: *const c_void,
    id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    // SAFETY: E2.
    let answer = guard(None, || {
        Some(unsafe { answer(id, result, headers, headers_len, chunks, chunks_len) })
    });
    // SAFETY: E4.
    let (Some(answer), Some(f)) = (answer, unsafe { filter(f) }) else {
        return;
    };
    let h = host(fe, false);
    f.guarded(&h, (), |f| f.on_callout_done(&h, answer));
}

/// Scheduled stream events: the module commits none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _event: u64,
) {
}

/// Streamed callouts: the module starts none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _stream: u64,
    _headers: *const EnvoyHeader,
    _headers_len: usize,
    _end_stream: bool,
) {
}

/// Streamed callouts: the module starts none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_len: usize,
    _end_stream: bool,
) {
}

/// Streamed callouts: the module starts none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _stream: u64,
    _trailers: *const EnvoyHeader,
    _trailers_len: usize,
) {
}

/// Streamed callouts: the module starts none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _stream: u64,
) {
}

/// Streamed callouts: the module starts none.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}

/// Downstream watermarks: the gateway is not a terminal filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
) {
}

/// Downstream watermarks: the gateway is not a terminal filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _fe: FilterEnvoyPtr,
    _f: *const c_void,
) {
}

#[cfg(test)]
mod fake_envoy;

#[cfg(test)]
mod tests {
    use super::fake_envoy::{self, with};
    use super::*;

    /// Any non-null pointer: the fake Envoy keeps one stream per thread.
    fn envoy_ptr() -> *mut c_void {
        std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
    }

    fn buf(b: &[u8]) -> EnvoyBuffer {
        EnvoyBuffer {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    fn reset() {
        with(|s| *s = fake_envoy::FakeStream::default());
    }

    #[test]
    fn header_values_are_read_as_bytes_and_set_or_removed() {
        reset();
        with(|s| {
            s.request_headers = vec![
                (b":path".to_vec(), b"/v2/".to_vec()),
                (b"x-odd".to_vec(), vec![0xff, 0x00, b'a']),
            ]
        });
        let h = host(envoy_ptr(), false);
        assert_eq!(
            h.headers(HeaderMap::Request),
            vec![
                (b":path".to_vec(), b"/v2/".to_vec()),
                (b"x-odd".to_vec(), vec![0xff, 0x00, b'a'])
            ]
        );
        assert!(h.set_header(HeaderMap::Request, ":path", Some(b"/v2/x")));
        assert!(h.set_header(HeaderMap::Request, "x-odd", None));
        assert_eq!(
            h.headers(HeaderMap::Request),
            vec![(b":path".to_vec(), b"/v2/x".to_vec())]
        );
        assert!(h.headers(HeaderMap::Response).is_empty());
    }

    #[test]
    fn the_request_body_is_what_envoy_buffered_then_the_chunk_received() {
        reset();
        with(|s| {
            s.buffered = b"held-".to_vec();
            s.received = b"chunk".to_vec();
        });
        let body_hook = host(envoy_ptr(), true);
        assert_eq!(body_hook.request_body(), b"held-chunk");
        assert_eq!(body_hook.request_body_size(), 10);
        // Outside a body hook only the buffered body exists.
        let callout_hook = host(envoy_ptr(), false);
        assert_eq!(callout_hook.request_body(), b"held-");
        assert_eq!(callout_hook.request_body_size(), 5);
        // A body another filter held and now passes is received and buffered at once.
        with(|s| {
            s.received_is_buffered = true;
            s.buffered = b"chunk".to_vec();
        });
        assert_eq!(body_hook.request_body(), b"chunk");
        assert_eq!(body_hook.request_body_size(), 5);
    }

    #[test]
    fn replacing_the_body_leaves_only_the_new_bytes_where_envoy_sends_them() {
        reset();
        with(|s| {
            s.buffered = b"plain-".to_vec();
            s.received = b"text".to_vec();
        });
        assert!(host(envoy_ptr(), true).replace_request_body(b"CIPHERTEXT"));
        with(|s| {
            assert!(s.buffered.is_empty());
            assert_eq!(s.received, b"CIPHERTEXT");
        });
        with(|s| s.received.clear());
        assert!(host(envoy_ptr(), false).replace_request_body(b"MANIFEST"));
        with(|s| assert_eq!(s.buffered, b"MANIFEST"));
        assert!(host(envoy_ptr(), false).drop_request_body());
        with(|s| assert!(s.buffered.is_empty()));
    }

    #[test]
    fn a_callout_envoy_refuses_has_no_id() {
        reset();
        let h = host(envoy_ptr(), false);
        let headers: [(&[u8], &[u8]); 2] = [(b":method", b"PUT"), (b":path", b"/v2/x")];
        assert_eq!(h.callout("registry", &headers, b"body", 1500), Some(101));
        with(|s| {
            let (cluster, hs, body, timeout) = &s.callouts[0];
            assert_eq!(cluster, "registry");
            assert_eq!(hs[1], (b":path".to_vec(), b"/v2/x".to_vec()));
            assert_eq!(body, b"body");
            assert_eq!(*timeout, 1500);
            s.refuse_callouts = true;
        });
        assert_eq!(h.callout("registry", &headers, b"", 1), None);
    }

    #[test]
    fn a_negative_gauge_change_decrements() {
        reset();
        let c = ConfigHost { ptr: envoy_ptr() };
        let id = c.define(MetricKind::Gauge, "g").unwrap();
        c.gauge_add(id, 5);
        c.gauge_add(id, -3);
        with(|s| assert_eq!(s.metrics[id], ("gauge", "g".to_string(), 2)));
        c.gauge_set(id, 9);
        with(|s| assert_eq!(s.metrics[id].2, 9));
    }

    // The hooks, driven as Envoy drives them.

    const CONFIG: &[u8] = br#"{
        "registry": {"cluster": "registry", "timeout_ms": 30000},
        "policy": {"default": "passthrough", "rules": [
            {"repositories": "demo/**", "action": "encrypt"}]}
    }"#;

    struct Stream {
        config: *const c_void,
        filter: *const c_void,
    }

    impl Stream {
        fn open() -> Stream {
            reset();
            let config = envoy_dynamic_module_on_http_filter_config_new(
                envoy_ptr(),
                buf(b"ocicrypt"),
                buf(CONFIG),
            );
            assert!(!config.is_null());
            let filter = envoy_dynamic_module_on_http_filter_new(config, envoy_ptr());
            assert!(!filter.is_null());
            Stream { config, filter }
        }
    }

    impl Drop for Stream {
        fn drop(&mut self) {
            envoy_dynamic_module_on_http_filter_stream_complete(envoy_ptr(), self.filter);
            envoy_dynamic_module_on_http_filter_destroy(self.filter);
            envoy_dynamic_module_on_http_filter_config_destroy(self.config);
        }
    }

    fn request(headers: &[(&str, &str)]) {
        with(|s| {
            s.request_headers = headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        });
    }

    #[test]
    fn the_module_names_its_abi_and_refuses_a_bad_configuration() {
        let version = envoy_dynamic_module_on_program_init();
        // SAFETY: a NUL-terminated static string.
        let version = unsafe { std::ffi::CStr::from_ptr(version) };
        assert_eq!(version.to_bytes(), b"v0.2.0");
        reset();
        let bad = envoy_dynamic_module_on_http_filter_config_new(
            envoy_ptr(),
            buf(b"ocicrypt"),
            buf(br#"{"registry": {"cluster": "registry"}, "surprise": 1}"#),
        );
        assert!(bad.is_null());
        with(|s| {
            let (level, line) = s.logs.last().unwrap();
            assert_eq!(*level, LogLevel::Critical as u32);
            assert!(line.contains("invalid configuration"), "{line}");
        });
    }

    #[test]
    fn a_read_passes_untouched() {
        let s = Stream::open();
        request(&[(":method", "GET"), (":path", "/v2/"), (":authority", "r")]);
        let status =
            envoy_dynamic_module_on_http_filter_request_headers(envoy_ptr(), s.filter, true);
        assert_eq!(status, 0);
        with(|f| {
            assert!(f.replies.is_empty());
            assert!(f.callouts.is_empty());
        });
    }

    #[test]
    fn a_write_the_gateway_cannot_encrypt_is_refused_and_the_stream_left_alone() {
        let s = Stream::open();
        request(&[
            (":method", "POST"),
            (":path", "/v2/demo/app/blobs/uploads/"),
            (":authority", "r"),
            ("content-length", "0"),
        ]);
        // Envoy runs the encoder filters inside send_response: our response hook re-enters.
        let filter = s.filter as usize;
        with(|f| {
            f.on_reply = Some(Box::new(move || {
                let status = envoy_dynamic_module_on_http_filter_response_headers(
                    envoy_ptr(),
                    filter as *const c_void,
                    false,
                );
                assert_eq!(status, 0, "the gateway's own reply passes");
            }))
        });
        let status =
            envoy_dynamic_module_on_http_filter_request_headers(envoy_ptr(), s.filter, true);
        assert_eq!(status, HEADERS_STOP);
        with(|f| {
            assert_eq!(f.replies.len(), 1);
            let (code, headers, body) = &f.replies[0];
            assert_eq!(*code, 503);
            assert!(headers.contains(&(b"x-ocicrypt-filter".to_vec(), b"refused".to_vec())));
            let body: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
            assert!(f.on_reply.is_none(), "the reply ran the response hook");
            assert_eq!(f.continued_requests, 0);
            let refused = f
                .metrics
                .iter()
                .find(|m| m.1 == "ocicrypt.refusals.unavailable");
            assert_eq!(refused.map(|m| m.2), Some(1));
        });
        // After the reply nothing calls back into the stream.
        with(|f| f.received = b"late".to_vec());
        assert_eq!(
            envoy_dynamic_module_on_http_filter_request_body(envoy_ptr(), s.filter, true),
            BODY_BUFFER
        );
        envoy_dynamic_module_on_http_filter_http_callout_done(
            envoy_ptr(),
            s.filter,
            101,
            0,
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
        );
        with(|f| {
            assert_eq!(f.replies.len(), 1);
            assert_eq!(f.received, b"late", "the body was left as it came");
            assert_eq!(f.continued_requests, 0);
        });
    }

    #[test]
    fn a_request_waiting_for_a_callout_stops_everything_until_the_answer() {
        let s = Stream::open();
        request(&[
            (":method", "GET"),
            (":path", "/v2/demo/app/tags/list"),
            (":authority", "r"),
        ]);
        let status =
            envoy_dynamic_module_on_http_filter_request_headers(envoy_ptr(), s.filter, true);
        // StopAllIterationAndWatermark: no body hook may run (and resume the headers by
        // returning Continue) while the machine waits.
        assert_eq!(status, 4);
        let id = with(|f| {
            assert_eq!(f.callouts.len(), 1);
            assert_eq!(f.callouts[0].0, "registry");
            100 + f.callouts.len() as u64
        });
        let headers = [(b":status".to_vec(), b"200".to_vec())];
        let envoy_headers: Vec<EnvoyHeader> = headers
            .iter()
            .map(|(k, v)| EnvoyHeader {
                key_ptr: k.as_ptr(),
                key_len: k.len(),
                value_ptr: v.as_ptr(),
                value_len: v.len(),
            })
            .collect();
        let body = br#"{"name":"demo/app","tags":["v1","ocicrypt.ledger.x"]}"#;
        let chunks = [buf(body)];
        envoy_dynamic_module_on_http_filter_http_callout_done(
            envoy_ptr(),
            s.filter,
            id,
            0,
            envoy_headers.as_ptr(),
            envoy_headers.len(),
            chunks.as_ptr(),
            chunks.len(),
        );
        with(|f| {
            assert_eq!(f.replies.len(), 1, "answered by the gateway");
            let (code, _, body) = &f.replies[0];
            assert_eq!(*code, 200);
            let body: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(body["tags"], serde_json::json!(["v1"]));
            assert_eq!(f.continued_requests, 0);
        });
    }

    #[test]
    fn response_hooks_of_a_stream_never_decoded_pass() {
        let s = Stream::open();
        with(|f| f.response_headers = vec![(b":status".to_vec(), b"503".to_vec())]);
        let status =
            envoy_dynamic_module_on_http_filter_response_headers(envoy_ptr(), s.filter, true);
        assert_eq!(status, 0);
        with(|f| assert!(f.replies.is_empty()));
    }
}
