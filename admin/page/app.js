// metronome's live page. Polls /stats every second, turns counter deltas between two polls
// into rates, and draws the pipeline (threads around their stages), request rate and latency.
// Plain JavaScript and inline SVG: no framework, no build step, nothing loaded from elsewhere.
'use strict';

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 3000;
const HISTORY_S = 300;   // the charts show the last five minutes
const SPARK_N = 60;      // stage sparklines: the last minute
const SVG_NS = 'http://www.w3.org/2000/svg';

const state = {
  prev: null,           // the previous /stats sample
  layoutKey: '',        // the pipeline shape the diagram was built for
  stageEls: {},         // stage name -> its elements
  threadEls: {},        // thread name -> its elements
  history: [],          // one point per poll: {t, ok, r2xx, r4xx, r5xx, p50, p99}
  sparks: {},           // stage name -> recent items/s
  updates: 0,
  lastOk: 0,            // Date.now() of the last successful refresh
  lastDerived: null,    // the latest derived figures, to redraw on resize
};

// --- small helpers -------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'data') Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function byName(list) {
  const m = {};
  for (const x of list || []) m[x.name] = x;
  return m;
}

function setText(e, text) {
  if (e && e.textContent !== text) e.textContent = text;
}

// The items/s number, plain so that tests and people can read it: "15342", "42.5", "0".
function fmtRate(r) {
  if (r == null || !isFinite(r)) return '–';
  if (r >= 100) return String(Math.round(r));
  if (r >= 0.05) return r.toFixed(1);
  return '0';
}

// Compact numbers for headers and axes: 15.3k, 1.2M.
function fmtShort(n) {
  if (n == null || !isFinite(n)) return '–';
  const a = Math.abs(n);
  const trim = (x) => x.replace(/\.0$/, '');
  if (a >= 1e6) return trim((n / 1e6).toFixed(a >= 1e7 ? 0 : 1)) + 'M';
  if (a >= 1e3) return trim((n / 1e3).toFixed(a >= 1e4 ? 0 : 1)) + 'k';
  if (a >= 10 || Number.isInteger(n)) return String(Math.round(n));
  return n.toFixed(1);
}

function fmtDur(ns) {
  if (ns == null || !isFinite(ns)) return '–';
  if (ns < 1e3) return Math.round(ns) + ' ns';
  if (ns < 1e6) return (ns / 1e3).toFixed(ns < 1e4 ? 1 : 0) + ' µs';
  if (ns < 1e9) return (ns / 1e6).toFixed(ns < 1e7 ? 1 : 0) + ' ms';
  return (ns / 1e9).toFixed(2) + ' s';
}

// Durations from the config: 200000 ns -> "200µs", 1000000 -> "1ms".
function fmtSpan(ns) {
  if (!ns) return '0';
  for (const [unit, d] of [['s', 1e9], ['ms', 1e6], ['µs', 1e3]]) {
    if (ns >= d) return +(ns / d).toFixed(2) + unit;
  }
  return ns + 'ns';
}

