// Convoy dashboard: a hash-routed page over the v1 API. The token lives in localStorage and
// goes out as a Bearer header; live updates come from the job's server-sent events, read with
// fetch() streaming because EventSource cannot send headers.
"use strict";

const TOKEN_KEY = "convoy.token";
const TERMINAL = ["succeeded", "failed", "canceled"];
const view = document.getElementById("view");
let cleanup = () => {};

// ---- helpers -------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = {
  num: (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"),
  int: (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en")),
  time: (s) => (s ? new Date(s).toLocaleString() : "–"),
  shape: (s) => (Array.isArray(s) ? s.join("×") : "–"),
};

function stateBadge(state) {
  return h("span", { class: `state ${state}`, "data-state": state }, state);
}

function progressBar(p) {
  return h("span", { class: "bar", title: fmt.pct(p) },
    h("span", { style: `width:${Math.round(100 * (p || 0))}%` }));
}

function errorText(detail) {
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("\n");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

// ---- API -----------------------------------------------------------------------------------

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

class ApiError extends Error {
  constructor(status, detail) { super(errorText(detail)); this.status = status; }
}

async function api(path, opts = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(opts.headers || {}) };
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts = { ...opts, body: JSON.stringify(opts.json) };
  }
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401) { askToken("The token was refused; enter a valid one."); }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return opts.raw ? r : r.json();
}

// Reads the job's event stream and calls onEvent(type, data) for each event; reconnects with
// Last-Event-ID when the connection drops before the job ends.
async function streamEvents(jobId, onEvent, signal) {
  let lastId = null;
  let ended = false;
  while (!ended && !signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${token()}` };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const r = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal });
      if (!r.ok) throw new ApiError(r.status, r.statusText);
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let type = "message", data = "", id = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) type = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
            else if (line.startsWith("id: ")) id = line.slice(4);
          }
          if (!data) continue;
          if (id) lastId = id;
          const payload = JSON.parse(data);
          if (type === "state" && TERMINAL.includes(payload.state)) ended = true;
          onEvent(type, payload);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status < 500) return;
    }
    if (!ended && !signal.aborted) await new Promise((ok) => setTimeout(ok, 1000));
  }
}

async function downloadBlob(path, filename) {
  const r = await api(path, { raw: true });
  const url = URL.createObjectURL(await r.blob());
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- token dialog --------------------------------------------------------------------------

const login = document.getElementById("login");

function askToken(message) {
  const err = document.getElementById("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  if (!login.open) login.showModal();
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const value = document.getElementById("token-input").value.trim();
  localStorage.setItem(TOKEN_KEY, value);
  try {
    await api("/v1/jobs?limit=1");
    login.close();
    route();
  } catch (e) {
    askToken(e.status === 401 ? "That token was refused." : e.message);
  }
});

document.getElementById("logout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  askToken();
});

// ---- jobs list -----------------------------------------------------------------------------

function jobsView() {
  const tbody = h("tbody");
  const status = h("p", { class: "muted" }, "Loading…");
  view.append(
    h("h1", {}, "Jobs", h("span", { class: "toolbar" },
      h("a", { class: "button", href: "#/submit", id: "new-job" }, "New job"))),
    h("div", { class: "card" },
      h("table", { id: "jobs" },
        h("thead", {}, h("tr", {},
          h("th", {}, "Name"), h("th", {}, "Id"), h("th", {}, "Kind"), h("th", {}, "State"),
          h("th", {}, "Progress"), h("th", { class: "num" }, "Val accuracy"),
          h("th", {}, "Created"))),
        tbody),
      status));
  let timer = null;
  let stopped = false;
  async function refresh() {
    try {
      const page = await api("/v1/jobs?limit=100");
      tbody.replaceChildren(...page.items.map((j) => h("tr", {
        class: "clickable", "data-id": j.id, onclick: () => { location.hash = `#/jobs/${j.id}`; },
      },
        h("td", {}, j.name || h("span", { class: "muted" }, "(unnamed)")),
        h("td", { class: "mono" }, j.id.slice(0, 8)),
        h("td", {}, j.kind), h("td", { title: j.waiting_reason || "" }, stateBadge(j.state),
          j.waiting_reason ? h("div", { class: "muted waiting" }, `waiting: ${j.waiting_reason}`)
            : null),
        h("td", {}, progressBar(j.progress), " ", fmt.pct(j.progress)),
        h("td", { class: "num" }, fmt.pct(j.result && j.result.val_accuracy)),
        h("td", {}, fmt.time(j.created_at)))));
      status.textContent = page.items.length ? "" : "No jobs yet: submit one.";
    } catch (e) {
      status.textContent = e.message;
    }
    // The list is many jobs at once, so it polls; a job's own page streams its events.
    if (!stopped) timer = setTimeout(refresh, 2000);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---- one job -------------------------------------------------------------------------------

