//! The byte streams of both legs, plain TCP or TLS, behind one trait
//! (`Transport`), so that the connection's phases (`conn`) and the splice
//! (`relay`) are one code path for all four combinations; and
//! [`connect_upstream`], the one way to open an upstream connection (its
//! addresses raced by `dial`).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use loopwatch_dataplane_core::events::HandshakeError;

use crate::tls::UpstreamTls;
use crate::wire::Route;

thread_local! {
    /// Each runtime thread's read buffer (`with_scratch`), zeroed once at its
    /// first use, so that reads need neither `unsafe` nor zeroing, and a
    /// connection holds only the bytes it got.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer, `len` bytes of it. Never held
/// across an await (the task may move to another thread): read into it and
/// keep what came, within one poll.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        f(&mut scratch[..len])
    })
}

/// One read of up to `max` bytes from `stream`, appended to `buf`; how many
/// (0: its EOF). Through the thread's scratch buffer, so `buf` grows by what
/// came and no more: a connection waiting for the rest of its head (a few
/// hundred bytes) does not hold a read's room of its own (`HEAD_READ`, 4 KiB,
/// reserved per read before: 11.7 KB of RSS per connection waiting for its
/// head then, 3.7 KB since; `tests/benchmarks/bench_heads.py`).
pub async fn read_appending<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        with_scratch(max, |scratch| {
            let mut room = ReadBuf::new(scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut room) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(room.filled());
                    Poll::Ready(Ok(room.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// A leg's byte stream: a TCP connection, or TLS over one.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP connection under it (its linger, for a reset).
    fn tcp(&self) -> &TcpStream;

    /// Whether its writing half can be shut alone while it is still read (a
    /// TCP FIN). TLS cannot (a TLS stream has no half-close): where a FIN
    /// would be passed on, both close.
    fn can_write_eof(&self) -> bool;

    /// Whether closing it writes something first (TLS: close_notify): then
    /// it is shut down before it is dropped. Dropping a TCP stream closes it.
    fn shuts_down_on_close(&self) -> bool;
}

/// A boxed stream (the TLS ones, so that a connection's future is as small
/// for plain streams as it was before TLS: their state is over 1 KiB each).
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }

    fn can_write_eof(&self) -> bool {
        (**self).can_write_eof()
    }

    fn shuts_down_on_close(&self) -> bool {
        (**self).shuts_down_on_close()
    }
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn can_write_eof(&self) -> bool {
        true
    }

    fn shuts_down_on_close(&self) -> bool {
        false
    }
}

/// TLS over TCP, either side: no half-close, close_notify on close.
macro_rules! tls_transport {
    ($($stream:ty),+) => {$(
        impl Transport for $stream {
            fn tcp(&self) -> &TcpStream {
                self.get_ref().0
            }

            fn can_write_eof(&self) -> bool {
                false
            }

            fn shuts_down_on_close(&self) -> bool {
                true
            }
        }
    )+};
}

tls_transport!(
    tokio_rustls::server::TlsStream<TcpStream>,
    tokio_rustls::client::TlsStream<TcpStream>
);

/// An upstream connection as [`connect_upstream`] opens it: plain for
/// `ws://` and `http://` routes, TLS for `wss://` and `https://` (boxed: a
/// rustls connection is over 1 KiB, a TcpStream 40 bytes).
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why [`connect_upstream`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// TCP and TLS together took longer than `connect_timeout`.
    Timeout,
    /// The TCP connection failed (refused, unreachable, no such host).
    Unreachable(io::Error),
    /// The TLS handshake failed (verification, protocol), or the route's
    /// upstream name cannot be a TLS server name.
    Tls(String),
    /// No socket for it: the process (or the system) is out of open files.
    FdLimit(io::Error),
}

/// The answer's line when loopwatch is out of open files.
pub const FD_LIMIT: &str = "loopwatch: out of file descriptors";

/// EMFILE or ENFILE: the process's or the system's open-file limit.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl ConnectError {
    /// The status loopwatch answers the client with.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::Timeout => 504,
            ConnectError::Unreachable(_) | ConnectError::Tls(_) => 502,
            ConnectError::FdLimit(_) => 503,
        }
    }

    /// The answer's one line.
    pub fn message(&self) -> &'static str {
        match self {
            ConnectError::Timeout => "loopwatch: upstream connect timeout",
            ConnectError::Unreachable(_) => "loopwatch: upstream unreachable",
            ConnectError::Tls(_) => "loopwatch: upstream TLS handshake failed",
            ConnectError::FdLimit(_) => FD_LIMIT,
        }
    }

    /// What the operator's log line says beyond the error's kind: rustls'
    /// reason, the OS error (`HandshakeFailed.detail`).
    pub fn detail(&self) -> Option<Box<str>> {
        match self {
            ConnectError::Timeout => None,
            ConnectError::Unreachable(e) | ConnectError::FdLimit(e) => Some(e.to_string().into()),
            ConnectError::Tls(why) => Some(why.as_str().into()),
        }
    }

    /// The HandshakeFailed event's error.
    pub fn handshake_error(&self) -> HandshakeError {
        match self {
            ConnectError::Timeout => HandshakeError::Timeout,
            ConnectError::Unreachable(_) => HandshakeError::Connect,
            ConnectError::Tls(_) => HandshakeError::Tls,
            ConnectError::FdLimit(_) => HandshakeError::FdLimit,
        }
    }
}

