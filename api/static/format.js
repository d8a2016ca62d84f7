// Small formatting and DOM helpers shared by the list and job views.

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

/** Percent done of a job (100 once it succeeded). */
export function percent(job) {
  if (job.status === "succeeded") return 100;
  const { done, total } = job.progress;
  return total > 0 ? Math.round((100 * done) / total) : 0;
}

export function progressText(job) {
  const { stage, done, total } = job.progress;
  return total > 0 ? `${stage} ${done}/${total}` : stage || job.status;
}

export function number(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}
