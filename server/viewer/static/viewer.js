// Sightline's explanation viewer. Plain JS, no framework: the gateway serves this file and nothing else is loaded.
// Data comes from /api/explanations with the caller's API key as "Authorization: Bearer <key>".
"use strict";

const KEY_STORAGE = "sightline-api-key";
const SOURCES_SHOWN = 10;
const LENS_COLUMNS = 16;
const state = { explanation: null, vocabulary: new Map(), method: null, granularity: "token", target: null, nextPage: "" };

const $ = (selector) => document.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showStatus(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.className = isError ? "error" : "";
}

async function api(path) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function forget() {
  state.explanation = null;
  $("#list tbody").replaceChildren();
  $("#list-view").hidden = true;
  $("#detail").hidden = true;
}

function failed(error) {
  forget();
  if (error.status === 401) showStatus(`No data: ${error.message}`, true);
  else showStatus(error.message, true);
}

// ---- decoding -------------------------------------------------------------------------------------------------

function tensor(encoded) {
  if (!encoded) return null;
  const binary = atob(encoded.data);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  const Kind = encoded.dtype === "int32" ? Int32Array : Float32Array;
  return { shape: encoded.shape, values: new Kind(bytes.buffer, 0, bytes.byteLength / 4) };
}

function row(matrix, index) {
  const width = matrix.shape[matrix.shape.length - 1];
  return matrix.values.subarray(index * width, (index + 1) * width);
}

// Indices ranked by |score|, strongest first; ties keep the earlier index (Array.prototype.sort is stable).
function strongest(scores, indices, k) {
  return [...indices].sort((a, b) => Math.abs(scores[b]) - Math.abs(scores[a])).slice(0, k);
}

function fmt(value, digits = 4) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

function signed(value) {
  const text = `${value >= 0 ? "+" : ""}${fmt(value)}`;
  return element("span", { className: `score ${value >= 0 ? "pos" : "neg"}` }, text);
}

// Texts of the token ids this explanation's sequence holds; other ids (alternatives, logit-lens tokens) show as #id.
function tokenText(id) {
  const known = state.vocabulary.get(id);
  return known === undefined ? `#${id}` : JSON.stringify(known);
}

// Asks the gateway (which asks vLLM) for the texts of ids shown on the page that the sequence does not hold, then
// shows them; each id is asked for once per model.
const requestedTexts = new Set();
const MAX_TEXTS_PER_REQUEST = 1024;

async function resolveTexts(ids) {
  const e = state.explanation;
  const wanted = [...new Set(ids)]
    .filter((id) => !state.vocabulary.has(id) && !requestedTexts.has(`${e.model}:${id}`))
    .slice(0, MAX_TEXTS_PER_REQUEST);
  if (!wanted.length) return;
  for (const id of wanted) requestedTexts.add(`${e.model}:${id}`);
  let body;
  try {
    body = await api(`/api/token-texts?model=${encodeURIComponent(e.model)}&ids=${wanted.join(",")}`);
  } catch {
    return; // the ids stay shown as #id
  }
  if (state.explanation !== e) return;
  for (const [id, text] of Object.entries(body.texts)) state.vocabulary.set(Number(id), text);
  renderSteps();
  renderLens();
}

// ---- list -----------------------------------------------------------------------------------------------------

async function showList(append = false) {
  const path = append ? `/api/explanations?page_token=${encodeURIComponent(state.nextPage)}` : "/api/explanations";
  let page;
  try {
    page = await api(path);
  } catch (error) {
    failed(error);
    return;
  }
  showStatus("");
  $("#detail").hidden = true;
  $("#list-view").hidden = false;
  $("#tenant").textContent = `(tenant ${page.tenant})`;
  const body = $("#list tbody");
  if (!append) body.replaceChildren();
  for (const summary of page.explanations) {
    const tr = element(
      "tr",
      { className: "explanation-row", dataset: { id: summary.explanation_id } },
      element("td", {}, (summary.created_at || "").replace("T", " ").replace(/\..*$/, "")),
      element("td", { className: "id" }, summary.explanation_id),
      element("td", {}, summary.state.replace("EXPLANATION_STATE_", "").toLowerCase()),
      element("td", {}, summary.methods.join(", ")),
      element("td", {}, summary.model),
    );
    tr.addEventListener("click", () => openExplanation(summary.explanation_id, true));
    body.append(tr);
  }
  if (!page.explanations.length && !append) showStatus("No explanations yet for this tenant.");
  state.nextPage = page.next_page_token;
  $("#more").hidden = !state.nextPage;
}

