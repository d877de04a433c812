// Wiring: the form submits jobs, each job gets a row and a status watcher, and a finished
// image leaves its row for the gallery (shown once).

import { afterRetryAfter, api, Backoff, JobWatcher, NetworkError } from "./api.js";
import { httpUrl } from "./download.js";
import { plainCatalogueError, plainSubmitError, plainTrouble, plainUnavailable } from "./errors.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobRow } from "./jobs.js";
import { tookSeconds, WORDS } from "./status.js";

const $ = (id) => document.getElementById(id);
const ACTIVE_KEY = "t2i.active.v1"; // unfinished jobs of this tab, resumed after a reload

const settings = readSettings();
const jobList = $("jobs");
const announcer = $("announcer");
const rates = new Map(); // worker name -> steps per second lately, for estimates

const form = new GenerateForm($("generate-form"), { onSubmit: startJob, announce });
const gallery = new Gallery({
  list: $("gallery"),
  template: $("gallery-template"),
  count: $("gallery-count"),
  clearButton: $("gallery-clear"),
  empty: $("gallery-empty"),
  onReuse: (item) => form.fill(item),
});
const rowHandlers = { onCancel: cancel, onRetry: retry, onDismiss: dismiss, announce, rates };

$("jobs-clear").addEventListener("click", () => {
  for (const row of rows()) {
    if (row.final) removeRow(row);
  }
  $("jobs-title").focus();
});

// Elapsed times and estimates move on by themselves.
setInterval(() => {
  const now = Date.now();
  for (const row of rows()) {
    if (!row.final) row.tick(now);
  }
}, 1000);

/** Poll interval and long-poll wait: ?poll= and ?wait= win over <meta name="t2i-poll-interval">. */
function readSettings() {
  const query = new URLSearchParams(location.search);
  const meta = document.querySelector('meta[name="t2i-poll-interval"]');
  const poll = Number(query.get("poll") || (meta && meta.content) || 1500);
  const wait = Number(query.get("wait") || 20);
  return {
    interval: Number.isFinite(poll) && poll >= 100 ? poll : 1500,
    wait: Number.isFinite(wait) && wait >= 1 ? Math.round(wait) : 20,
  };
}

function announce(text) {
  // Replacing the text (not appending) keeps the live region short.
  announcer.textContent = text;
}

function rows() {
  return [...jobList.children].map((el) => el.row);
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
}

function addRow(job) {
  const row = new JobRow($("job-template"), job, rowHandlers);
  row.el.row = row;
  jobList.prepend(row.el);
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
  forget(row);
  refreshJobsHeader();
}

function startJob(job) {
  job.submittedAt = Date.now();
  const row = addRow(job);
  // On a phone the list is below the form: show the new job's state without a scroll.
  row.el.scrollIntoView({ block: "nearest", behavior: reducedMotion() ? "auto" : "smooth" });
  submit(row);
}

function reducedMotion() {
  return window.matchMedia("(prefers-reduced-motion: reduce)").matches;
}

/** POST /generate, waiting out 503s (Retry-After) and network errors until it is taken or refused. */
async function submit(row) {
  const backoff = new Backoff(1500, 30000);
  const busy = new Backoff(1000, 10000);
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
      row.accepted(data);
      remember(row);
      watch(row);
      refreshJobsHeader();
      return;
    }
    if (row.abandoned) return;
    if (status === 503) {
      // Every queue full, or no worker up: said differently, retried after the server's
      // Retry-After, stretched (and spread) while it lasts.
      const why = plainUnavailable(data);
      const wait = Math.max(afterRetryAfter(answer.retryAfter), busy.next());
      await row.showWaiting(why.text, wait, why.kind, why.detail);
      continue;
    }
    if (status === 400) {
      removeRow(row);
      form.showError(data.field, data.error || "The server refused this request.");
      return;
    }
    row.failed(plainSubmitError(status, data));
    refreshJobsHeader();
    return;
  }
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
      const plain = info && plainTrouble(info.message);
      row.trouble(info && { message: plain.text, detail: plain.detail, retryIn: info.retryIn });
    },
    onGone: (kind) => {
      row.gone(kind);
      forget(row);
      refreshJobsHeader();
    },
  }).start();
}

/** A final state: a completed image goes to the gallery and its row goes away. */
function finished(row, state) {
  forget(row);
  const imageUrl = httpUrl(state.image_url || (state.image_urls || [])[0]);
  if (state.status !== "completed" || !imageUrl || state.image_expired) return;
  const { params } = row.job;
  const hadFocus = row.el.contains(document.activeElement);
  const item = gallery.add({
    id: row.id,
    prompt: row.job.prompt,
    negative_prompt: params.negative_prompt,
    workflow: row.job.body.workflow,
    seed: state.seed ?? params.seed,
    steps: params.steps,
    width: params.width,
    height: params.height,
    image_url: imageUrl,
    took: tookSeconds(state),
    created_at: state.completed_at || Date.now() / 1000,
  });
  removeRow(row);
  if (item) {
    item.classList.add("fresh");
    setTimeout(() => item.classList.remove("fresh"), 2500);
    if (hadFocus) item.querySelector("a.open").focus();
  }
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

/** The same job again: same prompt, settings and seed. */
function retry(row) {
  const body = { ...row.job.body };
  const seed = body.seed ?? row.job.params.seed;
  if (seed !== undefined && seed !== null) body.seed = seed;
  const job = { prompt: row.job.prompt, body, params: { ...row.job.params } };
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

// --- unfinished jobs survive a reload (per tab) ------------------------------

function readActive() {
  try {
    const items = JSON.parse(sessionStorage.getItem(ACTIVE_KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

function writeActive(items) {
  try {
    sessionStorage.setItem(ACTIVE_KEY, JSON.stringify(items));
  } catch {
    // Not persisted: a reload forgets the running jobs (the gallery still gets them if finished).
  }
}

function remember(row) {
  const items = readActive().filter((item) => item.id !== row.id);
  items.push({ id: row.id, worker: row.worker, job: row.job });
  writeActive(items);
}

function forget(row) {
  if (row.id) writeActive(readActive().filter((item) => item.id !== row.id));
}

function resume() {
  for (const item of readActive()) {
    if (!item || !item.id || !item.job || !item.job.prompt) continue;
    item.job.params = item.job.params || {};
    item.job.body = item.job.body || { prompt: item.job.prompt };
    const row = addRow(item.job);
    row.accepted({ prompt_id: item.id, worker: item.worker });
    watch(row);
  }
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
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

async function checkHealth() {
  try {
    const { data } = await api.health();
    $("sim-banner").hidden = !(data && data.simulated === true);
    // The server's configured interval, unless the URL chose one.
    const seconds = data && Number(data.poll_interval);
    if (!new URLSearchParams(location.search).has("poll") && Number.isFinite(seconds) && seconds >= 0.1) {
      settings.interval = seconds * 1000;
    }
  } catch {
    $("sim-banner").hidden = true;
  }
}

// Jobs of before a reload are resumed once the server's poll interval is known.
checkHealth().then(resume);
loadCatalogue(() => {
  document.documentElement.dataset.ready = "true";
});
