// One connection manager per URL per page, shared by every part of the app that
// asks for it, reconnecting the way docs/refusals.md asks clients to.

import { checkBackoff, DEFAULT_BACKOFF, fullJitter } from "./backoff.js";
import { Input, State, transition } from "./machine.js";
import { classifyClose, DEFAULT_AUTH_CLOSE_CODES } from "./refusal.js";

/** @typedef {import("./machine.js").State} StateName */
/** @typedef {import("./machine.js").Input} InputName */
/** @typedef {import("./refusal.js").CloseInfo} CloseInfo */
/** @typedef {import("./refusal.js").CloseKind} CloseKind */
/** @typedef {import("./backoff.js").BackoffOptions} BackoffOptions */

/**
 * What the token hook is told.
 * @typedef {object} TokenRequest
 * @property {boolean} refresh           the last attempt failed auth: fetch a new token, not a cached one
 * @property {number} attempt            the attempt about to be made, from 1
 * @property {CloseInfo | null} lastClose how the previous attempt ended
 */

/**
 * What the auth check is told: the attempt that failed before its socket opened.
 * @typedef {object} AuthCheckRequest
 * @property {number} attempt       the attempt that just failed, from 1
 * @property {CloseInfo} lastClose  how it ended (kind "abnormal" or "timeout")
 */

/**
 * @typedef {object} Clock
 * @property {() => number} now                                   ms
 * @property {(fn: () => void, ms: number) => unknown} setTimeout
 * @property {(handle: unknown) => void} clearTimeout
 */

/**
 * @typedef {object} Options
 * @property {number} [minInterval=1000]     ms, least time from the end of one attempt to the next attempt:
 *           the floor the backoff's draw is added to
 * @property {Partial<BackoffOptions>} [backoff]  {initial: 1000, max: 30000, factor: 2}: full jitter above the floor
 * @property {number} [maxAuthRetries=3]     auth failures retried before the terminal "auth-failed" state
 * @property {readonly number[]} [authCloseCodes=[1008, 4001, 4003]]  close codes that mean an auth failure
 * @property {number} [stableAfter=10000]    ms a socket must stay open before the backoff starts over
 * @property {number} [openTimeout=35000]    ms a socket may take to open; above `policy.hold` × the
 *           sockets the page may open at once to that host, or a held refusal is cut before its retry time
 * @property {number} [tokenTimeout=10000]   ms the token hook (and the auth check) may take
 * @property {number} [retrySpread=1000]     up to this many ms added at random to loopwatch's retry time
 * @property {{min: number, max: number}} [restartDelay={min: 5000, max: 30000}]  after 1012 Service Restart
 * @property {number} [overloadDelay=5000]   the floor after a 1013 that carries no retry time
 * @property {number} [linger=0]             ms the socket is kept after the last release (a remount takes it over)
 * @property {(request: TokenRequest) => (string | null | undefined | Promise<string | null | undefined>)} [getToken]
 *           called before every attempt; `refresh` is true after an auth failure
 * @property {(request: AuthCheckRequest) => (boolean | Promise<boolean>)} [checkAuth]
 *           asked after an attempt that failed before its socket opened (a browser reports a 401 at the
 *           upgrade as a 1006, like an outage); false: the session is gone, the failure counts as an auth
 *           failure. A throw, a rejection or no answer within tokenTimeout counts as "don't know" (true)
 * @property {string | null} [tokenParam="token"]  query parameter the token goes in; null: the URL is left alone
 * @property {string | string[] | ((token: string | null) => string | string[] | undefined)} [protocols]
 *           subprotocols, or a function of the token (for the `bearer, <token>` subprotocol pattern)
 * @property {string} [key]                  what makes two calls share a manager; default the URL
 * @property {typeof WebSocket} [WebSocket]  default globalThis.WebSocket
 * @property {Clock} [clock]                 default Date.now and the global timers
 * @property {() => number} [random]         default Math.random
 */

/**
 * Events and their payloads.
 * @typedef {object} EventMap
 * @property {{from: StateName, to: StateName, input: InputName}} state
 * @property {{attempt: number, url: string}} attempt
 * @property {{attempt: number}} open
 * @property {unknown} message                       the MessageEvent's data
 * @property {CloseInfo & {attempt: number, openFor: number | null}} close
 * @property {{reason: string, phrase: string, retryAfter: number, code: number}} refused
 * @property {{attempt: number, delay: number, cause: CloseKind}} retry
 * @property {{openFor: number}} stable
 * @property {{authFailures: number, code: number, reason: string}} authfailed
 * @property {{error: unknown, during: "token" | "socket" | "checkAuth"}} error
 */

