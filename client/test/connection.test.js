import assert from "node:assert/strict";
import test from "node:test";

import { pageRegistry, Registry, sharedConnection } from "../src/connection.js";
import { FakeClock, fakeWebSocket, flush, TIMER_LIMIT } from "../testing/fakes.js";

const URL_A = "ws://app.test/ws";
const URL_B = "ws://app.test/other";

/**
 * A registry on a fake clock and a fake WebSocket; `random` returns `r` (or
 * walks a list) so delays are exact.
 */
function setup({ r = 0.5, ...options } = {}) {
  const clock = new FakeClock(1_000_000);
  const { WebSocket, sockets } = fakeWebSocket();
  const registry = new Registry();
  const values = Array.isArray(r) ? [...r] : null;
  const random = () => (values ? values.shift() ?? 0.5 : r);
  const base = { WebSocket, clock, random, ...options };
  const connect = (url = URL_A, extra = {}) => registry.connect(url, { ...base, ...extra });
  return { clock, sockets, registry, connect };
}

/** Every event of a connection, in order, as [name, payload]. */
function record(conn) {
  const seen = [];
  for (const name of ["state", "attempt", "open", "close", "refused", "retry", "stable", "authfailed", "error"]) {
    conn.on(name, (payload) => seen.push([name, payload]));
  }
  return seen;
}

const last = (sockets) => sockets[sockets.length - 1];

const DAY = 86_400_000; // ms

/**
 * Run the clock `ms` forward timer by timer; every socket that starts
 * connecting is refused at once with `reason` (loopwatch with `hold: 0`).
 */
function refuseEveryAttempt(clock, sockets, ms, reason) {
  const end = clock.now() + ms;
  for (;;) {
    const socket = last(sockets);
    if (socket !== undefined && socket.readyState === 0) socket.serverClose(1013, reason);
    const next = clock.nextAt();
    if (next === null || next > end) break;
    clock.advance(next - clock.now());
  }
  clock.advance(end - clock.now());
}

test("two effects and a StrictMode remount share one socket", () => {
  const { clock, sockets, connect } = setup();
  const a = connect();
  const b = connect();
  // StrictMode: mount, unmount, mount again in the same task.
  const c = connect();
  c.release();
  const d = connect();
  clock.advance(0);
  assert.equal(sockets.length, 1);
  sockets[0].accept();
  assert.equal(a.state, "open");
  assert.equal(d.state, "open");
  assert.equal(sockets[0].closedByClient, null);
  // Messages reach every share; a send goes out once on the one socket.
  const got = [];
  a.on("message", (m) => got.push(["a", m]));
  b.on("message", (m) => got.push(["b", m]));
  sockets[0].receive("hello");
  assert.deepEqual(got, [["a", "hello"], ["b", "hello"]]);
  assert.equal(b.send("x"), true);
  assert.deepEqual(sockets[0].sent, ["x"]);
  clock.advance(60_000);
  assert.equal(sockets.length, 1);
});

test("another URL is another socket; the same URL spelled alike is the same", () => {
  const { clock, sockets, connect } = setup();
  connect(URL_A);
  connect(URL_B);
  connect("ws://APP.test/ws#fragment");
  clock.advance(0);
  assert.deepEqual(sockets.map((s) => s.url), [URL_A, URL_B]);
});

test("the last release closes the socket and a later share waits the min interval", () => {
  const { clock, sockets, connect, registry } = setup({ minInterval: 1000 });
  const a = connect();
  const b = connect();
  clock.advance(0);
  sockets[0].accept();
  a.release();
  clock.advance(0);
  assert.equal(sockets[0].closedByClient, null); // b still holds it
  b.release();
  b.release(); // idempotent
  clock.advance(0);
  assert.deepEqual(sockets[0].closedByClient, { code: 1000, reason: undefined });
  assert.equal(b.state, "closed");
  assert.equal(registry.managers.size, 0);
  // A new share right away does not open at once: the min interval holds across managers.
  const c = connect();
  clock.advance(999);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2);
  assert.equal(c.state, "connecting");
  assert.equal(a.send("late"), false);
});

