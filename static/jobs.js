// One compact row per unfinished (or failed, cancelled, lost) job: its state in words, time,
// progress and a small live preview when there is one. A finished image leaves the list for
// the gallery, so no image is shown twice.

import { httpUrl } from "./download.js";
import { describeState, duration, isFinal, metaParts, renderMeta, WORDS } from "./status.js";

let rowCount = 0;

function seconds(ms) {
  return Math.max(1, Math.round(ms / 1000));
}

/** Seconds since an epoch-seconds time of the server, or null when the clocks disagree. */
function sinceServer(epochSeconds, nowMs) {
  if (!Number.isFinite(epochSeconds) || epochSeconds <= 0) return null;
  const elapsed = nowMs / 1000 - epochSeconds;
  return elapsed >= 0 && elapsed < 86400 ? elapsed : null;
}

export class JobRow {
  /**
   * `job` is {prompt, body, params, submittedAt} (no prompt nor body for a job another browser
   * started: it cannot be tried again from here); `handlers` are onCancel(row), onRetry(row),
   * onDismiss(row), announce(text) for the screen-reader live region, and `rates`, a Map of
   * worker name -> steps per second seen lately (for an estimate before a job's own rate).
   */
  constructor(template, job, handlers) {
    this.job = job;
    this.handlers = handlers;
    this.id = null;
    this.worker = null;
    this.final = false;
    this.lastStatus = null;
    this.countdown = null;
    this.state = null; // the last state from the server
    this.details = { state: null, trouble: null };
    const el = template.content.firstElementChild.cloneNode(true);
    this.el = el;
    const $ = (selector) => el.querySelector(selector);
    this.parts = {
      thumb: $(".job-thumb"),
      preview: $("img.preview"),
      prompt: $(".prompt"),
      meta: $(".meta"),
      state: $(".state"),
      time: $(".time"),
      notice: $(".notice"),
      bar: $("progress"),
      trouble: $(".trouble"),
      details: $("details.details"),
      detailText: $(".detail-text"),
      cancel: $("button.cancel"),
      retry: $("button.retry"),
      dismiss: $("button.dismiss"),
    };
    const n = ++rowCount;
    const p = this.parts;
    p.prompt.id = `job-${n}-prompt`;
    p.state.id = `job-${n}-state`;
    el.setAttribute("aria-labelledby", p.prompt.id);
    el.setAttribute("aria-describedby", p.state.id);
    p.bar.setAttribute("aria-labelledby", p.state.id);
    for (const button of [p.cancel, p.retry, p.dismiss]) button.setAttribute("aria-describedby", p.prompt.id);
    this.showJob(job);

    p.cancel.addEventListener("click", () => this.handlers.onCancel(this));
    p.retry.addEventListener("click", () => this.handlers.onRetry(this));
    p.dismiss.addEventListener("click", () => this.handlers.onDismiss(this));
    this.showSubmitting();
  }

  /** What was asked: at creation, or later when this browser's cache learns a job first listed by the server. */
  showJob(job) {
    this.job = job;
    this.label = job.prompt || WORDS.jobElsewhere;
    const prompt = this.parts.prompt;
    prompt.textContent = this.label;
    prompt.title = this.label;
    prompt.classList.toggle("unknown", !job.prompt);
    this.renderMeta();
  }

  renderMeta() {
    const { params } = this.job;
    renderMeta(this.parts.meta, metaParts({ ...params, worker: this.worker }));
  }

  setState(kind, text, { announce = false } = {}) {
    this.el.dataset.state = kind;
    const state = this.parts.state;
    const at = this.worker ? text.indexOf(`on ${this.worker}`) : -1;
    if (at < 0) {
      state.textContent = text;
    } else {
      // "on gpu-a" never breaks at its hyphen.
      const keep = document.createElement("span");
      keep.className = "nowrap";
      keep.textContent = `on ${this.worker}`;
      state.replaceChildren(text.slice(0, at), keep, text.slice(at + keep.textContent.length));
    }
    // A row cancelled by Cancel all (`quiet`) is not announced: the one sentence of how many is.
    if (announce && !(this.quiet && kind === "cancelled")) this.handlers.announce(`${text}: ${this.label}`);
  }

  /** A determinate bar (value of max), an indeterminate one (value null), or none (hidden). */
  setProgress(value, max, hidden = false) {
    const bar = this.parts.bar;
    bar.hidden = hidden;
    if (hidden) return;
    if (value === null) {
      bar.removeAttribute("value");
    } else {
      bar.max = max;
      bar.value = value;
    }
  }

