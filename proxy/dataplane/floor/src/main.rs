//! The floor under the data plane's CPU figures (issue 16, `make bench`): the
//! least a tokio proxy can do per WebSocket connection, measured in the same
//! run as loopwatch, nginx and HAProxy (tests/benchmarks, the `tokio-floor`
//! column). Not a proxy anyone should run: it is what the Python data plane's
//! floor (a lean uvloop echo) was for Python, the cost no Rust data plane on
//! this runtime can go under.
//!
//! The same runtime as the data plane (`py/src/listener.rs`: multi-thread,
//! `--threads` workers, everything enabled, the same backlog and TCP_NODELAY).
//! Per connection it reads the request head up to its blank line, then either
//!
//! * proxies: connects to `--upstream`, writes the head as it came and splices
//!   both ways with `tokio::io::copy_bidirectional` (no parsing, no rewritten
//!   headers, no frame watching, no events, no table, no timeouts), or
//! * refuses (`--refuse http-429`): writes a fixed HTTP 429 and closes, or
//!   (`--refuse close-1013`) answers 101 with the key's accept and a close frame
//!   1013, shuts its writing half, reads the client's reply once and closes (the
//!   data plane's close-1013 refusal, with the core's `accept_key` and
//!   `build_close_frame`).
//!
//! It prints `{"proxy": "127.0.0.1:PORT"}` once listening and runs until killed.

use std::io::{self, Write};
use std::net::SocketAddr;

use tokio::io::{copy_bidirectional, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use loopwatch_dataplane_core::frames::build_close_frame;
use loopwatch_dataplane_core::head::accept_key;

/// The data plane's listen backlog (py/src/listener.rs).
const BACKLOG: u32 = 1024;
/// A head longer than this is dropped (the data plane answers 431 sooner).
const HEAD_MAX: usize = 16 * 1024;
const REFUSAL: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const UPGRADED: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Proxy(SocketAddr),
    Refuse,
    Close1013,
}

struct Args {
    mode: Mode,
    threads: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut upstream, mut refuse, mut threads) = (None, None, 1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--upstream" => {
                let value = args.next().ok_or("--upstream needs HOST:PORT")?;
                let addr = value
                    .parse()
                    .map_err(|e| format!("--upstream {value}: {e}"))?;
                upstream = Some(addr);
            }
            "--refuse" => {
                refuse = match args.next().as_deref() {
                    Some("http-429") => Some(Mode::Refuse),
                    Some("close-1013") => Some(Mode::Close1013),
                    _ => return Err("--refuse needs http-429 or close-1013".into()),
                }
            }
            "--threads" => {
                let value = args.next().ok_or("--threads needs a number")?;
                threads = match value.parse() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(format!("--threads {value}: a whole number from 1")),
                };
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mode = match (upstream, refuse) {
        (_, Some(mode)) => mode,
        (Some(addr), None) => Mode::Proxy(addr),
        (None, None) => return Err("--upstream HOST:PORT or --refuse HOW".into()),
    };
    Ok(Args { mode, threads })
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("loopwatch-floor: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .thread_name("loopwatch-floor")
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(serve(args.mode)) {
        eprintln!("loopwatch-floor: {e}");
        std::process::exit(1);
    }
}

async fn serve(mode: Mode) -> io::Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], 0).into())?;
    let listener: TcpListener = socket.listen(BACKLOG)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{{\"proxy\": \"{}\"}}", listener.local_addr()?)?;
    out.flush()?;
    drop(out);
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors for a moment: wait as the data plane does (ACCEPT_BACKOFF).
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(connection(client, mode));
    }
}

async fn connection(mut client: TcpStream, mode: Mode) {
    let _ = client.set_nodelay(true);
    let Ok(Some(head)) = read_head(&mut client).await else {
        return;
    };
    match mode {
        Mode::Refuse => {
            let _ = client.write_all(REFUSAL).await;
            let _ = client.shutdown().await;
        }
        Mode::Close1013 => {
            let Some(key) = header(&head, b"sec-websocket-key") else {
                return;
            };
            let mut answer = UPGRADED.to_vec();
            answer.extend_from_slice(accept_key(key).as_bytes());
            answer.extend_from_slice(b"\r\n\r\n");
            answer.extend(build_close_frame(1013, "floor", None).expect("a valid close"));
            if client.write_all(&answer).await.is_ok() && client.shutdown().await.is_ok() {
                let mut reply = [0u8; 512];
                let _ = client.read(&mut reply).await; // its close frame, or its EOF
            }
        }
        Mode::Proxy(addr) => {
            let Ok(mut upstream) = TcpStream::connect(addr).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            if upstream.write_all(&head).await.is_ok() {
                drop(head);
                let _ = copy_bidirectional(&mut client, &mut upstream).await;
            }
        }
    }
}