/// Open a connection to `route`'s upstream: TCP (Nagle off), then TLS when
/// the route is `wss://` or `https://` (SNI and verification name:
/// `upstream_tls.server_name` or the URL's host), both within
/// `connect_timeout` (`limits.connect_timeout`: "TCP + TLS").
pub async fn connect_upstream(
    route: &Route,
    tls: Option<&UpstreamTls>,
    connect_timeout: Duration,
) -> Result<UpstreamStream, ConnectError> {
    timeout(connect_timeout, open_upstream(route, tls))
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

/// [`connect_upstream`] without its deadline, for a caller that bounds the
/// connect itself (`http::exchange`, whose connect timeout is also a phase's).
pub async fn open_upstream(
    route: &Route,
    tls: Option<&UpstreamTls>,
) -> Result<UpstreamStream, ConnectError> {
    let tls = match (route.tls, tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls),
        (true, None) => return Err(ConnectError::Tls("no upstream TLS settings".into())),
    };
    let tcp = crate::dial::connect(&route.host, route.port)
        .await
        .map_err(|e| {
            if out_of_descriptors(&e) {
                ConnectError::FdLimit(e)
            } else {
                ConnectError::Unreachable(e)
            }
        })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(UpstreamStream::Plain(tcp));
    };
    let name = tls.server_name(&route.host).map_err(ConnectError::Tls)?;
    // Boxed: the handshake's state (over 1 KiB) is not part of every
    // connection's future, plain ones included.
    let stream = Box::pin(tls.connector.connect(name, tcp))
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    Ok(UpstreamStream::Tls(Box::new(stream)))
}

impl From<ConnectError> for io::Error {
    fn from(failure: ConnectError) -> io::Error {
        match failure {
            ConnectError::Timeout => io::Error::from(io::ErrorKind::TimedOut),
            ConnectError::Unreachable(e) | ConnectError::FdLimit(e) => e,
            ConnectError::Tls(why) => io::Error::other(UpstreamTlsError(why)),
        }
    }
}

/// A failed TLS handshake with the upstream, inside the `io::Error` a plain
/// request's connect returns: told apart from an unreachable upstream
/// (`http::connect_failed`), with rustls' reason.
#[derive(Debug)]
pub struct UpstreamTlsError(pub String);

impl std::fmt::Display for UpstreamTlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for UpstreamTlsError {}

