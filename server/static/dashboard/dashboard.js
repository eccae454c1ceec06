// The routing dashboard: which expert carried each token. Plain JavaScript, no build step, no outside files.
// Data: GET /access (which secrets the server asks for), GET /scalings (polled), GET /scalings/{id}
// (?include_text=true at admin level), GET/PATCH /routing, POST /generate (streamed, with return_scalings).
"use strict";

const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac"];
const POLL_MS = 1500;

const state = {
  access: null, // {api_key_required, admin_token_required}
  apiKey: sessionStorage.getItem("xlora.apiKey") || "",
  adminToken: sessionStorage.getItem("xlora.adminToken") || "",
  experts: [],
  entries: [], // /scalings entries, oldest first
  signature: "",
  selected: null, // request id
  detail: null,
  routing: null,
  pinned: null,
  routingSeq: 0,
  polling: null,
  keyRefused: false, // stop asking with a key the server refused, until another is entered
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// ---- the API --------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeader(admin) {
  // The admin token also opens client routes; the API key never opens admin ones.
  const token = admin ? state.adminToken || state.apiKey : state.apiKey || state.adminToken;
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, { method = "GET", body, admin = false } = {}) {
  const headers = authHeader(admin);
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.message || response.statusText, error.code);
  }
  return data;
}

function say(node, text, kind) {
  node.textContent = text;
  node.className = "message" + (kind ? " " + kind : "");
}

// ---- colours --------------------------------------------------------------------------------------------

function expertColour(i) {
  return PALETTE[i % PALETTE.length];
}

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// A token's background: the experts' colours mixed by its weights, lightened so the text stays readable.
function mixedColour(weights) {
  const total = weights.reduce((a, b) => a + Math.max(b, 0), 0) || 1;
  const mix = [0, 0, 0];
  weights.forEach((w, i) => rgb(expertColour(i)).forEach((c, k) => { mix[k] += (Math.max(w, 0) / total) * c; }));
  const light = mix.map((c) => Math.round(c * 0.45 + 255 * 0.55));
  return `rgb(${light[0]}, ${light[1]}, ${light[2]})`;
}

// Sequential scale for heatmaps: 0 -> near white, 1 -> dark blue.
function heatColour(value) {
  const v = Math.min(Math.max(value, 0), 1);
  const lo = [247, 251, 255];
  const hi = [8, 48, 107];
  const c = lo.map((l, k) => Math.round(l + (hi[k] - l) * v));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function argmax(values) {
  let best = 0;
  values.forEach((v, i) => { if (v > values[best]) best = i; });
  return best;
}

function shareBar(shares, testid) {
  const total = shares.reduce((a, b) => a + b, 0) || 1;
  const bar = el("span", { class: "sharebar", "data-testid": testid });
  shares.forEach((s, i) => {
    const pct = (100 * s) / total;
    bar.append(el("i", { style: `width:${pct}%;background:${expertColour(i)}`, title: `${state.experts[i]} ${pct.toFixed(1)}%` }));
  });
  return bar;
}

function renderLegend() {
  for (const legend of document.querySelectorAll(".legend")) {
    legend.replaceChildren(...state.experts.map((name, i) =>
      el("span", { "data-expert": i }, el("span", { class: "swatch", style: `background:${expertColour(i)}` }), name)));
  }
}

// ---- auth -----------------------------------------------------------------------------------------------

function askForKey(message) {
  $("key-form").hidden = false;
  if (message) say($("key-message"), message, "error");
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.apiKey = $("key-input").value.trim();
  sessionStorage.setItem("xlora.apiKey", state.apiKey);
  say($("key-message"), "");
  state.keyRefused = false;
  await refresh();
});

$("admin-input").addEventListener("change", () => {
  state.adminToken = $("admin-input").value.trim();
  sessionStorage.setItem("xlora.adminToken", state.adminToken);
  if (state.selected) selectRequest(state.selected);
});

// ---- requests -------------------------------------------------------------------------------------------

function routingText(routing) {
  if (!routing) return "";
  const parts = [routing.top_k == null ? "dense" : `top-${routing.top_k}`, `weight ${routing.global_scaling_weight}`];
  if (routing.freeze_after != null) parts.push(`freeze after ${routing.freeze_after}`);
  return parts.join(" · ");
}

