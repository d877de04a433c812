// One card per job: its state in words, a progress bar, the preview and the image.

import { downloadImage, fileName, httpUrl } from "./download.js";

let cardCount = 0;

/** The state of a job in words, as the card shows it. */
export function stateText(state) {
  switch (state.status) {
    case "pending": {
      const position = state.queue_position;
      if (position === null || position === undefined) return unfinished("Queued", state);
      return unfinished(position === 0 ? "Queued — up next" : `Queued — position ${position}`, state);
    }
    case "running": {
      const progress = state.progress;
      if (!progress || !progress.max) return unfinished("Generating — starting…", state);
      return unfinished(`Generating — step ${progress.value} of ${progress.max}`, state);
    }
    case "completed":
      return "Done";
    case "failed":
      return `Failed — ${state.error || "the job failed for an unknown reason."}`;
    case "cancelled":
      return "Cancelled";
    default:
      return state.status || "Unknown";
  }
}

/** An unfinished job's words, with what the worker says is wrong right now and a second attempt. */
function unfinished(text, state) {
  const parts = [text];
  if (state.attempt > 1) parts.push(`attempt ${state.attempt} (ComfyUI restarted)`);
  if (state.error) parts.push(state.error);
  return parts.join(" — ");
}

function seconds(ms) {
  return Math.max(1, Math.round(ms / 1000));
}

export class JobCard {
  /**
   * `job` is {prompt, params}; `handlers` are onCancel(card), onRetry(card),
   * onDismiss(card) and announce(text) for the screen-reader live region.
   */
  constructor(template, job, handlers) {
    this.job = job;
    this.handlers = handlers;
    this.id = null;
    this.final = false;
    this.lastStatus = null;
    this.countdown = null;
    const el = template.content.firstElementChild.cloneNode(true);
    this.el = el;
    const $ = (selector) => el.querySelector(selector);
    this.parts = {
      frame: $(".frame"),
      img: $("img.result"),
      badge: $(".badge"),
      expired: $(".expired-label"),
      note: $(".frame-note"),
      prompt: $(".prompt"),
      meta: $(".meta"),
      state: $(".state"),
      bar: $("progress"),
      trouble: $(".trouble"),
      cancel: $("button.cancel"),
      open: $("a.open"),
      download: $("button.download"),
      retry: $("button.retry"),
      dismiss: $("button.dismiss"),
    };
    const n = ++cardCount;
    const p = this.parts;
    p.prompt.id = `job-${n}-prompt`;
    p.state.id = `job-${n}-state`;
    el.setAttribute("aria-labelledby", p.prompt.id);
    p.bar.setAttribute("aria-labelledby", p.state.id);
    for (const button of [p.cancel, p.download, p.retry, p.dismiss, p.open]) {
      button.setAttribute("aria-describedby", p.prompt.id);
    }
    p.prompt.textContent = job.prompt;
    const { width, height } = job.params;
    if (width && height) el.style.setProperty("--ratio", `${width} / ${height}`);
    this.renderMeta();

    p.cancel.addEventListener("click", () => this.handlers.onCancel(this));
    p.retry.addEventListener("click", () => this.handlers.onRetry(this));
    p.dismiss.addEventListener("click", () => this.handlers.onDismiss(this));
    p.download.addEventListener("click", () =>
      downloadImage(p.download, this.imageUrl, fileName({ prompt: job.prompt, id: this.id, image_url: this.imageUrl })));
    this.showSubmitting();
  }

  renderMeta(extra = []) {
    const { params } = this.job;
    const parts = [];
    if (params.width && params.height) parts.push(`${params.width}×${params.height}`);
    if (params.steps) parts.push(`${params.steps}\u00a0steps`);
    if (params.seed !== undefined && params.seed !== null) parts.push(`seed\u00a0${params.seed}`);
    if (this.worker) parts.push(`on\u00a0${this.worker}`);
    this.parts.meta.textContent = [...parts, ...extra].join(" · ");
  }

  setState(kind, text, { announce = false } = {}) {
    this.el.dataset.state = kind;
    // A mark in the empty frame of a job that will not make an image.
    this.parts.note.textContent = { failed: "✕", cancelled: "⊘", gone: "?" }[kind] || "";
    this.parts.state.textContent = text;
    if (announce) this.handlers.announce(`${text}: ${this.job.prompt}`);
  }

