// loopwatch's client companion: one WebSocket per URL per page that reconnects
// the way docs/refusals.md asks. No dependencies; an ES module with JSDoc types.

export { sharedConnection, pageRegistry, Registry, Connection, ConnectionManager } from "./connection.js";
export { State, Input, TRANSITIONS, transition } from "./machine.js";
export {
  parseRefusal,
  classifyClose,
  isRefusalCode,
  REFUSAL_PATTERN,
  PHRASES,
  PROXY_PREFIX,
  MAX_RETRY_AFTER,
  DEFAULT_AUTH_CLOSE_CODES,
} from "./refusal.js";
export { fullJitter, backoffCap, DEFAULT_BACKOFF } from "./backoff.js";
