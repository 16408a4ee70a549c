// CoreVital's viewer: the sweep page, the trace page (one trace or two side by side) and the
// evaluation page, over the local server's JSON API or a static bundle's data files.
// No dependencies, no build step. Everything from a trace is set as text (textContent), never
// parsed as HTML; the pages are #/ routes so that every view is a link (docs/view.md).
"use strict";

(function () {
  const ROW_H = 30; // px per row of the sweep list (virtualised: only the rows in sight exist)
  const PAGE = 200; // traces per list request
  const LIST_SIGNALS = ["generated_tokens", "mean_token_logprob", "min_token_logprob", "mean_logits_entropy", "rauq", "rauq_head_mean"];
  const app = document.getElementById("app");
  const nav = document.getElementById("nav");
  const tooltip = document.getElementById("tooltip");
  const bundle = window.corevitalBundle || null;

  // --- small helpers -------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "";
    if (typeof v === "boolean") return v ? "1" : "0"; // a number, as the hooks promise (docs/view.md)
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return String(v);
    return v.toPrecision(6);
  }
  function short(v) {
    if (typeof v !== "number") return fmt(v);
    return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  }
  function route() {
    const h = location.hash.replace(/^#/, "") || "/";
    const [path, query] = h.split("?");
    return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
  }
  function go(path, params, replace) {
    const q = params && [...params].length ? "?" + params.toString() : "";
    const url = "#" + path + q;
    if (replace) history.replaceState(null, "", url);
    else location.hash = url;
  }
  function colour(t) {
    // t in [0, 1] -> a blue (low) to yellow (high) ramp, readable under dark text
    const h = 230 - 180 * t, l = 88 - 18 * Math.sin(Math.PI * t);
    return `hsl(${h.toFixed(0)}, 80%, ${l.toFixed(0)}%)`;
  }
  function hslToRgb(h, s, l) {
    const a = s * Math.min(l, 1 - l);
    const f = (n) => { const k = (n + h / 30) % 12; return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)))); };
    return [f(0), f(8), f(4)];
  }
  // the heatmap's 256 colours, dark blue (low) to yellow (high), and the colour of a cell without a value
  const HEAT = Array.from({ length: 256 }, (_, i) => hslToRgb(250 - 200 * (i / 255), 0.85, 0.2 + 0.55 * (i / 255)));
  const EMPTY = [238, 238, 238];
  function range(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (v !== null && v !== undefined && isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return lo <= hi ? [lo, hi] : [0, 1];
  }
  function showTip(x, y, text) {
    tooltip.textContent = text;
    tooltip.hidden = false;
    tooltip.style.left = x + 14 + "px";
    tooltip.style.top = y + 14 + "px";
  }
  function hideTip() { tooltip.hidden = true; }

  // --- data: the server's API, or the bundle's files ------------------------------------
  const api = bundle ? bundleApi(bundle) : serverApi();

  function serverApi() {
    async function get(path) {
      const r = await fetch(path, { credentials: "same-origin" });
      if (!r.ok) throw new Error((await r.text()).trim() || r.statusText);
      return r.json();
    }
    return {
      meta: () => get("api/meta"),
      list: (params) => get("api/traces?" + params.toString()),
      trace: (id) => get("api/trace/" + encodeURIComponent(id)),
      siblings: (id) => get("api/siblings/" + encodeURIComponent(id)),
      evaluation: () => get("api/evaluation"),
    };
  }

  function bundleApi(b) {
    const loading = {};
    function load(id) {
      if (b.loaded[id]) return Promise.resolve(b.loaded[id]);
      const file = b.files[id];
      if (!file) return Promise.reject(new Error("this bundle does not hold trace " + id));
      if (!loading[id]) {
        loading[id] = new Promise((resolve, reject) => {
          const s = el("script", { src: "data/" + file + ".js" });
          s.addEventListener("load", () => resolve(b.loaded[id]));
          s.addEventListener("error", () => reject(new Error("cannot read data/" + file + ".js")));
          document.body.append(s);
        });
      }
      return loading[id];
    }
    function list(params) {
      const q = (params.get("q") || "").trim().toLowerCase();
      const flag = params.get("flag"), correct = params.get("correct");
      let rows = b.traces.filter((r) =>
        (!q || (r.prompt_full || "").toLowerCase().includes(q) || (r.output_full || "").toLowerCase().includes(q)) &&
        (!params.get("model") || r.model === params.get("model")) &&
        (!params.get("seed") || String(r.seed) === params.get("seed")) &&
        (!correct || (correct === "ungraded" ? r.correct === null : r.correct === (correct === "correct"))) &&
        (!flag || (flag === "any" ? r.flags.length > 0 : r.flags.includes(flag))));
      const sort = params.get("sort") || "prompt_index", desc = params.get("desc") === "1";
      const key = (r) => (sort === "flags" ? r.flags.length : r[sort]);
      rows = rows.slice().sort((a, c) => {
        const x = key(a), y = key(c);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * (desc ? -1 : 1);
      });
      const offset = Number(params.get("offset") || 0), limit = Number(params.get("limit") || PAGE);
      return Promise.resolve({ total: rows.length, offset, rows: rows.slice(offset, offset + limit) });
    }
    return {
      meta: () => Promise.resolve(b.meta),
      list,
      trace: load,
      siblings: (id) => Promise.resolve(b.siblings[id] || []),
      evaluation: () => Promise.resolve(b.evaluation),
    };
  }

  // --- the sweep page ------------------------------------------------------------------
  let metaCache = null;
  async function meta() { return metaCache || (metaCache = await api.meta()); }

  async function sweepPage(params) {
    const m = await meta();
    nav.replaceChildren(m.evaluation ? el("a", { href: "#/evaluation", text: "Evaluation" }) : "");
    const state = new URLSearchParams(params);
    const count = el("span", { "data-testid": "trace-count", class: "count", text: "…" });
    const search = el("input", { "data-testid": "search", type: "search", placeholder: "Search prompts and outputs", value: state.get("q") || "" });
    const select = (name, label, options) => {
      const s = el("select", { "data-testid": "filter-" + name, "aria-label": label },
        el("option", { value: "", text: label }),
        ...options.map(([v, t]) => el("option", { value: v, text: t })));
      s.value = state.get(name) || "";
      s.addEventListener("change", () => { setParam(name, s.value); });
      return s;
    };
    const filters = el("div", { class: "filters" }, search,
      select("model", "All models", m.models.map((x) => [x, x])),
      select("seed", "All seeds", m.seeds.map((x) => [String(x), "seed " + x])),
      m.has_labels ? select("correct", "Correct or wrong", [["correct", "correct"], ["wrong", "wrong"], ["ungraded", "ungraded"]]) : "",
      select("flag", "Any or no flag", [["any", "any flag"], ...m.flags.map((f) => [f, f])]),
      el("span", { class: "muted" }, count, " of " + m.count.toLocaleString("en-US") + " traces"));
    const cols = [["model", "model"], ["seed", "seed"], ["sample_index", "sample"], ["prompt", "prompt"], ["output", "output"],
      ...LIST_SIGNALS.filter((s) => m.signals.includes(s)).map((s) => [s, s.replace(/_/g, " ")]), ["flags", "flags"],
      ...(m.has_labels ? [["correct", "correct"]] : [])];
    const head = el("div", { class: "row head" }, ...cols.map(([key, label]) =>
      el("button", { class: "cell c-" + key, "data-sort": key, "data-label": label, onclick: () => {
        const on = (state.get("sort") || "prompt_index") === key;
        on && state.get("desc") !== "1" ? state.set("desc", "1") : state.delete("desc");
        state.set("sort", key);
        go("/", state, true);
        paintHead();
        render();
      } })));
    function paintHead() {
      for (const b of head.children) {
        const on = (state.get("sort") || "prompt_index") === b.dataset.sort;
        b.classList.toggle("sorted", on);
        b.textContent = b.dataset.label + (on ? (state.get("desc") === "1" ? " ▼" : " ▲") : "");
      }
    }
    paintHead();
    const spacer = el("div", { class: "spacer" });
    const viewport = el("div", { class: "viewport", "data-testid": "trace-list" }, spacer);
    app.replaceChildren(filters, el("div", { class: "table" }, head, viewport));
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => setParam("q", search.value), 150); });
    function setParam(name, value) {
      value ? state.set(name, value) : state.delete(name);
      go("/", state, true);
      render();
    }
    let pages = new Map(), total = 0, generation = 0;
    function render() {
      generation += 1;
      pages = new Map();
      clearShown();
      viewport.scrollTop = 0;
      fetchPage(0).then(draw);
    }
    function clearShown() { for (const [i, e] of shown) { e.remove(); shown.delete(i); } }
    function fetchPage(n) {
      if (!pages.has(n)) {
        const g = generation;
        const p = new URLSearchParams(state);
        p.set("offset", n * PAGE);
        p.set("limit", PAGE);
        pages.set(n, api.list(p).then((r) => {
          if (g !== generation) return null;
          total = r.total;
          count.textContent = total.toLocaleString("en-US");
          return r.rows;
        }));
      }
      return pages.get(n);
    }
    const shown = new Map(); // row index -> element
    async function draw() {
      spacer.style.height = total * ROW_H + "px";
      const first = Math.max(0, Math.floor(viewport.scrollTop / ROW_H) - 10);
      const last = Math.min(total, Math.ceil((viewport.scrollTop + viewport.clientHeight) / ROW_H) + 10);
      for (const [i, e] of shown) if (i < first || i >= last) { e.remove(); shown.delete(i); }
      const g = generation;
      for (let p = Math.floor(first / PAGE); p * PAGE < last; p++) {
        const rows = await fetchPage(p);
        if (g !== generation || !rows) return;
        for (let i = Math.max(first, p * PAGE); i < Math.min(last, (p + 1) * PAGE); i++) {
          const r = rows[i - p * PAGE];
          if (!r) continue;
          const old = shown.get(i);
          if (old && old.dataset.traceId === r.trace_id) continue;
          if (old) old.remove();
          const e = rowElement(r, cols);
          e.style.top = i * ROW_H + "px";
          spacer.append(e);
          shown.set(i, e);
        }
      }
      if (total === 0) clearShown();
    }
    viewport.addEventListener("scroll", () => requestAnimationFrame(draw));
    fetchPage(0).then(draw);
  }

  function rowElement(r, cols) {
    const open = () => go("/trace/" + encodeURIComponent(r.trace_id));
    const e = el("div", { class: "row item", "data-testid": "trace-row", "data-trace-id": r.trace_id, tabindex: 0, onclick: open,
      onkeydown: (ev) => { if (ev.key === "Enter") open(); } });
    for (const [key] of cols) {
      let text;
      if (key === "flags") text = r.flags.join(", ");
      else if (key === "correct") text = r.correct === null || r.correct === undefined ? "" : r.correct ? "✓" : "✗";
      else text = typeof r[key] === "number" ? short(r[key]) : r[key];
      e.append(el("span", { class: "cell c-" + key + (key === "correct" && r.correct === false ? " wrong" : ""), text, title: key === "prompt" || key === "output" ? r[key] : null }));
    }
    return e;
  }

  // --- the trace page -------------------------------------------------------------------
  async function tracePage(ids, params) {
    nav.replaceChildren(el("a", { href: "#/", text: "All traces" }));
    const data = await Promise.all(ids.map((id) => api.trace(id)));
    const panels = data.map((d, i) => tracePanel(d, params, i, ids.length > 1));
    app.replaceChildren(el("div", { class: ids.length > 1 ? "compare" : "single" }, ...panels));
    if (ids.length === 1) {
      api.siblings(ids[0]).then((sib) => {
        if (!sib.length) return;
        const s = el("select", { "data-testid": "compare-with", "aria-label": "Compare with" },
          el("option", { value: "", text: "Side by side with…" }),
          ...sib.map((x) => el("option", { value: x.trace_id, text: `${x.model} · seed ${x.seed} · sample ${x.sample_index}: ${x.output}` })));
        s.addEventListener("change", () => s.value && go("/compare/" + encodeURIComponent(ids[0]) + "/" + encodeURIComponent(s.value)));
        nav.append(s);
      });
    }
  }

  function tracePanel(d, params, index, compare) {
    const t = d.trace;
    const rowMetrics = d.rows ? Object.keys(d.rows).filter((k) => !["step_index", "token_id", "token_text", "is_prompt_token"].includes(k)) : [];
    const layerMetrics = d.layers ? Object.keys(d.layers.metrics) : [];
    const L = d.layers ? d.layers.count : 0;
    const p = (k) => (compare ? null : params.get(k));
    const state = {
      colour: p("colour") || (rowMetrics.includes("token_logprob") ? "token_logprob" : rowMetrics[0]),
      layer: Number(p("layer") || Math.floor(L / 2)),
      heat: p("heat") || (layerMetrics.includes("attn_entropy_mean") ? "attn_entropy_mean" : layerMetrics[0]),
      step: p("step") === null ? null : Number(p("step")),
    };
    const flagsAt = {};
    for (const [name, f] of Object.entries(d.health || {})) if (f.fired) for (const s of f.steps) (flagsAt[s] = flagsAt[s] || []).push(name);
    const flags = Object.entries(t).filter(([k, v]) => k.startsWith("flag_") && v).map(([k]) => k.slice(5));
    const info = el("div", { class: "info" },
      el("h2", { text: `${t.model} · seed ${t.seed} · prompt ${t.prompt_index} · sample ${t.sample_index}` }),
      el("div", { class: "muted", text: `${t.job_dir} · ${t.model_id} · trace ${t.trace_id}` }),
      el("div", { class: "badges" },
        t.correct === null || t.correct === undefined ? "" : el("span", { class: "badge " + (t.correct ? "ok" : "bad"), text: t.correct ? "correct" : "wrong" }),
        ...flags.map((f) => el("span", { class: "badge flag", text: f }))));
    const texts = el("div", { class: "texts" },
      el("div", {}, el("h3", { text: "Prompt" }), el("pre", { "data-testid": "prompt-text", class: "text", text: t.prompt_text })),
      el("div", {}, el("h3", { text: "Output" }), el("pre", { "data-testid": "output-text", class: "text", text: t.output_text })));
    const panel = el("section", { class: "panel" }, info, texts);
    if (!d.rows) {
      panel.append(el("p", { class: "muted", text: "This job wrote no summaries.parquet: only the header is shown." }));
      return panel;
    }
    const T = d.rows.step_index.length;
    const options = (list, value) => list.map((m) => el("option", { value: m, text: m, selected: m === value }));
    const colourSel = el("select", { "data-testid": "colour-by", "aria-label": "Colour tokens by" },
      el("optgroup", { label: "per token" }, ...options(rowMetrics, state.colour)),
      el("optgroup", { label: "per token and layer" }, ...options(layerMetrics, state.colour)));
    const layerSel = el("select", { "data-testid": "colour-layer", "aria-label": "Layer" },
      ...Array.from({ length: L }, (_, l) => el("option", { value: l, text: "layer " + l, selected: l === state.layer })));
    const heatSel = el("select", { "data-testid": "heatmap-metric", "aria-label": "Heatmap metric" }, ...options(layerMetrics, state.heat));
    const tokens = el("div", { class: "tokens", "data-testid": "tokens" });
    const legend = el("div", { class: "legend muted" });
    const canvas = el("canvas", { class: "heatmap", "data-testid": "heatmap" });
    const details = el("div", { class: "details" });
    const spans = [];
    for (let s = 0; s < T; s++) {
      const span = el("span", { class: "tok" + (d.rows.is_prompt_token[s] ? " prompt" : "") + (flagsAt[s] ? " flagged" : ""),
        "data-testid": "token", "data-step": d.rows.step_index[s], text: d.rows.token_text[s],
        title: flagsAt[s] ? "flags: " + flagsAt[s].join(", ") : null });
      span.addEventListener("click", () => select(s));
      spans.push(span);
      tokens.append(span);
    }
    function layerValue(metric, s, l) { return d.layers.metrics[metric][s * L + l]; }
    function paintTokens() {
      const perLayer = layerMetrics.includes(state.colour);
      layerSel.hidden = !perLayer;
      const values = spans.map((_, s) => (perLayer ? layerValue(state.colour, s, state.layer) : d.rows[state.colour][s]));
      const [lo, hi] = range(values);
      values.forEach((v, s) => {
        spans[s].style.backgroundColor = v === null || v === undefined ? "" : colour(hi > lo ? (v - lo) / (hi - lo) : 0.5);
      });
      legend.textContent = `${state.colour}${perLayer ? " at layer " + state.layer : ""}: ${short(lo)} (blue) to ${short(hi)} (yellow)`;
    }
    let heatImage = null; // the heatmap of state.heat, one pixel per (token, layer), drawn scaled up
    function buildHeat() {
      const values = d.layers.metrics[state.heat] || [];
      const [lo, hi] = range(values);
      const off = document.createElement("canvas");
      off.width = Math.max(T, 1);
      off.height = Math.max(L, 1);
      const g = off.getContext("2d");
      const img = g.createImageData(off.width, off.height);
      for (let s = 0; s < T; s++) for (let l = 0; l < L; l++) {
        const v = values[s * L + l];
        const rgb = v === null || v === undefined ? EMPTY : HEAT[Math.round(255 * (hi > lo ? (v - lo) / (hi - lo) : 0.5))];
        const i = ((L - 1 - l) * T + s) * 4; // layer 0 at the bottom
        img.data[i] = rgb[0]; img.data[i + 1] = rgb[1]; img.data[i + 2] = rgb[2]; img.data[i + 3] = 255;
      }
      g.putImageData(img, 0, 0);
      heatImage = off;
    }
    function paintHeatmap() {
      const cw = Math.max(2, Math.min(32, Math.floor(1100 / (compare ? 2 : 1) / Math.max(T, 1))));
      const ch = Math.max(6, Math.min(16, Math.floor(320 / Math.max(L, 1))));
      canvas.width = T * cw;
      canvas.height = L * ch;
      const g = canvas.getContext("2d");
      g.imageSmoothingEnabled = false;
      g.drawImage(heatImage, 0, 0, canvas.width, canvas.height);
      if (state.step !== null) {
        g.strokeStyle = "#e00";
        g.lineWidth = 2;
        g.strokeRect(state.step * cw + 1, 1, cw - 2, canvas.height - 2);
      }
      canvas.dataset.cw = cw;
      canvas.dataset.ch = ch;
    }
    canvas.addEventListener("mousemove", (ev) => {
      const r = canvas.getBoundingClientRect();
      const s = Math.floor(((ev.clientX - r.left) * (canvas.width / r.width)) / Number(canvas.dataset.cw));
      const l = L - 1 - Math.floor(((ev.clientY - r.top) * (canvas.height / r.height)) / Number(canvas.dataset.ch));
      if (s < 0 || s >= T || l < 0 || l >= L) return hideTip();
      showTip(ev.clientX, ev.clientY, `step ${s} ${JSON.stringify(d.rows.token_text[s])} · layer ${l} · ${state.heat} = ${fmt(layerValue(state.heat, s, l))}`);
    });
    canvas.addEventListener("mouseleave", hideTip);
    canvas.addEventListener("click", (ev) => {
      const r = canvas.getBoundingClientRect();
      const s = Math.floor(((ev.clientX - r.left) * (canvas.width / r.width)) / Number(canvas.dataset.cw));
      if (s >= 0 && s < T) select(s);
    });
    let selected = null;
    function select(s) {
      if (selected !== null) spans[selected].classList.remove("selected");
      selected = state.step = s;
      spans[s].classList.add("selected");
      details.replaceChildren(tokenDetails(d, s, rowMetrics, layerMetrics, L, flagsAt[s]));
      paintHeatmap();
      save();
    }
    function save() {
      if (compare) return;
      const q = new URLSearchParams();
      if (state.step !== null) q.set("step", state.step);
      q.set("colour", state.colour);
      q.set("layer", state.layer);
      q.set("heat", state.heat);
      go("/trace/" + encodeURIComponent(t.trace_id), q, true);
    }
    colourSel.addEventListener("change", () => { state.colour = colourSel.value; paintTokens(); save(); });
    layerSel.addEventListener("change", () => { state.layer = Number(layerSel.value); paintTokens(); save(); });
    heatSel.addEventListener("change", () => { state.heat = heatSel.value; buildHeat(); paintHeatmap(); save(); });
    panel.append(
      el("div", { class: "controls" }, el("label", {}, "Colour tokens by ", colourSel), layerSel, legend),
      tokens,
      el("div", { class: "controls" }, el("label", {}, "Heatmap (layer × token) of ", heatSel), el("span", { class: "muted", text: "layer 0 at the bottom; click a column to select its token" })),
      el("div", { class: "heatwrap" }, canvas),
      details);
    paintTokens();
    buildHeat();
    paintHeatmap();
    if (state.step !== null && state.step >= 0 && state.step < T) select(state.step);
    return panel;
  }

  function tokenDetails(d, s, rowMetrics, layerMetrics, L, flags) {
    const box = el("div", { "data-testid": "token-details", class: "token-details", "data-step": s });
    box.append(el("h3", { text: `Step ${s}: ${JSON.stringify(d.rows.token_text[s])} (id ${d.rows.token_id[s]})${d.rows.is_prompt_token[s] ? ", prompt token" : ""}` }));
    if (flags) box.append(el("p", { class: "badge flag", text: "flags: " + flags.join(", ") }));
    box.append(el("div", { class: "kv" }, ...rowMetrics.map((m) =>
      el("div", {}, el("span", { class: "muted", text: m + " " }), el("span", { "data-metric": m, text: fmt(d.rows[m][s]) })))));
    const topk = d.topk && d.topk[s];
    if (topk) {
      box.append(el("h4", { text: "Top next tokens (the distribution this token was drawn from)" }),
        el("table", { class: "topk", "data-testid": "topk" }, ...topk.map((k) =>
          el("tr", {}, el("td", { class: "mono", text: JSON.stringify(k.token_text) }), el("td", { text: fmt(k.prob) }),
            el("td", {}, el("span", { class: "pbar" }))))));
      box.querySelectorAll(".pbar").forEach((b, i) => { b.style.width = Math.round(100 * (topk[i].prob || 0)) + "px"; });
    } else if (s > 0) {
      box.append(el("p", { class: "muted", text: "Top-k tokens are in the JSON trace, which this job did not write." }));
    }
    box.append(el("h4", { text: "Every layer" }));
    const table = el("table", { class: "layers" }, el("tr", {}, el("th", { text: "layer" }), ...layerMetrics.map((m) => el("th", { text: m }))));
    for (let l = 0; l < L; l++) {
      table.append(el("tr", { "data-testid": "layer-row", "data-layer": l }, el("td", { text: l }),
        ...layerMetrics.map((m) => el("td", { "data-metric": m, text: fmt(d.layers.metrics[m][s * L + l]) }))));
    }
    box.append(el("div", { class: "scroll" }, table));
    return box;
  }

  // --- the evaluation page ----------------------------------------------------------------
  async function evaluationPage() {
    nav.replaceChildren(el("a", { href: "#/", text: "All traces" }));
    const e = await api.evaluation();
    if (!e) { app.replaceChildren(el("p", { text: "No evaluation here: run corevital evaluate DIR first." })); return; }
    const canvas = el("canvas", { class: "roc", "data-testid": "roc", width: 420, height: 420 });
    const legend = el("ul", { class: "roc-legend" });
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, 420, 420);
    g.strokeStyle = "#bbb"; g.setLineDash([2, 4]); g.beginPath(); g.moveTo(20, 400); g.lineTo(400, 20); g.stroke();
    e.curves.forEach((c, i) => {
      const col = `hsl(${(i * 47) % 360}, 70%, 40%)`;
      g.strokeStyle = col; g.lineWidth = 2; g.setLineDash(c.baseline ? [6, 4] : []);
      g.beginPath();
      c.fpr.forEach((x, j) => { const X = 20 + 380 * x, Y = 400 - 380 * c.tpr[j]; j ? g.lineTo(X, Y) : g.moveTo(X, Y); });
      g.stroke();
      legend.append(legendItem(col, c.signal + (c.baseline ? " (baseline, dashed)" : "")));
    });
    const table = scoreTable("signal-table", ["signal", "model", "direction", "n", "n_wrong", "auroc", "auroc_low", "auroc_high", "prr"], e.table);
    app.replaceChildren(el("h2", { text: "Which signals predict a wrong answer" }),
      el("div", { class: "evaluation" }, el("div", {}, canvas, el("p", { class: "muted", text: "ROC: false-positive rate (x) against true-positive rate (y) of flagging wrong answers" }), legend), table),
      ...fittedSection(e));
  }

  // The fitted detectors (out of fold), AUROC by layer and by the first k generated tokens.
  function fittedSection(e) {
    if (!e.detectors || !e.detectors.length) return [];
    const table = scoreTable("detector-table", ["detector", "model", "n", "n_wrong", "auroc", "auroc_low", "auroc_high", "prr"], e.detectors);
    const byModel = groupBy(e.layers, "model");
    const layerPlot = linePlot("layer-plot", Object.entries(byModel).map(([m, rows]) => ({ name: "model " + m, x: rows.map((r) => r.layer_index), y: rows.map((r) => r.auroc) })), "layer");
    const ks = e.horizons;  // k = 0: the whole answer, drawn last
    const bySignal = groupBy(e.early, "signal");
    const horizonPlot = linePlot("horizon-plot", Object.entries(bySignal).map(([s, rows]) => ({
      name: s, x: ks.map((_, i) => i), y: ks.map((k) => { const r = rows.find((x) => x.k === k); return r ? r.auroc : null; }) })),
      "first k tokens: " + ks.map((k) => (k ? k : "all")).join(", "));
    return [el("h2", { text: "Fitted detectors, out of fold (folds grouped by question)" }), table,
      el("div", { class: "evaluation" },
        el("div", {}, el("h3", { text: "Layer blame: AUROC of a probe on each layer alone" }), layerPlot.canvas, layerPlot.legend),
        el("div", {}, el("h3", { text: "Failure horizon: AUROC from the first k generated tokens" }), horizonPlot.canvas, horizonPlot.legend))];
  }

  // A ranked table (signals.parquet's or detectors.parquet's rows): these columns, numbers shortened.
  function scoreTable(testid, cols, rows) {
    return el("table", { class: "signals", "data-testid": testid }, el("tr", {}, ...cols.map((c) => el("th", { text: c }))),
      ...rows.map((r) => el("tr", {}, ...cols.map((c) => el("td", { text: typeof r[c] === "number" ? short(r[c]) : r[c] })))));
  }

  function legendItem(colour, text) {
    const sw = el("span", { class: "swatch" });
    sw.style.backgroundColor = colour;
    return el("li", {}, sw, text);
  }

  function groupBy(rows, key) {
    const out = {};
    (rows || []).forEach((r) => { (out[r[key]] = out[r[key]] || []).push(r); });
    return out;
  }

  // Lines of AUROC (y, 0.4..1) against x, one per series, on a canvas; its legend.
  function linePlot(testid, series, xlabel) {
    const W = 420, H = 300, canvas = el("canvas", { class: "roc", "data-testid": testid, width: W, height: H });
    const legend = el("ul", { class: "roc-legend" });
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
    const xs = series.flatMap((s) => s.x), x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
    const X = (x) => 30 + (W - 40) * (x - x0) / Math.max(1e-9, x1 - x0), Y = (y) => H - 20 - (H - 30) * (y - 0.4) / 0.6;
    g.strokeStyle = "#bbb"; g.setLineDash([2, 4]); g.beginPath(); g.moveTo(X(x0), Y(0.5)); g.lineTo(X(x1), Y(0.5)); g.stroke();
    g.setLineDash([]); g.fillStyle = "#666"; g.fillText(xlabel, 30, H - 4);
    series.forEach((s, i) => {
      const col = `hsl(${(i * 47) % 360}, 70%, 40%)`;
      g.strokeStyle = col; g.lineWidth = 2; g.beginPath();
      let started = false;
      s.x.forEach((x, j) => { if (s.y[j] == null) return; started ? g.lineTo(X(x), Y(s.y[j])) : g.moveTo(X(x), Y(s.y[j])); started = true; });
      g.stroke();
      legend.append(legendItem(col, s.name));
    });
    return { canvas, legend };
  }

  // --- routing ------------------------------------------------------------------------------
  async function show() {
    hideTip();
    const { parts, params } = route();
    try {
      if (parts[0] === "trace" && parts[1]) await tracePage([parts[1]], params);
      else if (parts[0] === "compare" && parts[1] && parts[2]) await tracePage([parts[1], parts[2]], params);
      else if (parts[0] === "evaluation") await evaluationPage();
      else await sweepPage(params);
    } catch (err) {
      app.replaceChildren(el("p", { class: "error", "data-testid": "error", text: String(err.message || err) }));
    }
  }
  let last = null;
  window.addEventListener("hashchange", () => {
    const r = route();
    const key = r.parts.join("/");
    if (key === last) return; // a page's own replaceState of its parameters
    last = key;
    show();
  });
  last = route().parts.join("/");
  show();
})();
