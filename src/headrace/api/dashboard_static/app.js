// Headrace's dashboard: reads /health/ready, /metrics and the admin API every
// REFRESH_MS with the admin key kept in this tab's sessionStorage, and writes what it read into
// the page as text (textContent only: key names and metadata are other people's input).
"use strict";

const REFRESH_MS = 5000;
const STORAGE = "headrace-admin-key";
// Every route the page reads; the first two need no key, the others the admin key.
const ROUTES = {
  health: "/health/ready",
  metrics: "/metrics",
  usage: "/admin/usage",
  keys: "/admin/keys",
  deployments: "/admin/deployments",
  feedback: "/admin/feedback",
};
const FEEDBACK_ROWS = 20;

const $ = (id) => document.getElementById(id);
let timer = null;

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
}

function fill(tableId, rows, columns, emptyText) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = $(tableId).querySelectorAll("th").length;
    td.className = "empty";
    td.textContent = emptyText;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const [value, className] of columns(row)) cell(tr, value, className);
    body.appendChild(tr);
  }
}

// Prometheus text format: one sample per line, `name{label="value",...} number`.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

const number = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : n);
const dollars = (n) => (typeof n === "number" ? n.toFixed(6) : n);

async function get(path, key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    const message = (body.error && body.error.message) || response.statusText;
    throw Object.assign(new Error(`The key was refused: ${message}`), { refused: true });
  }
  return response;
}

function renderHealth(health) {
  const status = $("health-status");
  status.textContent = health.status;
  status.className = `badge ${health.status}`;
  const rows = Object.entries(health.checks || {});
  fill("health", rows, ([name, check]) => [
    [name],
    [check.status, check.status],
    [check.error || ""],
  ], "no dependencies checked");
}

function renderMetrics(samples) {
  const one = (name) => samples.find((s) => s.name === name);
  const byStatus = {};
  for (const s of samples) {
    if (s.name !== "headrace_requests_total" || !(s.labels.route || "").startsWith("/v1/")) continue;
    const family = `${String(s.labels.status || "?")[0]}xx`;
    byStatus[family] = (byStatus[family] || 0) + s.value;
  }
  const answered = Object.keys(byStatus).sort().map((k) => `${k}: ${number(byStatus[k])}`);
  const spooling = one("headrace_usage_spooling");
  const facts = [
    ["requests in flight (these reads included)", number((one("headrace_active_requests") || {}).value ?? 0)],
    ["API requests answered since start", answered.join(", ") || "none yet"],
    ["usage records not yet stored", number((one("headrace_usage_pending") || {}).value ?? 0)],
    ["usage records spooling to disk", spooling && spooling.value ? "yes (database unavailable)" : "no"],
  ];
  const list = $("process");
  list.replaceChildren();
  for (const [term, value] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  const oldest = {};
  for (const s of samples) {
    if (s.name === "headrace_queue_oldest_age_seconds") oldest[s.labels.priority] = s.value;
  }
  const depths = samples.filter((s) => s.name === "headrace_queue_depth");
  fill("queue", depths, (s) => [
    [s.labels.priority],
    [number(s.value), "num"],
    [oldest[s.labels.priority] === undefined ? "-" : oldest[s.labels.priority].toFixed(1), "num"],
  ], "no job queue in this process");
}

function usageColumns(field) {
  return (row) => [
    [row[field] ?? "(none)"],
    [number(row.requests), "num"],
    [number(row.prompt_tokens), "num"],
    [number(row.completion_tokens), "num"],
    [dollars(row.cost_usd), "num"],
    [dollars(row.routing_saved_usd), "num"],
    [number(row.cache_hits), "num"],
    [number(row.errors), "num"],
  ];
}

function renderDeployments(deployments) {
  fill("deployments", deployments, (d) => [
    [d.model], [d.name], [d.provider], [d.upstream_model],
    [number(d.in_flight), "num"],
    [d.latency_ewma_ms === null ? null : d.latency_ewma_ms.toFixed(1), "num"],
    [d.breaker, d.breaker.replace("_", "-")],
  ], "no deployments configured");
}

function renderKeys(keys) {
  const now = Date.now();
  fill("keys", keys, (k) => {
    const expired = k.expires_at && Date.parse(k.expires_at) <= now;
    const state = k.revoked ? "revoked" : expired ? "expired" : "active";
    const budget = k.budget_usd === null || k.budget_usd === undefined
      ? null : `${k.budget_usd} / ${k.budget_period}`;
    return [
      [k.name], [k.id], [k.team_id], [k.role],
      [number(k.rpm), "num"], [number(k.tpm), "num"], [number(k.max_parallel), "num"],
      [budget], [k.expires_at], [state, state],
    ];
  }, "no keys yet");
}

function renderFeedback(feedback) {
  fill("feedback", feedback, (f) => [
    [new Date(f.created_at * 1000).toLocaleString()], [f.team_id], [f.key_id], [f.request_id],
    [f.score, "num"], [f.label], [f.comment],
  ], "no feedback yet");
}

async function refresh() {
  const key = sessionStorage.getItem(STORAGE);
  if (!key) return;
  const today = new Date().toISOString().slice(0, 10);
  const usage = (by) => `${ROUTES.usage}?group_by=${by}&since=${today}&until=${today}`;
  const recent = `${ROUTES.feedback}?limit=${FEEDBACK_ROWS}`;
  try {
    const [health, metrics, byModel, byTeam, keys, deployments, feedback] = await Promise.all([
      get(ROUTES.health).then((r) => r.json()),
      get(ROUTES.metrics).then((r) => r.text()),
      get(usage("model"), key).then((r) => r.json()),
      get(usage("team"), key).then((r) => r.json()),
      get(ROUTES.keys, key).then((r) => r.json()),
      get(ROUTES.deployments, key).then((r) => r.json()),
      get(recent, key).then((r) => r.json()),
    ]);
    renderHealth(health);
    renderMetrics(parseMetrics(metrics));
    fill("usage-model", byModel.data || [], usageColumns("model"), "no requests today");
    fill("usage-team", byTeam.data || [], usageColumns("team_id"), "no requests today");
    renderKeys(keys.data || []);
    renderDeployments(deployments.data || []);
    renderFeedback(feedback.data || []);
    $("error").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    if (error.refused) forget(false);
  }
}

function open() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("forget").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function forget(clearError = true) {
  sessionStorage.removeItem(STORAGE);
  clearInterval(timer);
  $("board").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("updated").textContent = "";
  if (clearError) $("error").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORAGE, $("key").value.trim());
    $("key").value = "";
    open();
  });
  $("forget").addEventListener("click", () => forget());
  if (sessionStorage.getItem(STORAGE)) open();
});
