// lorakit ui: the charts and the few interactive bits of each page. No framework, no build step;
// Plotly comes from the plotly package via /vendor. Text from the server is only ever set with
// textContent (never innerHTML), so a run name or a sample holding markup shows as text.
"use strict";

const lk = {
  root: () => document.body.dataset.root,
  data: () => JSON.parse(document.getElementById("page-data").textContent),
  runPath: (id) => id.split("/").map(encodeURIComponent).join("/"),
  config: { displaylogo: false, responsive: true },

  async api(path, options = {}) {
    const reply = await fetch(lk.root() + path, options);
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error ? body.error.message : reply.statusText);
    return body;
  },

  layout(title, yTitle, xTitle = "step") {
    return { title: { text: title }, height: 320, margin: { l: 60, r: 20, t: 40, b: 45 },
             xaxis: { title: { text: xTitle } }, yaxis: { title: { text: yTitle } }, legend: { orientation: "h" } };
  },

  series(records, key) {
    const points = records.filter((r) => r[key] !== undefined);
    return { x: points.map((r) => r.step), y: points.map((r) => r[key]) };
  },

  // Plotly renders trace names as its own markup (<a href>, <b>…): a run's name must be text there too.
  plain: (text) => String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"),

  // A constant series (a constant learning rate) would get Plotly's default ±1 axis and sit at "0".
  valueAxis(ys) {
    const values = ys.filter((v) => typeof v === "number");
    if (!values.length || Math.min(...values) !== Math.max(...values)) return { autorange: true, exponentformat: "e" };
    const v = values[0];
    return { range: v === 0 ? [-1, 1] : [Math.min(0, 2 * v), Math.max(0, 2 * v)], autorange: false, exponentformat: "e" };
  },

  cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  },
};

// -- runs table: sort by a column, pick runs to compare -----------------------------------------
function runsPage() {
  const table = document.getElementById("runs-table");
  if (!table) return;
  table.querySelectorAll("th[data-sort]").forEach((th, i) => {
    th.addEventListener("click", () => {
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach((other) => other.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const column = i + 1; // the first column holds the checkboxes
      const numeric = th.dataset.sort === "num";
      const key = (row) => {
        const raw = row.children[column].dataset.value;
        if (!numeric) return raw;
        const value = parseFloat(raw);
        return Number.isNaN(value) ? null : value;
      };
      const rows = [...table.tBodies[0].rows];
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null); // blanks last
        const order = numeric ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach((row) => table.tBodies[0].appendChild(row));
    });
  });
  const button = document.getElementById("compare-button");
  const picked = () => [...table.querySelectorAll("input.pick:checked")].map((box) => box.value);
  table.addEventListener("change", () => {
    const count = picked().length;
    button.disabled = count < 2 || count > 5;
  });
  button.addEventListener("click", () => {
    const query = picked().map((id) => "run=" + encodeURIComponent(id)).join("&");
    window.location.href = lk.root() + "/compare?" + query;
  });
}

// -- one run: loss and learning-rate curves, followed live while the run is unfinished -------------
function runPage() {
  const data = lk.data();
  const train = lk.series(data.metrics, "loss"), evals = lk.series(data.metrics, "eval_loss");
  Plotly.newPlot("loss-chart", [
    { ...train, name: "train loss", mode: "lines+markers" },
    { ...evals, name: "eval loss", mode: "lines+markers", line: { dash: "dash" } },
  ], lk.layout("Loss", "loss"), lk.config);
  const rates = lk.series(data.metrics, "learning_rate");
  const rateLayout = lk.layout("Learning rate", "lr");
  rateLayout.yaxis = { ...rateLayout.yaxis, ...lk.valueAxis(rates.y) };
  Plotly.newPlot("lr-chart", [{ ...rates, name: "learning rate", mode: "lines" }], rateLayout, lk.config);
  if (data.finished) return;
  let next = data.metrics.length;
  const follow = async () => {
    let body;
    try {
      body = await lk.api(`/api/runs/${lk.runPath(data.id)}/metrics?after=${next}`);
    } catch (error) {
      return setTimeout(follow, 3000);
    }
    next = body.next;
    if (body.records.length) {
      const add = (key) => lk.series(body.records, key);
      const [t, e, lr] = [add("loss"), add("eval_loss"), add("learning_rate")];
      Plotly.extendTraces("loss-chart", { x: [t.x, e.x], y: [t.y, e.y] }, [0, 1]);
      Plotly.extendTraces("lr-chart", { x: [lr.x], y: [lr.y] }, [0]);
      const chart = document.getElementById("lr-chart");
      Plotly.relayout(chart, { yaxis: { ...chart.layout.yaxis, ...lk.valueAxis(chart.data[0].y) } });
      document.getElementById("run-step").textContent = body.records[body.records.length - 1].step;
    }
    if (body.finished) {
      const status = document.getElementById("run-status");
      status.textContent = "finished (reload for the before/after table)";
      status.className = "status finished";
      return;
    }
    setTimeout(follow, 1000);
  };
  setTimeout(follow, 1000);
}

