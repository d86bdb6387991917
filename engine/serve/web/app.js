// psp-engine web page: upload -> POST /v1/invert; sliders -> POST /v1/synthesize (JSON w_plus + edits).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let wPlus = null;      // the inversion's latents, [n_styles][512] (edited by nothing)
let pending = null;    // timer of the debounced re-synthesis
let generation = 0;    // drops answers to older slider moves

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(resp) {
  try { return (await resp.json()).error || resp.statusText; } catch (e) { return resp.statusText; }
}

async function loadInfo() {
  let resp = await fetch("/v1/info");
  while (resp.status === 503) {  // the model is still loading: say so and ask again
    status(`the model is loading: ${await errorText(resp)}`);
    await new Promise((r) => setTimeout(r, 1000 * Number(resp.headers.get("Retry-After") || 1)));
    resp = await fetch("/v1/info");
  }
  if (!resp.ok) { status(`cannot read /v1/info: error ${resp.status}: ${await errorText(resp)}`, true); return; }
  info = await resp.json();
  status("");
  $("model").textContent = `${info.checkpoint}: ${info.output_size} px, ${info.n_styles} styles, ` +
    `backend ${info.backend} (${info.precision}, ${info.device})` + (info.is_demo ? " — DEMO weights" : "");
  const n = info.n_styles;
  $("latent_mask").value = info.default_latent_mask ? rangeText(info.default_latent_mask)
                                                     : `${Math.floor(n / 2)}-${n - 1}`;
  const sliders = $("sliders");
  sliders.textContent = "";
  $("no-edits").hidden = Object.keys(info.edits).length > 0;
  for (const name of Object.keys(info.edits)) {
    const label = document.createElement("label");
    label.textContent = name;
    label.htmlFor = `edit-${name}`;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: "-5", max: "5", step: "0.5", value: "0", id: `edit-${name}` });
    input.dataset.edit = name;
    const value = document.createElement("output");
    value.textContent = "0";
    input.addEventListener("input", () => { value.textContent = input.value; scheduleEdit(); });
    sliders.append(label, input, value);
  }
}

function rangeText(indices) {
  const parts = [];
  for (let i = 0; i < indices.length; i++) {
    let j = i;
    while (j + 1 < indices.length && indices[j + 1] === indices[j] + 1) j++;
    parts.push(i === j ? `${indices[i]}` : `${indices[i]}-${indices[j]}`);
    i = j;
  }
  return parts.join(",");
}

async function invert(event) {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { status("choose a photo first", true); return; }
  if (!info) { status("the model is still loading; try again in a few seconds", true); return; }
  const body = new FormData();
  body.append("image", file);
  body.append("n_outputs", $("n_outputs").value || "0");
  body.append("seed", $("seed").value || "0");
  if (Number($("n_outputs").value) > 0) body.append("latent_mask", $("latent_mask").value);
  status("inverting…");
  $("invert").disabled = true;
  try {
    const t0 = performance.now();
    const resp = await fetch("/v1/invert", { method: "POST", body });
    if (!resp.ok) { status(`error ${resp.status}: ${await errorText(resp)}`, true); return; }
    const out = await resp.json();
    $("input").src = URL.createObjectURL(file);
    $("inversion").src = `data:image/png;base64,${out.image}`;
    const mixes = $("mixes");
    mixes.textContent = "";
    out.mixes.forEach((png, k) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${png}`;
      img.alt = `mix ${k}`;
      img.className = "mix";
      const cap = document.createElement("figcaption");
      cap.textContent = `style mix ${k}`;
      fig.append(img, cap);
      mixes.append(fig);
    });
    wPlus = out.w_plus;
    $("results").hidden = false;
    $("empty").hidden = true;
    $("editing").hidden = Object.keys(info.edits).length === 0;
    $("edited").src = $("inversion").src;
    document.querySelectorAll("#sliders input").forEach((s) => { s.value = "0"; s.nextSibling.textContent = "0"; });
    status(`done in ${Math.round(performance.now() - t0)} ms`);
    document.body.dataset.inverted = "1";
  } catch (e) {
    status(`error: ${e}`, true);
  } finally {
    $("invert").disabled = false;
  }
}

function scheduleEdit() {
  clearTimeout(pending);
  pending = setTimeout(resynthesize, 150);
}

async function resynthesize() {
  if (!wPlus) return;
  const edits = {};
  document.querySelectorAll("#sliders input").forEach((s) => {
    if (Number(s.value) !== 0) edits[s.dataset.edit] = Number(s.value);
  });
  const mine = ++generation;
  status("re-synthesizing…");
  const resp = await fetch("/v1/synthesize", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ w_plus: wPlus, edits }),
  });
  if (mine !== generation) return;
  if (!resp.ok) { status(`error ${resp.status}: ${await errorText(resp)}`, true); return; }
  const blob = await resp.blob();
  $("edited").src = URL.createObjectURL(blob);
  status(`edited: ${JSON.stringify(edits)}`);
  document.body.dataset.edited = String(mine);
}

$("form").addEventListener("submit", invert);
loadInfo().catch((e) => status(`cannot read /v1/info: ${e}`, true));
