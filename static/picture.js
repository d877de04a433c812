// A picture for a workflow's image parameter (img2img's `image`): a drop zone with a file picker
// (a button, so the keyboard reaches it), then a preview with the file's name, size and pixels,
// Replace and Remove. The file is read with FileReader into a data: URL and checked here first —
// PNG, JPEG or WebP by its first bytes (as the server checks: not by its name), within the
// workflow's max_bytes and max_pixels — with a plain sentence when it does not fit; the server
// checks again. Pictures live in this page's memory only: too big for localStorage.

const TYPES = { "image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP" };
export const ACCEPT = Object.keys(TYPES).join(",");

let fieldCount = 0;

/** The picture type `bytes` (the file's first bytes) start like, or null. */
export function sniff(bytes) {
  const b = bytes;
  const ascii = (from, to) => String.fromCharCode(...b.slice(from, to));
  if (b.length >= 8 && [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((v, i) => b[i] === v)) return "image/png";
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
  if (b.length >= 12 && ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "image/webp";
  return null;
}

/** "812 bytes", "9.5 KB", "8 MB" (1 KB = 1024 bytes). */
export function formatBytes(n) {
  if (!Number.isFinite(n) || n < 0) return "";
  if (n < 1024) return `${n} ${n === 1 ? "byte" : "bytes"}`;
  const units = ["KB", "MB", "GB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const shown = value < 10 ? Math.round(value * 10) / 10 : Math.round(value);
  return `${shown.toLocaleString()} ${units[unit]}`;
}

/** A pixel cap in words: "4.2 megapixels (2048×2048)". */
export function pixelsText(max) {
  const mega = max >= 1e6 ? `${(Math.round(max / 1e5) / 10).toLocaleString()} megapixels` : `${max.toLocaleString()} pixels`;
  const side = Math.sqrt(max);
  return Number.isInteger(side) ? `${mega} (${side}×${side})` : mega;
}

/** What a workflow's image parameter takes, in one line. */
export function limitsText(spec = {}) {
  const limits = [spec.max_bytes ? formatBytes(spec.max_bytes) : null,
    spec.max_pixels ? pixelsText(spec.max_pixels) : null].filter(Boolean);
  return `PNG, JPEG or WebP${limits.length ? `, up to ${limits.join(" and ")}` : ""}.`;
}

const quoted = (name) => `“${name || "The file"}”`;

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function pixelSize(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  return { width: img.naturalWidth, height: img.naturalHeight };
}

/**
 * A File as a picture the server will take: {picture: {url, name, size, type, width, height}}
 * (`url` a base64 data: URL of the sniffed type), or {error} in plain words.
 */
export async function readPicture(file, spec = {}) {
  const name = quoted(file.name);
  if (!file.size) return { error: `${name} is empty. Choose a picture.` };
  if (spec.max_bytes && file.size > spec.max_bytes) {
    return { error: `${name} is ${formatBytes(file.size)}; pictures can be up to ${formatBytes(spec.max_bytes)} `
      + "here. Choose a smaller one." };
  }
  const type = sniff(new Uint8Array(await file.slice(0, 16).arrayBuffer()));
  if (!type) return { error: `${name} is not a picture this server takes: choose a PNG, JPEG or WebP image.` };
  const read = await readAsDataUrl(file);
  const url = `data:${type};base64,${read.slice(read.indexOf(",") + 1)}`;
  let size;
  try {
    size = await pixelSize(url);
  } catch {
    return { error: `${name} could not be read as a ${TYPES[type]} picture: it may be damaged. Choose another one.` };
  }
  if (spec.max_pixels && size.width * size.height > spec.max_pixels) {
    return { error: `${name} is ${size.width}×${size.height} pixels; pictures can be up to ${pixelsText(spec.max_pixels)} `
      + "here. Choose a smaller one." };
  }
  return { picture: { url, name: file.name || "picture", size: file.size, type, ...size } };
}

/** Whether a picture held for one workflow fits another's limits: null, or why not. */
export function misfit(picture, spec = {}) {
  if (spec.max_bytes && picture.size > spec.max_bytes) {
    return `${quoted(picture.name)} is ${formatBytes(picture.size)}; this workflow takes pictures of up to `
      + `${formatBytes(spec.max_bytes)}. Choose a smaller one.`;
  }
  if (spec.max_pixels && picture.width * picture.height > spec.max_pixels) {
    return `${quoted(picture.name)} is ${picture.width}×${picture.height} pixels; this workflow takes pictures of up to `
      + `${pixelsText(spec.max_pixels)}. Choose a smaller one.`;
  }
  return null;
}

/** Why a picture asked for is not here: {name, size, why: "reload" | "held"} as words. */
export function missingText(missing) {
  const name = quoted(missing.name);
  return missing.why === "held"
    ? `This page no longer holds ${name}, the picture to start from (pictures are not kept across a reload). `
      + "Choose it again."
    : `${name} was not kept across the reload: pictures are too big to keep in this browser. Choose it again.`;
}

/**
 * One image parameter's field, from the #picture-template. `onChange(picture | null)` when a
 * picture is taken or removed; `announce(text)` speaks to screen readers.
 */
export class PictureField {
  constructor(template, { name, spec, id, label, picture = null, missing = null, onChange, announce }) {
    this.name = name;
    this.spec = spec;
    this.picture = picture;
    this.missing = missing;
    this.onChange = onChange;
    this.announce = announce;
    this.reading = null;
    this.token = 0;
    const el = template.content.firstElementChild.cloneNode(true);
    this.el = el;
    const $ = (selector) => el.querySelector(selector);
    this.parts = {
      label: $(".label"),
      zone: $(".dropzone"),
      empty: $(".drop-empty"),
      readingText: $(".drop-reading"),
      filled: $(".drop-filled"),
      preview: $(".drop-preview"),
      fileName: $(".file-name"),
      fileMeta: $(".file-meta"),
      choose: $("button.choose"),
      replace: $("button.replace"),
      clear: $("button.clear"),
      input: $("input.file"),
      hint: $(".hint"),
      note: $(".picture-note"),
      error: $(".error"),
    };
    const p = this.parts;
    const n = ++fieldCount;
    el.dataset.field = name;
    p.label.id = `${id}-label`;
    p.label.textContent = label;
    el.setAttribute("aria-labelledby", p.label.id);
    p.input.id = id;
    p.input.accept = ACCEPT;
    p.input.setAttribute("aria-labelledby", p.label.id);
    p.hint.id = `${id}-hint`;
    p.hint.textContent = limitsText(spec);
    p.note.id = `${id}-note`;
    p.error.id = `${id}-error`;
    p.fileName.id = `${id}-file-${n}`;
    const about = `${p.hint.id} ${p.note.id} ${p.error.id}`;
    p.choose.setAttribute("aria-describedby", about);
    p.replace.setAttribute("aria-describedby", `${p.fileName.id} ${about}`);
    p.clear.setAttribute("aria-describedby", p.fileName.id);

    p.choose.addEventListener("click", () => p.input.click());
    p.replace.addEventListener("click", () => p.input.click());
    p.clear.addEventListener("click", () => this.clear());
    // A click anywhere on the empty zone opens the picker too (the button is the keyboard's way).
    p.empty.addEventListener("click", (event) => {
      if (event.target !== p.choose) p.input.click();
    });
    p.input.addEventListener("change", () => {
      const file = p.input.files && p.input.files[0];
      p.input.value = ""; // the same file chosen again is read again
      if (file) this.take(file);
    });
    p.zone.addEventListener("dragenter", (event) => this.dragOver(event));
    p.zone.addEventListener("dragover", (event) => this.dragOver(event));
    p.zone.addEventListener("dragleave", (event) => {
      if (!p.zone.contains(event.relatedTarget)) p.zone.classList.remove("dragging");
    });
    p.zone.addEventListener("drop", (event) => {
      p.zone.classList.remove("dragging");
      const file = filesOf(event)[0];
      if (!file) return;
      event.preventDefault();
      event.stopPropagation();
      this.take(file);
    });
    this.render();
  }

  dragOver(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    this.parts.zone.classList.add("dragging");
  }

  /** Read and check a file; a file that does not fit leaves the picture held before as it was. */
  async take(file) {
    const token = ++this.token;
    const hadFocus = this.el.contains(document.activeElement);
    this.clearError();
    this.reading = file.name || "the file";
    this.render();
    let result;
    try {
      result = await readPicture(file, this.spec);
    } catch {
      result = { error: `${quoted(file.name)} could not be read. Try again, or choose another picture.` };
    }
    if (token !== this.token) return; // another file came meanwhile
    this.reading = null;
    if (result.error) {
      this.render();
      this.showError(result.error);
      this.announce(result.error);
    } else {
      this.picture = result.picture;
      this.missing = null;
      this.render();
      const p = this.picture;
      this.onChange(p);
      this.announce(`Picture ${p.name} added: ${p.width}×${p.height} pixels, ${formatBytes(p.size)}.`);
    }
    if (hadFocus && !isShown(document.activeElement)) this.focus();
  }

  clear() {
    this.token += 1;
    this.reading = null;
    this.picture = null;
    this.missing = null;
    this.clearError();
    this.render();
    this.onChange(null);
    this.announce("Picture removed.");
    this.focus();
  }

  render() {
    const p = this.parts;
    const picture = this.picture;
    const state = this.reading ? "reading" : picture ? "filled" : "empty";
    p.zone.dataset.state = state;
    p.zone.setAttribute("aria-busy", String(state === "reading"));
    p.empty.hidden = state !== "empty";
    p.readingText.hidden = state !== "reading";
    p.readingText.textContent = this.reading ? `Reading ${quoted(this.reading)}…` : "";
    p.filled.hidden = state !== "filled";
    if (picture) {
      p.preview.src = picture.url;
      p.preview.alt = `Preview of ${picture.name}`;
      p.fileName.textContent = picture.name;
      p.fileName.title = picture.name;
      p.fileMeta.textContent = `${picture.width}×${picture.height} · ${formatBytes(picture.size)} · ${TYPES[picture.type] || ""}`
        .replace(/ · $/, "");
    } else {
      p.preview.removeAttribute("src");
      p.fileName.textContent = "";
    }
    const note = !picture && this.missing ? missingText(this.missing) : "";
    p.note.textContent = note;
    p.note.hidden = !note;
  }

  /** Where focus goes: the visible button. */
  focus() {
    (this.picture ? this.parts.replace : this.parts.choose).focus();
  }

  showError(message) {
    const p = this.parts;
    p.error.textContent = message;
    p.error.hidden = false;
    p.zone.classList.add("invalid");
  }

  clearError() {
    this.parts.error.hidden = true;
    this.parts.zone.classList.remove("invalid");
  }
}

function hasFiles(event) {
  return Boolean(event.dataTransfer && [...event.dataTransfer.types].includes("Files"));
}

function filesOf(event) {
  return event.dataTransfer && event.dataTransfer.files ? [...event.dataTransfer.files] : [];
}

function isShown(el) {
  return Boolean(el && el !== document.body && el.getClientRects().length);
}

export { filesOf, hasFiles };
