// Reading loopwatch's refusals and classifying every close a page can see.
// The grammar is docs/refusals.md's; tests/test_refusal_contract.py pins the
// proxy to the same regular expression.

/**
 * The refusal reasons loopwatch names (its `loopwatch_refusals_total` labels),
 * plus "unknown" for a phrase a newer loopwatch may add.
 * @typedef {"cooldown" | "min_interval" | "max_concurrent" | "deny" | "circuit_open" | "unknown"} RefusalReason
 */

/**
 * A loopwatch refusal read from a close reason.
 * @typedef {object} Refusal
 * @property {RefusalReason} reason
 * @property {string} phrase      the words as sent, e.g. "cooldown"
 * @property {number} retryAfter  seconds to wait from the close, at least 1
 */

/**
 * What a close means for reconnecting.
 * - "refused":    a loopwatch refusal with a retry time (close 1013, or the
 *                 4000-4999 code `policy.close_code` puts in its place)
 * - "auth":       an auth failure (a code in `authCloseCodes`, from the backend;
 *                 or a failure before open that the app's `checkAuth` said was one)
 * - "restart":    1012 Service Restart
 * - "overload":   1013 Try Again Later without loopwatch's retry time
 * - "gateway":    1014 Bad Gateway: the upstream was lost
 * - "going-away": 1001 Going Away (a server shutting down, loopwatch draining)
 * - "normal":     1000 Normal Closure
 * - "proxy":      another close with loopwatch's prefix (e.g. close-oldest's 1008);
 *                 never an auth failure, though a backend could write the prefix too
 * - "timeout":    the socket did not open within `openTimeout`
 * - "token":      the token hook failed or timed out (no socket was opened)
 * - "abnormal":   anything else, 1006 included (what a browser reports for a
 *                 refused handshake: 401, 429, 503, 502 all look alike, so the
 *                 code alone never makes a 401 at the upgrade an auth failure)
 * @typedef {"refused" | "auth" | "restart" | "overload" | "gateway" | "going-away" | "normal" | "proxy" | "timeout" | "token" | "abnormal"} CloseKind
 */

/**
 * @typedef {object} CloseInfo
 * @property {number} code
 * @property {string} reason
 * @property {boolean} wasClean
 * @property {CloseKind} kind
 * @property {Refusal | null} refusal  set when kind is "refused"
 */

/**
 * Every close reason loopwatch writes itself starts with this. loopwatch relays
 * the backend's closes unchanged, though, so a backend can write one too.
 */
export const PROXY_PREFIX = "loopwatch: ";

/**
 * The longest retry time loopwatch sends, in seconds: every duration it takes
 * is at most 366 days (docs/refusals.md, "retry-secs"). The grammar allows ten
 * digits (317 years); a longer time is not loopwatch's, and waiting it is never
 * useful.
 */
export const MAX_RETRY_AFTER = 366 * 86400;

/** docs/refusals.md, "The reason grammar": the regular expression, verbatim. */
export const REFUSAL_PATTERN = /^loopwatch: ([\x20-\x2B\x2D-\x7E]{1,64}), retry in ([1-9][0-9]{0,9})s$/;

/** The known phrases and the reason each stands for. */
export const PHRASES = Object.freeze({
  "cooldown": "cooldown",
  "too soon after the last attempt": "min_interval",
  "too many connections": "max_concurrent",
  "denied": "deny",
  "upstream unavailable": "circuit_open",
});

/**
 * The close codes a refusal comes with: 1013, or the application code (4000 to
 * 4999) `policy.close_code` may put in its place.
 * @param {number} code
 */
export function isRefusalCode(code) {
  return code === 1013 || (code >= 4000 && code <= 4999);
}

/** The auth close codes the incident's backend and common apps use. */
export const DEFAULT_AUTH_CLOSE_CODES = Object.freeze([1008, 4001, 4003]);

/**
 * The refusal in a close reason, or null when the reason is not one.
 * An unknown phrase is still a refusal (reason "unknown"): the contract lets
 * loopwatch add phrases, never change the shape. The retry time is capped at
 * MAX_RETRY_AFTER.
 * @param {string} closeReason
 * @returns {Refusal | null}
 */
export function parseRefusal(closeReason) {
  if (typeof closeReason !== "string") return null;
  const match = REFUSAL_PATTERN.exec(closeReason);
  if (match === null) return null;
  const phrase = match[1];
  const reason = Object.hasOwn(PHRASES, phrase) ? /** @type {RefusalReason} */ (PHRASES[phrase]) : "unknown";
  return { reason, phrase, retryAfter: Math.min(Number(match[2]), MAX_RETRY_AFTER) };
}

/**
 * Classify a close as the page saw it (a CloseEvent's code, reason, wasClean).
 * @param {number} code
 * @param {string} reason
 * @param {boolean} wasClean
 * @param {readonly number[]} authCloseCodes
 * @returns {CloseInfo}
 */
export function classifyClose(code, reason, wasClean, authCloseCodes = DEFAULT_AUTH_CLOSE_CODES) {
  // A refusal comes only with the codes loopwatch refuses with: the reason alone
  // could be the backend's (a 1000 "loopwatch: …, retry in 9999999999s" relayed as is).
  const refusal = isRefusalCode(code) ? parseRefusal(reason) : null;
  /** @type {CloseKind} */
  let kind;
  if (refusal !== null) {
    kind = "refused";
  } else if (code === 1012) {
    kind = "restart";
  } else if (code === 1013) {
    kind = "overload";
  } else if (code === 1014) {
    kind = "gateway";
  } else if (code === 1001) {
    kind = "going-away";
  } else if (typeof reason === "string" && reason.startsWith(PROXY_PREFIX)) {
    // loopwatch's own close (close-oldest sends 1008): never the backend's auth verdict.
    kind = "proxy";
  } else if (authCloseCodes.includes(code)) {
    kind = "auth";
  } else if (code === 1000) {
    kind = "normal";
  } else {
    kind = "abnormal";
  }
  return { code, reason: typeof reason === "string" ? reason : "", wasClean: Boolean(wasClean), kind, refusal };
}
