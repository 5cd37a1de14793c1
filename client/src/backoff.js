// Exponential backoff with full jitter (Marc Brooker, "Exponential Backoff And
// Jitter", AWS Architecture Blog, 2015): the delay is drawn uniformly between
// 0 and the exponential cap, so clients that failed together spread out.
// The connection adds the draw to a floor (minInterval, or overloadDelay after
// a 1013): clamping it to the floor instead, max(draw, floor), would put every
// draw below the floor on the floor itself, and with the defaults (initial =
// minInterval) every first retry of a fleet at the same millisecond.

/**
 * @typedef {object} BackoffOptions
 * @property {number} initial  ms, the cap after the first failure
 * @property {number} max      ms, the cap never grows beyond this
 * @property {number} factor   growth of the cap per failure, at least 1
 */

/** @type {Readonly<BackoffOptions>} */
export const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000, factor: 2 });

/**
 * The cap for the n-th consecutive failure (n >= 1): initial × factor^(n−1), at most max.
 * @param {number} failures
 * @param {BackoffOptions} options
 * @returns {number}
 */
export function backoffCap(failures, options) {
  if (failures <= 0) return 0;
  // Computed step by step so a huge failure count cannot overflow to Infinity × 0.
  let cap = options.initial;
  for (let i = 1; i < failures && cap < options.max; i++) cap *= options.factor;
  return Math.min(cap, options.max);
}

/**
 * A full-jitter delay for the n-th consecutive failure: uniform in [0, cap).
 * @param {number} failures
 * @param {BackoffOptions} options
 * @param {() => number} random  uniform in [0, 1), like Math.random
 * @returns {number}
 */
export function fullJitter(failures, options, random) {
  return random() * backoffCap(failures, options);
}

/**
 * Check backoff options; throws a TypeError naming the bad field.
 * @param {BackoffOptions} options
 * @returns {BackoffOptions}
 */
export function checkBackoff(options) {
  const { initial, max, factor } = options;
  if (!(Number.isFinite(initial) && initial > 0)) throw new TypeError(`backoff.initial: expected ms > 0, got ${initial}`);
  if (!(Number.isFinite(max) && max >= initial)) throw new TypeError(`backoff.max: expected ms >= initial, got ${max}`);
  if (!(Number.isFinite(factor) && factor >= 1)) throw new TypeError(`backoff.factor: expected >= 1, got ${factor}`);
  return Object.freeze({ initial, max, factor });
}
