// The job page: progress while it runs, then the slide viewer with overlays, legend, stats and files.

import { api, authHeaders } from "./api.js";
import { TERMINAL, bytes, el, number, percent, progressText, when } from "./format.js";

const POLL_MS = 1000;
const state = { id: null, timer: null, viewer: null, layers: {}, info: null };

const $ = (id) => document.getElementById(id);

export function initJob() {
  $("opacity").addEventListener("input", applyOpacity);
  $("layer-semantic").addEventListener("change", applyOpacity);
  $("layer-ternary").addEventListener("change", applyOpacity);
}

export function showJob(id) {
  hideJob();
  state.id = id;
  for (const part of ["error-panel", "job-running", "viewer-panel"]) $(part).hidden = true;
  $("stats").replaceChildren(el("p", { class: "muted", text: "Available once the job has succeeded." }));
  $("files").replaceChildren();
  $("job-title").textContent = "Job";
  poll();
}

export function hideJob() {
  clearTimeout(state.timer);
  state.timer = null;
  state.id = null;
  if (state.viewer) state.viewer.destroy();
  state.viewer = null;
  state.layers = {};
  state.info = null;
  $("legend").replaceChildren();
}

async function poll() {
  const id = state.id;
  let job;
  try {
    job = await api(`/v1/jobs/${id}`);
  } catch (err) {
    if (id !== state.id) return;
    showError(err.code, err.message);
    return;
  }
  if (id !== state.id) return;
  render(job);
  if (!TERMINAL.has(job.status)) {
    state.timer = setTimeout(poll, POLL_MS);
  } else {
    await finished(job);
  }
}

function render(job) {
  $("job-title").textContent = job.slide.name;
  const size = job.slide.width ? `${job.slide.width} × ${job.slide.height} px, ` : "";
  $("job-summary").textContent = `${job.status} · ${size}${bytes(job.slide.size_bytes)} · `
    + `created ${when(job.created_at)}` + (job.finished_at ? ` · finished ${when(job.finished_at)}` : "");
  const running = !TERMINAL.has(job.status);
  $("job-running").hidden = !running;
  $("job-progress").value = percent(job);
  $("job-progress-text").textContent = progressText(job);
}

async function finished(job) {
  if (job.status === "failed") {
    showError(job.error?.code ?? "failed", job.error?.message ?? "the job failed");
    return;
  }
  if (job.status !== "succeeded") return;
  renderFiles(job.results || []);
  const id = job.id;
  try {
    const [info, stats] = await Promise.all([api(`/v1/jobs/${id}/dzi`), api(`/v1/jobs/${id}/results/stats.json`)]);
    if (id !== state.id) return;
    renderStats(stats);
    openViewer(info);
  } catch (err) {
    if (id === state.id) showError(err.code, err.message);
  }
}

function showError(code, message) {
  $("error-code").textContent = code;
  $("error-message").textContent = message;
  $("error-panel").hidden = false;
}

function renderFiles(results) {
  $("files").replaceChildren(...results.map((r) => {
    const link = el("a", { href: r.href, download: r.name, text: r.name });
    link.addEventListener("click", (event) => saveWithKey(event, r));
    return el("li", {}, link, el("span", { class: "muted", text: ` ${r.content_type}, ${bytes(r.size_bytes)}` }));
  }));
}

/** A plain link cannot send the API key: fetch the file with it, then save the blob. */
async function saveWithKey(event, result) {
  const headers = authHeaders();
  if (!headers.Authorization) return; // no key (auth disabled): the plain link works
  event.preventDefault();
  try {
    const resp = await fetch(result.href, { headers });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const url = URL.createObjectURL(await resp.blob());
    const save = el("a", { href: url, download: result.name });
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showError("download_failed", `${result.name}: ${err.message}`);
  }
}

// ---------------------------------------------------------------- viewer

function openViewer(info) {
  state.info = info;
  $("viewer-panel").hidden = false;
  state.viewer = OpenSeadragon({ // eslint-disable-line no-undef
    element: $("viewer"),
    prefixUrl: "/static/vendor/openseadragon/images/",
    tileSources: info.slide.dzi,
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    loadTilesWithAjax: true,
    ajaxHeaders: authHeaders(),
    gestureSettingsMouse: { clickToZoom: false },
  });
  state.viewer.addHandler("open", () => {
    for (const overlay of info.overlays) addOverlay(overlay);
  });
  renderLegend();
}

