//! Thin wrappers over the host calls the gateway needs, with host failures turned into
//! `OciError`s (a failed host call must refuse the request, never trap the VM).
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::upload::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

/// Logs, ignoring a failing logger (nothing better to do with that failure).
pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn host_error(what: &str) -> OciError {
    OciError::new(
        Code::Unknown,
        format!("gateway host call failed ({what}); nothing was stored, retry"),
    )
}

/// A request or response header.
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value(map, name).ok().flatten()
}

/// Sets (or with `None` removes) a header.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> Result<(), OciError> {
    hostcalls::set_map_value(map, name, value).map_err(|_| host_error("set header"))
}

/// The whole current body buffer.
pub fn body(kind: BufferType, size: usize) -> Result<Vec<u8>, OciError> {
    if size == 0 {
        return Ok(Vec::new());
    }
    match hostcalls::get_buffer(kind, 0, size) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Ok(Vec::new()),
        Err(_) => Err(host_error("read body")),
    }
}

/// Replaces the current body buffer (`size` bytes of it) with `data`.
pub fn set_body(kind: BufferType, size: usize, data: &[u8]) -> Result<(), OciError> {
    hostcalls::set_buffer(kind, 0, size, data).map_err(|_| host_error("write body"))
}

/// Sends a local reply carrying an OCI error body.
pub fn reply_error(err: &OciError) {
    let body = err.body();
    let _ = hostcalls::send_http_response(
        u32::from(err.status()),
        vec![
            ("content-type", "application/json"),
            ("x-ocicrypt-filter", "refused"),
        ],
        Some(&body),
    );
}

/// Sends a local reply with a body that already is an OCI error document.
pub fn reply_raw(status: u32, body: &[u8]) {
    let _ = hostcalls::send_http_response(
        status,
        vec![
            ("content-type", "application/json"),
            ("x-ocicrypt-filter", "registry-refused"),
        ],
        Some(body),
    );
}

/// Envoy shared data: one map per process, visible to every worker VM.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key).ok().and_then(|(v, _)| v)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError> {
        hostcalls::set_shared_data(key, Some(value), None).map_err(|_| host_error("shared data"))
    }
}