  setProgress(value, max) {
    const bar = this.parts.bar;
    bar.hidden = false;
    if (value === null) {
      bar.removeAttribute("value"); // indeterminate
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
    if (final) this.trouble(null);
  }

  showSubmitting() {
    this.stopCountdown();
    this.setState("submitting", "Submitting…");
    this.setProgress(null);
    this.setFinal(false);
  }

  /** Show `message(n)` counting down from `ms`; resolves when it reaches zero. */
  showWaiting(message, ms, kind = "waiting") {
    this.stopCountdown();
    const until = Date.now() + ms;
    // Announced once per kind of wait, not at every retry (that would drown other cards' news).
    const announce = this.announcedWait !== kind;
    this.announcedWait = kind;
    this.setState(kind, message(seconds(ms)), { announce });
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
    this.renderMeta();
    this.setState("pending", "Queued");
  }

  /** A new state from GET /status (or /result). */
  update(state) {
    const p = this.parts;
    const changed = state.status !== this.lastStatus;
    this.lastStatus = state.status;
    const text = stateText(state);
    if (!this.el.classList.contains("reconnecting")) this.parts.trouble.hidden = true; // an old note
    const final = ["completed", "failed", "cancelled"].includes(state.status);
    this.setState(state.status, text, { announce: changed });
    if (state.seed !== undefined && state.seed !== null && this.job.params.seed === undefined) {
      this.job.params.seed = state.seed;
      this.renderMeta();
    }
    if (state.status === "running" && state.progress && state.progress.max) {
      this.setProgress(state.progress.value, state.progress.max);
    } else if (state.status === "completed") {
      this.setProgress(1, 1);
    } else if (final) {
      p.bar.hidden = true;
    } else {
      this.setProgress(null);
    }
    const previewUrl = httpUrl(state.preview_url);
    if (state.status === "running" && previewUrl) this.showPreview(previewUrl);
    if (state.status === "completed") this.showImage(state);
    if (final) {
      if (state.status !== "completed") this.clearFrame();
      p.retry.hidden = state.status === "completed";
      if (state.status === "completed" && state.started_at && state.completed_at > state.started_at) {
        this.renderMeta([`${(state.completed_at - state.started_at).toFixed(1)}\u00a0s`]);
      }
    }
    this.setFinal(final);
  }

  showPreview(url) {
    if (url === this.previewUrl) return;
    this.previewUrl = url;
    // Load off-screen first, so the frame never flashes an empty image.
    const loader = new Image();
    loader.onload = () => {
      if (this.imageUrl || this.previewUrl !== url) return;
      this.parts.img.src = url;
      this.parts.img.alt = `Preview of: ${this.job.prompt}`;
      this.parts.img.hidden = false;
      this.parts.badge.hidden = false;
      this.parts.frame.classList.add("has-image");
    };
    loader.src = url;
  }

  showImage(state) {
    const p = this.parts;
    const url = httpUrl(state.image_url || (state.image_urls || [])[0]);
    p.badge.hidden = true;
    if (!url || state.image_expired) {
      this.showExpired();
      return;
    }
    this.imageUrl = url;
    p.img.alt = this.job.prompt;
    p.img.onerror = () => this.showExpired();
    p.img.onload = () => p.frame.classList.add("has-image");
    p.img.src = url;
    p.img.hidden = false;
    p.open.href = url;
    p.open.hidden = false;
    p.download.hidden = false;
  }

  showExpired() {
    const p = this.parts;
    this.clearFrame();
    p.expired.hidden = false;
    p.open.hidden = true;
    p.download.hidden = true;
  }

  clearFrame() {
    const p = this.parts;
    p.img.hidden = true;
    p.img.removeAttribute("src");
    p.badge.hidden = true;
    p.frame.classList.remove("has-image");
  }

  /** Polling trouble: {message, retryIn} while retrying, null once it is over. */
  trouble(info) {
    const line = this.parts.trouble;
    clearInterval(this.troubleTimer);
    if (!info) {
      line.hidden = true;
      this.el.classList.remove("reconnecting");
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
    this.el.classList.add("reconnecting");
  }

  /** The server no longer knows this job. */
  gone(kind) {
    this.setState("gone", kind === "expired" ? "Expired — the server no longer keeps this job" :
      "Lost — no server knows this job any more (its worker may have restarted)", { announce: true });
    this.parts.bar.hidden = true;
    this.clearFrame();
    this.setFinal(true);
  }

  /** The submission itself failed (413, 502, …): no job was made. */
  failed(message) {
    this.stopCountdown();
    this.setState("failed", `Failed — ${message}`, { announce: true });
    this.parts.bar.hidden = true;
    this.parts.retry.hidden = false;
    this.setFinal(true);
  }

  cancelledBeforeSubmit() {
    this.stopCountdown();
    this.setState("cancelled", "Cancelled", { announce: true });
    this.parts.bar.hidden = true;
    this.parts.retry.hidden = false;
    this.setFinal(true);
  }

  /** A one-line note under the state (e.g. a cancel that could not be sent). */
  note(text) {
    clearInterval(this.troubleTimer);
    this.parts.trouble.querySelector(".what").textContent = text;
    this.parts.trouble.querySelector(".reason").textContent = "";
    this.parts.trouble.hidden = !text;
  }
}
