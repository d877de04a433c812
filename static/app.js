// Wiring: the form submits jobs, each job gets a row and a status watcher, and a finished
// image leaves its row for the gallery (shown once). The client's jobs from its other tabs
// and browsers come in from GET /jobs (sync.js); the key from auth.js.

import { afterRetryAfter, api, Backoff, JobWatcher, NetworkError, retryWait } from "./api.js";
import { KeyManager } from "./auth.js";
import { httpUrl } from "./download.js";
import { plainCancelAll, plainCatalogueError, plainLimit, plainSubmitError, plainTrouble,
  plainUnavailable } from "./errors.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobRow } from "./jobs.js";
import { tookSeconds, WORDS } from "./status.js";
import { jobCache, JobSync } from "./sync.js";

const $ = (id) => document.getElementById(id);

const settings = readSettings();
const jobList = $("jobs");
const announcer = $("announcer");
const rates = new Map(); // worker name -> steps per second lately, for estimates
const settled = new Set(); // ids whose rows ended or left here: a stale list does not bring them back
// Pictures a job of this page was sent with (job id -> {param: picture}), for Reuse from the gallery:
// in memory only (too big for localStorage), the most recent HELD_JOBS jobs.
const held = new Map();
const HELD_JOBS = 30;
const keys = new KeyManager(document, { onChange: keyChanged, announce });
const sync = new JobSync({ interval: settings.refresh, onList: listed });

const form = new GenerateForm($("generate-form"), { onSubmit: startJob, announce });
const gallery = new Gallery({
  list: $("gallery"),
  template: $("gallery-template"),
  count: $("gallery-count"),
  clearButton: $("gallery-clear"),
  empty: $("gallery-empty"),
  onReuse: (item) => form.fill(item, held.get(item.job_id || item.id) || null),
});
const rowHandlers = { onCancel: cancel, onRetry: retry, onDismiss: dismiss, announce, rates };

$("jobs-clear").addEventListener("click", () => {
  for (const row of rows()) {
    if (row.final) removeRow(row);
  }
  showJobsNote(null);
  $("jobs-title").focus();
});
$("jobs-cancel-all").addEventListener("click", cancelAll);

// Elapsed times and estimates move on by themselves.
setInterval(() => {
  const now = Date.now();
  for (const row of rows()) {
    if (!row.final) row.tick(now);
  }
}, 1000);

/**
 * Poll interval and long-poll wait: ?poll= and ?wait= win over <meta name="t2i-poll-interval">;
 * how often the client's job list is read again: ?refresh= (ms), else about every 30 s.
 */
function readSettings() {
  const query = new URLSearchParams(location.search);
  const meta = document.querySelector('meta[name="t2i-poll-interval"]');
  const poll = Number(query.get("poll") || (meta && meta.content) || 1500);
  const wait = Number(query.get("wait") || 20);
  const refresh = Number(query.get("refresh") || 30000);
  return {
    interval: Number.isFinite(poll) && poll >= 100 ? poll : 1500,
    wait: Number.isFinite(wait) && wait >= 1 ? Math.round(wait) : 20,
    refresh: Number.isFinite(refresh) && refresh >= 200 ? refresh : 30000,
  };
}

function announce(text) {
  // Replacing the text (not appending) keeps the live region short.
  announcer.textContent = text;
}

function rows() {
  return [...jobList.children].map((el) => el.row);
}

function findRow(id) {
  return rows().find((row) => row.id === id) || null;
}

function refreshJobsHeader() {
  const all = rows();
  const counts = { running: 0, queued: 0 };
  for (const row of all) {
    if (row.final) continue;
    if (row.lastStatus === "running") counts.running += 1;
    else counts.queued += 1;
  }
  const words = [];
  if (counts.running) words.push(`${counts.running} running`);
  if (counts.queued) words.push(`${counts.queued} waiting`);
  $("jobs-count").textContent = words.length ? `(${words.join(", ")})` : "";
  $("jobs-empty").hidden = all.length > 0;
  $("jobs-clear").hidden = !all.some((row) => row.final);
  const cancelAllButton = $("jobs-cancel-all");
  cancelAllButton.hidden = all.length === 0;
  if (!cancelAllButton.dataset.busy) {
    const idle = counts.running + counts.queued === 0;
    if (idle && document.activeElement === cancelAllButton) $("jobs-title").focus();
    cancelAllButton.disabled = idle;
  }
}