/** @typedef {keyof EventMap} EventName */

const OPEN = 1; // WebSocket.OPEN
const CONNECTING = 0; // WebSocket.CONNECTING
const NORMAL_CLOSURE = 1000;
const NO_CLOSE_FRAME = 1006;
const MAX_REMEMBERED = 64; // released managers remembered per registry (min interval, auth state across remounts)
// loopwatch holds a refused attempt unanswered for `policy.hold` (at most 30 s,
// docs/refusals.md "The hold") before it closes it 1013 with the retry time. An
// open timeout shorter than the wait gives up first (a 1006, no retry time) and
// comes back every openTimeout + backoff instead of once. The wait can be longer
// than one hold: Chromium lets one WebSocket per host be connecting at a time,
// and the timer starts at `new WebSocket`, so a page's second socket to the host
// waits out the first's hold before its own begins (hold × sockets). 35 s covers
// one socket at the longest hold, or up to 17 at the default 2 s hold.
const DEFAULT_OPEN_TIMEOUT = 35000;
// The longest delay a timer keeps: node and every browser store it in a 32-bit
// signed integer and fire a longer one at once (node after 1 ms). loopwatch's
// retry times go up to 366 days, so longer waits are chained (setTimer).
const TIMER_LIMIT = 2 ** 31 - 1;

/** @param {number} value @param {string} name @param {boolean} [positive] */
function checkMs(value, name, positive = false) {
  if (!(Number.isFinite(value) && (positive ? value > 0 : value >= 0))) {
    throw new TypeError(`${name}: expected a number of ms ${positive ? "> 0" : ">= 0"}, got ${value}`);
  }
  return value;
}

/**
 * Options with defaults, checked once: a bad option is a TypeError at the call, not a loop later.
 * @param {Options} options
 */
function settle(options) {
  const clock = options.clock ?? {
    now: () => Date.now(),
    setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimeout: (handle) => globalThis.clearTimeout(/** @type {any} */ (handle)),
  };
  const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
  if (typeof WebSocketClass !== "function") throw new TypeError("WebSocket: no WebSocket class in this environment");
  const restart = options.restartDelay ?? { min: 5000, max: 30000 };
  checkMs(restart.min, "restartDelay.min");
  if (!(restart.max >= restart.min)) throw new TypeError(`restartDelay.max: expected >= min, got ${restart.max}`);
  const maxAuthRetries = options.maxAuthRetries ?? 3;
  if (!(Number.isInteger(maxAuthRetries) && maxAuthRetries >= 0)) {
    throw new TypeError(`maxAuthRetries: expected an integer >= 0, got ${maxAuthRetries}`);
  }
  const authCloseCodes = options.authCloseCodes ?? DEFAULT_AUTH_CLOSE_CODES;
  if (!Array.isArray(authCloseCodes) || !authCloseCodes.every((c) => Number.isInteger(c) && c >= 1000 && c <= 4999)) {
    throw new TypeError(`authCloseCodes: expected close codes 1000-4999, got ${authCloseCodes}`);
  }
  for (const hook of /** @type {const} */ (["getToken", "checkAuth"])) {
    if (options[hook] !== undefined && typeof options[hook] !== "function") {
      throw new TypeError(`${hook}: expected a function`);
    }
  }
  return Object.freeze({
    minInterval: checkMs(options.minInterval ?? 1000, "minInterval"),
    backoff: checkBackoff({ ...DEFAULT_BACKOFF, ...options.backoff }),
    maxAuthRetries,
    authCloseCodes: Object.freeze([...authCloseCodes]),
    stableAfter: checkMs(options.stableAfter ?? 10000, "stableAfter", true),
    openTimeout: checkMs(options.openTimeout ?? DEFAULT_OPEN_TIMEOUT, "openTimeout", true),
    tokenTimeout: checkMs(options.tokenTimeout ?? 10000, "tokenTimeout", true),
    retrySpread: checkMs(options.retrySpread ?? 1000, "retrySpread"),
    restartDelay: Object.freeze({ min: restart.min, max: restart.max }),
    overloadDelay: checkMs(options.overloadDelay ?? 5000, "overloadDelay"),
    linger: checkMs(options.linger ?? 0, "linger"),
    getToken: options.getToken,
    checkAuth: options.checkAuth,
    tokenParam: options.tokenParam === undefined ? "token" : options.tokenParam,
    protocols: options.protocols,
    WebSocket: WebSocketClass,
    clock,
    random: options.random ?? Math.random,
  });
}