function renderRequests() {
  const list = $("request-list");
  const newestFirst = [...state.entries].reverse();
  $("requests-empty").hidden = newestFirst.length > 0;
  list.replaceChildren(...newestFirst.map((entry) => {
    const when = new Date(entry.created * 1000).toLocaleTimeString();
    const item = el("li", { "data-testid": "request", "data-id": entry.id, class: entry.id === state.selected ? "selected" : "",
      onclick: () => selectRequest(entry.id) },
      el("span", { class: "rid" }, entry.id),
      el("span", { class: "when" }, when),
      el("span", { class: "counts" }, `${entry.prompt_tokens} prompt + ${entry.completion_tokens} answer tokens`),
      el("span", { class: "routing" }, routingText(entry.routing)),
      el("span", { class: "constraint", "data-testid": "constraint" },
        entry.constraint ? `constrained: ${entry.constraint}` : ""),
      el("span", { class: "bars" },
        el("span", { class: "hint" }, "prompt"), shareBar(entry.prompt_mean_scalings, "prompt-share"),
        el("span", { class: "hint" }, "answer"), shareBar(entry.completion_mean_scalings, "completion-share")));
    return item;
  }));
}

function renderUsage() {
  const usage = $("usage");
  const n = state.entries.length;
  if (!n) {
    usage.replaceChildren(el("p", { class: "hint" }, "Nothing logged yet."));
    return;
  }
  const mean = (key) => state.experts.map((_, i) => state.entries.reduce((a, e) => a + e[key][i], 0) / n);
  const prompt = mean("prompt_mean_scalings");
  const answer = mean("completion_mean_scalings");
  const rows = state.experts.map((name, i) => el("tr", { "data-testid": "usage-row", "data-expert": i },
    el("td", {}, el("span", { class: "swatch", style: `display:inline-block;width:.7rem;height:.7rem;background:${expertColour(i)}` }), " ", name),
    el("td", { class: "num" }, (100 * prompt[i]).toFixed(1) + "%"),
    el("td", { class: "num", "data-testid": "usage-answer-share" }, (100 * answer[i]).toFixed(1) + "%")));
  usage.replaceChildren(
    el("p", { class: "hint" }, `${n} request${n === 1 ? "" : "s"}: mean share of each expert, prompts and answers apart.`),
    el("div", { class: "bars", style: "display:grid;grid-template-columns:3.8rem 1fr;gap:3px .4rem;align-items:center" },
      el("span", { class: "hint" }, "prompts"), shareBar(prompt, "usage-prompt"),
      el("span", { class: "hint" }, "answers"), shareBar(answer, "usage-answer")),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "expert"), el("th", {}, "prompts"), el("th", {}, "answers"))),
      el("tbody", {}, ...rows)));
}

async function refresh() {
  let log;
  try {
    log = await api("/scalings");
  } catch (error) {
    if (error.status === 401) {
      state.keyRefused = true;
      askForKey(state.apiKey ? `The key was refused: ${error.message}` : "");
      $("server-status").textContent = "needs the API key";
    } else {
      $("server-status").textContent = `cannot read /scalings: ${error.message}`;
    }
    return false;
  }
  $("key-form").hidden = true;
  const ready = await fetch("/ready").then((r) => r.json()).catch(() => null);
  if (ready && ready.adapters && ready.adapters.length) state.experts = ready.adapters;
  if (log.entries.length) state.experts = log.entries[log.entries.length - 1].adapter_names;
  $("server-status").textContent = ready ? `${ready.model || ""} · ${ready.state}` : "";
  const signature = log.entries.map((e) => e.id).join(",");
  if (signature !== state.signature) {
    state.entries = log.entries;
    state.signature = signature;
    renderLegend();
    renderRequests();
    renderUsage();
    if (!state.selected && log.entries.length) selectRequest(log.entries[log.entries.length - 1].id);
  }
  await refreshRouting();
  if (!state.modelsListed) await listModels();
  return true;
}

async function listModels() {
  // The models a request may name (GET /models, docs/models.md), for the "try it" form's selector.
  const listed = await api("/models").catch(() => null);
  if (!listed) return;
  state.modelsListed = true;
  $("try-model").replaceChildren(...listed.models.map((m) =>
    el("option", { value: m.name }, `${m.name} (${m.kind}${m.experts.length ? ": " + m.experts.join(", ") : ""})`)));
  $("try-model").value = listed.default;
}

