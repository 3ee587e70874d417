// The lungcbir page: upload a slice (or a whole series), call the API, show the answer, compare.
// When the server wants an access token, the page asks for it once and keeps it in
// sessionStorage (gone when the tab closes). It goes only into the Authorization header of
// fetch calls, never into a URL: pictures are fetched with the header and shown as blob URLs.
// Window/level is done here: the server sends raw values (16-bit PNG, HU + 1024 or 8-bit
// display values) and the page maps them to grey on a canvas, for the query and neighbour alike.
// Keys the API may add later (quality, warning, identity_source) are shown when present.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "lungcbir-token";
const HU_OFFSET = 1024;
const PRESETS = { lung: [1500, -600], mediastinum: [400, 40], bone: [1800, 400] };
const SCORE_HELP = "cosine similarity of the feature vectors: 1 = same slice, near 0 = unrelated";
const MAX_DROP_DOWN_VALUES = 12;  // more values (ids, positions) are better typed in the free-text filter
const SERIES_SUFFIXES = [".zip", ".nii", ".nii.gz"];
let chosenFiles = [];
let blobUrls = [];  // pictures of the shown answer, freed when the next one arrives
let lastAnswer = null;  // what the CSV/JSON downloads hold
// the query's DICOM SEG (answer.seg): its download and store-back URLs, or why there is none
let segOffer = null;
// optional form fields this server takes (its OpenAPI schema), and whether the search focus
// changes anything (/api/stats: a model without a findings part answers the same for every focus)
let features = { otherPatients: false, focus: false, focusAvailable: true };
const timing = { clickToAnswer: null, clickToThumbnails: null };
window.lungcbirTiming = timing;  // read by the browser tests (click-to-answer figures)

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

// FastAPI answers {"detail": "text"} or, for a malformed field, {"detail": [{loc, msg}, ...]}
function describeDetail(detail, fallback) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => {
      if (typeof item === "string") return item;
      const where = (item.loc || []).filter((part) => part !== "body" && part !== "query").join(".");
      return (where ? where + ": " : "") + (item.msg || JSON.stringify(item));
    }).join("; ");
  }
  if (detail && typeof detail === "object") return detail.msg || JSON.stringify(detail);
  return fallback;
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
  if (launchWaitsForToken) launchFromArchive();  // the viewer's link goes on, no reload needed
});
$("login").addEventListener("cancel", (event) => event.preventDefault());  // no way round it

function showMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

// ---------------------------------------------------------------------------------------------
// choosing files

function isSeriesUpload(files) {
  return files.length > 1 || files.some((file) => SERIES_SUFFIXES.some((s) => file.name.toLowerCase().endsWith(s)));
}

function choose(files) {
  chosenFiles = [...files];
  const names = chosenFiles.map((file) => file.name);
  $("drop-text").textContent = !names.length ? "or drop a CT slice here (PNG, JPEG, TIFF, DICOM), several slices of one series, a ZIP or a NIfTI volume"
    : names.length === 1 ? names[0] : `${names.length} files (${names[0]}, …)`;
  if (chosenFiles.length) $("as-series").checked = isSeriesUpload(chosenFiles);
  $("search").disabled = !chosenFiles.length;
}

$("choose").addEventListener("click", () => $("file").click());  // Enter and Space click a button
$("file").addEventListener("change", (event) => choose(event.target.files || []));
const drop = $("drop");
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (event) => choose(event.dataTransfer.files || []));

// ---------------------------------------------------------------------------------------------
// results

function text(value) { return value === null || value === undefined || value === "" ? "–" : String(value); }
function percent(fraction) { return typeof fraction === "number" ? (100 * fraction).toFixed(1) + " %" : "–"; }
function known(value) { return value !== null && value !== undefined && value !== ""; }

// what PACS shows: InstanceNumber ("image 91"), else the position in the stored series
function sliceText(item) {
  if (known(item.instance_number)) return `image ${item.instance_number}`;
  if (known(item.slice_index)) return `slice ${item.slice_index + 1} of its series`;
  return "";
}

function studyDate(value) {  // DICOM DA (YYYYMMDD) as a date a reader recognises
  return /^\d{8}$/.test(value || "") ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}` : value;
}

function labelText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
}

function fixed(value, digits) { return typeof value === "number" ? value.toFixed(digits) : null; }

// why this neighbour ranks where it does: the parts' similarities apart, its lung level (and how
// far from the query slice's), and how its score ranks among all stored pairs
function explainText(neighbor, queryLevel) {
  const parts = [];
  if (typeof neighbor.anatomy_score === "number") parts.push(`anatomy ${fixed(neighbor.anatomy_score, 2)}`);
  if (typeof neighbor.findings_score === "number") parts.push(`findings ${fixed(neighbor.findings_score, 2)}`);
  if (typeof neighbor.level === "number") {
    const difference = typeof queryLevel === "number" ? neighbor.level - queryLevel : null;
    parts.push(`level ${fixed(neighbor.level, 2)}` +
      (difference === null ? "" : ` (${difference >= 0 ? "+" : "−"}${Math.abs(difference).toFixed(2)} from the query's)`));
  }
  if (typeof neighbor.percentile === "number") parts.push(`percentile ${Math.round(neighbor.percentile)}`);
  return parts.join(" · ");
}

// "6 of 8: diagnosis COVID-19": the most frequent value of each label key among the answers;
// keys whose values all differ (file names, rows) say nothing and are left out
function summaryText(summary, total) {
  if (!summary || !total) return "";
  return Object.entries(summary).map(([key, values]) => {
    const [value, count] = Object.entries(values)[0] || [];
    return { key, value, count, kinds: Object.keys(values).length };
  }).filter((item) => item.count && (total === 1 ? item.kinds <= 1 : item.count > 1))
    .sort((a, b) => b.count - a.count || a.key.localeCompare(b.key)).slice(0, 4)
    .map((item) => `${item.count} of ${total}: ${item.key} ${item.value}`).join(" · ");
}

const REGION_SOURCES = { mask: "marked region", lesion: "lesion found by the model" };

// a stored region as a reader checks it: what it is, its box (slice pixels) and its size
function regionText(region) {
  const [x0, y0, x1, y1] = region.bbox;
  return `${REGION_SOURCES[region.source] || "region"} · ${x1 - x0} × ${y1 - y0} px at (${x0}, ${y0}) · ` +
    `area ${region.area} px`;
}

