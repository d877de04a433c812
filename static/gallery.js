// The one image grid: every image made in this browser or listed by the server for this
// client (GET /jobs), once, newest first, kept in localStorage (in memory too, so a full or
// disabled storage loses nothing on this page). A job of a batch gives one item per image
// (`job_id`, `index` of `count`; the first keeps the job's id), each with its own Open and
// Download. What is removed here stays removed: the server's list does not bring it back.

import { api } from "./api.js";
import { downloadImage, fileName, httpUrl } from "./download.js";
import { metaParts, renderMeta, WORDS } from "./status.js";

const KEY = "t2i.gallery.v1";
const REMOVED_KEY = "t2i.gallery.removed.v1"; // {before: epoch seconds, ids: [...]}
const LIMIT = 100;
const REMOVED_LIMIT = 500;

function read() {
  try {
    const items = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(items) ? items.filter((item) => item && item.id && httpUrl(item.image_url)) : [];
  } catch {
    return [];
  }
}

function write(items) {
  try {
    localStorage.setItem(KEY, JSON.stringify(items.slice(0, LIMIT)));
  } catch {
    // Storage full or disabled: the gallery just does not persist.
  }
}

/** What was removed from the gallery here: ids, and "everything finished before" a Clear. */
function readRemoved() {
  try {
    const data = JSON.parse(localStorage.getItem(REMOVED_KEY) || "null");
    return { before: Number(data && data.before) || 0, ids: Array.isArray(data && data.ids) ? data.ids : [] };
  } catch {
    return { before: 0, ids: [] };
  }
}

function writeRemoved(removed) {
  try {
    localStorage.setItem(REMOVED_KEY, JSON.stringify({ before: removed.before, ids: removed.ids.slice(-REMOVED_LIMIT) }));
  } catch {
    // Not kept: the next visit may list a removed image again.
  }
}

/** The words for an item: its prompt, or that it was made elsewhere (the server does not say). */
function captionOf(item) {
  return item.prompt || WORDS.imageElsewhere;
}

/** "(image 2 of 3)" for an image of a batch, else nothing. */
function ofBatch(item) {
  return item.count > 1 ? ` (image ${item.index + 1} of ${item.count})` : "";
}

export class Gallery {
  /** `list` is the <ul>, `template` the <template> of one item, `count` shows how many. */
  constructor({ list, template, count, clearButton, empty, onReuse }) {
    this.list = list;
    this.template = template;
    this.count = count;
    this.clearButton = clearButton;
    this.empty = empty;
    this.onReuse = onReuse;
    this.items = read();
    this.removed = readRemoved();
    this.clearButton.addEventListener("click", () => {
      if (confirm("Remove every image from this browser's gallery? The images stay on the servers until they expire.")) {
        this.forgetAll(this.items.map((item) => item.id), { all: true });
        this.items = [];
        write(this.items);
        this.render();
      }
    });
    // Another tab added or removed something.
    window.addEventListener("storage", (event) => {
      if (event.key === KEY) {
        this.items = read();
        this.render();
      } else if (event.key === REMOVED_KEY) {
        this.removed = readRemoved();
      }
    });
    this.render();
  }

  /** Add (or move to the front) an image; returns its element. */
  add(item) {
    return this.addAll([item])[0] || null;
  }

  /** Add (or move to the front) the images of one job, in their order; returns their elements. */
  addAll(items) {
    const ids = new Set(items.map((item) => item.id));
    this.items = [...items, ...this.items.filter((other) => !ids.has(other.id))].slice(0, LIMIT);
    write(this.items);
    this.render();
    return items.map((item) => this.list.querySelector(`[data-id="${CSS.escape(item.id)}"]`)).filter(Boolean);
  }

  /**
   * Images the server lists for this client (finished in another tab or on another device),
   * merged in by date; those already here, or removed here, are left as they are.
   */
  merge(items) {
    const have = new Set(this.items.map((item) => item.id));
    const removed = new Set(this.removed.ids);
    const fresh = items.filter((item) => item && item.id && httpUrl(item.image_url) && !have.has(item.id)
      && !removed.has(item.id) && !(Number(item.created_at) <= this.removed.before));
    if (!fresh.length) return [];
    this.items = [...this.items, ...fresh]
      .sort((a, b) => (Number(b.created_at) || 0) - (Number(a.created_at) || 0))
      .slice(0, LIMIT);
    write(this.items);
    this.render();
    return fresh.map((item) => item.id);
  }

  has(id) {
    return this.items.some((item) => item.id === id);
  }

  remove(id) {
    this.items = this.items.filter((item) => item.id !== id);
    this.forgetAll([id]);
    write(this.items);
    this.render();
  }

