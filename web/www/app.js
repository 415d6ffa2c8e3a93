// The demo page: loads a model (from this server, kept in Cache Storage, or from a folder the
// user picks), generates through sdlite's wasm module on WebGPU and shows progress, latent
// previews and the result, optionally with the denoiser on a worker reached over WebTransport.
// Everything that computes, and the wire format, lives in the wasm module (web/src/lib.rs);
// WorkerTransport below only moves bytes.
import init, { Studio, Request } from './pkg/sdlite_web.js';

const $ = (id) => document.getElementById(id);
const CACHE = 'sdlite-models-v1';
let studio = null;
let running = false;
let loading = false;

function fatal(message) {
  $('fatal').textContent = message;
  $('fatal').hidden = false;
  $('app').hidden = true;
  $('adapter').textContent = '';
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function draw(picture, canvas) {
  canvas.width = picture.width;
  canvas.height = picture.height;
  const rgba = picture.rgba;
  canvas.getContext('2d').putImageData(new ImageData(new Uint8ClampedArray(rgba.buffer, rgba.byteOffset, rgba.length), picture.width, picture.height), 0, 0);
  return rgba;
}

// A served model file's bytes, from Cache Storage when this version was fetched before.
async function cachedBytes(url, stats) {
  const cache = 'caches' in self ? await caches.open(CACHE) : null;
  let response = cache ? await cache.match(url) : undefined;
  if (response) {
    stats.cached += 1;
  } else {
    response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    if (cache) await cache.put(url, response.clone());
    stats.fetched += 1;
  }
  return new Uint8Array(await response.arrayBuffer());
}

const SAMPLER_NAMES = { dpmpp_2m: 'DPM++ 2M', euler_a: 'Euler a', euler: 'Euler', ddim: 'DDIM', unipc: 'UniPC', flow_euler: 'Flow Euler' };

function loaded(name, info, detail) {
  const video = info.kind === 'wan';
  const size = `${info.width}×${info.height}${video ? `, ${info.frames} frames` : ''}`;
  $('model-status').textContent = `${name} loaded (${video ? 'Wan2.1 video' : 'Stable Diffusion'}, default ${size}; ${detail})`;
  $('sampler').replaceChildren(...info.samplers.map((s) => new Option(SAMPLER_NAMES[s] ?? s, s)));
  $('guidance').value = info.guidance;
  $('frames-label').hidden = !video;
  $('generate').disabled = false;
  window.sdlite.model = { name, kind: info.kind, detail };
}

async function loadServed() {
  const name = $('model').value;
  const entry = window.sdlite.models.find((m) => m.name === name);
  if (!entry || loading || running) return;
  loading = true;
  $('load').disabled = true;
  showError('');
  $('model-status').textContent = `loading ${name}…`;
  const stats = { cached: 0, fetched: 0 };
  try {
    const paths = [];
    const contents = [];
    for (const f of entry.files) {
      paths.push(f.path);
      contents.push(await cachedBytes(`models/${name}/${f.path}?v=${encodeURIComponent(f.version)}`, stats));
    }
    const info = studio.load(name, paths, contents);
    loaded(name, info, `${stats.fetched} files downloaded, ${stats.cached} from the browser cache`);
    window.sdlite.loadStats = stats;
  } catch (e) {
    $('model-status').textContent = 'no model loaded';
    showError(`Could not load ${name}: ${e.message ?? e}`);
  } finally {
    loading = false;
    $('load').disabled = false;
    window.sdlite.loadAttempts = (window.sdlite.loadAttempts ?? 0) + 1;
  }
}

async function loadPicked(files) {
  showError('');
  $('model-status').textContent = 'reading the folder…';
  try {
    const list = [...files];
    const contents = await Promise.all(list.map(async (f) => new Uint8Array(await f.arrayBuffer())));
    const name = list[0]?.webkitRelativePath.split('/')[0] || 'picked folder';
    const info = studio.load(name, list.map((f) => f.webkitRelativePath || f.name), contents);
    loaded(name, info, `${list.length} files from disk`);
  } catch (e) {
    $('model-status').textContent = 'no model loaded';
    showError(`Could not load that folder: ${e.message ?? e}`);
  }
}

// The link to `sdlite worker --webtransport`: one session, one bidirectional stream per request
// (a request frame out, the answer frame back), the certificate pinned by its SHA-256 when given.
class WorkerTransport {
  constructor(url, hash, token) {
    this.url = url;
    this.hash = hash;
    this.token = token;
    this.session = null;
    this.closed = false;
  }

  async open() {
    if (!('WebTransport' in window)) throw new Error('this browser does not offer WebTransport');
    const options = {};
    if (this.hash) {
      const hex = this.hash.replace(/^sha256=/i, '').replace(/[^0-9a-f]/gi, '');
      if (hex.length !== 64) throw new Error('the certificate sha256 must be 64 hex digits');
      const value = new Uint8Array(hex.match(/../g).map((b) => parseInt(b, 16)));
      options.serverCertificateHashes = [{ algorithm: 'sha-256', value }];
    }
    this.session = new WebTransport(this.url, options);
    this.session.closed.then(() => { this.closed = true; }, () => { this.closed = true; });
    await this.session.ready;
  }

  async exchange(frame) {
    const stream = await this.session.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    // The worker answers once it has read the frame and may stop the stream before our FIN
    // is acknowledged: a late write error is no failure, a dead session fails the read.
    writer.write(frame).then(() => writer.close()).catch(() => {});
    const reader = stream.readable.getReader();
    const chunks = [];
    let length = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value);
      length += value.length;
    }
    const answer = new Uint8Array(length);
    let at = 0;
    for (const c of chunks) {
      answer.set(c, at);
      at += c.length;
    }
    return answer;
  }
}

