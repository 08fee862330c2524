// Operator console page: renders the summary pushed over server-sent events; no build step, no framework.
"use strict";

// Build DOM nodes; text always goes in as text, never as HTML (class names and ids come from the line).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
const fmt = (x, d = 1) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%");

function openViewer(src) {
  document.getElementById("viewer-img").src = src;
  document.getElementById("viewer").showModal();
}

function thumb(src, alt, cls) {
  return el("img", { src, alt, class: cls, loading: "lazy", onclick: () => openViewer(src) });
}

function renderTiles(cameras) {
  const box = document.getElementById("tiles");
  const ids = Object.keys(cameras);
  if (!ids.length) return;
  box.querySelector(".empty")?.remove();
  for (const id of ids) {
    const c = cameras[id];
    let tile = box.querySelector(`.tile[data-camera="${CSS.escape(id)}"]`);
    if (!tile) {
      tile = el("div", { class: "tile", "data-camera": id });
      box.append(tile);
    }
    const last = c.last || {};
    tile.classList.toggle("failsafe", c.fail_safe);
    tile.dataset.verdicts = c.verdicts;
    tile.dataset.seq = last.seq ?? "";
    tile.dataset.publishedNs = last.published_ns ?? "";
    const d = c.decisions;
    tile.replaceChildren(
      el("h3", {}, id, el("span", { class: "rate" }, fmt(c.rate_per_s), el("small", {}, " /s"))),
      el("div", { class: "counts" },
        el("span", { class: "verdicts" }, `${c.verdicts} verdicts`),
        el("span", { class: "pass" }, `pass ${d.pass}`),
        el("span", { class: "divert" }, `divert ${d.divert}`),
        el("span", { class: "review" }, `review ${d.review}`)),
      el("div", { class: "last" }, "last: ",
        el("b", { class: last.decision || "" }, last.decision || "-"), " ",
        last.class_name || last.status || "", " ", pct(last.confidence), ` seq ${last.seq ?? "-"}`,
        last.part_id ? ` part ${last.part_id}` : ""),
      el("div", { class: c.fail_safe ? "fs" : "" },
        `gaps ${c.gaps}, pending ${c.pending}, dup ${c.duplicates}`,
        c.fail_safe ? ` FAIL-SAFE: ${c.fail_safe_reasons.join("; ")}` : " ok"),
    );
  }
}

function renderAgents(agents) {
  const body = document.querySelector("#agents tbody");
  body.replaceChildren(...Object.entries(agents).map(([id, a]) => {
    // The backend map is agent-defined; the runtime line says most, the rest is in the title.
    const b = a.backend;
    const layout = b.workers && b.workers !== "1" ? `${b.workers} workers x ${b.threads} thread(s)` : b.threads && `${b.threads} threads`;
    const backend = [b.runtime || b.backend, b.precision, layout].filter(Boolean).join(", ");
    const th = Object.keys(a.thresholds).length
      ? Object.entries(a.thresholds).map(([k, v]) => `${k} ${Number(Number(v).toPrecision(4))}`).join(", ")
      : "not published by this agent";
    return el("tr", { "data-agent": id },
      el("td", {}, id), el("td", { class: a.lost ? "fs" : "" }, a.lost ? "LOST" : a.state || "-"),
      el("td", { title: Object.entries(b).map(([k, v]) => `${k}=${v}`).join("\n") }, backend || "-"), el("td", {}, a.model_id || "-"), el("td", {}, a.queue_depth ?? "-"),
      el("td", {}, `${fmt(a.heartbeat_age_s)} s ago, ${a.restarts} restarts`),
      el("td", { class: "thresholds" }, th));
  }));
}

// Thresholds an operator may change at run time (protocol.control.SETTABLE); the agent validates every value.
const SETTABLE = ["pass_threshold", "min_confidence", "ood_threshold"];
const thresholdForms = new Map(); // agent id -> its form, built once so typing is never interrupted by a push

