// The job list: drop or pick a file, upload with progress, and a polled table of jobs.

import { api, upload } from "./api.js";
import { TERMINAL, bytes, el, percent, progressText, when } from "./format.js";

const POLL_MS = 1000;
const rows = new Map();
let timer = null;
let chosen = null;

export function initList() {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  input.addEventListener("change", () => choose(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
}

function choose(file) {
  chosen = file || null;
  document.getElementById("file-name").textContent = chosen ? `${chosen.name} (${bytes(chosen.size)})` : "No file chosen";
  document.getElementById("submit").disabled = !chosen;
}

async function send() {
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const button = document.getElementById("submit");
  const options = document.getElementById("options").value.trim();
  if (options) {
    try { JSON.parse(options); } catch (err) {
      status.textContent = `Options are not valid JSON: ${err.message}`;
      return;
    }
  }
  button.disabled = true;
  bar.value = 0;
  status.textContent = `Uploading ${chosen.name}…`;
  try {
    const job = await upload(chosen, options, (f) => { bar.value = Math.round(f * 100); });
    status.textContent = `Submitted ${job.slide.name}.`;
    await refresh();
  } catch (err) {
    status.textContent = `Upload failed (${err.code}): ${err.message}`;
  } finally {
    button.disabled = !chosen;
  }
}

export function showList() {
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, POLL_MS);
}

export function hideList() {
  clearInterval(timer);
  timer = null;
}

async function refresh() {
  let page;
  try {
    page = await api("/v1/jobs?limit=50");
  } catch (err) {
    document.getElementById("upload-status").textContent = `Cannot list jobs (${err.code}): ${err.message}`;
    return;
  }
  const body = document.getElementById("job-rows");
  const seen = new Set();
  page.jobs.forEach((job, i) => {
    seen.add(job.id);
    const row = rows.get(job.id) || makeRow(job);
    rows.set(job.id, row);
    update(row, job);
    if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
  });
  for (const [id, row] of rows) {
    if (!seen.has(id)) { row.remove(); rows.delete(id); }
  }
  document.getElementById("no-jobs").hidden = page.jobs.length > 0;
}

function makeRow(job) {
  const link = el("a", { href: `#/jobs/${job.id}`, class: "slide-link" });
  const bar = el("progress", { max: "100", value: "0", "aria-label": `Progress of ${job.slide.name}` });
  const action = el("button", { type: "button", class: "secondary" });
  action.addEventListener("click", () => act(action, job.id));
  const row = el("tr", { "data-job": job.id },
    el("td", {}, link), el("td", { class: "status" }), el("td", { class: "progress" }, bar, el("span")),
    el("td", { class: "size" }), el("td", { class: "created" }), el("td", { class: "finished" }), el("td", {}, action));
  row.parts = { link, bar, action };
  return row;
}

function update(row, job) {
  const { link, bar, action } = row.parts;
  link.textContent = job.slide.name;
  const status = row.querySelector(".status");
  status.textContent = job.status + (job.cancel_requested && !TERMINAL.has(job.status) ? " (cancelling)" : "");
  status.className = `status s-${job.status}`;
  bar.value = percent(job);
  row.querySelector(".progress span").textContent = ` ${progressText(job)}`;
  row.querySelector(".size").textContent = bytes(job.slide.size_bytes);
  row.querySelector(".created").textContent = when(job.created_at);
  row.querySelector(".finished").textContent = when(job.finished_at);
  const finished = TERMINAL.has(job.status);
  action.textContent = finished ? "Delete" : "Cancel";
  action.setAttribute("aria-label", `${finished ? "Delete" : "Cancel"} job ${job.slide.name}`);
}

async function act(button, id) {
  button.disabled = true;
  try {
    await api(`/v1/jobs/${id}`, { method: "DELETE" });
  } catch (err) {
    document.getElementById("upload-status").textContent = `Could not change job (${err.code}): ${err.message}`;
  } finally {
    button.disabled = false;
    await refresh();
  }
}