  setFinal(final) {
    this.final = final;
    const p = this.parts;
    p.cancel.hidden = final;
    p.dismiss.hidden = !final;
    if (final) {
      this.trouble(null);
      this.stopPreview();
      p.time.hidden = true;
      p.notice.hidden = true;
      this.setProgress(null, null, true);
    }
  }

  /** The technical text behind "Details": the current trouble's, else the state's. */
  setDetail(which, text) {
    this.details[which] = text || null;
    const shown = this.details.trouble || this.details.state;
    this.parts.detailText.textContent = shown || "";
    this.parts.details.hidden = !shown;
  }

  showSubmitting() {
    this.stopCountdown();
    this.setState("submitting", WORDS.submitting);
    this.setProgress(null);
    this.setDetail("state", null);
    this.setFinal(false);
  }

  /** Show `message(n)` counting down from `ms`; resolves when it reaches zero. */
  showWaiting(message, ms, kind = "waiting", detail = null) {
    this.stopCountdown();
    const until = Date.now() + ms;
    // Announced once per kind of wait, not at every retry (that would drown other jobs' news).
    const announce = this.announcedWait !== kind;
    this.announcedWait = kind;
    this.setState(kind === "reconnecting" ? "reconnecting" : "waiting", message(seconds(ms)), { announce });
    this.el.dataset.wait = kind;
    this.setDetail("state", detail);
    return new Promise((resolve) => {
      const tick = () => {
        const left = until - Date.now();
        if (left <= 0) {
          this.stopCountdown();
          resolve();
        } else {
          this.parts.state.textContent = message(seconds(left));
        }
      };
      this.countdown = { timer: setInterval(tick, 250), resolve };
    });
  }

  stopCountdown() {
    if (this.countdown) {
      clearInterval(this.countdown.timer);
      this.countdown.resolve();
      this.countdown = null;
    }
  }

  accepted(answer) {
    this.id = answer.prompt_id;
    this.worker = answer.worker || null;
    this.el.dataset.id = this.id;
    delete this.el.dataset.wait;
    this.acceptedAt = this.acceptedAt || Date.now();
    this.renderMeta();
    this.setState("pending", WORDS.accepted);
    this.setDetail("state", null);
    this.setProgress(null, null, true);
  }

  /** A new state from GET /status. */
  update(state) {
    const p = this.parts;
    const now = Date.now();
    const changed = state.status !== this.lastStatus;
    this.lastStatus = state.status;
    this.state = state;
    const { text, notice, detail } = describeState(state, { worker: this.worker });
    if (!this.el.classList.contains("reconnecting")) p.trouble.hidden = true; // an old note
    const final = isFinal(state.status);
    this.setState(state.status, text, { announce: changed });
    p.notice.textContent = notice || "";
    p.notice.hidden = !notice;
    if (notice && notice !== this.lastNotice && !changed) this.handlers.announce(`${notice}: ${this.label}`);
    this.lastNotice = notice || null;
    this.setDetail("state", detail);
    if (state.seed !== undefined && state.seed !== null && this.job.params.seed === undefined) {
      this.job.params.seed = state.seed;
      this.renderMeta();
    }
    if (state.status === "pending") {
      this.queuedFrom = this.queuedFrom ?? (sinceServer(state.created_at, now) !== null
        ? now - sinceServer(state.created_at, now) * 1000 : this.acceptedAt || now);
      this.setProgress(null, null, true);
    } else if (state.status === "running") {
      if (this.runFrom === undefined) {
        const since = sinceServer(state.started_at, now);
        this.runFrom = since !== null ? now - since * 1000 : now;
      }
      const progress = state.progress;
      if (progress && progress.max) {
        this.setProgress(progress.value, progress.max);
        this.noteProgress(progress, now);
      } else {
        this.setProgress(null);
      }
      const previewUrl = httpUrl(state.preview_url);
      if (previewUrl) this.showPreview(previewUrl);
    }
    if (final) p.retry.hidden = state.status === "completed" || !this.canRetry();
    this.setFinal(final);
    if (!final) this.tick(now);
  }

  /** Steps per second from the first and the latest progress seen (the model load is not counted). */
  noteProgress(progress, now) {
    if (!this.firstStep || progress.value < this.firstStep.value) this.firstStep = { value: progress.value, at: now };
    if (progress.value !== this.lastProgressValue) {
      this.lastProgressValue = progress.value;
      this.lastProgressAt = now;
    }
    const steps = progress.value - this.firstStep.value;
    const ms = now - this.firstStep.at;
    if (steps >= 2 && ms >= 500) {
      this.rate = (steps * 1000) / ms;
      if (this.worker) this.handlers.rates.set(this.worker, this.rate);
    }
  }