// ---- one explanation ------------------------------------------------------------------------------------------

async function openExplanation(explanationId, push) {
  let payload;
  try {
    payload = await api(`/api/explanations/${encodeURIComponent(explanationId)}`);
  } catch (error) {
    failed(error);
    return;
  }
  if (push) history.pushState({}, "", `/explanations/${encodeURIComponent(explanationId)}`);
  showStatus(payload.state === "EXPLANATION_STATE_SUCCEEDED" ? "" : `State: ${payload.state}. ${payload.error}`);
  for (const method of payload.methods) {
    method.matrix = tensor(method.attributions);
    method.groupMatrix = tensor(method.aggregated);
    method.lens = method.extras.top_token_ids
      ? { ids: tensor(method.extras.top_token_ids), logprobs: tensor(method.extras.top_logprobs),
          target: tensor(method.extras.target_logprobs) }
      : null;
  }
  state.explanation = payload;
  state.vocabulary = new Map(payload.tokens.map((token) => [token.id, token.text]));
  const attributing = payload.methods.filter((m) => m.matrix);
  state.method = attributing.length ? attributing[0].method : null;
  state.granularity = "token";
  state.target = null;
  $("#list-view").hidden = true;
  $("#detail").hidden = false;
  renderDetail();
}

function renderMeta() {
  const e = state.explanation;
  $("#title").textContent = `Explanation ${e.explanation_id}`;
  const trace = e.trace_url
    ? element("a", { id: "trace-link", href: e.trace_url, target: "_blank", rel: "noopener" }, e.trace_id)
    : element("span", { id: "trace-link" }, e.trace_id || "–");
  const entries = [
    ["model", e.model],
    ["state", e.state.replace("EXPLANATION_STATE_", "").toLowerCase()],
    ["created", e.created_at || "–"],
    ["trace", trace],
    ["fidelity", element("span", { id: "fidelity", dataset: { value: String(e.fidelity.max_abs_logprob_diff) } },
      `max |served - recomputed log-prob| = ${e.fidelity.max_abs_logprob_diff.toExponential(2)}`)],
    ["cache", e.cache_hit ? "hidden states from cache" : "computed (cache miss)"],
    ["target score", e.target_score.replace("TARGET_SCORE_", "").toLowerCase()],
  ];
  $("#meta").replaceChildren(...entries.flatMap(([name, value]) => [element("dt", {}, name), element("dd", {}, value)]));
}

function toggle(container, options, current, choose) {
  container.replaceChildren(
    ...options.map(([value, label]) => {
      const button = element("button", { type: "button", "aria-pressed": String(value === current),
        dataset: { value } }, label);
      button.addEventListener("click", () => choose(value));
      return button;
    }),
  );
}

function currentMethod() {
  return state.explanation.methods.find((m) => m.method === state.method) || null;
}

function renderControls() {
  const e = state.explanation;
  const attributing = e.methods.filter((m) => m.matrix);
  toggle($("#methods"), attributing.map((m) => [m.method, m.method]), state.method, (value) => {
    state.method = value;
    renderDetail();
  });
  for (const button of $("#methods").children) button.classList.add("method");
  const method = currentMethod();
  const grouped = method && method.groupMatrix && e.source_groups.length;
  toggle($("#granularity"), grouped ? [["token", "tokens"], ["group", "words / spans"]] : [], state.granularity,
    (value) => {
      state.granularity = value;
      renderDetail();
    });
}

