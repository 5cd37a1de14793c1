import assert from "node:assert/strict";
import test from "node:test";

import { backoffCap, checkBackoff, DEFAULT_BACKOFF, fullJitter } from "../src/backoff.js";

test("the cap doubles from initial and stops at max", () => {
  const caps = [1, 2, 3, 4, 5, 6, 7].map((n) => backoffCap(n, DEFAULT_BACKOFF));
  assert.deepEqual(caps, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
  assert.equal(backoffCap(0, DEFAULT_BACKOFF), 0);
  assert.equal(backoffCap(1e9, DEFAULT_BACKOFF), 30000); // no overflow, no endless loop
  assert.equal(backoffCap(3, { initial: 500, max: 10000, factor: 3 }), 4500);
  assert.equal(backoffCap(5, { initial: 500, max: 10000, factor: 1 }), 500);
});

test("full jitter is uniform between 0 and the cap", () => {
  assert.equal(fullJitter(3, DEFAULT_BACKOFF, () => 0), 0);
  assert.equal(fullJitter(3, DEFAULT_BACKOFF, () => 0.5), 2000);
  assert.ok(fullJitter(3, DEFAULT_BACKOFF, () => 0.999999) < 4000);
  let seed = 7;
  const random = () => ((seed = (seed * 16807) % 2147483647) - 1) / 2147483646;
  for (let n = 1; n < 12; n++) {
    const d = fullJitter(n, DEFAULT_BACKOFF, random);
    assert.ok(d >= 0 && d < backoffCap(n, DEFAULT_BACKOFF), `${n}: ${d}`);
  }
});

test("bad backoff options are refused with the field's name", () => {
  assert.throws(() => checkBackoff({ initial: 0, max: 10, factor: 2 }), /backoff.initial/);
  assert.throws(() => checkBackoff({ initial: 10, max: 5, factor: 2 }), /backoff.max/);
  assert.throws(() => checkBackoff({ initial: 10, max: 50, factor: 0.5 }), /backoff.factor/);
  assert.throws(() => checkBackoff({ initial: NaN, max: 50, factor: 2 }), /backoff.initial/);
  assert.deepEqual(checkBackoff({ initial: 10, max: 50, factor: 2 }), { initial: 10, max: 50, factor: 2 });
});
