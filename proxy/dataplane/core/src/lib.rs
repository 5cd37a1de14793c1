//! The pure core of loopwatch's compiled data plane (issue 16).
//!
//! Everything here is sans-I/O over byte slices and values: no sockets, no
//! runtime, no Python. The parts the PyO3 face and the tokio data plane are
//! built on, each tested on its own and against the answers recorded from the
//! asyncio data plane it replaced (the frozen vectors in `tests/vectors/`):
//!
//! * [`head`]: a client's request head, parsed with llhttp's strict grammar
//!   plus loopwatch's own checks, answered with a typed rejection when it is
//!   bad.
//! * [`frames`]: the incremental RFC 6455 frame-header watcher of the splice
//!   relay, which never copies or unmasks payload, and the close frames
//!   loopwatch writes itself.
//! * [`table`]: the enforcement table the brain writes and the data plane reads
//!   at admission, lock-free.
//! * [`body`]: a plain request's chunked body, decoded as strictly as llhttp,
//!   and the chunk framing loopwatch writes.
//! * [`identity`]: the client's key and address from its request head
//!   (identity sources, trusted X-Forwarded-For, binding, JWT verification).
//! * [`events`]: the connection events the data plane emits and the bounded
//!   queue that carries them to the brain without ever blocking traffic.
//! * [`trace`]: W3C Trace Context: the client's `traceparent`, the sampling
//!   decision, the connection span's ids and the `traceparent` sent upstream.

pub mod body;
pub mod events;
pub mod frames;
pub mod head;
pub mod identity;
pub mod table;
pub mod trace;