test("an expired token: 4 attempts (3 auth retries), then auth-failed and silence", async () => {
  const tokens = [];
  const { clock, sockets, connect } = setup({
    r: 0.999,
    getToken: (request) => {
      tokens.push(request.refresh);
      return "expired-token";
    },
  });
  const conn = connect();
  const seen = record(conn);
  for (let i = 0; i < 10; i++) {
    clock.advance(clock.nextAt() === null ? 0 : clock.nextAt() - clock.now());
    await flush();
    const socket = last(sockets);
    if (socket.readyState === 0) {
      socket.accept(); // the backend accepts, reads the token, closes 1008 (the incident)
      socket.serverClose(1008, "token expired");
    }
    if (conn.state === "auth-failed") break;
  }
  assert.equal(sockets.length, 4);
  assert.equal(conn.state, "auth-failed");
  assert.deepEqual(tokens, [false, true, true, true]); // refreshed before each reconnect
  assert.ok(sockets.every((s) => new URL(s.url).searchParams.get("token") === "expired-token"));
  const failed = seen.filter(([name]) => name === "authfailed");
  assert.deepEqual(failed, [["authfailed", { authFailures: 4, code: 1008, reason: "token expired" }]]);
  // Terminal: nothing pending, nothing more however long we wait.
  assert.equal(clock.pending, 0);
  clock.advance(600_000);
  await flush();
  assert.equal(sockets.length, 4);
  // The waits between attempts backed off: the min interval plus the draw (r ≈ 1: the caps).
  const retries = seen.filter(([name]) => name === "retry").map(([, p]) => Math.round(p.delay));
  assert.deepEqual(retries, [1999, 2998, 4996]);
  // The app can start over (a new login); the min interval still holds.
  assert.equal(conn.retry(), true);
  assert.equal(conn.retry(), false);
  clock.advance(1000);
  await flush();
  assert.equal(sockets.length, 5);
});