const CHARTS = {
  loss: { title: "Loss", series: ["train_loss", "val_loss"], colors: ["#2b59c3", "#e07b00"] },
  accuracy: { title: "Accuracy", series: ["train_accuracy", "val_accuracy"],
    colors: ["#2b59c3", "#1b873f"] },
};

function makeChart(key, container) {
  const spec = CHARTS[key];
  const width = Math.max(320, container.clientWidth - 34);  // inside the card's padding
  const opts = {
    title: spec.title, width, height: 240,
    scales: { x: { time: false } },
    legend: { live: false },
    // whole epochs only on the x axis
    axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
    series: [{ label: "epoch" },
      ...spec.series.map((s, i) => ({ label: s, stroke: spec.colors[i], width: 2,
        points: { show: true, size: 6 } }))],
  };
  const chart = new uPlot(opts, [[], ...spec.series.map(() => [])], container);
  const byEpoch = new Map();
  return {
    add(epoch, values) {
      const row = byEpoch.get(epoch) || {};
      let touched = false;
      for (const s of spec.series) if (s in values) { row[s] = values[s]; touched = true; }
      if (!touched) return;
      byEpoch.set(epoch, row);
      const epochs = [...byEpoch.keys()].sort((a, b) => a - b);
      chart.setData([epochs, ...spec.series.map((s) => epochs.map((e) => {
        const v = byEpoch.get(e)[s];
        return v === undefined ? null : v;
      }))]);
      container.dataset.points = String(epochs.length);
    },
  };
}

function summaryTable(summary) {
  if (!summary || !Array.isArray(summary.layers)) return h("p", { class: "muted" }, "No summary.");
  const rf = (r) => (Array.isArray(r) ? r.join("×") : r ?? "–");
  return h("div", {},
    h("table", { id: "summary" },
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Layer"),
        h("th", {}, "Output shape"), h("th", { class: "num" }, "Params"),
        h("th", {}, "Receptive field"), h("th", { class: "num" }, "FLOPs"),
        h("th", { class: "num" }, "FC equivalent"))),
      h("tbody", {}, summary.layers.map((l) => h("tr", {},
        h("td", {}, l.index), h("td", {}, l.type), h("td", { class: "mono" }, fmt.shape(l.output_shape)),
        h("td", { class: "num" }, fmt.int(l.params)), h("td", {}, rf(l.receptive_field)),
        h("td", { class: "num" }, fmt.int(l.flops)),
        h("td", { class: "num" }, fmt.int(l.fc_equivalent_params)))))),
    h("p", { class: "muted" }, `Total parameters: ${fmt.int(summary.total_params)}`,
      summary.total_flops !== undefined ? ` · FLOPs per image: ${fmt.int(summary.total_flops)}` : ""));
}

async function loadImage(img, path) {
  const r = await api(path, { raw: true });
  img.src = URL.createObjectURL(await r.blob());
}