function startPolling() {
  if (state.polling) return;
  state.polling = setInterval(() => {
    const keyless = state.access.api_key_required && !state.apiKey && !state.adminToken;
    if (!keyless && !state.keyRefused) refresh().catch(() => {});
  }, POLL_MS);
}

// ---- one request, token by token ------------------------------------------------------------------------

function layerMean(position) {
  // [layer][expert] -> [expert]
  const layers = position.length;
  return position[0].map((_, e) => position.reduce((a, layer) => a + layer[e], 0) / layers);
}

// Token t of the prompt is at position t; completion token j was chosen by the mix at prompt_tokens - 1 + j.
function tokenRows(detail) {
  const rows = [];
  const total = detail.prompt_tokens + detail.completion_tokens;
  for (let t = 0; t < total; t++) {
    const position = t < detail.prompt_tokens ? t : t - 1;
    rows.push(position >= 0 && position < detail.scalings.length ? layerMean(detail.scalings[position]) : null);
  }
  return rows;
}

function visible(text) {
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

function weightsText(weights) {
  return state.experts.map((name, i) => `${name.padEnd(12)} ${weights[i].toFixed(4)}`).join("\n");
}

function tokenNode(text, weights, attrs) {
  const node = el("span", { class: "tok", "data-testid": "token", ...attrs });
  node.append(el("span", { class: "tok-text" }, text));
  const bar = el("span", { class: "tok-bar" });
  if (weights) {
    node.style.background = mixedColour(weights);
    node.dataset.expert = argmax(weights);
    node.dataset.weights = weights.map((w) => w.toFixed(6)).join(",");
    const total = weights.reduce((a, b) => a + Math.max(b, 0), 0) || 1;
    weights.forEach((w, i) => bar.append(el("i", { style: `width:${(100 * Math.max(w, 0)) / total}%;background:${expertColour(i)}` })));
    node.addEventListener("mousemove", (event) => showTooltip(event, `${attrs["data-label"] || ""}\n${weightsText(weights)}`));
    node.addEventListener("mouseleave", hideTooltip);
    node.addEventListener("click", () => pin(node, attrs["data-label"], weights));
  }
  node.append(bar);
  return node;
}

function showTooltip(event, text) {
  const tip = $("tooltip");
  tip.textContent = text.trim();
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 260)}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

function pin(node, label, weights) {
  if (state.pinned) state.pinned.classList.remove("pinned");
  state.pinned = node;
  node.classList.add("pinned");
  const rows = state.experts.map((name, i) => el("tr", {},
    el("td", {}, el("span", { class: "swatch", style: `display:inline-block;width:.7rem;height:.7rem;background:${expertColour(i)}` }), " ", name),
    el("td", {}, weights[i].toFixed(4))));
  $("token-weights").replaceChildren(el("strong", {}, label || ""), el("table", {}, el("tbody", {}, ...rows)));
}

async function selectRequest(id) {
  state.selected = id;
  for (const item of document.querySelectorAll("#request-list li")) item.classList.toggle("selected", item.dataset.id === id);
  const wantText = !state.access || !state.access.admin_token_required || Boolean(state.adminToken);
  let detail;
  let note = "";
  try {
    detail = await api(`/scalings/${encodeURIComponent(id)}${wantText ? "?include_text=true" : ""}`, { admin: wantText });
  } catch (error) {
    if (error.status === 401 && wantText) {
      note = `Token texts refused: ${error.message}. Showing numbers only.`;
      detail = await api(`/scalings/${encodeURIComponent(id)}`).catch(() => null);
    } else if (error.status === 404) {
      note = "This request has left the scalings log.";
    } else {
      note = error.message;
    }
  }
  if (state.selected !== id) return; // another request was picked meanwhile
  if (detail && !detail.tokens && !note) {
    note = "Token texts are admin-level: they are the prompts and answers of every client. " +
      "Enter the admin token (XLORA_ADMIN_TOKEN) in the routing form to see them; each token shows its position until then.";
  }
  state.detail = detail;
  renderDetail(detail, note);
}

