// The client's key: kept in this browser (localStorage), sent by api.js with every call to the
// scheduler (never to the workers' image URLs), asked for in a small dialog when the server
// needs one or refuses the one kept here. The header shows whose key it is, with a button to
// change or forget it.

import { NetworkError, request, setAuth } from "./api.js";
import { plainKeyError, plainKeyWanted } from "./errors.js";

const STORE_KEY = "t2i.key.v1";

export class KeyManager {
  /**
   * `root` holds the header's #account and the #key-dialog; `onChange(key)` runs when the key
   * changes here or in another tab (null: forgotten); `announce(text)` speaks to screen readers.
   */
  constructor(root, { onChange = () => {}, announce = () => {} } = {}) {
    const $ = (id) => root.getElementById(id);
    this.onChange = onChange;
    this.announce = announce;
    this.memory = null; // the key when localStorage cannot keep it
    this.required = false; // GET /health said so
    this.offered = false; // the server takes keys but does not need one: a quiet "Use a key"
    this.refused = false; // some call answered 401
    this.declined = false; // the person closed the dialog without a key: not asked again by itself
    this.client = null; // the client's name, from GET /jobs
    this.pending = null; // {promise, resolve} while the dialog is open
    this.ui = {
      account: $("account"),
      name: $("account-name"),
      button: $("key-button"),
      dialog: $("key-dialog"),
      form: $("key-form"),
      why: $("key-why"),
      input: $("key-input"),
      show: $("key-show"),
      error: $("key-error"),
      save: $("key-save"),
      forget: $("key-forget"),
      cancel: $("key-cancel"),
    };
    const ui = this.ui;
    ui.button.addEventListener("click", () => {
      this.declined = false;
      this.ask(this.key() ? "Change the key this browser uses for this server, or forget it."
        : plainKeyWanted(false, { optional: !this.required && !this.refused }));
    });
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    ui.cancel.addEventListener("click", () => this.close(null));
    ui.dialog.addEventListener("cancel", (event) => {
      // Escape: the same as Cancel (the dialog decides where focus goes).
      event.preventDefault();
      this.close(null);
    });
    ui.forget.addEventListener("click", () => {
      this.store(null);
      this.close(null);
      this.announce("Key forgotten. This browser no longer sends a key.");
    });
    ui.show.addEventListener("change", () => {
      ui.input.type = ui.show.checked ? "text" : "password";
    });
    ui.input.addEventListener("input", () => this.showError(null));
    window.addEventListener("storage", (event) => {
      if (event.key !== STORE_KEY) return;
      // Another tab saved or forgot the key: this one follows.
      this.changed();
      if (this.pending && this.key()) this.close(this.key(), { silent: true });
    });
    setAuth({ key: () => this.key(), unauthorized: (info) => this.unauthorized(info) });
    this.render();
  }

  key() {
    try {
      return localStorage.getItem(STORE_KEY) || this.memory || null;
    } catch {
      return this.memory;
    }
  }

  store(key) {
    const before = this.key();
    this.memory = key || null;
    try {
      if (key) localStorage.setItem(STORE_KEY, key);
      else localStorage.removeItem(STORE_KEY);
    } catch {
      // Not kept: this tab uses it until it is closed.
    }
    if (before !== this.key()) this.changed();
  }

  changed() {
    this.client = null;
    this.declined = !this.key() && this.declined;
    this.render();
    this.onChange(this.key());
  }

  /** GET /health's "auth": {required, anonymous}. Asks at once when a key is required and none is kept. */
  setServer(info) {
    this.required = Boolean(info && info.required);
    // A key is optional where anonymous clients are allowed: with one, a person's jobs show in
    // every browser they use it in. (A server that says it has no keys at all, "keys": false, gets no button.)
    this.offered = Boolean(info && info.anonymous && info.keys !== false);
    this.render();
    if (this.required && !this.key() && !this.declined) this.ask(plainKeyWanted(false));
  }