function addOverlay(overlay) {
  state.viewer.addTiledImage({
    tileSource: overlay.dzi,
    x: 0,
    y: 0,
    width: overlay.viewport_width,
    opacity: 0,
    success: (event) => {
      state.layers[overlay.name] = event.item;
      applyOpacity();
    },
  });
}

function applyOpacity() {
  const value = Number($("opacity").value) / 100;
  $("opacity-value").textContent = `${Math.round(value * 100)}%`;
  for (const [name, item] of Object.entries(state.layers)) {
    item.setOpacity($(`layer-${name}`).checked ? value : 0);
  }
  renderLegend();
}

function renderLegend() {
  const overlays = (state.info?.overlays || []).filter((o) => $(`layer-${o.name}`).checked);
  $("legend").replaceChildren(...overlays.map((o) => el("div", { class: "legend" },
    el("h3", { text: o.name === "semantic" ? "Cell types" : "Boundaries" }),
    el("ul", {}, ...o.classes.map((c) => el("li", {},
      el("span", { class: c.index === 0 ? "swatch clear" : "swatch", style: `background:${c.index === 0 ? "transparent" : c.colour}` }),
      document.createTextNode(c.index === 0 ? `${c.name} (transparent)` : c.name)))))));
}

// ---------------------------------------------------------------- stats

function renderStats(stats) {
  const parts = [];
  const held = stats.model?.held_out?.classes || {};
  for (const head of ["semantic", "ternary"]) {
    const classes = stats[head]?.classes;
    if (!classes) continue;
    const semantic = head === "semantic";
    parts.push(table(`${semantic ? "Cell-type" : "Boundary"} areas`,
      ["Class", "Area (µm²)", "Pixels", "Tissue fraction", ...(semantic ? ["Held-out IoU"] : [])],
      Object.entries(classes).map(([name, c]) => [name, number(c.area_um2), number(c.pixels, 0),
        c.tissue_fraction === null ? "–" : `${number(100 * c.tissue_fraction, 2)}%`,
        ...(semantic ? [number(held[name]?.iou, 2)] : [])])));
  }
  const nuclei = stats.nuclei?.classes;
  if (nuclei) {
    parts.push(table(`Nuclei (${number(stats.nuclei.count, 0)} in all)`,
      ["Class", "Count", "Density (per mm²)", "Mean area (µm²)", "Held-out detection F1"],
      Object.entries(nuclei).map(([name, c]) => [name, number(c.count, 0), number(c.density_per_mm2),
        number(c.mean_area_um2), detectionF1(held[name])])));
  }
  const a = stats.analysis || {};
  parts.push(el("p", { class: "muted", text: `Analysed at ${number(a.mpp, 3)} µm/px (${a.width} × ${a.height} px); model ${stats.model?.name ?? "?"}.` }));
  if (stats.model?.held_out) parts.push(heldOutNote(stats.model.held_out));
  $("stats").replaceChildren(...parts);
}

/** "0.70 [0.44–0.83], 26 cells": how well the model's recipe found a type's cells on unseen patients. */
function detectionF1(c) {
  if (!c || c.det_f1 === null) return "–";
  const ci = c.det_f1_ci ? ` [${number(c.det_f1_ci[0], 2)}–${number(c.det_f1_ci[1], 2)}]` : "";
  return `${number(c.det_f1, 2)}${ci}, ${number(c.gt_cells, 0)} cells`;
}

function heldOutNote(held) {
  return el("p", { class: "muted held-out", text: `Held-out: how the model's training recipe did on ${held.patients.length} `
    + `patients (${held.images} images) it never trained on (stats.json: model.held_out). Read the counts and `
    + "areas of a type with a low figure as indicative only." });
}

function table(caption, headers, rows) {
  return el("table", { class: "stats" },
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...rows.map((r) => el("tr", {},
      ...r.map((v, i) => (i === 0 ? el("th", { scope: "row", text: v }) : el("td", { text: v })))))));
}