function renderDetail(detail, note) {
  $("detail-empty").hidden = Boolean(detail);
  $("detail").hidden = !detail;
  $("text-note").hidden = !note;
  $("text-note").textContent = note;
  if (!detail) return;
  state.experts = detail.adapter_names;
  $("detail-title").textContent = detail.id;
  $("detail-meta").textContent = `${detail.prompt_tokens} prompt + ${detail.completion_tokens} answer tokens · ` +
    `${detail.n_layers} LoRA layers · ${routingText(detail.routing)}` +
    (detail.constraint ? ` · constrained: ${detail.constraint}` : "");
  const rows = tokenRows(detail);
  const frozenFrom = detail.frozen_from == null ? null : detail.frozen_from;
  const nodes = [];
  rows.forEach((weights, t) => {
    if (t === detail.prompt_tokens) nodes.push(el("span", { class: "boundary", "data-testid": "boundary" }, "answer →"));
    const token = detail.tokens ? detail.tokens[t] : null;
    const part = t < detail.prompt_tokens ? "prompt" : "completion";
    const label = token ? `${part} token ${t}: ${JSON.stringify(token.text)}` : `${part} token ${t}`;
    // A prompt token shows the mix at its own position, an answer token the mix at the position before it
    // (the one that chose it): frozen when that position is at or past frozen_from.
    const position = t < detail.prompt_tokens ? t : t - 1;
    const classes = ["tok", token && token.special ? "special" : "", token ? "" : "nontext",
      frozenFrom != null && position >= frozenFrom ? "frozen" : ""].filter(Boolean).join(" ");
    const node = tokenNode(token ? visible(token.text) : `#${t}`, weights,
      { "data-index": t, "data-part": part, "data-label": label });
    node.className = classes;
    nodes.push(node);
  });
  $("tokens").replaceChildren(...nodes);
  $("token-weights").textContent = "Hover or tap a token for its exact weights." +
    (frozenFrom != null ? " Dashed answer tokens were chosen with frozen scalings (routing.freeze_after)." : "");
  state.pinned = null;
  drawTokenHeatmap(detail, rows);
  drawLayerHeatmap(detail);
}

// ---- heatmaps -------------------------------------------------------------------------------------------

const CELL = 14;

function colourScale(x, y, width) {
  // A labelled 0..1 gradient: the value each cell's colour stands for.
  const id = "scale-" + Math.random().toString(36).slice(2);
  const gradient = svg("linearGradient", { id }, svg("stop", { offset: "0%", "stop-color": heatColour(0) }),
    svg("stop", { offset: "50%", "stop-color": heatColour(0.5) }), svg("stop", { offset: "100%", "stop-color": heatColour(1) }));
  return svg("g", { "data-testid": "colour-scale" }, svg("defs", {}, gradient),
    svg("text", { x, y: y + 10, "font-size": 10 }, "scaling weight"),
    svg("rect", { x: x + 80, y, width, height: 10, fill: `url(#${id})`, stroke: "#999" }),
    svg("text", { x: x + 80, y: y + 22, "font-size": 9 }, "0"),
    svg("text", { x: x + 80 + width / 2 - 6, y: y + 22, "font-size": 9 }, "0.5"),
    svg("text", { x: x + 80 + width - 6, y: y + 22, "font-size": 9 }, "1"));
}

function drawHeatmap(container, { rows, cols, rowLabels, colLabels, value, testid, cellTitle, rotateCols }) {
  const left = 90;
  const top = rotateCols ? 70 : 20;
  const width = Math.max(left + cols * CELL + 10, left + 80 + 160 + 20); // room for the colour scale
  const height = top + rows * CELL + 40;
  const root = svg("svg", { xmlns: "http://www.w3.org/2000/svg", width, height,
    "font-family": "DejaVu Sans, sans-serif" });
  root.append(svg("rect", { x: 0, y: 0, width, height, fill: "#fff" }));
  rowLabels.forEach((label, r) => root.append(svg("text", { x: left - 4, y: top + r * CELL + CELL - 3, "font-size": 10,
    "text-anchor": "end" }, label)));
  colLabels.forEach((label, c) => {
    const x = left + c * CELL + CELL / 2;
    root.append(rotateCols
      ? svg("text", { x, y: top - 4, "font-size": 9, transform: `rotate(-60 ${x} ${top - 4})` }, label)
      : svg("text", { x, y: top - 5, "font-size": 9, "text-anchor": "middle" }, label));
  });
  const grid = svg("g", { "data-testid": testid + "-cells", "data-rows": rows, "data-cols": cols });
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = value(r, c);
      grid.append(svg("rect", { x: left + c * CELL, y: top + r * CELL, width: CELL - 1, height: CELL - 1,
        fill: heatColour(v), "data-row": r, "data-col": c, "data-value": v.toFixed(6) },
        svg("title", {}, `${cellTitle(r, c)}: ${v.toFixed(4)}`)));
    }
  }
  root.append(grid, colourScale(left, top + rows * CELL + 10, 160));
  container.replaceChildren(root);
}

