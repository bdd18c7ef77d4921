//! Envoy's side of the ABI for the unit tests: the callbacks the module imports, over a
//! per-thread record of one stream (headers, bodies, replies, callouts, metrics) that tests set
//! up and read back. Only what the module calls is here; each behaves as Envoy 1.40 documents.
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{EnvoyBuffer, EnvoyHeader, ModuleBuffer, ModuleHeader};

/// Headers as Envoy holds them.
pub type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream as the fake Envoy holds it.
#[derive(Default)]
pub struct FakeStream {
    pub request_headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The chunk of the body hook running (only readable inside one).
    pub received: Vec<u8>,
    /// What Envoy buffered for the filter.
    pub buffered: Vec<u8>,
    /// The received chunk is the buffered body (an earlier filter held it).
    pub received_is_buffered: bool,
    /// Local replies sent: (status, headers, body).
    pub replies: Vec<(u32, Headers, Vec<u8>)>,
    /// Callouts sent: (cluster, headers, body, timeout).
    pub callouts: Vec<(String, Headers, Vec<u8>, u64)>,
    /// Envoy refuses the next callouts.
    pub refuse_callouts: bool,
    pub continued_requests: usize,
    pub continued_responses: usize,
    /// Run inside `send_response`, as Envoy runs the encoder filters of a local reply.
    pub on_reply: Option<Box<dyn FnMut()>>,
    pub logs: Vec<(u32, String)>,
    /// Metrics: (kind, name, value).
    pub metrics: Vec<(&'static str, String, i64)>,
}

thread_local! {
    pub static ENVOY: RefCell<FakeStream> = RefCell::new(FakeStream::default());
}

/// Scheduler commits, from any thread.
pub static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` on this thread's fake stream.
pub fn with<T>(f: impl FnOnce(&mut FakeStream) -> T) -> T {
    ENVOY.with(|e| f(&mut e.borrow_mut()))
}

unsafe fn bytes(b: ModuleBuffer) -> Vec<u8> {
    unsafe { super::copy(b.ptr, b.len) }
}

unsafe fn module_headers(h: *mut ModuleHeader, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    if h.is_null() {
        return Vec::new();
    }
    unsafe { std::slice::from_raw_parts(h, n) }
        .iter()
        .map(|h| unsafe {
            (
                super::copy(h.key_ptr, h.key_len),
                super::copy(h.value_ptr, h.value_len),
            )
        })
        .collect()
}

fn map(s: &mut FakeStream, kind: u32) -> &mut Vec<(Vec<u8>, Vec<u8>)> {
    if kind == 0 {
        &mut s.request_headers
    } else {
        &mut s.response_headers
    }
}

fn body(s: &mut FakeStream, kind: u32) -> &mut Vec<u8> {
    if kind == 0 {
        &mut s.received
    } else {
        &mut s.buffered
    }
}

/// Envoy keeps lent memory alive until the hook ends: the fake leaks it (tests are short).
fn lend(v: Vec<u8>) -> (*const u8, usize) {
    let v = Box::leak(v.into_boxed_slice());
    (v.as_ptr(), v.len())
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer) {
    let m = unsafe { bytes(message) };
    with(|s| {
        s.logs
            .push((level, String::from_utf8_lossy(&m).into_owned()))
    });
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
    _f: *mut std::ffi::c_void,
    kind: u32,
) -> usize {
    with(|s| map(s, kind).len())
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers(
    _f: *mut std::ffi::c_void,
    kind: u32,
    out: *mut EnvoyHeader,
) -> bool {
    let headers = with(|s| map(s, kind).clone());
    for (i, (k, v)) in headers.into_iter().enumerate() {
        let (kp, kl) = lend(k);
        let (vp, vl) = lend(v);
        unsafe {
            *out.add(i) = EnvoyHeader {
                key_ptr: kp,
                key_len: kl,
                value_ptr: vp,
                value_len: vl,
            }
        };
    }
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    _f: *mut std::ffi::c_void,
    kind: u32,
    key: ModuleBuffer,
    value: ModuleBuffer,
) -> bool {
    let key = unsafe { bytes(key) };
    let remove = value.ptr.is_null();
    let value = unsafe { bytes(value) };
    with(|s| {
        let m = map(s, kind);
        m.retain(|(k, _)| *k != key);
        if !remove {
            m.push((key, value));
        }
    });
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    _f: *mut std::ffi::c_void,
    status: u32,
    headers: *mut ModuleHeader,
    headers_len: usize,
    body: ModuleBuffer,
    _details: ModuleBuffer,
) {
    let reply = unsafe { (status, module_headers(headers, headers_len), bytes(body)) };
    let hook = with(|s| {
        s.replies.push(reply);
        s.on_reply.take()
    });
    if let Some(mut hook) = hook {
        hook();
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_size(
    _f: *mut std::ffi::c_void,
    kind: u32,
) -> usize {
    with(|s| body(s, kind).len())
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks_size(
    _f: *mut std::ffi::c_void,
    kind: u32,
) -> usize {
    // Two chunks when there are two bytes or more: the module must join them.
    with(|s| body(s, kind).len().min(2))
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks(
    _f: *mut std::ffi::c_void,
    kind: u32,
    out: *mut EnvoyBuffer,
) -> bool {
    let b = with(|s| body(s, kind).clone());
    let half = b.len() / 2;
    let parts: Vec<Vec<u8>> = if b.len() >= 2 {
        vec![b[..half].to_vec(), b[half..].to_vec()]
    } else {
        vec![b]
    };
    for (i, p) in parts.into_iter().enumerate() {
        let (ptr, len) = lend(p);
        unsafe { *out.add(i) = EnvoyBuffer { ptr, len } };
    }
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_append_body(
    _f: *mut std::ffi::c_void,
    kind: u32,
    data: ModuleBuffer,
) -> bool {
    let data = unsafe { bytes(data) };
    with(|s| body(s, kind).extend(data));
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_drain_body(
    _f: *mut std::ffi::c_void,
    kind: u32,
    len: usize,
) -> bool {
    with(|s| {
        let b = body(s, kind);
        let n = len.min(b.len());
        b.drain(..n);
    });
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_received_buffered_request_body(
    _f: *mut std::ffi::c_void,
) -> bool {
    with(|s| s.received_is_buffered)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_http_callout(
    _f: *mut std::ffi::c_void,
    id_out: *mut u64,
    cluster: ModuleBuffer,
    headers: *mut ModuleHeader,
    headers_len: usize,
    body: ModuleBuffer,
    timeout_ms: u64,
) -> u32 {
    let (cluster, headers, body) = unsafe {
        (
            bytes(cluster),
            module_headers(headers, headers_len),
            bytes(body),
        )
    };
    with(|s| {
        if s.refuse_callouts {
            return 2;
        }
        s.callouts.push((
            String::from_utf8_lossy(&cluster).into_owned(),
            headers,
            body,
            timeout_ms,
        ));
        unsafe { *id_out = 100 + s.callouts.len() as u64 };
        0
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_continue_decoding(
    _f: *mut std::ffi::c_void,
) {
    with(|s| s.continued_requests += 1);
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_continue_encoding(
    _f: *mut std::ffi::c_void,
) {
    with(|s| s.continued_responses += 1);
}

fn define(kind: &'static str, name: ModuleBuffer, id_out: *mut usize) -> u32 {
    let name = String::from_utf8_lossy(&unsafe { bytes(name) }).into_owned();
    with(|s| {
        s.metrics.push((kind, name, 0));
        unsafe { *id_out = s.metrics.len() - 1 };
    });
    0
}

fn update(id: usize, f: impl FnOnce(i64) -> i64) -> u32 {
    with(|s| match s.metrics.get_mut(id) {
        Some(m) => {
            m.2 = f(m.2);
            0
        }
        None => 1,
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    _c: *mut std::ffi::c_void,
    name: ModuleBuffer,
    _labels: *mut ModuleBuffer,
    _n: usize,
    id_out: *mut usize,
) -> u32 {
    define("counter", name, id_out)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
    _c: *mut std::ffi::c_void,
    name: ModuleBuffer,
    _labels: *mut ModuleBuffer,
    _n: usize,
    id_out: *mut usize,
) -> u32 {
    define("gauge", name, id_out)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
    _c: *mut std::ffi::c_void,
    name: ModuleBuffer,
    _labels: *mut ModuleBuffer,
    _n: usize,
    id_out: *mut usize,
) -> u32 {
    define("histogram", name, id_out)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
    _c: *mut std::ffi::c_void,
    id: usize,
    _labels: *mut ModuleBuffer,
    _n: usize,
    value: u64,
) -> u32 {
    update(id, |v| v + value as i64)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
    _c: *mut std::ffi::c_void,
    id: usize,
    _labels: *mut ModuleBuffer,
    _n: usize,
    value: u64,
) -> u32 {
    update(id, |v| v + value as i64)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
    _c: *mut std::ffi::c_void,
    id: usize,
    _labels: *mut ModuleBuffer,
    _n: usize,
    value: u64,
) -> u32 {
    update(id, |v| v - value as i64)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
    _c: *mut std::ffi::c_void,
    id: usize,
    _labels: *mut ModuleBuffer,
    _n: usize,
    value: u64,
) -> u32 {
    update(id, |_| value as i64)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
    _c: *mut std::ffi::c_void,
    id: usize,
    _labels: *mut ModuleBuffer,
    _n: usize,
    value: u64,
) -> u32 {
    update(id, |v| v + value as i64)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_http_callout(
    _c: *mut std::ffi::c_void,
    _id_out: *mut u64,
    _cluster: ModuleBuffer,
    _headers: *mut ModuleHeader,
    _headers_len: usize,
    _body: ModuleBuffer,
    _timeout_ms: u64,
) -> u32 {
    2
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
    c: *mut std::ffi::c_void,
) -> *mut std::ffi::c_void {
    c
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
    _s: *mut std::ffi::c_void,
    _event: u64,
) {
    COMMITS.fetch_add(1, Ordering::Relaxed);
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
    _s: *mut std::ffi::c_void,
) {
}