/** @typedef {ReturnType<typeof settle>} Settings */

/**
 * What a registry keeps of a released manager, so that the next manager for
 * its key (a remount) starts where it left off: the min interval still counts
 * from its last attempt, and its auth failures still count (an unmount and a
 * mount must not buy 1 + maxAuthRetries more attempts with a dead token).
 * @typedef {object} Remembered
 * @property {number} end            when its last attempt ended (ms)
 * @property {number} authFailures   its auth failures since its last stable connection
 * @property {boolean} authFailed    it ended in "auth-failed"
 */

/**
 * An absolute ws:/wss: URL (http: and https: map over; relative resolves against the page).
 * @param {string | URL} url
 */
function absoluteUrl(url) {
  const base = globalThis.location === undefined ? undefined : globalThis.location.href;
  const parsed = new URL(String(url), base); // throws a TypeError on a bad URL
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(`url: expected a ws:, wss:, http: or https: URL, got ${parsed.protocol}`);
  }
  parsed.hash = "";
  return parsed;
}

/** Report a listener's exception without letting it break the connection. */
function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

/**
 * One socket to one URL and everything about reconnecting it. Made by a
 * Registry; apps hold Connection handles, never this.
 */
export class ConnectionManager {
  /**
   * @param {string} key
   * @param {URL} url
   * @param {Settings} settings
   * @param {Registry} registry
   * @param {Remembered | null} previous  what the registry kept of the key's last manager
   */
  constructor(key, url, settings, registry, previous) {
    this.key = key;
    this.url = url;
    this.settings = settings;
    this.registry = registry;
    /** @type {StateName} */
    this.state = State.IDLE;
    /** @type {Set<Connection>} */
    this.users = new Set();
    /** @type {Map<EventName, Set<(payload: any) => void>>} */
    this.listeners = new Map();
    /** @type {WebSocket | null} */
    this.socket = null;
    this.attempts = 0; // attempts made, in total
    this.failures = 0; // attempts that ended without a stable connection, since the last stable one
    this.authFailures = previous === null ? 0 : previous.authFailures; // since the last stable connection
    this.startInAuthFailed = previous !== null && previous.authFailed; // start in "auth-failed", as the last one ended
    /** @type {number | null} */
    this.lastEnd = previous === null ? null : previous.end; // when the last attempt ended (ms)
    /** @type {number | null} */
    this.openedAt = null;
    /** @type {CloseInfo | null} */
    this.lastClose = null;
    this.generation = 0; // bumped whenever an attempt is abandoned, so late callbacks are ignored
    /** @type {{wait: unknown, open: unknown, stable: unknown, token: unknown, auth: unknown, linger: unknown}} */
    this.timers = { wait: null, open: null, stable: null, token: null, auth: null, linger: null };
  }

  // --- users ---------------------------------------------------------------

  /** @returns {Connection} */
  acquire() {
    const user = new Connection(this);
    this.users.add(user);
    this.clearTimer("linger");
    if (this.state === State.IDLE && this.startInAuthFailed) {
      this.move(Input.GIVE_UP); // terminal as before the remount: retry() starts over
    } else if (this.state === State.IDLE) {
      this.schedule(Input.START, this.minIntervalLeft(), null);
    }
    return user;
  }

  /** @param {Connection} user */
  release(user) {
    if (!this.users.delete(user)) return;
    if (this.users.size === 0 && this.state !== State.CLOSED) {
      this.setTimer("linger", this.settings.linger, () => {
        if (this.users.size === 0) this.shutdown();
      });
    }
  }

  /** Every user is gone: close the socket, forget the manager. */
  shutdown() {
    const from = this.state;
    this.abandonAttempt();
    if (this.socket !== null) {
      const socket = this.socket;
      this.detach(socket);
      this.socket = null;
      this.lastEnd = this.settings.clock.now();
      if (socket.readyState === OPEN || socket.readyState === CONNECTING) socket.close(NORMAL_CLOSURE);
    }
    for (const name of /** @type {(keyof ConnectionManager["timers"])[]} */ (Object.keys(this.timers))) {
      this.clearTimer(name);
    }
    this.move(Input.RELEASE, from);
    this.registry.forget(this, from === State.AUTH_FAILED);
    this.listeners.clear();
  }

