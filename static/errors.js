// Errors in plain words: a short sentence for the person (what happened, what to do) and
// the technical text behind a "Details" disclosure. Status codes, URLs and exception text
// stay in the detail; every function returns {text, detail}.

/** Text a person should not have to read: status codes, URLs, exception names. */
const RAW = /\bHTTP\b|\b[1-5]\d\d\b|https?:\/\/|\bErrno\b|Traceback|Exception\b|\w+Error\b/;

/** A server's sentence without its technical asides: "X (HTTP 599: …); Y" -> "X; Y". */
export function withoutAsides(message) {
  return String(message || "")
    .replace(/\s*\((?:[^()]|\([^()]*\))*\)/g, (aside) => (RAW.test(aside) ? "" : aside))
    .replace(/`/g, "")
    .replace(/\s+([;,.])/g, "$1")
    .trim();
}

/** `message` when it reads plainly once its asides are gone, else `fallback`; the original as detail. */
function plain(message, fallback) {
  const text = withoutAsides(message);
  const shown = text && !RAW.test(text) && text.length <= 200 ? text : fallback;
  return { text: shown, detail: message && message !== shown ? String(message) : null };
}

/** Why a job failed (the worker's or ComfyUI's sentence), for the job's row. */
export function plainFailure(error) {
  const raw = error || "";
  const detail = raw || null;
  if (/out of memory|\bOOM\b/i.test(raw)) {
    return { text: "the GPU ran out of memory. Try a smaller size or fewer steps.", detail };
  }
  if (/lost this job|restarted|queue was cleared/i.test(raw)) {
    return { text: "the image server restarted and lost this job. Try again.", detail };
  }
  if (/timed out|no progress/i.test(raw)) {
    return { text: "it took too long and was stopped. Try again, perhaps with fewer steps.", detail };
  }
  if (/not in list|does not exist|not found|no such file|missing/i.test(raw)) {
    return { text: "a model or node this workflow needs is missing on the server. Tell whoever runs it (see Details).", detail };
  }
  if (/expired/i.test(raw)) return { text: "the image has already expired on its server.", detail };
  if (!raw) return { text: "the job failed for an unknown reason. Try again.", detail };
  return { text: "the image could not be made. Try again; if it keeps failing, pass the details on to whoever runs the server.", detail };
}

/** What the worker says is wrong right now with an unfinished job (it carries on). */
export function plainNotice(error) {
  if (/not reachable|cannot be reached|unreachable/i.test(error) && /ComfyUI/.test(error)) {
    return { text: "ComfyUI cannot be reached right now; the job carries on when it is back.", detail: error };
  }
  return plain(error, "The image server has a problem right now; the job carries on when it is solved.");
}

/** What to do when the server wants a key this page does not have. */
const NO_KEY = "This server needs a key this page does not have: enter it with the Key button at the top.";

/** Polling trouble: the server or the job's worker cannot answer now (the job is not lost). */
export function plainTrouble(message, status) {
  if (status === 401 || status === 403) {
    return { text: `${NO_KEY} The job is not lost.`, detail: message || null };
  }
  const worker = /Worker (\S+) cannot be reached/.exec(message || "");
  if (worker) return { text: `Worker ${worker[1]} cannot be reached right now; the job is not lost.`, detail: message };
  if (/could not be asked/.test(message || "")) {
    return { text: "Some workers cannot be reached right now; the job is not lost.", detail: message };
  }
  return plain(message, "The server has a problem answering right now.");
}

/**
 * POST /generate answered 503: every queue is full, or no worker is up (down, disabled, none
 * configured), or none serves the workflow. `kind` is "busy", "workflow" or "down";
 * `text(n)` the words with n seconds left before the next try.
 */
export function plainUnavailable(data) {
  const message = (data && data.error) || "";
  if (/\bfull\b/i.test(message)) {
    return { kind: "busy", text: (n) => `Every worker's queue is full — trying again in ${n} s`, detail: message };
  }
  if (/serves the workflow/i.test(message)) {
    return { kind: "workflow", text: (n) => `No worker that is up offers this workflow — trying again in ${n} s`, detail: message };
  }
  if (/shutting down/i.test(message)) {
    return { kind: "restarting", text: (n) => `The server is restarting — trying again in ${n} s`, detail: message };
  }
  return { kind: "down", text: (n) => `No worker is up right now — trying again in ${n} s`, detail: message || null };
}

/**
 * POST /generate answered 429: this client already holds as many unfinished jobs as the server
 * allows it. The job is sent when one of them ends, or after Retry-After; `text(n)` with n
 * seconds left.
 */
export function plainLimit(data) {
  const message = (data && data.error) || "";
  const most = Number(data && (data.max_jobs ?? data.limit));
  const how = Number.isInteger(most) && most > 0
    ? `You already have ${most} unfinished ${most === 1 ? "job" : "jobs"}, the most this server runs for you at once`
    : "You already have as many unfinished jobs as this server runs for you at once";
  return { kind: "limit", text: (n) => `${how} — this one is sent as soon as one of them ends (next check in ${n} s)`,
    detail: message || null };
}

