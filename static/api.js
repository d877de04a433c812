// Talking to the scheduler: JSON requests (with the client's key), backoff, and a per-job
// status watcher.
//
// Same-origin paths only. Image and preview URLs point at workers and are
// loaded by <img> (and fetch for downloads) elsewhere, never through here, so
// the key goes to the scheduler only.

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

/**
 * How long to wait before asking again after a 503 or 429, in ms: the server's Retry-After when it
 * gave one (it says when a place is expected to free up; stretching it with a growing backoff of our
 * own would leave GPUs idle while this job waits), else `backoff`'s next wait.
 */
export function retryWait(retryAfter, backoff, random = Math.random) {
  return retryAfter == null ? backoff.next() : afterRetryAfter(retryAfter, random);
}

/** Seconds from a Retry-After header (seconds or HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

// The key: auth.js plugs in `key()` (the one kept in this browser) and `unauthorized()`
// (asks the person for a key after a 401; resolves to the new key, or null when there is none).
const auth = { key: () => null, unauthorized: async () => null };

export function setAuth(hooks) {
  Object.assign(auth, hooks);
}

/**
 * One JSON request. Resolves to {status, ok, data, retryAfter} for any HTTP
 * answer (data is {} when the body is not JSON); rejects with NetworkError when
 * there was none, or with the caller's AbortError when `signal` aborted it.
 *
 * Sends `Authorization: Bearer <key>` when this browser has a key. A 401 asks for a key
 * (auth.unauthorized) and sends the request again with the new one; `key` sends that key
 * instead, once, without asking (the key dialog checks a key this way).
 */
export async function request(method, path, { key, ...options } = {}) {
  for (;;) {
    const used = key !== undefined ? key : auth.key();
    const answer = await send(method, path, used, options);
    if (answer.status !== 401 || key !== undefined) return answer;
    const fresh = await untilAborted(auth.unauthorized({ used, data: answer.data }), options.signal);
    if (!fresh || fresh === used) return answer;
  }
}

/** `promise`, or an AbortError as soon as `signal` aborts (a stopped watcher does not wait for the key). */
function untilAborted(promise, signal) {
  if (!signal) return promise;
  const aborted = () => new DOMException("Aborted", "AbortError");
  if (signal.aborted) return Promise.reject(aborted());
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(aborted());
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

async function send(method, path, key, { body, signal, timeout = 15000 } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  const forward = () => controller.abort();
  if (signal) signal.addEventListener("abort", forward, { once: true });
  try {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (key) headers.Authorization = `Bearer ${key}`;
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
    } catch (err) {
      // Aborted while the body was on its way: no answer (not an empty one).
      if (controller.signal.aborted) throw err;
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
  cancelAll: () => request("POST", "/cancel", { body: {} }),
  /** This client's jobs, newest first: `status` "pending,running" or the like, `before` a cursor. */
  jobs: ({ limit = 50, status, before } = {}, opts) => {
    const query = new URLSearchParams({ limit: String(limit) });
    if (status) query.set("status", status);
    if (before !== undefined && before !== null) query.set("before", String(before));
    return request("GET", `/jobs?${query}`, opts);
  },
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

// Browsers open at most six HTTP/1.1 connections per host, for all the tabs of a profile.
// Long-polls hold one each, so only three jobs long-poll at a time across every tab of this
// page (Web Locks, where the browser has them: secure origins such as https and localhost),
// else three per tab and only while the tab is in view; the others poll briefly and leave
// room for POST /generate and the rest.
const LONG_POLLS = 3;
const localSlots = { free: LONG_POLLS };

/** A long-poll slot: resolves to a release function, or null when none is free now. */
async function takeSlot() {
  if (localSlots.free <= 0) return null;
  localSlots.free -= 1;
  const local = () => {
    localSlots.free += 1;
  };
  if (!(navigator.locks && navigator.locks.request)) {
    if (document.visibilityState === "visible") return local;
    local();
    return null;
  }
  for (let i = 0; i < LONG_POLLS; i += 1) {
    let release;
    const held = new Promise((resolve) => {
      release = resolve;
    });
    const got = await new Promise((resolve) => {
      navigator.locks.request(`t2i.long-poll.${i}`, { ifAvailable: true }, (lock) => {
        resolve(Boolean(lock));
        return lock ? held : undefined;
      }).catch(() => resolve(false));
    });
    if (got) {
      return () => {
        release();
        local();
      };
    }
  }
  local();
  return null;
}

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
      const release = since !== null && this.longPoll ? await takeSlot() : null;
      if (this.stopped) {
        if (release) release();
        return;
      }
      const useWait = Boolean(release);
      const query = useWait ? `?wait=${this.wait}&since=${since}` : "";
      const started = performance.now();
      let answer;
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
        if (release) release();
      }
      if (this.stopped) return;
      const elapsed = performance.now() - started;
      const { status, data } = answer;

      if (status === 200 && typeof data.status !== "string") {
        // Not a job's state (a proxy's page, say): asked again in a moment.
        await sleep(this.interval, this.wake.signal);
        continue;
      }
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
      this.onTrouble({ message: data.error || `The server answered ${status}.`, status, retryIn });
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