function drawTokenHeatmap(detail, rows) {
  // Rows: experts; columns: tokens (so a long request scrolls sideways).
  const labels = rows.map((_, t) => (detail.tokens ? visible(detail.tokens[t].text).slice(0, 8) : String(t)));
  drawHeatmap($("heatmap-token-expert"), {
    rows: detail.adapter_names.length, cols: rows.length, rowLabels: detail.adapter_names, colLabels: labels,
    value: (e, t) => (rows[t] ? rows[t][e] : 0), testid: "heatmap-token-expert", rotateCols: true,
    cellTitle: (e, t) => `token ${t} ${labels[t]} · ${detail.adapter_names[e]}`,
  });
}

// Layer x expert on one screen for any model: decoder layers as rows, each targeted module's experts as
// columns (the embedded default: 30 rows x 7 modules x 3 experts, where one row per LoRA layer made a strip
// 210 rows tall). The grouping comes from the LoRA layers' module names (detail.layer_names); without them,
// experts are rows and LoRA layers columns. Cells shrink to fit MAX_W x MAX_H; <title> gives exact values.
const MAX_W = 1300;
const MAX_H = 560;

function layerGrid(detail) {
  const names = detail.layer_names || [];
  const parsed = names.map((name) => {
    const match = /^(.*?)(\d+)\.(.+)$/.exec(name);
    return match ? { block: Number(match[2]), module: match[3] } : null; // module: "self_attn.q_proj"
  });
  if (names.length !== detail.n_layers || parsed.some((p) => p === null)) {
    return null;
  }
  const blocks = [...new Set(parsed.map((p) => p.block))].sort((a, b) => a - b);
  const modules = [...new Set(parsed.map((p) => p.module))];
  const at = new Map(parsed.map((p, l) => [`${p.block}/${p.module}`, l]));
  return { blocks, modules, layer: (r, m) => at.get(`${blocks[r]}/${modules[m]}`) };
}

