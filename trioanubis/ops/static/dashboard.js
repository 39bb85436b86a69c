// The anubis dashboard: polls /stats once a second and draws listeners, pools and servers.
//
// Rows are built once per listener / server and updated in place, so a weight being typed
// survives the refresh; rates come from the difference between two polls; each row keeps
// the last five minutes of samples for its sparkline. Fields this script does not know
// are shown as readable "key: value" text (objects as "key value, key value"), so /stats
// can grow without breaking the page.
(() => {
"use strict";

const TOKEN_KEY = "anubis-token";
const POLL_MS = 1000;
const HISTORY = 300; // samples kept per series: five minutes at one a second

const KNOWN_LISTENER = new Set(["name", "bind", "pool", "accepted", "active", "rejected"]);
const KNOWN_POOL = new Set(["name", "strategy", "servers", "retired", "mirror", "bandwidth"]);
const KNOWN_SERVER = new Set(["name", "address", "state", "weight", "effective_weight", "active",
  "total", "bytes_in", "bytes_out", "connect_failures", "last_check", "ewma_ms", "max_connections"]);

const listeners = new Map(); // name → row
const pools = new Map(); // name → {section, chart, history, rows: Map(name → row)}
let pending = null; // an action refused for want of a token, retried once the token is given

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function rate(n) {
  if (typeof n !== "number") return "–";
  return n >= 100 ? n.toFixed(0) : n.toFixed(1);
}

function plain(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(2);
  if (typeof value === "object") return readable(value) || "–";
  return String(value);
}

function label(key) { return String(key).replace(/_/g, " "); }

// A value of a field this page does not know, as text a person reads: an object as "key value,
// key value", a list as its items, yes/no for booleans; "" for nothing (null, {}, []).
function readable(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.map(readable).filter((text) => text !== "").join("; ");
  if (typeof value === "object") {
    return Object.entries(value).map(([key, inner]) => [label(key), readable(inner)])
      .filter(([, text]) => text !== "").map(([key, text]) => key + " " + text).join(", ");
  }
  return plain(value);
}

// [name, text] of each field of `record` not in `known` that has something to show.
function extraEntries(record, known) {
  return Object.entries(record).filter(([key]) => !known.has(key))
    .map(([key, value]) => [label(key), readable(value)]).filter(([, text]) => text !== "");
}

function extras(record, known) {
  return extraEntries(record, known).map(([key, text]) => key + ": " + text).join(" · ");
}

// The fields in a table cell, one line each ("faults: latency 200ms, jitter 10ms"); rebuilt only
// when they changed.
function setExtras(node, record, known) {
  const entries = extraEntries(record, known);
  const shown = JSON.stringify(entries);
  if (node.dataset.shown === shown) return;
  node.dataset.shown = shown;
  node.replaceChildren(...entries.map(([key, text]) => el("div", {}, el("span", {class: "key"}, key + ":"),
    " " + text)));
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders(extra = {}) {
  const headers = {...extra};
  if (token()) headers.Authorization = "Bearer " + token();
  return headers;
}

function say(text, kind = "") {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = "notice " + kind;
  message.hidden = false;
}

// ------------------------------------------------------------------ time series

class Series {
  constructor() { this.times = []; this.values = []; this.last = null; }

  // Record counter `value` at `time`; the series holds the rate between this sample and the last.
  add(time, value) {
    if (typeof value !== "number") return;
    if (this.last !== null && time > this.last.time) {
      const delta = value - this.last.value;
      this.times.push(time);
      this.values.push(delta < 0 ? 0 : delta / (time - this.last.time)); // a reload resets counters
      if (this.times.length > HISTORY) { this.times.shift(); this.values.shift(); }
    }
    this.last = {time, value};
  }

  now() { return this.values.length ? this.values[this.values.length - 1] : null; }
  data() { return [this.times, this.values]; }
}

function sparkline(color) {
  const options = {
    width: 110, height: 26, class: "spark", pxAlign: 0,
    cursor: {show: false}, legend: {show: false}, select: {show: false},
    scales: {x: {time: false}, y: {range: (u, min, max) => [0, Math.max(1, max)]}},
    axes: [{show: false}, {show: false}],
    series: [{}, {stroke: color, fill: color + "22", width: 1.5, points: {show: false}}],
  };
  return new uPlot(options, [[], []], el("div"));
}

function chartWidth() {
  return Math.max(320, Math.min(1200, document.getElementById("pools").clientWidth - 40));
}

function poolChart() {
  const options = {
    width: chartWidth(), height: 150, class: "chart",
    legend: {show: true}, cursor: {drag: {x: false, y: false}},
    scales: {x: {time: true}, conns: {range: (u, min, max) => [0, Math.max(1, max)]},
      bytes: {range: (u, min, max) => [0, Math.max(1024, max)]}},
    axes: [{}, {scale: "conns", label: "conn/s", size: 50},
      {scale: "bytes", side: 1, label: "bytes/s", size: 70, grid: {show: false},
        values: (u, ticks) => ticks.map(bytes)}],
    series: [{}, {label: "conn/s", scale: "conns", stroke: "#0969da", width: 1.5, points: {show: false},
      value: (u, v) => rate(v)},
    {label: "bytes/s", scale: "bytes", stroke: "#8250df", width: 1.5, points: {show: false},
      value: (u, v) => bytes(v)}],
  };
  return new uPlot(options, [[], [], []], el("div"));
}

// ------------------------------------------------------------------ listeners

function listenerRow(listener) {
  const cells = {};
  for (const key of ["name", "bind", "pool", "accepted", "active", "rejected", "rate", "spark", "extras"]) {
    const numeric = ["accepted", "active", "rejected", "rate"].includes(key);
    cells[key] = el("td", {class: numeric ? "num" : key === "extras" ? "extras" : ""});
  }
  const row = {
    tr: el("tr", {"data-listener": listener.name}, ...Object.values(cells)),
    cells, accepted: new Series(), spark: sparkline("#0969da"),
  };
  cells.spark.append(row.spark.root);
  document.querySelector("#listeners tbody").append(row.tr);
  return row;
}

function drawListeners(time, list) {
  const seen = new Set();
  for (const listener of list) {
    seen.add(listener.name);
    const row = listeners.get(listener.name) || listenerRow(listener);
    listeners.set(listener.name, row);
    row.accepted.add(time, listener.accepted);
    const c = row.cells;
    setText(c.name, listener.name); setText(c.bind, plain(listener.bind)); setText(c.pool, plain(listener.pool));
    setText(c.accepted, plain(listener.accepted)); setText(c.active, plain(listener.active));
    setText(c.rejected, plain(listener.rejected)); setText(c.rate, rate(row.accepted.now()));
    setExtras(c.extras, listener, KNOWN_LISTENER);
    row.spark.setData(row.accepted.data());
  }
  for (const [name, row] of listeners) {
    if (!seen.has(name)) { row.tr.remove(); row.spark.destroy(); listeners.delete(name); }
  }
}

// ------------------------------------------------------------------ pools and servers

const SERVER_COLUMNS = [
  ["server", ""], ["state", ""], ["weight", "num"], ["active", "num"], ["total", "num"],
  ["conn/s", "num"], ["in", "num"], ["out", "num"], ["bytes/s", "num"], ["fails", "num"],
  ["EWMA", "num"], ["last 5 min", ""], ["other", "extras"], ["", ""],
];

function poolSection(pool) {
  const title = el("h2", {}, el("span", {class: "name"}), el("span", {class: "muted meta"}));
  const head = el("tr", {}, ...SERVER_COLUMNS.map(([label, cls]) => el("th", {class: cls}, label)));
  const body = el("tbody");
  const entry = {
    section: el("div", {class: "pool", "data-pool": pool.name}, title),
    title, body, rows: new Map(), chart: poolChart(), conns: new Series(), bytes: new Series(),
  };
  entry.section.append(entry.chart.root, el("table", {}, el("thead", {}, head), body));
  document.getElementById("pools").append(entry.section);
  return entry;
}

function serverRow(entry, pool, server) {
  const cells = SERVER_COLUMNS.map(([, cls]) => el("td", {class: cls}));
  const row = {
    tr: el("tr", {"data-server": server.name}, ...cells), cells, name: server.name,
    total: new Series(), traffic: new Series(), spark: sparkline("#1a7f37"),
  };
  cells[11].append(row.spark.root);
  const weight = el("input", {class: "weight", type: "number", min: "0", max: "1000000",
    "aria-label": "weight of " + server.name});
  row.weightInput = weight;
  row.drain = el("button", {"data-action": "drain",
    onclick: () => act(pool.name, row.name, "drain")}, "drain");
  row.enable = el("button", {"data-action": "enable",
    onclick: () => act(pool.name, row.name, "enable")}, "enable");
  const setWeight = el("button", {"data-action": "weight", title: "set this weight", onclick: () => {
    act(pool.name, row.name, "weight", {weight: Number(weight.value)});
  }}, "set");
  cells[13].append(el("span", {class: "actions"}, row.drain, row.enable, weight, setWeight));
  entry.body.append(row.tr);
  return row;
}

function stateBadge(server) {
  const state = String(server.state ?? "unknown");
  const ramping = state === "up" && typeof server.effective_weight === "number" &&
    typeof server.weight === "number" && server.effective_weight < server.weight;
  if (ramping) {
    const share = server.weight ? Math.round(100 * server.effective_weight / server.weight) : 0;
    return {text: "slow start " + share + "%", cls: "ramp"};
  }
  return {text: state, cls: ["up", "down", "draining"].includes(state) ? state : "other"};
}

function drawServer(row, time, server, retired) {
  const c = row.cells;
  const state = retired ? "retired" : String(server.state ?? "unknown");
  row.tr.dataset.state = state;
  row.tr.className = "state-" + state + (retired ? " retired" : "");
  row.total.add(time, server.total);
  row.traffic.add(time, (server.bytes_in ?? 0) + (server.bytes_out ?? 0));
  if (!c[0].firstChild) c[0].append(el("strong"), el("br"), el("span", {class: "muted small"}));
  setText(c[0].children[0], server.name); setText(c[0].children[2], plain(server.address));
  const badge = stateBadge(server);
  if (!c[1].firstChild) c[1].append(el("span"), el("span", {class: "check muted small"}));
  setText(c[1].children[0], retired ? "retired, " + badge.text : badge.text);
  c[1].children[0].className = "badge " + badge.cls;
  setText(c[1].children[1], server.last_check ? "check: " + server.last_check : "");
  c[1].children[1].title = server.last_check || "";
  const effective = server.effective_weight;
  setText(c[2], plain(server.weight) +
    (typeof effective === "number" && effective !== server.weight ? " (now " + plain(effective) + ")" : ""));
  setText(c[3], plain(server.active) + (server.max_connections ? " / " + server.max_connections : ""));
  setText(c[4], plain(server.total)); setText(c[5], rate(row.total.now()));
  setText(c[6], bytes(server.bytes_in)); setText(c[7], bytes(server.bytes_out));
  setText(c[8], row.traffic.now() === null ? "–" : bytes(row.traffic.now()));
  setText(c[9], plain(server.connect_failures));
  setText(c[10], server.ewma_ms === null || server.ewma_ms === undefined ? "–" : plain(server.ewma_ms) + " ms");
  setExtras(c[12], server, KNOWN_SERVER);
  row.spark.setData(row.total.data());
  row.drain.hidden = retired || state === "draining";
  row.enable.hidden = retired || state !== "draining";
  if (document.activeElement !== row.weightInput && typeof server.weight === "number") {
    row.weightInput.value = server.weight;
  }
  row.weightInput.parentNode.hidden = retired;
}

// A pool's mirror and bandwidth limits (proxy/mirror.py, proxy/rates.py), a phrase each.
function shaping(pool) {
  const phrases = [];
  const mirror = pool.mirror;
  if (mirror && typeof mirror === "object") {
    const dropped = readable(mirror.dropped);
    phrases.push("mirror → " + plain(mirror.to) + " (" + plain(mirror.percent) + "%): " +
      plain(mirror.connections) + " copied, " + bytes(mirror.bytes) + (dropped ? ", dropped " + dropped : ""));
  }
  const limits = pool.bandwidth;
  if (limits && typeof limits === "object") {
    const rates = ["upload_rate", "download_rate", "upload_rate_per_client", "download_rate_per_client"]
      .filter((key) => limits[key]).map((key) => label(key) + " " + plain(limits[key]));
    const waited = limits.waited_seconds || {};
    phrases.push("bandwidth" + (rates.length ? " " + rates.join(", ") : "") + ": " +
      plain(limits.limited_connections) + " limited, waited " + plain(waited.upload) + " s up, " +
      plain(waited.download) + " s down" +
      (limits.tracked_clients !== undefined ? ", " + plain(limits.tracked_clients) + " clients tracked" : ""));
  }
  return phrases;
}

function drawPool(time, pool) {
  const entry = pools.get(pool.name) || poolSection(pool);
  pools.set(pool.name, entry);
  setText(entry.title.children[0], "Pool " + pool.name);
  const meta = ["strategy " + plain(pool.strategy), ...shaping(pool)];
  const more = extras(pool, KNOWN_POOL);
  setText(entry.title.children[1], meta.concat(more ? [more] : []).join(" · "));
  const servers = (pool.servers || []).map((s) => [s, false]).concat((pool.retired || []).map((s) => [s, true]));
  const seen = new Set();
  let total = 0, traffic = 0;
  for (const [server, retired] of servers) {
    const key = (retired ? "retired:" : "") + server.name;
    seen.add(key);
    const row = entry.rows.get(key) || serverRow(entry, pool, server);
    entry.rows.set(key, row);
    drawServer(row, time, server, retired);
    total += server.total || 0;
    traffic += (server.bytes_in || 0) + (server.bytes_out || 0);
  }
  for (const [key, row] of entry.rows) {
    if (!seen.has(key)) { row.tr.remove(); row.spark.destroy(); entry.rows.delete(key); }
  }
  entry.conns.add(time, total);
  entry.bytes.add(time, traffic);
  entry.chart.setData([entry.conns.times, entry.conns.values, entry.bytes.values]);
}

function drawPools(time, list) {
  const seen = new Set(list.map((pool) => pool.name));
  for (const pool of list) drawPool(time, pool);
  for (const [name, entry] of pools) {
    if (!seen.has(name)) { entry.section.remove(); entry.chart.destroy(); pools.delete(name); }
  }
}

function drawSummary(doc) {
  const ready = document.getElementById("ready");
  setText(ready, doc.draining ? "draining" : doc.ready ? "ready" : "not ready");
  ready.className = "badge " + (doc.draining ? "draining" : doc.ready ? "ready" : "not-ready");
  const limit = doc.max_connections ? " of " + doc.max_connections : "";
  setText(document.getElementById("summary"), plain(doc.active) + limit + " connections open" + fleetText(doc.cluster));
}

// The fleet ([cluster]): whether this instance reaches etcd, and how many instances it sees.
function fleetText(cluster) {
  if (!cluster) return "";
  const link = cluster.connected ? "etcd connected" : "etcd UNREACHABLE (serving the last state)";
  const queued = cluster.queued ? ", " + plain(cluster.queued) + " changes waiting for etcd" : "";
  return " · fleet " + cluster.name + ": " + link + ", " + plain(cluster.instances) + " instances" + queued;
}

function draw(doc) {
  const time = Date.now() / 1000;
  drawSummary(doc);
  drawListeners(time, doc.listeners || []);
  drawPools(time, doc.pools || []);
  setText(document.getElementById("updated"), "updated " + new Date().toLocaleTimeString());
}

// ------------------------------------------------------------------ talking to the admin endpoint

function askToken(why) {
  setText(document.getElementById("token-why"), why);
  const form = document.getElementById("token-form");
  if (form.hidden) { form.hidden = false; document.getElementById("token-input").focus(); }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (error) { /* not JSON: fall through to the status line */ }
  return response.statusText || "error";
}

async function act(pool, server, action, body = null) {
  const url = "/pools/" + encodeURIComponent(pool) + "/servers/" + encodeURIComponent(server) + "/" + action;
  const what = action + " " + server + " (pool " + pool + ")";
  let response;
  try {
    response = await fetch(url, {method: "POST", headers: authHeaders({"Content-Type": "application/json"}),
      body: body === null ? "" : JSON.stringify(body)});
  } catch (error) {
    say("refused: " + what + ": cannot reach the admin endpoint (" + error.message + ")", "error");
    return;
  }
  if (response.status === 401) {
    pending = () => act(pool, server, action, body);
    say("refused: " + what + ": the admin endpoint wants a valid token (401); nothing was changed.", "error");
    askToken(token() ? "The admin endpoint did not accept this token; enter the right one."
      : "The admin endpoint needs its token to change anything.");
    return;
  }
  if (!response.ok) {
    say("refused: " + what + ": " + response.status + " " + await errorText(response), "error");
    return;
  }
  say("done: " + what, "ok");
  poll();
}

let polling = false;

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const response = await fetch("/stats", {headers: authHeaders(), cache: "no-store"});
    if (response.status === 401) {
      askToken("The admin endpoint needs its token to show its stats.");
      setText(document.getElementById("updated"), "stats refused (401)");
    } else if (!response.ok) {
      setText(document.getElementById("updated"), "/stats answered " + response.status);
    } else {
      draw(await response.json());
    }
  } catch (error) {
    setText(document.getElementById("updated"), "admin endpoint unreachable: " + error.message);
  } finally {
    polling = false;
  }
}

window.addEventListener("resize", () => {
  for (const entry of pools.values()) entry.chart.setSize({width: chartWidth(), height: 150});
});

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value);
  document.getElementById("token-form").hidden = true;
  const retry = pending;
  pending = null;
  if (retry) retry(); else poll();
});

poll();
setInterval(poll, POLL_MS);
})();
