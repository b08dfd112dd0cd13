"""A browser playground for text generation: one self-contained HTML page.

The gateway serves it at ``/`` only when its descriptors include
``protoserve.inference.v1.InferenceService`` (the gateway itself stays generic:
the page is the only part that knows the inference API, and only its HTTP
routes). Like the docs page it has no build step, loads nothing from elsewhere,
and its Content-Security-Policy lets it fetch only from its own origin.

The page lists the text-generation models from ``GET v1/models``, and streams a
generation with an ``EventSource`` on the GET binding of ``GenerateStream``
(``v1/models/{model}:generateStream?inputs=…&parameters.max_new_tokens=…``).
Stop closes the EventSource; closing the connection makes the gateway cancel the
gRPC call. URLs are relative to the page, so it also works behind a proxy that
serves the gateway under a path prefix.

Query parameters prefill the form, for links and for tests that drive the page
in a headless browser (which cannot click): ``model``, ``prompt``,
``max_new_tokens``, ``temperature``, ``seed``; ``autostart=1`` presses Generate
once the models are loaded, and ``stopAfter=N`` presses Stop after N messages.

Everything from the server goes into the DOM as text (``textContent``,
``append(string)``), never as markup.
"""

from __future__ import annotations

from protoserve.gateway._page import HEAD, fill

__all__ = ["playground_html"]


def playground_html(title: str) -> str:
    """The playground page.

    Args:
        title: the page title (shown HTML-escaped).

    Returns:
        A complete HTML document.
    """
    return fill(_PAGE, {"TITLE": title})