  /** @returns {boolean} */
  retry() {
    if (this.state !== State.AUTH_FAILED) return false;
    this.authFailures = 0;
    this.failures = 0;
    this.schedule(Input.RETRY, this.minIntervalLeft(), null);
    return true;
  }

  /** @param {string | ArrayBufferLike | Blob | ArrayBufferView} data */
  send(data) {
    if (this.state !== State.OPEN || this.socket === null || this.socket.readyState !== OPEN) return false;
    this.socket.send(data);
    return true;
  }

  // --- events ----------------------------------------------------------------

  /**
   * @template {EventName} K
   * @param {K} name
   * @param {(payload: EventMap[K]) => void} fn
   * @returns {() => void} unsubscribe
   */
  on(name, fn) {
    let set = this.listeners.get(name);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(name, set);
    }
    set.add(fn);
    return () => {
      const current = this.listeners.get(name);
      if (current !== undefined) current.delete(fn);
    };
  }

  /**
   * @template {EventName} K
   * @param {K} name
   * @param {EventMap[K]} payload
   */
  emit(name, payload) {
    const set = this.listeners.get(name);
    if (set === undefined) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (error) {
        report(error);
      }
    }
  }

  // --- the state machine --------------------------------------------------

  /**
   * Apply one input through the transition table and tell the listeners.
   * @param {InputName} input
   * @param {StateName} [from]
   */
  move(input, from = this.state) {
    const to = transition(from, input);
    this.state = to;
    this.emit("state", { from, to, input });
  }

  /**
   * Wait `delay` ms in WAITING, then attempt.
   * @param {InputName} input  START, FAILED or RETRY
   * @param {number} delay
   * @param {CloseKind | null} cause  why (null for the first attempt and a manual retry)
   */
  schedule(input, delay, cause) {
    this.move(input);
    if (cause !== null) this.emit("retry", { attempt: this.attempts + 1, delay, cause });
    this.setTimer("wait", delay, () => {
      this.move(Input.DUE);
      this.attempt();
    });
  }

  /** ms until `minInterval` has passed since the last attempt ended. */
  minIntervalLeft() {
    if (this.lastEnd === null) return 0;
    return Math.max(0, this.lastEnd + this.settings.minInterval - this.settings.clock.now());
  }

  // --- one attempt ---------------------------------------------------------

  attempt() {
    this.attempts += 1;
    const attempt = this.attempts;
    const generation = this.generation;
    const { getToken, tokenTimeout } = this.settings;
    if (getToken === undefined) {
      this.open(null, attempt);
      return;
    }
    const request = { refresh: this.lastClose !== null && this.lastClose.kind === "auth", attempt, lastClose: this.lastClose };
    this.setTimer("token", tokenTimeout, () => {
      this.generation += 1; // a late token is dropped
      this.tokenFailed(new Error(`getToken: no token within ${tokenTimeout} ms`), attempt);
    });
    Promise.resolve()
      .then(() => getToken(request))
      .then(
        (token) => {
          if (generation !== this.generation) return;
          this.clearTimer("token");
          this.open(token ?? null, attempt);
        },
        (error) => {
          if (generation !== this.generation) return;
          this.clearTimer("token");
          this.tokenFailed(error, attempt);
        },
      );
  }

  /**
   * @param {unknown} error
   * @param {number} attempt
   */
  tokenFailed(error, attempt) {
    this.emit("error", { error, during: "token" });
    this.ended(classifyWithKind(NO_CLOSE_FRAME, "", false, "token"), attempt);
  }

  /**
   * @param {string | null} token
   * @param {number} attempt
   */
  open(token, attempt) {
    const { tokenParam, protocols, WebSocket: WebSocketClass, openTimeout } = this.settings;
    const href = token !== null && tokenParam !== null ? withParam(this.url.href, tokenParam, token) : this.url.href;
    const wanted = typeof protocols === "function" ? protocols(token) : protocols;
    this.emit("attempt", { attempt, url: redact(href, tokenParam) });
    /** @type {WebSocket} */
    let socket;
    try {
      socket = wanted === undefined ? new WebSocketClass(href) : new WebSocketClass(href, wanted);
    } catch (error) {
      this.emit("error", { error, during: "socket" });
      this.ended(classifyWithKind(NO_CLOSE_FRAME, "", false, "abnormal"), attempt);
      return;
    }
    this.socket = socket;
    socket.onopen = () => this.opened(socket, attempt);
    socket.onmessage = (event) => {
      if (socket === this.socket) this.emit("message", event.data);
    };
    socket.onerror = () => {}; // a close event always follows
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.detach(socket);
      this.ended(classifyClose(event.code, event.reason, event.wasClean, this.settings.authCloseCodes), attempt);
    };
    this.setTimer("open", openTimeout, () => {
      if (socket !== this.socket || socket.readyState === OPEN) return;
      this.socket = null;
      this.detach(socket);
      socket.close();
      this.ended(classifyWithKind(NO_CLOSE_FRAME, "", false, "timeout"), attempt);
    });
  }

  /**
   * @param {WebSocket} socket
   * @param {number} attempt
   */
  opened(socket, attempt) {
    if (socket !== this.socket) return;
    this.clearTimer("open");
    this.openedAt = this.settings.clock.now();
    this.move(Input.OPENED);
    this.emit("open", { attempt });
    // Only a socket that stays open earns a fresh backoff: a loopwatch refusal
    // opens too (101, then close 1013), and so does a backend's auth close.
    this.setTimer("stable", this.settings.stableAfter, () => {
      this.failures = 0;
      this.authFailures = 0;
      this.emit("stable", { openFor: this.settings.stableAfter });
    });
  }

  /**
   * The attempt ended (closed, failed to open, or never got a token): decide what comes next.
   * @param {CloseInfo} info
   * @param {number} attempt
   */
  ended(info, attempt) {
    const now = this.settings.clock.now();
    const openFor = this.openedAt === null ? null : now - this.openedAt;
    this.openedAt = null;
    this.clearTimer("open");
    this.clearTimer("stable");
    this.lastEnd = now;
    // A refused upgrade (401, 403) reaches a page as a 1006 before open, like an
    // outage: only the app can tell, so it is asked before the close is judged.
    const unopened = openFor === null && (info.kind === "abnormal" || info.kind === "timeout");
    if (unopened && this.settings.checkAuth !== undefined) this.askAuth(info, attempt);
    else this.judge(info, attempt, openFor);
  }

  /**
   * Ask the app's checkAuth whether the session still holds, then judge the
   * close: false makes it an auth failure. Meanwhile the state stays
   * "connecting" (no attempt runs); a release drops the answer (generation).
   * @param {CloseInfo} info
   * @param {number} attempt
   */
  askAuth(info, attempt) {
    const { checkAuth, tokenTimeout } = this.settings;
    const generation = this.generation;
    /** @param {unknown} valid */
    const answered = (valid) => {
      this.clearTimer("auth");
      this.judge(valid === false ? { ...info, kind: "auth" } : info, attempt, null);
    };
    /** @param {unknown} error */
    const unknown = (error) => {
      this.emit("error", { error, during: "checkAuth" });
      answered(true); // "don't know": the failure stays what it looked like
    };
    this.setTimer("auth", tokenTimeout, () => {
      this.generation += 1; // a late answer is dropped
      unknown(new Error(`checkAuth: no answer within ${tokenTimeout} ms`));
    });
    Promise.resolve()
      .then(() => /** @type {NonNullable<Settings["checkAuth"]>} */ (checkAuth)({ attempt, lastClose: info }))
      .then(
        (valid) => {
          if (generation === this.generation) answered(valid);
        },
        (error) => {
          if (generation === this.generation) unknown(error);
        },
      );
  }

  /**
   * What comes after the close `info`, now that its kind is final: a wait, or auth-failed.
   * @param {CloseInfo} info
   * @param {number} attempt
   * @param {number | null} openFor
   */
  judge(info, attempt, openFor) {
    const { minInterval, backoff, random, maxAuthRetries } = this.settings;
    this.lastClose = info;
    this.failures += 1;
    this.emit("close", { ...info, attempt, openFor });

    // Every wait is a floor plus a random part. Clamping a draw onto the floor
    // instead (max(U·cap, minInterval), with cap = initial = minInterval) put
    // every first retry at exactly minInterval: a fleet that lost its sockets
    // together (a drain) came back together, in the same millisecond.
    let delay;
    switch (info.kind) {
      case "refused": {
        const refusal = /** @type {import("./refusal.js").Refusal} */ (info.refusal);
        this.emit("refused", { ...refusal, code: info.code });
        delay = refusal.retryAfter * 1000 + random() * this.settings.retrySpread;
        break;
      }
      case "auth":
        this.authFailures += 1;
        if (this.authFailures > maxAuthRetries) {
          this.move(Input.GIVE_UP);
          this.emit("authfailed", { authFailures: this.authFailures, code: info.code, reason: info.reason });
          return;
        }
        delay = minInterval + fullJitter(this.failures, backoff, random);
        break;
      case "restart": {
        const { min, max } = this.settings.restartDelay;
        delay = min + random() * (max - min);
        break;
      }
      case "overload": // 1013 without a retry time: "back off long"
        delay = Math.max(this.settings.overloadDelay, minInterval) + fullJitter(this.failures, backoff, random);
        break;
      default:
        delay = minInterval + fullJitter(this.failures, backoff, random);
    }
    this.schedule(Input.FAILED, Math.max(delay, minInterval), info.kind);
  }

  // --- plumbing ------------------------------------------------------------

  /** Forget whatever attempt is in flight (its token, its timers). */
  abandonAttempt() {
    this.generation += 1;
  }

  /** @param {WebSocket} socket */
  detach(socket) {
    socket.onopen = null;
    socket.onmessage = null;
    socket.onerror = null;
    socket.onclose = null;
  }

  /**
   * Run `fn` in `ms` ms. Every timer of the manager is armed here: a wait
   * longer than TIMER_LIMIT (a 30-day deny's retry time, a long minInterval or
   * backoff) is chained, armed for TIMER_LIMIT and re-armed with what is left
   * until it is due, as one timer of that length would be.
   * @param {keyof ConnectionManager["timers"]} name
   * @param {number} ms
   * @param {() => void} fn
   */
  setTimer(name, ms, fn) {
    this.clearTimer(name);
    /** @param {number} left */
    const arm = (left) => {
      const step = Math.min(left, TIMER_LIMIT);
      this.timers[name] = this.settings.clock.setTimeout(() => {
        if (left > step) {
          arm(left - step);
          return;
        }
        this.timers[name] = null;
        fn();
      }, step);
    };
    arm(ms);
  }

  /** @param {keyof ConnectionManager["timers"]} name */
  clearTimer(name) {
    if (this.timers[name] !== null) {
      this.settings.clock.clearTimeout(this.timers[name]);
      this.timers[name] = null;
    }
  }
}

