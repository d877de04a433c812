// The prompt form, built from GET /workflows: the chosen workflow's parameters with their ranges,
// choices and defaults (the page has none of its own) — numbers, choices, switches and text under
// Advanced, a drop zone for a picture under the prompt when the workflow takes one — Enter to
// submit, characters left where a workflow sets max_length (nothing is cut), a dice for a new
// seed, errors next to the field they are about, and what was typed kept across reloads and
// workflow switches wherever it still applies (pictures are not kept across a reload: too big for
// localStorage; the drop zone says so).

import { filesOf, hasFiles, misfit, PictureField } from "./picture.js";

// Fields written in index.html (there, disabled, before GET /workflows answers); the others are built.
const STATIC = ["negative_prompt", "seed", "steps", "width", "height"];
const STORE_KEY = "t2i.form.v1";
const SEED_MAX = 2 ** 32 - 1; // as the server's own random seeds

// GET /workflows' `type`s (and the short forms worker.yaml uses) -> the kind of field.
const KINDS = { int: "integer", integer: "integer", float: "number", number: "number", string: "string",
  bool: "boolean", boolean: "boolean", enum: "enum", image: "image" };
const LEGACY = { prompt: "string", negative_prompt: "string", seed: "integer", steps: "integer", width: "integer",
  height: "integer" }; // today's six: their type comes from their name
const LABELS = { negative_prompt: "Negative prompt", cfg: "CFG", sampler_name: "Sampler", scheduler: "Scheduler",
  batch_size: "Images", denoise: "Denoise", image: "Start image", ckpt_name: "Checkpoint" };
const TEXT_NAMES = { prompt: "The prompt", negative_prompt: "The negative prompt" };
// Built fields sit numbers first (three to a row), then choices and switches (two), then text (one).
const PLACE = { integer: 0, number: 0, enum: 1, boolean: 1, string: 2 };
const WIDTH = { integer: "third", number: "third", enum: "half", boolean: "half", string: "wide" };

/** Characters as the server counts them (code points, not UTF-16 units). */
export function charCount(text) {
  return [...text].length;
}

/** A random seed within a workflow's range for it. */
export function randomSeed(spec = {}) {
  const low = Math.max(0, spec.min ?? 0);
  const high = Math.min(spec.max ?? SEED_MAX, Number.MAX_SAFE_INTEGER);
  const [a, b] = crypto.getRandomValues(new Uint32Array(2));
  const span = high - low + 1;
  const draw = span > 2 ** 32 ? a * 2 ** 21 + (b >>> 11) : a; // 53 random bits when the range needs them
  return low + (draw % span);
}

/** The kind of field a parameter gets: integer, number, string, boolean, enum or image. */
export function kindOf(name, spec = {}) {
  if (LEGACY[name]) return LEGACY[name];
  if (KINDS[spec.type]) return KINDS[spec.type];
  if (Array.isArray(spec.choices)) return "enum";
  if (typeof spec.default === "boolean") return "boolean";
  if (typeof spec.default === "number") return Number.isInteger(spec.default) ? "integer" : "number";
  return "string";
}

/** A parameter's label: known ones in words, others from their name ("clip_skip" -> "Clip skip"). */
export function labelOf(name) {
  if (LABELS[name]) return LABELS[name];
  const words = name.replace(/_+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

const hasDefault = (spec) => spec.default !== undefined && spec.default !== null;

/** Whether a kept value (as a field holds it: its text, or true/false) fits a field of `spec`. */
function fits(kind, spec, raw) {
  if (kind === "boolean") return typeof raw === "boolean";
  if (typeof raw !== "string") return false;
  if (kind === "enum") {
    if (!Array.isArray(spec.choices)) return true;
    return raw === "" ? !hasDefault(spec) : spec.choices.includes(raw);
  }
  if (kind !== "integer" && kind !== "number") return true; // text: a long one is kept, and said to be too long
  if (raw.trim() === "") return true;
  const value = Number(raw);
  if (!Number.isFinite(value) || (kind === "integer" && !Number.isInteger(value))) return false;
  return !(spec.min !== undefined && value < spec.min) && !(spec.max !== undefined && value > spec.max);
}

/** A decimal field's arrow step: about a hundredth of its range, or any value when its default is off that grid. */
function decimalStep(spec) {
  const span = spec.max - spec.min;
  const step = !Number.isFinite(span) ? 0.1 : span <= 2 ? 0.01 : span <= 20 ? 0.1 : 0.5;
  if (hasDefault(spec) && typeof spec.default === "number") {
    const steps = (spec.default - (spec.min ?? 0)) / step;
    if (Math.abs(steps - Math.round(steps)) > 1e-9) return "any";
  }
  return step;
}

function rangeText(spec) {
  if (spec.min !== undefined && spec.max !== undefined) return `${spec.min}–${spec.max}`;
  if (spec.min !== undefined) return `${spec.min} or more`;
  if (spec.max !== undefined) return `up to ${spec.max}`;
  return "";
}

function make(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key in el && !key.includes("-")) el[key] = value;
    else el.setAttribute(key, value);
  }
  el.append(...children);
  return el;
}

