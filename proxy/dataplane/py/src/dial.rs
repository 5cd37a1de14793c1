//! Reaching an upstream host by name: resolve it, then race its addresses
//! the way RFC 8305 ("Happy Eyeballs") does, so that one address that drops
//! packets (an IPv6 route that goes nowhere, a dead replica left in DNS)
//! costs a connection a quarter of a second instead of its whole
//! `limits.connect_timeout`.
//!
//! The addresses are tried in the resolver's order with the families
//! alternated (RFC 8305 §4); the next one starts when the one before it
//! fails, or [`ATTEMPT_DELAY`] after it started if it has not answered by
//! then. The first to connect wins and the others are dropped (their sockets
//! closed). A name with one address, and an address given as such, is one
//! plain connect: nothing is spawned. The caller's deadline bounds it all.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{lookup_host, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};

/// RFC 8305 §5's recommended "Connection Attempt Delay".
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connect to `host:port`: resolved at each call (as the data plane always
/// has: a DNS change applies to the next connection), its addresses raced.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = lookup_host((host, port)).await?.collect();
    race(addrs, ATTEMPT_DELAY).await
}

/// Connect to the first of `addrs` that answers, starting one attempt every
/// `delay` (or at once after a failure), families alternated. The error is
/// the last attempt's when all fail.
pub async fn race(addrs: Vec<SocketAddr>, delay: Duration) -> io::Result<TcpStream> {
    let mut queue = alternate_families(addrs).into_iter();
    let first = queue.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "could not resolve to any address",
        )
    })?;
    if queue.len() == 0 {
        return TcpStream::connect(first).await;
    }
    // Dropped on return: the attempts still running are aborted.
    let mut attempts = JoinSet::new();
    attempts.spawn(TcpStream::connect(first));
    let next_start = sleep(delay);
    tokio::pin!(next_start);
    loop {
        tokio::select! {
            done = attempts.join_next(), if !attempts.is_empty() => {
                let error = match done.expect("a running attempt") {
                    Ok(Ok(stream)) => return Ok(stream),
                    Ok(Err(e)) => e,
                    Err(e) => io::Error::other(e),
                };
                // A failure starts the next address at once.
                if let Some(addr) = queue.next() {
                    attempts.spawn(TcpStream::connect(addr));
                    next_start.as_mut().reset(Instant::now() + delay);
                } else if attempts.is_empty() {
                    return Err(error);
                }
            }
            () = &mut next_start, if queue.len() > 0 => {
                if let Some(addr) = queue.next() {
                    attempts.spawn(TcpStream::connect(addr));
                }
                next_start.as_mut().reset(Instant::now() + delay);
            }
        }
    }
}

/// The resolver's order with the two families taking turns, the first
/// address's family first (RFC 8305 §4).
fn alternate_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_v6 = first.is_ipv6();
    let (preferred, other): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.iter().partition(|addr| addr.is_ipv6() == first_v6);
    let mut preferred = preferred.into_iter();
    let mut other = other.into_iter();
    let mut order = Vec::with_capacity(addrs.len());
    loop {
        match (preferred.next(), other.next()) {
            (None, None) => return order,
            (a, b) => order.extend(a.into_iter().chain(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener as StdListener;
    use tokio::net::TcpListener;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_take_turns_the_first_ones_first() {
        let order = alternate_families(vec![
            addr("[::1]:1"),
            addr("[::2]:1"),
            addr("[::3]:1"),
            addr("10.0.0.1:1"),
            addr("10.0.0.2:1"),
        ]);
        assert_eq!(
            order,
            vec![
                addr("[::1]:1"),
                addr("10.0.0.1:1"),
                addr("[::2]:1"),
                addr("10.0.0.2:1"),
                addr("[::3]:1"),
            ]
        );
        let v4_first = alternate_families(vec![addr("10.0.0.1:1"), addr("[::1]:1")]);
        assert_eq!(v4_first, vec![addr("10.0.0.1:1"), addr("[::1]:1")]);
        assert!(alternate_families(Vec::new()).is_empty());
    }

    /// A listener whose accept queue is full: the kernel drops the SYNs that
    /// follow (a listen overflow), so a connect to it hangs, as to an address
    /// that drops packets. Returned with the connection that fills it.
    fn black_hole() -> (StdListener, std::net::TcpStream, SocketAddr) {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&addr("127.0.0.1:0").into()).unwrap();
        socket.listen(0).unwrap();
        let listener: StdListener = socket.into();
        let at = listener.local_addr().unwrap();
        let filler = std::net::TcpStream::connect(at).unwrap();
        (listener, filler, at)
    }

    #[tokio::test]
    async fn an_address_that_drops_packets_costs_the_attempt_delay_not_the_connect() {
        let (_hole, _filler, hole) = black_hole();
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_at = good.local_addr().unwrap();
        // Without the race this waits for the black hole's SYN retries (a
        // second and more) and the deadline below fails it.
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            race(vec![hole, good_at], Duration::from_millis(50)),
        )
        .await
        .expect("the second address was tried while the first hung")
        .expect("connected");
        assert_eq!(stream.peer_addr().unwrap(), good_at);
        let (accepted, _) = good.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_refused_address_starts_the_next_at_once() {
        let refused = {
            let closed = StdListener::bind("127.0.0.1:0").unwrap();
            closed.local_addr().unwrap()
        }; // closed: connects to it are refused
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_at = good.local_addr().unwrap();
        // A delay longer than the test's deadline: only the failure can start
        // the second attempt in time.
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            race(vec![refused, good_at], Duration::from_secs(60)),
        )
        .await
        .expect("started at the refusal")
        .expect("connected");
        assert_eq!(stream.peer_addr().unwrap(), good_at);
    }

    #[tokio::test]
    async fn when_every_address_fails_the_last_error_is_returned() {
        let refused: Vec<SocketAddr> = (0..3)
            .map(|_| {
                StdListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let error = race(refused, Duration::from_millis(10))
            .await
            .expect_err("all refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        let error = race(Vec::new(), ATTEMPT_DELAY).await.expect_err("none");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_connected() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = good.local_addr().unwrap().port();
        let stream = connect("127.0.0.1", port).await.expect("an address");
        assert_eq!(stream.peer_addr().unwrap(), good.local_addr().unwrap());
    }
}
