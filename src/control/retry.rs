//! One more try for a request that went out on a connection the other end
//! had already closed.
//!
//! reqwest keeps idle HTTP/1.1 connections in a pool. An HTTP proxy such as
//! tinyproxy closes its side after every response; if the next request is
//! taken from the pool in the instant before the client has read that
//! close, it is written into a dead socket and fails with "connection
//! closed before message completed" although nothing reached the proxy (seen
//! in the lab: `warren up` behind a proxy failed its `/register` that way,
//! right after a successful `GET /key`). hyper retries such requests only
//! when it can tell the request was not written yet, which here it cannot.
//!
//! [`send`] builds the request anew and sends it once more, on a new
//! connection, when the failure is exactly that: the connection ended
//! before any response (hyper's incomplete-message or canceled errors, or a
//! reset or broken pipe under them). A timeout, a refused connection or any
//! HTTP answer is final. Building anew matters for signed requests: the
//! second try carries a fresh nonce, so it cannot be taken for a replay if
//! the first one did arrive after all (see `control/auth.rs`).

use std::error::Error as _;

/// Sends `build()`; builds and sends it once more if the first went out on
/// a stale connection.
pub(crate) async fn send(
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    match build().send().await {
        Err(e) if stale_connection(&e) => {
            tracing::debug!("request hit a closed pooled connection ({e}); trying once more");
            build().send().await
        }
        r => r,
    }
}

/// Whether `e` says the connection ended before any response came.
fn stale_connection(e: &reqwest::Error) -> bool {
    if e.is_timeout() || e.is_connect() || e.is_status() || e.is_body() || e.is_decode() {
        return false;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one request head (no bodies here); `None` at end of stream.
    async fn read_request(s: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    async fn answer(s: &mut TcpStream, body: &str) {
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
    }

    /// A server that keeps the first connection after answering once, then
    /// reads the second request on it and closes it unanswered (the proxy
    /// that closed just as the request went out); the next connection is
    /// answered normally.
    async fn server() -> (String, tokio::task::JoinHandle<usize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut first, _) = l.accept().await.unwrap();
            read_request(&mut first).await.unwrap();
            answer(&mut first, "one").await;
            read_request(&mut first).await.unwrap();
            drop(first);
            let (mut second, _) = l.accept().await.unwrap();
            let mut served = 0;
            while read_request(&mut second).await.is_some() {
                answer(&mut second, "two").await;
                served += 1;
            }
            served
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_request_on_a_connection_closed_unanswered_is_sent_again() {
        let (url, task) = server().await;
        let http = client();
        let one = send(|| http.get(format!("{url}/a"))).await.unwrap();
        assert_eq!(one.text().await.unwrap(), "one");
        // The pooled connection is reused, dies unanswered, and the request
        // goes out again on a new one.
        let two = send(|| http.post(format!("{url}/b"))).await.unwrap();
        assert_eq!(two.text().await.unwrap(), "two");
        drop(http);
        assert_eq!(
            task.await.unwrap(),
            1,
            "the second connection served one request"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_retried() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let http = client();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let e = send(|| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            http.get(&url)
        })
        .await
        .unwrap_err();
        assert!(e.is_connect(), "{e}");
        assert_eq!(calls.into_inner(), 1);
    }
}
