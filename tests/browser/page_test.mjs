// Real-browser test of the admin page: starts metronome on a copy of configs/default.yaml (HTTP
// and admin on free ports), loads it from node with keep-alive clients, opens the page in
// Debian's headless chromium and checks that it draws every stage, that rates go non-zero and
// change between refreshes, and that it says when the server goes away. Saves page.png.
//
//   METRONOME_BINARY  the server (default ../../build/metronome, from this directory)
//   TEST_OUTPUT_DIR   where page.png goes (default tests/browser/output/)
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const BINARY = path.resolve(HERE, process.env.METRONOME_BINARY || '../../build/metronome');
const OUT_DIR = path.resolve(process.env.TEST_OUTPUT_DIR || path.join(HERE, 'output'));
const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic'];
const LOAD_CLIENTS = { '/json': 4, '/plaintext': 2 };
const TEST_DEADLINE_MS = 150_000;  // everything, start to finish; meson's timeout is 300 s

const results = [];
let server = null, serverLog = '', browser = null, tmpDir = null, stopLoad = null;

class Failure extends Error {}

function log(msg) {
  process.stdout.write(`${msg}\n`);
}

function pass(name) {
  results.push({ name, ok: true });
  log(`ok - ${name}`);
}

function fail(name, why) {
  results.push({ name, ok: false });
  throw new Failure(`${name}: ${why}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn until it returns a truthy value or timeoutMs passes; returns the value or null.
async function waitFor(fn, timeoutMs, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) return null;
    await sleep(everyMs);
  }
}

// configs/default.yaml without its admin section, plus an admin listener on a free port.
function writeConfig(dir) {
  const src = fs.readFileSync(path.join(REPO, 'configs', 'default.yaml'), 'utf8').split('\n');
  const out = [];
  let skipping = false;
  for (const line of src) {
    if (/^admin\s*:/.test(line)) { skipping = true; continue; }
    if (skipping && /^[^\s#]/.test(line)) skipping = false;
    if (!skipping) out.push(line);
  }
  out.push('', 'admin: {listen: "127.0.0.1:0"}', '');
  const file = path.join(dir, 'page-test.yaml');
  fs.writeFileSync(file, out.join('\n'));
  return file;
}

// Stage names in pipeline order, as `metronome check` prints them.
function stagesFromCheck(config) {
  const text = execFileSync(BINARY, ['check', '-c', config], { cwd: REPO, encoding: 'utf8' });
  const names = [];
  let inTable = false;
  for (const line of text.split('\n')) {
    if (/^\s*#\s+stage\s+type\s+thread/.test(line)) { inTable = true; continue; }
    if (!inTable) continue;
    const m = /^\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)/.exec(line);
    if (!m) break;
    names.push({ index: +m[1], name: m[2], type: m[3] });
  }
  if (!names.length) throw new Failure(`could not read the pipeline from \`metronome check\`:\n${text}`);
  return names;
}

function startServer(config) {
  return new Promise((resolve, reject) => {
    server = spawn(BINARY, ['serve', '-c', config, '--listen', '127.0.0.1:0'], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let admin = null, httpPort = null, done = false;
    const timer = setTimeout(() => finish(new Failure(`the server did not report both ports in 30 s; its log:\n${serverLog}`)), 30_000);
    function finish(err) {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err) reject(err); else resolve({ admin, http: httpPort });
    }
    const onData = (chunk) => {
      serverLog += chunk;
      const a = /admin listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(serverLog);
      const h = /(?<!admin )listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(serverLog);
      if (a) admin = +a[1];
      if (h) httpPort = +h[1];
      if (admin && httpPort) finish();
    };
    server.stdout.setEncoding('utf8').on('data', onData);
    server.stderr.setEncoding('utf8').on('data', onData);
    server.on('error', (e) => finish(new Failure(`cannot start ${BINARY}: ${e.message}`)));
    server.on('exit', (code, sig) => finish(new Failure(`the server exited (${sig || code}) before it was ready; its log:\n${serverLog}`)));
  });
}

async function stopServer() {
  if (!server || server.exitCode !== null || server.signalCode !== null) return;
  const exited = new Promise((r) => server.once('exit', r));
  server.kill('SIGTERM');
  if (!(await Promise.race([exited.then(() => true), sleep(8000).then(() => false)]))) {
    server.kill('SIGKILL');
    await exited;
  }
}