/**
 * One field of the form, as collect(), errors and counters see it. `input` is the control (a
 * picture field has none: `picture` is its PictureField).
 */
class Field {
  constructor({ name, kind, spec = {}, el, input = null, counter = null, picture = null, label }) {
    Object.assign(this, { name, kind, spec, el, input, counter, picture, label });
  }

  showError(message) {
    if (this.picture) {
      this.picture.showError(message);
      return;
    }
    const error = this.el.querySelector(".error");
    error.textContent = message;
    error.hidden = false;
    this.input.setAttribute("aria-invalid", "true");
  }

  clearError() {
    if (this.picture) {
      this.picture.clearError();
      return;
    }
    const error = this.el.querySelector(".error");
    if (error) error.hidden = true;
    this.input.removeAttribute("aria-invalid");
  }

  focus() {
    if (this.picture) this.picture.focus();
    else this.input.focus();
  }

  /** What the field holds, as kept: text, or true/false for a switch. */
  raw() {
    return this.kind === "boolean" ? this.input.checked : this.input.value;
  }

  setRaw(raw) {
    if (this.kind === "boolean") this.input.checked = raw === true;
    else this.input.value = raw;
  }

  /** {value} (undefined: empty, the server's default) or {error} in words. */
  read(touched) {
    const { kind, input } = this;
    if (kind === "boolean") return { value: touched ? input.checked : undefined };
    if (kind === "integer" || kind === "number") {
      const whole = kind === "integer" ? "Enter a whole number." : "Enter a number.";
      if (input.validity.badInput) return { error: whole };
      const raw = input.value.trim();
      if (raw === "") return { value: undefined };
      const value = Number(raw);
      if (!Number.isFinite(value) || (kind === "integer" && !Number.isInteger(value))) return { error: whole };
      return { value };
    }
    const value = input.value;
    const limit = this.spec.max_length;
    const length = charCount(value);
    if (kind === "string" && limit && length > limit) {
      const label = TEXT_NAMES[this.name] || this.label;
      return { error: `${label} has ${length.toLocaleString()} characters; the limit is ${limit.toLocaleString()}. `
        + `Shorten it by ${(length - limit).toLocaleString()}.` };
    }
    return { value: value === "" ? undefined : value };
  }
}

