// tunesmith ui: charts (uPlot), the live stream of a running run, and the new-run form.
"use strict";
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

function csrf() { return document.querySelector('meta[name="tunesmith-csrf"]').content; }

function post(url, body) {
  return fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-Tunesmith-CSRF": csrf()},
                     body: JSON.stringify(body || {})});
}

function tick(v) {  // a learning rate of 3e-4 must not read "0"
  if (v === 0 || v === null) return "0";
  return Math.abs(v) < 0.01 || Math.abs(v) >= 1e5 ? v.toExponential(1) : String(+v.toPrecision(4));
}

function drawCharts(box, curves, bars) {
  box.replaceChildren();
  for (const [name, data] of Object.entries(curves)) {
    const div = document.createElement("div");
    div.className = "chart";
    div.dataset.name = name;
    div.dataset.points = data[0].length;
    const title = document.createElement("h4");
    title.textContent = name;
    div.appendChild(title);
    box.appendChild(div);
    const series = [{label: bars ? "tokens" : "step"},
                    {label: name, stroke: COLOURS[0], width: 2, fill: bars ? "#1f77b433" : undefined,
                     paths: bars ? uPlot.paths.bars({size: [0.9]}) : undefined}];
    new uPlot({width: 520, height: 220, series: series, legend: {show: false}, scales: {x: {time: false}},
               axes: [{label: bars ? "tokens" : "step"}, {values: (u, ticks) => ticks.map(tick), size: 60}]}, data, div);
  }
}

function showRun(name, live) {
  drawCharts(document.getElementById("charts"), JSON.parse(document.getElementById("curves-data").textContent), false);
  drawCharts(document.getElementById("histograms"), JSON.parse(document.getElementById("histogram-data").textContent), true);
  if (!live) return;
  const events = new EventSource("/runs/" + encodeURIComponent(name) + "/events");
  events.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    drawCharts(document.getElementById("charts"), msg.curves, false);
    const p = msg.progress || {};
    for (const k of ["step", "status"]) if (p[k] !== undefined) document.getElementById(k).textContent = p[k];
    if (p.tokens_per_s) document.getElementById("tps").textContent = p.tokens_per_s;
    if (p.eta_s !== undefined) document.getElementById("eta").textContent = p.eta_s === null ? "-" : p.eta_s + " s";
  };
  events.addEventListener("end", () => { events.close(); location.reload(); });
}

async function act(what) {
  const name = location.pathname.split("/")[2];
  const res = await post("/runs/" + name + "/" + what);
  if (!res.ok) alert((await res.json()).detail);
  setTimeout(() => location.reload(), 1500);
}

const ERROR_MARK = "\n\u241e";  // try_it.ERROR_MARK: the command's error message follows

function showAnswer(box, text, label) {
  const [said, error] = text.split(ERROR_MARK);
  box.textContent = said;
  if (label && said.trim()) {
    const out = JSON.parse(said);
    const probs = Object.entries(out.probabilities).map(([k, v]) => k + " " + (100 * v).toFixed(1) + "%");
    box.textContent = out.label + "   (" + probs.join(", ") + ")";
  }
  if (error !== undefined) { box.textContent += (said ? "\n" : "") + error; box.classList.add("error"); }
}

async function streamAnswer(name, text, which, label) {
  const box = document.getElementById("try-" + which);
  box.textContent = "";
  box.classList.remove("error");
  box.dataset.state = "running";
  const res = await post("/runs/" + encodeURIComponent(name) + "/try", {text: text, model: which});
  if (!res.ok) {
    box.textContent = (await res.json()).detail;
    box.classList.add("error");
  } else {
    const reader = res.body.getReader();
    const utf8 = new TextDecoder();
    let all = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      all += utf8.decode(value, {stream: true});
      if (!label) showAnswer(box, all, false);  // a label is one JSON line: shown whole
    }
    showAnswer(box, all, label);
  }
  box.dataset.state = "done";
}

async function tryIt(mode) {
  const name = location.pathname.split("/")[2];
  const text = document.getElementById("try-text").value;
  const button = document.getElementById("try-go");
  button.disabled = true;
  const which = mode === "label" ? ["finetuned"] : ["base", "finetuned"];
  await Promise.all(which.map((w) => streamAnswer(decodeURIComponent(name), text, w, mode === "label")));
  button.disabled = false;
}

function showProblems(problems) {
  const list = document.getElementById("problems");
  list.replaceChildren(...problems.map((p) => { const li = document.createElement("li"); li.textContent = p; return li; }));
}

async function validate() {
  const res = await post("/api/validate", {yaml: document.getElementById("yaml").value});
  const out = await res.json();
  showProblems(out.problems);
  document.getElementById("launch").disabled = !out.ok;
}

async function launchRun() {
  const res = await post("/api/launch", {yaml: document.getElementById("yaml").value});
  const out = await res.json();
  if (out.ok) location.href = "/runs/" + encodeURIComponent(out.run);
  else showProblems(out.problems || [out.detail]);
}

function table(header, rows, title) {
  const box = document.createElement("div");
  if (title) { const h = document.createElement("h3"); h.textContent = title; box.appendChild(h); }
  const t = document.createElement("table");
  for (const [i, cells] of [header, ...rows].entries()) {
    const tr = t.insertRow();
    for (const c of cells) {
      const cell = document.createElement(i ? "td" : "th");
      cell.className = "l";
      cell.textContent = c === null || c === undefined ? "-" : c;
      tr.appendChild(cell);
    }
  }
  box.appendChild(t);
  return box;
}

function shownValue(v) {  // a chat prompt is a list of messages: "role: content" lines
  if (Array.isArray(v)) return v.map((m) => (m && m.role ? m.role + ": " + m.content : String(m))).join("\n");
  return String(v);
}

async function previewData() {
  const box = document.getElementById("data-preview");
  const button = document.getElementById("preview");
  button.disabled = true;
  box.dataset.state = "running";
  box.replaceChildren(Object.assign(document.createElement("p"), {textContent: "Reading the data..."}));
  const out = await (await post("/api/preview", {yaml: document.getElementById("yaml").value})).json();
  box.replaceChildren();
  if (out.problems) showProblems(out.problems);
  if (out.error) box.appendChild(Object.assign(document.createElement("pre"), {className: "error", textContent: out.error}));
  if (out.ok) {
    const report = document.createElement("div");
    report.className = "data";
    for (const [title, header, rows] of out.sections) report.appendChild(table(header, rows, title));
    box.appendChild(report);
    for (const w of out.warnings) box.appendChild(Object.assign(document.createElement("p"), {className: "warning", textContent: w}));
    for (const [split, rows] of Object.entries(out.rows)) {
      const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => k !== "id");
      box.appendChild(table(keys, rows.map((r) => keys.map((k) => (k in r ? shownValue(r[k]) : null))),
                            split + ": first " + rows.length + " rows as parsed"));
    }
  }
  box.dataset.state = "done";
  button.disabled = false;
}

async function newRun() {
  let timer = null;
  const box = document.getElementById("yaml");
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(validate, 300); });
  validate();
  const keys = await (await fetch("/api/keys")).json();
  const search = document.getElementById("key-search");
  const show = () => {
    const q = search.value.trim();
    const hits = keys.filter((k) => !q || k.key.includes(q)).slice(0, 40);
    document.getElementById("key-help").replaceChildren(...hits.map((k) => {
      const p = document.createElement("p");
      p.textContent = k.key + " (" + k.kind + (k.default !== null ? "; default " + k.default : "") + "): " + k.help;
      return p;
    }));
  };
  search.addEventListener("input", show);
  show();
}