function card(neighbor, open, queryLevel) {
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.id = neighbor.id;
  element.tabIndex = 0;
  element.setAttribute("role", "button");
  const place = [`patient ${text(neighbor.patient_id)}`, sliceText(neighbor)].filter(Boolean).join(" · ");
  element.title = "open the comparison (Enter)";  // its visible text is its accessible name
  const image = document.createElement("img");
  showPicture(image, neighbor.thumbnail_url);
  image.alt = "";  // the card's label says what it is
  const info = document.createElement("div");
  info.className = "info";
  const line = (cls, value) => { const div = document.createElement("div"); div.className = cls; div.textContent = value; return div; };
  const head = document.createElement("div");
  const score = document.createElement("span"); score.className = "score"; score.textContent = neighbor.score.toFixed(3);
  score.title = "score: " + SCORE_HELP;
  head.append(score, ` · #${neighbor.rank}`);
  info.append(head, line("where", place));
  const why = explainText(neighbor, queryLevel);
  if (why) info.append(line("explain", why));
  if (neighbor.region) info.append(line("region-text", regionText(neighbor.region)));
  if (known(neighbor.slice_location)) info.append(line("location", `location ${Number(neighbor.slice_location).toFixed(1)} mm`));
  const study = [studyDate(neighbor.study_date), neighbor.series_description].filter(known).join(" · ");
  if (study) info.append(line("study", study));
  if (neighbor.source_format !== "dicom" && neighbor.file_name) info.append(line("file", neighbor.file_name));
  if (known(neighbor.identity_source)) info.append(line("identity", `patient from ${neighbor.identity_source}`));
  info.append(line("labels", labelText(neighbor.labels)));
  element.append(image, info);
  element.addEventListener("click", () => open(element));
  element.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(element); }
  });
  return element;
}

function clearAnswer() {
  blobUrls.forEach((url) => URL.revokeObjectURL(url));
  blobUrls = [];
  lastAnswer = null;
  segOffer = null;
  $("results").replaceChildren();
  $("cases").replaceChildren();
  $("answer").classList.add("hidden");
  $("series-answer").classList.add("hidden");
  $("query-overlay").removeAttribute("src");
}

function show(element, value) {
  element.classList.toggle("hidden", !known(value));
  element.textContent = known(value) ? value : "";
}

function queryTags(tags) {
  if (!tags) return "";
  return [tags.patient_id && `patient ${tags.patient_id}`, sliceText(tags),
    known(tags.slice_location) && `location ${Number(tags.slice_location).toFixed(1)} mm`,
    known(tags.study_date) && `study ${studyDate(tags.study_date)}`, tags.series_description,
    tags.source_format].filter(Boolean).join(" · ");
}

function qualityText(answer) {
  if (!known(answer.quality)) return null;
  const score = typeof answer.quality_score === "number" ? ` (score ${answer.quality_score.toFixed(2)})` : "";
  const lesion = typeof answer.lesion_fraction === "number" ? ` · lesion fraction ${percent(answer.lesion_fraction)}` : "";
  return `Image quality: ${answer.quality}${score}${lesion}`;
}

let shownQuery = null;  // the query slice the shown cards are compared with

// the result cards, each with "more like this" / "less like this" (a search with several examples)
function showNeighbors(answer) {
  show($("label-summary"), summaryText(answer.label_summary, answer.neighbors.length) || null);
  // "more like this" searches whole slices together: it has no meaning for stored regions
  const regions = Boolean(answer.region);
  $("refine").parentElement.classList.toggle("hidden", regions);
  $("results-title").textContent = regions ? "Most similar stored regions" : "Most similar stored slices";
  $("results").replaceChildren(...answer.neighbors.map((neighbor) => {
    const element = card(neighbor, (from) => openDetail(shownQuery, neighbor, from));
    const item = document.createElement("div"); item.setAttribute("role", "listitem"); item.className = "result";
    if (regions) { item.append(element); return item; }
    const marks = document.createElement("div"); marks.className = "marks";
    [["like", "More like this"], ["unlike", "Less like this"]].forEach(([kind, label]) => {
      const button = document.createElement("button");
      button.type = "button"; button.className = "secondary mark " + kind; button.textContent = label;
      button.dataset.kind = kind;
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", `${label}: #${neighbor.rank}`);
      button.addEventListener("click", () => mark(item, neighbor, kind));
      marks.append(button);
    });
    item.append(element, marks);
    return item;
  }));
  marked.clear();
  updateRefine();
}

const marked = new Map();  // neighbour id -> { neighbor, kind }

function mark(item, neighbor, kind) {
  const was = marked.get(neighbor.id);
  if (was && was.kind === kind) marked.delete(neighbor.id); else marked.set(neighbor.id, { neighbor, kind });
  item.querySelectorAll(".mark").forEach((button) => {
    const on = marked.has(neighbor.id) && marked.get(neighbor.id).kind === button.dataset.kind;
    button.setAttribute("aria-pressed", String(on));
  });
  updateRefine();
}

function updateRefine() {
  const marks = [...marked.values()];
  const likes = marks.filter((m) => m.kind === "like").length, unlikes = marks.length - likes;
  $("refine").disabled = !marks.length || !chosenFiles.length;
  $("refine-text").textContent = marks.length ? `${likes} more like, ${unlikes} less like` : "";
}

// one search with the query and every "more like this" as examples, every "less like this"
// as counter-examples (/api/query-together); the stored files are fetched to be sent
$("refine").addEventListener("click", async () => {
  const marks = [...marked.values()];
  if (!marks.length || !chosenFiles.length) return;
  const body = new FormData();
  body.append("files", chosenFiles[0]);
  $("refine").disabled = true;
  showMessage("Searching with your examples…");
  try {
    for (const { neighbor, kind } of marks) {
      const response = await api(neighbor.file_url);
      if (!response.ok) throw new Error(`#${neighbor.rank} cannot be used as an example (its file is not served here)`);
      body.append(kind === "like" ? "files" : "unlike", await response.blob(), neighbor.file_name || `image-${neighbor.id}`);
    }
    filterFields(body);
    body.delete("labels");  // the label drop-downs are not taken here: the free-text filter is
    body.append("per_patient", $("per-patient").checked ? "1" : "0");
    if (features.otherPatients) body.append("other_patients", $("other-patients").checked ? "1" : "0");
    if (features.focus) body.append("focus", chosenFocus());
    const response = await api("/api/query-together", { method: "POST", body });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(describeDetail(answer.detail, `${response.status} ${response.statusText}`));
    lastAnswer = { ...answer, query: answer.queries[0] };
    segOffer = null;  // a search with several examples has no one query series
    showNeighbors(answer);
    $("downloads").classList.toggle("hidden", !answer.neighbors.length);
    const unlike = answer.unlike.length ? `, less like ${answer.unlike.length}` : "";
    showMessage(`Searched like ${answer.queries.length} example${answer.queries.length === 1 ? "" : "s"}${unlike}.` +
      (answer.neighbors.length ? "" : " " + emptyText()));
  } catch (error) {
    if (!(error instanceof NeedsToken)) showMessage(String(error.message || error), true);
    updateRefine();
  }
});

async function showSliceAnswer(answer) {
  $("query-overlay").src = await picture(answer.overlay);
  $("query-name").textContent = answer.query;
  // a picture without lungs has no lung fraction to speak of (and the server draws no contour)
  const noLungs = answer.quality === "no-lungs";
  $("lung-fraction").textContent = noLungs ? "" : percent(answer.lung_fraction);
  $("lung-fraction-line").classList.toggle("hidden", noLungs);
  show($("query-note"), answer.note);
  show($("quality"), qualityText(answer));
  show($("warning"), answer.warning);
  $("query-tags").textContent = queryTags(answer.query_tags);
  // the focus does not apply to a region search (the API says which was asked, not used)
  show($("focus-used"), answer.region ? null : focusText(answer.focus));
  show($("region-used"), answer.region ? `Region search: the box ${answer.region.bbox.join(",")} ` +
    `(${boxSize(answer.region.bbox)}, area ${answer.region.area} px) of the query slice, outlined in cyan; ` +
    "the results are stored regions like it." : null);
  setRegionSlice(answer);
  $("mask-link").href = await picture(answer.mask);
  $("mask-link").download = stem(answer.query) + "_mask.png";
  shownQuery = { name: answer.query, pixels: answer.pixels, mask: answer.mask, lesion: answer.lesion,
    region: answer.region ? answer.region.bbox : null };
  segOffer = answer.seg || null;
  showNeighbors(answer);
  $("answer").classList.remove("hidden");
  // nothing to download over an empty list
  $("downloads").classList.toggle("hidden", !answer.neighbors.length);
  showMessage(answer.warning || (answer.neighbors.length ? "" : answer.note || emptyText()));
}

