// Wiring: the form submits jobs, each job gets a card and a status watcher,
// finished images go to the gallery.

import { api, Backoff, JobWatcher, NetworkError } from "./api.js";
import { httpUrl } from "./download.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobCard } from "./jobs.js";

const $ = (id) => document.getElementById(id);
const ACTIVE_KEY = "t2i.active.v1"; // unfinished jobs of this tab, resumed after a reload

const settings = readSettings();
const jobList = $("jobs");
const announcer = $("announcer");

const form = new GenerateForm($("generate-form"), { onSubmit: startJob });
const gallery = new Gallery({
  list: $("gallery"),
  template: $("gallery-template"),
  count: $("gallery-count"),
  clearButton: $("gallery-clear"),
  empty: $("gallery-empty"),
  onReuse: (item) => form.fill(item),
});
const cardHandlers = { onCancel: cancel, onRetry: retry, onDismiss: dismiss, announce };

$("jobs-clear").addEventListener("click", () => {
  for (const el of [...jobList.children]) {
    if (el.card && el.card.final) removeCard(el.card);
  }
  $("jobs-title").focus();
});

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

function refreshJobsHeader() {
  const cards = [...jobList.children].map((el) => el.card);
  $("jobs-empty").hidden = cards.length > 0;
  $("jobs-clear").hidden = !cards.some((card) => card.final);
}

function addCard(job) {
  const card = new JobCard($("job-template"), job, cardHandlers);
  card.el.card = card;
  jobList.prepend(card.el);
  refreshJobsHeader();
  return card;
}

function removeCard(card) {
  if (card.watcher) card.watcher.stop();
  card.abandoned = true;
  card.stopCountdown();
  card.trouble(null);
  card.el.remove();
  forget(card);
  refreshJobsHeader();
}

function startJob(job) {
  submit(addCard(job));
}

/** POST /generate, waiting out 503s (Retry-After) and network errors until it is taken or refused. */
async function submit(card) {
  const backoff = new Backoff(1500, 30000);
  const busy = new Backoff(1000, 10000);
  while (!card.abandoned) {
    card.showSubmitting();
    let answer;
    try {
      answer = await api.generate(card.job.body);
    } catch (err) {
      if (card.abandoned || !(err instanceof NetworkError)) return;
      await card.showWaiting((n) => `Cannot reach the server — retrying in ${n} s`, backoff.next(), "reconnecting");
      continue;
    }
    const { status, data } = answer;
    if (status === 200 && data.prompt_id) {
      if (card.abandoned) {
        // Cancel (or Dismiss) was pressed while the request was on its way: the job exists
        // now, so stop it on the server too. The card already says so; nothing to watch.
        api.cancel(data.prompt_id).catch(() => {});
        return;
      }
      card.accepted(data);
      remember(card);
      watch(card);
      return;
    }
    if (card.abandoned) return;
    if (status === 503) {
      // The server's Retry-After, stretched while the pool stays full (many tabs, many jobs).
      const wait = Math.max((answer.retryAfter ?? 0) * 1000, busy.next());
      await card.showWaiting((n) => `No worker available — retrying in ${n} s`, wait);
      continue;
    }
    if (status === 400) {
      removeCard(card);
      form.showError(data.field, data.error || "The server refused this request.");
      return;
    }
    card.failed(submitError(status, data));
    refreshJobsHeader();
    return;
  }
}

function submitError(status, data) {
  if (status === 413) return "the request is too large; shorten the prompt.";
  let message = data.error || `the server answered ${status}.`;
  const nodeErrors = data.node_errors && Object.values(data.node_errors);
  if (nodeErrors && nodeErrors.length) {
    const first = nodeErrors[0];
    const detail = first && first.errors && first.errors[0];
    if (detail && detail.message) message += ` (${first.class_type || "node"}: ${detail.message})`;
  }
  return message;
}

function watch(card) {
  card.watcher = new JobWatcher(card.id, {
    interval: settings.interval,
    wait: settings.wait,
    onUpdate: (state) => {
      card.update(state);
      if (card.final) finished(card, state);
    },
    onTrouble: (info) => card.trouble(info),
    onGone: (kind) => {
      card.gone(kind);
      forget(card);
      refreshJobsHeader();
    },
  }).start();
}

function finished(card, state) {
  forget(card);
  refreshJobsHeader();
  const imageUrl = httpUrl(state.image_url || (state.image_urls || [])[0]);
  if (state.status !== "completed" || !imageUrl || state.image_expired) return;
  const { params } = card.job;
  gallery.add({
    id: card.id,
    prompt: card.job.prompt,
    negative_prompt: params.negative_prompt,
    seed: state.seed ?? params.seed,
    steps: params.steps,
    width: params.width,
    height: params.height,
    image_url: imageUrl,
    created_at: state.completed_at || Date.now() / 1000,
  });
}

async function cancel(card) {
  if (card.final) return;
  if (!card.id) {
    // Not submitted yet (waiting for a worker, or the POST is on its way).
    card.abandoned = true;
    card.cancelledBeforeSubmit();
    refreshJobsHeader();
    return;
  }
  const button = card.parts.cancel;
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    const { status, data } = await api.cancel(card.id);
    if (status >= 500) card.note(`Could not cancel: ${data.error || `the server answered ${status}`}. Try again.`);
    // 200: it is being cancelled; 409: it already finished; 404: gone. Either way, ask for the state now.
    if (card.watcher) card.watcher.poke();
  } catch {
    card.note("Could not reach the server to cancel. Try again.");
  } finally {
    button.disabled = false;
    button.textContent = "Cancel";
  }
}

function retry(card) {
  const job = { ...card.job, params: { ...card.job.params } };
  // A fresh seed unless the user chose one.
  if (job.body.seed === undefined) delete job.params.seed;
  const next = addCard(job);
  removeCard(card);
  submit(next);
  next.parts.cancel.focus();
}

function dismiss(card) {
  const sibling = card.el.nextElementSibling || card.el.previousElementSibling;
  removeCard(card);
  const target = sibling && sibling.card && (sibling.card.final ? sibling.card.parts.dismiss : sibling.card.parts.cancel);
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

function remember(card) {
  const items = readActive().filter((item) => item.id !== card.id);
  items.push({ id: card.id, worker: card.worker, job: card.job });
  writeActive(items);
}

function forget(card) {
  if (card.id) writeActive(readActive().filter((item) => item.id !== card.id));
}

function resume() {
  for (const item of readActive()) {
    if (!item || !item.id || !item.job) continue;
    const card = addCard(item.job);
    card.accepted({ prompt_id: item.id, worker: item.worker });
    watch(card);
  }
}

// --- start ---------------------------------------------------------------------

/** GET /workflows; a scheduler that has not heard from a worker yet answers 503: ask again later. */
async function loadCatalogue(attempt = 0) {
  let retryIn = null;
  try {
    const { status, data, retryAfter } = await api.workflows();
    if (status === 200 && data && data.workflows) {
      form.setCatalogue(data);
    } else if (status === 503 || status >= 500) {
      retryIn = (retryAfter || 2 ** attempt) * 1000;
    }
  } catch {
    retryIn = 2 ** attempt * 1000;
  }
  // Meanwhile the form keeps its fallback ranges.
  if (retryIn !== null && attempt < 8) setTimeout(() => loadCatalogue(attempt + 1), Math.min(retryIn, 30000));
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
loadCatalogue().then(() => {
  document.documentElement.dataset.ready = "true";
});