async function featureMapsCard(jobId, card) {
  const listing = await api(`/v1/jobs/${jobId}/feature-maps`);
  const layers = listing.layers || [];
  card.replaceChildren(h("h2", {}, "Feature maps"),
    h("p", { class: "muted" }, "Each image shows every channel of the layer's output for one input, " +
      "tiled in a grid."));
  for (const layer of layers) {
    const images = h("div", { class: "fm-images" });
    const st = layer.stats || {};
    const stats = ["min", "max", "mean"].filter((k) => typeof st[k] === "number")
      .map((k) => `${k} ${st[k].toPrecision(3)}`).join(" · ");
    card.append(h("div", { class: "fm-layer", "data-layer": layer.name },
      h("h3", {}, `${layer.name} `, h("span", { class: "muted" },
        `${layer.type || ""} · ${fmt.shape(layer.shape)}${stats ? " · " + stats : ""}`)), images));
    // The server draws grids for spatial maps [N, C, H, W] only; flat layers are numbers.
    if (!layer.shape || layer.shape.length !== 4) {
      images.append(h("p", { class: "muted" }, "Not spatial: download the .npy from the API."));
      continue;
    }
    const n = Math.min(layer.shape[0], 8);
    for (let k = 0; k < n; k++) {
      const img = h("img", { class: "fm", alt: `${layer.name} input ${k}` });
      images.append(h("figure", {}, img, h("figcaption", {}, `input ${k}`)));
      const q = `format=png&image=${k}`;
      loadImage(img, `/v1/jobs/${jobId}/feature-maps/${encodeURIComponent(layer.name)}?${q}`)
        .catch((e) => img.replaceWith(h("span", { class: "error" }, e.message)));
    }
  }
  if (!layers.length) card.append(h("p", { class: "muted" }, "No feature maps."));
}

// ---- invariance curves ---------------------------------------------------------------------

const FAMILY_UNITS = { translate: "pixels", rotate: "degrees", scale: "scale factor" };

function layerColor(i, n) {
  return `hsl(${Math.round((300 * i) / Math.max(n - 1, 1))}, 70%, 42%)`;
}

function lineChart(container, { title, xLabel, xs, series, xIncrs }) {
  const width = Math.max(320, container.clientWidth - 34);
  const opts = {
    title, width, height: 260, scales: { x: { time: false } }, legend: { live: false },
    axes: [{ label: xLabel, ...(xIncrs ? { incrs: xIncrs } : {}) }, { label: "distance" }],
    series: [{ label: xLabel }, ...series.map((s) => ({ label: s.label, stroke: s.color,
      width: 2, points: { show: true, size: 6 } }))],
  };
  container.dataset.points = String(xs.length);
  container.dataset.series = String(series.length);
  return new uPlot(opts, [xs, ...series.map((s) => s.values)], container);
}

async function invarianceCard(jobId, card) {
  const data = await api(`/v1/jobs/${jobId}/invariance`);
  const layers = data.layers || [];
  card.replaceChildren(h("h2", {}, "Invariance"),
    h("p", { class: "muted" }, "Distance: how much a layer's maps change under the transform, " +
      "relative to how much they differ between two inputs (0: invariant; about 1: as much as " +
      "another image). See docs/invariance.md."));
  if (!layers.length) { card.append(h("p", { class: "muted" }, "No curves.")); return; }
  const families = Object.keys(layers[0].curves);
  const byFamily = h("div", { class: "grid2" });
  card.append(byFamily);
  // per family: distance against magnitude, one line per layer
  for (const family of families) {
    const xs = layers[0].curves[family].map((p) => p.magnitude);
    const box = h("div", { class: "card chart", id: `inv-${family}` });
    byFamily.append(box);
    lineChart(box, { title: `${family}: distance by magnitude`, xLabel: FAMILY_UNITS[family],
      xs, xIncrs: family === "translate" ? [1, 2, 5, 10, 20, 50, 100] : null, series: layers.map((l, i) => ({ label: l.name, color: layerColor(i, layers.length),
        values: l.curves[family].map((p) => p.distance) })) });
  }
  // distance against depth at one chosen magnitude
  const choices = families.flatMap((f) => layers[0].curves[f].map((p, k) => [f, k, p.magnitude]));
  const select = h("select", { id: "inv-magnitude" }, choices.map(([f, k, m]) =>
    h("option", { value: `${f}:${k}` }, `${f} ${m} ${FAMILY_UNITS[f]}`)));
  const depthBox = h("div", { class: "card chart", id: "inv-depth" });
  card.append(h("p", {}, "Distance by depth at ", select), depthBox);
  const drawDepth = () => {
    const [f, k] = select.value.split(":");
    depthBox.replaceChildren();
    lineChart(depthBox, { title: `distance by layer, ${select.selectedOptions[0].textContent}`,
      xLabel: "layer index", xs: layers.map((l) => l.index), xIncrs: [1, 2, 5, 10, 20, 50],
      series: [{ label: "distance", color: "#2b59c3",
        values: layers.map((l) => l.curves[f][Number(k)].distance) }] });
    depthBox.append(h("p", { class: "muted" }, layers.map((l) => `${l.index}: ${l.name}`).join(" · ")));
  };
  select.addEventListener("change", drawDepth);
  drawDepth();
  // the output: argmax agreement per family and magnitude
  if (data.output) {
    card.append(h("table", { id: "inv-output" },
      h("thead", {}, h("tr", {}, h("th", {}, "Output"), h("th", { class: "num" }, "Magnitude"),
        h("th", { class: "num" }, "Agreement"), h("th", { class: "num" }, "P(true class)"))),
      h("tbody", {}, Object.entries(data.output).flatMap(([f, points]) => points.map((p) =>
        h("tr", {}, h("td", {}, f), h("td", { class: "num" }, p.magnitude),
          h("td", { class: "num" }, fmt.pct(p.agreement)),
          h("td", { class: "num" }, fmt.num(p.true_class_probability, 3))))))));
  }
}