function drawLayerHeatmap(detail) {
  const positions = detail.scalings.length || 1;
  const experts = detail.adapter_names;
  const mean = (layer, e) => detail.scalings.reduce((a, p) => a + p[layer][e], 0) / positions;
  const grid = layerGrid(detail);
  // rows x groups of `experts.length` columns; cell(r, c) -> the LoRA layer shown there (undefined: none)
  const rows = grid ? grid.blocks.length : experts.length;
  const groups = grid ? grid.modules.length : 1;
  const cols = grid ? groups * experts.length : detail.n_layers;
  const layerAt = grid
    ? (r, c) => grid.layer(r, Math.floor(c / experts.length))
    : (r, c) => c;
  const expertAt = grid ? (r, c) => c % experts.length : (r) => r;
  const gap = grid && groups > 1 ? 4 : 0;
  const left = 90;
  const top = grid ? 78 : 20;
  const cellW = Math.max(2, Math.min(14, Math.floor((MAX_W - left - 10 - gap * (groups - 1)) / cols)));
  const cellH = Math.max(2, Math.min(14, Math.floor(MAX_H / rows)));
  const colX = (c) => left + c * cellW + (grid ? Math.floor(c / experts.length) * gap : 0);
  const width = Math.max(colX(cols - 1) + cellW + 10, left + 80 + 160 + 20);
  const height = top + rows * cellH + 40;
  const root = svg("svg", { xmlns: "http://www.w3.org/2000/svg", width, height, "font-family": "DejaVu Sans, sans-serif" });
  root.append(svg("rect", { x: 0, y: 0, width, height, fill: "#fff" }));
  const every = Math.ceil(11 / cellH); // label every row that has room
  for (let r = 0; r < rows; r += every) {
    const label = grid ? `layer ${grid.blocks[r]}` : experts[r].slice(0, 12);
    root.append(svg("text", { x: left - 4, y: top + r * cellH + cellH - 2, "font-size": Math.min(10, cellH * every - 1),
      "text-anchor": "end" }, label));
  }
  if (grid) {
    grid.modules.forEach((module, m) => {
      const x = colX(m * experts.length);
      const w = experts.length * cellW;
      root.append(svg("text", { x: x + w / 2, y: 12, "font-size": 10, "text-anchor": "middle", "data-testid": "module-label" },
        module.split(".").pop().replace(/_proj$/, "").slice(0, Math.max(2, Math.floor(w / 6)))));
      experts.forEach((name, e) => {
        const cx = x + e * cellW + cellW / 2;
        root.append(svg("rect", { x: x + e * cellW, y: 18, width: cellW - 1, height: 5, fill: expertColour(e) },
          svg("title", {}, `${module} · ${name}`)));
        if (cellW >= 9) {
          root.append(svg("text", { x: cx, y: top - 4, "font-size": 9, transform: `rotate(-60 ${cx} ${top - 4})` }, name.slice(0, 8)));
        }
      });
    });
  } else {
    root.append(svg("text", { x: left, y: 12, "font-size": 10 }, `LoRA layers 0 to ${detail.n_layers - 1}, left to right`));
  }
  const cells = svg("g", { "data-testid": "heatmap-layer-expert-cells", "data-rows": rows, "data-cols": cols });
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const layer = layerAt(r, c);
      if (layer === undefined) continue;
      const e = expertAt(r, c);
      const v = mean(layer, e);
      const where = detail.layer_names ? detail.layer_names[layer] : `LoRA layer ${layer}`;
      cells.append(svg("rect", { x: colX(c), y: top + r * cellH, width: cellW - (cellW > 3 ? 1 : 0),
        height: cellH - (cellH > 3 ? 1 : 0), fill: heatColour(v), "data-row": r, "data-col": c, "data-layer": layer,
        "data-expert": e, "data-value": v.toFixed(6) }, svg("title", {}, `${where} (LoRA layer ${layer}) · ${experts[e]}: ${v.toFixed(4)}`)));
    }
  }
  root.append(cells, colourScale(left, top + rows * cellH + 10, 160));
  $("heatmap-layer-expert").replaceChildren(root);
}

function download(blob, name) {
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

for (const button of document.querySelectorAll("[data-export]")) {
  button.addEventListener("click", () => {
    const root = $(button.dataset.target).querySelector("svg");
    if (!root) return;
    const text = new XMLSerializer().serializeToString(root);
    const name = `${button.dataset.target}-${state.selected || "request"}`;
    if (button.dataset.export === "svg") {
      download(new Blob([text], { type: "image/svg+xml" }), name + ".svg");
      return;
    }
    const image = new Image();
    image.onload = () => {
      const canvas = el("canvas", { width: root.width.baseVal.value * 2, height: root.height.baseVal.value * 2 });
      const context = canvas.getContext("2d");
      context.scale(2, 2);
      context.drawImage(image, 0, 0);
      canvas.toBlob((blob) => download(blob, name + ".png"), "image/png");
    };
    image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
  });
}

// ---- routing --------------------------------------------------------------------------------------------

async function refreshRouting() {
  // Polls overlap with PATCHes: an answer older than the latest request or change is dropped.
  const seq = ++state.routingSeq;
  let routing;
  try {
    routing = await api("/routing");
  } catch (error) {
    if (seq === state.routingSeq) $("routing-now").textContent = error.status === 503 ? "the model is loading" : error.message;
    return;
  }
  if (seq !== state.routingSeq) return;
  showRouting(routing);
}

function showRouting(routing) {
  const first = state.routing === null;
  state.routing = routing;
  $("routing-now").textContent = routingText(routing);
  const select = $("routing-top-k");
  if (select.options.length !== state.experts.length + 1) {
    select.replaceChildren(el("option", { value: "" }, "dense (all experts)"),
      ...state.experts.map((_, i) => el("option", { value: i + 1 }, String(i + 1))));
    select.value = routing.top_k == null ? "" : String(routing.top_k);
  }
  $("routing-freeze-label").hidden = !("freeze_after" in routing);
  if (first) {
    select.value = routing.top_k == null ? "" : String(routing.top_k);
    $("routing-weight").value = routing.global_scaling_weight;
    if ("freeze_after" in routing) $("routing-freeze").value = routing.freeze_after == null ? "" : routing.freeze_after;
  }
}

$("routing-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const typed = $("admin-input").value.trim();
  if (typed !== state.adminToken) {
    state.adminToken = typed;
    sessionStorage.setItem("xlora.adminToken", typed);
  }
  const body = {
    top_k: $("routing-top-k").value === "" ? null : Number($("routing-top-k").value),
    global_scaling_weight: Number($("routing-weight").value),
  };
  if (!$("routing-freeze-label").hidden) {
    body.freeze_after = $("routing-freeze").value === "" ? null : Number($("routing-freeze").value);
  }
  const message = $("routing-message");
  if (state.access && state.access.admin_token_required && !state.adminToken) {
    say(message, "Changing the routing is admin-level: enter the admin token (XLORA_ADMIN_TOKEN) first.", "error");
    return;
  }
  try {
    state.routingSeq++; // any GET /routing in flight predates this change
    const routing = await api("/routing", { method: "PATCH", body, admin: true });
    state.routingSeq++;
    say(message, `Routing changed: ${routingText(routing)} (requests that start from now on).`, "ok");
    state.routing = null;
    showRouting(routing);
  } catch (error) {
    const why = error.status === 401 ? "the admin token was refused" : `HTTP ${error.status}`;
    say(message, `Refused (${why}): ${error.message}`, "error");
  }
});