function fmtUptime(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  const pad = (x) => String(x).padStart(2, '0');
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${pad(m)}m`;
  return `${m}m ${pad(s % 60)}s`;
}

// green below half the budget, amber towards 80 %, red at and past 100 %.
function utilColor(u) {
  let hue;
  if (u <= 0.5) hue = 135;
  else if (u <= 0.8) hue = 135 - ((u - 0.5) / 0.3) * 95;
  else hue = 40 - ((Math.min(u, 1) - 0.8) / 0.2) * 40;
  return `hsl(${hue.toFixed(0)} 68% 47%)`;
}

// --- histograms ----------------------------------------------------------------------------

// The difference of two cumulative histograms ({buckets: [[index, count], ...]}).
function histDelta(cur, prev) {
  const counts = new Map();
  let total = 0;
  const before = new Map((prev && prev.buckets) || []);
  for (const [i, c] of (cur && cur.buckets) || []) {
    const d = c - (before.get(i) || 0);
    if (d > 0) {
      counts.set(i, d);
      total += d;
    }
  }
  return { counts, total };
}

// The q-quantile of a delta, interpolated inside its bucket as the server does.
function quantile(delta, q, bounds) {
  if (!delta || delta.total === 0) return null;
  const rank = q * delta.total;
  let seen = 0;
  const idx = [...delta.counts.keys()].sort((a, b) => a - b);
  for (const i of idx) {
    const c = delta.counts.get(i);
    if (seen + c >= rank) {
      const lo = i === 0 ? 0 : bounds[i - 1];
      const hi = bounds[i] == null ? lo * 1.19 : bounds[i];
      return lo + (hi - lo) * Math.min(1, Math.max(0, (rank - seen) / c));
    }
    seen += c;
  }
  return bounds[bounds.length - 2];
}

// --- derived figures -----------------------------------------------------------------------

function stagesOfType(stats, type) {
  return (stats.stages || []).filter((s) => s.type === type);
}

function sumExtra(stages, key) {
  return stages.reduce((a, s) => a + ((s.extra && s.extra[key]) || 0), 0);
}

function findHist(stage, name) {
  const e = (stage.histograms || []).find((x) => x.name === name && !x.label);
  return e ? e.histogram : null;
}

// Everything that needs two samples. Returns null when there is no usable previous sample.
function derive(cur, prev) {
  if (!prev || cur.uptime_seconds < prev.uptime_seconds || layoutKey(cur) !== layoutKey(prev)) return null;
  const dt = cur.time - prev.time;
  if (!(dt > 0.05)) return null;
  const bounds = cur.bucket_upper_bounds_ns;
  const pThreads = byName(prev.threads), pStages = byName(prev.stages);
  const out = { dt, threads: {}, stages: {} };

  for (const s of cur.stages) {
    const p = pStages[s.name];
    const din = s.items_in - p.items_in, dout = s.items_out - p.items_out;
    out.stages[s.name] = {
      rate: Math.max(din, dout, 0) / dt,  // accept only emits, send only takes in
      busy: Math.max(0, s.busy_seconds - p.busy_seconds) / dt,
      p99: quantile(histDelta(s.service, p.service), 0.99, bounds),
    };
  }
  for (const t of cur.threads) {
    const p = pThreads[t.name];
    const cpu = t.cpu_seconds >= 0 && p.cpu_seconds >= 0 ? Math.max(0, t.cpu_seconds - p.cpu_seconds) / dt : null;
    const deadline = t.policy_in_force === 'deadline' && t.bandwidth > 0;
    const budget = deadline ? t.bandwidth : 1;
    out.threads[t.name] = {
      util: cpu == null ? null : cpu / budget,
      overruns: Math.max(0, t.overruns - p.overruns) / dt,
      queueFull: Math.max(0, t.queue_full_total - p.queue_full_total) / dt,
    };
    // Stages sharing a thread split its use by their busy time.
    const busy = t.stages.map((n) => out.stages[n].busy);
    const total = busy.reduce((a, b) => a + b, 0);
    t.stages.forEach((n, k) => {
      const share = t.stages.length === 1 ? 1 : total > 0 ? busy[k] / total : 1 / t.stages.length;
      out.stages[n].util = out.threads[t.name].util == null ? null : out.threads[t.name].util * share;
    });
  }

  const sends = stagesOfType(cur, 'send');
  const pSends = sends.map((s) => pStages[s.name]);
  const rate = (key) => Math.max(0, sumExtra(sends, key) - sumExtra(pSends, key)) / dt;
  out.r2xx = rate('responses_2xx_total');
  out.r4xx = rate('responses_4xx_total');
  out.r5xx = rate('responses_5xx_total');
  out.responses = ['other', '1xx', '2xx', '3xx', '4xx', '5xx'].reduce((a, c) => a + rate(`responses_${c}_total`), 0);
  const lat = { counts: new Map(), total: 0 };
  sends.forEach((s, k) => {
    const d = histDelta(findHist(s, 'request_seconds'), findHist(pSends[k], 'request_seconds'));
    for (const [i, c] of d.counts) lat.counts.set(i, (lat.counts.get(i) || 0) + c);
    lat.total += d.total;
  });
  out.p50 = quantile(lat, 0.5, bounds);
  out.p99 = quantile(lat, 0.99, bounds);
  out.routes = deriveRoutes(cur, pStages, dt, bounds);
  return out;
}

// Per Python route: calls/s, errors/s, handler p99 over the interval, budget kills so far.
function deriveRoutes(cur, pStages, dt, bounds) {
  const routes = {};
  const get = (r) => (routes[r] = routes[r] || { route: r, calls: 0, rate: 0, errors: 0, kills: 0, p99: null });
  for (const s of stagesOfType(cur, 'python')) {
    const p = pStages[s.name];
    const before = {};
    for (const e of p.labeled || []) before[e.name + '\u0000' + e.value_label] = e.value;
    for (const e of s.labeled || []) {
      const r = get(e.value_label);
      const d = Math.max(0, e.value - (before[e.name + '\u0000' + e.value_label] || 0)) / dt;
      if (e.name === 'handler_calls_total') { r.calls += e.value; r.rate += d; }
      if (e.name === 'handler_errors_total') r.errors += d;
      if (e.name.startsWith('budget_') && e.name.endsWith('_kills_by_route_total')) r.kills += e.value;
    }
    const pHist = {};
    for (const x of p.histograms || []) if (x.name === 'handler_seconds') pHist[x.value_label] = x.histogram;
    for (const x of s.histograms || []) {
      if (x.name !== 'handler_seconds') continue;
      get(x.value_label).p99 = quantile(histDelta(x.histogram, pHist[x.value_label]), 0.99, bounds);
    }
  }
  return Object.values(routes);
}

// --- the pipeline diagram ------------------------------------------------------------------

function layoutKey(stats) {
  return (stats.threads || []).map((t) => t.name + ':' + t.stages.join(',')).join('|');
}

function arrow(kind) {
  const s = svg('svg', { viewBox: '0 0 24 12', class: 'arrow-svg', 'aria-hidden': 'true' });
  s.append(svg('path', { d: 'M0 6 H19', class: 'arrow-line' }), svg('path', { d: 'M17 1.5 L23 6 L17 10.5 Z', class: 'arrow-head' }));
  return h('div', { class: 'arrow ' + kind, title: kind === 'queue' ? 'queue to the next thread' : 'direct call, same thread' }, s);
}

function buildStage(stage) {
  const e = {};
  e.rate = h('span', { class: 'rate', text: '–' });
  e.spark = svg('polyline', { class: 'spark-line', points: '' });
  e.sparkArea = svg('polygon', { class: 'spark-area', points: '' });
  const spark = svg('svg', { class: 'spark', viewBox: `0 0 ${SPARK_N - 1} 20`, preserveAspectRatio: 'none' });
  spark.append(e.sparkArea, e.spark);
  e.fill = h('div', { class: 'util-fill' });
  e.utilText = h('span', { class: 'util-text', text: '–' });
  e.p99 = h('span', { class: 'p99', text: '–' });
  e.root = h('div', { class: 'stage', data: { stage: stage.name, type: stage.type } },
    h('div', { class: 'stage-head' },
      h('span', { class: 'stage-name', text: stage.name }),
      stage.type !== stage.name ? h('span', { class: 'stage-type', text: stage.type }) : null),
    h('div', { class: 'stage-rate' }, e.rate, h('span', { class: 'unit', text: ' /s', title: 'items per second' })),
    spark,
    h('div', { class: 'util', title: 'CPU use of the thread over the last second, against its budget' },
      h('div', { class: 'util-bar' }, e.fill), e.utilText),
    h('div', { class: 'stage-meta' }, h('span', { class: 'muted', text: 'p99 service ' }), e.p99));
  return e;
}

function buildThread(t, stagesByName) {
  const e = {};
  e.policy = h('span', { class: 'policy' });
  e.budget = h('span', { class: 'budget' });
  e.fallback = h('span', { class: 'badge fallback', text: 'FALLBACK', hidden: '' });
  e.queueFill = h('div', { class: 'queue-fill' });
  e.queueText = h('span', { class: 'queue-text' });
  e.overruns = h('span', { class: 'overruns' });
  e.cpu = h('span', { class: 'thread-cpu' });
  const inner = h('div', { class: 'thread-stages' });
  t.stages.forEach((name, k) => {
    if (k) inner.append(arrow('call'));
    state.stageEls[name] = buildStage(stagesByName[name]);
    inner.append(state.stageEls[name].root);
  });
  e.root = h('div', { class: 'thread', data: { thread: t.name } },
    h('div', { class: 'thread-head' },
      h('span', { class: 'thread-name', text: t.name, title: 'thread' + (t.main_thread ? ' (the process main thread)' : '') }),
      e.fallback),
    h('div', { class: 'thread-sched' }, e.policy, e.budget),
    inner,
    h('div', { class: 'thread-foot' },
      h('div', { class: 'queue', title: 'input queue: items waiting / capacity' },
        h('span', { class: 'muted', text: 'queue ' }), h('div', { class: 'queue-bar' }, e.queueFill), e.queueText),
      h('div', { class: 'foot-row' }, e.overruns, e.cpu)));
  e.root.style.flexGrow = String(t.stages.length);
  return e;
}

function buildPipeline(stats) {
  const flow = document.getElementById('flow');
  flow.textContent = '';
  state.stageEls = {};
  state.threadEls = {};
  state.sparks = {};
  const stagesByName = byName(stats.stages);
  stats.threads.forEach((t, k) => {
    if (k) flow.append(arrow('queue'));
    state.threadEls[t.name] = buildThread(t, stagesByName);
    flow.append(state.threadEls[t.name].root);
  });
  state.layoutKey = layoutKey(stats);
}

function renderPipeline(stats, d) {
  if (layoutKey(stats) !== state.layoutKey) buildPipeline(stats);
  for (const t of stats.threads) {
    const e = state.threadEls[t.name];
    const dt = d && d.threads[t.name];
    const deadline = t.policy_in_force === 'deadline';
    setText(e.policy, t.policy_in_force + (t.wait_in_force && t.wait_in_force !== 'block' ? ' · ' + t.wait_in_force : ''));
    e.policy.className = 'policy ' + (deadline ? 'deadline' : 'other');
    const asked = t.policy === 'deadline';
    setText(e.budget, asked ? `${fmtSpan(t.runtime_ns)}/${fmtSpan(t.period_ns)}` : t.nice ? `nice ${t.nice}` : '');
    e.budget.classList.toggle('refused', asked && !deadline);
    e.budget.title = deadline ? `SCHED_DEADLINE runtime / period: ${(t.bandwidth * 100).toFixed(0)} % of a CPU`
      : asked ? 'runtime / period asked for and refused: runs under SCHED_OTHER, measured against one CPU'
      : 'no reserved bandwidth: measured against one CPU';
    e.fallback.hidden = !t.fallback;
    e.fallback.title = t.fallback || '';
    e.root.classList.toggle('has-fallback', !!t.fallback);
    const fill = t.queue_capacity ? t.queue_depth / t.queue_capacity : 0;
    e.queueFill.style.width = (Math.min(1, fill) * 100).toFixed(1) + '%';
    e.queueFill.style.background = utilColor(fill * 1.2);
    const full = dt && dt.queueFull > 0 ? ` · full ${fmtRate(dt.queueFull)}/s` : '';
    setText(e.queueText, `${t.queue_depth} / ${t.queue_capacity}${full}`);
    e.queueText.classList.toggle('hot', !!full);
    const over = dt ? dt.overruns : null;
    setText(e.overruns, over == null ? 'overruns –' : `overruns ${fmtRate(over)}/s`);
    e.overruns.classList.toggle('hot', over > 0);
    e.overruns.title = `SIGXCPU: the thread ran past its runtime. ${t.overruns} since start; queue full ${t.queue_full_total} times`;
    const showCpu = t.stages.length > 1 && dt && dt.util != null;
    setText(e.cpu, showCpu ? `thread ${(dt.util * 100).toFixed(0)} % of budget` : '');
  }
  for (const s of stats.stages) {
    const e = state.stageEls[s.name];
    const ds = d && d.stages[s.name];
    setText(e.rate, ds ? fmtRate(ds.rate) : '–');
    const u = ds ? ds.util : null;
    e.fill.style.width = u == null ? '0%' : (Math.min(1, u) * 100).toFixed(1) + '%';
    e.fill.style.background = u == null ? 'transparent' : utilColor(u);
    setText(e.utilText, u == null ? '–' : `${(u * 100).toFixed(0)} %`);
    e.root.classList.toggle('over-budget', u != null && u >= 0.95);
    setText(e.p99, ds && ds.p99 != null ? fmtDur(ds.p99) : s.service.count ? 'idle' : '–');
    const sp = (state.sparks[s.name] = state.sparks[s.name] || []);
    if (ds) {
      sp.push(ds.rate);
      if (sp.length > SPARK_N) sp.shift();
    }
    drawSpark(e, sp);
  }
}

function drawSpark(e, values) {
  if (values.length < 2) return;
  const max = Math.max(...values, 1e-9);
  const x0 = SPARK_N - values.length;
  const pts = values.map((v, i) => `${x0 + i},${(19 - (v / max) * 17).toFixed(2)}`);
  e.spark.setAttribute('points', pts.join(' '));
  e.sparkArea.setAttribute('points', `${x0},20 ${pts.join(' ')} ${SPARK_N - 1},20`);
}

// --- charts --------------------------------------------------------------------------------

// A round step for about four grid lines up to v: 1, 2 or 5 times a power of ten.
function niceStep(v) {
  const raw = v / 4;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5]) if (m * p >= raw) return m * p;
  return 10 * p;
}

// A line chart of series [{key, color, fill?}] over state.history, x = last HISTORY_S seconds.
function drawChart(el, series, { log = false, fmt = fmtShort, floor = 1 } = {}) {
  const W = Math.max(200, el.clientWidth || 400), H = Math.max(120, el.clientHeight || 170);
  const L = 52, R = 8, T = 8, B = 20;
  el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  el.textContent = '';
  const hist = state.history;
  const now = hist.length ? hist[hist.length - 1].t : Date.now() / 1000;
  const x = (t) => L + ((t - (now - HISTORY_S)) / HISTORY_S) * (W - L - R);
  let lo, hi, step;
  const vals = [];
  for (const p of hist) for (const s of series) if (p.ok && p[s.key] != null) vals.push(p[s.key]);
  if (log) {
    const pos = vals.filter((v) => v > 0);
    lo = Math.pow(10, Math.floor(Math.log10(Math.min(...pos, floor * 10) || floor)));
    hi = Math.pow(10, Math.ceil(Math.log10(Math.max(...pos, lo * 10))));
    if (hi / lo < 100) lo = hi / 100;
  } else {
    lo = 0;
    step = niceStep(Math.max(...vals, floor));
    hi = Math.ceil(Math.max(...vals, floor) / step) * step;
  }
  const y = log
    ? (v) => T + (1 - (Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo))) * (H - T - B)
    : (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  // grid and axis labels
  const ticks = [];
  if (log) for (let v = lo; v <= hi * 1.001; v *= 10) ticks.push(v);
  else for (let k = 0; k * step <= hi + step / 2; k++) ticks.push(k * step);
  for (const v of ticks) {
    el.append(svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }));
    const label = svg('text', { x: L - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' });
    label.textContent = fmt(v);
    el.append(label);
  }
  for (let m = 0; m <= 5; m++) {
    const t = now - m * 60, X = x(t);
    el.append(svg('line', { x1: X, x2: X, y1: T, y2: H - B, class: 'grid vgrid' }));
    const label = svg('text', { x: X, y: H - 5, class: 'axis', 'text-anchor': m === 0 ? 'end' : 'middle' });
    label.textContent = m === 0 ? 'now' : `−${m}m`;
    el.append(label);
  }
  // lines, broken where a poll failed
  for (const s of series) {
    let d = '', pen = false;
    for (const p of hist) {
      if (!p.ok || p[s.key] == null) { pen = false; continue; }
      d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)} ${y(p[s.key]).toFixed(1)}`;
      pen = true;
    }
    if (!d) continue;
    if (s.fill) {
      // area under the line, segment by segment
      for (const seg of d.split('M').filter(Boolean)) {
        const pts = seg.split('L');
        const first = pts[0].split(' ')[0], last = pts[pts.length - 1].split(' ')[0];
        el.append(svg('path', { d: `M${first} ${H - B}L${seg}L${last} ${H - B}Z`, fill: s.color, class: 'area' }));
      }
    }
    el.append(svg('path', { d, stroke: s.color, class: 'line' }));
  }
}

