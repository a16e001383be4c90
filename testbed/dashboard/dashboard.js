// The run's live page: a snapshot when (re)connected, then an update a second (testbed/dashboard.py).
"use strict";
(function () {
  const MAX_POINTS = 3600; // as the server's ring buffer (testbed/live.py SERIES_POINTS)
  const COLORS = ["#2a9d3a", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b",
                  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#444444"];
  const MAX_OUTCOMES = 12;
  const dash = { updates: 0, snapshots: 0, finished: false, state: null, socket: null };
  window.dashboard = dash;
  let points = [];
  let markers = [];
  let outcomes = [];
  let rateChart = null, latencyChart = null;

  const $ = (id) => document.getElementById(id);
  const fmtInt = (n) => (n === null || n === undefined) ? "-" : Number(n).toLocaleString("en-US");
  const fmtMs = (v) => (v === null || v === undefined) ? "-" : (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " ms";
  const fmtRate = (v) => (v === null || v === undefined) ? "-" : (v >= 100 ? v.toFixed(0) : v.toFixed(2)) + "/s";
  function fmtSpan(s) {
    if (s === null || s === undefined) return "-";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " days";
  }
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function fillTable(id, rows) {
    const body = $(id).querySelector("tbody");
    body.replaceChildren(...rows.map((cells) => {
      const tr = document.createElement("tr");
      cells.forEach((c) => tr.appendChild(c));
      return tr;
    }));
  }

  function markerHook(u) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.font = `${Math.round(10 * devicePixelRatio)}px sans-serif`;
    for (const m of markers) {
      const x = u.valToPos(m.wall, "x", true);
      if (!(x >= left && x <= left + width)) continue;
      ctx.strokeStyle = m.kind === "phase" ? "#888" : "#c60";
      ctx.setLineDash(m.kind === "phase" ? [4, 4] : []);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(m.kind === "phase" ? m.detail : m.kind, x + 3, top + 12 * devicePixelRatio);
    }
    ctx.restore();
  }

  function chartWidth() { return Math.max(300, Math.min(760, (window.innerWidth - 120) / 2)); }

  function makeCharts() {
    const width = chartWidth();
    const common = { width, height: 240, scales: { x: { time: true } }, hooks: { draw: [markerHook] },
                     legend: { live: false } };
    if (rateChart) rateChart.destroy();
    rateChart = new uPlot(Object.assign({}, common, {
      series: [{}].concat(outcomes.map((o, i) => ({ label: o, stroke: COLORS[i % COLORS.length], width: 1.5 }))),
      axes: [{}, { label: "attempts/s", size: 60 }],
    }), rateData(), $("rates-chart"));
    if (!latencyChart) {
      latencyChart = new uPlot(Object.assign({}, common, {
        series: [{}, { label: "p50", stroke: "#1f77b4" }, { label: "p90", stroke: "#ff7f0e" },
                 { label: "p99", stroke: "#d62728", width: 2 }],
        axes: [{}, { label: "ms", size: 60 }],
      }), latencyData(), $("latency-chart"));
    }
  }
  function rateData() {
    const xs = points.map((p) => p.t);
    return [xs].concat(outcomes.map((o) => points.map((p) => {
      if (o === "other") {
        let s = 0;
        for (const [k, v] of Object.entries(p.rates)) if (!outcomes.includes(k)) s += v;
        return s;
      }
      return p.rates[o] || 0;
    })));
  }
  function latencyData() {
    return [points.map((p) => p.t), points.map((p) => p.p50), points.map((p) => p.p90),
            points.map((p) => p.p99)];
  }
  function addPoints(ps) {
    for (const p of ps) points.push(p);
    if (points.length > MAX_POINTS) points = points.slice(points.length - MAX_POINTS);
    let changed = false;
    for (const p of ps) {
      for (const o of Object.keys(p.rates)) {
        if (outcomes.includes(o)) continue;
        if (outcomes.length < MAX_OUTCOMES) { outcomes.push(o); changed = true; }
        else if (!outcomes.includes("other")) { outcomes.push("other"); changed = true; }
      }
    }
    if (changed || !rateChart) makeCharts();
    else rateChart.setData(rateData());
    latencyChart.setData(latencyData());
  }

  function render(state) {
    dash.state = state;
    $("scenario").textContent = state.scenario;
    document.title = `testbed: ${state.scenario} (${state.status})`;
    const status = $("status");
    status.textContent = state.status;
    status.className = "status " + state.status;
    const virtual = state.clock === "virtual" ? " (virtual)" : "";
    $("clock").textContent = `${fmtSpan(state.run_time)} of ${fmtSpan(state.duration)}${virtual}`;
    $("phase").textContent = state.phase ? `phase: ${state.phase}` : "";
    const t = state.totals;
    $("attempts").textContent = fmtInt(t.attempts);
    $("rate").textContent = fmtRate(t.rate);
    $("p99").textContent = fmtMs(t.p99);
    $("errors").textContent = fmtInt(t.errors);
    $("false_rejects").textContent = fmtInt(t.false_rejects);
    $("dropped").textContent = fmtInt(t.dropped);
    $("false_accepts").textContent = fmtInt(t.false_accepts);
    $("fa-tile").classList.toggle("bad", t.false_accepts > 0);
    fillTable("cohorts", state.cohorts.map((c) => [
      cell(c.name), cell(c.expected),
      cell(fmtInt(c.attempts), "num"),
      cell(c.matched_share === null ? "-" : `${fmtInt(c.matched)} (${(100 * c.matched_share).toFixed(1)}%)`, "num"),
      cell(fmtInt(c.false_accepts), c.false_accepts > 0 ? "num bad" : "num"),
      cell(fmtInt(c.errors), "num"),
    ]));
    const final = state.thresholds.length && state.thresholds[0].final;
    $("thresholds-note").textContent = final ? "as judged at the end" : "as they stand";
    fillTable("thresholds", state.thresholds.map((th) => [
      cell(th.expression), cell(th.observed), cell(th.ok ? "holds" : "fails", th.ok ? "ok" : "bad"),
    ]));
    markers = state.markers;
    fillTable("markers", markers.map((m) => [cell(fmtSpan(m.t), "num"), cell(m.kind), cell(m.detail)]));
    $("shards-box").style.display = state.shards.length ? "" : "none";
    fillTable("shards", state.shards.map((s) => [
      cell(s.key), cell(s.state, s.state === "failed" ? "bad" : ""), cell(fmtInt(s.attempts), "num"), cell(s.detail),
    ]));
    $("updates").textContent = dash.updates;
    $("snapshots").textContent = dash.snapshots;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws`);
    dash.socket = socket;
    socket.onopen = () => { $("conn").textContent = ""; };
    socket.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "snapshot") {
        dash.snapshots += 1;
        points = [];
        outcomes = [];
        rateChart = rateChart && (rateChart.destroy(), null);
        render(msg.state);
        addPoints(msg.series);
      } else {
        dash.updates += 1;
        render(msg.state);
        addPoints(msg.points);
        if (msg.type === "final") dash.finished = true;
      }
    };
    socket.onclose = () => {
      if (dash.finished) { $("conn").textContent = "run over: the page keeps its last figures"; return; }
      $("conn").textContent = "disconnected: reconnecting";
      setTimeout(connect, 2000);
    };
  }
  window.addEventListener("resize", () => {
    const width = chartWidth();
    for (const c of [rateChart, latencyChart]) if (c) c.setSize({ width, height: 240 });
  });
  connect();
})();