// -- compare: every run's curves on one chart ------------------------------------------------------
function comparePage() {
  const colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
  const traces = [];
  lk.data().runs.forEach((run, i) => {
    const color = colors[i % colors.length];
    traces.push({ ...lk.series(run.metrics, "loss"), name: `${lk.plain(run.id)} train`, mode: "lines",
                  line: { color } });
    traces.push({ ...lk.series(run.metrics, "eval_loss"), name: `${lk.plain(run.id)} eval`, mode: "lines+markers",
                  line: { color, dash: "dash" } });
  });
  Plotly.newPlot("compare-chart", traces, lk.layout("Loss", "loss"), lk.config);
}

// -- one registry adapter: promote and roll back (admin key, confirmation) --------------------------
function adapterPage() {
  const result = document.getElementById("action-result");
  const send = async (path, body, question) => {
    if (!window.confirm(question)) return;
    const key = document.getElementById("admin-key").value;
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    result.className = "";
    result.textContent = "working…";
    try {
      const answer = await lk.api(path, { method: "POST", headers, body: JSON.stringify(body) });
      result.textContent = answer.to !== undefined ? `${body.name}:${body.alias} → v${answer.to} (was v${answer.from})`
        : `${body.ref.split("@")[0]}:${body.alias} → v${answer.version}` + (answer.previous ? ` (was v${answer.previous})` : "");
      result.className = "ok";
      setTimeout(() => window.location.reload(), 800);
    } catch (error) {
      result.textContent = "refused: " + error.message;
      result.className = "error";
    }
  };
  const promote = document.getElementById("promote-form");
  promote.addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(promote), name = promote.dataset.name;
    const gates = form.get("gates").split(",").map((g) => g.trim()).filter(Boolean);
    const body = { ref: `${name}@${form.get("version")}`, alias: form.get("alias"), gates,
                   eval: form.get("eval") || null, allow_regression: form.get("allow_regression") === "on",
                   new_base: form.get("new_base") === "on" };
    const gated = gates.length ? ` after its gates (${gates.join(", ")})` : "";
    send("/api/registry/promote", body, `Point ${name}:${body.alias} at v${form.get("version")}${gated}?`);
  });
  const rollback = document.getElementById("rollback-form");
  rollback.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = { name: rollback.dataset.name, alias: new FormData(rollback).get("alias") };
    send("/api/registry/rollback", body, `Roll ${body.name}:${body.alias} back to the version it held before?`);
  });
}