function legend(id, items) {
  const box = document.getElementById(id);
  box.textContent = '';
  for (const [label, color, value] of items) {
    box.append(h('span', { class: 'legend-item' },
      h('span', { class: 'dot', style: `background:${color}` }), h('span', { class: 'muted', text: label + ' ' }),
      h('b', { text: value })));
  }
}

const COLORS = { r2xx: '#3fb950', r4xx: '#d29922', r5xx: '#f85149', p50: '#58a6ff', p99: '#bc8cff' };

function renderCharts(d) {
  const last = d || {};
  legend('rate-legend', [
    ['2xx', COLORS.r2xx, fmtShort(last.r2xx) + '/s'],
    ['4xx', COLORS.r4xx, fmtShort(last.r4xx) + '/s'],
    ['5xx', COLORS.r5xx, fmtShort(last.r5xx) + '/s'],
  ]);
  legend('latency-legend', [
    ['p50', COLORS.p50, fmtDur(last.p50)],
    ['p99', COLORS.p99, fmtDur(last.p99)],
  ]);
  drawChart(document.getElementById('rate-chart'), [
    { key: 'r2xx', color: COLORS.r2xx, fill: true }, { key: 'r4xx', color: COLORS.r4xx }, { key: 'r5xx', color: COLORS.r5xx },
  ], { fmt: fmtShort });
  drawChart(document.getElementById('latency-chart'), [
    { key: 'p50', color: COLORS.p50 }, { key: 'p99', color: COLORS.p99 },
  ], { log: true, fmt: (v) => fmtDur(v).replace(' ', ''), floor: 1000 });
}