/**
 * @param {number} code
 * @param {string} reason
 * @param {boolean} wasClean
 * @param {CloseKind} kind
 * @returns {CloseInfo}
 */
function classifyWithKind(code, reason, wasClean, kind) {
  return { code, reason, wasClean, kind, refusal: null };
}

// The query is edited as text, never through URLSearchParams: that re-serialises
// every pair (`%20` becomes `+`, `flag` becomes `flag=`, `/` becomes `%2F`), and
// a backend that verifies a signed query, or tells `flag` from `flag=`, would
// then refuse every attempt. Only pairs named `name` are touched.

/**
 * The part before the query, and the query's pairs as written (none for an empty query).
 * @param {string} href  without a fragment
 */
function splitQuery(href) {
  const at = href.indexOf("?"); // the first "?" starts the query: the URL parser escapes any before it
  if (at < 0) return { base: href, pairs: [] };
  const query = href.slice(at + 1);
  return { base: href.slice(0, at), pairs: query === "" ? [] : query.split("&") };
}

/**
 * A pair's name as a server reads it (`+` is a space, percent-decoded).
 * @param {string} pair
 */
function pairName(pair) {
  const raw = pair.split("=", 1)[0].replace(/\+/g, " ");
  try {
    return decodeURIComponent(raw);
  } catch {
    return raw; // a malformed escape is read as written
  }
}