test("a wait is the min interval plus the jitter draw, never under the min interval", () => {
  const { clock, sockets, connect } = setup({ r: 0, minInterval: 1500 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  for (let i = 0; i < 5; i++) {
    last(sockets).fail();
    const before = sockets.length;
    clock.advance(1499);
    assert.equal(sockets.length, before);
    clock.advance(1);
    assert.equal(sockets.length, before + 1);
  }
  assert.ok(seen.filter(([n]) => n === "retry").every(([, p]) => p.delay === 1500));
  // The draw is added, not clamped: half the first cap (1 s) lands half a second above the floor.
  const half = setup({ r: 0.5, minInterval: 1500 });
  const other = record(half.connect());
  half.clock.advance(0);
  for (let i = 0; i < 3; i++) {
    last(half.sockets).fail();
    half.clock.advance(half.clock.nextAt() - half.clock.now());
  }
  assert.deepEqual(other.filter(([n]) => n === "retry").map(([, p]) => p.delay), [2000, 2500, 3500]);
});

test("clients dropped together come back spread out, from the first retry (a drain)", () => {
  let seed = 42; // a seeded Park-Miller generator, shared by the fleet as Math.random would be
  const random = () => ((seed = (seed * 16807) % 2147483647) - 1) / 2147483646;
  const clock = new FakeClock(0);
  const { WebSocket, sockets } = fakeWebSocket();
  const first = [];
  for (let i = 0; i < 1000; i++) {
    const conn = new Registry().connect(URL_A, { WebSocket, clock, random }); // 1000 pages
    conn.on("retry", ({ attempt, delay }) => attempt === 2 && first.push(delay));
  }
  clock.advance(0);
  for (const socket of sockets) socket.accept();
  clock.advance(60_000); // stable
  for (const socket of sockets.splice(0)) socket.serverClose(1001, "loopwatch: shutting down");
  assert.equal(first.length, 1000);
  assert.ok(first.every((d) => d >= 1000 && d < 2000), "minInterval + U·initial");
  // Before: max(U·1000, 1000) = 1000 ms for every one of them.
  assert.ok(new Set(first).size > 900, `${new Set(first).size} distinct delays`);
  assert.ok(Math.max(...first) - Math.min(...first) >= 900, `spread ${Math.max(...first) - Math.min(...first)} ms`);
  // At most a tenth of the fleet in any 100 ms of that second (uniform: about 100 each).
  const buckets = new Array(10).fill(0);
  for (const d of first) buckets[Math.floor((d - 1000) / 100)] += 1;
  assert.ok(Math.max(...buckets) < 150, `${buckets}`);
});

test("failures back off exponentially with full jitter, up to the max", () => {
  const draws = [0.999, 0.25, 0.999, 0.5, 0.999, 0.999, 0.999, 0.999];
  const { clock, sockets, connect } = setup({ r: draws, minInterval: 0 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  for (let i = 0; i < draws.length; i++) {
    last(sockets).fail();
    clock.advance(clock.nextAt() - clock.now());
  }
  const delays = seen.filter(([n]) => n === "retry").map(([, p]) => Math.round(p.delay));
  assert.deepEqual(delays, [999, 500, 3996, 4000, 15984, 29970, 29970, 29970]);
  assert.ok(seen.filter(([n]) => n === "retry").every(([, p]) => p.cause === "abnormal"));
});

test("loopwatch's retry time is honoured, and a refusal is not an auth failure", async () => {
  const { clock, sockets, connect } = setup({ r: 0.5, retrySpread: 1000 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  last(sockets).refuse(7);
  const refused = seen.filter(([n]) => n === "refused");
  assert.deepEqual(refused, [["refused", { reason: "cooldown", phrase: "cooldown", retryAfter: 7, code: 1013 }]]);
  clock.advance(7499);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2); // 7 s + half the spread
  // auth, refused, auth, refused, auth: three auth failures are within the 3 retries.
  for (const answer of ["auth", "refuse", "auth", "refuse", "auth"]) {
    const socket = last(sockets);
    if (answer === "auth") {
      socket.accept();
      socket.serverClose(1008, "token expired");
    } else {
      socket.refuse(2, "too soon after the last attempt");
    }
    clock.advance(clock.nextAt() - clock.now());
    await flush();
  }
  assert.notEqual(conn.state, "auth-failed");
  last(sockets).accept();
  last(sockets).serverClose(4001, "");
  assert.equal(conn.state, "auth-failed"); // the fourth auth failure
});

test("the backoff starts over only after the socket stayed open stableAfter", () => {
  const { clock, sockets, connect } = setup({ r: 0.999, minInterval: 0, stableAfter: 10_000 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  const cycle = (openFor) => {
    const socket = last(sockets);
    socket.accept();
    clock.advance(openFor);
    socket.serverClose(1011, "internal error");
    clock.advance(clock.nextAt() - clock.now());
  };
  cycle(100); // opened, but not for long: counts as a failure
  cycle(9_999);
  cycle(0);
  const delays = () => seen.filter(([n]) => n === "retry").map(([, p]) => Math.round(p.delay));
  assert.deepEqual(delays(), [999, 1998, 3996]);
  // A refusal opens too (101, then close 1013): it must not reset the backoff.
  assert.equal(seen.filter(([n]) => n === "stable").length, 0);
  cycle(10_000); // stable: the backoff starts over
  assert.deepEqual(seen.filter(([n]) => n === "stable"), [["stable", { openFor: 10_000 }]]);
  assert.deepEqual(delays().slice(-1), [999]);
  assert.equal(conn.stats.failures, 1);
});

test("1012 waits a randomised 5-30 s; 1013 without a retry time waits at least 5 s", () => {
  const { clock, sockets, connect } = setup({ r: 0, minInterval: 0 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  last(sockets).accept();
  last(sockets).serverClose(1012, "restarting");
  clock.advance(clock.nextAt() - clock.now());
  last(sockets).accept();
  last(sockets).serverClose(1013, "overloaded");
  clock.advance(clock.nextAt() - clock.now());
  last(sockets).accept();
  last(sockets).serverClose(1014, "loopwatch: upstream connection lost");
  const retries = seen.filter(([n]) => n === "retry").map(([, p]) => [p.cause, p.delay]);
  assert.deepEqual(retries, [["restart", 5000], ["overload", 5000], ["gateway", 0]]);
  const high = setup({ r: 0.999999, minInterval: 0 });
  const other = high.connect();
  const log = record(other);
  high.clock.advance(0);
  last(high.sockets).serverClose(1012);
  assert.ok(Math.abs(log.find(([n]) => n === "retry")[1].delay - 30000) < 1);
});

test("loopwatch's close-oldest 1008 does not count as an auth failure", () => {
  const { clock, sockets, connect } = setup({ maxAuthRetries: 0 });
  const conn = connect();
  clock.advance(0);
  last(sockets).accept();
  last(sockets).serverClose(1008, "loopwatch: more than 1 connections");
  assert.equal(conn.state, "waiting");
  assert.equal(conn.stats.authFailures, 0);
  clock.advance(clock.nextAt() - clock.now());
  last(sockets).accept();
  last(sockets).serverClose(1008, "token expired");
  assert.equal(conn.state, "auth-failed"); // maxAuthRetries 0: the first real one is final
});

test("the fake clock fires a delay beyond 2^31-1 ms at once, as node and browsers do", () => {
  const clock = new FakeClock(0);
  const fired = [];
  clock.setTimeout(() => fired.push("limit"), TIMER_LIMIT);
  clock.setTimeout(() => fired.push("30 days"), 30 * DAY);
  assert.equal(clock.overflows, 1);
  clock.advance(1);
  assert.deepEqual(fired, ["30 days"]); // node: "Timeout duration was set to 1."
  clock.advance(TIMER_LIMIT - 2);
  assert.deepEqual(fired, ["30 days"]);
  clock.advance(1);
  assert.deepEqual(fired, ["30 days", "limit"]);
});

test("a 30-day retry time (a deny) is waited in full, not fired at once: no hot loop", () => {
  const { clock, sockets, connect } = setup({ r: 0.5, retrySpread: 1000 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  // Every attempt refused at once with "denied, retry in 2592000s" for 3 s:
  // before the fix the client made an attempt every ms (874 in 3 s in node).
  refuseEveryAttempt(clock, sockets, 3_000, "loopwatch: denied, retry in 2592000s");
  assert.equal(sockets.length, 1);
  assert.equal(conn.state, "waiting");
  const refused = seen.filter(([n]) => n === "refused");
  assert.deepEqual(refused, [["refused", { reason: "deny", phrase: "denied", retryAfter: 2_592_000, code: 1013 }]]);
  assert.deepEqual(seen.find(([n]) => n === "retry")[1], { attempt: 2, delay: 2_592_000_500, cause: "refused" });
  clock.advance(2_592_000_500 - 3_000 - 1);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2); // 30 days + half the spread, to the ms
  assert.equal(clock.overflows, 0); // no timer was ever armed beyond the 32-bit limit
});

test("the longest retry time (31622400 s, 366 days): no second attempt before it", () => {
  const { clock, sockets, connect } = setup({ r: 0, retrySpread: 1000 });
  const conn = connect();
  clock.advance(0);
  last(sockets).refuse(31_622_400, "cooldown");
  for (let day = 1; day <= 366; day++) {
    clock.advance(day === 366 ? DAY - 1 : DAY); // the last step stops 1 ms short
    assert.equal(sockets.length, 1, `a second attempt ${day} days into a 366-day retry time`);
    assert.equal(conn.state, "waiting");
  }
  clock.advance(1);
  assert.equal(sockets.length, 2);
  assert.equal(conn.state, "connecting");
  assert.equal(clock.overflows, 0);
});

test("a backend's close that looks like a refusal is no retry time; a real one is capped at 366 days", () => {
  const { clock, sockets, connect } = setup({ r: 0.5, retrySpread: 1000, minInterval: 1000 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  // The backend closes 1000 with loopwatch's words (relayed as is): backoff, not 317 years.
  last(sockets).accept();
  last(sockets).serverClose(1000, "loopwatch: cooldown, retry in 9999999999s");
  assert.deepEqual(seen.filter(([n]) => n === "refused"), []);
  assert.equal(last(seen.filter(([n]) => n === "close"))[1].kind, "proxy");
  assert.ok(last(seen.filter(([n]) => n === "retry"))[1].delay < 60_000);
  clock.advance(clock.nextAt() - clock.now());
  assert.equal(sockets.length, 2);
  // With a refusal's code the same reason is a refusal, waited at most 366 days (+ the spread).
  last(sockets).accept();
  last(sockets).serverClose(4429, "loopwatch: cooldown, retry in 9999999999s");
  assert.equal(last(seen.filter(([n]) => n === "refused"))[1].retryAfter, 31_622_400);
  assert.equal(last(seen.filter(([n]) => n === "retry"))[1].delay, 31_622_400_500);
  clock.advance(31_622_400_500);
  assert.equal(sockets.length, 3);
  assert.equal(conn.state, "connecting");
});

test("every wait longer than a timer holds is chained: minInterval, backoff, linger; release cancels it", () => {
  // minInterval of 40 days.
  let s = setup({ r: 0, minInterval: 40 * DAY });
  let conn = s.connect();
  s.clock.advance(0);
  last(s.sockets).fail();
  s.clock.advance(40 * DAY - 1);
  assert.equal(s.sockets.length, 1);
  s.clock.advance(1);
  assert.equal(s.sockets.length, 2);
  // A backoff cap of 50 days.
  s = setup({ r: 0.5, minInterval: 0, backoff: { initial: 50 * DAY, max: 50 * DAY } });
  conn = s.connect();
  s.clock.advance(0);
  last(s.sockets).fail();
  s.clock.advance(25 * DAY - 1);
  assert.equal(s.sockets.length, 1);
  s.clock.advance(1);
  assert.equal(s.sockets.length, 2);
  // Released after the first link of the chain fired: nothing is left armed, no attempt ever comes.
  last(s.sockets).fail();
  s.clock.advance(TIMER_LIMIT + 1);
  assert.equal(conn.state, "waiting");
  assert.equal(s.clock.pending, 1);
  conn.release();
  s.clock.advance(0); // the linger (0) ends it
  assert.equal(conn.state, "closed");
  assert.equal(s.clock.pending, 0);
  s.clock.advance(400 * DAY);
  assert.equal(s.sockets.length, 2);
  // A linger of 30 days keeps the socket that long after the last release.
  s = setup({ linger: 30 * DAY });
  conn = s.connect();
  s.clock.advance(0);
  last(s.sockets).accept();
  conn.release();
  s.clock.advance(30 * DAY - 1);
  assert.equal(s.sockets[0].closedByClient, null);
  assert.equal(s.registry.managers.size, 1);
  s.clock.advance(1);
  assert.deepEqual(s.sockets[0].closedByClient, { code: 1000, reason: undefined });
  assert.equal(s.registry.managers.size, 0);
  assert.equal(s.clock.overflows, 0);
});

test("a refusal held by loopwatch (policy.hold, up to 30 s) is waited for by default, then its retry time", () => {
  // No openTimeout given: the default must outlast loopwatch's longest hold.
  const { clock, sockets, connect } = setup({ r: 0.5, retrySpread: 1000 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  // hold 15 s, a 10-minute cooldown: answered after 15 s with what is left of it.
  clock.advance(15_000);
  assert.equal(conn.state, "connecting"); // before the fix: given up at 10 s (1006), back at ~11 s
  assert.equal(sockets.length, 1);
  sockets[0].refuse(585);
  assert.deepEqual(seen.filter(([n]) => n === "refused").map(([, p]) => p.retryAfter), [585]);
  clock.advance(585_499);
  assert.equal(sockets.length, 1); // once in the cooldown, not every ~11 s
  clock.advance(1);
  assert.equal(sockets.length, 2);
  // The longest hold, 30 s, is still waited for.
  clock.advance(30_000);
  assert.equal(conn.state, "connecting");
  sockets[1].refuse(1);
  assert.equal(seen.filter(([n]) => n === "refused").length, 2);
  assert.ok(seen.every(([n, p]) => n !== "close" || p.kind === "refused"));
  // A socket that never answers is still dropped, at 35 s.
  clock.advance(1_500);
  assert.equal(sockets.length, 3);
  clock.advance(34_999);
  assert.equal(conn.state, "connecting");
  clock.advance(1);
  assert.equal(conn.state, "waiting");
  assert.equal(last(seen.filter(([n]) => n === "close"))[1].kind, "timeout");
});

test("an open timeout is a failed attempt: it backs off, and never resets the backoff", () => {
  const { clock, sockets, connect } = setup({ openTimeout: 5000, minInterval: 0, r: 0.999 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  last(sockets).fail(); // one failure before: the timeouts continue its backoff
  for (let i = 0; i < 4; i++) {
    clock.advance(clock.nextAt() - clock.now()); // the next attempt
    clock.advance(5000); // it never opens
  }
  const retries = seen.filter(([n]) => n === "retry").map(([, p]) => [p.cause, Math.round(p.delay)]);
  assert.deepEqual(retries, [["abnormal", 999], ["timeout", 1998], ["timeout", 3996], ["timeout", 7992], ["timeout", 15984]]);
  assert.equal(conn.stats.failures, 5);
  assert.equal(sockets.length, 5);
  assert.ok(sockets.every((s) => s.closedByClient !== null || s.readyState === 3));
});

test("a socket that does not open within openTimeout is dropped and retried", () => {
  const { clock, sockets, connect } = setup({ openTimeout: 5000, minInterval: 1000, r: 0 });
  const conn = connect();
  const seen = record(conn);
  clock.advance(0);
  clock.advance(4999);
  assert.equal(conn.state, "connecting");
  clock.advance(1);
  assert.deepEqual(sockets[0].closedByClient, { code: undefined, reason: undefined });
  assert.equal(conn.state, "waiting");
  assert.equal(seen.find(([n]) => n === "close")[1].kind, "timeout");
  sockets[0].accept(); // too late: ignored
  assert.equal(conn.state, "waiting");
  clock.advance(1000);
  assert.equal(sockets.length, 2);
});

test("the token hook: async, in the URL, failing, timing out, or outlived by a release", async () => {
  // Async, into the query (the token's value is kept out of the events).
  let s = setup({ getToken: async () => "tok-1" });
  let conn = s.connect("ws://app.test/ws?room=7");
  let seen = record(conn);
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets[0].url, "ws://app.test/ws?room=7&token=tok-1");
  assert.equal(seen.find(([n]) => n === "attempt")[1].url, "ws://app.test/ws?room=7&token=%E2%80%A6");
  // As a subprotocol instead of the query.
  s = setup({ getToken: () => "tok-2", tokenParam: null, protocols: (t) => ["bearer", t] });
  s.connect();
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets[0].url, URL_A);
  assert.deepEqual(s.sockets[0].protocols, ["bearer", "tok-2"]);
  // Failing: an error event, no socket, a retry.
  s = setup({ getToken: () => Promise.reject(new Error("auth service down")), r: 0 });
  conn = s.connect();
  seen = record(conn);
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets.length, 0);
  assert.equal(seen.find(([n]) => n === "error")[1].during, "token");
  assert.deepEqual(seen.find(([n]) => n === "retry")[1], { attempt: 2, delay: 1000, cause: "token" });
  // Never answering: cut at tokenTimeout; the late token is dropped.
  let resolve;
  s = setup({ getToken: () => new Promise((r) => (resolve = r)), tokenTimeout: 3000 });
  conn = s.connect();
  seen = record(conn);
  s.clock.advance(0);
  await flush();
  s.clock.advance(2999);
  assert.equal(conn.state, "connecting");
  s.clock.advance(1);
  assert.equal(conn.state, "waiting");
  assert.equal(seen.find(([n]) => n === "close")[1].kind, "token");
  resolve("late");
  await flush();
  assert.equal(s.sockets.length, 0);
  // Released while the token is on its way: no socket ever opens.
  s = setup({ getToken: () => new Promise((r) => (resolve = r)) });
  conn = s.connect();
  s.clock.advance(0);
  await flush();
  conn.release();
  s.clock.advance(0);
  resolve("tok");
  await flush();
  assert.equal(s.sockets.length, 0);
  assert.equal(s.clock.pending, 0);
});

test("the token is appended to the query as written: the rest of it byte for byte", async () => {
  // URLSearchParams would send ?room=a+b&flag=&path=%2Fa%2Fb&token=T: a signed URL breaks.
  let s = setup({ getToken: () => "T" });
  let seen = record(s.connect("ws://h/ws?room=a%20b&flag&path=/a/b"));
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets[0].url, "ws://h/ws?room=a%20b&flag&path=/a/b&token=T");
  assert.equal(seen.find(([n]) => n === "attempt")[1].url, "ws://h/ws?room=a%20b&flag&path=/a/b&token=%E2%80%A6");
  // A token pair already in the URL (any spelling of its name) is replaced, not doubled;
  // the token is escaped as a component; an empty query gets just the token.
  s = setup({ getToken: () => "a b/c+d" });
  s.connect("ws://h/ws?token=old&sig=x%2By&tok%65n=older&&z");
  s.connect("ws://h/empty?");
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets[0].url, "ws://h/ws?sig=x%2By&&z&token=a%20b%2Fc%2Bd");
  assert.equal(s.sockets[1].url, "ws://h/empty?token=a%20b%2Fc%2Bd");
  // No token: the URL as given, a token pair of the app's own hidden in the events, in place.
  s = setup({ getToken: () => null });
  seen = record(s.connect("ws://h/ws?a=1&token=mine&b=%20"));
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets[0].url, "ws://h/ws?a=1&token=mine&b=%20");
  assert.equal(seen.find(([n]) => n === "attempt")[1].url, "ws://h/ws?a=1&token=%E2%80%A6&b=%20");
});

/**
 * Make attempts until the share gives up or `max` attempts were made; each one
 * `answer`s its socket (the browser's view of a 401 at the upgrade: a 1006 before open).
 */
async function attemptUntilAuthFailed(clock, sockets, conn, max, answer = (socket) => socket.fail()) {
  for (let i = 0; i < max && conn.state !== "auth-failed"; i++) {
    clock.advance(clock.nextAt() === null ? 0 : clock.nextAt() - clock.now());
    await flush();
    const socket = last(sockets);
    if (socket !== undefined && socket.readyState === 0) answer(socket);
    await flush();
  }
}

test("a 401 at the upgrade: without checkAuth an outage for ever, with it auth-failed after 4", async () => {
  // Without checkAuth: a refused upgrade is a 1006, so the client backs off and never gives up.
  const tokens = [];
  let s = setup({ r: 0.5, getToken: ({ refresh }) => (tokens.push(refresh), "revoked") });
  let conn = s.connect();
  let seen = record(conn);
  await attemptUntilAuthFailed(s.clock, s.sockets, conn, 12);
  assert.equal(s.sockets.length, 12);
  assert.equal(conn.state, "waiting");
  assert.ok(seen.filter(([n]) => n === "close").every(([, p]) => p.kind === "abnormal"));
  assert.ok(tokens.every((refresh) => refresh === false));
  // With checkAuth saying the session is gone: an auth failure each, a refreshed token, then auth-failed.
  tokens.length = 0;
  const checks = [];
  s = setup({
    r: 0.5,
    getToken: ({ refresh }) => (tokens.push(refresh), "revoked"),
    checkAuth: async (request) => (checks.push(request), false),
  });
  conn = s.connect();
  seen = record(conn);
  await attemptUntilAuthFailed(s.clock, s.sockets, conn, 12);
  assert.equal(s.sockets.length, 4);
  assert.equal(conn.state, "auth-failed");
  assert.deepEqual(tokens, [false, true, true, true]);
  assert.deepEqual(checks.map((c) => [c.attempt, c.lastClose.code, c.lastClose.kind]), [
    [1, 1006, "abnormal"],
    [2, 1006, "abnormal"],
    [3, 1006, "abnormal"],
    [4, 1006, "abnormal"],
  ]);
  // One close event per attempt, with its final kind; the terminal event once.
  const closes = seen.filter(([n]) => n === "close").map(([, p]) => [p.attempt, p.code, p.kind]);
  assert.deepEqual(closes, [1, 2, 3, 4].map((a) => [a, 1006, "auth"]));
  assert.deepEqual(seen.filter(([n]) => n === "authfailed"), [["authfailed", { authFailures: 4, code: 1006, reason: "" }]]);
  // The table was followed: the check happened in connecting, the give-up came from there.
  const states = seen.filter(([n]) => n === "state").map(([, p]) => `${p.from} -${p.input}-> ${p.to}`);
  assert.equal(states.at(-1), "connecting -give-up-> auth-failed");
  assert.equal(s.clock.pending, 0);
  s.clock.advance(600_000);
  await flush();
  assert.equal(s.sockets.length, 4);
});

test("checkAuth: true, a throw, a rejection or no answer is don't know; asked only before open", async () => {
  const outcomes = {
    true: () => true,
    throws: () => {
      throw new Error("check broke");
    },
    rejects: () => Promise.reject(new Error("session API down")),
    undefined: () => undefined,
  };
  for (const [name, checkAuth] of Object.entries(outcomes)) {
    const s = setup({ r: 0, checkAuth });
    const conn = s.connect();
    const seen = record(conn);
    await attemptUntilAuthFailed(s.clock, s.sockets, conn, 6);
    assert.equal(conn.state, "waiting", name);
    assert.equal(conn.stats.authFailures, 0, name);
    assert.ok(seen.filter(([n]) => n === "close").every(([, p]) => p.kind === "abnormal"), name);
    const errors = seen.filter(([n]) => n === "error").map(([, p]) => p.during);
    assert.deepEqual(errors, name === "throws" || name === "rejects" ? Array(6).fill("checkAuth") : [], name);
  }
  // No answer: the attempt stays connecting until tokenTimeout, then it is an abnormal failure;
  // the late answer is dropped.
  let resolve;
  let s = setup({ r: 0, tokenTimeout: 3000, checkAuth: () => new Promise((r) => (resolve = r)) });
  let conn = s.connect();
  let seen = record(conn);
  s.clock.advance(0);
  s.sockets[0].fail();
  await flush();
  assert.equal(conn.state, "connecting");
  assert.deepEqual(seen.filter(([n]) => n === "close"), []); // the close is judged once, when its kind is known
  s.clock.advance(2999);
  await flush();
  assert.equal(conn.state, "connecting");
  assert.equal(s.sockets.length, 1);
  s.clock.advance(1);
  assert.equal(conn.state, "waiting");
  assert.equal(seen.find(([n]) => n === "close")[1].kind, "abnormal");
  assert.match(String(seen.find(([n]) => n === "error")[1].error), /checkAuth: no answer within 3000 ms/);
  resolve(false);
  await flush();
  assert.equal(conn.stats.authFailures, 0);
  assert.equal(seen.filter(([n]) => n === "close").length, 1);
  // Released while the check is out: no timer left, the answer changes nothing.
  s = setup({ checkAuth: () => new Promise((r) => (resolve = r)) });
  conn = s.connect();
  seen = record(conn);
  s.clock.advance(0);
  s.sockets[0].fail();
  await flush();
  assert.equal(s.clock.pending, 1); // the check's own timer
  conn.release();
  s.clock.advance(0);
  assert.equal(conn.state, "closed");
  assert.equal(s.clock.pending, 0);
  assert.equal(s.registry.managers.size, 0);
  resolve(false);
  await flush();
  assert.deepEqual(seen.filter(([n]) => n === "close" || n === "authfailed"), []);
  // Asked after an open timeout (no socket opened), never after a close after open, a refusal,
  // a token failure.
  const asked = [];
  let failToken = false;
  s = setup({
    r: 0,
    minInterval: 0,
    openTimeout: 5000,
    getToken: () => (failToken ? Promise.reject(new Error("no token")) : "t"),
    checkAuth: ({ lastClose }) => (asked.push(lastClose.kind), true),
  });
  conn = s.connect();
  const answers = [
    () => s.clock.advance(5000), // timeout
    (socket) => socket.refuse(1), // refused
    (socket) => (socket.accept(), socket.serverClose(1008, "token expired")), // auth after open
    (socket) => (socket.accept(), socket.fail()), // 1006 after open: the network
    (socket) => (socket.accept(), socket.serverClose(1011)),
  ];
  for (const answer of answers) {
    s.clock.advance(s.clock.nextAt() - s.clock.now());
    await flush();
    answer(last(s.sockets));
    await flush();
  }
  failToken = true;
  s.clock.advance(s.clock.nextAt() - s.clock.now());
  await flush();
  assert.equal(s.sockets.length, answers.length);
  assert.equal(conn.stats.attempts, answers.length + 1);
  assert.deepEqual(asked, ["timeout"]);
  assert.throws(() => s.connect(URL_B, { checkAuth: true }), /checkAuth: expected a function/);
});

test("state events follow the table, and a throwing listener breaks nothing", () => {
  const { clock, sockets, connect } = setup();
  const conn = connect();
  const states = [];
  const errors = [];
  const original = globalThis.reportError;
  globalThis.reportError = (e) => errors.push(e);
  try {
    conn.on("state", () => {
      throw new Error("app bug");
    });
    conn.on("state", ({ from, to, input }) => states.push(`${from} -${input}-> ${to}`));
    clock.advance(0);
    sockets[0].accept();
    sockets[0].fail();
    conn.release();
    clock.advance(0);
  } finally {
    if (original === undefined) delete globalThis.reportError;
    else globalThis.reportError = original;
  }
  assert.deepEqual(states, [
    "waiting -due-> connecting",
    "connecting -opened-> open",
    "open -failed-> waiting",
  ]);
  assert.equal(errors.length, 3);
  assert.equal(conn.state, "closed");
});

test("listeners end with their share; sends need an open socket", () => {
  const { clock, sockets, connect } = setup();
  const a = connect();
  const b = connect();
  const got = [];
  a.on("message", (m) => got.push(m));
  assert.equal(a.send("too early"), false);
  clock.advance(0);
  sockets[0].accept();
  a.release();
  sockets[0].receive("after a left");
  assert.deepEqual(got, []);
  assert.equal(a.on("message", () => {})(), undefined); // a released share listens to nothing
  assert.equal(b.send("y"), true);
});

test("bad options are refused at the call", () => {
  const { connect } = setup();
  assert.throws(() => connect("ftp://app.test/"), /ws:, wss:, http: or https:/);
  assert.throws(() => connect("not a url"), TypeError);
  assert.throws(() => connect(URL_A, { minInterval: -1 }), /minInterval/);
  assert.throws(() => connect(URL_A, { maxAuthRetries: 1.5 }), /maxAuthRetries/);
  assert.throws(() => connect(URL_A, { authCloseCodes: [99] }), /authCloseCodes/);
  assert.throws(() => connect(URL_A, { backoff: { initial: 0 } }), /backoff.initial/);
  assert.throws(() => connect(URL_A, { stableAfter: 0 }), /stableAfter/);
  assert.throws(() => connect(URL_A, { restartDelay: { min: 10, max: 5 } }), /restartDelay.max/);
  assert.throws(() => connect(URL_A, { getToken: "token" }), /getToken/);
  assert.throws(() => connect(URL_A, { WebSocket: null, clock: undefined }), TypeError);
  assert.equal(connect("http://app.test/ws").manager.url.href, URL_A); // http: maps to ws:
});

test("the page registry is one per page, shared by every copy of the module", () => {
  assert.equal(pageRegistry(), pageRegistry());
  const clock = new FakeClock();
  const { WebSocket, sockets } = fakeWebSocket();
  const a = sharedConnection("wss://page.test/ws", { WebSocket, clock });
  const b = sharedConnection("wss://page.test/ws", { WebSocket, clock });
  clock.advance(0);
  assert.equal(sockets.length, 1);
  assert.equal(globalThis[Symbol.for("loopwatch.client.registry")], pageRegistry());
  a.release();
  b.release();
  clock.advance(0);
  assert.equal(pageRegistry().managers.size, 0);
});

test("the registry remembers a bounded number of ended connections", () => {
  const { clock, sockets, connect, registry } = setup();
  for (let i = 0; i < 100; i++) {
    const conn = connect(`ws://app.test/${i}`);
    clock.advance(0);
    last(sockets).accept();
    conn.release();
    clock.advance(0);
  }
  assert.equal(registry.remembered.size, 64);
  assert.equal(registry.managers.size, 0);
});

test("a remount keeps the auth state: auth-failed stays, auth failures still count", async () => {
  const tokens = [];
  const { clock, sockets, connect, registry } = setup({
    getToken: ({ refresh }) => {
      tokens.push(refresh);
      return "expired-token";
    },
  });
  /** Answer every attempt with the backend's auth close until the share gives up, or `max` attempts. */
  const rejectAll = async (conn, max = 10) => {
    for (let i = 0; i < max && conn.state !== "auth-failed"; i++) {
      clock.advance(clock.nextAt() === null ? 0 : clock.nextAt() - clock.now());
      await flush();
      const socket = last(sockets);
      if (socket !== undefined && socket.readyState === 0) {
        socket.accept();
        socket.serverClose(1008, "token expired");
      }
    }
  };
  let conn = connect();
  await rejectAll(conn);
  assert.equal(conn.state, "auth-failed");
  assert.equal(sockets.length, 4);
  // Unmount and mount again (a route change, a `key` on a parent): still auth-failed, no attempt.
  conn.release();
  clock.advance(0);
  assert.equal(registry.managers.size, 0);
  conn = connect();
  const seen = record(conn);
  assert.equal(conn.state, "auth-failed");
  assert.equal(conn.stats.authFailures, 4);
  clock.advance(600_000);
  await flush();
  assert.equal(sockets.length, 4); // before: 4 more attempts per remount
  assert.equal(clock.pending, 0);
  // retry() starts over, as it always did.
  assert.equal(conn.retry(), true);
  assert.deepEqual(seen.find(([n]) => n === "state")[1], { from: "auth-failed", to: "waiting", input: "retry" });
  await rejectAll(conn, 2); // two auth failures, then the user leaves the page
  assert.equal(conn.state, "waiting");
  assert.equal(conn.stats.authFailures, 2);
  conn.release();
  clock.advance(0);
  // A remount in the middle of the retries: the count goes on, 2 more attempts and it gives up.
  conn = connect();
  assert.equal(conn.stats.authFailures, 2);
  const before = sockets.length;
  await rejectAll(conn);
  assert.equal(conn.state, "auth-failed");
  assert.equal(sockets.length - before, 2);
  assert.equal(tokens.length, sockets.length);
  // A stable connection clears it, as retry() does: the next remount starts from nothing.
  assert.equal(conn.retry(), true);
  assert.equal(conn.stats.authFailures, 0);
  await rejectAll(conn, 1);
  assert.equal(conn.stats.authFailures, 1);
  clock.advance(clock.nextAt() - clock.now());
  await flush();
  last(sockets).accept(); // a fresh token at last
  clock.advance(10_000);
  assert.equal(conn.stats.authFailures, 0);
  conn.release();
  clock.advance(0);
  conn = connect();
  assert.equal(conn.state, "waiting");
  assert.equal(conn.stats.authFailures, 0);
  // Another key, or the same key once the registry has forgotten it, starts afresh.
  assert.equal(connect(URL_B).state, "waiting");
});