_PAGE = (
    HEAD
    + """\
<title>{{TITLE}} · playground</title>
<style>
:root { --fg: #1d2330; --muted: #5b6475; --bg: #fff; --panel: #f5f7fa; --line: #dde2ea;
  --accent: #1f5fa8; --ok: #1f7a4d; --bad: #b3261e;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e3e7ee; --muted: #9aa3b2; --bg: #14171c; --panel: #1d2128; --line: #323844; }
}
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header, main { max-width: 960px; margin: 0 auto; padding: 0 16px; }
header { padding-top: 20px; display: flex; align-items: baseline; gap: 16px; }
h1 { margin: 0 0 4px; font-size: 24px; }
header a { color: var(--accent); }
.panel { background: var(--panel); border-radius: 6px; padding: 12px; margin: 12px 0; }
.row { display: flex; gap: 12px; flex-wrap: wrap; }
label { display: flex; flex-direction: column; font-size: 13px; color: var(--muted); gap: 2px; }
label.grow { flex: 1 1 240px; }
input, select, textarea { font: 14px var(--mono); padding: 5px 7px; color: var(--fg);
  background: var(--bg); border: 1px solid var(--line); border-radius: 4px; }
input[type=number] { width: 130px; }
textarea { width: 100%; resize: vertical; }
.buttons { display: flex; gap: 8px; align-items: center; margin-top: 10px; }
button { padding: 6px 18px; border-radius: 4px; border: 1px solid var(--line); cursor: pointer;
  background: var(--accent); color: #fff; font-size: 14px; }
button#stop { background: var(--bad); }
button:disabled { opacity: .45; cursor: default; }
#status { color: var(--muted); }
body[data-state=error] #status { color: var(--bad); }
body[data-state=done] #status { color: var(--ok); }
#metrics { font: 13px var(--mono); color: var(--muted); min-height: 1.5em; }
#output { font: 14px/1.55 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere;
  border: 1px solid var(--line); border-radius: 6px; padding: 12px; min-height: 180px;
  max-height: 60vh; overflow: auto; margin: 6px 0 24px; }
</style>
</head>
<body data-state="loading">
<header>
<h1>{{TITLE}}</h1>
<span>playground · <a href="docs">API docs</a></span>
</header>
<main>
<form class="panel" id="form" novalidate>
<div class="row">
<label class="grow">Model <select id="model" required></select></label>
<label>max_new_tokens <input id="max_new_tokens" type="number" min="1" step="1"></label>
<label>temperature <input id="temperature" type="number" min="0" step="any"></label>
<label>seed <input id="seed" type="number" min="0" step="1" placeholder="random"></label>
</div>
<label style="margin-top: 10px">Prompt
<textarea id="prompt" rows="4" placeholder="Text to continue"></textarea></label>
<div class="buttons">
<button id="generate" type="submit" disabled>Generate</button>
<button id="stop" type="button" disabled>Stop</button>
<span id="status" role="status">Loading models…</span>
</div>
</form>
<div id="metrics" aria-label="Timing"></div>
<pre id="output" aria-live="polite" aria-busy="false" aria-label="Generated text"></pre>
</main>
<script>
(function () {
  "use strict";
  const TASK = "TASK_TEXT_GENERATION";
  const $ = (id) => document.getElementById(id);
  const query = new URLSearchParams(location.search);
  const modelSelect = $("model"), promptBox = $("prompt"), output = $("output");
  const generateButton = $("generate"), stopButton = $("stop");
  const status = $("status"), metrics = $("metrics");
  const numbers = ["max_new_tokens", "temperature", "seed"];
  let models = {};
  let run = null; // the generation in progress: its EventSource and counters

  function setState(state, text) {
    document.body.dataset.state = state;
    status.textContent = text;
    const busy = state === "streaming";
    output.setAttribute("aria-busy", busy ? "true" : "false");
    generateButton.disabled = busy || !modelSelect.value;
    stopButton.disabled = !busy;
  }

  function short(name, prefix) {
    return String(name || "").replace(prefix, "").replace(/_/g, " ").toLowerCase();
  }

  // The model's defaults and bounds for the three inputs, from its parameter specs.
  function applyDefaults(name) {
    for (const id of numbers) {
      const input = $(id);
      input.value = "";
      input.removeAttribute("max");
    }
    for (const spec of (models[name] || {}).parameters || []) {
      if (spec.task && spec.task !== TASK) continue;
      const input = numbers.indexOf(spec.name) >= 0 ? $(spec.name) : null;
      if (!input) continue;
      if (typeof spec.default_value === "number") input.value = String(spec.default_value);
      if (typeof spec.maximum === "number" && spec.maximum < 1e15) {
        input.max = String(spec.maximum);
      }
    }
  }

  function fromQuery() {
    if (query.has("prompt")) promptBox.value = query.get("prompt");
    for (const id of numbers) if (query.has(id)) $(id).value = query.get(id);
  }

  async function loadModels() {
    let body;
    try {
      const response = await fetch("v1/models", { headers: { Accept: "application/json" } });
      body = await response.json();
      if (!response.ok) throw new Error(body.message || "HTTP " + response.status);
    } catch (error) {
      setState("error", "Could not list the models: " + error.message);
      return false;
    }
    models = {};
    modelSelect.textContent = "";
    for (const model of body.models || []) {
      if ((model.tasks || []).indexOf(TASK) < 0) continue;
      models[model.name] = model;
      const state = short(model.state, "MODEL_STATE_");
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name + (state ? " (" + state + ")" : "");
      option.disabled = model.state !== "MODEL_STATE_READY";
      modelSelect.append(option);
    }
    const wanted = query.get("model");
    if (wanted && models[wanted]) modelSelect.value = wanted;
    else {
      const ready = Array.from(modelSelect.options).find((o) => !o.disabled);
      if (ready) modelSelect.value = ready.value;
    }
    if (!modelSelect.value) {
      setState("error", "No text-generation model is ready.");
      return false;
    }
    applyDefaults(modelSelect.value);
    fromQuery();
    setState("idle", "Ready.");
    return true;
  }

  function streamUrl() {
    const params = new URLSearchParams();
    params.set("inputs", promptBox.value);
    for (const id of numbers) {
      const value = $(id).value.trim();
      if (value !== "") params.set("parameters." + id, value);
    }
    return "v1/models/" + encodeURIComponent(modelSelect.value) + ":generateStream?" + params;
  }

  function showMetrics() {
    if (!run) return;
    const parts = [];
    if (run.firstAt !== null) {
      parts.push("first token " + Math.round(run.firstAt - run.startedAt) + " ms");
      const seconds = (run.lastAt - run.firstAt) / 1000;
      // Decode speed: tokens after the first, over the time since the first.
      if (run.tokens > 1 && seconds > 0) {
        parts.push(((run.tokens - 1) / seconds).toFixed(1) + " tokens/s");
      }
    }
    parts.push(run.tokens + " tokens");
    metrics.textContent = parts.join(" · ");
  }

  function finish(state, text) {
    if (run) { run.source.close(); showMetrics(); }
    run = null;
    setState(state, text);
  }

  function describeStatus(data) {
    try {
      const status = JSON.parse(data);
      return (status.message || "error") + (status.code ? " (code " + status.code + ")" : "");
    } catch (e) {
      return String(data);
    }
  }

  // An EventSource cannot read a refused request's body: ask again with fetch for the
  // status JSON. If that one is accepted after all, abort it, which cancels the call.
  async function explainRefusal(url) {
    const controller = new AbortController();
    try {
      const response = await fetch(url, {
        headers: { Accept: "application/json" }, signal: controller.signal,
      });
      if (response.ok) {
        controller.abort();
        return "the stream could not be opened";
      }
      const text = await response.text();
      return "HTTP " + response.status + ": " + describeStatus(text);
    } catch (error) {
      return "the gateway is unreachable";
    }
  }

  function start() {
    if (run || !modelSelect.value) return;
    const url = streamUrl();
    output.textContent = "";
    metrics.textContent = "";
    const source = new EventSource(url);
    const current = {
      source: source, startedAt: performance.now(), firstAt: null, lastAt: null,
      tokens: 0, messages: 0, opened: false, finishReason: null, usage: null,
    };
    run = current;
    setState("streaming", "Generating…");
    const stopAfter = parseInt(query.get("stopAfter") || "", 10);
    source.onopen = () => { current.opened = true; };
    source.addEventListener("message", (event) => {
      if (run !== current) return;
      const message = JSON.parse(event.data);
      const now = performance.now();
      const count = (message.token_ids || []).length;
      if (count && current.firstAt === null) current.firstAt = now;
      current.tokens += count;
      current.lastAt = now;
      current.messages += 1;
      if (message.text) output.append(message.text);
      if (message.finish_reason && message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
        current.finishReason = message.finish_reason;
      }
      if (message.usage) current.usage = message.usage;
      output.scrollTop = output.scrollHeight;
      showMetrics();
      if (current.messages === stopAfter) stopButton.click();
    });
    source.addEventListener("done", () => {
      if (run !== current) return;
      const parts = ["Finished: " + (short(current.finishReason, "FINISH_REASON_") || "done")];
      const usage = current.usage;
      if (usage) {
        parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens +
          " generated = " + usage.total_tokens + " tokens");
      }
      finish("done", parts.join(" · "));
    });
    source.addEventListener("error", (event) => {
      if (run !== current) return;
      if (typeof event.data === "string") { // the server's `event: error`, a google.rpc.Status
        finish("error", "Error: " + describeStatus(event.data));
      } else if (!current.opened) {
        finish("error", "Refused…");
        explainRefusal(url).then((text) => {
          if (run === null) setState("error", "Refused: " + text);
        });
      } else {
        // Never let the EventSource reconnect: that would start the generation again.
        finish("error", "The connection was lost.");
      }
    });
  }

  $("form").addEventListener("submit", (event) => { event.preventDefault(); start(); });
  stopButton.addEventListener("click", () => {
    if (run) finish("stopped", "Stopped after " + run.tokens + " tokens.");
  });
  modelSelect.addEventListener("change", () => applyDefaults(modelSelect.value));

  loadModels().then((ok) => { if (ok && query.get("autostart") === "1") generateButton.click(); });
})();
</script>
</body>
</html>
"""
)
