"""The one HTML page of ``bksdm serve`` (plain HTML, CSS and JavaScript; nothing loaded from the network).

The page asks ``GET /api/models`` what it shows, posts ``{"prompt", "seed"}`` to ``/api/generate`` and puts
each model's image and time in its own panel. User text only ever goes into ``textContent``, never into HTML.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bksdm: teacher vs student</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  .hint { color: #666; margin-top: 0; }
  form { display: flex; gap: 0.5rem; flex-wrap: wrap; align-items: end; margin: 1rem 0; }
  label { display: flex; flex-direction: column; font-size: 0.85rem; color: #444; gap: 0.2rem; }
  #prompt { width: 32rem; max-width: 80vw; }
  #seed { width: 8rem; }
  input, button { font-size: 1rem; padding: 0.4rem 0.6rem; }
  button { cursor: pointer; }
  #status { min-height: 1.5rem; }
  #status.error { color: #b00020; font-weight: 600; }
  #results { display: flex; gap: 1.5rem; flex-wrap: wrap; }
  figure { margin: 0; padding: 0.8rem; border: 1px solid #ddd; border-radius: 8px; width: 18rem; }
  figure img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #f4f4f4; image-rendering: pixelated; }
  figcaption { margin-bottom: 0.5rem; }
  .source, .params { color: #666; font-size: 0.8rem; word-break: break-all; }
  .time { font-size: 1.1rem; margin-top: 0.4rem; }
</style>
</head>
<body>
<h1>Teacher vs student</h1>
<p class="hint" id="settings">loading models&hellip;</p>
<form id="form">
  <label>Prompt
    <input id="prompt" name="prompt" autocomplete="off" placeholder="a small red circle at the top left"></label>
  <label>Seed <input id="seed" name="seed" type="number" min="0" step="1" value="0"></label>
  <button type="button" id="random-seed" title="pick a random seed">random seed</button>
  <button type="submit" id="generate" disabled>Generate</button>
</form>
<div id="status" role="status" aria-live="polite"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const panels = new Map();

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function addPanel(model) {
  const figure = document.createElement("figure");
  figure.className = "model";
  figure.dataset.model = model.name;
  const caption = document.createElement("figcaption");
  const name = document.createElement("strong");
  name.textContent = model.name;
  const source = document.createElement("div");
  source.className = "source";
  source.textContent = model.source;
  const params = document.createElement("div");
  params.className = "params";
  params.textContent = model.denoiser + " " + model.denoiser_params.toLocaleString("en-US") + " params";
  caption.append(name, source, params);
  const img = document.createElement("img");
  img.alt = model.name + " image (none yet)";
  const time = document.createElement("div");
  time.className = "time";
  time.textContent = "\\u2014";
  figure.append(caption, img, time);
  $("results").append(figure);
  panels.set(model.name, { img, time });
}

async function loadModels() {
  const response = await fetch("/api/models");
  const info = await response.json();
  info.models.forEach(addPanel);
  $("prompt").maxLength = info.max_prompt_chars;
  $("seed").max = info.max_seed;
  $("settings").textContent = info.models.length + " model(s), " + info.steps + " steps, guidance " +
    info.guidance_scale + ". The same seed gives every model the same starting noise.";
  $("generate").disabled = false;
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  button.disabled = true;
  setStatus("generating\\u2026", false);
  // An empty or non-numeric seed field gives NaN, sent as null: the server answers with a clear error.
  const body = { prompt: $("prompt").value, seed: $("seed").valueAsNumber };
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) {
      setStatus("Error: " + data.error, true);
      return;
    }
    const teacher = data.models.find((m) => m.name === "teacher");
    for (const result of data.models) {
      const panel = panels.get(result.name);
      panel.img.src = result.image;
      panel.img.alt = result.name + ": " + data.prompt + " (seed " + data.seed + ")";
      let text = result.seconds.toFixed(2) + " s";
      if (teacher && result !== teacher) {
        text += " (" + (teacher.seconds / result.seconds).toFixed(2) + "x the teacher's speed)";
      }
      panel.time.textContent = text;
    }
    setStatus("\\u201c" + data.prompt + "\\u201d, seed " + data.seed + ", " + data.steps + " steps", false);
  } catch (err) {
    setStatus("Error: " + err, true);
  } finally {
    button.disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("random-seed").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 4294967296);
});
loadModels().catch((err) => setStatus("Error: cannot load the model list: " + err, true));
</script>
</body>
</html>
"""
