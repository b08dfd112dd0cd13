"""The gateway's API docs: one self-contained HTML page that renders its OpenAPI document.

The page has no build step and loads nothing from elsewhere (no CDN, fonts or
images), so it works offline and behind firewalls; its Content-Security-Policy
lets it fetch only from its own origin. It fetches the OpenAPI JSON and shows
every operation with its parameters, request and response schemas, and a form
to try it. Streaming operations show Server-Sent Events (or NDJSON lines) as
they arrive, read with ``fetch`` and a ``ReadableStream`` (EventSource cannot
POST), and a Stop button aborts the request, which cancels the gRPC call.

Everything that comes from the document or the server goes into the DOM as text
(``textContent``, ``append(string)``), never as markup.
"""

from __future__ import annotations

from protoserve.gateway._page import HEAD, fill

__all__ = ["docs_html"]


def docs_html(openapi_url: str, title: str) -> str:
    """The docs page, reading the OpenAPI document from ``openapi_url``.

    Args:
        openapi_url: where the page fetches the document; a path on the page's own
            origin (the Content-Security-Policy refuses other origins).
        title: the page title.

    Returns:
        A complete HTML document; both arguments appear HTML-escaped.
    """
    return fill(_PAGE, {"TITLE": title, "OPENAPI_URL": openapi_url})