function thresholdForm(id) {
  const inputs = Object.fromEntries(SETTABLE.map((k) => [k, el("input", { type: "number", name: k, step: "any",
    min: 0, max: k === "ood_threshold" ? null : 1, title: k === "ood_threshold" ? ">= 0" : "0..1" })]));
  const oodOff = el("input", { type: "checkbox", name: "ood_off" });
  const operator = el("input", { type: "text", name: "operator", size: 12, maxlength: 64, placeholder: "your name",
    title: "who makes the change, for the agent's log: 1..64 of A-Z a-z 0-9 _ . -" });
  const outcome = el("span", { class: "outcome", "aria-live": "polite" });
  const apply = el("button", { type: "submit", class: "apply" }, "Apply");
  const reset = el("button", { type: "button", class: "reset" }, "Reset");
  const show = (cls, text, kind) => { outcome.className = "outcome " + cls; outcome.textContent = text;
    outcome.dataset.outcome = kind; };
  const send = async (payload) => {
    if (!operator.value.trim()) return show("refused", "type your name in operator: it goes in the agent's log", "");
    payload.operator = operator.value.trim();
    apply.disabled = reset.disabled = true;
    show("", "sending...", "");
    try {
      const r = await fetch("/api/thresholds", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(payload) });
      const text = await r.text();
      let body;
      try { body = JSON.parse(text); } catch { body = { outcome: `HTTP ${r.status}`, error: `HTTP ${r.status} ${text}` }; }
      if (r.ok && body.outcome === "ok") {
        const set = body.overridden.length ? `set at run time: ${body.overridden.join(", ")}` : "card and settings values";
        show("ok", `ok: ${set} (the table shows it from the next heartbeat)`, "ok");
        for (const k of SETTABLE) inputs[k].value = "";
        oodOff.checked = false;
      } else {
        show("refused", `refused: ${body.error || body.outcome}`, body.outcome || "");
      }
    } catch (err) {
      show("refused", `refused: ${err}`, "");
    } finally {
      apply.disabled = reset.disabled = false;
    }
  };
  const form = el("form", { class: "thform", "data-agent": id, novalidate: "", onsubmit: (ev) => {
    ev.preventDefault();
    const thresholds = {};
    for (const k of SETTABLE) if (inputs[k].value.trim() !== "") thresholds[k] = Number(inputs[k].value);
    if (oodOff.checked) thresholds.ood_threshold = null; // JSON has no infinity: null turns the OOD check off
    if (!Object.keys(thresholds).length) return show("refused", "nothing to apply: type a new value", "");
    send({ agent_id: id, thresholds });
  } },
    el("b", {}, `${id} thresholds`), ...SETTABLE.map((k) => el("label", {}, `${k} `, inputs[k])),
    el("label", {}, oodOff, " OOD check off"), el("label", {}, "operator ", operator), apply, reset, outcome);
  reset.addEventListener("click", () => send({ agent_id: id, reset: true }));
  // The placeholders show what the agent's last heartbeat says is in force.
  form.update = (th) => { for (const k of SETTABLE) inputs[k].placeholder = k in th ? String(+Number(th[k]).toFixed(4))
    : k === "ood_threshold" ? "off" : "-"; };
  return form;
}

function renderThresholdForms(agents) {
  const box = document.getElementById("threshold-forms");
  for (const [id, a] of Object.entries(agents)) {
    if (!a.thresholds_changeable) continue;
    let form = thresholdForms.get(id);
    if (!form) {
      form = thresholdForm(id);
      thresholdForms.set(id, form);
      box.append(form);
    }
    form.update(a.thresholds);
  }
}

function renderLatency(lat) {
  document.getElementById("latency-figures").textContent =
    `p50 ${fmt(lat.p50_ms)} ms, p99 ${fmt(lat.p99_ms)} ms over ${lat.count} verdicts (last ${lat.window_s} s)`;
  const svg = document.getElementById("latency-chart");
  const pts = lat.series.filter((s) => s[1] !== null);
  const W = 600, H = 160;
  const ymax = Math.max(1, ...pts.map((s) => s[2])) * 1.1;
  // Until the window fills, the x axis spans the data there is (at least a minute), not the empty past.
  const span = Math.min(lat.window_s, Math.max(60, ...pts.map((s) => s[0] + lat.bucket_s)));
  const x = (ago) => W - (ago / span) * W;
  const y = (ms) => H - (ms / ymax) * H;
  const line = (i, color) => el("polyline", { fill: "none", stroke: color, "stroke-width": 2,
    points: pts.map((s) => `${x(s[0]).toFixed(1)},${y(s[i]).toFixed(1)}`).join(" ") });
  const ns = "http://www.w3.org/2000/svg";
  const svgEl = (n) => { const e = document.createElementNS(ns, n.tagName.toLowerCase());
    for (const a of n.attributes) e.setAttribute(a.name, a.value); return e; };
  svg.replaceChildren(svgEl(line(1, "#2563eb")), svgEl(line(2, "#dc2626")));
  document.getElementById("latency-axis").textContent = `y: 0..${ymax.toFixed(0)} ms, x: last ${span.toFixed(0)} s`;
}