function renderRoutes(d) {
  const body = document.getElementById('routes-body');
  if (!d || !d.routes) return;
  const rows = d.routes.filter((r) => r.calls > 0).sort((a, b) => b.rate - a.rate || b.calls - a.calls).slice(0, 8);
  body.textContent = '';
  if (!rows.length) {
    body.append(h('tr', {}, h('td', { colspan: '5', class: 'muted', text: 'no Python handler called yet' })));
    return;
  }
  const max = Math.max(...rows.map((r) => r.rate), 1e-9);
  for (const r of rows) {
    const bar = h('div', { class: 'route-bar' });
    bar.style.width = ((r.rate / max) * 100).toFixed(1) + '%';
    body.append(h('tr', {},
      h('td', { class: 'route-name', title: r.route }, h('span', { text: r.route }), bar),
      h('td', { class: 'num', text: fmtShort(r.rate) }),
      h('td', { class: 'num', text: r.p99 != null ? fmtDur(r.p99) : '–' }),
      h('td', { class: 'num' + (r.errors > 0 ? ' hot' : ''), text: fmtShort(r.errors) }),
      h('td', { class: 'num' + (r.kills > 0 ? ' hot' : ''), text: String(r.kills) })));
  }
}

// --- header --------------------------------------------------------------------------------