_PAGE = (
    HEAD
    + """\
<title>{{TITLE}}</title>
<style>
:root { --fg: #1d2330; --muted: #5b6475; --bg: #fff; --panel: #f5f7fa; --line: #dde2ea;
  --get: #1f7a4d; --post: #1f5fa8; --put: #8a5a00; --patch: #6a3fa0; --delete: #b3261e;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e3e7ee; --muted: #9aa3b2; --bg: #14171c; --panel: #1d2128; --line: #323844; }
}
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header, main { max-width: 1000px; margin: 0 auto; padding: 0 16px; }
header { padding-top: 20px; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin: 28px 0 6px; font-size: 19px; border-bottom: 1px solid var(--line); }
h3 { margin: 14px 0 6px; font-size: 15px; }
code, pre, textarea, input, select { font-family: var(--mono); font-size: 13px; }
p { margin: 6px 0; }
.muted, .intro { color: var(--muted); }
#filter { width: 100%; padding: 6px 8px; margin: 10px 0; border: 1px solid var(--line);
  border-radius: 4px; background: var(--bg); color: var(--fg); }
details.op { border: 1px solid var(--line); border-radius: 6px; margin: 8px 0; }
details.op > summary { padding: 8px 10px; cursor: pointer; display: flex; gap: 10px;
  align-items: baseline; flex-wrap: wrap; }
.op-body { padding: 0 14px 14px; border-top: 1px solid var(--line); }
.verb { font: bold 12px var(--mono); color: #fff; padding: 2px 6px; border-radius: 3px;
  min-width: 58px; text-align: center; background: var(--muted); }
.verb-get { background: var(--get); } .verb-post { background: var(--post); }
.verb-put { background: var(--put); } .verb-patch { background: var(--patch); }
.verb-delete { background: var(--delete); }
.path { font-weight: 600; }
.badge { font-size: 11px; border: 1px solid var(--muted); border-radius: 8px; padding: 0 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 4px 8px;
  border-bottom: 1px solid var(--line); }
details.schema { margin-left: 14px; }
details.schema > summary { cursor: pointer; }
.name { font-family: var(--mono); font-weight: 600; margin-right: 6px; }
.type { font-family: var(--mono); color: var(--muted); }
.required { color: var(--delete); }
.try { background: var(--panel); border-radius: 6px; padding: 10px; margin-top: 12px; }
.field { display: grid; grid-template-columns: 220px 1fr; gap: 8px; margin: 4px 0; }
.field span { font-family: var(--mono); overflow-wrap: anywhere; }
.try input, .try textarea, .try select { width: 100%; padding: 4px 6px;
  border: 1px solid var(--line); border-radius: 4px; background: var(--bg); color: var(--fg); }
.buttons { margin: 8px 0; display: flex; gap: 8px; align-items: center; }
button { padding: 4px 14px; border-radius: 4px; border: 1px solid var(--line); cursor: pointer;
  background: var(--post); color: #fff; }
button:disabled { opacity: .5; cursor: default; }
.output { background: var(--bg); border: 1px solid var(--line); padding: 8px; max-height: 420px;
  overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; margin: 6px 0 0; }
.event-name { font-weight: bold; color: var(--post); }
.event-error .event-name { color: var(--delete); } .event-done .event-name { color: var(--get); }
</style>
</head>
<body data-openapi="{{OPENAPI_URL}}">
<header>
<h1>{{TITLE}}</h1>
<div id="info" class="intro"></div>
<input id="filter" type="search" placeholder="Filter operations" aria-label="Filter operations">
<p id="load-status" class="muted">Loading the API description…</p>
</header>
<main id="operations"></main>
<script>
(function (root) {
  "use strict";
  const VERBS = ["get", "post", "put", "patch", "delete", "head", "options", "trace"];

  // ---- Pure helpers: no DOM, so the tests run them under Node. ----

  // Complete SSE events in `buffer`, and the unfinished rest to prepend to the next chunk.
  function parseSse(buffer) {
    const blocks = buffer.replace(/\\r\\n/g, "\\n").split("\\n\\n");
    const rest = blocks.pop();
    const events = [];
    for (const block of blocks) {
      const event = { event: "message", id: null, data: [] };
      let seen = false;
      for (const line of block.split("\\n")) {
        if (line === "" || line.startsWith(":")) continue; // comments are keep-alives
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
        else continue;
        seen = true;
      }
      if (seen) events.push({ event: event.event, id: event.id, data: event.data.join("\\n") });
    }
    return { events: events, rest: rest };
  }

  // The request URL: path parameters filled in, the rest as query parameters.
  function buildUrl(path, parameters, values) {
    const byName = {};
    for (const p of parameters) byName[p.name] = p;
    const url = path.replace(/\\{([^}]+)\\}/g, (_, name) => {
      const value = String(values[name] === undefined ? "" : values[name]);
      const p = byName[name];
      // A variable like {name=models/*} spans segments: its slashes stay slashes.
      const multi = p && p.schema && typeof p.schema.pattern === "string" &&
        p.schema.pattern.indexOf("/") >= 0;
      return multi ? value.split("/").map(encodeURIComponent).join("/") : encodeURIComponent(value);
    });
    const query = [];
    for (const p of parameters) {
      if (p.in !== "query") continue;
      const value = values[p.name];
      for (const item of Array.isArray(value) ? value : [value]) {
        if (item === undefined || item === null || item === "") continue;
        query.push(encodeURIComponent(p.name) + "=" + encodeURIComponent(String(item)));
      }
    }
    return query.length ? url + "?" + query.join("&") : url;
  }

  // The schema a $ref points at, with the referring schema's own keywords on top.
  function resolve(spec, schema) {
    let current = schema || {};
    for (let hops = 0; current.$ref && hops < 32; hops++) {
      const rest = Object.assign({}, current);
      delete rest.$ref;
      let target = spec;
      for (const part of current.$ref.replace(/^#\\//, "").split("/")) {
        const key = part.replace(/~1/g, "/").replace(/~0/g, "~");
        const has = target && Object.prototype.hasOwnProperty.call(target, key);
        target = has ? target[key] : undefined;
      }
      current = Object.assign({}, target || {}, rest);
    }
    return current;
  }

  // A starting request body: top-level fields with neutral values. Nested messages
  // are left empty ({}), so nothing is set that the server would not default itself.
  function example(spec, schema, depth) {
    const s = resolve(spec, schema);
    depth = depth || 0;
    if (s.enum) return s.enum[0];
    const alternatives = s.anyOf || s.oneOf;
    if (alternatives) return example(spec, alternatives[0], depth);
    const type = Array.isArray(s.type) ? s.type.filter((t) => t !== "null")[0] : s.type;
    if (type === "object") {
      if (depth > 0) return {};
      const out = {};
      for (const name of Object.keys(s.properties || {})) {
        const property = resolve(spec, s.properties[name]);
        if (!property.readOnly) out[name] = example(spec, s.properties[name], depth + 1);
      }
      return out;
    }
    if (type === "array") return [];
    if (type === "string") return /^u?int64$/.test(s.format || "") ? "0" : "";
    if (type === "integer" || type === "number") return 0;
    if (type === "boolean") return false;
    return null;
  }

  function typeLabel(schema) {
    if (!schema) return "any";
    if (schema.$ref) return schema.$ref.split("/").pop().split(".").pop();
    if (schema.enum) return "enum";
    const alternatives = schema.anyOf || schema.oneOf;
    if (alternatives) return alternatives.map(typeLabel).join(" | ");
    const type = Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "any");
    if (type === "array") return "array of " + typeLabel(schema.items);
    const values = schema.additionalProperties;
    if (type === "object" && values && typeof values === "object") {
      return "map of " + typeLabel(values);
    }
    return schema.format ? type + " (" + schema.format + ")" : type;
  }

  const api = { parseSse, buildUrl, resolve, example, typeLabel };
  if (typeof document === "undefined") { root.protoserveDocs = api; return; }

  // ---- The page. Text from the document or the server only ever goes in as text. ----

  let spec = null;

  function el(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const key of Object.keys(attributes || {})) {
      if (key === "text") node.textContent = attributes[key];
      else node.setAttribute(key, attributes[key]);
    }
    for (const child of children || []) node.append(child); // strings become text nodes
    return node;
  }

  // Paragraphs of a proto comment, `code` spans shown as code; no other markup.
  function richText(text) {
    const box = el("div", { class: "text" });
    for (const paragraph of String(text).split(/\\n\\s*\\n/)) {
      const p = el("p");
      String(paragraph).split("`").forEach((piece, i) => {
        p.append(i % 2 ? el("code", { text: piece }) : piece);
      });
      box.append(p);
    }
    return box;
  }

  function lazyDetails(summary, attributes, fill) {
    const body = el("div", { class: "details-body" });
    const node = el("details", attributes, [summary, body]);
    let filled = false;
    // Filled on first open: a recursive message expands one level per click.
    node.addEventListener("toggle", () => {
      if (node.open && !filled) { filled = true; fill(body); }
    });
    return node;
  }

  function schemaTree(schema, name, required) {
    const summary = el("summary", {}, [
      name ? el("span", { class: "name", text: name }) : "",
      el("span", { class: "type", text: typeLabel(schema) }),
      required ? el("span", { class: "required", text: " required" }) : "",
    ]);
    return lazyDetails(summary, { class: "schema" }, (body) => {
      const s = resolve(spec, schema);
      if (s.description) body.append(richText(s.description));
      const target = s.type === "array" ? resolve(spec, s.items) : s;
      if (target.enum) {
        body.append(el("p", {}, ["Values: "].concat(target.enum.map((v, i) => {
          return el("code", { text: (i ? ", " : "") + String(v) });
        }))));
      }
      const needed = target.required || [];
      for (const key of Object.keys(target.properties || {})) {
        body.append(schemaTree(target.properties[key], key, needed.indexOf(key) >= 0));
      }
      if (target.additionalProperties && typeof target.additionalProperties === "object") {
        body.append(schemaTree(target.additionalProperties, "{key}", false));
      }
      for (const alternative of target.anyOf || target.oneOf || []) {
        body.append(schemaTree(alternative, "either", false));
      }
    });
  }

  function parametersTable(parameters) {
    const rows = parameters.map((p) => {
      return el("tr", {}, [
        el("td", {}, [
          el("code", { text: p.name }),
          p.required ? el("span", { class: "required", text: " *" }) : "",
        ]),
        el("td", { text: p.in }),
        el("td", { class: "type", text: typeLabel(p.schema) }),
        el("td", {}, [p.description ? richText(p.description) : ""]),
      ]);
    });
    const titles = ["Name", "In", "Type", "Description"];
    const head = el("tr", {}, titles.map((title) => el("th", { text: title })));
    return el("table", {}, [el("thead", {}, [head]), el("tbody", {}, rows)]);
  }

  function isStreaming(op) {
    const ok = (op.responses || {})["200"] || {};
    return Boolean((ok.content || {})["text/event-stream"]);
  }

  function prettyJson(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
  }

  function eventNode(event) {
    const kind = /^[a-z]+$/.test(event.event) ? event.event : "other";
    return el("div", { class: "event event-" + kind }, [
      el("span", { class: "event-name", text: event.event + (event.id ? " #" + event.id : "") }),
      " ", el("code", { text: event.data }),
    ]);
  }

  async function readStream(response, sse, output) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const chunk = await reader.read();
      buffer += decoder.decode(chunk.value || new Uint8Array(0), { stream: !chunk.done });
      let items;
      if (sse) {
        const parsed = parseSse(buffer);
        buffer = parsed.rest;
        items = parsed.events.map(eventNode);
      } else {
        const lines = buffer.split("\\n");
        buffer = lines.pop();
        items = lines.filter((line) => line.trim()).map((line) => el("div", { text: line }));
      }
      for (const item of items) output.append(item);
      output.scrollTop = output.scrollHeight;
      if (chunk.done) return;
    }
  }

  function tryIt(path, verb, op) {
    const streaming = isStreaming(op);
    const parameters = op.parameters || [];
    const inputs = {};
    const fields = parameters.map((p) => {
      const s = resolve(spec, p.schema);
      const many = s.type === "array";
      const choices = (many ? resolve(spec, s.items) : s).enum;
      let input;
      if (choices && !many) {
        input = el("select", {}, [el("option", { value: "", text: "(unset)" })].concat(
          choices.map((c) => el("option", { value: String(c), text: String(c) }))));
      } else if (many) {
        input = el("textarea", { rows: "2", placeholder: "one value per line" });
      } else {
        input = el("input", { type: "text", placeholder: typeLabel(p.schema) });
      }
      inputs[p.name] = { input: input, many: many };
      const label = el("span", { text: p.name + (p.required ? " *" : "") });
      return el("label", { class: "field" }, [label, input]);
    });
    const media = op.requestBody && (op.requestBody.content || {})["application/json"];
    const body = media ? el("textarea", { rows: "8", "aria-label": "JSON body" }) : null;
    if (body) body.value = JSON.stringify(example(spec, media.schema), null, 2);
    const format = el("select", { "aria-label": "Response format" }, [
      el("option", { value: "text/event-stream", text: "Server-Sent Events" }),
      el("option", { value: "application/x-ndjson", text: "NDJSON" }),
    ]);
    const send = el("button", { type: "button", text: "Send" });
    const stop = el("button", { type: "button", text: "Stop" });
    stop.disabled = true;
    const status = el("div", { class: "muted" });
    const output = el("pre", { class: "output" });
    let controller = null;
    stop.addEventListener("click", () => controller && controller.abort());
    send.addEventListener("click", async () => {
      const values = {};
      for (const name of Object.keys(inputs)) {
        const entry = inputs[name];
        const value = entry.input.value;
        values[name] = entry.many ? value.split("\\n").filter(Boolean) : value;
      }
      const missing = parameters.filter((p) => p.required && !values[p.name]);
      if (missing.length) {
        status.textContent = "Fill in " + missing.map((p) => p.name).join(", ");
        return;
      }
      const headers = { Accept: streaming ? format.value : "application/json" };
      let text;
      if (body) {
        text = body.value.trim() || "{}";
        try {
          JSON.parse(text);
        } catch (e) {
          status.textContent = "The body is not JSON: " + e.message;
          return;
        }
        headers["Content-Type"] = "application/json";
      }
      const url = buildUrl(path, parameters, values);
      controller = new AbortController();
      send.disabled = true;
      stop.disabled = false; // aborting also cancels the gRPC call behind the request
      output.textContent = "";
      status.textContent = verb.toUpperCase() + " " + url + " …";
      const started = performance.now();
      try {
        const init = { method: verb.toUpperCase(), headers, body: text, signal: controller.signal };
        const response = await fetch(url, init);
        const type = response.headers.get("content-type") || "";
        const took = Math.round(performance.now() - started) + " ms";
        status.textContent = [response.status + " " + response.statusText, type, took].join(" · ");
        const sse = type.startsWith("text/event-stream");
        if (response.body && (sse || type.startsWith("application/x-ndjson"))) {
          await readStream(response, sse, output);
        } else {
          output.textContent = prettyJson(await response.text());
        }
      } catch (error) {
        if (error.name === "AbortError") {
          output.append(el("div", { class: "muted", text: "— stopped —" }));
        } else {
          status.textContent = "Request failed: " + error.message;
        }
      } finally {
        controller = null;
        send.disabled = false;
        stop.disabled = true;
      }
    });
    const buttons = el("div", { class: "buttons" }, [send, stop, ...(streaming ? [format] : [])]);
    const bodyLabel = el("p", { class: "muted", text: "Body (JSON)" });
    return el("div", { class: "try" }, [
      el("h3", { text: "Try it" }), ...fields, ...(body ? [bodyLabel, body] : []),
      buttons, status, output,
    ]);
  }

  function fillOperation(box, path, verb, op) {
    if (op.description) box.append(richText(op.description));
    box.append(el("p", { class: "muted" }, [
      "operationId ", el("code", { text: op.operationId || "" }),
      ...(op["x-grpc-method"] ? [" · gRPC ", el("code", { text: op["x-grpc-method"] })] : []),
    ]));
    if ((op.parameters || []).length) {
      box.append(el("h3", { text: "Parameters" }), parametersTable(op.parameters));
    }
    const request = op.requestBody && (op.requestBody.content || {})["application/json"];
    if (request) {
      box.append(el("h3", { text: "Request body" }), schemaTree(request.schema, "body", false));
    }
    box.append(el("h3", { text: "Responses" }));
    for (const code of Object.keys(op.responses || {})) {
      const response = op.responses[code];
      box.append(el("h3", {}, [el("code", { text: code })]));
      if (response.description) box.append(richText(response.description));
      for (const type of Object.keys(response.content || {})) {
        box.append(schemaTree(response.content[type].schema, type, false));
      }
    }
    box.append(tryIt(path, verb, op));
  }

  function renderOperation(path, verb, op) {
    const summary = el("summary", {}, [
      el("span", { class: "verb verb-" + verb, text: verb.toUpperCase() }),
      el("code", { class: "path", text: path }),
      el("span", { text: op.summary || op.operationId || "" }),
      isStreaming(op) ? el("span", { class: "badge", text: "stream" }) : "",
      op.deprecated ? el("span", { class: "badge", text: "deprecated" }) : "",
    ]);
    const node = lazyDetails(summary, { class: "op", id: op.operationId || "" }, (body) => {
      body.className = "op-body";
      fillOperation(body, path, verb, op);
    });
    const words = [verb, path, op.operationId, op.summary, ...(op.tags || [])];
    node.dataset.search = words.join(" ").toLowerCase();
    return node;
  }

  function render() {
    if (spec.info && spec.info.description) {
      document.getElementById("info").append(richText(spec.info.description));
    }
    const groups = new Map();
    for (const tag of spec.tags || []) groups.set(tag.name, { tag: tag, ops: [] });
    for (const path of Object.keys(spec.paths || {})) {
      for (const verb of VERBS) {
        const op = spec.paths[path][verb];
        if (!op) continue;
        const name = (op.tags || [])[0] || "Other";
        if (!groups.has(name)) groups.set(name, { tag: { name: name }, ops: [] });
        groups.get(name).ops.push(renderOperation(path, verb, op));
      }
    }
    const main = document.getElementById("operations");
    for (const group of groups.values()) {
      const section = el("section", {}, [el("h2", { text: group.tag.name })]);
      if (group.tag.description) section.append(richText(group.tag.description));
      for (const op of group.ops) section.append(op);
      main.append(section);
    }
    const id = decodeURIComponent(location.hash.slice(1));
    const target = id ? document.getElementById(id) : null;
    if (target && target.tagName === "DETAILS") { target.open = true; target.scrollIntoView(); }
  }

  document.getElementById("filter").addEventListener("input", (event) => {
    const words = event.target.value.toLowerCase().split(/\\s+/).filter(Boolean);
    for (const op of document.querySelectorAll("details.op")) {
      op.hidden = !words.every((word) => op.dataset.search.includes(word));
    }
  });

  async function start() {
    const status = document.getElementById("load-status");
    const url = document.body.dataset.openapi;
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      spec = await response.json();
    } catch (error) {
      status.textContent = "Could not load the API description from " + url + ": " + error.message;
      return;
    }
    status.remove();
    render();
  }

  start();
})(this);
</script>
</body>
</html>
"""
)
