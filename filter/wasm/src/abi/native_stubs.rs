//! Native builds (host `cargo test`, clippy) have no proxy-wasm host: every call answers
//! `NotFound` and writes nothing, as the SDK's own native stubs do.
#![allow(clippy::missing_safety_doc)] // same contract as the wasm imports
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
#[cfg(any(test, feature = "test-trap"))]
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
pub unsafe fn proxy_set_buffer_bytes(_: u32, _: usize, _: usize, _: *const u8, _: usize) -> u32 {
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
pub unsafe fn proxy_set_shared_data(_: *const u8, _: usize, _: *const u8, _: usize, _: u32) -> u32 {
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
