//! A minimal blocking HTTP/1.1 GET over `std::net::TcpStream` (plain `http://` only: the
//! conformance suite serves its repositories on 127.0.0.1).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A GET answer: status and at most `max_len + 1` bytes of body (one more than allowed, so
/// that the caller can tell an over-long body).
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Split `http://host[:port]/path` into (`host:port`, host header, path).
fn split_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i..).unwrap_or("/")),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("no host in {url}"));
    }
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_owned(), path.to_owned()))
}

pub fn get(url: &str, max_len: u64) -> Result<Response, String> {
    let (addr, host, path) = split_url(url)?;
    let mut stream = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ocicrypt-tuf-client\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut reader = BufReader::new(stream);

    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| format!("read status from {addr}: {e}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("read headers: {e}"))?;
        let line = line.trim_end();
        if n == 0 || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }

    let cap = max_len.saturating_add(1);
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader
                .read_line(&mut size_line)
                .map_err(|e| format!("read chunk size: {e}"))?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size_hex, 16)
                .map_err(|_| format!("bad chunk size {size_line:?}"))?;
            if size == 0 {
                break;
            }
            let take = size.min(cap.saturating_sub(body.len() as u64));
            let mut chunk = Vec::new();
            (&mut reader)
                .take(take)
                .read_to_end(&mut chunk)
                .map_err(|e| format!("read chunk: {e}"))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 >= cap {
                break;
            }
            let mut skip = Vec::new();
            (&mut reader)
                .take(size - take)
                .read_to_end(&mut skip)
                .map_err(|e| e.to_string())?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf).map_err(|e| e.to_string())?;
        }
    } else {
        let take = content_length.map_or(cap, |l| l.min(cap));
        (&mut reader)
            .take(take)
            .read_to_end(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
    }
    Ok(Response { status, body })
}
