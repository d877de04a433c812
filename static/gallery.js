// The images made in this browser, kept in localStorage, newest first.

import { api } from "./api.js";
import { downloadImage, fileName, httpUrl } from "./download.js";

const KEY = "t2i.gallery.v1";
const LIMIT = 100;

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

export class Gallery {
  /** `list` is the <ul>, `template` the <template> of one item, `count` shows how many. */
  constructor({ list, template, count, clearButton, empty, onReuse }) {
    this.list = list;
    this.template = template;
    this.count = count;
    this.clearButton = clearButton;
    this.empty = empty;
    this.onReuse = onReuse;
    this.clearButton.addEventListener("click", () => {
      if (confirm("Remove every image from this browser's gallery? The images stay on the servers until they expire.")) {
        write([]);
        this.render();
      }
    });
    // Another tab added or removed something.
    window.addEventListener("storage", (event) => {
      if (event.key === KEY) this.render();
    });
    this.render();
  }

  add(item) {
    const items = read().filter((other) => other.id !== item.id);
    items.unshift(item);
    write(items);
    this.render();
  }

  remove(id) {
    write(read().filter((item) => item.id !== id));
    this.render();
  }

  markExpired(id) {
    const items = read();
    const item = items.find((other) => other.id === id);
    if (item && !item.expired) {
      item.expired = true;
      write(items);
    }
  }

  render() {
    const items = read();
    // A keyboard user on a gallery button keeps their place when another job adds an image.
    const focused = this.list.contains(document.activeElement) ? document.activeElement : null;
    const focusedItem = focused && focused.closest("[data-id]");
    const focusedClass = focused && focused.classList[0];
    this.list.replaceChildren(...items.map((item) => this.renderItem(item)));
    if (focusedItem && focusedClass) {
      const again = this.list.querySelector(
        `[data-id="${CSS.escape(focusedItem.dataset.id)}"] .${CSS.escape(focusedClass)}`);
      if (again) again.focus();
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
    caption.textContent = item.prompt;
    caption.title = item.prompt;
    meta.textContent = describe(item);
    open.href = item.image_url;
    open.setAttribute("aria-label", `Open full size: ${item.prompt}`);
    if (item.width && item.height) node.style.setProperty("--ratio", `${item.width} / ${item.height}`);
    img.alt = item.prompt;
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
      const { status, data } = await api.status(item.id, "", { timeout: 5000 });
      confirmed = status === 404 || status === 410 || (status === 200 && (!data.image_url || data.image_expired));
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
    open.setAttribute("aria-label", `Expired: ${item.prompt}`);
    node.querySelector("button.download").hidden = true;
    const label = node.querySelector(".expired-label");
    label.textContent = "Expired";
    label.hidden = false;
  }
}

export function describe(item) {
  const parts = [];
  if (item.width && item.height) parts.push(`${item.width}×${item.height}`);
  if (item.steps) parts.push(`${item.steps}\u00a0steps`);
  if (item.seed !== undefined && item.seed !== null) parts.push(`seed\u00a0${item.seed}`);
  if (item.created_at) parts.push(new Date(item.created_at * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }));
  return parts.join(" · ");
}
