import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

import { classifyClose, MAX_RETRY_AFTER, parseRefusal, PHRASES, REFUSAL_PATTERN } from "../src/refusal.js";

const DOC = new URL("../../docs/refusals.md", import.meta.url);

test("the pattern is the one docs/refusals.md states", () => {
  const doc = readFileSync(DOC, "utf8");
  assert.ok(doc.includes(REFUSAL_PATTERN.source), REFUSAL_PATTERN.source);
  const abnf = doc.split("```abnf")[1].split("```")[0];
  const phrases = Object.fromEntries([...abnf.matchAll(/%s"([^"]+)"\s+; reason: (\w+)/g)].map((m) => [m[1], m[2]]));
  assert.deepEqual(phrases, { ...PHRASES });
});

test("every known phrase is read with its reason and retry time", () => {
  for (const [phrase, reason] of Object.entries(PHRASES)) {
    assert.deepEqual(parseRefusal(`loopwatch: ${phrase}, retry in 17s`), { reason, phrase, retryAfter: 17 });
  }
  // The grammar allows 317 years; loopwatch never says more than 366 days, so neither does the client.
  assert.equal(MAX_RETRY_AFTER, 31_622_400);
  assert.equal(parseRefusal("loopwatch: cooldown, retry in 31622400s").retryAfter, 31_622_400);
  assert.equal(parseRefusal("loopwatch: cooldown, retry in 31622401s").retryAfter, 31_622_400);
  assert.equal(parseRefusal("loopwatch: cooldown, retry in 9999999999s").retryAfter, 31_622_400);
});

test("an unknown phrase is still a refusal with its retry time", () => {
  assert.deepEqual(parseRefusal("loopwatch: held too long, retry in 3s"), {
    reason: "unknown",
    phrase: "held too long",
    retryAfter: 3,
  });
});

test("what the grammar excludes is no refusal", () => {
  for (const reason of [
    "",
    "token expired",
    "loopwatch: cooldown, retry in 0s",
    "loopwatch: cooldown, retry in 05s",
    "loopwatch: cooldown, retry in 1.5s",
    "loopwatch: cooldown, retry in 12345678901s",
    "loopwatch: a, b, retry in 5s",
    "loopwatch: cooldown,retry in 5s",
    "Loopwatch: cooldown, retry in 5s",
    "loopwatch: cooldown, retry in 5",
    "loopwatch: , retry in 5s",
    "loopwatch: more than 1 connections",
    " loopwatch: cooldown, retry in 5s",
    "loopwatch: cooldown, retry in 5s ",
  ]) {
    assert.equal(parseRefusal(reason), null, reason);
  }
  assert.equal(parseRefusal(/** @type {any} */ (undefined)), null);
});

test("closes are classified by what they mean for reconnecting", () => {
  const kind = (code, reason = "", codes) => classifyClose(code, reason, true, codes).kind;
  assert.equal(kind(1013, "loopwatch: cooldown, retry in 5s"), "refused");
  assert.equal(kind(4429, "loopwatch: cooldown, retry in 5s"), "refused"); // policy.close_code: 4000-4999
  assert.equal(kind(4000, "loopwatch: cooldown, retry in 5s"), "refused");
  assert.equal(kind(4999, "loopwatch: cooldown, retry in 5s"), "refused");
  // The same reason with another code is the backend's, relayed as is: no refusal, no retry time.
  const lookalike = "loopwatch: denied, retry in 9999999999s";
  assert.equal(classifyClose(1000, lookalike, true).refusal, null);
  assert.equal(kind(1000, lookalike), "proxy");
  assert.equal(kind(1008, lookalike), "proxy");
  assert.equal(kind(1011, lookalike), "proxy");
  assert.equal(kind(3999, lookalike), "proxy");
  assert.equal(kind(5000, lookalike), "proxy");
  assert.equal(kind(1006, lookalike), "proxy");
  assert.equal(kind(1013, "overloaded"), "overload");
  assert.equal(kind(1013), "overload");
  assert.equal(kind(1012), "restart");
  assert.equal(kind(1014, "loopwatch: upstream connection lost"), "gateway");
  assert.equal(kind(1001, "loopwatch: shutting down"), "going-away");
  assert.equal(kind(1000), "normal");
  assert.equal(kind(1006), "abnormal");
  assert.equal(kind(1011), "abnormal");
  // Auth: the backend's 1008 and the app's codes, but never loopwatch's own 1008 (close-oldest).
  assert.equal(kind(1008, "token expired"), "auth");
  assert.equal(kind(4001), "auth");
  assert.equal(kind(4003), "auth");
  assert.equal(kind(1008, "loopwatch: more than 3 connections"), "proxy");
  assert.equal(kind(1009, "loopwatch: message too big"), "proxy");
  // Configurable auth codes.
  assert.equal(kind(4001, "", [4401]), "abnormal");
  assert.equal(kind(4401, "", [4401]), "auth");
  assert.equal(kind(1008, "token expired", [4401]), "abnormal");
});

test("a classified close keeps the code, reason, cleanliness and refusal", () => {
  assert.deepEqual(classifyClose(1013, "loopwatch: denied, retry in 300s", true), {
    code: 1013,
    reason: "loopwatch: denied, retry in 300s",
    wasClean: true,
    kind: "refused",
    refusal: { reason: "deny", phrase: "denied", retryAfter: 300 },
  });
  assert.deepEqual(classifyClose(1006, undefined, false), {
    code: 1006,
    reason: "",
    wasClean: false,
    kind: "abnormal",
    refusal: null,
  });
});