function jobView(jobId) {
  const ctrl = new AbortController();
  const title = h("span", {}, "Job");
  const badge = h("span", {});
  const cancelBtn = h("button", { class: "danger", id: "cancel", type: "button" }, "Cancel");
  const fmBtn = h("button", { class: "secondary", id: "extract", type: "button", hidden: true },
    "Extract feature maps");
  const details = h("dl", { class: "kv" });
  const errorBox = h("p", { class: "error", id: "job-error" });
  const charts = h("div", { class: "grid2", id: "charts" });
  const summaryCard = h("div", { class: "card" }, h("h2", {}, "Model summary"));
  const ckptCard = h("div", { class: "card", id: "checkpoints" }, h("h2", {}, "Checkpoints"));
  const fmCard = h("div", { class: "card", id: "feature-maps", hidden: true });
  const invCard = h("div", { class: "card", id: "invariance", hidden: true });
  const logsCard = h("div", { class: "card" }, h("h2", {}, "Logs"));
  view.append(h("h1", {}, title, badge, h("span", { class: "toolbar" }, fmBtn, cancelBtn)),
    h("div", { class: "card" }, details, errorBox), charts, summaryCard, ckptCard, fmCard,
    invCard, logsCard);

  let job = null;
  let chartSet = null;

  function renderJob() {
    title.textContent = job.name || job.id.slice(0, 8);
    badge.replaceChildren(stateBadge(job.state));
    const done = TERMINAL.includes(job.state);
    cancelBtn.hidden = done;
    fmBtn.hidden = !(job.kind === "train" && job.state === "succeeded");
    const r = job.result || {};
    const rows = [["Id", h("span", { class: "mono" }, job.id)], ["Kind", job.kind],
      ["Progress", h("span", { id: "progress" }, progressBar(job.progress), " ", fmt.pct(job.progress))],
      ["Attempt", `${job.attempt} of ${job.max_attempts}`], ["Created", fmt.time(job.created_at)],
      ["Started", fmt.time(job.started_at)], ["Finished", fmt.time(job.finished_at)]];
    if (job.kind === "train") {
      rows.push(["Val accuracy", h("span", { id: "val-accuracy" }, fmt.pct(r.val_accuracy))],
        ["Val loss", fmt.num(r.val_loss)], ["Epochs done", r.epochs_done ?? "–"]);
    }
    if (job.state === "queued" && job.waiting_reason) {
      rows.push(["Waiting", h("span", { id: "waiting-reason" }, job.waiting_reason)]);
    }
    details.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    errorBox.textContent = job.error || "";
  }

  async function refreshCheckpoints() {
    const list = await api(`/v1/jobs/${jobId}/checkpoints`);
    ckptCard.replaceChildren(h("h2", {}, "Checkpoints"), list.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Epoch"),
        h("th", { class: "num" }, "Bytes"), h("th", {}, "sha256"), h("th", {}, ""))),
      h("tbody", {}, list.map((c) => h("tr", {}, h("td", { class: "mono" }, c.name),
        h("td", { class: "num" }, c.epoch ?? "–"), h("td", { class: "num" }, fmt.int(c.size)),
        h("td", { class: "mono" }, c.sha256.slice(0, 12)),
        h("td", {}, h("button", { class: "secondary", type: "button",
          onclick: () => downloadBlob(`/v1/jobs/${jobId}/checkpoints/${c.name}`, c.name) },
          "Download")))))) : h("p", { class: "muted" }, "None yet."));
  }

  async function refreshLogs() {
    const lines = await api(`/v1/jobs/${jobId}/logs`);
    logsCard.replaceChildren(h("h2", {}, "Logs"), lines.length
      ? h("pre", { class: "mono" }, lines.slice(-200).map((l) =>
        `${fmt.time(l.at)}  ${l.level.padEnd(7)} ${l.message}`).join("\n"))
      : h("p", { class: "muted" }, "No log lines."));
  }

  async function onEnded() {
    job = await api(`/v1/jobs/${jobId}`);
    renderJob();
    refreshCheckpoints().catch(() => {});
    refreshLogs().catch(() => {});
    if (job.kind === "feature_maps" && job.state === "succeeded") {
      fmCard.hidden = false;
      featureMapsCard(jobId, fmCard).catch((e) => fmCard.append(h("p", { class: "error" }, e.message)));
    }
    if (job.kind === "invariance" && job.state === "succeeded") {
      invCard.hidden = false;
      invarianceCard(jobId, invCard).catch((e) => invCard.append(h("p", { class: "error" }, e.message)));
    }
  }

  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try { job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); renderJob(); }
    catch (e) { errorBox.textContent = e.message; }
    cancelBtn.disabled = false;
  });

  fmBtn.addEventListener("click", async () => {
    fmBtn.disabled = true;
    const dataset = job.request.dataset;
    try {
      const fm = await api("/v1/jobs", { method: "POST", json: {
        kind: "feature_maps", name: `${job.name || "job"}-maps`, source: { job_id: job.id },
        inputs: { dataset, indices: [0, 1, 2] }, layers: null } });
      location.hash = `#/jobs/${fm.id}`;
    } catch (e) { errorBox.textContent = e.message; fmBtn.disabled = false; }
  });

  (async () => {
    try {
      job = await api(`/v1/jobs/${jobId}`);
    } catch (e) {
      view.replaceChildren(h("h1", {}, "Job"), h("p", { class: "error" }, e.message));
      return;
    }
    renderJob();
    summaryCard.append(summaryTable(job.summary));
    if (job.kind === "train") {
      const boxes = Object.keys(CHARTS).map((k) => h("div", { class: "card chart", id: `chart-${k}`,
        "data-points": "0" }));
      charts.append(...boxes);
      chartSet = Object.fromEntries(Object.keys(CHARTS).map((k, i) => [k, makeChart(k, boxes[i])]));
    }
    refreshCheckpoints().catch(() => {});
    refreshLogs().catch(() => {});
    if (TERMINAL.includes(job.state)) {
      // A finished job's metrics in one request; the stream would replay them as well.
      const series = (await api(`/v1/jobs/${jobId}/metrics`)).series;
      const byStep = new Map();
      for (const [name, points] of Object.entries(series)) {
        for (const p of points) {
          const e = byStep.get(p.step) || { epoch: p.epoch, values: {} };
          e.values[name] = p.value;
          byStep.set(p.step, e);
        }
      }
      if (chartSet) for (const e of byStep.values()) for (const c of Object.values(chartSet)) c.add(e.epoch, e.values);
      onEnded();
      return;
    }
    streamEvents(jobId, (type, data) => {
      if (type === "state") {
        job.state = data.state;
        if (TERMINAL.includes(data.state)) onEnded(); else renderJob();
      } else if (type === "progress") {
        job.progress = data.progress; renderJob();
      } else if (type === "metric") {
        if (chartSet) for (const c of Object.values(chartSet)) c.add(data.epoch, data.values);
        refreshCheckpoints().catch(() => {});
      }
    }, ctrl.signal);
  })();
  return () => ctrl.abort();
}

