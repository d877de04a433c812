// The prompt form: fields, ranges and defaults only from GET /workflows, Enter to submit,
// characters left where a workflow sets max_length (nothing is cut), a dice for a new seed,
// errors next to the field they are about, and what was typed kept across reloads.

const OPTIONAL = ["negative_prompt", "seed", "steps", "width", "height"];
const INTEGER = new Set(["seed", "steps", "width", "height"]);
const TEXT = ["prompt", "negative_prompt"];
const STORE_KEY = "t2i.form.v1";
const SEED_MAX = 2 ** 32 - 1; // as the server's own random seeds

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

export class GenerateForm {
  /**
   * `onSubmit({prompt, body, params})` gets each accepted submission; `announce(text)` speaks
   * to screen readers.
   */
  constructor(form, { onSubmit, announce = () => {} }) {
    this.form = form;
    this.onSubmit = onSubmit;
    this.announce = announce;
    this.catalogue = null;
    this.params = null; // the chosen workflow's parameters; null until GET /workflows answers
    this.advanced = form.querySelector("details");
    this.workflowSelect = form.elements.workflow;
    this.formError = form.querySelector(".form-error");
    this.settingsNote = form.querySelector(".settings-note");
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
      if (event.target.name) {
        event.target.dataset.touched = "true";
        this.clearError(event.target.name);
        if (TEXT.includes(event.target.name)) this.updateCounter(event.target.name);
      }
      this.save();
    });
    this.advanced.addEventListener("toggle", () => this.save());
    this.workflowSelect.addEventListener("change", () => {
      this.applyWorkflow();
      this.save();
    });
    form.querySelector("#seed-dice").addEventListener("click", () => this.newSeed());
  }

  /** Use the server's workflow catalogue (GET /workflows). */
  setCatalogue(catalogue) {
    const names = Object.keys(catalogue.workflows || {});
    if (!names.length) return false;
    this.catalogue = catalogue;
    const select = this.workflowSelect;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    const saved = this.savedWorkflow;
    select.value = names.includes(saved) ? saved
      : names.includes(catalogue.default_workflow) ? catalogue.default_workflow : names[0];
    this.field("workflow").hidden = names.length < 2;
    this.showSettingsNote(null);
    this.applyWorkflow();
    return true;
  }

  applyWorkflow() {
    const workflow = this.catalogue.workflows[this.workflowSelect.value];
    this.applyParams((workflow && workflow.params) || {});
  }

  /** Show the fields a workflow maps, with its ranges and defaults; `null`: not known yet. */
  applyParams(params) {
    this.params = params;
    for (const name of OPTIONAL) {
      const spec = params ? params[name] : {};
      const input = this.form.elements[name];
      this.field(name).hidden = !spec;
      input.disabled = !params || !spec;
      if (name === "seed") this.form.querySelector("#seed-dice").disabled = input.disabled;
      if (!spec) continue;
      const hint = this.form.querySelector(`#${name}-hint`);
      if (INTEGER.has(name)) {
        input.min = spec.min ?? "";
        input.max = spec.max ?? "";
        if (hint && name !== "seed") hint.textContent = rangeText(spec);
      }
      if (name !== "seed" && params && !input.dataset.touched) input.value = spec.default ?? "";
    }
    for (const name of TEXT) this.updateCounter(name);
  }

  field(name) {
    return this.form.querySelector(`.field[data-field="${name}"]`);
  }

  /** "1,988 characters left" (or "12 characters too many") under a text field with a max_length. */
  updateCounter(name) {
    const counter = this.form.querySelector(`#${name}-counter`);
    if (!counter) return;
    const limit = this.limit(name);
    if (!limit) {
      counter.hidden = true;
      return;
    }
    const left = limit - charCount(this.textValue(name));
    counter.hidden = false;
    counter.classList.toggle("over", left < 0);
    counter.textContent = left >= 0 ? `${left.toLocaleString()} ${left === 1 ? "character" : "characters"} left`
      : `${(-left).toLocaleString()} ${left === -1 ? "character" : "characters"} too many`;
  }

  limit(name) {
    const spec = this.params && this.params[name];
    return spec && spec.max_length ? spec.max_length : null;
  }

  textValue(name) {
    const value = this.form.elements[name].value;
    return name === "prompt" ? value.trim() : value;
  }

  /** A new random seed in the field (the dice button). */
  newSeed() {
    const input = this.form.elements.seed;
    input.value = randomSeed((this.params && this.params.seed) || {});
    input.dataset.touched = "true";
    this.clearError("seed");
    this.save();
    this.announce(`New seed ${input.value}`);
  }

  /** The request body, and the parameters as the job will use them (for display and Try again). */
  collect() {
    const elements = this.form.elements;
    const prompt = elements.prompt.value.trim();
    if (!prompt) return { error: { field: "prompt", message: "Describe the image you want." } };
    for (const name of TEXT) {
      const limit = this.limit(name);
      const length = charCount(this.textValue(name));
      if (limit && length > limit) {
        const label = name === "prompt" ? "The prompt" : "The negative prompt";
        return { error: { field: name, message: `${label} has ${length.toLocaleString()} characters; `
          + `the limit is ${limit.toLocaleString()}. Shorten it by ${(length - limit).toLocaleString()}.` } };
      }
    }
    const body = { prompt };
    const params = {};
    if (!this.params) return { prompt, body, params }; // settings unknown: the server's defaults
    if (!this.field("workflow").hidden) body.workflow = this.workflowSelect.value;
    for (const name of OPTIONAL) {
      const spec = this.params[name];
      const input = elements[name];
      if (!spec) continue;
      if (INTEGER.has(name) && input.validity.badInput) {
        return { error: { field: name, message: "Enter a whole number." } };
      }
      const raw = name === "negative_prompt" ? input.value : input.value.trim();
      let value = raw === "" ? undefined : INTEGER.has(name) ? Number(raw) : raw;
      if (name === "seed" && value === undefined) value = randomSeed(spec); // known, so Try again can keep it
      if (value === undefined) {
        if (spec.default !== undefined && spec.default !== "") params[name] = spec.default;
        continue;
      }
      params[name] = value;
      if (value === spec.default && name !== "seed") continue; // the server fills it in
      body[name] = value;
    }
    return { prompt, body, params };
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
    const field = name && this.field(name);
    if (!field || field.hidden) {
      this.formError.textContent = name ? `${name}: ${message}` : message;
      this.formError.hidden = false;
      return;
    }
    const input = this.form.elements[name];
    const error = field.querySelector(".error");
    error.textContent = message;
    error.hidden = false;
    input.setAttribute("aria-invalid", "true");
    if (this.advanced.contains(field)) this.advanced.open = true;
    input.focus();
  }

  clearError(name) {
    const field = this.field(name);
    if (field) {
      field.querySelector(".error").hidden = true;
      this.form.elements[name].removeAttribute("aria-invalid");
    }
    this.formError.hidden = true;
  }

  clearErrors() {
    for (const field of this.form.querySelectorAll(".field[data-field]")) this.clearError(field.dataset.field);
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

  /** Fill the form from an earlier job (gallery "Reuse"): the same prompt, settings and seed. */
  fill(item) {
    const elements = this.form.elements;
    elements.prompt.value = item.prompt || "";
    elements.prompt.dataset.touched = "true";
    if (item.workflow && this.catalogue && this.catalogue.workflows[item.workflow]
        && this.workflowSelect.value !== item.workflow) {
      this.workflowSelect.value = item.workflow;
      this.applyWorkflow();
    }
    let advanced = false;
    for (const name of OPTIONAL) {
      const input = elements[name];
      if (input.disabled || item[name] === undefined || item[name] === null) continue;
      input.value = item[name];
      input.dataset.touched = "true";
      const spec = (this.params && this.params[name]) || {};
      if (item[name] !== spec.default && item[name] !== "") advanced = true;
    }
    if (advanced) this.advanced.open = true;
    this.clearErrors();
    for (const name of TEXT) this.updateCounter(name);
    this.save();
    elements.prompt.focus();
  }

  // --- kept across reloads (localStorage) --------------------------------------

  save() {
    const values = {};
    const touched = [];
    for (const name of ["prompt", ...OPTIONAL]) {
      const input = this.form.elements[name];
      values[name] = input.value;
      if (input.dataset.touched) touched.push(name);
    }
    const data = { values, touched, workflow: this.workflowSelect.value || this.savedWorkflow || null,
      advanced: this.advanced.open };
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
    for (const name of ["prompt", ...OPTIONAL]) {
      const value = data.values[name];
      if (typeof value !== "string" || !touched.has(name)) continue;
      this.form.elements[name].value = value;
      this.form.elements[name].dataset.touched = "true";
    }
    this.savedWorkflow = typeof data.workflow === "string" ? data.workflow : null;
    if (data.advanced) this.advanced.open = true;
  }
}

function coarsePointer() {
  return window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
}

function rangeText(spec) {
  if (spec.min !== undefined && spec.max !== undefined) return `${spec.min}–${spec.max}`;
  if (spec.min !== undefined) return `${spec.min} or more`;
  if (spec.max !== undefined) return `up to ${spec.max}`;
  return "";
}