/** A row, newest first: `at` (ms) is when the job was submitted (now, for this tab's own). */
function addRow(job, at = Date.now()) {
  const row = new JobRow($("job-template"), job, rowHandlers);
  row.el.row = row;
  row.at = at;
  const later = rows().find((other) => other.at < at);
  jobList.insertBefore(row.el, later ? later.el : null);
  refreshJobsHeader();
  return row;
}

function removeRow(row) {
  if (row.watcher) row.watcher.stop();
  row.abandoned = true;
  row.stopCountdown();
  row.trouble(null);
  row.stopPreview();
  row.el.remove();
  if (row.id) settled.add(row.id);
  forget(row);
  refreshJobsHeader();
}

function startJob(job) {
  showJobsNote(null);
  job.submittedAt = Date.now();
  const row = addRow(job);
  // On a phone the list is below the form: show the new job's state without a scroll.
  row.el.scrollIntoView({ block: "nearest", behavior: reducedMotion() ? "auto" : "smooth" });
  submit(row);
}

function reducedMotion() {
  return window.matchMedia("(prefers-reduced-motion: reduce)").matches;
}

/**
 * POST /generate, waiting out 503s (Retry-After), 429s (this client's most unfinished jobs:
 * until one ends, or Retry-After) and network errors until it is taken or refused.
 */
async function submit(row) {
  const backoff = new Backoff(1500, 30000);
  const busy = new Backoff(1000, 10000);
  const limited = new Backoff(1000, 10000);
  while (!row.abandoned) {
    row.showSubmitting();
    let answer;
    try {
      answer = await api.generate(row.job.body);
    } catch (err) {
      if (row.abandoned || !(err instanceof NetworkError)) return;
      await row.showWaiting(WORDS.unreachable, backoff.next(), "reconnecting");
      continue;
    }
    const { status, data } = answer;
    if (status === 200 && data.prompt_id) {
      if (row.abandoned) {
        // Cancel (or Dismiss) was pressed while the request was on its way: the job exists
        // now, so stop it on the server too. The row already says so; nothing to watch.
        api.cancel(data.prompt_id).catch(() => {});
        return;
      }
      const twin = findRow(data.prompt_id);
      if (twin && twin !== row) removeRow(twin); // the job list showed it before this answer came
      settled.delete(data.prompt_id);
      row.accepted(data);
      remember(row);
      watch(row);
      refreshJobsHeader();
      return;
    }
    if (row.abandoned) return;
    if (status === 503) {
      // Every queue full, or no worker up: said differently, retried after the server's
      // Retry-After (spread; when the pool is full, when a place is expected to free up).
      const why = plainUnavailable(data);
      const wait = retryWait(answer.retryAfter, busy);
      await row.showWaiting(why.text, wait, why.kind, why.detail);
      continue;
    }
    if (status === 429) {
      // This client holds its most unfinished jobs: sent again as soon as one of them ends
      // (the oldest waiting row first), or after the server's Retry-After at the latest.
      const why = plainLimit(data);
      const wait = retryWait(answer.retryAfter, limited);
      limitQueue.push(row);
      await row.showWaiting(why.text, wait, why.kind, why.detail);
      if (limitQueue.includes(row)) limitQueue.splice(limitQueue.indexOf(row), 1);
      continue;
    }
    if (status === 400) {
      removeRow(row);
      form.showError(data.field, data.error || "The server refused this request.");
      return;
    }
    row.failed(plainSubmitError(status, data, { picture: hasPictures(row.job) }));
    refreshJobsHeader();
    return;
  }
}

/** Rows waiting out a 429, oldest first: one is sent again each time one of this client's jobs ends. */
const limitQueue = [];

function slotFreed() {
  const next = limitQueue.shift();
  if (next) next.stopCountdown();
}

function watch(row) {
  row.watcher = new JobWatcher(row.id, {
    interval: settings.interval,
    wait: settings.wait,
    startedAt: row.job.submittedAt || Date.now(),
    onUpdate: (state) => {
      row.update(state);
      if (row.final) finished(row, state);
      refreshJobsHeader();
    },
    onTrouble: (info) => {
      const plain = info && plainTrouble(info.message, info.status);
      row.trouble(info && { message: plain.text, detail: plain.detail, retryIn: info.retryIn });
    },
    onGone: (kind) => {
      row.gone(kind);
      settled.add(row.id);
      forget(row);
      slotFreed();
      refreshJobsHeader();
    },
  }).start();
}

/**
 * The gallery items of a completed state and what was asked: one per image (a batch of N makes
 * N, each once; the first keeps the job's id), none without an image to show.
 */