// ---- submit --------------------------------------------------------------------------------

const DATASETS = {
  digits: { ref: { name: "digits" }, input_shape: [1, 8, 8], num_classes: 10 },
  synthetic: { ref: { name: "synthetic", samples: 1024, size: 32, channels: 3, num_classes: 4 },
    input_shape: [3, 32, 32], num_classes: 4 },
};

function modelFor(choice, ds) {
  const d = DATASETS[ds];
  if (choice === "small-cnn") {
    return { input_shape: d.input_shape, num_classes: d.num_classes, layers: [
      { type: "conv2d", out_channels: 16, kernel_size: 3, padding: 1 }, { type: "relu" },
      { type: "maxpool2d", kernel_size: 2 }, { type: "flatten" },
      { type: "linear", out_features: d.num_classes }] };
  }
  return { preset: choice, input_shape: d.input_shape, num_classes: d.num_classes };
}

function submitView() {
  const field = (label, input) => h("div", {}, h("label", { for: input.id }, label), input);
  const name = h("input", { id: "f-name", value: "digits-cnn", maxlength: 128 });
  const model = h("select", { id: "f-model" },
    h("option", { value: "small-cnn" }, "Small CNN (conv, relu, max-pool, linear)"),
    h("option", { value: "lenet5-padded" }, "Preset: LeNet-5, padded (fits 8×8)"),
    h("option", { value: "lenet5" }, "Preset: LeNet-5 as published (32×32 inputs)"),
    h("option", { value: "vgg-small" }, "Preset: VGG-small"),
    h("option", { value: "custom" }, "Paste a spec"));
  const dataset = h("select", { id: "f-dataset" }, h("option", { value: "digits" }, "digits (1×8×8, 10 classes)"),
    h("option", { value: "synthetic" }, "synthetic (3×32×32, 4 classes)"));
  const spec = h("textarea", { id: "f-spec", spellcheck: "false" });
  const epochs = h("input", { id: "f-epochs", type: "number", min: 1, value: 5 });
  const batch = h("input", { id: "f-batch", type: "number", min: 1, value: 64 });
  const lr = h("input", { id: "f-lr", type: "number", step: "any", min: 0, value: 0.05 });
  const optimizer = h("select", { id: "f-optimizer" }, ["sgd", "adam", "adamw"].map((o) => h("option", { value: o }, o)));
  const device = h("select", { id: "f-device" }, ["auto", "cpu", "cuda"].map((o) => h("option", { value: o }, o)));
  const out = h("div", { id: "submit-result" });
  const fill = () => {
    if (model.value !== "custom") spec.value = JSON.stringify(modelFor(model.value, dataset.value), null, 2);
  };
  model.addEventListener("change", fill);
  dataset.addEventListener("change", fill);
  spec.addEventListener("input", () => { model.value = "custom"; });
  fill();

  function body() {
    let parsed;
    try { parsed = JSON.parse(spec.value); } catch (e) { throw new Error(`model spec: not JSON (${e.message})`); }
    return { kind: "train", name: name.value, model: parsed, dataset: DATASETS[dataset.value].ref,
      train: { epochs: Number(epochs.value), batch_size: Number(batch.value), lr: Number(lr.value),
        optimizer: optimizer.value }, device: device.value };
  }
  const check = h("button", { class: "secondary", type: "button", id: "f-check", onclick: async () => {
    try { out.replaceChildren(summaryTable(await api("/v1/models/summary", { method: "POST", json: body().model }))); }
    catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
  } }, "Check spec");
  const form = h("form", { id: "submit-form", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body() });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
  } },
  h("div", { class: "grid2" },
    h("div", {}, field("Name", name), field("Model", model), field("Dataset", dataset),
      h("div", { class: "row" }, field("Epochs", epochs), field("Batch size", batch)),
      h("div", { class: "row" }, field("Learning rate", lr), field("Optimizer", optimizer)),
      field("Device", device)),
    h("div", {}, field("Model spec (JSON)", spec))),
  h("p", { class: "row", style: "gap:8px" }, h("button", { type: "submit", id: "f-submit" }, "Submit job"), check));
  view.append(h("h1", {}, "Submit a training job"), h("div", { class: "card" }, form), out);
  return () => {};
}

