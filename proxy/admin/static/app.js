// loopwatch status page: plain script, no build step, no dependencies.
//
// Data: GET /api/events (Server-Sent Events) pushes a `hello` (full state),
// then `summary` every second, `finding`, `enforcement`, `breaker` events as
// they happen, and `heartbeat`s. Client details come from GET /api/clients/{key};
// actions are POSTs. Every /api call carries the admin token as a bearer
// token when one was entered.
//
// The page must never become a reconnect loop itself: on any stream error it
// closes the EventSource (so the browser's own fixed-interval retry never
// runs) and reopens it with exponential backoff and jitter. An EventSource
// cannot send headers, so each (re)connect first asks POST /api/events/ticket
// for a single-use ticket and puts that, never the token, in the URL.
"use strict";

(() => {
  const TOKEN_KEY = "loopwatch.adminToken";
  const BACKOFF_BASE = 1; // seconds, doubled per failed attempt …
  const BACKOFF_MAX = 30; // … up to this
  const STABLE_AFTER = 10; // a stream that lived this long resets the backoff
  const MAX_RECENT = 100;

  const $ = (id) => document.getElementById(id);
  const el = {
    conn: $("conn"), connText: $("conn-text"), version: $("version"), uptime: $("uptime"),
    upstream: $("upstream"), upstreamDetail: $("upstream-detail"), breakers: $("breakers"),
    storeRow: $("store-row"), store: $("store"), storeDetail: $("store-detail"),
    mode: $("mode"), auth: $("auth"), authText: $("auth-text"), authForm: $("auth-form"),
    tokenInput: $("token-input"), forget: $("forget-token"), main: $("main"),
    cAttempts: $("c-attempts"), cActive: $("c-active"), cHeld: $("c-held"), cTracked: $("c-tracked"),
    cRefusals: $("c-refusals"), cAuth: $("c-auth"),
    sAttempts: $("s-attempts"), sRefusals: $("s-refusals"), sAuth: $("s-auth"),
    clients: document.querySelector("#clients tbody"), clientsEmpty: $("clients-empty"),
    clientsCount: $("clients-count"), recent: document.querySelector("#recent tbody"),
    recentEmpty: $("recent-empty"), detail: $("detail"), detailTitle: $("detail-title"),
    detailState: $("detail-state"), detailSummary: $("detail-summary"),
    detailFindings: $("detail-findings"), history: document.querySelector("#history tbody"),
    release: $("release"), cooldownForm: $("cooldown-form"), cooldownDuration: $("cooldown-duration"),
    actionMsg: $("action-msg"), detailClose: $("detail-close"),
  };

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let source = null; // the open EventSource
  let retryTimer = null;
  let watchdog = null;
  let failures = 0; // consecutive failed connects, for the backoff
  let attempts = 0; // every connect, shown in data-attempts
  let connectedAt = 0;
  let heartbeatInterval = 15;
  let summaryInterval = 1; // the server's, from hello
  let summaryGap = 1; // seconds between the last two summaries (the server spaces them out when they cost)
  let lastSummaryAt = 0;
  let staleTimer = null;
  let clockOffset = null; // browser seconds − server (monotonic) seconds
  let summary = null;
  const clients = new Map(); // key → client object (summary rows, patched by events)
  let order = []; // keys, worst first
  let selected = null;
  let detail = null;
  let detailFetchedAt = 0;
  let detailInFlight = false;

  // --- helpers ----------------------------------------------------------------

  const serverNow = () => (clockOffset === null ? 0 : Date.now() / 1000 - clockOffset);

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    let s = Math.max(0, Math.round(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function fmtClock(t) {
    if (clockOffset === null || t === null || t === undefined) return "–";
    return new Date((t + clockOffset) * 1000).toLocaleTimeString([], { hour12: false });
  }

  const fmtRate = (r) => (r >= 10 ? r.toFixed(0) : r.toFixed(1));

  function node(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function authHeaders(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const init = { method, headers: authHeaders(), cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) {
      showUnauthorized();
      throw new Unauthorized("the admin token is missing or wrong");
    }
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
    return data;
  }

  // --- client state words -------------------------------------------------------

  // ok / flagged / cooldown: the word is always shown beside the colour. The
  // API's status is `cooldown` only while loopwatch refuses the client; an
  // observed cooldown (observe mode, allow list, rollout) is its worst finding.
  function stateOf(c) {
    if (c.status === "cooldown") return "cooldown";
    if (c.status === "critical" || c.status === "warning") return "flagged";
    return "ok";
  }

  // The status the API gives a client not refused: its worst finding, else
  // `warning` while an observed cooldown runs, else ok.
  function flaggedStatus(c) {
    const findings = c.findings || [];
    if (findings.some((f) => f.severity === "critical")) return "critical";
    if (findings.length || (c.cooldown && c.cooldown.rule)) return "warning";
    return "ok";
  }

  function rulesOf(c) {
    const parts = (c.findings || [])
      .slice()
      .sort((a, b) => (a.severity === b.severity ? 0 : a.severity === "critical" ? -1 : 1))
      .map((f) => `${f.rule} · ${f.severity}`);
    if (c.cooldown && c.cooldown.rule === "manual") parts.push("manual cooldown");
    if (c.status !== "cooldown" && c.cooldown && c.cooldown.rule && c.cooldown.enforced === false) {
      parts.push("observe: not refused");
    }
    return parts.join(", ") || "–";
  }

  function codesOf(c) {
    const codes = Object.entries(c.close_codes || {}).sort((a, b) => b[1] - a[1]).slice(0, 3);
    return codes.map(([code, n]) => (n > 1 ? `${code}×${n}` : code)).join(" ") || "–";
  }

  function cooldownLeft(c) {
    if (!c.cooldown || !c.cooldown.until) return null;
    return Math.max(0, c.cooldown.until - serverNow());
  }

  function leftText(c) {
    const left = cooldownLeft(c);
    if (!left) return "–";
    const rule = (c.cooldown || {}).rule;
    const text = rule ? `${fmtDuration(left)} · ${rule}` : fmtDuration(left);
    // An observed cooldown refuses nobody: its countdown read as "refused for
    // 29 s" beside "observe: not refused" (the page probe).
    return c.status !== "cooldown" && c.cooldown.enforced === false ? `observed: ${text}` : text;
  }

  // Evidence values: engine times as clock times, long floats shortened.
  const TIME_KEYS = new Set(["t", "first_seen", "last_seen", "since", "until", "raised_at", "last_match"]);
  function fmtEvidence(k, v) {
    const short = (x) => (typeof x === "number" && !Number.isInteger(x) ? Number(x.toPrecision(4)) : x);
    if (typeof v === "number" && TIME_KEYS.has(k)) return fmtClock(v);
    if (Array.isArray(v)) return v.map(short).join(", ");
    if (v !== null && typeof v === "object") return Object.entries(v).map(([a, b]) => `${a}: ${short(b)}`).join(", ");
    return String(short(v));
  }

  // --- connection status ----------------------------------------------------------

  function setConn(state, text) {
    el.conn.dataset.state = state;
    el.connText.textContent = text;
    // What is on screen is no longer current: dimmed, its time said.
    const stale = state === "stale" || (state === "disconnected" && lastSummaryAt > 0);
    if (stale) document.body.dataset.stale = "true";
    else delete document.body.dataset.stale;
    if (stale && lastSummaryAt) {
      el.connText.textContent += ` — data as of ${new Date(lastSummaryAt).toLocaleTimeString([], { hour12: false })}`;
    }
  }

  function armStale() {
    // Summaries come every summary_interval (spaced out further when they cost):
    // none for three of them and the page says its data is old, long before the
    // watchdog's three heartbeats (45 s of a frozen loopwatch looked live).
    clearTimeout(staleTimer);
    // (+2 s: a summary that costs more than the last is spaced out further,
    // and the page only knows the gap before it.)
    const wait = 3 * Math.max(summaryInterval, summaryGap) + 2;
    staleTimer = setTimeout(() => {
      if (el.conn.dataset.state !== "live") return;
      setConn("stale", "no update"); // since the time setConn adds: a count here would stand still
    }, wait * 1000);
  }

  function showUnauthorized() {
    closeSource();
    clearTimeout(retryTimer);
    retryTimer = null;
    setConn("unauthorized", token ? "401: token rejected" : "401: token required");
    el.authText.textContent = token
      ? "The admin token entered was not accepted (401). Enter the current one."
      : "This loopwatch has an admin token (admin.token). Enter it to see live data; it is kept for this browser tab only and sent as a bearer token.";
    el.auth.hidden = false;
    el.forget.hidden = !token;
    if (document.activeElement !== el.tokenInput) el.tokenInput.focus();
  }

  function closeSource() {
    clearTimeout(watchdog);
    if (source) {
      source.close();
      source = null;
    }
  }

  function scheduleRetry() {
    if (retryTimer) return;
    // Full backoff doubles per failure; the jitter spreads many open pages
    // so they do not all come back in step after a restart.
    const ceiling = Math.min(BACKOFF_MAX, BACKOFF_BASE * 2 ** failures);
    const delay = ceiling * (0.5 + Math.random() * 0.5);
    failures += 1;
    setConn("disconnected", `disconnected — retrying in ${Math.ceil(delay)}s`);
    el.conn.dataset.retryIn = delay.toFixed(2);
    retryTimer = setTimeout(connect, delay * 1000);
  }

  function onStreamLost() {
    closeSource();
    if (connectedAt && Date.now() - connectedAt > STABLE_AFTER * 1000) failures = 0;
    connectedAt = 0;
    scheduleRetry();
  }

  function armWatchdog() {
    // No event (summary or heartbeat) for three heartbeats: the stream is dead
    // even if the socket has not said so.
    clearTimeout(watchdog);
    watchdog = setTimeout(onStreamLost, 3 * heartbeatInterval * 1000);
  }

  async function connect() {
    retryTimer = null;
    closeSource();
    attempts += 1;
    el.conn.dataset.attempts = String(attempts);
    if (el.conn.dataset.state !== "disconnected") setConn("connecting", "connecting…");
    let ticket;
    try {
      const r = await fetch("/api/events/ticket", {
        method: "POST", headers: authHeaders(), cache: "no-store", credentials: "omit",
      });
      if (r.status === 401) {
        // Waiting for a token is not a failure to retry: nothing is asked
        // again until one is entered.
        showUnauthorized();
        return;
      }
      if (!r.ok) throw new Error(`ticket: ${r.status}`);
      ticket = (await r.json()).ticket;
    } catch (e) {
      scheduleRetry();
      return;
    }
    const es = new EventSource("/api/events?ticket=" + encodeURIComponent(ticket));
    source = es;
    es.onerror = () => { if (source === es) onStreamLost(); };
    const on = (type, fn) => es.addEventListener(type, (ev) => {
      if (source !== es) return;
      armWatchdog();
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      fn(data);
    });
    on("hello", onHello);
    on("summary", onSummary);
    on("heartbeat", (d) => { clockOffset = Date.now() / 1000 - d.now; });
    on("finding", onFinding);
    on("enforcement", onEnforcement);
    on("breaker", onBreaker);
  }

  // --- events -----------------------------------------------------------------------

  function onHello(d) {
    connectedAt = Date.now();
    heartbeatInterval = d.heartbeat_interval || heartbeatInterval;
    summaryInterval = d.summary_interval || summaryInterval;
    el.auth.hidden = true;
    el.forget.hidden = !token;
    setConn("live", "live");
    delete el.conn.dataset.retryIn;
    // The summary first: it sets the clock the recent events' times are read on
    // (added before it, every one showed "–").
    onSummary(d);
    el.recent.replaceChildren();
    for (const e of d.recent || []) addRecent(e);
  }

  function onSummary(d) {
    const at = Date.now();
    if (lastSummaryAt) summaryGap = Math.max(summaryInterval, (at - lastSummaryAt) / 1000);
    lastSummaryAt = at;
    if (el.conn.dataset.state === "stale") setConn("live", "live");
    armStale();
    summary = d;
    clockOffset = Date.now() / 1000 - d.now;
    clients.clear();
    order = [];
    for (const c of d.clients || []) {
      clients.set(c.key, c);
      order.push(c.key);
    }
    renderHeader();
    renderCounters();
    renderClients();
    if (selected) {
      const c = clients.get(selected);
      // Refresh the detail view when the client changed, at most once a second.
      const changed = !detail || !c || c.last_seen !== detail.last_seen || c.status !== detail.status;
      if (changed && Date.now() - detailFetchedAt > 1000) loadDetail();
      else renderDetailLive();
    }
  }

  // Events patch the table at once; the next summary is authoritative again.
  function patch(key, fn) {
    let c = clients.get(key);
    if (!c) {
      c = { key, status: "ok", attempts_per_second: 0, close_codes: {}, findings: [], cooldown: {}, first_seen: null };
      clients.set(key, c);
      order.push(key);
    }
    fn(c);
    renderClients();
  }

  function onFinding(e) {
    addRecent(e);
    if (e.change === "raised") {
      patch(e.key, (c) => {
        c.findings = (c.findings || []).filter((f) => f.rule !== e.rule);
        c.findings.push({ rule: e.rule, severity: e.severity, evidence: e.evidence, raised_at: e.t });
        if (c.status !== "cooldown") c.status = flaggedStatus(c);
      });
    } else if (clients.has(e.key)) {
      patch(e.key, (c) => {
        c.findings = (c.findings || []).filter((f) => f.rule !== e.rule);
        if (c.status !== "cooldown") c.status = flaggedStatus(c);
      });
    }
    if (e.key === selected) loadDetail();
  }

  function onEnforcement(e) {
    addRecent(e);
    if (e.action === "cooldown_started") {
      patch(e.key, (c) => {
        c.cooldown = { until: e.until, rule: e.rule, repeat: e.repeat, enforced: e.enforced, remaining: e.duration };
        c.status = e.enforced === false ? flaggedStatus(c) : "cooldown";
      });
    } else if (e.action === "cooldown_ended" && clients.has(e.key)) {
      patch(e.key, (c) => {
        c.cooldown = {};
        c.status = flaggedStatus(c);
      });
    }
    if (e.key === selected) loadDetail();
  }

  function onBreaker(e) {
    addRecent(e);
    if (summary) {
      for (const b of summary.breakers || []) if (b.name === e.name && b.route === e.route) b.state = e.to;
      renderHeader();
    }
  }

  // --- rendering ------------------------------------------------------------------------

  // The shared state store (state.backend: redis): cut off, or connected but
  // refusing the others' batches (a key that differs, a duplicate replica id),
  // this replica shares nothing; the replicas it hears say with whom it does.
  function renderStore(s) {
    el.storeRow.hidden = s.backend !== "redis";
    if (el.storeRow.hidden) return;
    const refused = Object.entries(s.refused || {});
    const state = !s.up ? "down" : s.refusing ? "degraded" : "healthy";
    el.store.textContent = !s.up ? "cut off" : s.refusing ? "refusing" : "sharing";
    el.store.dataset.state = state;
    const heard = s.replicas_heard || [];
    const detail = [`${s.replica}, hearing ${heard.length ? heard.join(", ") : "no other replica"}`];
    if (refused.length) detail.push("refused since start: " + refused.map(([r, n]) => `${r} ${n}`).join(", "));
    el.storeDetail.textContent = detail.join(" · ");
  }

  function renderHeader() {
    const d = summary;
    if (!d) return;
    el.version.textContent = "v" + d.version;
    el.uptime.textContent = fmtDuration(d.uptime);
    const up = d.upstream || {};
    el.upstream.textContent = up.health || "–";
    el.upstream.dataset.state = up.health || "unknown";
    const detail = [];
    if ((up.routes_down || []).length) detail.push(`breaker not closed: ${up.routes_down.join(", ")}`);
    if (up.errors_30s) detail.push(`${up.errors_30s} errors in 30s`);
    el.upstreamDetail.textContent = detail.join(" · ");
    el.upstream.title = (up.urls || []).join(", ");
    renderStore(d.state_store || {});
    el.breakers.replaceChildren(
      ...(d.breakers || []).flatMap((b, i) => [
        i ? " " : "",
        node("span", { class: "badge", "data-state": b.state, "data-breaker": b.name, "data-route": b.route,
          title: `the ${b.name} breaker of route ${b.route}`,
          text: `${b.route} ${b.name}: ${b.state.replace("_", "-")}${b.enabled === false ? " (off)" : ""}` }),
      ]),
    );
    const m = d.mode || {};
    let mode = m.policy || "–";
    if (m.rollout_percent !== undefined && m.rollout_percent < 100) mode += ` (${m.rollout_percent}% rollout)`;
    const overrides = Object.entries(m.rules || {}).map(([r, v]) => `${r}: ${v}`);
    if (overrides.length) mode += ` · ${overrides.join(", ")}`;
    el.mode.textContent = mode;
  }

  function spark(svg, values) {
    const n = values.length;
    const max = Math.max(1, ...values);
    const pts = values.map((v, i) => `${((i / Math.max(1, n - 1)) * 120).toFixed(1)},${(27 - (v / max) * 25).toFixed(1)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.join(" "));
    const base = document.createElementNS("http://www.w3.org/2000/svg", "line");
    for (const [k, v] of Object.entries({ x1: 0, y1: 27.5, x2: 120, y2: 27.5 })) base.setAttribute(k, v);
    svg.replaceChildren(base, line);
    const label = svg.getAttribute("aria-label").split(" (")[0];
    svg.setAttribute("aria-label", `${label} (peak ${fmtRate(Math.max(0, ...values))}/s)`);
  }

  function renderCounters() {
    const c = summary.counters || {};
    el.cAttempts.textContent = fmtRate(c.attempts_per_second || 0);
    el.cRefusals.textContent = fmtRate(c.refusals_per_second || 0);
    el.cAuth.textContent = fmtRate(c.auth_failures_per_second || 0);
    el.cActive.textContent = String(c.active_connections ?? 0);
    el.cHeld.textContent = c.held_connections ? `${c.held_connections} refused attempts on hold` : "";
    el.cTracked.textContent = `${c.clients_tracked ?? 0} clients tracked, ${c.clients_in_cooldown ?? 0} in cooldown${c.storm ? " · reconnect storm" : ""}`;
    const s = summary.series || {};
    spark(el.sAttempts, s.attempts || []);
    spark(el.sRefusals, s.refusals || []);
    spark(el.sAuth, s.auth_failures || []);
  }

  const rows = new Map(); // key → <tr>, reused so focus survives updates

  function rowFor(key) {
    let tr = rows.get(key);
    if (tr) return tr;
    const button = node("button", { type: "button", class: "key", text: key, title: key, "aria-pressed": "false" });
    button.addEventListener("click", () => select(key));
    tr = node("tr", { dataset: { key } },
      node("th", { scope: "row" }, button),
      node("td", {}, node("span", { class: "badge" })),
      node("td", { class: "rule" }),
      node("td", { class: "num rate" }),
      node("td", { class: "codes" }),
      node("td", { class: "num left" }),
      node("td", { class: "when" }),
    );
    rows.set(key, tr);
    return tr;
  }

  function setText(e, text) { if (e.textContent !== text) e.textContent = text; }

  function renderClients() {
    const want = order.filter((k) => clients.has(k));
    for (const [key, tr] of rows) if (!clients.has(key)) { tr.remove(); rows.delete(key); }
    want.forEach((key, i) => {
      const c = clients.get(key);
      const tr = rowFor(key);
      const state = stateOf(c);
      if (tr.dataset.state !== state) tr.dataset.state = state;
      const badge = tr.cells[1].firstChild;
      badge.dataset.state = state;
      setText(badge, state);
      setText(tr.cells[2], rulesOf(c));
      setText(tr.cells[3], fmtRate(c.attempts_per_second || 0));
      setText(tr.cells[4], codesOf(c));
      setText(tr.cells[5], leftText(c));
      setText(tr.cells[6], c.first_seen === null || c.first_seen === undefined ? "–" : `${fmtDuration(serverNow() - c.first_seen)} ago`);
      const current = key === selected;
      tr.setAttribute("aria-current", current ? "true" : "false");
      tr.cells[0].firstChild.setAttribute("aria-pressed", current ? "true" : "false");
      // Move rows only when out of place: moving a focused button would blur it.
      if (el.clients.children[i] !== tr) el.clients.insertBefore(tr, el.clients.children[i] || null);
    });
    el.clientsEmpty.hidden = want.length > 0;
    const total = summary ? summary.clients_total : want.length;
    el.clientsCount.textContent = total > want.length ? `(${want.length} of ${total}, worst first)` : `(${want.length}, worst first)`;
  }

  function describe(e) {
    if (e.type === "finding") {
      return [`finding ${e.change}`, e.key, `${e.rule} · ${e.severity}`];
    }
    if (e.type === "breaker") {
      return ["breaker", "–", `${e.route} ${e.name}: ${e.from} → ${e.to}`];
    }
    const words = {
      cooldown_started: "cooldown started", cooldown_ended: "cooldown ended",
      close_connection: "connection closed", would_reject: "would reject",
    };
    let what = "";
    if (e.action === "cooldown_started") {
      what = `${fmtDuration(e.duration)} for ${e.rule}${e.repeat > 1 ? `, repeat ${e.repeat}` : ""}${e.enforced ? "" : " (observe: not enforced)"}`;
    } else if (e.action === "close_connection") {
      what = `code ${e.code}${e.reason ? ` ${e.reason}` : ""}`;
    } else if (e.action === "would_reject") {
      what = e.reason;
    }
    return [words[e.action] || e.action, e.key, what];
  }

  function addRecent(e) {
    const [what, key, detailText] = describe(e);
    const tr = node("tr", { dataset: { type: e.type, key: key, change: e.change || e.action || "" } },
      node("td", { class: "when", text: fmtClock(e.t) }),
      node("td", { text: what }),
      node("td", { text: key }),
      node("td", { text: detailText }),
    );
    el.recent.prepend(tr);
    while (el.recent.children.length > MAX_RECENT) el.recent.lastChild.remove();
    el.recentEmpty.hidden = true;
  }

  // --- the selected client ----------------------------------------------------------------

  function select(key) {
    selected = key;
    detail = null;
    el.detail.hidden = false;
    el.detailTitle.textContent = key;
    el.actionMsg.textContent = "";
    renderClients();
    loadDetail();
    el.detailTitle.focus();
  }

  function closeDetail() {
    const key = selected;
    selected = null;
    detail = null;
    el.detail.hidden = true;
    renderClients();
    const tr = rows.get(key);
    if (tr) tr.cells[0].firstChild.focus();
  }

  async function loadDetail() {
    if (!selected || detailInFlight) return;
    const key = selected;
    detailInFlight = true;
    detailFetchedAt = Date.now();
    try {
      const d = await api("GET", `/api/clients/${encodeURIComponent(key)}`);
      if (selected !== key) return;
      clockOffset = Date.now() / 1000 - d.now;
      detail = d;
      renderDetail();
    } catch (e) {
      if (selected === key && !(e instanceof Unauthorized)) {
        detail = null;
        el.detailSummary.textContent = e.message;
      }
    } finally {
      detailInFlight = false;
    }
  }

  function renderDetailLive() {
    if (!detail) return;
    const c = clients.get(detail.key) || detail;
    const state = stateOf(c);
    el.detailState.dataset.state = state;
    el.detailState.textContent = state;
    const left = cooldownLeft(c);
    const parts = [
      `${fmtRate(c.attempts_per_second || 0)} attempts/s`,
      `${detail.attempts_total} attempts`,
      `${c.open_connections ?? detail.open_connections} open`,
      `first seen ${fmtDuration(serverNow() - detail.first_seen)} ago`,
    ];
    if (left) parts.push(`cooldown ${fmtDuration(left)} left (${(c.cooldown || {}).rule})`);
    el.detailSummary.textContent = parts.join(" · ");
  }

  function renderDetail() {
    const d = detail;
    renderDetailLive();
    const findings = (d.findings || []).map((f) => {
      const ev = node("dl", { class: "evidence" });
      for (const [k, v] of Object.entries(f.evidence || {})) {
        ev.append(node("dt", { text: k }), node("dd", { text: fmtEvidence(k, v) }));
      }
      return node("article", { class: "finding", dataset: { severity: f.severity, rule: f.rule } },
        node("h4", {}, node("span", { class: "badge", "data-state": f.severity, text: f.severity }), ` ${f.rule}`),
        node("p", { class: "muted", text: `raised ${fmtClock(f.raised_at)} · last match ${fmtClock(f.last_match)} · clears ${fmtClock(f.clears_at)} if quiet` }),
        ev,
      );
    });
    el.detailFindings.replaceChildren(...(findings.length ? findings : [node("p", { class: "muted", text: "None." })]));
    const history = (d.history || []).slice().reverse().map((h) => {
      const bits = [];
      if (h.reason) bits.push(h.reason);
      if (h.status !== undefined) bits.push(`HTTP ${h.status}`);
      if (h.error) bits.push(h.error);
      if (h.code !== undefined) bits.push(`code ${h.code}`);
      if (h.initiator) bits.push(`by ${h.initiator}`);
      if (h.duration !== undefined) bits.push(`after ${h.duration < 1 ? Math.round(h.duration * 1000) + " ms" : fmtDuration(h.duration)}`);
      return node("tr", {},
        node("td", { class: "when", text: fmtClock(h.t) }),
        node("td", { text: h.type.replace("_", " ") }),
        node("td", { text: bits.join(", ") }),
      );
    });
    el.history.replaceChildren(...history);
  }

  async function act(button, method, path, body, done) {
    const key = selected;
    button.disabled = true;
    el.actionMsg.dataset.kind = "";
    el.actionMsg.textContent = "…";
    try {
      const r = await api(method, path, body);
      el.actionMsg.textContent = done(r);
      if (selected === key) await loadDetail();
    } catch (e) {
      el.actionMsg.dataset.kind = "error";
      el.actionMsg.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  }

  el.release.addEventListener("click", () => {
    const key = selected;
    if (!key) return;
    act(el.release, "POST", `/api/clients/${encodeURIComponent(key)}/release`, undefined, () => {
      // Show it at once; the next summary confirms it.
      patch(key, (c) => { c.status = "ok"; c.findings = []; c.cooldown = {}; });
      return `${key} released`;
    });
  });

  el.cooldownForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = selected;
    if (!key) return;
    const duration = el.cooldownDuration.value.trim();
    const button = el.cooldownForm.querySelector("button");
    act(button, "POST", `/api/clients/${encodeURIComponent(key)}/cooldown`, { duration }, (r) => {
      patch(key, (c) => {
        c.status = "cooldown";
        c.cooldown = { until: serverNow() + r.cooldown_seconds, rule: "manual", enforced: true };
      });
      return `${key}: cooldown for ${fmtDuration(r.cooldown_seconds)}`;
    });
  });

  el.detailClose.addEventListener("click", closeDetail);
  el.detail.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeDetail(); });

  el.authForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = el.tokenInput.value.trim();
    el.tokenInput.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    failures = 0;
    setConn("connecting", "checking token…");
    connect();
  });

  el.forget.addEventListener("click", () => {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    connect();
  });

  // Cooldowns count down between summaries.
  setInterval(() => {
    if (!summary) return;
    for (const tr of rows.values()) {
      const c = clients.get(tr.dataset.key);
      if (c) setText(tr.cells[5], leftText(c));
    }
    if (selected) renderDetailLive();
  }, 1000);

  connect();
})();