let galleryKey = "";
function renderGallery(snaps) {
  const key = snaps.map((s) => s.id).join(",");
  if (key === galleryKey) return;
  galleryKey = key;
  const box = document.getElementById("gallery");
  if (!snaps.length) return;
  box.replaceChildren(...snaps.map((s) => el("div", { class: "snap", "data-snap": s.id },
    thumb(`/api/images/snap/${s.id}/overlay`, "overlay", "overlay"),
    thumb(`/api/images/snap/${s.id}/heatmap`, "heatmap", "heatmap"),
    el("div", {}, el("b", {}, s.class_name), ` ${pct(s.confidence)} (${s.method})`),
    el("div", {}, `${s.camera_id} seq ${s.seq}`, s.part_id ? ` part ${s.part_id}` : ""))));
}

let reviewVersion = -1;
const REVIEW_SHOWN = 24;
let classes = [];
let shown = new Map(); // review id -> its node, in display order
// The operator works through a batch: while it has unlabelled items that still exist, it is not reshuffled by
// new arrivals (a button must not move away under the pointer); new ones are announced and come with the next batch.
async function loadReview(force) {
  const r = await fetch("/api/review");
  if (!r.ok) return;
  const data = await r.json();
  const box = document.getElementById("review");
  const byId = new Map(data.items.map((i) => [String(i.id), i]));
  const ids = [...shown.keys()];
  const intact = ids.length && ids.every((id) => byId.has(id));
  const open = ids.some((id) => byId.get(id) && !byId.get(id).label && !shown.get(id).classList.contains("done"));
  const waiting = data.items.filter((i) => !i.label && !shown.has(String(i.id))).length;
  document.getElementById("review-more").textContent = waiting ? `${waiting} more waiting` : "";
  if (!force && intact && open) return;
  if (!data.items.length) return;
  const items = data.items.filter((i) => !i.label).slice(0, REVIEW_SHOWN);
  const next = new Map(items.map((it) => [String(it.id), shown.get(String(it.id)) || reviewItem(it)]));
  shown = next;
  if (next.size) box.replaceChildren(...next.values());
}

function reviewItem(it) {
  const sel = el("select", { class: "label" }, ...classes.map((c) =>
    el("option", Object.assign({ value: c }, c === (it.label || it.class_name) ? { selected: "" } : {}), c)));
  const status = el("span", { class: "status" }, it.label ? `labelled ${it.label} -> ${it.exported}` : "");
  const send = async (name) => {
    const r = await fetch(`/api/review/${it.id}/label`, { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ class_name: name }) });
    const body = await r.json();
    status.textContent = r.ok ? `labelled ${body.label} -> ${body.exported}` : `error: ${body.error}`;
    if (r.ok) node.classList.add("done");
  };
  const node = el("div", { class: "ritem" + (it.label ? " done" : ""), "data-review": it.id },
    thumb(`/api/images/review/${it.id}/overlay`, "overlay", "overlay"),
    thumb(`/api/images/review/${it.id}/heatmap`, "heatmap", "heatmap"),
    el("div", { class: "meta" },
      el("div", {}, el("b", {}, it.class_name || "-"), ` ${pct(it.confidence)}, ${it.camera_id} seq ${it.seq}`,
        it.part_id ? ` part ${it.part_id}` : ""),
      el("div", {}, "top: " + it.top.map(([c, p]) => `${c} ${pct(p)}`).join(", ")),
      el("div", {}, `model ${it.model_id}, ${it.why}`),
      el("div", {}, el("button", { class: "confirm", onclick: () => send(it.class_name) }, "confirm"), " or ",
        sel, el("button", { class: "correct", onclick: () => send(sel.value) }, "correct"), " ", status)));
  return node;
}

function render(s) {
  classes = s.classes;
  renderTiles(s.cameras);
  renderAgents(s.agents);
  renderThresholdForms(s.agents);
  renderLatency(s.latency);
  renderGallery(s.gallery);
  const c = s.console;
  const dropped = Object.values(c.dropped).reduce((a, b) => a + b, 0);
  const bad = Object.values(c.malformed).reduce((a, b) => a + b, 0);
  document.getElementById("console-stats").textContent =
    `console dropped ${dropped}, malformed ${bad}` + (dropped ? " (gaps may include the console's own drops)" : "");
  const rv = s.review;
  document.getElementById("review-figures").textContent = `${rv.pending} to label, ${rv.labelled} labelled, ` +
    `${rv.awaiting_image} without an image yet (cap ${rv.cap})`;
  if (rv.version !== reviewVersion) {
    reviewVersion = s.review.version;
    loadReview(false);
  }
  document.body.dataset.updated = Date.now();
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/events");
  es.onopen = () => { conn.textContent = "live"; conn.className = "badge on"; };
  es.onerror = () => { conn.textContent = "reconnecting"; conn.className = "badge off"; };
  es.onmessage = (ev) => render(JSON.parse(ev.data));
}
document.getElementById("review-next").addEventListener("click", () => loadReview(true));
connect();