export class GenerateForm {
  /**
   * `onSubmit({prompt, body, params, images, inputs})` gets each accepted submission (`images`:
   * the pictures sent, by parameter; `inputs`: their names and sizes, which may be kept);
   * `announce(text)` speaks to screen readers.
   */
  constructor(form, { onSubmit, announce = () => {} }) {
    this.form = form;
    this.onSubmit = onSubmit;
    this.announce = announce;
    this.catalogue = null;
    this.params = null; // the chosen workflow's parameters; null until GET /workflows answers
    this.values = new Map(); // what was typed or chosen, by field name (kept across switches and reloads)
    this.images = new Map(); // pictures taken, by parameter: in this page's memory only
    this.missing = {}; // pictures asked for that this page does not hold: {name, size, why}
    this.fields = new Map(); // the chosen workflow's fields, by parameter (the prompt's too)
    this.advanced = form.querySelector("details");
    this.grid = form.querySelector(".advanced-grid");
    this.pictureBox = form.querySelector("#picture-fields");
    this.pictureTemplate = document.getElementById("picture-template");
    this.workflowSelect = form.elements.workflow;
    this.formError = form.querySelector(".form-error");
    this.settingsNote = form.querySelector(".settings-note");
    this.fixed = {
      prompt: new Field({ name: "prompt", kind: "string", el: this.field("prompt"), input: form.elements.prompt,
        counter: form.querySelector("#prompt-counter"), label: "Prompt" }),
      workflow: new Field({ name: "workflow", kind: "enum", el: this.field("workflow"), input: this.workflowSelect,
        label: "Workflow" }),
    };
    this.restore();
    this.applyParams(null);
    if (coarsePointer()) {
      // The Enter hint is not shown on a touch screen: not read out either.
      const prompt = form.elements.prompt;
      prompt.setAttribute("aria-describedby", prompt.getAttribute("aria-describedby").replace("prompt-hint ", ""));
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    form.elements.prompt.addEventListener("keydown", (event) => {
      // On a touch screen Enter is a new line, as its keyboard shows; Generate submits.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !coarsePointer()) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("input", (event) => {
      const name = event.target.name;
      if (name && name !== "workflow") {
        const field = this.lookup(name);
        this.values.set(name, field ? field.raw() : event.target.value);
        this.clearError(name);
        this.updateCounter(name);
      }
      this.save();
    });
    this.advanced.addEventListener("toggle", () => this.save());
    this.workflowSelect.addEventListener("change", () => {
      this.applyWorkflow();
      this.save();
    });
    form.querySelector("#seed-dice").addEventListener("click", () => this.newSeed());
    // A picture dropped anywhere on the page (not only on its zone) goes to the first picture field,
    // rather than the browser leaving the page to show the file.
    window.addEventListener("dragover", (event) => {
      if (hasFiles(event) && this.firstPicture()) event.preventDefault();
    });
    window.addEventListener("drop", (event) => {
      const field = this.firstPicture();
      const file = filesOf(event)[0];
      if (!field || !file) return;
      event.preventDefault();
      field.picture.take(file);
    });
  }

  /** Use the server's workflow catalogue (GET /workflows). */
  setCatalogue(catalogue) {
    const names = Object.keys(catalogue.workflows || {});
    if (!names.length) return false;
    this.catalogue = catalogue;
    const select = this.workflowSelect;
    const chosen = select.value || this.savedWorkflow;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    select.value = names.includes(chosen) ? chosen
      : names.includes(catalogue.default_workflow) ? catalogue.default_workflow : names[0];
    this.field("workflow").hidden = names.length < 2;
    this.showSettingsNote(null);
    this.applyWorkflow();
    return true;
  }

  paramsOf(workflow) {
    const entry = this.catalogue && this.catalogue.workflows[workflow];
    return (entry && entry.params) || {};
  }

  applyWorkflow() {
    this.applyParams(this.paramsOf(this.workflowSelect.value));
  }

  /**
   * Show the fields of a workflow's parameters, with its ranges, choices and defaults; what was
   * typed before stays where it still fits. `null`: not known yet (the fields of index.html,
   * disabled).
   */
  applyParams(params) {
    this.params = params;
    const focused = document.activeElement && this.form.contains(document.activeElement) ? document.activeElement.id : null;
    this.fields = new Map([["prompt", this.fixed.prompt]]);
    if (params && params.prompt) this.fixed.prompt.spec = params.prompt;
    for (const name of STATIC) this.applyStatic(name, params);
    for (const el of this.form.querySelectorAll("[data-built]")) el.remove();
    const built = Object.entries(params || {})
      .map(([name, spec]) => ({ name, spec: spec || {}, kind: kindOf(name, spec || {}) }))
      .filter(({ name }) => name !== "prompt" && !STATIC.includes(name));
    for (const { name, spec } of built.filter(({ kind }) => kind === "image")) this.buildPicture(name, spec);
    let place = 0;
    built.filter(({ kind }) => kind !== "image")
      .sort((a, b) => PLACE[a.kind] - PLACE[b.kind]) // stable: the catalogue's order within each kind
      .forEach(({ name, spec, kind }) => {
        const field = this.buildField(name, spec, kind);
        if (PLACE[kind] !== place) field.el.classList.add("row-start"); // choices, switches, text: a row of their own
        place = PLACE[kind];
      });
    for (const name of this.fields.keys()) this.updateCounter(name);
    if (focused && !this.form.contains(document.activeElement)) {
      const again = document.getElementById(focused);
      if (again) again.focus();
    }
  }

  /** One of the fields written in index.html: shown when the workflow has it, with its range and value. */
  applyStatic(name, params) {
    const spec = params ? params[name] : {};
    const el = this.field(name);
    const input = this.form.elements[name];
    el.hidden = !spec;
    input.disabled = !params || !spec;
    if (name === "seed") this.form.querySelector("#seed-dice").disabled = input.disabled;
    const kept = this.values.get(name);
    if (!spec) return;
    const kind = LEGACY[name];
    const counter = this.form.querySelector(`#${name}-counter`);
    const field = new Field({ name, kind, spec, el, input, counter, label: labelOf(name) });
    if (params) this.fields.set(name, field);
    if (kind === "integer") {
      input.min = spec.min ?? "";
      input.max = spec.max ?? "";
      const hint = this.form.querySelector(`#${name}-hint`);
      if (hint && name !== "seed") hint.textContent = rangeText(spec);
    }
    if (kept !== undefined && (!params || fits(kind, spec, kept))) input.value = kept;
    else input.value = params && name !== "seed" ? spec.default ?? "" : "";
  }

  /** An id for a built field: its name, unless the page already uses that id. */
  idFor(name) {
    return document.getElementById(name) ? `param-${name}` : name;
  }

  /** A field built for a parameter the page does not write itself (cfg, sampler_name, denoise …). */
  buildField(name, spec, kind) {
    const id = this.idFor(name);
    const label = labelOf(name);
    const error = make("p", { className: "error", id: `${id}-error`, hidden: true });
    const el = make("div", { className: `field ${WIDTH[kind]}`, "data-field": name, "data-built": "" });
    let input;
    let counter = null;
    if (kind === "boolean") {
      input = make("input", { type: "checkbox", id, name, "aria-describedby": error.id });
      el.classList.add("switch-field");
      el.append(make("label", { className: "check", htmlFor: id }, input, ` ${label}`), error);
    } else {
      const hint = make("p", { className: "hint", id: `${id}-hint` });
      if (kind === "enum" && Array.isArray(spec.choices)) {
        input = make("select", { id, name });
        if (!hasDefault(spec)) input.append(new Option("Default", ""));
        input.append(...spec.choices.map((choice) => new Option(choice, choice)));
      } else if (kind === "integer" || kind === "number") {
        input = make("input", { type: "number", id, name, autocomplete: "off",
          inputMode: kind === "integer" ? "numeric" : "decimal",
          step: kind === "integer" ? (name === "width" || name === "height" ? 8 : 1) : decimalStep(spec) });
        if (spec.min !== undefined) input.min = spec.min;
        if (spec.max !== undefined) input.max = spec.max;
        hint.textContent = rangeText(spec);
      } else {
        input = make("input", { type: "text", id, name, autocomplete: "off", spellcheck: false });
      }
      const labelRow = make("div", { className: "label-row" }, make("label", { htmlFor: id, title: label }, label));
      if (kind === "string" && spec.max_length) {
        counter = make("p", { className: "counter", id: `${id}-counter`, hidden: true });
        labelRow.append(counter);
      }
      input.setAttribute("aria-describedby", [counter && counter.id, hint.id, error.id].filter(Boolean).join(" "));
      el.append(labelRow, input, hint, error);
    }
    if (spec.required) input.setAttribute("aria-required", "true");
    const field = new Field({ name, kind, spec, el, input, counter, label });
    const kept = this.values.get(name);
    if (kept !== undefined && fits(kind, spec, kept)) field.setRaw(kept);
    else if (kind === "boolean") field.setRaw(spec.default === true);
    else field.setRaw(hasDefault(spec) ? String(spec.default) : "");
    this.grid.append(el);
    this.fields.set(name, field);
    return field;
  }

  /** A picture's drop zone (an image parameter), under the prompt. */
  buildPicture(name, spec) {
    let picture = this.images.get(name) || null;
    const why = picture && misfit(picture, spec);
    if (why) {
      this.images.delete(name);
      picture = null;
    }
    const field = new Field({ name, kind: "image", spec, label: labelOf(name) });
    field.picture = new PictureField(this.pictureTemplate, {
      name, spec, id: this.idFor(name), label: field.label, picture, missing: this.missing[name] || null,
      announce: this.announce,
      onChange: (taken) => {
        if (taken) this.images.set(name, taken);
        else this.images.delete(name);
        delete this.missing[name];
        this.formError.hidden = true;
        this.save();
      },
    });
    field.el = field.picture.el;
    field.el.dataset.built = "";
    this.pictureBox.append(field.el);
    this.fields.set(name, field);
    if (why) field.showError(why);
  }

  firstPicture() {
    return [...this.fields.values()].find((field) => field.picture) || null;
  }

  field(name) {
    return this.form.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
  }

  lookup(name) {
    return this.fields.get(name) || this.fixed[name] || null;
  }

  /** "1,988 characters left" (or "12 characters too many") under a text field with a max_length. */
  updateCounter(name) {
    const field = this.lookup(name);
    const counter = field && field.counter;
    if (!counter) return;
    const limit = this.params && field.kind === "string" ? field.spec.max_length : null;
    if (!limit) {
      counter.hidden = true;
      return;
    }
    const left = limit - charCount(name === "prompt" ? field.input.value.trim() : field.input.value);
    counter.hidden = false;
    counter.classList.toggle("over", left < 0);
    counter.textContent = left >= 0 ? `${left.toLocaleString()} ${left === 1 ? "character" : "characters"} left`
      : `${(-left).toLocaleString()} ${left === -1 ? "character" : "characters"} too many`;
  }

  /** A new random seed in the field (the dice button). */
  newSeed() {
    const input = this.form.elements.seed;
    input.value = randomSeed((this.params && this.params.seed) || {});
    this.values.set("seed", input.value);
    this.clearError("seed");
    this.save();
    this.announce(`New seed ${input.value}`);
  }

  /**
   * The request body, and the parameters as the job will use them (for display, Try again and
   * Reuse): `params` holds no picture; `images` the pictures sent, `inputs` their names and sizes.
   */
  collect() {
    const prompt = this.form.elements.prompt.value.trim();
    if (!prompt) return { error: { field: "prompt", message: "Describe the image you want." } };
    const promptLimit = this.params && this.params.prompt && this.params.prompt.max_length;
    if (promptLimit && charCount(prompt) > promptLimit) {
      const length = charCount(prompt);
      return { error: { field: "prompt", message: `The prompt has ${length.toLocaleString()} characters; `
        + `the limit is ${promptLimit.toLocaleString()}. Shorten it by ${(length - promptLimit).toLocaleString()}.` } };
    }
    const body = { prompt };
    const params = {};
    const images = {};
    const inputs = {};
    if (!this.params) return { prompt, body, params, images, inputs }; // settings unknown: the server's defaults
    if (!this.field("workflow").hidden) body.workflow = this.workflowSelect.value;
    for (const field of this.fields.values()) {
      const { name, spec, kind } = field;
      if (name === "prompt") continue;
      if (kind === "image") {
        const picture = this.images.get(name);
        if (picture) {
          body[name] = picture.url;
          images[name] = picture;
          inputs[name] = { name: picture.name, size: picture.size, width: picture.width, height: picture.height };
        } else if (spec.required) {
          return { error: { field: name, message: name === "image" ? "Choose a picture to start from."
            : `Choose a picture for ${field.label.toLowerCase()}.` } };
        }
        continue;
      }
      const got = field.read(this.values.has(name));
      if (got.error) return { error: { field: name, message: got.error } };
      let value = got.value;
      if (name === "seed" && value === undefined) value = randomSeed(spec); // known, so Try again can keep it
      if (value === undefined) {
        if (spec.required) return { error: { field: name, message: `${field.label} is needed here.` } };
        if (hasDefault(spec) && spec.default !== "") params[name] = spec.default;
        continue;
      }
      params[name] = value;
      if (value === spec.default && name !== "seed") continue; // the server fills it in
      body[name] = value;
    }
    return { prompt, body, params, images, inputs };
  }

  submit() {
    this.clearErrors();
    const job = this.collect();
    if (job.error) {
      this.showError(job.error.field, job.error.message);
      return;
    }
    this.onSubmit(job);
  }

  /** A 400 from the server: mark the field it names, or the form as a whole. */
  showError(name, message) {
    message = message.replace(/`/g, ""); // servers quote field names Markdown-style
    message = message.charAt(0).toUpperCase() + message.slice(1);
    const field = name && this.lookup(name);
    if (!field || !field.el || field.el.hidden) {
      this.formError.textContent = name ? `${name}: ${message}` : message;
      this.formError.hidden = false;
      return;
    }
    field.showError(message);
    if (this.advanced.contains(field.el)) this.advanced.open = true;
    field.focus();
  }

  clearError(name) {
    const field = this.lookup(name);
    if (field) field.clearError();
    this.formError.hidden = true;
  }

  clearErrors() {
    for (const field of [...this.fields.values(), ...Object.values(this.fixed)]) field.clearError();
    this.formError.hidden = true;
  }

  /** Why the settings are not there (GET /workflows failed): {text, detail}, or null once they are. */
  showSettingsNote(plain) {
    const note = this.settingsNote;
    note.hidden = !plain;
    if (!plain) return;
    note.querySelector(".note-text").textContent = plain.text;
    const details = note.querySelector("details");
    details.hidden = !plain.detail;
    details.querySelector(".detail-text").textContent = plain.detail || "";
  }

  /**
   * Fill the form from an earlier job (gallery "Reuse", or "Try again" without its picture): the
   * same prompt, workflow, settings and seed; `pictures` ({param: picture}) the pictures it was
   * sent with, when this page still holds them (else the drop zone asks for them again).
   */
  fill(item, pictures = null) {
    const elements = this.form.elements;
    elements.prompt.value = item.prompt || "";
    this.values.set("prompt", elements.prompt.value);
    if (item.workflow && this.catalogue && this.catalogue.workflows[item.workflow]) {
      this.workflowSelect.value = item.workflow;
    }
    const params = this.catalogue ? this.paramsOf(this.workflowSelect.value) : this.params;
    const given = { ...(item.params || {}) };
    for (const name of STATIC) {
      if (given[name] === undefined && item[name] !== undefined && item[name] !== null) given[name] = item[name];
    }
    if (item.seed !== undefined && item.seed !== null) given.seed = item.seed;
    let advanced = false;
    for (const [name, spec] of Object.entries(params || {})) {
      const kind = kindOf(name, spec || {});
      if (kind === "image") {
        const picture = pictures && pictures[name];
        const asked = item.inputs && item.inputs[name];
        if (picture) {
          this.images.set(name, picture);
          delete this.missing[name];
        } else if (asked) {
          this.images.delete(name);
          this.missing[name] = { name: asked.name, size: asked.size, why: "held" };
        }
        continue;
      }
      const value = given[name];
      if (name === "prompt" || value === undefined || value === null) continue;
      this.values.set(name, kind === "boolean" ? value === true : String(value));
      if (value !== (spec || {}).default && value !== "") advanced = true;
    }
    if (params) this.applyParams(params);
    if (advanced) this.advanced.open = true;
    this.clearErrors();
    this.updateCounter("prompt");
    this.save();
    elements.prompt.focus();
  }

  /** Focus a field (the drop zone, say, after Try again found its picture gone). */
  focusField(name) {
    const field = this.lookup(name);
    if (field) field.focus();
  }

  // --- kept across reloads (localStorage) --------------------------------------

  save() {
    const values = Object.fromEntries(this.values);
    const pictures = {};
    for (const [name, missing] of Object.entries(this.missing)) pictures[name] = { name: missing.name, size: missing.size };
    for (const [name, picture] of this.images) pictures[name] = { name: picture.name, size: picture.size };
    const data = { values, touched: Object.keys(values), workflow: this.workflowSelect.value || this.savedWorkflow || null,
      advanced: this.advanced.open, pictures };
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(data));
    } catch {
      // Storage full or disabled: a reload starts from an empty form.
    }
  }

  restore() {
    let data;
    try {
      data = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    } catch {
      data = null;
    }
    if (!data || typeof data !== "object" || !data.values) return;
    const touched = new Set(Array.isArray(data.touched) ? data.touched : []);
    for (const [name, value] of Object.entries(data.values)) {
      if (!touched.has(name) || name === "workflow") continue;
      if (typeof value === "string" || typeof value === "boolean") this.values.set(name, value);
    }
    if (typeof this.values.get("prompt") === "string") this.form.elements.prompt.value = this.values.get("prompt");
    // Pictures are not kept (too big): their drop zones say so, and ask for them again.
    for (const [name, picture] of Object.entries(data.pictures || {})) {
      if (picture && typeof picture.name === "string") {
        this.missing[name] = { name: picture.name, size: Number(picture.size) || null, why: "reload" };
      }
    }
    this.savedWorkflow = typeof data.workflow === "string" ? data.workflow : null;
    if (data.advanced) this.advanced.open = true;
  }
}

function coarsePointer() {
  return window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
}