  /** The client's name as GET /jobs tells it (shown when a key is in use). */
  setClient(name) {
    this.client = typeof name === "string" && name ? name : null;
    this.render();
  }

  /** A call answered 401 with `used` (null: none): a new key to send it again with, or null. */
  unauthorized({ used }) {
    this.refused = true;
    this.render();
    const current = this.key();
    if (current && current !== used) return Promise.resolve(current); // changed meanwhile
    if (this.declined) return Promise.resolve(null);
    return this.ask(plainKeyWanted(Boolean(used)));
  }

  /** Open the dialog (or join the open one): resolves to the key saved, or null. */
  ask(why) {
    const ui = this.ui;
    if (this.pending) return this.pending.promise;
    let resolve;
    const promise = new Promise((done) => {
      resolve = done;
    });
    this.pending = { promise, resolve };
    this.opener = document.activeElement;
    ui.why.textContent = why;
    ui.input.value = "";
    ui.show.checked = false;
    ui.input.type = "password";
    ui.forget.hidden = !this.key();
    this.showError(null);
    this.busy(false);
    ui.dialog.showModal();
    ui.input.focus();
    return promise;
  }

  async submit() {
    const ui = this.ui;
    const key = ui.input.value.trim();
    if (!key) {
      this.showError({ text: "Enter the key, or press Cancel." });
      return;
    }
    this.busy(true);
    let status = null;
    let data = {};
    try {
      // Checked before it is kept: a wrong key is said so here, not at the next Generate.
      ({ status, data } = await request("GET", "/jobs?limit=1", { key, timeout: 8000 }));
    } catch (err) {
      if (!(err instanceof NetworkError)) throw err;
    } finally {
      this.busy(false);
    }
    if (!this.pending) return;
    if (status === null || status === 401 || status === 403) {
      this.showError(plainKeyError(status, data));
      ui.input.select();
      ui.input.focus();
      return;
    }
    this.store(key);
    if (status === 200) this.setClient(data.client);
    this.close(key);
    this.announce(this.client ? `Key saved: you are ${this.client}.` : "Key saved.");
  }

  /** Close the dialog; `key` resolves whoever waits on it (null: no key, not asked again by itself). */
  close(key, { silent = false } = {}) {
    const ui = this.ui;
    const pending = this.pending;
    this.pending = null;
    if (!key) this.declined = true;
    if (ui.dialog.open) ui.dialog.close();
    this.render();
    if (!silent) {
      const back = this.opener && this.opener.isConnected && this.opener !== document.body ? this.opener : null;
      (back || document.getElementById("prompt")).focus(); // asked by the page itself: on to the prompt
    }
    if (pending) pending.resolve(key || null);
  }

  busy(on) {
    const ui = this.ui;
    ui.save.disabled = on;
    ui.save.textContent = on ? "Checking…" : "Use this key";
  }

  showError(plain) {
    const ui = this.ui;
    ui.error.hidden = !plain;
    ui.error.textContent = plain ? plain.text : "";
    if (plain) ui.input.setAttribute("aria-invalid", "true");
    else ui.input.removeAttribute("aria-invalid");
  }

  /** The header: whose key is in use, or that one is needed; hidden while neither matters. */
  render() {
    const ui = this.ui;
    const key = this.key();
    const needed = this.required || this.refused;
    ui.account.hidden = !(key || needed || this.offered);
    ui.account.dataset.state = key ? "key" : needed ? "none" : "optional";
    ui.button.classList.toggle("quiet", !key && !needed);
    if (key) {
      ui.name.hidden = false;
      ui.name.replaceChildren(...(this.client ? ["Key of ", strong(this.client)] : ["Key saved"]));
      ui.button.textContent = "Change key";
    } else {
      ui.name.hidden = !needed;
      ui.name.textContent = "No key";
      ui.button.textContent = needed ? "Enter key" : "Use a key";
    }
  }
}

function strong(text) {
  const el = document.createElement("strong");
  el.textContent = text;
  return el;
}