  /** Removed here: not merged back from the server's list (a Clear also drops everything older). */
  forgetAll(ids, { all = false } = {}) {
    this.removed = readRemoved();
    this.removed.ids = [...this.removed.ids.filter((id) => !ids.includes(id)), ...ids];
    if (all) this.removed.before = Math.max(this.removed.before, Date.now() / 1000);
    writeRemoved(this.removed);
  }

  markExpired(id) {
    const item = this.items.find((other) => other.id === id);
    if (item && !item.expired) {
      item.expired = true;
      write(this.items);
    }
  }

  /**
   * Bring the list in line with the items, keyed by id: existing elements stay where they are
   * (their images are not asked again, a focused button keeps its focus), new ones are inserted.
   */
  render() {
    const items = this.items;
    const existing = new Map([...this.list.children].map((node) => [node.dataset.id, node]));
    const wanted = new Set(items.map((item) => item.id));
    for (const [id, node] of existing) {
      if (!wanted.has(id)) node.remove();
    }
    let cursor = this.list.firstElementChild;
    for (const item of items) {
      let node = existing.get(item.id);
      if (!node || (item.expired && !node.classList.contains("expired"))) {
        const fresh = this.renderItem(item);
        if (node) node.replaceWith(fresh);
        node = fresh;
      }
      if (node === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        this.list.insertBefore(node, cursor);
      }
    }
    this.count.textContent = items.length ? `(${items.length})` : "";
    this.clearButton.hidden = items.length === 0;
    this.empty.hidden = items.length > 0;
  }

  renderItem(item) {
    const node = this.template.content.firstElementChild.cloneNode(true);
    const img = node.querySelector("img");
    const open = node.querySelector("a.open");
    const caption = node.querySelector(".caption");
    const meta = node.querySelector(".meta");
    node.dataset.id = item.id;
    caption.textContent = captionOf(item);
    caption.title = captionOf(item);
    caption.classList.toggle("unknown", !item.prompt);
    renderMeta(meta, describe(item));
    open.href = item.image_url;
    open.setAttribute("aria-label", `Open full size: ${captionOf(item)}${ofBatch(item)}`);
    img.alt = captionOf(item) + ofBatch(item);
    if (item.expired) {
      this.showExpired(node, item);
    } else {
      img.addEventListener("error", () => this.onImageError(node, item), { once: true });
      img.src = item.image_url;
    }
    const captionId = `gallery-caption-${item.id}`;
    caption.id = captionId;
    for (const button of node.querySelectorAll("button")) button.setAttribute("aria-describedby", captionId);
    node.querySelector("button.download").addEventListener("click", (event) =>
      downloadImage(event.currentTarget, item.image_url, fileName(item)));
    node.querySelector("button.reuse").addEventListener("click", () => this.onReuse(item));
    node.querySelector("button.reuse").hidden = !item.prompt; // nothing to reuse without the prompt
    node.querySelector("button.remove").addEventListener("click", () => {
      const next = node.nextElementSibling || node.previousElementSibling;
      this.remove(item.id);
      const target = next && this.list.querySelector(`[data-id="${CSS.escape(next.dataset.id)}"] button.remove`);
      (target || this.list.closest("section")).focus();
    });
    return node;
  }

  /**
   * The image did not load. Expired for good only when the server says so (the job is gone,
   * or its image expired); an outage (5xx, no network) is shown as such and tried again later.
   */
  async onImageError(node, item) {
    this.showExpired(node, item);
    let confirmed = false;
    try {
      const { status, data } = await api.status(item.job_id || item.id, "", { timeout: 5000 });
      const urls = Array.isArray(data.image_urls) ? data.image_urls : [data.image_url].filter(Boolean);
      confirmed = status === 404 || status === 410 || (status === 200 && (!urls.length || data.image_expired));
    } catch {
      // Cannot ask now: not a reason to forget the image.
    }
    if (confirmed) {
      this.markExpired(item.id);
    } else {
      node.querySelector(".expired-label").textContent = "Image unavailable right now";
    }
  }

  showExpired(node, item) {
    node.classList.add("expired");
    const img = node.querySelector("img");
    img.removeAttribute("src");
    img.hidden = true;
    const open = node.querySelector("a.open");
    open.removeAttribute("href");
    open.setAttribute("aria-disabled", "true");
    open.setAttribute("aria-label", `Expired: ${captionOf(item)}${ofBatch(item)}`);
    node.querySelector("button.download").hidden = true;
    const label = node.querySelector(".expired-label");
    label.textContent = "Expired";
    label.hidden = false;
  }
}

/** An image's settings line: which of a batch, size, steps, seed, how long it took, when. */
export function describe(item) {
  const ofMany = item.count > 1 ? `${item.index + 1} of ${item.count}` : null;
  return metaParts({ ...item, worker: null, when: item.created_at, ofMany });
}
