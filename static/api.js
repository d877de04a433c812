// Talking to the scheduler: JSON requests, backoff, and a per-job status watcher.
//
// Same-origin paths only. Image and preview URLs point at workers and are
// loaded by <img> (and fetch for downloads) elsewhere, never through here.

import { isFinal } from "./status.js";

/** The request never got an HTTP answer (server down, network gone, timeout). */
export class NetworkError extends Error {}

/**
 * Exponential backoff with jitter: about first, first*2, first*4 … capped at `cap`, each
 * shortened by a random part of up to `jitter` of it (so tabs that lost the server together do
 * not come back in lockstep); reset() after a success. `random` is Math.random unless a test
 * gives its own.
 */
export class Backoff {
  constructor(first = 1500, cap = 30000, { jitter = 0.5, random = Math.random } = {}) {
    this.first = first;
    this.cap = cap;
    this.jitter = jitter;
    this.random = random;
    this.current = first;
  }

  next() {
    const base = this.current;
    this.current = Math.min(this.current * 2, this.cap);
    return Math.round(base * (1 - this.jitter * this.random()));
  }

  reset() {
    this.current = this.first;
  }
}

/** A server's Retry-After (seconds) as a wait in ms: never sooner, up to a quarter later, spread. */
export function afterRetryAfter(seconds, random = Math.random) {
  return Math.round(Math.max(0, seconds || 0) * 1000 * (1 + 0.25 * random()));
}

/** Seconds from a Retry-After header (seconds or HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/**
 * One JSON request. Resolves to {status, ok, data, retryAfter} for any HTTP
 * answer (data is {} when the body is not JSON); rejects with NetworkError when
 * there was none, or with the caller's AbortError when `signal` aborted it.
 */
export async function request(method, path, { body, signal, timeout = 15000 } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  const forward = () => controller.abort();
  if (signal) signal.addEventListener("abort", forward, { once: true });
  try {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal,
      cache: "no-store",
    });
    let data = {};
    try {
      data = (await response.json()) || {};
    } catch {
      data = {};
    }
    return {
      status: response.status,
      ok: response.ok,
      data,
      retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
    };
  } catch (err) {
    if (signal && signal.aborted) throw err;
    throw new NetworkError(controller.signal.aborted ? "The server took too long to answer." : "Cannot reach the server.");
  } finally {
    clearTimeout(timer);
    if (signal) signal.removeEventListener("abort", forward);
  }
}

const jobPath = (kind, id) => `/${kind}/${encodeURIComponent(id)}`;

export const api = {
  generate: (body) => request("POST", "/generate", { body, timeout: 60000 }),
  status: (id, query, opts) => request("GET", jobPath("status", id) + query, opts),
  result: (id) => request("GET", jobPath("result", id)),
  cancel: (id) => request("POST", jobPath("cancel", id), { body: {} }),
  workflows: () => request("GET", "/workflows", { timeout: 5000 }),
  health: () => request("GET", "/health", { timeout: 5000 }),
};

/** A promise that resolves after `ms`, or early when `signal` aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    }
    if (signal) signal.addEventListener("abort", done, { once: true });
  });
}

// Browsers open at most six HTTP/1.1 connections per host. Long-polls hold one
// each, so only a few jobs long-poll at a time; the others poll briefly and
// leave room for POST /generate and the rest.
const longPollSlots = { free: 3 };

/**
 * Follows one job's status until it is final.
 *
 * Plain polling every `interval` ms; once a response carried a `version`, every
 * request is a long-poll (`?wait=&since=`). A long-poll answered with a newer
 * version is followed at once; a server that answers at once with nothing new,
 * three times running, is taken not to long-poll, and is polled every `interval`
 * ms (one quick answer can be a hiccup: a scheduler whose copy went stale).
 * HTTP 5xx and network errors are retried with exponential backoff.
 *
 * Callbacks: onUpdate(state) for every new state (the last one final),
 * onTrouble({message, retryIn}) while retrying and onTrouble(null) once
 * answers come again, onGone(kind) when the server no longer knows the job
 * ("unknown" for 404, "expired" for 410). `startedAt` (ms) is when the job was
 * submitted: a 404 soon after is the scheduler not having heard of it yet.
 */