// Keep-alive clients, each sending one request after the other until stopped.
function startLoad(port) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
  let running = true;
  const counts = { ok: 0, failed: 0, lastError: '' };
  const one = (p) => new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, agent }, (res) => {
      res.resume();
      res.on('end', () => { res.statusCode === 200 ? counts.ok++ : counts.failed++; resolve(); });
    });
    req.setTimeout(5000, () => req.destroy(new Error('timeout')));
    req.on('error', (e) => { counts.failed++; counts.lastError = e.message; setTimeout(resolve, 50); });
  });
  const loops = [];
  for (const [p, n] of Object.entries(LOAD_CLIENTS)) {
    for (let i = 0; i < n; i++) loops.push((async () => { while (running) await one(p); })());
  }
  stopLoad = async () => {
    running = false;
    await Promise.race([Promise.all(loops), sleep(6000)]);
    agent.destroy();
    stopLoad = null;
  };
  return counts;
}

async function getJson(port, p) {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: p }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c) => (body += c)).on('end', () => {
        try { resolve(JSON.parse(body)); } catch (e) { reject(new Error(`${p}: ${e.message}: ${body.slice(0, 200)}`)); }
      });
    }).on('error', reject);
  });
}

// Every stage box's rate text, by stage name.
function readRates(page) {
  return page.evaluate(() => Object.fromEntries([...document.querySelectorAll('[data-stage]')].map((e) => {
    const r = e.querySelector('.rate');
    return [e.dataset.stage, r ? r.textContent.trim() : null];
  })));
}

const updates = (page) => page.evaluate(() => +(document.body.dataset.updates || 0));
const statusText = (page) => page.evaluate(() => (document.getElementById('status') || {}).textContent || '');