function renderTokens() {
  const e = state.explanation;
  const targets = new Map(e.target_positions.map((position, index) => [position, index]));
  const nodes = [];
  e.tokens.forEach((token, position) => {
    if (position === e.prompt_length) nodes.push(element("span", { className: "boundary" }));
    const classes = ["token"];
    if (position >= e.prompt_length) classes.push("generated");
    if (targets.has(position)) classes.push("target");
    const span = element("span", { className: classes.join(" "), dataset: { position: String(position) },
      title: `#${position} id ${token.id}` }, token.text);
    if (targets.has(position)) span.addEventListener("click", () => selectTarget(targets.get(position)));
    nodes.push(span);
  });
  $("#tokens").replaceChildren(...nodes);
}

function selectTarget(index) {
  state.target = index;
  renderHeatmap();
  renderSteps();
  renderLens();
}

function heat(span, score, scale) {
  const alpha = scale > 0 ? Math.min(Math.abs(score) / scale, 1) * 0.75 : 0;
  span.style.backgroundColor = score >= 0 ? `rgba(220, 38, 38, ${alpha})` : `rgba(37, 99, 235, ${alpha})`;
  span.dataset.score = String(score);
}

function renderHeatmap() {
  const e = state.explanation;
  const method = currentMethod();
  const spans = $("#tokens").querySelectorAll(".token");
  for (const span of spans) {
    span.style.backgroundColor = "";
    span.classList.remove("selected");
    delete span.dataset.score;
  }
  const sources = $("#sources");
  const groupSources = $("#group-sources");
  sources.replaceChildren();
  groupSources.replaceChildren();
  if (state.target === null) {
    $("#selected-token").textContent = "… (pick a generated token)";
    return;
  }
  const position = e.target_positions[state.target];
  spans[position].classList.add("selected");
  $("#selected-token").textContent = `${JSON.stringify(e.tokens[position].text)} (#${position})`;
  if (!method) return;
  const useGroups = state.granularity === "group" && method.groupMatrix;
  sources.hidden = Boolean(useGroups);
  groupSources.hidden = !useGroups;
  if (useGroups) {
    const scores = row(method.groupMatrix, state.target);
    const before = e.source_groups.map((_, i) => i).filter((i) => e.source_groups[i].start < position);
    const scale = Math.max(0, ...before.map((i) => Math.abs(scores[i])));
    for (const i of before) {
      const group = e.source_groups[i];
      for (let p = group.start; p < Math.min(group.end, position); p += 1) heat(spans[p], scores[i], scale);
    }
    for (const i of strongest(scores, before, SOURCES_SHOWN)) {
      const group = e.source_groups[i];
      groupSources.append(element("li", { className: "source", dataset: { group: String(i) } },
        `${JSON.stringify(group.label)} [${group.start}, ${group.end}) `, signed(scores[i])));
    }
    return;
  }
  const scores = row(method.matrix, state.target);
  const prefix = Array.from({ length: position }, (_, p) => p);
  const scale = Math.max(0, ...prefix.map((p) => Math.abs(scores[p])));
  for (const p of prefix) heat(spans[p], scores[p], scale);
  for (const p of strongest(scores, prefix, SOURCES_SHOWN)) {
    sources.append(element("li", { className: "source", dataset: { position: String(p) } },
      `${JSON.stringify(e.tokens[p].text)} #${p} `, signed(scores[p])));
  }
}