/**
 * `href` with `name=value` as the last pair of its query, every other pair of that name removed.
 * @param {string} href
 * @param {string} name
 * @param {string} value
 */
function withParam(href, name, value) {
  const { base, pairs } = splitQuery(href);
  const kept = pairs.filter((pair) => pairName(pair) !== name);
  return `${base}?${[...kept, `${encodeURIComponent(name)}=${encodeURIComponent(value)}`].join("&")}`;
}

/**
 * The URL for events and logs: every value of `tokenParam` replaced by "…", in place.
 * @param {string} href
 * @param {string | null} tokenParam
 */
function redact(href, tokenParam) {
  if (tokenParam === null) return href;
  const { base, pairs } = splitQuery(href);
  if (!pairs.some((pair) => pairName(pair) === tokenParam)) return href;
  const hidden = `${encodeURIComponent(tokenParam)}=${encodeURIComponent("…")}`;
  return `${base}?${pairs.map((pair) => (pairName(pair) === tokenParam ? hidden : pair)).join("&")}`;
}

/**
 * What the app holds: a share of a manager. Release it when done (an effect's
 * cleanup); the socket closes when the last share is released.
 */
export class Connection {
  /** @param {ConnectionManager} manager */
  constructor(manager) {
    /** @type {ConnectionManager | null} */
    this.manager = manager;
    /** @type {(() => void)[]} */
    this.unsubscribers = [];
  }