export class JobWatcher {
  constructor(id, { interval = 1500, wait = 20, startedAt = Date.now(), onUpdate, onTrouble, onGone }) {
    this.id = id;
    this.interval = interval;
    this.wait = wait;
    this.onUpdate = onUpdate;
    this.onTrouble = onTrouble;
    this.onGone = onGone;
    this.stopped = false;
    this.longPoll = true; // until the server shows it ignores ?wait
    this.quickAnswers = 0; // long-polls answered at once with nothing new, in a row
    this.startedAt = startedAt;
    this.wake = new AbortController();
  }

  start() {
    this.loop().catch((err) => console.error("t2i: watcher", this.id, err));
    return this;
  }

  stop() {
    this.stopped = true;
    this.wake.abort();
  }

  /** Ask again now (after a cancel, say), cutting short a wait or a long-poll. */
  poke() {
    const wake = this.wake;
    this.wake = new AbortController();
    wake.abort();
  }

  async loop() {
    const backoff = new Backoff(1500, 30000);
    let since = null;
    let troubled = false;
    while (!this.stopped) {
      const wake = this.wake;
      const useWait = since !== null && this.longPoll && longPollSlots.free > 0;
      const query = useWait ? `?wait=${this.wait}&since=${since}` : "";
      const started = performance.now();
      let answer;
      if (useWait) longPollSlots.free -= 1;
      try {
        answer = await api.status(this.id, query, {
          signal: wake.signal,
          timeout: useWait ? (this.wait + 15) * 1000 : 15000,
        });
      } catch (err) {
        if (this.stopped) return;
        if (wake.signal.aborted) continue; // poked: ask again at once
        const retryIn = backoff.next();
        troubled = true;
        this.onTrouble({ message: err.message, retryIn });
        await sleep(retryIn, this.wake.signal);
        continue;
      } finally {
        if (useWait) longPollSlots.free += 1;
      }
      if (this.stopped) return;
      const elapsed = performance.now() - started;
      const { status, data } = answer;

      if (status === 200) {
        backoff.reset();
        if (troubled) {
          troubled = false;
          this.onTrouble(null);
        }
        const version = typeof data.version === "number" ? data.version : null;
        const newer = since === null || version === null || version > since;
        if (isFinal(data.status)) {
          this.stopped = true;
          this.onUpdate(await this.finalResult(data));
          return;
        }
        if (newer) this.onUpdate(data);
        if (useWait) {
          this.quickAnswers = !newer && elapsed < 1000 ? this.quickAnswers + 1 : 0;
          if (this.quickAnswers >= 3) this.longPoll = false;
        }
        since = version;
        const followAtOnce = useWait && (newer || elapsed >= 1000);
        if (!followAtOnce) await sleep(this.interval, this.wake.signal);
        continue;
      }

      if (status === 410 || (status === 404 && Date.now() - this.startedAt > 10000)) {
        this.stopped = true;
        this.onGone(status === 410 ? "expired" : "unknown");
        return;
      }
      if (status === 404) {
        // Just submitted: the scheduler may not have heard of it yet.
        await sleep(this.interval, this.wake.signal);
        continue;
      }
      // 502/503 (the job's worker is unreachable) and anything else: retry.
      const retryIn = Math.max(backoff.next(), afterRetryAfter(answer.retryAfter));
      troubled = true;
      this.onTrouble({ message: data.error || `The server answered ${status}.`, retryIn });
      await sleep(retryIn, this.wake.signal);
    }
  }

  /**
   * The final state. /status holds the image URLs; GET /result is asked only for a completed
   * job whose status names no image and does not say it expired (an older server).
   */
  async finalResult(state) {
    const hasImage = state.image_url || (state.image_urls || []).length || state.image_expired;
    if (state.status !== "completed" || hasImage) return state;
    try {
      const answer = await api.result(this.id);
      if (answer.status === 200) return { ...state, ...answer.data, status: state.status };
    } catch {
      // Nothing more to learn now: the job is done, without an image to show.
    }
    return state;
  }
}