function renderHeader(stats, d) {
  setText(document.getElementById('version'), 'v' + stats.version);
  setText(document.getElementById('uptime'), fmtUptime(stats.uptime_seconds));
  const a = stats.admission || {};
  const asked = a.deadline_bandwidth || 0, admitted = a.admitted_cpus || 0;
  setText(document.getElementById('bandwidth'), `${asked.toFixed(2)} / ${admitted.toFixed(2)}`);
  const bw = document.getElementById('bandwidth-fill');
  const f = admitted > 0 ? asked / admitted : asked > 0 ? 1 : 0;
  bw.style.width = (Math.min(1, f) * 100).toFixed(1) + '%';
  bw.style.background = utilColor(f);
  document.getElementById('bandwidth-kpi').title = `deadline bandwidth asked / admitted by the kernel (CPUs)\n${a.explanation || ''}`;
  setText(document.getElementById('connections'), fmtShort(sumExtra(stagesOfType(stats, 'accept'), 'connections_open')));
  const py = stagesOfType(stats, 'python');
  const cpuKills = sumExtra(py, 'budget_cpu_kills_total'), memKills = sumExtra(py, 'budget_memory_kills_total');
  setText(document.getElementById('kills'), `${cpuKills} cpu · ${memKills} mem`);
  document.getElementById('kills-kpi').classList.toggle('hot', cpuKills + memKills > 0);
  const total = d ? d.responses : null;
  setText(document.getElementById('reqs'), total == null ? '–' : fmtShort(total));
  document.title = total == null ? 'metronome' : `metronome · ${fmtShort(total)} req/s`;
  const fallbacks = stats.threads.filter((t) => t.fallback);
  const warn = document.getElementById('warnings');
  warn.hidden = !fallbacks.length;
  const why = {};
  for (const t of fallbacks) (why[t.fallback] = why[t.fallback] || []).push(t.name);
  setText(warn, Object.entries(why).map(([msg, names]) => `FALLBACK (${names.join(', ')}): ${msg}`).join('\n'));
}

