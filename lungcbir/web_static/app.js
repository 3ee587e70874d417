// The lungcbir page: upload a slice, call /api/query, show the overlay and result cards.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;

function showMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

function choose(file) {
  chosenFile = file;
  $("drop-text").textContent = file ? file.name : "Drop a CT slice here or click to choose";
  $("search").disabled = !file;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0] || null));
const drop = $("drop");
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (event) => choose(event.dataTransfer.files[0] || null));

function text(value) { return value === null || value === undefined || value === "" ? "–" : String(value); }

function card(neighbor) {
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.id = neighbor.id;
  const image = document.createElement("img");
  image.src = neighbor.thumbnail_url;
  image.alt = "stored slice " + neighbor.id;
  const info = document.createElement("div");
  info.className = "info";
  const labels = Object.entries(neighbor.labels || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  info.innerHTML = "<div><span class='score'></span> · #<span class='rank'></span></div>" +
    "<div class='where'></div><div class='labels'></div>";
  info.querySelector(".score").textContent = neighbor.score.toFixed(3);
  info.querySelector(".rank").textContent = neighbor.rank;
  info.querySelector(".where").textContent =
    `patient ${text(neighbor.patient_id)} · slice ${text(neighbor.slice_index)}`;
  info.querySelector(".labels").textContent = labels;
  element.append(image, info);
  element.addEventListener("click", () => openDetail(neighbor.id));
  return element;
}

async function openDetail(id) {
  const response = await fetch(`/api/images/${id}`);
  const meta = await response.json();
  $("detail-overlay").src = meta.overlay_url;
  const rows = ["path", "patient_id", "series_uid", "slice_index", "instance_number", "slice_location",
    "source_format", "width", "height", "lung_fraction"].map((key) => [key, meta[key]]);
  Object.entries(meta.labels || {}).forEach(([k, v]) => rows.push([k, v]));
  const table = $("detail-meta");
  table.replaceChildren(...rows.map(([k, v]) => {
    const row = document.createElement("tr");
    const key = document.createElement("td"); key.textContent = k;
    const value = document.createElement("td"); value.textContent = text(v);
    row.append(key, value);
    return row;
  }));
  $("detail").showModal();
}

async function refreshStats() {
  try {
    const stats = await (await fetch("/api/stats")).json();
    $("stats").textContent = `${stats.images} slices · ${stats.patients} patients indexed`;
  } catch (error) { $("stats").textContent = ""; }
}

$("query-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!chosenFile) return;
  const body = new FormData();
  body.append("file", chosenFile);
  body.append("k", $("k").value);
  body.append("where", $("where").value);
  body.append("per_patient", $("per-patient").checked ? "1" : "0");
  $("search").disabled = true;
  showMessage("Segmenting and searching…");
  try {
    const response = await fetch("/api/query", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
    $("query-overlay").src = answer.overlay;
    $("query-name").textContent = answer.query;
    $("lung-fraction").textContent = (100 * answer.lung_fraction).toFixed(1) + " %";
    $("mask-link").href = answer.mask;
    $("results").replaceChildren(...answer.neighbors.map(card));
    $("answer").classList.remove("hidden");
    showMessage(answer.neighbors.length ? "" : "No stored slice matches the filter.");
  } catch (error) {
    showMessage(String(error.message || error), true);
  } finally {
    $("search").disabled = !chosenFile;
  }
});

refreshStats();
