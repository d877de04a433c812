// A job's state in words, its times and its settings line: the one place the page
// names states, so the job list, the gallery and the watcher agree.

import { plainNotice, plainFailure } from "./errors.js";

/** States after which nothing changes any more. */
export const FINAL_STATES = new Set(["completed", "failed", "cancelled"]);

export function isFinal(status) {
  return FINAL_STATES.has(status);
}

/** The words the page uses for its own states (before and around the server's). */
export const WORDS = {
  submitting: "Sending…",
  accepted: "Queued",
  completed: "Done",
  cancelled: "Cancelled",
  expired: "Expired — the server no longer keeps this job",
  lost: "Lost — no server knows this job any more (its worker may have restarted)",
  failed: (why) => `Failed — ${why}`,
  // GET /jobs lists this client's jobs from other browsers too, without their prompts.
  jobElsewhere: "A job from another browser",
  imageElsewhere: "An image from another browser",
  unreachable: (n) => `Cannot reach the server — trying again in ${n} s`,
};

/**
 * A state from GET /status as {text, notice, detail}: `text` the state in words, `notice` a plain
 * sentence about a problem an unfinished job is riding out (never a failure), `detail` the
 * technical sentence behind it. `worker` names the machine whose queue a position is about.
 */
export function describeState(state, { worker } = {}) {
  switch (state.status) {
    case "pending": {
      const position = state.queue_position;
      const on = worker ? ` on ${worker}` : "";
      let text = "Queued";
      if (position === 0) text = `Queued — next${on}`;
      else if (Number.isInteger(position)) text = `Queued — ${position} ${position === 1 ? "job" : "jobs"} ahead${on}`;
      return unfinished(text, state);
    }
    case "running": {
      const progress = state.progress;
      if (!progress || !progress.max) return unfinished("Generating — starting…", state);
      return unfinished(`Generating — step ${progress.value} of ${progress.max}`, state);
    }
    case "completed":
      return { text: state.image_expired ? "Done — the image has already expired" : WORDS.completed };
    case "failed": {
      const plain = plainFailure(state.error);
      return { text: WORDS.failed(plain.text), detail: plain.detail };
    }
    case "cancelled":
      return { text: WORDS.cancelled };
    default:
      return { text: state.status || "Unknown" };
  }
}

/** The state as one line (for the screen-reader announcement): words, then any notice. */
export function stateText(state, context) {
  const { text, notice } = describeState(state, context);
  return notice ? `${text} — ${notice}` : text;
}

/** An unfinished job's words, with a second attempt and what the worker says is wrong right now. */
function unfinished(text, state) {
  if (state.attempt > 1) text += ` — attempt ${state.attempt} (ComfyUI restarted)`;
  if (!state.error) return { text };
  const plain = plainNotice(state.error);
  return { text, notice: plain.text, detail: plain.detail };
}

// --- times ---------------------------------------------------------------------

/** "4 s", "1 min 5 s", "2 h 3 min"; `precise` gives tenths under 10 s ("2.1 s"). */
export function duration(seconds, { precise = false } = {}) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (precise && seconds < 10) return `${seconds.toFixed(1)}\u00a0s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s}\u00a0s`;
  if (s < 3600) return `${Math.floor(s / 60)}\u00a0min${s % 60 ? `\u00a0${s % 60}\u00a0s` : ""}`;
  const m = Math.round(s / 60);
  return `${Math.floor(m / 60)}\u00a0h${m % 60 ? `\u00a0${m % 60}\u00a0min` : ""}`;
}

/** Seconds a finished job took in ComfyUI (started → completed; created → completed without a start). */
export function tookSeconds(state) {
  const end = state.completed_at;
  const start = state.started_at || state.created_at;
  return Number.isFinite(end) && Number.isFinite(start) && end >= start ? end - start : null;
}

// --- the settings line -----------------------------------------------------------

/**
 * The settings line of a job or a gallery image, as short parts that must not break inside:
 * which image of a batch ("2 of 3") or how many a job makes ("3 images"), size, steps, seed,
 * the worker, how long it took, when.
 */
export function metaParts({ width, height, steps, seed, worker, took, when, ofMany, batch_size: batch } = {}) {
  const parts = [];
  if (ofMany) parts.push(ofMany);
  else if (Number.isInteger(batch) && batch > 1) parts.push(`${batch} images`);
  if (width && height) parts.push(`${width}×${height}`);
  if (steps) parts.push(`${steps} steps`);
  if (seed !== undefined && seed !== null && seed !== "") parts.push(`seed ${seed}`);
  if (worker) parts.push(`on ${worker}`);
  if (Number.isFinite(took)) parts.push(duration(took, { precise: true }));
  if (Number.isFinite(when)) parts.push(shortDate(when));
  return parts;
}

/** Fill `el` with the parts, each kept on one line (a worker name never breaks mid-word). */
export function renderMeta(el, parts) {
  el.replaceChildren();
  parts.forEach((part, i) => {
    if (i) el.append(" · ");
    const span = document.createElement("span");
    span.className = "nowrap";
    span.textContent = part;
    el.append(span);
  });
}

function shortDate(epochSeconds) {
  const date = new Date(epochSeconds * 1000);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString([], { timeStyle: "short" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}
