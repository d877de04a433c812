// Saving an image from a worker: fetch it (workers allow any origin on images)
// and hand the blob to <a download>; when that fails, open the image instead.

/** `url` when it is an http(s) URL (relative ones resolved against the page), else null. */
export function httpUrl(url) {
  if (typeof url !== "string" || !url) return null;
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

export function fileName(item) {
  const words = (item.prompt || "image").toLowerCase().match(/[a-z0-9]+/g) || ["image"];
  const stem = words.slice(0, 6).join("-").slice(0, 48);
  const ext = (item.image_url.match(/\.(png|jpe?g|webp|gif)(?:$|\?)/i) || [null, "png"])[1];
  const which = item.count > 1 ? `-${item.index + 1}` : "";
  return `t2i-${stem}-${String(item.job_id || item.id).slice(0, 8)}${which}.${ext}`;
}

export async function downloadImage(button, url, name) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "Downloading…";
  try {
    const response = await fetch(url, { mode: "cors" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blobUrl = URL.createObjectURL(await response.blob());
    save(blobUrl, name);
    setTimeout(() => URL.revokeObjectURL(blobUrl), 30000);
  } catch {
    // No CORS or no network: a plain link still lets the browser save it.
    save(url, name, true);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function save(href, name, newTab = false) {
  const link = document.createElement("a");
  link.href = href;
  link.download = name;
  if (newTab) {
    link.target = "_blank";
    link.rel = "noopener";
  }
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
}