  /** Elapsed time (and an estimate of what is left) for a queued or running job; called every second. */
  tick(now = Date.now()) {
    const time = this.parts.time;
    const state = this.state;
    let text = "";
    if (!this.final && state && state.status === "running" && this.runFrom !== undefined) {
      text = duration((now - this.runFrom) / 1000);
      const left = this.estimateLeft(now);
      if (left !== null) text += ` · about ${duration(Math.max(1, left))} left`;
    } else if (!this.final && state && state.status === "pending" && this.queuedFrom !== undefined) {
      const waited = (now - this.queuedFrom) / 1000;
      if (waited >= 1) text = `waiting ${duration(waited)}`;
    }
    time.textContent = text;
    time.hidden = !text;
  }

  /** Seconds left at the job's own rate, else at its worker's recent rate; null when unknown. */
  estimateLeft(now) {
    const progress = this.state.progress;
    if (!progress || !progress.max) return null;
    const rate = this.rate || (this.worker && this.handlers.rates.get(this.worker));
    if (!rate) return null;
    const sinceLast = this.lastProgressAt ? (now - this.lastProgressAt) / 1000 : 0;
    return (progress.max - progress.value) / rate - sinceLast;
  }

  showPreview(url) {
    // One preview load at a time; a newer one waits for it. Nothing is asked after the job ends.
    this.previewWanted = url;
    if (this.previewLoader || url === this.previewShown) return;
    const loader = new Image();
    this.previewLoader = loader;
    const done = (ok) => {
      if (this.previewLoader !== loader) return;
      this.previewLoader = null;
      if (ok && !this.final) {
        this.previewShown = url;
        this.parts.preview.src = url;
        this.parts.preview.alt = `Live preview of: ${this.label}`;
        this.parts.thumb.hidden = false;
      }
      if (!this.final && this.previewWanted && this.previewWanted !== url) this.showPreview(this.previewWanted);
    };
    loader.onload = () => done(true);
    loader.onerror = () => done(false);
    loader.src = url;
  }

  stopPreview() {
    this.previewWanted = null;
    if (this.previewLoader) {
      this.previewLoader.onload = this.previewLoader.onerror = null;
      this.previewLoader.removeAttribute("src");
      this.previewLoader = null;
    }
    this.parts.thumb.hidden = true;
    this.parts.preview.removeAttribute("src");
  }

  /** Polling trouble: {message, detail, retryIn} while retrying, null once it is over. */
  trouble(info) {
    const line = this.parts.trouble;
    clearInterval(this.troubleTimer);
    if (!info) {
      line.hidden = true;
      this.el.classList.remove("reconnecting");
      this.setDetail("trouble", null);
      return;
    }
    const until = Date.now() + info.retryIn;
    const what = line.querySelector(".what");
    const tick = () => {
      const left = until - Date.now();
      what.textContent = left > 500 ? `Reconnecting… next try in ${seconds(left)} s` : "Reconnecting…";
      if (left <= 500) clearInterval(this.troubleTimer);
    };
    tick();
    this.troubleTimer = setInterval(tick, 500);
    line.querySelector(".reason").textContent = info.message || "";
    line.hidden = false;
    this.setDetail("trouble", info.detail);
    this.el.classList.add("reconnecting");
  }

  /** The server no longer knows this job: it can be tried again. */
  gone(kind) {
    this.setState("gone", kind === "expired" ? WORDS.expired : WORDS.lost, { announce: true });
    this.parts.retry.hidden = !this.canRetry();
    this.setFinal(true);
  }

  /** The submission itself failed (413, 502, …): no job was made. `plain` is {text, detail}. */
  failed(plain) {
    this.stopCountdown();
    delete this.el.dataset.wait;
    this.setState("failed", WORDS.failed(plain.text), { announce: true });
    this.setDetail("state", plain.detail);
    this.parts.retry.hidden = !this.canRetry();
    this.setFinal(true);
  }

  cancelledBeforeSubmit() {
    this.stopCountdown();
    delete this.el.dataset.wait;
    this.setState("cancelled", WORDS.cancelled, { announce: true });
    this.setDetail("state", null);
    this.parts.retry.hidden = !this.canRetry();
    this.setFinal(true);
  }

  /** Try again needs what was asked (a job of another browser has only its state). */
  canRetry() {
    return Boolean(this.job.body && this.job.prompt);
  }

  /** A one-line note under the state (e.g. a cancel that could not be sent). */
  note(text) {
    clearInterval(this.troubleTimer);
    this.parts.trouble.querySelector(".what").textContent = text;
    this.parts.trouble.querySelector(".reason").textContent = "";
    this.parts.trouble.hidden = !text;
  }
}