/** POST /generate refused the job for good (413, 502 and the like); no job was made. `picture`: one was sent. */
export function plainSubmitError(status, data, { picture = false } = {}) {
  const message = (data && data.error) || "";
  const lines = nodeErrorLines(data && data.node_errors);
  const detail = [message, ...lines].filter(Boolean).join("\n") + `\n(HTTP ${status})`;
  if (status === 413) {
    return { text: picture ? "the request is too large. Choose a smaller picture and try again."
      : "the request is too large. Shorten the prompt and try again.", detail };
  }
  if (status === 401) {
    return { text: "the server needs a key to start jobs. Enter it with the Key button at the top, then Try again.", detail };
  }
  if (status === 403) {
    return { text: "the server did not let this page start a job. Tell whoever runs it (see Details).", detail };
  }
  if (status === 502 && (lines.length || /not in list|does not exist|not found|missing/i.test(message))) {
    return { text: "the server cannot run this workflow: a model or node it needs is missing. Tell whoever runs it (see Details).", detail };
  }
  if (status === 502) return { text: "the image server refused the job. Try again; if it keeps happening, see Details.", detail };
  if (status >= 500) return { text: "the server had a problem taking the job. Try again in a moment.", detail };
  return { text: "the server did not take the job.", detail };
}

/** ComfyUI's node_errors as one line per distinct problem: "CheckpointLoaderSimple: Value not in list: ckpt_name …". */
export function nodeErrorLines(nodeErrors) {
  if (!nodeErrors || typeof nodeErrors !== "object") return [];
  const counts = new Map();
  for (const node of Object.values(nodeErrors)) {
    const errors = (node && Array.isArray(node.errors) && node.errors.length) ? node.errors : [{}];
    for (const error of errors) {
      const what = [error.message, error.details].filter(Boolean).join(": ") || "invalid";
      const line = `${(node && node.class_type) || "node"}: ${what}`;
      counts.set(line, (counts.get(line) || 0) + 1);
    }
  }
  return [...counts].map(([line, n]) => (n > 1 ? `${line} (×${n})` : line));
}

/** GET /workflows could not be read: what the form can still do. */
export function plainCatalogueError(status, data) {
  const why = status === null ? "the server cannot be reached"
    : status === 401 ? "the server needs a key this page does not have"
      : status === 503 ? "no worker has reported its settings yet" : "the server had a problem";
  return {
    text: `The image settings could not be loaded: ${why}. Generate still works with the server's defaults; `
      + "the settings are asked for again in a moment.",
    detail: [data && data.error, status ? `(HTTP ${status})` : null].filter(Boolean).join(" ") || null,
  };
}

/** The key dialog: why the key was not taken (`status` null: no answer). */
export function plainKeyError(status, data) {
  const detail = [data && data.error, status ? `(HTTP ${status})` : null].filter(Boolean).join(" ") || null;
  if (status === 401 || status === 403) {
    return { text: "This server does not accept that key. Check it (keys are case-sensitive) and try again.", detail };
  }
  if (status === null) return { text: "The server cannot be reached to check the key. Try again in a moment.", detail };
  return { text: "The server could not check the key right now. Try again in a moment.", detail };
}

/** Why the page asks for a key: none yet, or the one it has was refused. */
export function plainKeyWanted(hadKey, { optional = false } = {}) {
  if (hadKey) return "This server no longer accepts the key kept in this browser. Enter the current one.";
  if (optional) {
    return "A key is optional here. With one from whoever runs this server, your jobs and images show in "
      + "every browser where you use it.";
  }
  return "This server needs a key before it makes images. Whoever runs it can give you one.";
}

/**
 * POST /cancel answered: {cancelled, prompt_ids, failed}. The sentence to announce, and the
 * server's words for the ones that could not be cancelled.
 */
export function plainCancelAll(status, data) {
  if (status !== 200) {
    const detail = [data && data.error, `(HTTP ${status})`].filter(Boolean).join(" ");
    return { text: "Could not cancel your jobs: the server has a problem right now. Try again.", detail, ok: false };
  }
  const n = Number(data && data.cancelled) || 0;
  const failed = Array.isArray(data && data.failed) ? data.failed : [];
  const done = n === 0 ? "No unfinished jobs to cancel." : `Cancelled ${n} ${n === 1 ? "job" : "jobs"}.`;
  if (!failed.length) return { text: done, detail: null, ok: true };
  const lines = failed.map((item) => (typeof item === "string" ? item
    : [item && item.prompt_id, item && item.error].filter(Boolean).join(": ")));
  const m = failed.length;
  return { text: `${done} ${m} could not be cancelled (see Details).`.replace("No unfinished jobs to cancel. ", ""),
    detail: lines.join("\n"), ok: false };
}