// ---- try it ---------------------------------------------------------------------------------------------

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

$("try-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("try-output");
  const message = $("try-message");
  output.replaceChildren();
  say(message, "sending…");
  const body = {
    messages: [{ role: "user", content: $("try-prompt").value }],
    max_new_tokens: Number($("try-max").value) || 48,
    stream: true,
    return_scalings: true,
  };
  if ($("try-model").value) body.model = $("try-model").value;
  let response;
  try {
    response = await fetch("/generate", { method: "POST", headers: { "content-type": "application/json", ...authHeader(false) },
      body: JSON.stringify(body) });
  } catch (error) {
    say(message, `cannot reach the server: ${error.message}`, "error");
    return;
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    say(message, `Refused (HTTP ${response.status}): ${(data.error && data.error.message) || response.statusText}`, "error");
    if (response.status === 401) askForKey("");
    return;
  }
  const nodes = [];
  for await (const event of serverSentEvents(response)) {
    if (event.name === "token") {
      const text = visible(event.data.text);
      const label = `answer token ${event.data.index}: ${JSON.stringify(text)}`;
      const node = tokenNode(text, event.data.scalings, { "data-index": event.data.index, "data-part": "completion",
        "data-label": label });
      if (!event.data.scalings) node.classList.add("pending");
      nodes.push(node);
      output.append(node);
      say(message, `streaming… ${nodes.length} tokens`);
    } else if (event.name === "done") {
      const rows = event.data.scalings ? event.data.scalings.completion : [];
      state.experts = event.data.scalings ? event.data.scalings.adapter_names : state.experts;
      // Tokens were coloured as they came; a server that did not send each token's mix colours them now.
      nodes.forEach((node, j) => {
        if (!node.classList.contains("pending") || !rows[j]) return;
        const text = node.querySelector(".tok-text").textContent;
        node.replaceWith(tokenNode(text, rows[j], { "data-index": j, "data-part": "completion",
          "data-label": `answer token ${j}: ${JSON.stringify(text)}` }));
      });
      say(message, `${event.data.id}: ${event.data.usage.completion_tokens} tokens, ${event.data.finish_reason} · ` +
        "each token coloured by the experts that chose it", "ok");
      output.dataset.requestId = event.data.id;
      await refresh();
      selectRequest(event.data.id);
    } else if (event.name === "error") {
      say(message, `failed: ${event.data.error.message}`, "error");
    }
  }
});

// ---- start ----------------------------------------------------------------------------------------------

async function start() {
  try {
    state.access = await api("/access");
  } catch (error) {
    $("server-status").textContent = `cannot reach the server: ${error.message}`;
    return;
  }
  $("admin-label").hidden = !state.access.admin_token_required;
  $("admin-input").value = state.adminToken;
  if (state.access.api_key_required && !state.apiKey && !state.adminToken) {
    askForKey("");
    $("server-status").textContent = "needs the API key";
  } else {
    await refresh();
  }
  startPolling();
}

start();