function galleryItems(state, job) {
  if (state.status !== "completed" || state.image_expired) return [];
  const listed = Array.isArray(state.image_urls) && state.image_urls.length ? state.image_urls : [state.image_url];
  const urls = [...new Set(listed.map(httpUrl).filter(Boolean))];
  const params = job.params || {};
  const id = state.prompt_id;
  const base = {
    job_id: id,
    prompt: job.prompt || "",
    negative_prompt: params.negative_prompt,
    workflow: (job.body && job.body.workflow) || state.workflow || undefined,
    seed: state.seed ?? params.seed,
    steps: params.steps,
    width: params.width,
    height: params.height,
    params: { ...params, ...(state.seed !== undefined && state.seed !== null ? { seed: state.seed } : {}) },
    inputs: job.inputs && Object.keys(job.inputs).length ? job.inputs : undefined,
    took: tookSeconds(state),
    created_at: state.completed_at || Date.now() / 1000,
  };
  return urls.map((url, i) => ({ ...base, id: i ? `${id}:${i + 1}` : id, index: i, count: urls.length, image_url: url }));
}

/** A final state: a completed job's images go to the gallery and its row goes away. */
function finished(row, state) {
  settled.add(row.id);
  forget(row);
  slotFreed();
  const items = galleryItems({ ...state, prompt_id: row.id }, row.job);
  if (!items.length) return;
  hold(row.id, row.job.images);
  const hadFocus = row.el.contains(document.activeElement);
  const nodes = gallery.addAll(items);
  removeRow(row);
  for (const node of nodes) {
    node.classList.add("fresh");
    setTimeout(() => node.classList.remove("fresh"), 2500);
  }
  if (nodes.length && hadFocus) nodes[0].querySelector("a.open").focus();
}

function hasPictures(job) {
  return Boolean(job.images && Object.keys(job.images).length);
}

/** Keep a job's pictures for Reuse (the newest HELD_JOBS jobs'). */
function hold(id, images) {
  if (!id || !images || !Object.keys(images).length) return;
  held.delete(id);
  held.set(id, images);
  while (held.size > HELD_JOBS) held.delete(held.keys().next().value);
}

async function cancel(row) {
  if (row.final) return;
  if (!row.id) {
    // Not submitted yet (waiting for a worker, or the POST is on its way).
    row.abandoned = true;
    row.cancelledBeforeSubmit();
    refreshJobsHeader();
    return;
  }
  const button = row.parts.cancel;
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    const { status } = await api.cancel(row.id);
    if (status >= 500) row.note("Could not cancel: the server has a problem right now. Try again.");
    // 200: it is being cancelled; 409: it already finished; 404: gone. Either way, ask for the state now.
    if (row.watcher) row.watcher.poke();
  } catch {
    row.note("Could not reach the server to cancel. Try again.");
  } finally {
    button.disabled = false;
    button.textContent = "Cancel";
  }
}

/**
 * The same job again: same prompt, settings, seed and pictures. A job whose picture this page no
 * longer holds (it was sent before a reload, or from another tab) goes back to the form instead,
 * whose drop zone asks for the picture again.
 */
function retry(row) {
  const inputs = row.job.inputs || {};
  const images = row.job.images || (row.id && held.get(row.id)) || {};
  const gone = Object.keys(inputs).filter((name) => !images[name]);
  if (gone.length) {
    form.fill({ prompt: row.job.prompt, workflow: row.job.body && row.job.body.workflow, params: row.job.params,
      inputs }, images);
    form.focusField(gone[0]);
    return;
  }
  const body = { ...row.job.body };
  for (const name of Object.keys(inputs)) body[name] = images[name].url;
  const seed = body.seed ?? row.job.params.seed;
  if (seed !== undefined && seed !== null) body.seed = seed;
  const job = { prompt: row.job.prompt, body, params: { ...row.job.params }, images, inputs };
  const next = addRow(job);
  removeRow(row);
  job.submittedAt = Date.now();
  submit(next);
  next.parts.cancel.focus();
}

function dismiss(row) {
  const sibling = row.el.nextElementSibling || row.el.previousElementSibling;
  removeRow(row);
  const target = sibling && sibling.row && (sibling.row.final ? sibling.row.parts.dismiss : sibling.row.parts.cancel);
  (target || $("jobs-title")).focus();
}