// ---------------------------------------------------------------------------------------------
// the region tool: a box drawn on the query picture (or typed), in pixels of the query slice
// (x1 and y1 exclusive, as /api/query's region), searched with the same file as the answer shown

const regionTool = { file: null, width: 0, height: 0, drag: null, busy: false };
const REGION_INPUTS = ["region-x0", "region-y0", "region-x1", "region-y1"];

function boxSize(box) { return `${box[2] - box[0]} × ${box[3] - box[1]} px`; }

function setRegionSlice(answer) {
  regionTool.width = answer.width; regionTool.height = answer.height;
  $("region-size").textContent = `the slice is ${answer.width} × ${answer.height} pixels`;
  REGION_INPUTS.forEach((id, i) => { $(id).max = String(i % 2 ? answer.height : answer.width); });
  showRegionBox(typedRegion());
}

// the typed box when it is one /api/query takes (integers inside the slice, not empty), else null
function typedRegion() {
  const values = REGION_INPUTS.map((id) => $(id).value.trim());
  if (values.some((value) => !/^\d+$/.test(value))) return null;
  const [x0, y0, x1, y1] = values.map(Number);
  const inside = x0 < x1 && y0 < y1 && x1 <= regionTool.width && y1 <= regionTool.height;
  return inside ? [x0, y0, x1, y1] : null;
}

function showRegionBox(box, drawing = false) {
  const element = $("region-box");
  element.classList.toggle("hidden", !box);
  element.classList.toggle("drawing", drawing);
  $("region-search").disabled = !box || !regionTool.file;
  if (!box) return;
  // in shares of the slice, so the box stays on its pixels whatever size the picture is shown at
  const [x0, y0, x1, y1] = box;
  Object.assign(element.style, { left: `${100 * x0 / regionTool.width}%`, top: `${100 * y0 / regionTool.height}%`,
    width: `${100 * (x1 - x0) / regionTool.width}%`, height: `${100 * (y1 - y0) / regionTool.height}%` });
}

function setRegion(box, drawing = false) {
  REGION_INPUTS.forEach((id, i) => { $(id).value = box ? String(box[i]) : ""; });
  showRegionBox(box, drawing);
}

function clearRegion() { setRegion(null); }

function openRegionTool(open = true) {
  $("region-tool").classList.toggle("hidden", !open);
  $("region-toggle").setAttribute("aria-expanded", String(open));
}

// a point of the picture in slice pixels: the picture is scaled to its box (any zoom of the page),
// so the shares of its shown size are shares of the slice's
function slicePoint(event) {
  const rect = $("query-overlay").getBoundingClientRect();
  const share = (value, start, size) => Math.max(0, Math.min(1, (value - start) / Math.max(size, 1e-6)));
  return [share(event.clientX, rect.left, rect.width) * regionTool.width,
    share(event.clientY, rect.top, rect.height) * regionTool.height];
}

// the pixels the drag covers: from the pixel under its start to the one under its end, inclusive
function dragBox(start, end) {
  const x0 = Math.floor(Math.min(start[0], end[0])), y0 = Math.floor(Math.min(start[1], end[1]));
  const x1 = Math.min(regionTool.width, Math.floor(Math.max(start[0], end[0])) + 1);
  const y1 = Math.min(regionTool.height, Math.floor(Math.max(start[1], end[1])) + 1);
  return [Math.min(x0, x1 - 1), Math.min(y0, y1 - 1), x1, y1];
}

const queryFrame = $("query-frame");
queryFrame.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 || !regionTool.width || !$("query-overlay").src) return;
  event.preventDefault();
  queryFrame.setPointerCapture(event.pointerId);
  regionTool.drag = slicePoint(event);
  openRegionTool();
  setRegion(dragBox(regionTool.drag, regionTool.drag), true);
});
queryFrame.addEventListener("pointermove", (event) => {
  if (regionTool.drag) setRegion(dragBox(regionTool.drag, slicePoint(event)), true);
});
["pointerup", "pointercancel"].forEach((name) => queryFrame.addEventListener(name, (event) => {
  if (!regionTool.drag) return;
  setRegion(dragBox(regionTool.drag, slicePoint(event)));
  regionTool.drag = null;
}));
REGION_INPUTS.forEach((id) => $(id).addEventListener("input", () => showRegionBox(typedRegion())));
$("region-toggle").addEventListener("click", () => {
  const open = $("region-tool").classList.contains("hidden");
  openRegionTool(open);
  if (open) $("region-x0").focus();
});
$("region-clear").addEventListener("click", () => { clearRegion(); $("region-x0").focus(); });
$("region-tool").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.target.tagName === "INPUT") { event.preventDefault(); $("region-search").click(); }
});

// the same file again with the box as /api/query's region; a refusal (a store without regions,
// a box outside the slice) is said in one line and the answer shown stays
$("region-search").addEventListener("click", async () => {
  const box = typedRegion();
  if (!box || !regionTool.file || regionTool.busy) return;
  // busy rather than disabled: a disabled button would drop the keyboard focus during the search
  regionTool.busy = true;
  $("region-search").setAttribute("aria-busy", "true");
  // the answer is hidden while it is replaced, which drops the focus: it goes back where it was
  const focused = $("region-tool").contains(document.activeElement) ? document.activeElement : null;
  const body = new FormData();
  body.append("file", regionTool.file);
  filterFields(body);
  body.append("per_patient", $("per-patient").checked ? "1" : "0");
  if (features.otherPatients) body.append("other_patients", $("other-patients").checked ? "1" : "0");
  body.append("region", box.join(","));
  showMessage(`Searching the stored regions like the box ${box.join(",")}…`);
  try {
    const response = await api("/api/query", { method: "POST", body });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(describeDetail(answer.detail, `${response.status} ${response.statusText}`));
    clearAnswer();
    lastAnswer = answer;
    await showSliceAnswer(answer);
    if (!answer.warning) showMessage(`Searched the region ${box.join(",")}: ${answer.neighbors.length} stored ` +
      `region${answer.neighbors.length === 1 ? "" : "s"} found.` + (answer.neighbors.length ? "" : " " + emptyText()));
  } catch (error) {
    if (!(error instanceof NeedsToken)) showMessage(String(error.message || error), true);
  } finally {
    regionTool.busy = false;
    $("region-search").removeAttribute("aria-busy");
    showRegionBox(typedRegion());
    if (focused && document.activeElement !== focused) focused.focus();
  }
});