function renderSteps() {
  const e = state.explanation;
  const steps = e.step_scores;
  const body = $("#steps tbody");
  if (state.target === null || !steps.probabilities.length) {
    body.replaceChildren();
    return;
  }
  const i = state.target;
  const rows = [
    ["probability", fmt(steps.probabilities[i])],
    ["log-probability", fmt(steps.logprobs[i])],
    ["entropy (nats)", fmt(steps.entropies[i])],
    ["rank", String(steps.ranks[i])],
  ];
  const ids = tensor(steps.top_token_ids);
  const logprobs = tensor(steps.top_logprobs);
  if (ids) {
    const alternatives = Array.from(row(ids, i), (id, j) =>
      `${tokenText(id)} ${fmt(Math.exp(row(logprobs, i)[j]), 3)}`).join("\n");
    rows.push(["alternatives (p)", alternatives]);
    resolveTexts(Array.from(row(ids, i)));
  }
  body.replaceChildren(...rows.map(([name, value]) =>
    element("tr", {}, element("th", {}, name), element("td", { className: "steps-value", dataset: { row: name } },
      value))));
}

// Layers (rows) by explained tokens (columns): at most LENS_COLUMNS columns, around the selected token, so that a
// long explanation's grid stays a few hundred cells.
function renderLens() {
  const e = state.explanation;
  const method = e.methods.find((m) => m.lens);
  $("#lens-panel").hidden = !method;
  if (!method) return;
  const [layers, targets, k] = method.lens.ids.shape;
  const first = Math.max(0, Math.min((state.target ?? 0) - Math.floor(LENS_COLUMNS / 2), targets - LENS_COLUMNS));
  const columns = [];
  for (let t = first; t < Math.min(targets, first + LENS_COLUMNS); t += 1) columns.push(t);
  const head = element("tr", {}, element("th", {}, "layer"),
    ...columns.map((t) => element("th", { className: t === state.target ? "selected" : "" },
      JSON.stringify(e.tokens[e.target_positions[t]].text))));
  const body = [];
  const shown = [];
  for (let layer = layers - 1; layer >= 0; layer -= 1) {
    const cells = columns.map((t) => {
      const top = method.lens.ids.values[(layer * targets + t) * k];
      shown.push(top);
      const target = method.lens.target.values[layer * targets + t];
      return element("td", { title: `log p(explained token) ${fmt(target)}` },
        `${tokenText(top)}\n${fmt(Math.exp(target), 3)}`);
    });
    body.push(element("tr", {}, element("th", {}, String(layer)), ...cells));
  }
  $("#lens").replaceChildren(element("thead", {}, head), element("tbody", {}, ...body));
  resolveTexts(shown);
}

function renderFaithfulness() {
  const e = state.explanation;
  const head = element("tr", {}, ...["method", "seconds", "comprehensiveness (AOPC)", "random", "sufficiency (AOPC)",
    "random", "verdict"].map((name) => element("th", {}, name)));
  const rows = e.methods.map((m) => {
    const f = m.faithfulness;
    const verdict = !f ? "not measured" : f.aopc_comprehensiveness > f.random_aopc_comprehensiveness
      ? "beats random" : "no better than random";
    return element("tr", { dataset: { method: m.method } }, element("td", {}, m.method), element("td", {}, fmt(m.seconds, 3)),
      element("td", {}, f ? fmt(f.aopc_comprehensiveness) : "–"), element("td", {}, f ? fmt(f.random_aopc_comprehensiveness) : "–"),
      element("td", {}, f ? fmt(f.aopc_sufficiency) : "–"), element("td", {}, f ? fmt(f.random_aopc_sufficiency) : "–"),
      element("td", { className: "verdict" }, verdict));
  });
  $("#faithfulness").replaceChildren(element("thead", {}, head), element("tbody", {}, ...rows));
}

function renderDetail() {
  renderMeta();
  renderControls();
  renderTokens();
  renderHeatmap();
  renderSteps();
  renderLens();
  renderFaithfulness();
}

// ---- navigation -----------------------------------------------------------------------------------------------

function route() {
  const match = location.pathname.match(/^\/explanations\/([^/]+)$/);
  if (match) openExplanation(decodeURIComponent(match[1]), false);
  else showList();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").value = "";
  route();
});
$("#more").addEventListener("click", () => showList(true));
window.addEventListener("popstate", route);
route();