/** "Cancel all": every unfinished job of this client, wherever it was started (POST /cancel). */
async function cancelAll() {
  const button = $("jobs-cancel-all");
  const open = rows().filter((row) => !row.final);
  if (!open.length || button.dataset.busy) return;
  const question = open.length === 1 ? "Cancel your unfinished job?" : `Cancel all ${open.length} unfinished jobs?`;
  const where = anonymous() ? "in every tab of this browser" : "in every tab and browser where you use this key";
  if (!confirm(`${question} They stop on the server, and ${where}.`)) return;
  button.dataset.busy = "true";
  button.textContent = "Cancelling…";
  for (const row of open) {
    row.quiet = true;
    if (!row.id) {
      row.abandoned = true; // not sent yet, or on its way: cancelled once it exists
      row.cancelledBeforeSubmit();
    }
  }
  let plain;
  try {
    // With a key, POST /cancel: every unfinished job of the client's. Without, the address may be
    // shared: the jobs shown here, one by one (as with a server without POST /cancel).
    const { status, data } = anonymous() ? { status: 404, data: {} } : await api.cancelAll();
    if (status === 404 || status === 405) {
      const answers = await Promise.all(open.filter((row) => row.id && !row.final)
        .map((row) => api.cancel(row.id).then((a) => a.status, () => null)));
      const done = answers.filter((code) => code === 200).length;
      plain = plainCancelAll(200, { cancelled: done, failed: answers.filter((code) => code !== 200 && code !== 409)
        .map((code) => `HTTP ${code ?? "no answer"}`) });
    } else {
      plain = plainCancelAll(status, data);
    }
  } catch {
    plain = { text: "Could not reach the server to cancel. Try again.", detail: null };
  }
  for (const row of open) {
    if (row.watcher) row.watcher.poke(); // each row shows its end at once
  }
  delete button.dataset.busy;
  button.textContent = "Cancel all";
  showJobsNote(plain);
  announce(plain.text);
  refreshJobsHeader();
  sync.refresh();
}

/** A line under the Jobs heading (what Cancel all did), with the server's words under Details. */
function showJobsNote(plain) {
  const note = $("jobs-note");
  note.hidden = !plain;
  if (!plain) return;
  note.querySelector(".note-text").textContent = plain.text;
  note.classList.toggle("trouble-note", plain.ok === false);
  const details = note.querySelector("details");
  details.hidden = !plain.detail;
  details.querySelector(".detail-text").textContent = plain.detail || "";
}

// --- this client's jobs in every tab and browser ------------------------------------

/** What a job from the server's list asked for: the cache's words, else what its state says. */
function jobFrom(state, entry) {
  if (entry && entry.job && entry.job.prompt) {
    const job = { ...entry.job };
    job.params = { ...(job.params || {}) };
    job.body = job.body || { prompt: job.prompt };
    return job;
  }
  // Another browser's job: its state may carry what was asked (prompt, params), or not.
  const asked = state && typeof state.params === "object" && state.params ? state.params : {};
  const prompt = (state && (state.prompt || asked.prompt)) || "";
  const params = {};
  for (const [name, value] of Object.entries(asked)) {
    // Never a picture (a data: URL): those stay with the browser that sent them.
    if (name === "prompt" || value === undefined || value === null) continue;
    if (typeof value === "string" && value.startsWith("data:")) continue;
    params[name] = value;
  }
  if (state && Number.isInteger(state.seed) && params.seed === undefined) params.seed = state.seed;
  const body = prompt ? { prompt, ...params, ...(state.workflow ? { workflow: state.workflow } : {}) } : null;
  return { prompt, body, params };
}

/**
 * Follow a job this tab does not show yet: from the server's list (`state`) and/or this
 * browser's cache (`entry`). Nothing for a job whose row ended or left here.
 */
function follow(id, state, entry) {
  if (!id || settled.has(id)) return;
  const known = findRow(id);
  if (known) {
    // Listed by the server a moment before the tab that sent it wrote its words to the cache.
    if (!known.job.prompt && entry && entry.job && entry.job.prompt) known.showJob({ ...jobFrom(state, entry), submittedAt: known.job.submittedAt });
    return;
  }
  const job = jobFrom(state, entry);
  // When it was sent (a 404 soon after is the scheduler not having heard of it yet); the server
  // listed it: not just sent.
  job.submittedAt = state ? Date.now() : (entry.job.submittedAt || entry.at || Date.now());
  const created = state && Number(state.created_at) > 0 ? state.created_at * 1000 : entry && entry.at;
  const row = addRow(job, created || Date.now());
  row.accepted({ prompt_id: id, worker: (state && state.worker) || (entry && entry.worker) });
  if (state && state.status) row.update(state);
  watch(row);
}

