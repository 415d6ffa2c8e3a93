// Drives the demo page served by `sdlite serve` in Debian's headless Chromium (WebGPU on
// SwiftShader): generate, generate on a worker over WebTransport (and survive its death
// mid-job), screenshot, cancel, reload from Cache Storage, and the message without WebGPU. Prints one JSON object on stdout; cli/tests/web.rs checks it.
//
// usage: node page.mjs URL OUT_DIR REQUEST_JSON
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const [url, outDir, requestJson] = process.argv.slice(2);
const request = JSON.parse(requestJson);
const FLAGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];
const report = { log: [] };
const TIMEOUT = Number(process.env.PAGE_TIMEOUT_MS || 300_000);

async function launch(webgpu) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: webgpu ? [...FLAGS, '--enable-unsafe-webgpu'] : [...FLAGS, '--disable-features=WebGPU'],
  });
}

// The page loads the first served model by itself; load the requested one once that is done.
async function load(page, name = request.model) {
  await page.waitForFunction(() => window.sdlite.loadAttempts || !window.sdlite.models.length, null, { timeout: TIMEOUT });
  if (await page.evaluate((n) => window.sdlite.model?.name === n, name)) return;
  await page.selectOption('#model', name);
  await page.click('#load');
  await page.waitForFunction((n) => window.sdlite.model?.name === n, name, { timeout: TIMEOUT });
}

// Fills the form, generates, and returns the frames' pixels (base64 RGBA) or the error.
async function generate(page, form, sampler) {
  await page.evaluate(() => { window.sdlite.result = undefined; window.sdlite.lastError = undefined; });
  await fill(page, form);
  await page.selectOption('#sampler', sampler);
  await page.click('#generate');
  await page.waitForFunction(() => window.sdlite.result || window.sdlite.lastError, null, { timeout: TIMEOUT });
  return page.evaluate(() => {
    const r = window.sdlite.result;
    const b64 = (a) => btoa(Array.from(a, (c) => String.fromCharCode(c)).join(''));
    return r
      ? { width: r.width, height: r.height, frames: r.frames.map(b64), remoteSteps: r.remoteSteps, localSteps: r.localSteps, workerFailure: r.workerFailure }
      : { error: window.sdlite.lastError };
  });
}

async function fill(page, req) {
  for (const [id, value] of Object.entries(req)) await page.fill(`#${id}`, String(value));
}

const browser = await launch(true);
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('console', (m) => report.log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => report.log.push(`pageerror: ${e.message}`));
  const loadStart = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.sdlite?.ready, null, { timeout: TIMEOUT });
  report.ready = await page.evaluate(() => window.sdlite.ready);
  report.adapter = await page.textContent('#adapter');
  if (report.ready !== 'ok') throw new Error(`page not ready: ${report.ready}: ${await page.textContent('#fatal')}`);
  await load(page);
  report.firstLoad = await page.evaluate(() => window.sdlite.loadStats);

  // Generate a picture and read the pixels back.
  report.result = await generate(page, request.form, request.sampler);
  report.msToFirstStep = await page.evaluate(() => window.sdlite.firstStepMs);
  report.msLoadToResult = Date.now() - loadStart;
  report.progressText = await page.textContent('#progress');
  report.downloadVisible = await page.isVisible('#download');
  report.screenshot = join(outDir, 'page.png');
  await page.screenshot({ path: report.screenshot, fullPage: true });

  // The same request with the denoiser on a loopback worker over WebTransport: first whole,
  // then with the worker killed as the page opens its stream for step 3 (the stream count is
  // Hello, OpenJob, step 1, step 2, step 3), so the rest must run here.
  if (request.worker) {
    await fill(page, { 'worker-url': request.worker.url, 'worker-hash': request.worker.sha256, 'worker-token': request.worker.token });
    report.remote = await generate(page, request.form, request.sampler);
    await page.exposeFunction('sdliteTestKillWorker', () => process.kill(request.worker.pid, 'SIGKILL'));
    await page.evaluate(() => {
      const open = WebTransport.prototype.createBidirectionalStream;
      let streams = 0;
      WebTransport.prototype.createBidirectionalStream = async function (...args) {
        streams += 1;
        if (streams === 5) await window.sdliteTestKillWorker();
        return open.apply(this, args);
      };
    });
    report.fallback = await generate(page, request.form, request.sampler);
    report.workerLog = await page.evaluate(() => window.sdlite.workerLog);
    report.workerStatus = await page.textContent('#worker-status');
    await page.screenshot({ path: join(outDir, 'worker.png'), fullPage: true });
    await fill(page, { 'worker-url': '' });
  }

  // Cancel a longer run after its first step.
  await page.evaluate(() => { window.sdlite.result = undefined; window.sdlite.lastError = undefined; });
  await page.fill('#steps', String(request.cancelSteps));
  await page.click('#generate');
  await page.waitForFunction(() => /step [1-9]/.test(document.getElementById('progress').textContent), null, { timeout: TIMEOUT });
  await page.click('#cancel');
  await page.waitForFunction(() => window.sdlite.result || window.sdlite.lastError, null, { timeout: TIMEOUT });
  report.cancel = await page.evaluate(() => ({ error: window.sdlite.lastError ?? null, finished: !!window.sdlite.result, text: document.getElementById('progress').textContent }));

  // A second visit loads the model from Cache Storage.
  await page.reload();
  await page.waitForFunction(() => window.sdlite?.ready, null, { timeout: TIMEOUT });
  await load(page);
  report.secondLoad = await page.evaluate(() => window.sdlite.loadStats);

  // A video with the Wan model.
  await load(page, request.wan.model);
  report.video = await generate(page, request.wan.form, request.wan.sampler);
  // The <img> has no size until the browser has decoded the animated PNG from its blob URL,
  // which on a busy machine comes after the result: wait for it rather than sample once.
  report.videoVisible = await page.waitForSelector('#video', { state: 'visible', timeout: 20000 }).then(() => true, () => false);
  await page.screenshot({ path: join(outDir, 'video.png'), fullPage: true });

  // A damaged checkpoint gets a message naming the problem.
  await page.selectOption('#model', request.broken);
  await page.click('#load');
  await page.waitForSelector('#error:not([hidden])', { timeout: TIMEOUT });
  report.broken = await page.textContent('#error');
} finally {
  await browser.close();
}

// Without WebGPU the page says so instead of failing silently.
const plain = await launch(false);
try {
  const page = await plain.newPage();
  await page.goto(url);
  await page.waitForFunction(() => window.sdlite?.ready, null, { timeout: TIMEOUT });
  report.withoutWebgpu = {
    ready: await page.evaluate(() => window.sdlite.ready),
    message: (await page.isVisible('#fatal')) ? await page.textContent('#fatal') : null,
  };
  await page.screenshot({ path: join(outDir, 'no-webgpu.png') });
} finally {
  await plain.close();
}

writeFileSync(join(outDir, 'report.json'), JSON.stringify(report, null, 1));
console.log(JSON.stringify(report));