// --- polling -------------------------------------------------------------------------------

function setStatus(error) {
  const st = document.getElementById('status');
  const banner = document.getElementById('offline');
  document.body.classList.toggle('offline', !!error);
  banner.hidden = !error;
  if (!error) {
    setText(st, 'live');
    st.className = 'status live';
    return;
  }
  const msg = error.message || String(error);
  setText(st, `offline: ${msg}`);
  st.className = 'status down';
  const since = state.lastOk ? `; the figures below are from ${new Date(state.lastOk).toLocaleTimeString()}` : '';
  setText(banner, `No answer from the server (${msg})${since}. Retrying every second…`);
}

function update(stats) {
  const prev = state.prev;
  if (prev && stats.uptime_seconds < prev.uptime_seconds) state.sparks = {};  // a restarted server
  const d = derive(stats, prev);
  state.prev = stats;
  const t = stats.time;
  if (d) state.history.push({ t, ok: true, r2xx: d.r2xx, r4xx: d.r4xx, r5xx: d.r5xx, p50: d.p50, p99: d.p99 });
  else state.history.push({ t, ok: false });
  while (state.history.length && state.history[0].t < t - HISTORY_S - 2) state.history.shift();
  renderHeader(stats, d);
  renderPipeline(stats, d);
  state.lastDerived = d;
  renderCharts(d);
  renderRoutes(d);
}

async function poll() {
  const started = performance.now();
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch('/stats', { cache: 'no-store', signal: ctrl.signal });
    if (!resp.ok) throw new Error(`/stats answered ${resp.status} ${(await resp.text()).trim()}`);
    const stats = await resp.json();
    update(stats);
    state.updates += 1;
    state.lastOk = Date.now();
    document.body.dataset.updates = String(state.updates);
    setStatus(null);
  } catch (err) {
    // a gap in the charts; the next good sample starts a new baseline
    if (state.prev) state.history.push({ t: state.prev.time + (Date.now() - state.lastOk) / 1000, ok: false });
    state.prev = null;
    setStatus(err.name === 'AbortError' ? new Error('no answer in 3 s') : err.name === 'TypeError' ? new Error('server unreachable') : err);
  } finally {
    clearTimeout(timer);
  }
  setTimeout(poll, Math.max(50, POLL_MS - (performance.now() - started)));
}

window.addEventListener('resize', () => renderCharts(state.lastDerived));
document.body.dataset.updates = '0';
poll();