/// rustls' reason when an upstream stream's read (or write) failed for TLS:
/// an alert the upstream sent, a record that does not decrypt. tokio-rustls
/// returns those as an `io::Error` of kind `InvalidData` holding the
/// `rustls::Error`; None for anything else (a reset, an EOF).
///
/// Over TLS 1.3 the client's side of the handshake is done before the server
/// has checked it: a server that refuses loopwatch (no client certificate,
/// or one it does not trust) says so with an alert that arrives at the first
/// read after the connect, not in the connect.
pub fn tls_failure(e: &io::Error) -> Option<String> {
    if e.kind() != io::ErrorKind::InvalidData {
        return None;
    }
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(inner.to_string())
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Transport for UpstreamStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.tcp(),
        }
    }

    fn can_write_eof(&self) -> bool {
        matches!(self, UpstreamStream::Plain(_))
    }

    fn shuts_down_on_close(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_plain_route_connects_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let plain = Route::loopback(port, false);
        let connect = connect_upstream(&plain, None, Duration::from_secs(5));
        let (stream, accepted) = tokio::join!(connect, listener.accept());
        let mut stream = stream.expect("connected");
        assert!(matches!(stream, UpstreamStream::Plain(_)));
        assert!(stream.can_write_eof() && !stream.shuts_down_on_close());
        let (mut peer, _) = accepted.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let failure = connect_upstream(&Route::loopback(port, false), None, Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(matches!(failure, ConnectError::Unreachable(_)));
        assert_eq!(failure.status(), 502);
        assert_eq!(failure.handshake_error(), HandshakeError::Connect);
    }

    #[test]
    fn out_of_descriptors_is_the_proxys_own_503_not_the_upstreams_502() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            assert!(out_of_descriptors(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNREFUSED, libc::ENETUNREACH, libc::ENOBUFS] {
            assert!(!out_of_descriptors(&io::Error::from_raw_os_error(errno)));
        }
        let failure = ConnectError::FdLimit(io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(failure.status(), 503);
        assert_eq!(failure.message(), FD_LIMIT);
        assert_eq!(failure.handshake_error(), HandshakeError::FdLimit);
        assert_eq!(failure.handshake_error().as_str(), "fd_limit");
        // The plain HTTP path sees it as an io::Error: still recognisable.
        assert!(out_of_descriptors(&io::Error::from(failure)));
    }

    #[test]
    fn a_tls_error_is_told_from_a_closed_connection() {
        use rustls::AlertDescription;
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let read = io::Error::new(io::ErrorKind::InvalidData, alert);
        assert_eq!(
            tls_failure(&read).as_deref(),
            Some("received fatal alert: CertificateRequired")
        );
        assert_eq!(tls_failure(&io::ErrorKind::ConnectionReset.into()), None);
        assert_eq!(tls_failure(&io::ErrorKind::UnexpectedEof.into()), None);
        assert_eq!(
            tls_failure(&io::Error::new(io::ErrorKind::InvalidData, "not rustls")),
            None
        );
    }

    #[tokio::test]
    async fn tls_that_never_answers_is_a_connect_timeout() {
        // Accepted by the kernel's backlog, never answered: TCP succeeds, TLS
        // waits, and the one deadline covers both.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = crate::tls::UpstreamTls::new(false, None, None, None).unwrap();
        let failure = connect_upstream(
            &Route::loopback(port, true),
            Some(&tls),
            Duration::from_millis(200),
        )
        .await
        .err()
        .expect("timed out");
        assert!(matches!(failure, ConnectError::Timeout));
        assert_eq!(failure.status(), 504);
        assert_eq!(failure.handshake_error(), HandshakeError::Timeout);
    }

    #[tokio::test]
    async fn tls_to_a_peer_that_is_not_tls_is_a_tls_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let tls = crate::tls::UpstreamTls::new(false, None, None, None).unwrap();
        let failure = connect_upstream(
            &Route::loopback(port, true),
            Some(&tls),
            Duration::from_secs(5),
        )
        .await
        .err()
        .expect("not TLS");
        assert!(matches!(failure, ConnectError::Tls(_)), "{failure:?}");
        assert_eq!(failure.status(), 502);
        assert_eq!(failure.handshake_error(), HandshakeError::Tls);
        assert_eq!(
            failure.message(),
            "loopwatch: upstream TLS handshake failed"
        );
        // A TLS route without TLS settings cannot be reached either.
        let failure =
            connect_upstream(&Route::loopback(port, true), None, Duration::from_secs(5)).await;
        assert!(matches!(failure, Err(ConnectError::Tls(_))));
        peer.await.unwrap();
    }
}