function showSeriesAnswer(answer) {
  segOffer = answer.seg || null;
  const failed = (answer.failed || []).length ? ` · ${answer.failed.length} files could not be read: ` +
    answer.failed.slice(0, 3).map((f) => `${f.file} (${f.reason})`).join("; ") : "";
  const focus = focusText(answer.focus);
  $("series-summary").textContent = `${answer.query}: ${answer.slices} slice${answer.slices === 1 ? "" : "s"} ` +
    `queried as one series${focus ? " · " + focus : ""}${failed}`;
  show($("series-note"), answer.note);
  show($("series-label-summary"), summaryText(answer.label_summary, answer.cases.length) || null);
  $("cases").replaceChildren(...answer.cases.map((match) => {
    const item = document.createElement("li");
    item.className = "case";
    const head = document.createElement("h3");
    head.textContent = `#${match.rank} · score ${match.score.toFixed(3)} · patient ${text(match.patient_id)}`;
    const pairs = document.createElement("div");
    pairs.className = "grid";
    match.pairs.forEach((pair) => {
      const neighbor = { ...pair.neighbor };
      // the comparison can scroll both series together: the query's slices and the case's aligned ones
      const element = card(neighbor, (from) => openDetail(seriesQuery(pair.query), neighbor, from,
        { slices: answer.query_slices || [], aligned: match.aligned || [] }), pair.query.level);
      const caption = document.createElement("div");
      caption.className = "pair-query";
      caption.textContent = `query slice ${pair.query.query_slice + 1} (${pair.query.name})`;
      element.querySelector(".info").prepend(caption);
      pairs.append(element);
    });
    item.append(head, pairs);
    return item;
  }));
  $("series-answer").classList.remove("hidden");
  // the server says why nothing came back (no lungs in any slice, ...); else the filter is why
  showMessage(answer.cases.length ? "" : answer.note || emptyText(), !answer.cases.length && !!answer.note);
}

// why a search found nothing, when the server does not say: a filter, or an empty store
function emptyText() {
  const filtered = $("where").value.trim() || document.querySelector("#label-filters option:checked");
  return filtered ? "No stored case matches the filter." : "No stored case found.";
}

function seriesQuery(slice) {
  return { name: slice.name, pixels: slice.pixels, mask: slice.mask, lesion: slice.lesion, slice: slice.query_slice,
    level: slice.level };
}

const FOCUS_NAMES = { anatomy: "anatomy", findings: "findings", balanced: "both (balanced)" };

// what the answer was searched for; nothing when the focus changes nothing (or the server does not say)
function focusText(focus) {
  return known(focus) && features.focusAvailable ? `Similar by ${FOCUS_NAMES[focus] || focus}` : null;
}

function chosenFocus() {
  const checked = document.querySelector('#focus-box input[name="focus"]:checked');
  return checked ? checked.value : "balanced";
}

// shown whenever the server takes a focus; disabled, with a note, when it changes nothing
function updateFocusControl() {
  $("focus-box").classList.toggle("hidden", !features.focus);
  $("focus-box").disabled = !features.focusAvailable;
  $("focus-note").classList.toggle("hidden", features.focusAvailable);
}

function stem(name) { return String(name || "query").replace(/(\.nii)?\.[^.]*$/, ""); }

function filterFields(body) {
  body.append("k", $("k").value);
  body.append("where", $("where").value);
  const chosen = {};
  document.querySelectorAll("#label-filters select").forEach((select) => {
    const values = [...select.selectedOptions].map((option) => option.value);
    if (values.length) chosen[select.dataset.key] = values;
  });
  body.append("labels", Object.keys(chosen).length ? JSON.stringify(chosen) : "");
}

$("query-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!chosenFiles.length) return;
  const started = performance.now();
  timing.clickToAnswer = timing.clickToThumbnails = null;
  const series = $("as-series").checked;
  const body = new FormData();
  if (series) chosenFiles.forEach((file) => body.append("files", file));
  else body.append("file", chosenFiles[0]);
  filterFields(body);
  if (!series) body.append("per_patient", $("per-patient").checked ? "1" : "0");
  if (features.otherPatients) body.append("other_patients", $("other-patients").checked ? "1" : "0");
  if (features.focus) body.append("focus", chosenFocus());
  $("search").disabled = true;
  showMessage(series ? "Segmenting the series and searching…" : "Segmenting and searching…");
  try {
    const response = await api(series ? "/api/query-series" : "/api/query", { method: "POST", body });
    let answer;
    try { answer = await response.json(); } catch (error) { answer = {}; }
    if (!response.ok) throw new Error(describeDetail(answer.detail, `${response.status} ${response.statusText}`));
    clearAnswer();
    lastAnswer = answer;
    clearRegion();
    regionTool.file = series ? null : chosenFiles[0];
    if (series) showSeriesAnswer(answer); else await showSliceAnswer(answer);
    timing.clickToAnswer = performance.now() - started;
    const images = [...document.querySelectorAll("#results img, #cases img")];
    Promise.all(images.map((image) => image.decode().catch(() => null))).then(() => {
      timing.clickToThumbnails = performance.now() - started;
    });
  } catch (error) {
    clearAnswer();  // never leave the previous query's results under the new file's name
    showMessage(error instanceof NeedsToken ? "Enter the access token, then search again."
      : String(error.message || error), true);
  } finally {
    $("search").disabled = !chosenFiles.length;
  }
});

// the result list, client-side from the answer shown
function rows() {
  if (!lastAnswer) return [];
  const focus = lastAnswer.focus;  // the search focus each row was found with
  if (lastAnswer.neighbors) return lastAnswer.neighbors.map((n) => ({ ...n, query: lastAnswer.query, focus,
    ...(n.region ? { region_id: n.region.id, region_bbox: n.region.bbox.join(" "), region_area: n.region.area,
      region_source: n.region.source } : {}) }));
  return lastAnswer.cases.flatMap((match) => match.pairs.map((pair) => ({ case_rank: match.rank, case_score: match.score,
    query: pair.query.name, focus, query_slice: pair.query.query_slice, ...pair.neighbor })));
}