/**
 * Without a key the server knows this browser by its address only, which a whole office (or
 * everyone behind a proxy) may share: then only jobs this browser started are shown.
 */
function anonymous() {
  return !keys.key();
}

/**
 * GET /jobs answered: unfinished jobs get rows, completed images go to the gallery (with a key,
 * every job of the client's; without, those of this browser).
 */
function listed({ unfinished, completed, client }) {
  keys.setClient(client);
  const mine = anonymous() ? (id) => Boolean(jobCache.get(id) || findRow(id)) : () => true;
  for (const state of [...unfinished].reverse()) {
    if (mine(state.prompt_id)) follow(state.prompt_id, state, jobCache.get(state.prompt_id));
  }
  const items = [];
  for (const state of completed) {
    const id = state.prompt_id;
    const row = findRow(id);
    if (row) {
      if (!row.final && row.watcher) row.watcher.poke(); // it ended: its row shows it now
      continue;
    }
    const entry = jobCache.get(id);
    if (!mine(id)) continue;
    items.push(...galleryItems(state, jobFrom(state, entry)));
    if (entry) jobCache.remove(id); // a tab closed before it ended: its image is here now
  }
  gallery.merge(items);
}

/** This browser's jobs that had not ended when last seen (another tab's too, or a closed one's). */
function resume() {
  for (const entry of jobCache.all()) follow(entry.id, null, entry);
}

/** The first edition kept a tab's unfinished jobs in sessionStorage: they move to the cache. */
function adoptTabJobs() {
  try {
    const items = JSON.parse(sessionStorage.getItem("t2i.active.v1") || "[]");
    for (const item of Array.isArray(items) ? items : []) {
      if (item && item.id && item.job && item.job.prompt) jobCache.put({ id: item.id, worker: item.worker, job: item.job });
    }
    sessionStorage.removeItem("t2i.active.v1");
  } catch {
    // Nothing to adopt.
  }
}

/** The key changed (here or in another tab): ask for the list again, and every job's state. */
function keyChanged() {
  for (const row of rows()) {
    if (row.watcher) row.watcher.poke();
  }
  sync.refresh({ first: true });
  loadCatalogue.again?.();
}

/** What the job cache (localStorage) keeps of a job: what was asked, without its pictures (too big). */
function remember(row) {
  const { prompt, body, params, inputs, submittedAt } = row.job;
  const kept = { ...body };
  for (const name of Object.keys(inputs || {})) delete kept[name];
  jobCache.put({ id: row.id, worker: row.worker, job: { prompt, body: kept, params, inputs, submittedAt } });
  hold(row.id, row.job.images);
}

function forget(row) {
  if (row.id) jobCache.remove(row.id);
}

// --- start ---------------------------------------------------------------------

/**
 * GET /workflows: the form's fields, ranges and defaults. Asked again (with backoff) until it
 * answers; `settled()` is called once the form has its settings or has said why it has none.
 */
async function loadCatalogue(settled) {
  const backoff = new Backoff(1000, 30000);
  let told = false;
  for (;;) {
    let status = null;
    let data = {};
    let retryAfter = null;
    try {
      ({ status, data, retryAfter } = await api.workflows());
      if (status === 200 && data && data.workflows && form.setCatalogue(data)) {
        settled();
        return;
      }
    } catch {
      status = null;
    }
    const wait = Math.max(backoff.next(), afterRetryAfter(retryAfter));
    const plain = plainCatalogueError(status === 200 ? 500 : status, data);
    form.showSettingsNote(plain);
    if (!told) {
      announce(plain.text);
      told = true;
      settled();
    }
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, wait);
      loadCatalogue.again = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    loadCatalogue.again = null;
  }
}

async function checkHealth() {
  try {
    const { data } = await api.health();
    $("sim-banner").hidden = !(data && data.simulated === true);
    if (data && data.auth) keys.setServer(data.auth);
    // The server's configured interval, unless the URL chose one.
    const seconds = data && Number(data.poll_interval);
    if (!new URLSearchParams(location.search).has("poll") && Number.isFinite(seconds) && seconds >= 0.1) {
      settings.interval = seconds * 1000;
    }
  } catch {
    $("sim-banner").hidden = true;
  }
}

// Jobs of before a reload (and of this browser's other tabs) are resumed once the server's
// poll interval is known, then the server's list adds those of other browsers.
adoptTabJobs();
checkHealth().then(() => {
  resume();
  jobCache.watch(resume); // another tab submitted: shown here at once
  sync.start();
});
loadCatalogue(() => {
  document.documentElement.dataset.ready = "true";
});
