// This client's jobs in every tab and on every device: the server's list (GET /jobs, the
// truth) read on load, when the tab comes back into view and every ~30 s, and a cache in
// localStorage of what this browser submitted (prompt and settings, shown at once in its
// other tabs, and the words for jobs of a tab that was closed before they ended).

import { api, NetworkError } from "./api.js";

const CACHE_KEY = "t2i.jobs.v1";
const CACHE_LIMIT = 200;
const CACHE_AGE_MS = 24 * 3600 * 1000; // an entry older than this is dropped unread
const UNFINISHED_PAGES = 4; // of 100: far above any client's max_jobs
const FIRST_COMPLETED = [50, 50]; // on load: two pages of finished images for the gallery
const LATER_COMPLETED = [20]; // then: the newest

// --- the cache: id -> {id, worker, job: {prompt, body, params}, at} ---------------------

function readCache() {
  try {
    const items = JSON.parse(localStorage.getItem(CACHE_KEY) || "[]");
    const now = Date.now();
    return Array.isArray(items)
      ? items.filter((item) => item && item.id && item.job && now - (item.at || 0) < CACHE_AGE_MS) : [];
  } catch {
    return [];
  }
}

function writeCache(items) {
  try {
    localStorage.setItem(CACHE_KEY, JSON.stringify(items.slice(-CACHE_LIMIT)));
  } catch {
    // Not kept: the server's list still brings the jobs back, without their words.
  }
}

export const jobCache = {
  /** Every job this browser submitted that had not ended when last seen, oldest first. */
  all: readCache,
  get: (id) => readCache().find((item) => item.id === id) || null,
  put(entry) {
    writeCache([...readCache().filter((item) => item.id !== entry.id), { ...entry, at: entry.at || Date.now() }]);
  },
  remove(id) {
    const items = readCache();
    if (items.some((item) => item.id === id)) writeCache(items.filter((item) => item.id !== id));
  },
  /** `callback()` when another tab changed the cache. */
  watch(callback) {
    window.addEventListener("storage", (event) => {
      if (event.key === CACHE_KEY) callback();
    });
  },
};

// --- the server's list -----------------------------------------------------------------

/**
 * Reads GET /jobs now and then. `onList({unfinished, completed, client})` gets the states
 * (the same objects as GET /status, newest first). A server without /jobs (404, 405) is
 * not asked again: the cache alone is used, as before.
 */
export class JobSync {
  constructor({ interval = 30000, onList }) {
    this.interval = interval;
    this.onList = onList;
    this.supported = true;
    this.timer = null;
    this.running = null;
    this.again = null;
  }

  start() {
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.refresh();
    });
    window.addEventListener("online", () => this.refresh());
    return this.refresh({ first: true });
  }

  /** Read the list now (once at a time; a call meanwhile reads it again right after). */
  refresh({ first = false } = {}) {
    if (this.running) {
      this.again = { first: first || Boolean(this.again && this.again.first) };
      return this.running;
    }
    clearTimeout(this.timer);
    this.running = this.read(first)
      .catch((err) => console.error("t2i: job list", err))
      .finally(() => {
        this.running = null;
        const again = this.again;
        this.again = null;
        if (again) this.refresh(again);
        else this.schedule();
      });
    return this.running;
  }

  /** The next read in about `interval` ms (±20 %, so tabs and devices spread out). */
  schedule() {
    clearTimeout(this.timer);
    if (!this.supported) return;
    this.timer = setTimeout(() => this.refresh(), Math.round(this.interval * (0.8 + 0.4 * Math.random())));
  }

  async read(first) {
    if (!this.supported) return;
    const unfinished = await this.pages("pending,running", Array(UNFINISHED_PAGES).fill(100));
    if (!unfinished) return;
    const completed = await this.pages("completed", first ? FIRST_COMPLETED : LATER_COMPLETED);
    if (!completed) return;
    this.onList({ unfinished: unfinished.jobs, completed: completed.jobs, client: unfinished.client });
  }

  /** Pages of one listing, `sizes` their limits, until `next` is null: {jobs, client}, or null. */
  async pages(status, sizes) {
    const jobs = [];
    let client = null;
    let before = null;
    for (const limit of sizes) {
      let answer;
      try {
        answer = await api.jobs({ limit, status, before });
      } catch (err) {
        if (err instanceof NetworkError) return null; // the next read tries again
        throw err;
      }
      const { status: code, data } = answer;
      if (code === 404 || code === 405) {
        this.supported = false;
        return null;
      }
      if (code !== 200 || !data || !Array.isArray(data.jobs)) return null;
      client = data.client ?? client;
      jobs.push(...data.jobs.filter((job) => job && job.prompt_id));
      before = data.next;
      if (before === null || before === undefined) break;
    }
    return { jobs, client };
  }
}