async function main() {
  if (!fs.existsSync(BINARY)) throw new Failure(`no server binary at ${BINARY} (build it, or set METRONOME_BINARY)`);
  fs.mkdirSync(OUT_DIR, { recursive: true });
  tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'metronome-page-'));
  const config = writeConfig(tmpDir);
  const stages = stagesFromCheck(config);
  const ports = await startServer(config);
  log(`# server: http on ${ports.http}, admin on ${ports.admin}; stages: ${stages.map((s) => s.name).join(', ')}`);

  // The stages /json and /plaintext go through: all but python lanes kept for heavy routes.
  let lastErr = null;
  const stats = await waitFor(() => getJson(ports.admin, '/stats').catch((e) => { lastErr = e; return null; }), 20_000, 200);
  if (!stats) throw new Failure(`/stats did not answer with JSON in 20 s: ${lastErr && lastErr.message}`);
  const pipelineCfg = (stats.config && stats.config.pipeline) || [];
  const busyStages = stages.filter((s) => !(pipelineCfg[s.index] && pipelineCfg[s.index].serves === 'heavy')).map((s) => s.name);

  const load = startLoad(ports.http);
  const userData = path.join(tmpDir, 'chromium-profile');
  browser = await chromium.launchPersistentContext(userData, {
    executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport: { width: 1200, height: 800 }, timeout: 60_000,
  });
  const page = browser.pages()[0] || (await browser.newPage());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`console error: ${m.text()}`); });
  page.on('requestfailed', (r) => { if (!r.url().endsWith('/stats')) pageErrors.push(`request failed: ${r.url()}`); });
  await page.goto(`http://127.0.0.1:${ports.admin}/`, { waitUntil: 'load', timeout: 30_000 });

  // 1. a box for every stage, with a rate element
  const boxes = await waitFor(async () => {
    const r = await readRates(page);
    return stages.every((s) => s.name in r) ? r : null;
  }, 15_000);
  if (!boxes) {
    const r = await readRates(page);
    fail('a box per stage', `missing data-stage boxes for ${stages.filter((s) => !(s.name in r)).map((s) => s.name).join(', ')} (found: ${Object.keys(r).join(', ') || 'none'}; #status: ${await statusText(page)})`);
  }
  const noRate = stages.filter((s) => boxes[s.name] === null).map((s) => s.name);
  if (noRate.length) fail('a box per stage', `no .rate element in the boxes of ${noRate.join(', ')}`);
  pass(`a box per stage (${stages.length}: ${stages.map((s) => s.name).join(', ')})`);

  // 2. rates go non-zero for every stage the load passes through
  const seen = new Set();
  const allBusy = await waitFor(async () => {
    const r = await readRates(page);
    for (const n of busyStages) if (parseFloat(r[n]) > 0) seen.add(n);
    return busyStages.every((n) => seen.has(n));
  }, 20_000, 250);
  if (!allBusy) {
    fail('rates go non-zero under load', `still zero after 20 s: ${busyStages.filter((n) => !seen.has(n)).join(', ')} ` +
      `(rates now: ${JSON.stringify(await readRates(page))}; load: ${load.ok} ok, ${load.failed} failed ${load.lastError})`);
  }
  pass(`rates go non-zero under load (${busyStages.join(', ')})`);

  // 3. refreshes advance body.dataset.updates and change at least one rate
  let changed = null;
  for (let attempt = 0; attempt < 5 && !changed; attempt++) {
    const u0 = await updates(page), r0 = await readRates(page);
    const u1 = await waitFor(async () => { const u = await updates(page); return u > u0 ? u : null; }, 5000, 50);
    if (!u1) fail('refreshes change the numbers', `body.dataset.updates stayed at ${u0} for 5 s (#status: ${await statusText(page)})`);
    const r1 = await readRates(page);
    const diff = Object.keys(r1).filter((n) => r1[n] !== r0[n]);
    if (diff.length) changed = `updates ${u0} -> ${u1}; ${diff[0]}: ${r0[diff[0]]} -> ${r1[diff[0]]}`;
  }
  if (!changed) fail('refreshes change the numbers', 'no rate text changed over five refreshes under load');
  pass(`refreshes change the numbers (${changed})`);

  // 4. the status says live
  const st = await statusText(page);
  if (st.trim() !== 'live') fail('#status says live', `#status is "${st}"`);
  pass('#status says live');

  // 5. a screenshot with a few seconds of chart history
  await sleep(6000);
  const shot = path.join(OUT_DIR, 'page.png');
  await page.screenshot({ path: shot });
  pass(`screenshot saved to ${shot}`);

  // 6. no script errors, no failed loads of the page's own files
  if (pageErrors.length) fail('no errors in the page', pageErrors.join('\n'));
  pass('no errors in the page');

  // 7. the server going away shows, and the page keeps trying
  await stopLoad();
  const before = await page.evaluate(() => performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/stats')).length);
  await stopServer();
  const down = await waitFor(async () => { const t = await statusText(page); return t.trim() !== 'live' ? t : null; }, 8000);
  if (!down) fail('shows the server going away', '#status still says live 8 s after the server stopped');
  await sleep(2500);
  const after = await page.evaluate(() => performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/stats')).length);
  if (after < before + 2) fail('shows the server going away', `the page stopped polling (${before} -> ${after} /stats requests)`);
  await page.screenshot({ path: path.join(OUT_DIR, 'page-offline.png') });
  pass(`shows the server going away (#status: "${down.trim()}") and keeps retrying`);
}

async function cleanup() {
  if (stopLoad) await stopLoad().catch(() => {});
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(10_000)]);
  browser = null;
  await stopServer().catch(() => {});
  if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
  tmpDir = null;
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, async () => {
    log(`# ${sig}: stopping`);
    await cleanup();
    process.exit(1);
  });
}
process.on('exit', () => { if (server && server.exitCode === null && server.signalCode === null) server.kill('SIGKILL'); });

const deadline = setTimeout(() => {
  log(`not ok - the test did not finish in ${TEST_DEADLINE_MS / 1000} s`);
  cleanup().finally(() => process.exit(1));
}, TEST_DEADLINE_MS);

let code = 0;
try {
  await main();
} catch (e) {
  code = 1;
  log(`not ok - ${e instanceof Failure ? e.message : e.stack || e}`);
  if (!(e instanceof Failure) && serverLog) log(`# server log:\n${serverLog.replace(/^/gm, '#   ')}`);
} finally {
  await cleanup();
  clearTimeout(deadline);
}
const passed = results.filter((r) => r.ok).length;
log(`${passed} passed, ${code ? 1 : 0} failed`);
process.exit(code);