  /** @returns {StateName} */
  get state() {
    return this.manager === null ? State.CLOSED : this.manager.state;
  }

  /** Counters of the shared connection. */
  get stats() {
    const m = this.manager;
    return m === null
      ? { attempts: 0, failures: 0, authFailures: 0 }
      : { attempts: m.attempts, failures: m.failures, authFailures: m.authFailures };
  }

  /**
   * Listen to an event of the shared connection until this share is released.
   * @template {EventName} K
   * @param {K} name
   * @param {(payload: EventMap[K]) => void} fn
   * @returns {() => void} unsubscribe
   */
  on(name, fn) {
    if (this.manager === null) return () => {};
    const off = this.manager.on(name, fn);
    this.unsubscribers.push(off);
    return off;
  }

  /**
   * Send on the shared socket; false (nothing sent, nothing queued) when it is not open.
   * @param {string | ArrayBufferLike | Blob | ArrayBufferView} data
   */
  send(data) {
    return this.manager === null ? false : this.manager.send(data);
  }

  /** After "auth-failed" (e.g. the user logged in again): start over. False in any other state. */
  retry() {
    return this.manager === null ? false : this.manager.retry();
  }

  /** Give this share back (idempotent). */
  release() {
    const manager = this.manager;
    if (manager === null) return;
    this.manager = null;
    for (const off of this.unsubscribers.splice(0)) off();
    manager.release(this);
  }
}

/** The managers of one page, by key. */
export class Registry {
  constructor() {
    /** @type {Map<string, ConnectionManager>} */
    this.managers = new Map();
    /** @type {Map<string, Remembered>} released managers, by key, the most recent last */
    this.remembered = new Map();
  }

  /**
   * A share of the connection to `url`: the existing manager's when there is
   * one (its options stay those of the first call), else a new one's.
   * @param {string | URL} url
   * @param {Options} [options]
   * @returns {Connection}
   */
  connect(url, options = {}) {
    const absolute = absoluteUrl(url);
    const key = options.key ?? absolute.href;
    let manager = this.managers.get(key);
    if (manager === undefined || manager.state === State.CLOSED) {
      manager = new ConnectionManager(key, absolute, settle(options), this, this.remembered.get(key) ?? null);
      this.managers.set(key, manager);
    }
    return manager.acquire();
  }

  /**
   * @param {ConnectionManager} manager
   * @param {boolean} authFailed  it was in "auth-failed" when released
   */
  forget(manager, authFailed) {
    if (this.managers.get(manager.key) === manager) this.managers.delete(manager.key);
    if (manager.lastEnd !== null) {
      const { key, lastEnd, authFailures } = manager;
      this.remembered.delete(key);
      this.remembered.set(key, { end: lastEnd, authFailures, authFailed });
      while (this.remembered.size > MAX_REMEMBERED) this.remembered.delete(this.remembered.keys().next().value);
    }
  }
}

const PAGE_REGISTRY = Symbol.for("loopwatch.client.registry");

/**
 * The page's registry, shared by every copy of this module loaded in the page
 * (two bundles each with their own copy still share one socket per URL).
 * @returns {Registry}
 */
export function pageRegistry() {
  const g = /** @type {any} */ (globalThis);
  if (!(g[PAGE_REGISTRY] instanceof Object) || typeof g[PAGE_REGISTRY].connect !== "function") {
    g[PAGE_REGISTRY] = new Registry();
  }
  return g[PAGE_REGISTRY];
}

/**
 * A share of the page's one connection to `url`.
 * @param {string | URL} url
 * @param {Options} [options]
 * @returns {Connection}
 */
export function sharedConnection(url, options = {}) {
  return pageRegistry().connect(url, options);
}
