//! The health check's probe (`Listener.probe`, `health_check:`): a WebSocket
//! upgrade to the upstream of the route a path takes in the configuration
//! now, through the connector the connections use. The probe and the traffic
//! therefore judge the same upstream with the same TLS verification (SNI and
//! name: `upstream_tls.server_name`, the CA file as a trust anchor, rustls'
//! rules): a probe that verified differently failed /readyz and opened the
//! upstream breaker in front of a healthy upstream, or passed one every
//! connection failed. A reload that re-points the route re-points the probe.

use std::time::Duration;

use loopwatch_dataplane_core::frames::build_close_frame;
use loopwatch_dataplane_core::head::{accept_key, base64};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::response::{Answer, ResponseReader};
use crate::tls::UpstreamTls;
use crate::transport::connect_upstream;
use crate::wire::{route_for, Route};

/// The most of a response head the probe reads.
const MAX_HEAD: usize = 16 * 1024;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The upstream answered with this final status (101: upgraded).
    Answered(u16),
    /// No answer: why (the connect's or the TLS handshake's error, a bad or
    /// missing response, the deadline).
    Failed(String),
}

/// Upgrade `path` (a request-target: path and query) on its route's
/// upstream, `authorization` as that header, all within `deadline`; on a
/// 101, a close frame (1000) ends the connection at once.
pub async fn probe(
    routes: &[Route],
    tls: Option<&UpstreamTls>,
    target: &[u8],
    authorization: Option<&[u8]>,
    deadline: Duration,
) -> ProbeResult {
    match timeout(
        deadline,
        upgrade(routes, tls, target, authorization, deadline),
    )
    .await
    {
        Ok(Ok(status)) => ProbeResult::Answered(status),
        Ok(Err(why)) => ProbeResult::Failed(why),
        Err(_) => ProbeResult::Failed(format!("no answer within {:.3}s", deadline.as_secs_f64())),
    }
}

async fn upgrade(
    routes: &[Route],
    tls: Option<&UpstreamTls>,
    target: &[u8],
    authorization: Option<&[u8]>,
    deadline: Duration,
) -> Result<u16, String> {
    let path_only = target.split(|&b| b == b'?').next().unwrap_or_default();
    let Some(route) = route_for(routes, path_only) else {
        return Err(format!(
            "no route for {}",
            String::from_utf8_lossy(path_only)
        ));
    };
    let mut stream = connect_upstream(route, tls, deadline).await.map_err(|e| {
        // The connections' own words (less their "loopwatch: "), and the reason.
        let what = e.message();
        let what = what.strip_prefix("loopwatch: ").unwrap_or(what);
        match e.detail() {
            Some(why) => format!("{what}: {why}"),
            None => what.to_owned(),
        }
    })?;
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).map_err(|e| format!("no random key: {e}"))?;
    let key = base64(&nonce);
    let mut request = Vec::with_capacity(256);
    request.extend_from_slice(b"GET ");
    request.extend_from_slice(&route.target(path_only, target));
    request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    request.extend_from_slice(&route.authority);
    request.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
    request.extend_from_slice(b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ");
    request.extend_from_slice(key.as_bytes());
    request.extend_from_slice(b"\r\nUser-Agent: loopwatch-health-check\r\n");
    if let Some(value) = authorization {
        request.extend_from_slice(b"Authorization: ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("upstream write: {e}"))?;
    let status = read_status(&mut stream, &key).await?;
    if status == 101 {
        // Upgraded: end it now, as a client would (masked; its reply unread).
        let mut mask = [0u8; 4];
        let _ = getrandom::getrandom(&mut mask);
        let close = build_close_frame(1000, "loopwatch health check", Some(mask))
            .expect("1000 is sendable");
        let _ = timeout(Duration::from_secs(1), stream.write_all(&close)).await;
    }
    Ok(status)
}

/// The final status of the upstream's answer, as a connection's upgrade reads
/// it (`ResponseReader`: interim answers skipped within the head's bound; a
/// 101 must answer `key` and say `Connection: upgrade`; a refusal's framing
/// must be one loopwatch reads). No body is kept: the head is the answer.
async fn read_status<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    key: &str,
) -> Result<u16, String> {
    let mut reader = ResponseReader::new(MAX_HEAD, 0).expecting_accept(accept_key(key.as_bytes()));
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("upstream read: {e}"))?;
        if n == 0 {
            return Err("the upstream closed before its answer".to_owned());
        }
        match reader.feed(&chunk[..n]).map_err(|e| e.to_string())? {
            Answer::Partial => {}
            Answer::Upgrade { .. } => return Ok(101),
            Answer::Refused(refusal) => return Ok(refusal.status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An upstream that reads one request head and answers `answer(key)`.
    async fn upstream(answer: fn(&str) -> Vec<u8>) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap_or_default()
                .to_owned();
            s.write_all(&answer(&key)).await.unwrap();
            let mut rest = Vec::new();
            let _ = timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
            [head, rest].concat()
        });
        (port, task)
    }

    async fn probe_at(port: u16, target: &str) -> ProbeResult {
        let routes = [Route::loopback(port, false)];
        probe(
            &routes,
            None,
            target.as_bytes(),
            Some(b"Bearer t"),
            Duration::from_secs(2),
        )
        .await
    }

    fn switching(key: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(key.as_bytes())
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn an_upgrade_is_answered_101_and_closed_at_once() {
        let (port, seen) = upstream(switching).await;
        assert_eq!(probe_at(port, "/ws?x=1").await, ProbeResult::Answered(101));
        let seen = seen.await.unwrap();
        let text = String::from_utf8_lossy(&seen);
        assert!(text.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nAuthorization: Bearer t\r\n"), "{text}");
        assert!(
            text.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{text}"
        );
        let head_len = text.find("\r\n\r\n").unwrap() + 4;
        assert_eq!(seen[head_len], 0x88, "then a close frame");
    }

    #[tokio::test]
    async fn a_refusal_is_its_status_after_interim_answers() {
        let (port, _) = upstream(|_| {
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec()
        })
        .await;
        assert_eq!(probe_at(port, "/").await, ProbeResult::Answered(401));
    }

    #[tokio::test]
    async fn interim_answers_without_end_are_no_answer() {
        let (port, _) = upstream(|_| b"HTTP/1.1 100 Continue\r\n\r\n".repeat(2000)).await;
        let ProbeResult::Failed(why) = probe_at(port, "/").await else {
            panic!("endless 1xx passed");
        };
        assert!(why.contains("too large"), "{why}");
    }

    #[tokio::test]
    async fn a_101_that_does_not_answer_the_key_is_no_upgrade() {
        let (port, _) = upstream(|_| switching("c29tZSBvdGhlciBrZXkhIQ==")).await;
        let ProbeResult::Failed(why) = probe_at(port, "/").await else {
            panic!("a wrong accept passed");
        };
        assert!(why.contains("Sec-WebSocket-Accept"), "{why}");
    }

    #[tokio::test]
    async fn no_answer_and_no_upstream_say_why() {
        let (port, _) = upstream(|_| Vec::new()).await;
        let ProbeResult::Failed(why) = probe_at(port, "/").await else {
            panic!("a silent upstream passed");
        };
        assert!(
            why.contains("closed before its answer") || why.contains("within"),
            "{why}"
        );
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let ProbeResult::Failed(why) = probe_at(port, "/").await else {
            panic!("a closed port passed");
        };
        assert!(why.starts_with("upstream unreachable"), "{why}");
    }
}