// ---- fleet (admin) -------------------------------------------------------------------------

function fleetView() {
  const status = h("p", { class: "muted" }, "Loading…");
  const counts = h("dl", { class: "kv", id: "fleet-counts" });
  const queues = h("tbody");
  const workers = h("tbody");
  view.append(h("h1", {}, "Fleet"), status,
    h("div", { class: "card" }, h("h2", {}, "Jobs by state"), counts),
    h("div", { class: "card" }, h("h2", {}, "Queues"), h("table", { id: "fleet-queues" },
      h("thead", {}, h("tr", {}, h("th", {}, "Queue"), h("th", { class: "num" }, "Workers"),
        h("th", { class: "num" }, "Queued"))), queues)),
    h("div", { class: "card" }, h("h2", {}, "Workers"), h("table", { id: "fleet-workers" },
      h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Host"),
        h("th", {}, "State"), h("th", {}, "Job"), h("th", {}, "Devices"), h("th", {}, "Queues"),
        h("th", {}, "Last seen"))), workers)));
  let timer = null;
  let stopped = false;
  async function refresh() {
    try {
      const f = await api("/v1/fleet");
      counts.replaceChildren(...Object.entries(f.jobs).flatMap(([k, v]) =>
        [h("dt", {}, k), h("dd", { "data-state": k }, fmt.int(v))]));
      queues.replaceChildren(...f.queues.map((q) => h("tr", { "data-queue": q.name },
        h("td", { class: "mono" }, q.name), h("td", { class: "num" }, q.workers),
        h("td", { class: "num" }, q.queued))));
      workers.replaceChildren(...f.workers.map((w) => h("tr", { "data-id": w.id },
        h("td", { class: "mono" }, w.id), h("td", {}, w.host), h("td", {}, w.state),
        h("td", {}, w.current_job ? h("a", { href: `#/jobs/${w.current_job}`, class: "mono" },
          w.current_job.slice(0, 8)) : "–"),
        h("td", {}, w.devices.join(", ")), h("td", { class: "mono" }, w.queues.join(", ")),
        h("td", {}, fmt.time(w.last_seen)))));
      status.textContent = f.workers.length ? ""
        : `No worker seen in the last ${f.worker_seen_seconds} s.`;
    } catch (e) {
      status.textContent = e.status === 403 ? "The fleet page needs an admin token." : e.message;
    }
    if (!stopped) timer = setTimeout(refresh, 2000);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---- sweeps (issue 20) ---------------------------------------------------------------------

function sweepsView() {
  const tbody = h("tbody");
  const status = h("p", { class: "muted" }, "Loading…");
  view.append(h("h1", {}, "Sweeps"), h("div", { class: "card" },
    h("table", { id: "sweeps" }, h("thead", {}, h("tr", {},
      h("th", {}, "Name"), h("th", {}, "Id"), h("th", {}, "State"), h("th", {}, "Trials"),
      h("th", { class: "num" }, "Best"), h("th", {}, "Created"))), tbody), status));
  let timer = null;
  let stopped = false;
  async function refresh() {
    try {
      const page = await api("/v1/sweeps?limit=100");
      tbody.replaceChildren(...page.items.map((s) => h("tr", {
        class: "clickable", "data-id": s.id, onclick: () => { location.hash = `#/sweeps/${s.id}`; },
      },
        h("td", {}, s.name || h("span", { class: "muted" }, "(unnamed)")),
        h("td", { class: "mono" }, s.id.slice(0, 8)), h("td", {}, stateBadge(s.state)),
        h("td", {}, progressBar(s.progress), ` ${s.trials.length}/${s.trials_total}`),
        h("td", { class: "num" }, fmt.num(s.best && s.best.value)),
        h("td", {}, fmt.time(s.created_at)))));
      status.textContent = page.items.length ? "" : "No sweeps yet (POST /v1/sweeps, or convoy sweep submit).";
    } catch (e) {
      status.textContent = e.message;
    }
    if (!stopped) timer = setTimeout(refresh, 2000);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// One scatter per parameter: the objective (y) against the parameter's value (x); a
// categorical parameter's choices are placed at 0, 1, 2... in the order of `choices`.
function paramChart(path, spec, trials, metric, container) {
  const done = trials.filter((t) => t.value !== null && t.value !== undefined);
  const choices = spec.type === "categorical" ? spec.choices : null;
  const xOf = (v) => (choices ? choices.findIndex((c) => c === v) : Number(v));
  const pts = done.map((t) => [xOf(t.params[path]), t.value]).sort((a, b) => a[0] - b[0]);
  const width = Math.max(280, Math.min(420, container.clientWidth - 34));
  const el = h("div", { class: "param-chart", "data-param": path, "data-points": String(pts.length) });
  container.append(el);
  new uPlot({
    title: path, width, height: 200, scales: { x: { time: false, distr: spec.log ? 3 : 1 } },
    legend: { show: false },
    axes: [{ label: path, ...(choices ? { values: (u, ticks) => ticks.map((i) =>
      (Number.isInteger(i) && choices[i] !== undefined ? String(choices[i]) : "")) } : {}) },
      { label: metric }],
    series: [{}, { stroke: "#2b59c3", width: 0, points: { show: true, size: 8 } }],
  }, [pts.map((p) => p[0]), pts.map((p) => p[1])], el);
}

function sweepView(sweepId) {
  const head = h("div");
  const charts = h("div", { class: "card", id: "sweep-charts" });
  const tbody = h("tbody");
  view.append(head, h("div", { class: "card" }, h("table", { id: "trials" },
    h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Job"), h("th", {}, "State"),
      h("th", {}, "Params"), h("th", { class: "num" }, "Value"), h("th", {}, "Epochs"),
      h("th", {}, "Pruned"))), tbody)), charts);
  let timer = null;
  let stopped = false;
  let drawn = "";
  async function refresh() {
    let s;
    try { s = await api(`/v1/sweeps/${sweepId}`); } catch (e) {
      head.replaceChildren(h("p", { class: "error" }, e.message));
      return;
    }
    const metric = (s.objective && s.objective.metric) || "value";
    head.replaceChildren(h("h1", {}, s.name || "Sweep", " ", stateBadge(s.state)),
      h("p", {}, progressBar(s.progress), ` ${fmt.pct(s.progress)} of ${s.trials_total} trials; `,
        `objective ${metric} (${(s.objective && s.objective.mode) || "max"})`,
        s.best ? h("span", {}, "; best ", fmt.num(s.best.value), " (trial ", String(s.best.number),
          ", ", h("a", { href: `#/jobs/${s.best.job_id}` }, "job"), ")") : ""),
      s.state === "running" ? h("button", { type: "button", id: "cancel-sweep", onclick: async () => {
        try { await api(`/v1/sweeps/${sweepId}/cancel`, { method: "POST" }); } catch (e) { alert(e.message); }
        refresh();
      } }, "Cancel sweep") : "");
    tbody.replaceChildren(...s.trials.map((t) => h("tr", { "data-number": String(t.number) },
      h("td", {}, String(t.number)),
      h("td", { class: "mono" }, t.job_id ? h("a", { href: `#/jobs/${t.job_id}` }, t.job_id.slice(0, 8)) : "–"),
      h("td", {}, stateBadge(t.state)),
      h("td", { class: "mono" }, Object.entries(t.params).map(([k, v]) => `${k}=${v}`).join("  ")),
      h("td", { class: "num" }, fmt.num(t.value)), h("td", {}, String(t.epochs)),
      h("td", {}, t.pruned ? "pruned" : (t.error ? h("span", { class: "error" }, t.error) : "")))));
    const key = JSON.stringify(s.trials.map((t) => [t.number, t.value]));
    if (key !== drawn) {
      drawn = key;
      charts.replaceChildren(h("h2", {}, `${metric} against each parameter`));
      for (const [path, spec] of Object.entries(s.request.space)) {
        paramChart(path, spec, s.trials, metric, charts);
      }
    }
    if (!stopped && s.state === "running") timer = setTimeout(refresh, 2000);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---- router --------------------------------------------------------------------------------

function route() {
  cleanup();
  view.replaceChildren();
  if (!token()) { askToken(); cleanup = () => {}; return; }
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/jobs\/([0-9a-f]+)$/);
  const sw = hash.match(/^#\/sweeps\/([0-9a-f]+)$/);
  if (m) cleanup = jobView(m[1]);
  else if (sw) cleanup = sweepView(sw[1]);
  else if (hash === "#/sweeps") cleanup = sweepsView();
  else if (hash === "#/submit") cleanup = submitView();
  else if (hash === "#/fleet") cleanup = fleetView();
  else cleanup = jobsView();
}

window.addEventListener("hashchange", route);
route();