function save(content, name, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([content], { type }));
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function csvCell(value) {
  const textValue = value === null || value === undefined ? "" : typeof value === "object" ? labelText(value) : String(value);
  return /[",\n]/.test(textValue) ? `"${textValue.replace(/"/g, '""')}"` : textValue;
}

$("download-csv").addEventListener("click", () => {
  const columns = ["query", "focus", "case_rank", "case_score", "query_slice", "rank", "score", "id", "patient_id", "study_uid",
    "series_uid", "instance_number", "slice_index", "slice_location", "file_name", "region_id", "region_bbox",
    "region_area", "region_source", "labels"];
  const list = rows();
  const used = columns.filter((column) => list.some((row) => column in row));
  save([used.join(","), ...list.map((row) => used.map((c) => csvCell(row[c])).join(","))].join("\n") + "\n",
    stem(lastAnswer && lastAnswer.query) + "_results.csv", "text/csv");
});
$("download-json").addEventListener("click", () => {
  save(JSON.stringify(lastAnswer, null, 2), stem(lastAnswer && lastAnswer.query) + "_results.json", "application/json");
});

// ---------------------------------------------------------------------------------------------
// pixels: a 16-bit grey PNG decoded here (a canvas would keep only 8 bits of it)

function paeth(a, b, c) {
  const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

async function decodeGreyPng(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  let width = 0, height = 0, depth = 8, colour = 0;
  const chunks = [];
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    if (type === "IHDR") {
      width = view.getUint32(at + 8); height = view.getUint32(at + 12); depth = bytes[at + 16]; colour = bytes[at + 17];
    } else if (type === "IDAT") chunks.push(bytes.subarray(at + 8, at + 8 + length));
    else if (type === "IEND") break;
    at += 12 + length;
  }
  if (colour !== 0 || (depth !== 8 && depth !== 16)) throw new Error("not a grey PNG");
  const stream = new Blob(chunks).stream().pipeThrough(new DecompressionStream("deflate"));
  const raw = new Uint8Array(await new Response(stream).arrayBuffer());
  const bpp = depth / 8, stride = width * bpp;
  const out = new Uint8Array(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = y * stride;
    for (let x = 0; x < stride; x++) {
      const left = x >= bpp ? out[row + x - bpp] : 0;
      const up = y ? out[row - stride + x] : 0;
      const upLeft = y && x >= bpp ? out[row - stride + x - bpp] : 0;
      const value = line[x];
      out[row + x] = (filter === 0 ? value : filter === 1 ? value + left : filter === 2 ? value + up
        : filter === 3 ? value + ((left + up) >> 1) : value + paeth(left, up, upLeft)) & 255;
    }
  }
  const values = new Uint16Array(width * height);
  for (let i = 0; i < values.length; i++) values[i] = depth === 16 ? (out[2 * i] << 8) | out[2 * i + 1] : out[i];
  return { width, height, values };
}

async function loadPixels(url) {
  const response = await api(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  const kind = response.headers.get("X-Pixel-Kind") || "display";
  return { ...(await decodeGreyPng(await response.arrayBuffer())), kind };
}

// a 0/255 mask PNG drawn on a canvas of its size: the canvas, its context and its pixels
async function loadMask(url) {
  const response = await api(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  const bitmap = await createImageBitmap(await response.blob());
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  return { canvas, context, pixels: context.getImageData(0, 0, bitmap.width, bitmap.height) };
}

async function loadContour(url) {
  const { canvas, context, pixels: mask } = await loadMask(url);
  const { width, height, data } = mask;
  const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && data[4 * (y * width + x)] > 127;
  const edge = context.createImageData(width, height);
  const thick = Math.max(1, Math.round(Math.max(width, height) / 512));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!inside(x, y)) continue;
      let border = false;
      for (let d = 1; d <= thick && !border; d++) {
        border = !inside(x - d, y) || !inside(x + d, y) || !inside(x, y - d) || !inside(x, y + d);
      }
      if (border) { const i = 4 * (y * width + x); edge.data.set([255, 200, 0, 255], i); }
    }
  }
  context.clearRect(0, 0, width, height);
  context.putImageData(edge, 0, 0);
  return canvas;
}

// ---------------------------------------------------------------------------------------------
// the comparison view: two canvases, one zoom/pan, window/level per image kind

const viewState = { zoom: 1, panX: 0, panY: 0, preset: "lung", width: 1500, level: -600, contours: true,
  lesions: false };

// a lesion map (0/255 PNG) as a translucent red layer
async function loadLesion(url) {
  const { canvas, context, pixels: map } = await loadMask(url);
  let pixels = 0;
  for (let i = 0; i < map.data.length; i += 4) {
    const on = map.data[i] > 127;
    pixels += on;
    map.data.set(on ? [230, 30, 30, 110] : [0, 0, 0, 0], i);
  }
  context.putImageData(map, 0, 0);
  canvas.lesionPixels = pixels;
  return canvas;
}

class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    this.image = null;
    this.contour = null;
    this.grey = null;  // the image in the current window, native size
    this.lesionUrl = null; this.lesion = null;  // the lesion map: fetched when first shown
    this.region = null;  // [x0, y0, x1, y1] in pixels of the slice, or null
  }

  setLesion(url) { this.lesionUrl = url || null; this.lesion = null; }

  // the lesion layer, fetched once it is asked for (a stored slice's map runs the model)
  async ensureLesion() {
    if (!viewState.lesions || this.lesion || !this.lesionUrl) return;
    const url = this.lesionUrl;
    const lesion = await loadLesion(url).catch(() => null);
    if (url === this.lesionUrl) { this.lesion = lesion; this.render(); updateLesionText(); }
  }

  set(image, contour) {
    this.image = image; this.contour = contour; this.grey = null;
    if (image) { this.canvas.width = image.width; this.canvas.height = image.height; }
  }

  // HU images follow the shared window; 8-bit images are shown as stored unless dragged
  windowFor() {
    if (this.image.kind === "hu") return [viewState.width, viewState.level + HU_OFFSET];
    return [256 * viewState.storedWidth, 127.5 + 256 * viewState.storedShift];
  }

  windowText() {
    if (!this.image) return "";
    if (this.image.kind === "hu") return `W ${Math.round(viewState.width)} L ${Math.round(viewState.level)} (HU)`;
    const changed = viewState.storedWidth !== 1 || viewState.storedShift !== 0;
    return `8-bit picture, no HU: ${changed ? "contrast changed by dragging" : "shown as stored"}`;
  }

  render() {
    if (!this.image) return;
    const { width, height, values } = this.image;
    const [windowWidth, centre] = this.windowFor();
    if (!this.grey || this.grey.key !== `${windowWidth}/${centre}`) {
      const canvas = new OffscreenCanvas(width, height);
      const context = canvas.getContext("2d");
      const data = context.createImageData(width, height);
      const low = centre - windowWidth / 2, scale = 255 / Math.max(windowWidth, 1e-6);
      for (let i = 0; i < values.length; i++) {
        const grey = Math.max(0, Math.min(255, (values[i] - low) * scale));
        data.data[4 * i] = data.data[4 * i + 1] = data.data[4 * i + 2] = grey;
        data.data[4 * i + 3] = 255;
      }
      context.putImageData(data, 0, 0);
      this.grey = { key: `${windowWidth}/${centre}`, canvas };
    }
    const context = this.canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = "#000";
    context.fillRect(0, 0, width, height);
    // zoom about the centre, pan in image pixels: the same numbers for both viewers
    context.setTransform(viewState.zoom, 0, 0, viewState.zoom,
      width / 2 * (1 - viewState.zoom) + viewState.panX * viewState.zoom,
      height / 2 * (1 - viewState.zoom) + viewState.panY * viewState.zoom);
    context.imageSmoothingEnabled = viewState.zoom < 2;
    context.drawImage(this.grey.canvas, 0, 0);
    if (viewState.contours && this.contour) context.drawImage(this.contour, 0, 0, width, height);
    if (viewState.lesions && this.lesion) context.drawImage(this.lesion, 0, 0, width, height);
    if (this.region) {  // the query's box, or the stored region found: cyan, as on the server's pictures
      const [x0, y0, x1, y1] = this.region;
      context.strokeStyle = "#00e5ff";
      const line = Math.max(1, Math.max(width, height) / 256) / viewState.zoom;
      context.lineWidth = line;
      context.strokeRect(x0 - line / 2, y0 - line / 2, x1 - x0 + line, y1 - y0 + line);  // around, not over, it
    }
  }
}

viewState.storedWidth = 1; viewState.storedShift = 0;
const viewers = { query: new Viewer($("query-canvas")), neighbor: new Viewer($("neighbor-canvas")) };
const detail = { opener: null, series: [], position: null, neighbor: null, query: null, loading: 0, queryLoading: 0,
  querySlices: [], aligned: [] };

function updateLesionText() {
  const said = (viewer) => !viewState.lesions ? "" : !viewer.lesion ? " · lesions: loading"
    : viewer.lesion.lesionPixels ? " · lesions in red" : " · no lesion found";
  $("detail").dataset.lesions = viewState.lesions ? [viewers.query, viewers.neighbor]
    .map((v) => v.lesion ? String(v.lesion.lesionPixels) : "-").join("/") : "off";
  $("query-lesion-text").textContent = said(viewers.query);
  $("neighbor-lesion-text").textContent = said(viewers.neighbor);
}

function renderAll() {
  viewers.query.render(); viewers.neighbor.render();
  updateLesionText();
  Object.values(viewers).forEach((viewer) => viewer.ensureLesion());
  // each side says how it is shown: an 8-bit picture (a PNG/TIFF export) has no HU to window
  $("query-window").textContent = viewers.query.windowText();
  $("neighbor-window").textContent = viewers.neighbor.windowText();
  $("detail").dataset.zoom = viewState.zoom.toFixed(3);
  $("detail").dataset.window = `${Math.round(viewState.width)}/${Math.round(viewState.level)}`;
}

function applyPreset(name) {
  viewState.preset = name;
  if (name in PRESETS) [viewState.width, viewState.level] = PRESETS[name];
  viewState.storedWidth = 1; viewState.storedShift = 0;
  $("preset").value = name;
  renderAll();
}

function zoomBy(factor) {
  viewState.zoom = Math.max(0.5, Math.min(16, viewState.zoom * factor));
  renderAll();
}

$("preset").addEventListener("change", () => applyPreset($("preset").value));
$("zoom-in").addEventListener("click", () => zoomBy(1.25));
$("zoom-out").addEventListener("click", () => zoomBy(0.8));
$("zoom-reset").addEventListener("click", () => { viewState.zoom = 1; viewState.panX = viewState.panY = 0; renderAll(); });
$("contours").addEventListener("change", () => { viewState.contours = $("contours").checked; renderAll(); });
$("lock").addEventListener("change", () => {
  const pair = detail.aligned[alignedIndex()];  // locked again: the case's slice at the query's level
  if (locked() && pair) showNeighbor(pair.id, detail.neighbor); else updateLockedPosition();
});
$("lesions").addEventListener("change", () => { viewState.lesions = $("lesions").checked; renderAll(); });
$("slice-prev").addEventListener("click", () => step(-1));
$("slice-next").addEventListener("click", () => step(1));

// a point of a viewer's canvas in pixels of its slice: the canvas is scaled to fit its square box
// (object-fit: contain), then the view's zoom about the centre and its pan are undone
function viewerPoint(viewer, event) {
  const rect = viewer.canvas.getBoundingClientRect();
  const { width, height } = viewer.canvas;
  const fit = Math.min(rect.width / width, rect.height / height);
  const cx = (event.clientX - rect.left - (rect.width - width * fit) / 2) / fit;
  const cy = (event.clientY - rect.top - (rect.height - height * fit) / 2) / fit;
  const clamp = (value, size) => Math.max(0, Math.min(size, value));
  return [clamp((cx - width / 2) / viewState.zoom + width / 2 - viewState.panX, width),
    clamp((cy - height / 2) / viewState.zoom + height / 2 - viewState.panY, height)];
}

// "Draw a region" on: a drag on the query side draws the box (in the answer's region fields)
// instead of changing the window, at whatever zoom and pan the view has
function drawingRegion(viewer) { return viewer === viewers.query && $("draw-region").getAttribute("aria-pressed") === "true"; }

$("draw-region").addEventListener("click", () => {
  const on = $("draw-region").getAttribute("aria-pressed") !== "true";
  $("draw-region").setAttribute("aria-pressed", String(on));
  $("query-canvas").classList.toggle("drawing", on);
});
$("detail-region-search").addEventListener("click", () => {
  $("detail").close();
  $("region-search").click();
});

function updateDetailRegion() { $("detail-region-search").disabled = !typedRegion() || !regionTool.file; }

Object.values(viewers).forEach((viewer) => {
  let drag = null;
  viewer.canvas.addEventListener("pointerdown", (event) => {
    viewer.canvas.setPointerCapture(event.pointerId);
    if (drawingRegion(viewer) && viewer.image) {
      drag = { region: viewerPoint(viewer, event) };
      viewer.region = dragBox(drag.region, drag.region);
      renderAll();
      return;
    }
    drag = { x: event.clientX, y: event.clientY, pan: event.shiftKey || event.button === 1 };
    viewer.canvas.setPointerCapture(event.pointerId);
  });
  viewer.canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    if (drag.region) { viewer.region = dragBox(drag.region, viewerPoint(viewer, event)); renderAll(); return; }
    const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    drag.x = event.clientX; drag.y = event.clientY;
    const scale = viewer.canvas.width / viewer.canvas.getBoundingClientRect().width;
    if (drag.pan) {
      viewState.panX += dx * scale / viewState.zoom; viewState.panY += dy * scale / viewState.zoom;
    } else {  // right: wider window, down: higher level (as in PACS viewers)
      viewState.width = Math.max(1, viewState.width + 4 * dx);
      viewState.level += 4 * dy;
      viewState.storedWidth = Math.max(0.02, viewState.storedWidth + dx / 200);
      viewState.storedShift += dy / 200;
      viewState.preset = "custom";
      $("preset").value = "custom";  // no longer the preset: choosing it again restores it
    }
    renderAll();
  });
  viewer.canvas.addEventListener("pointerup", (event) => {
    if (drag && drag.region) {  // the box goes to the answer's fields, searched from here or there
      viewer.region = dragBox(drag.region, viewerPoint(viewer, event));
      setRegion(viewer.region);
      openRegionTool();
      updateDetailRegion();
      renderAll();
    }
    drag = null;
  });
  viewer.canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (event.ctrlKey) zoomBy(event.deltaY < 0 ? 1.15 : 1 / 1.15);
    else step(event.deltaY > 0 ? 1 : -1);
  }, { passive: false });
});

$("detail").addEventListener("keydown", (event) => {
  if (event.target.tagName === "SELECT" || event.target.tagName === "INPUT") return;
  if (event.key === "ArrowDown" || event.key === "PageDown") { event.preventDefault(); step(1); }
  else if (event.key === "ArrowUp" || event.key === "PageUp") { event.preventDefault(); step(-1); }
  else if (event.key === "+" || event.key === "=") zoomBy(1.25);
  else if (event.key === "-") zoomBy(0.8);
  else if (event.key === "0") $("zoom-reset").click();
});
$("detail").addEventListener("close", () => {
  // back where the reader was, but only from nowhere: the close event comes a task after the
  // dialog shut, by when the browser may have restored the focus and the reader tabbed on
  const dialog = $("detail");
  const lost = document.activeElement === document.body || dialog.contains(document.activeElement);
  if (lost && detail.opener && detail.opener.isConnected) detail.opener.focus();
});

const LABELS = [["file_name", "File"], ["patient_id", "Patient"], ["identity_source", "Patient from"],
  ["study_date", "Study date"], ["series_description", "Series description"],
  ["study_uid", "Study"], ["series_uid", "Series"], ["instance_number", "Image (InstanceNumber)"],
  ["slice_index", "Position in stored series"], ["slice_location", "Slice location"], ["source_format", "Format"],
  ["size", "Size"], ["lung_fraction", "Lung fraction"]];

function metaRows(meta, neighbor) {
  const value = {
    ...meta,
    size: known(meta.width) ? `${meta.width} × ${meta.height} px` : null,
    slice_index: known(meta.slice_index) ? meta.slice_index + 1 : null,
    slice_location: known(meta.slice_location) ? `${Number(meta.slice_location).toFixed(1)} mm` : null,
    lung_fraction: percent(meta.lung_fraction),
    study_date: studyDate(meta.study_date),
    identity_source: neighbor && neighbor.identity_source,
  };
  const rowsShown = [];
  if (neighbor) rowsShown.push(["Rank", `#${neighbor.rank}`], ["Score", neighbor.score.toFixed(3)]);
  // the patient always: "–" says it is not known (a PNG export), rather than hiding the row
  LABELS.forEach(([key, label]) => { if (known(value[key]) || key === "patient_id") rowsShown.push([label, value[key]]); });
  Object.entries(meta.labels || {}).forEach(([k, v]) => rowsShown.push([k, v]));
  if (meta.url) rowsShown.push(["Archive URL", meta.url]);
  return rowsShown;
}

async function showNeighbor(id, neighbor) {
  const ticket = ++detail.loading;
  const meta = await (await api(`/api/images/${id}`)).json();
  const [pixels, contour] = await Promise.all([loadPixels(meta.pixels_url), loadContour(meta.mask_url).catch(() => null)]);
  if (ticket !== detail.loading) return;  // a later step won
  viewers.neighbor.set(pixels, contour);
  viewers.neighbor.setLesion(meta.lesion_url);
  const ranked = neighbor && neighbor.id === id ? neighbor : null;
  viewers.neighbor.region = ranked && ranked.region ? ranked.region.bbox : null;  // not on adjacent slices
  $("detail-meta").replaceChildren(...metaRows(meta, ranked).map(([k, v]) => {
    const row = document.createElement("tr");
    const key = document.createElement("th"); key.scope = "row"; key.textContent = k;
    const cell = document.createElement("td"); cell.textContent = text(v);
    row.append(key, cell);
    return row;
  }));
  $("detail-score").textContent = ranked ? `Score ${ranked.score.toFixed(3)}: ${SCORE_HELP}.`
    : "An adjacent slice of the stored series (not ranked).";
  $("neighbor-caption").textContent = `Stored: patient ${text(meta.patient_id)}${sliceText(meta) ? " · " + sliceText(meta) : ""}`;
  $("detail").dataset.neighborId = id;
  const fileLink = $("file-link");
  fileLink.download = meta.file_name || "";
  fileLink.dataset.url = meta.file_url;
  fileLink.href = "#";
  $("neighbor-mask-link").download = stem(meta.file_name) + "_mask.png";
  $("neighbor-mask-link").dataset.url = meta.mask_url;
  $("neighbor-mask-link").href = "#";
  // the site's own viewer (serve --viewer-url), in a new tab; only for slices with a study
  $("viewer-part").hidden = !meta.viewer_url;
  if (meta.viewer_url) $("viewer-link").href = meta.viewer_url;
  detail.position = detail.series.indexOf(id);
  $("slice-position").textContent = detail.series.length > 1 && detail.position >= 0
    ? `slice ${detail.position + 1} of ${detail.series.length} stored` : "no other stored slice";
  $("slice-prev").disabled = !(detail.position > 0);
  $("slice-next").disabled = !(detail.position >= 0 && detail.position < detail.series.length - 1);
  updateLockedPosition();
  renderAll();
}

// downloads behind the token: fetched with the header, handed over as a blob
["file-link", "neighbor-mask-link"].forEach((id) => $(id).addEventListener("click", async (event) => {
  const link = event.currentTarget;
  if (link.href.startsWith("blob:")) return;
  event.preventDefault();
  try {
    const response = await api(link.dataset.url);
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      throw new Error(describeDetail(answer.detail, String(response.status)));
    }
    link.href = URL.createObjectURL(await response.blob());
    link.click();
  } catch (error) { $("detail-score").textContent = "Download failed: " + (error.message || error); }
}));

// a series query opened from one of its pairs: both sides step together, locked by lung level
// (the query's slices with lungs in order, each with the case's slice at its level: "aligned")
function locked() { return detail.aligned.length > 1 && $("lock").checked; }
function alignedIndex() { return detail.aligned.findIndex((pair) => pair.query_slice === detail.query.slice); }
function level(value) { return typeof value === "number" ? value.toFixed(2) : "–"; }

function showQuery(query, pixels, contour) {
  viewers.query.set(pixels, contour);
  viewers.query.setLesion(query.lesion);
  viewers.query.region = query.region || null;
  $("query-caption").textContent = `Query: ${query.name}${known(query.slice) ? " · slice " + (query.slice + 1) : ""}` +
    (typeof query.level === "number" ? ` · level ${level(query.level)}` : "");
  $("detail").dataset.querySlice = known(query.slice) ? String(query.slice) : "";
}

function updateLockedPosition() {
  $("lock-box").classList.toggle("hidden", detail.aligned.length <= 1);
  const both = locked();
  $("slice-prev").setAttribute("aria-label", both ? "previous slice of both series" : "previous slice of the stored series");
  $("slice-next").setAttribute("aria-label", both ? "next slice of both series" : "next slice of the stored series");
  if (!both) return;
  const at = alignedIndex();
  const pair = detail.aligned[at];
  $("slice-position").textContent = pair ? `query slice ${pair.query_slice + 1} (${at + 1} of ${detail.aligned.length} ` +
    `with lungs) · level ${level(pair.query_level)} ⇄ stored ${level(pair.level)}` : "";
  $("slice-prev").disabled = !(at > 0);
  $("slice-next").disabled = !(at >= 0 && at < detail.aligned.length - 1);
}

async function stepLocked(direction) {
  const next = alignedIndex() + direction;
  if (alignedIndex() < 0 || next < 0 || next >= detail.aligned.length) return;
  const pair = detail.aligned[next];
  const slice = detail.querySlices.find((item) => item.query_slice === pair.query_slice);
  if (!slice) return;
  const query = seriesQuery(slice);
  detail.query = query;  // at once, so that a quick second step goes on from here
  updateLockedPosition();
  const ticket = ++detail.queryLoading;
  const [pixels, contour] = await Promise.all([loadPixels(query.pixels), loadContour(query.mask).catch(() => null)]);
  if (ticket === detail.queryLoading) showQuery(query, pixels, contour);
  await showNeighbor(pair.id, detail.neighbor);
}

async function step(direction) {
  if (locked()) { await stepLocked(direction); return; }
  if (detail.position === null || detail.position < 0) return;
  const next = detail.position + direction;
  if (next < 0 || next >= detail.series.length) return;
  detail.position = next;
  await showNeighbor(detail.series[next], detail.neighbor);
}

async function openDetail(query, neighbor, opener, seriesQueried = null) {
  detail.opener = opener; detail.neighbor = neighbor; detail.query = query;
  detail.series = [];
  detail.querySlices = seriesQueried ? seriesQueried.slices : [];
  detail.aligned = seriesQueried ? seriesQueried.aligned : [];
  try {
    const [queryPixels, queryContour, series] = await Promise.all([
      loadPixels(query.pixels), loadContour(query.mask).catch(() => null),
      api(`/api/images/${neighbor.id}/series`).then((r) => r.json()).catch(() => ({ ids: [] }))]);
    detail.series = series.ids || [];
    showQuery(query, queryPixels, queryContour);
    showSegOffer();
    // a region is searched in the answer's one query slice, not in a series' slices
    $("region-draw-part").classList.toggle("hidden", Boolean(seriesQueried) || !regionTool.file);
    $("draw-region").setAttribute("aria-pressed", "false");
    $("query-canvas").classList.remove("drawing");
    if (!seriesQueried && typedRegion()) viewers.query.region = typedRegion();  // the box drawn so far
    updateDetailRegion();
    viewState.zoom = 1; viewState.panX = viewState.panY = 0;
    $("detail-title").textContent = `Query and #${neighbor.rank} side by side`;
    await showNeighbor(neighbor.id, neighbor);
    applyPreset(queryPixels.kind === "hu" || viewers.neighbor.image.kind === "hu" ? "lung" : "stored");
  } catch (error) {
    if (!(error instanceof NeedsToken)) showMessage("Cannot open the comparison: " + (error.message || error), true);
    return;
  }
  if (!$("detail").open) $("detail").showModal();
  $("detail-close").focus();
}

// the query's DICOM SEG (lung and lesion segments): downloaded, and stored back in the archive
// the query series came from; an uploaded query says why it is not stored back (or has none)
function showSegOffer() {
  const offer = segOffer || {};
  $("seg-part").classList.toggle("hidden", !offer.download);
  $("seg-store").classList.toggle("hidden", !offer.store);
  $("seg-store").disabled = false;
  $("seg-status").textContent = "";
  $("seg-status").classList.remove("error");
  show($("seg-why"), offer.reason);
}

function segStatus(textValue, isError = false) {
  $("seg-status").textContent = textValue;
  $("seg-status").classList.toggle("error", isError);
}

async function segFailure(response) {
  const answer = await response.json().catch(() => ({}));
  return new Error(describeDetail(answer.detail, `${response.status} ${response.statusText}`));
}

$("seg-download").addEventListener("click", async () => {
  if (!segOffer || !segOffer.download) return;
  segStatus("Making the SEG…");
  try {
    const response = await api(segOffer.download);
    if (!response.ok) throw await segFailure(response);
    const named = /filename="([0-9.]+_seg\.dcm)"/.exec(response.headers.get("Content-Disposition") || "");
    save(await response.blob(), named ? named[1] : stem(lastAnswer && lastAnswer.query) + "_seg.dcm", "application/dicom");
    segStatus("SEG downloaded.");
  } catch (error) {
    if (!(error instanceof NeedsToken)) segStatus("SEG download failed: " + (error.message || error), true);
  }
});

$("seg-store").addEventListener("click", async () => {
  if (!segOffer || !segOffer.store) return;
  $("seg-store").disabled = true;
  segStatus("Storing the SEG in the archive…");
  try {
    const response = await api(segOffer.store, { method: "POST" });
    if (!response.ok) throw await segFailure(response);
    const stored = await response.json();
    segStatus(`Stored in the archive: SEG ${stored.sop_instance_uid} (${stored.segments.join(" + ")}, ` +
      `${stored.frames} frames) in study ${stored.study_uid}.`);
  } catch (error) {
    if (!(error instanceof NeedsToken)) segStatus("Storing the SEG failed: " + (error.message || error), true);
  } finally {
    $("seg-store").disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// what the server offers: stats, label drop-downs, optional form fields

async function refreshStats() {
  try {
    const stats = await (await api("/api/stats")).json();
    $("stats").textContent = `${stats.images} slices · ${stats.patients} patients indexed`;
    features.focusAvailable = stats.focus_available !== false;  // an older server does not say
    updateFocusControl();
  } catch (error) { $("stats").textContent = ""; return; }
  try {
    const answer = await (await api("/api/labels")).json();
    $("label-filters").replaceChildren(...Object.entries(answer.labels || {})
      .filter(([, values]) => values.length > 1 && values.length <= MAX_DROP_DOWN_VALUES)
      .map(([key, values]) => {
        const label = document.createElement("label");
        label.textContent = key;
        const select = document.createElement("select");
        select.multiple = true;
        select.size = Math.min(4, values.length);
        select.dataset.key = key;
        select.id = "label-" + key.replace(/[^A-Za-z0-9_-]/g, "_");
        select.append(...values.map((value) => new Option(value, value)));
        label.append(select);
        return label;
      }));
  } catch (error) { /* no drop-downs: the free-text filter still works */ }
}

async function detectFeatures() {
  try {  // the API description says which optional fields this server's /api/query takes
    const schema = await (await fetch("/openapi.json")).json();
    const components = JSON.stringify(schema.components || {});
    features.otherPatients = components.includes('"other_patients"');
    features.focus = components.includes('"focus"');
  } catch (error) { features.otherPatients = features.focus = false; }
  $("other-patients-box").classList.toggle("hidden", !features.otherPatients);
  updateFocusControl();
}

// a viewer's launch link, /?study=UID[&series=UID]: the query series comes from the server's
// DICOMweb archive (serve --archive), nothing is exported or uploaded
let launchWaitsForToken = false;

async function launchFromArchive() {
  const params = new URLSearchParams(window.location.search);
  const study = params.get("study");
  launchWaitsForToken = false;
  if (!study) return;
  const body = new FormData();
  body.append("study", study);
  if (params.get("series")) body.append("series", params.get("series"));
  filterFields(body);
  if (features.otherPatients) body.append("other_patients", $("other-patients").checked ? "1" : "0");
  if (features.focus) body.append("focus", chosenFocus());
  showMessage(`Fetching study ${study} from the archive and searching…`);
  try {
    const response = await api("/api/query-archive", { method: "POST", body });
    let answer;
    try { answer = await response.json(); } catch (error) { answer = {}; }
    if (!response.ok) throw new Error(describeDetail(answer.detail, `${response.status} ${response.statusText}`));
    clearAnswer();
    lastAnswer = answer;
    showSeriesAnswer(answer);
  } catch (error) {
    clearAnswer();
    launchWaitsForToken = error instanceof NeedsToken;
    showMessage(launchWaitsForToken ? `Enter the access token to fetch study ${study} from the archive.`
      : String(error.message || error), true);
  }
}

detectFeatures().then(launchFromArchive);
refreshStats();
