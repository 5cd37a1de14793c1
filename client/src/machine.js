// The connection's state machine: states, inputs, and the one table that says
// which input moves which state where. Nothing else changes a state.

/**
 * @typedef {"idle" | "waiting" | "connecting" | "open" | "auth-failed" | "closed"} State
 * @typedef {"start" | "due" | "opened" | "failed" | "give-up" | "retry" | "release"} Input
 */

/** @type {Readonly<{IDLE: "idle", WAITING: "waiting", CONNECTING: "connecting", OPEN: "open", AUTH_FAILED: "auth-failed", CLOSED: "closed"}>} */
export const State = Object.freeze({
  IDLE: "idle", // made, nothing asked yet
  WAITING: "waiting", // a timer runs until the next attempt (min interval, backoff, retry time)
  CONNECTING: "connecting", // getting a token, then the socket is opening (then, if it failed to, checkAuth)
  OPEN: "open", // the socket is open
  AUTH_FAILED: "auth-failed", // terminal: auth retries used up; the app decides (retry() or release())
  CLOSED: "closed", // terminal: every user released it
});

/** @type {Readonly<{START: "start", DUE: "due", OPENED: "opened", FAILED: "failed", GIVE_UP: "give-up", RETRY: "retry", RELEASE: "release"}>} */
export const Input = Object.freeze({
  START: "start", // the first user asked for the connection
  DUE: "due", // the waiting timer fired
  OPENED: "opened", // the socket opened
  FAILED: "failed", // the attempt or the socket ended; another attempt is scheduled
  GIVE_UP: "give-up", // an auth failure beyond maxAuthRetries, or (from idle) the key's last manager ended so
  RETRY: "retry", // the app asks to try again after auth-failed (e.g. after a new login)
  RELEASE: "release", // the last user released the connection
});

/** @type {Readonly<Record<State, Readonly<Partial<Record<Input, State>>>>>} */
export const TRANSITIONS = Object.freeze({
  "idle": Object.freeze({ "start": "waiting", "give-up": "auth-failed", "release": "closed" }),
  "waiting": Object.freeze({ "due": "connecting", "release": "closed" }),
  "connecting": Object.freeze({ "opened": "open", "failed": "waiting", "give-up": "auth-failed", "release": "closed" }),
  "open": Object.freeze({ "failed": "waiting", "give-up": "auth-failed", "release": "closed" }),
  "auth-failed": Object.freeze({ "retry": "waiting", "release": "closed" }),
  "closed": Object.freeze({}),
});

/**
 * The state `input` moves `state` to; throws on an input the table does not allow.
 * @param {State} state
 * @param {Input} input
 * @returns {State}
 */
export function transition(state, input) {
  const row = TRANSITIONS[state];
  const to = row === undefined ? undefined : row[input];
  if (to === undefined) throw new Error(`loopwatch client: no transition from ${state} on ${input}`);
  return to;
}
