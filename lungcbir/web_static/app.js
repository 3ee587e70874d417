// The lungcbir page: upload a slice, call /api/query, show the overlay and result cards.
// When the server wants an access token, the page asks for it once and keeps it in
// sessionStorage (gone when the tab closes). It goes only into the Authorization header of
// fetch calls, never into a URL: pictures are fetched with the header and shown as blob URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "lungcbir-token";
let chosenFile = null;
let blobUrls = [];  // pictures of the shown answer, freed when the next one arrives

class NeedsToken extends Error {}

async function api(url, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(token ? "The access token was not accepted." : "");
    throw new NeedsToken("this server needs an access token");
  }
  return response;
}

async function picture(url) {
  const response = await api(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  const blobUrl = URL.createObjectURL(await response.blob());
  blobUrls.push(blobUrl);
  return blobUrl;
}

async function showPicture(image, url) {
  try { image.src = await picture(url); } catch (error) { image.alt = "picture not available"; }
}

function askToken(reason) {
  $("login-message").textContent = reason;
  if (!$("login").open) $("login").showModal();
  $("token").focus();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").close();
  refreshStats();
});
$("login").addEventListener("cancel", (event) => event.preventDefault());  // no way round it

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
  showPicture(image, neighbor.thumbnail_url);
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
  let meta;
  try { meta = await (await api(`/api/images/${id}`)).json(); } catch (error) { return; }
  $("detail-overlay").removeAttribute("src");
  showPicture($("detail-overlay"), meta.overlay_url);
  const rows = ["path", "patient_id", "series_uid", "slice_index", "instance_number", "slice_location",
    "source_format", "width", "height", "lung_fraction"].map((key) => [key === "path" ? "file" : key, meta[key]]);
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
    const stats = await (await api("/api/stats")).json();
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
    const response = await api("/api/query", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
    blobUrls.forEach((url) => URL.revokeObjectURL(url));
    blobUrls = [];
    $("query-overlay").src = await picture(answer.overlay);
    $("query-name").textContent = answer.query;
    $("lung-fraction").textContent = (100 * answer.lung_fraction).toFixed(1) + " %";
    $("mask-link").href = await picture(answer.mask);
    $("mask-link").download = answer.query.replace(/(\.nii)?\.[^.]*$/, "") + "_mask.png";
    $("results").replaceChildren(...answer.neighbors.map(card));
    $("answer").classList.remove("hidden");
    showMessage(answer.neighbors.length ? "" : "No stored slice matches the filter.");
  } catch (error) {
    showMessage(error instanceof NeedsToken ? "Enter the access token, then search again."
      : String(error.message || error), true);
  } finally {
    $("search").disabled = !chosenFile;
  }
});

refreshStats();