// -- the live server: gauges, rates and latencies from successive scrapes, and the playground ------
function serverPage() {
  if (!document.getElementById("rps-chart")) return;
  Plotly.newPlot("rps-chart", [{ x: [], y: [], name: "requests/s", mode: "lines+markers" },
                               { x: [], y: [], name: "output tokens/s", mode: "lines", yaxis: "y2" }],
                 { ...lk.layout("Throughput", "requests/s", "time"),
                   yaxis2: { title: { text: "tokens/s" }, overlaying: "y", side: "right" } }, lk.config);
  Plotly.newPlot("latency-chart", [{ x: [], y: [], name: "TTFT (mean, ms)", mode: "lines+markers" },
                                   { x: [], y: [], name: "inter-token latency (mean, ms)", mode: "lines+markers" }],
                 lk.layout("Latency", "ms", "time"), lk.config);
  let previous = null;
  const total = (m) => Object.values(m.requests).reduce((a, b) => a + b, 0);
  const meanMs = (now, before, name) => {
    const h = now.histograms[name], p = before.histograms[name];
    if (!h) return null;
    const count = h.count - (p ? p.count : 0), sum = h.sum - (p ? p.sum : 0);
    return count > 0 ? (1000 * sum) / count : null;
  };
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  const models = (list) => {
    const body = document.querySelector("#models-table tbody");
    body.replaceChildren();
    list.forEach((m) => {
      const row = document.createElement("tr");
      [m.id, m.parent ? "adapter" : "base model", m.root || ""].forEach((text) => lk.cell(row, text));
      body.appendChild(row);
    });
    const select = document.getElementById("playground-adapter");
    const names = list.filter((m) => m.parent).map((m) => m.id);
    if ([...select.options].map((o) => o.value).join() !== names.join()) {
      const chosen = select.value;
      select.replaceChildren(...names.map((name) => new Option(name, name, false, name === chosen)));
    }
  };
  const poll = async () => {
    try {
      const snap = await lk.api("/api/server");
      show("server-health", snap.health);
      document.getElementById("server-health").className = "status " + (snap.health === "ok" ? "finished" : "stopped");
      models(snap.models);
      const m = snap.metrics;
      if (m) {
        const g = m.gauges, c = m.counters;
        show("g-running", g.num_requests_running);
        show("g-waiting", g.num_requests_waiting);
        show("g-adapters", g.adapters_resident);
        show("g-kv", `${g.kv_cache_blocks_used} / ${g.kv_cache_blocks_total} blocks (${(100 * g.kv_cache_usage_ratio).toFixed(0)}%)`);
        show("g-cache", `${c.adapter_cache_hits} / ${c.adapter_cache_misses} / ${c.adapter_cache_evictions}`);
        show("g-tps", g.generation_tokens_per_second.toFixed(1));
        if (previous) {
          const seconds = snap.time - previous.time, at = [new Date(snap.time * 1000)];
          const rps = (total(m) - total(previous.metrics)) / seconds;
          Plotly.extendTraces("rps-chart", { x: [at, at], y: [[rps], [g.generation_tokens_per_second]] }, [0, 1], 300);
          Plotly.extendTraces("latency-chart", {
            x: [at, at],
            y: [[meanMs(m, previous.metrics, "time_to_first_token_seconds")],
                [meanMs(m, previous.metrics, "inter_token_latency_seconds")]],
          }, [0, 1], 300);
        }
        previous = snap;
      }
    } catch (error) {
      show("server-health", "dashboard error: " + error.message);
    }
    setTimeout(poll, 2000);
  };
  poll();
  const form = document.getElementById("playground");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const headers = { "Content-Type": "application/json" };
    if (data.get("api_key")) headers.Authorization = "Bearer " + data.get("api_key");
    show("answer-adapter", "…");
    show("answer-base", "…");
    try {
      const answer = await lk.api("/api/server/chat", {
        method: "POST", headers,
        body: JSON.stringify({ adapter: data.get("adapter"), prompt: data.get("prompt"),
                               max_tokens: Number(data.get("max_tokens")) }),
      });
      for (const side of ["adapter", "base"]) {
        const reply = answer[side];
        show(`answer-${side}`, reply.error ? "error: " + reply.error : reply.text);
        show(`answer-${side}-model`, reply.model + (reply.seconds !== undefined ? ` · ${reply.seconds} s` : ""));
      }
    } catch (error) {
      show("answer-adapter", "error: " + error.message);
      show("answer-base", "");
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const pages = { runs: runsPage, run: runPage, compare: comparePage, adapter: adapterPage, server: serverPage };
  const start = pages[document.body.dataset.page];
  if (start) start();
});
