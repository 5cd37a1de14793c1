import assert from "node:assert/strict";
import test from "node:test";

import { Input, State, TRANSITIONS, transition } from "../src/machine.js";

const STATES = Object.values(State);
const INPUTS = Object.values(Input);

test("the table covers every state and names only known states and inputs", () => {
  assert.deepEqual(Object.keys(TRANSITIONS).sort(), [...STATES].sort());
  for (const [from, row] of Object.entries(TRANSITIONS)) {
    for (const [input, to] of Object.entries(row)) {
      assert.ok(INPUTS.includes(/** @type {any} */ (input)), `${from}: unknown input ${input}`);
      assert.ok(STATES.includes(/** @type {any} */ (to)), `${from} --${input}-> unknown ${to}`);
      assert.equal(transition(/** @type {any} */ (from), /** @type {any} */ (input)), to);
    }
  }
});

test("release ends every state but closed, which nothing leaves", () => {
  for (const state of STATES) {
    if (state === State.CLOSED) {
      for (const input of INPUTS) assert.throws(() => transition(state, input), /no transition from closed/);
    } else {
      assert.equal(transition(state, Input.RELEASE), State.CLOSED);
    }
  }
});

test("auth-failed is left only by the app: retry or release", () => {
  assert.deepEqual(Object.keys(TRANSITIONS[State.AUTH_FAILED]).sort(), [Input.RELEASE, Input.RETRY].sort());
  for (const input of [Input.DUE, Input.OPENED, Input.FAILED, Input.START, Input.GIVE_UP]) {
    assert.throws(() => transition(State.AUTH_FAILED, input));
  }
});

test("an attempt is made only from waiting, so every attempt passes a timer", () => {
  const into = STATES.filter((s) => Object.values(TRANSITIONS[s]).includes(State.CONNECTING));
  assert.deepEqual(into, [State.WAITING]);
  assert.equal(transition(State.IDLE, Input.START), State.WAITING);
  assert.equal(transition(State.OPEN, Input.FAILED), State.WAITING);
  assert.equal(transition(State.CONNECTING, Input.FAILED), State.WAITING);
});

test("inputs the table does not allow throw", () => {
  assert.throws(() => transition(State.OPEN, Input.OPENED), /no transition from open on opened/);
  assert.throws(() => transition(State.WAITING, Input.FAILED));
  assert.throws(() => transition(State.IDLE, Input.DUE));
  assert.throws(() => transition(/** @type {any} */ ("nowhere"), Input.START));
});

test("auth-failed is entered only on give-up: after an auth failure, or at start when the key's last manager ended there", () => {
  const into = STATES.filter((s) => Object.values(TRANSITIONS[s]).includes(State.AUTH_FAILED));
  assert.deepEqual(into.sort(), [State.CONNECTING, State.IDLE, State.OPEN].sort());
  for (const from of into) assert.equal(transition(from, Input.GIVE_UP), State.AUTH_FAILED);
  assert.throws(() => transition(State.WAITING, Input.GIVE_UP));
});