/// The value of the header `name` (lower case) in a head, spaces trimmed.
fn header<'h>(head: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// The request head and whatever came after it in the same reads; None when the
/// client closed first or the head is longer than `HEAD_MAX`.
async fn read_head(client: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let searched = buf.len().saturating_sub(3);
        if client.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        if buf[searched..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf));
        }
        if buf.len() > HEAD_MAX {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Args, String> {
        parse_args(line.split_whitespace().map(String::from))
    }

    #[test]
    fn arguments() {
        let a = args("--upstream 127.0.0.1:9 --threads 2").unwrap();
        assert!(matches!(a.mode, Mode::Proxy(addr) if addr.port() == 9));
        assert_eq!(a.threads, 2);
        assert!(matches!(
            args("--refuse http-429").unwrap().mode,
            Mode::Refuse
        ));
        assert!(matches!(
            args("--refuse close-1013").unwrap().mode,
            Mode::Close1013
        ));
        assert_eq!(args("--refuse http-429").unwrap().threads, 1);
        for bad in [
            "",
            "--threads 0 --refuse http-429",
            "--refuse",
            "--refuse 503",
            "--upstream nowhere",
            "--upstream",
            "--what",
        ] {
            assert!(args(bad).is_err(), "{bad:?} accepted");
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_head_split_across_reads_ends_at_its_blank_line() {
        let (mut client, mut server) = pair().await;
        let writer = tokio::spawn(async move {
            for part in [&b"GET / HTTP/1.1\r\nHost: x\r"[..], b"\n\r", b"\nearly"] {
                client.write_all(part).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            client
        });
        let head = read_head(&mut server).await.unwrap().unwrap();
        assert!(head.starts_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_client_gone_or_a_head_too_long_is_none() {
        let (client, mut server) = pair().await;
        drop(client);
        assert!(read_head(&mut server).await.unwrap().is_none());
        let (mut client, mut server) = pair().await;
        let endless = tokio::spawn(async move {
            let line = [b'a'; 1024];
            while client.write_all(&line).await.is_ok() {}
        });
        assert!(read_head(&mut server).await.unwrap().is_none());
        drop(server);
        endless.await.unwrap();
    }

    #[tokio::test]
    async fn refuses_and_proxies() {
        // An upstream that answers 101 at once, then echoes until the proxy closes.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                .await
                .unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let head = b"GET /x HTTP/1.1\r\n\r\n";

        let (mut client, server) = pair().await;
        let served = tokio::spawn(connection(server, Mode::Refuse));
        client.write_all(head).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, REFUSAL);
        served.await.unwrap();

        // RFC 6455's example key and accept; the close frame: 1013, "floor".
        let (mut client, server) = pair().await;
        let served = tokio::spawn(connection(server, Mode::Close1013));
        client
            .write_all(b"GET / HTTP/1.1\r\nsec-WebSocket-KEY:  dGhlIHNhbXBsZSBub25jZQ== \r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let expect = [
            UPGRADED,
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            b"\x88\x07\x03\xf5floor",
        ]
        .concat();
        assert_eq!(got, expect);
        client.write_all(b"\x88\x80\0\0\0\0").await.unwrap();
        served.await.unwrap();

        let (mut client, server) = pair().await;
        let served = tokio::spawn(connection(server, Mode::Proxy(upstream_addr)));
        client.write_all(head).await.unwrap();
        let expect = [&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..], head].concat();
        let mut got = vec![0u8; expect.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expect);
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        client.shutdown().await.unwrap();
        got = [0u8; 4];
        assert_eq!(client.read(&mut got).await.unwrap(), 0);
        served.await.unwrap();
    }
}