let worker = null;

// The worker the form names, connected (kept between generations while its session lives), or
// null for none; a worker that cannot be reached is reported and the run stays here.
async function connectWorker() {
  const [url, hash, token] = ['worker-url', 'worker-hash', 'worker-token'].map((id) => $(id).value.trim());
  if (!url) return null;
  if (worker && !worker.closed && worker.url === url && worker.hash === hash && worker.token === token) return worker;
  const candidate = new WorkerTransport(url, hash, token);
  $('worker-status').textContent = `connecting to ${url}…`;
  try {
    await candidate.open();
    worker = candidate;
    return worker;
  } catch (e) {
    workerLine(`cannot reach the worker (${e.message ?? e}); generating here`);
    return null;
  }
}

function workerLine(line) {
  $('worker-status').textContent = line;
  window.sdlite.workerLog.push(line);
}

async function generate() {
  if (running) return;
  running = true;
  showError('');
  $('generate').disabled = true;
  $('cancel').disabled = false;
  $('download').hidden = true;
  const req = new Request($('prompt').value);
  req.negative_prompt = $('negative').value;
  req.steps = Number($('steps').value);
  req.guidance = Number($('guidance').value);
  req.seed = Number($('seed').value);
  req.width = Number($('width').value);
  req.height = Number($('height').value);
  req.frames = window.sdlite.model?.kind === 'wan' ? Number($('frames').value) : 0;
  req.sampler = $('sampler').value;
  req.preview_every = Math.max(1, Math.round(req.steps / 5));
  const started = performance.now();
  let denoiseStart = null;
  const progress = (phase, done, total, preview) => {
    const now = performance.now();
    if (phase === 'worker') return workerLine(preview);
    if (phase === 'denoise' && done === 0) denoiseStart = now;
    if (phase === 'denoise' && done > 0 && window.sdlite.firstStepMs === undefined) window.sdlite.firstStepMs = now - window.sdlite.pageStart;
    if (preview) draw(preview, $('preview'));
    if (phase === 'denoise' && denoiseStart !== null && done > 0) {
      const rate = done / ((now - denoiseStart) / 1000);
      const eta = (total - done) / rate;
      $('progress').textContent = `step ${done}/${total} · ${rate.toFixed(2)} it/s · ETA ${eta.toFixed(1)} s`;
      $('bar').value = done / total;
    } else if (phase === 'encode') {
      $('progress').textContent = 'encoding the prompt…';
    } else if (phase === 'decode') {
      $('progress').textContent = total > 1 ? `decoding frame ${done}/${total}…` : 'decoding the image…';
    }
  };
  try {
    const output = await studio.generate(req, progress, await connectWorker());
    const frames = [];
    for (let i = 0; i < output.frames; i++) frames.push(output.frame(i).rgba);
    draw(output.frame(0), $('result'));
    window.sdlite.result = { width: output.width, height: output.height, frames, remoteSteps: output.remoteSteps, localSteps: output.localSteps, workerFailure: output.workerFailure ?? null };
    const png = new Blob([output.png()], { type: 'image/png' });
    const url = URL.createObjectURL(png);
    const video = output.frames > 1;
    $('video').hidden = !video;
    $('result').hidden = video;
    if (video) $('video').src = url;
    $('download').href = url;
    $('download').download = video ? 'sdlite-video.png' : 'sdlite.png';
    $('download-note').textContent = video ? '(an animated PNG: browsers play it)' : '';
    $('download').hidden = false;
    const secs = (performance.now() - started) / 1000;
    const where = output.remoteSteps ? ` (${output.remoteSteps} steps on the worker, ${output.localSteps} here)` : '';
    $('progress').textContent = `done in ${secs.toFixed(1)} s${where}`;
    $('result-caption').textContent = `${output.width}×${output.height}${video ? `, ${output.frames} frames` : ''}, seed ${req.seed}`;
  } catch (e) {
    const message = e.message ?? String(e);
    $('progress').textContent = message === 'cancelled' ? 'cancelled' : '';
    if (message !== 'cancelled') showError(message);
    window.sdlite.lastError = message;
  } finally {
    running = false;
    $('generate').disabled = false;
    $('cancel').disabled = true;
    $('bar').value = 0;
  }
}

async function main() {
  window.sdlite = { pageStart: performance.now(), models: [], workerLog: [] };
  const adapter = 'gpu' in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (!adapter) {
    fatal('This browser has WebGPU turned off or does not offer it, and sdlite needs it to run models in the tab. Use a recent Chrome, Edge or Safari (or Firefox with WebGPU enabled), and open the page over https or from localhost.');
    window.sdlite.ready = 'no-webgpu';
    return;
  }
  await init();
  try {
    studio = await Studio.open();
  } catch (e) {
    fatal(`WebGPU is present but no usable adapter could be opened: ${e.message ?? e}`);
    window.sdlite.ready = 'no-adapter';
    return;
  }
  $('adapter').textContent = `WebGPU adapter: ${studio.adapter}`;
  $('app').hidden = false;
  try {
    const index = await (await fetch('models/index.json')).json();
    window.sdlite.models = index.models;
  } catch {
    window.sdlite.models = [];
  }
  for (const m of window.sdlite.models) $('model').add(new Option(m.name, m.name));
  $('load').onclick = loadServed;
  $('folder').onchange = (e) => loadPicked(e.target.files);
  $('generate').onclick = generate;
  $('cancel').onclick = () => studio.cancel();
  window.sdlite.ready = 'ok';
  if (window.sdlite.models.length) await loadServed();
}

main();
