// A fake clock and a fake WebSocket, for the companion's own tests and for an
// app's: drive time and the server's answers by hand, with no network and no
// real timers.

/**
 * The longest delay a real timer keeps: node and every browser store it in a
 * 32-bit signed integer, and fire a longer one at once.
 */
export const TIMER_LIMIT = 2 ** 31 - 1;

/**
 * Timers that fire only when the test advances time. Like real timers, a
 * delay above TIMER_LIMIT (about 24.8 days) fires at once: node uses 1 ms
 * (and prints a TimeoutOverflowWarning), browsers wrap it. Each such delay is
 * counted in `overflows`.
 */
export class FakeClock {
  /** @param {number} [start=0] ms */
  constructor(start = 0) {
    this.time = start;
    this.sequence = 0;
    this.overflows = 0;
    /** @type {Map<number, {at: number, fn: () => void}>} */
    this.timers = new Map();
    this.now = () => this.time;
    /** @param {() => void} fn @param {number} ms */
    this.setTimeout = (fn, ms) => {
      let delay = Math.max(0, Number(ms) || 0);
      if (delay > TIMER_LIMIT) {
        this.overflows += 1;
        delay = 1; // node's TimeoutOverflowWarning: "Timeout duration was set to 1."
      }
      this.sequence += 1;
      this.timers.set(this.sequence, { at: this.time + delay, fn });
      return this.sequence;
    };
    /** @param {unknown} handle */
    this.clearTimeout = (handle) => {
      this.timers.delete(/** @type {number} */ (handle));
    };
  }

  /** Timers not yet fired. */
  get pending() {
    return this.timers.size;
  }

  /** When the next timer fires, or null. */
  nextAt() {
    let next = null;
    for (const { at } of this.timers.values()) if (next === null || at < next) next = at;
    return next;
  }

  /**
   * Move time forward by `ms`, firing every timer that comes due, in order
   * (by time, then by creation), each at its own time.
   * @param {number} ms
   */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let id = null;
      let due = null;
      for (const [key, timer] of this.timers) {
        if (timer.at <= end && (due === null || timer.at < due.at)) {
          id = key;
          due = timer;
        }
      }
      if (due === null) break;
      this.timers.delete(/** @type {number} */ (id));
      this.time = Math.max(this.time, due.at);
      due.fn();
    }
    this.time = end;
  }
}

/** Let promise callbacks (an async token hook) run. */
export async function flush() {
  for (let i = 0; i < 10; i++) await Promise.resolve();
}

/**
 * A WebSocket class whose instances the test drives: `accept()`, `receive()`,
 * `serverClose()`, `refuse()`, `fail()`. Every instance is kept in `sockets`.
 */
export function fakeWebSocket() {
  /** @type {FakeSocket[]} */
  const sockets = [];

  class FakeSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;

    /** @param {string} url @param {string | string[]} [protocols] */
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = FakeSocket.CONNECTING;
      /** @type {unknown[]} */
      this.sent = [];
      /** @type {{code: number | undefined, reason: string | undefined} | null} */
      this.closedByClient = null;
      /** @type {((event: any) => void) | null} */
      this.onopen = null;
      /** @type {((event: any) => void) | null} */
      this.onmessage = null;
      /** @type {((event: any) => void) | null} */
      this.onerror = null;
      /** @type {((event: any) => void) | null} */
      this.onclose = null;
      sockets.push(this);
    }

    /** @param {unknown} data */
    send(data) {
      if (this.readyState !== FakeSocket.OPEN) throw new Error("InvalidStateError: not open");
      this.sent.push(data);
    }

    /** @param {number} [code] @param {string} [reason] */
    close(code, reason) {
      this.closedByClient = { code, reason };
      if (this.readyState < FakeSocket.CLOSING) this.readyState = FakeSocket.CLOSING;
    }

    // --- the server's side ---

    accept() {
      this.readyState = FakeSocket.OPEN;
      this.onopen?.({ type: "open" });
    }

    /** @param {unknown} data */
    receive(data) {
      this.onmessage?.({ type: "message", data });
    }

    /** @param {number} code @param {string} [reason] @param {boolean} [wasClean] */
    serverClose(code, reason = "", wasClean = true) {
      this.readyState = FakeSocket.CLOSED;
      this.onclose?.({ type: "close", code, reason, wasClean });
    }

    /** loopwatch's close-1013 refusal: a 101, then the close with the reason. */
    refuse(retrySecs, phrase = "cooldown") {
      this.accept();
      this.serverClose(1013, `loopwatch: ${phrase}, retry in ${retrySecs}s`);
    }

    /** A refused handshake or a network failure, as a browser reports it. */
    fail() {
      this.readyState = FakeSocket.CLOSED;
      this.onerror?.({ type: "error" });
      this.onclose?.({ type: "close", code: 1006, reason: "", wasClean: false });
    }
  }

  return { WebSocket: FakeSocket, sockets };
}
