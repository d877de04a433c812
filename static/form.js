// The prompt form: fields and ranges from GET /workflows, Enter to submit,
// errors shown next to the field they are about.

// When the server does not describe its workflows: the stock txt2img ranges,
// with the fields left empty so the server's own defaults apply.
const FALLBACK_PARAMS = {
  prompt: { type: "string", required: true, max_length: 2000 },
  negative_prompt: { type: "string" },
  seed: { type: "integer", min: 0 },
  steps: { type: "integer", min: 1, max: 150, default: 20 },
  width: { type: "integer", min: 64, max: 2048, default: 512 },
  height: { type: "integer", min: 64, max: 2048, default: 512 },
};
const OPTIONAL = ["negative_prompt", "seed", "steps", "width", "height"];
const INTEGER = new Set(["seed", "steps", "width", "height"]);

export class GenerateForm {
  /** `onSubmit({prompt, body, params})` gets each accepted submission. */
  constructor(form, { onSubmit }) {
    this.form = form;
    this.onSubmit = onSubmit;
    this.catalogue = null; // null: the fallback is in use
    this.advanced = form.querySelector("details");
    this.workflowSelect = form.elements.workflow;
    this.formError = form.querySelector(".form-error");
    this.applyParams(FALLBACK_PARAMS, false);

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    form.elements.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("input", (event) => {
      if (event.target.name) {
        event.target.dataset.touched = "true";
        this.clearError(event.target.name);
      }
    });
    this.workflowSelect.addEventListener("change", () => this.applyWorkflow());
  }

  /** Use the server's workflow catalogue (GET /workflows). */
  setCatalogue(catalogue) {
    const names = Object.keys(catalogue.workflows || {});
    if (!names.length) return;
    this.catalogue = catalogue;
    const select = this.workflowSelect;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    select.value = names.includes(catalogue.default_workflow) ? catalogue.default_workflow : names[0];
    this.field("workflow").hidden = names.length < 2;
    this.applyWorkflow();
  }

  applyWorkflow() {
    const workflow = this.catalogue.workflows[this.workflowSelect.value];
    this.applyParams(workflow.params || {}, true);
  }

  /** Show the fields a workflow maps, with its ranges; `known` fills in its defaults. */
  applyParams(params, known) {
    this.params = params;
    this.known = known;
    const prompt = this.form.elements.prompt;
    if (params.prompt && params.prompt.max_length) prompt.maxLength = params.prompt.max_length;
    for (const name of OPTIONAL) {
      const spec = params[name];
      const input = this.form.elements[name];
      this.field(name).hidden = !spec;
      input.disabled = !spec;
      if (!spec) continue;
      if (INTEGER.has(name)) {
        if (spec.min !== undefined) input.min = spec.min;
        if (spec.max !== undefined) input.max = spec.max;
        const range = rangeText(spec);
        if (range) this.form.querySelector(`#${name}-hint`).textContent = range;
      } else if (spec.max_length) {
        input.maxLength = spec.max_length;
      }
      if (name === "seed") {
        input.placeholder = "random";
      } else if (input.dataset.touched) {
        // The user typed here before the catalogue arrived: keep it.
      } else if (known) {
        input.value = spec.default ?? "";
        input.placeholder = "";
      } else {
        input.value = "";
        input.placeholder = spec.default !== undefined ? `server default (${spec.default})` : "server default";
      }
    }
  }

  field(name) {
    return this.form.querySelector(`.field[data-field="${name}"]`);
  }

  /** The request body, and the parameters as the job will use them (for display). */
  collect() {
    const elements = this.form.elements;
    const prompt = elements.prompt.value.trim();
    if (!prompt) return { error: { field: "prompt", message: "Describe the image you want." } };
    const body = { prompt };
    const params = {};
    if (this.catalogue && !this.field("workflow").hidden) body.workflow = this.workflowSelect.value;
    for (const name of OPTIONAL) {
      const spec = this.params[name];
      const input = elements[name];
      if (!spec) continue;
      if (INTEGER.has(name) && input.validity.badInput) {
        return { error: { field: name, message: "Enter a whole number." } };
      }
      const raw = name === "negative_prompt" ? input.value : input.value.trim();
      const value = raw === "" ? undefined : INTEGER.has(name) ? Number(raw) : raw;
      if (value === undefined) {
        if (spec.default !== undefined && spec.default !== "") params[name] = spec.default;
        continue;
      }
      params[name] = value;
      if (this.known && value === spec.default && name !== "seed") continue; // the server fills it in
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

  /** Fill the form from an earlier job (gallery "Reuse"). */
  fill(item) {
    const elements = this.form.elements;
    elements.prompt.value = item.prompt || "";
    let advanced = false;
    for (const name of OPTIONAL) {
      const input = elements[name];
      if (input.disabled || item[name] === undefined || item[name] === null) continue;
      input.value = item[name];
      const spec = this.params[name] || {};
      if (item[name] !== spec.default && item[name] !== "") advanced = true;
    }
    if (advanced) this.advanced.open = true;
    this.clearErrors();
    elements.prompt.focus();
  }
}

function rangeText(spec) {
  if (spec.min !== undefined && spec.max !== undefined) return `${spec.min}–${spec.max}`;
  if (spec.min !== undefined) return `${spec.min} or more`;
  if (spec.max !== undefined) return `up to ${spec.max}`;
  return "";
}
