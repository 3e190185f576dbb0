// ringtail's web page: the tenant list (/) and one tenant's live tail (/tenants/T).
//
// Data comes from Server-Sent Events streams read with fetch(), so the token
// travels in an Authorization header (EventSource cannot set one): it is kept
// in this tab's sessionStorage, never in a URL or a cookie. Every DOM update
// uses textContent (no HTML from data). A stream that ends or fails is
// reopened with backoff; the tail resumes after the last sequence it showed,
// so a daemon restart costs neither a duplicate nor a silent hole (the daemon
// sends a gap event for records evicted meanwhile).
"use strict";

const TOKEN_KEY = "ringtail-token";
const RETRY_FIRST_MS = 500;      // first reconnect delay; doubles up to RETRY_MAX_MS
const RETRY_MAX_MS = 5000;
const SPARK_POINTS = 60;         // records/s points kept per tenant (one per tick)
const PLOT_POINTS = 120;         // records/s points in the tenant page's plot

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + (kind || "");
}

function showMessage(text) {
  const message = $("message");
  message.textContent = text || "";
  message.hidden = !text;
}

class HttpError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

// Read a text/event-stream response event by event: onEvent(name, data).
async function readEvents(url, signal, onEvent) {
  const response = await fetch(url, {
    headers: { "Authorization": "Bearer " + token(), "Accept": "text/event-stream" },
    cache: "no-store", signal,
  });
  if (!response.ok) throw new HttpError(response.status, (await response.text()).trim());
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// Keep one stream open: reopen it with backoff after it ends or fails,
// except on a refusal (401/403/404/400), which is shown and left alone.
class Stream {
  constructor(urlFor, onEvent) {
    this.urlFor = urlFor; this.onEvent = onEvent;
    this.controller = null; this.delay = RETRY_FIRST_MS; this.generation = 0;
  }
  start() {
    this.stop();
    const generation = ++this.generation;
    const controller = this.controller = new AbortController();
    if (!token()) { setStatus("no token", "refused"); return; }
    setStatus("connecting", "");
    readEvents(this.urlFor(), controller.signal, (name, data) => {
      if (generation !== this.generation) return;
      this.delay = RETRY_FIRST_MS;
      this.onEvent(name, data);
    }).then(() => this.retry(generation, "stream ended"),
            (error) => this.retry(generation, error));
  }
  retry(generation, error) {
    if (generation !== this.generation || this.controller.signal.aborted) return;
    if (error instanceof HttpError && [400, 401, 403, 404].includes(error.status)) {
      setStatus("refused", "refused");
      showMessage(`refused (${error.status}): ${error.message}`);
      return;
    }
    if (this.refused) return;
    setStatus(`reconnecting in ${(this.delay / 1000).toFixed(1)} s`, "retrying");
    setTimeout(() => { if (generation === this.generation) this.start(); }, this.delay);
    this.delay = Math.min(this.delay * 2, RETRY_MAX_MS);
  }
  stop() {
    this.generation++;
    if (this.controller) this.controller.abort();
    this.controller = null;
  }
}

function setupToken(onChange) {
  const input = $("token");
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    showMessage("");
    onChange();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    onChange();
  });
}

function svgPolyline(svg, values, width, height) {
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - (v / max) * (height - 2) - 1).toFixed(1)}`);
  let line = svg.querySelector("polyline");
  if (!line) {
    line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    svg.appendChild(line);
  }
  line.setAttribute("points", points.join(" "));
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// -- the tenant list ------------------------------------------------------------------

function tenantsPage() {
  const history = new Map();  // tenant id -> {time, next, rates[]}
  const body = $("tenants").tBodies[0];
  const stream = new Stream(() => "/api/tenants", (name, data) => {
    if (name === "refused") { stream.refused = true; setStatus("refused", "refused"); showMessage(data.message); return; }
    if (name !== "tenants") return;
    setStatus("live", "live");
    showMessage("");
    const seen = new Set();
    for (const tenant of data.tenants) {
      seen.add(String(tenant.id));
      let entry = history.get(tenant.id);
      if (!entry) history.set(tenant.id, entry = { time: data.time, next: tenant.next, rates: [] });
      else if (data.time > entry.time) {
        entry.rates.push(Math.max(0, (tenant.next - entry.next) / (data.time - entry.time)));
        if (entry.rates.length > SPARK_POINTS) entry.rates.shift();
        entry.time = data.time; entry.next = tenant.next;
      }
      let row = body.querySelector(`tr[data-tenant="${tenant.id}"]`);
      if (!row) {
        row = body.insertRow();
        row.dataset.tenant = tenant.id;
        const link = document.createElement("a");
        link.href = `/tenants/${tenant.id}`;
        link.textContent = tenant.id;
        row.insertCell().appendChild(link);
        for (let i = 0; i < 8; i++) row.insertCell();
        const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
        svg.setAttribute("class", "spark");
        svg.setAttribute("viewBox", "0 0 120 22");
        svg.setAttribute("preserveAspectRatio", "none");
        row.cells[3].appendChild(svg);
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.appendChild(document.createElement("span"));
        row.cells[4].appendChild(fill);
        row.cells[4].appendChild(document.createTextNode(""));
      }
      const rate = entry.rates.length ? entry.rates[entry.rates.length - 1] : 0;
      row.cells[1].textContent = tenant.name;
      row.cells[2].textContent = rate.toFixed(rate < 10 ? 1 : 0);
      row.cells[2].className = "rate";
      svgPolyline(row.cells[3].firstChild, entry.rates.length ? entry.rates : [0], 120, 22);
      row.cells[4].firstChild.firstChild.style.width = `${(tenant.fill * 100).toFixed(1)}%`;
      row.cells[4].lastChild.textContent = ` ${(tenant.fill * 100).toFixed(1)}%`;
      row.cells[5].textContent = tenant.oldest;
      row.cells[6].textContent = tenant.next;
      row.cells[6].className = "next";
      row.cells[7].textContent = tenant.subscribers;
      row.cells[8].textContent = tenant.failures + (tenant.failures_exact ? "" : "+") +
        (tenant.failures_behind ? ` (${tenant.failures_behind} to count)` : "");
      row.cells[8].className = "failures";
    }
    for (const row of [...body.rows]) if (!seen.has(row.dataset.tenant)) row.remove();
  });
  setupToken(() => { body.replaceChildren(); history.clear(); stream.refused = false; stream.start(); });
  stream.start();
}

// -- one tenant's tail ---------------------------------------------------------------

function formatTime(ns) {
  const ms = Number(BigInt(ns) / 1000000n);
  const iso = new Date(ms).toISOString();
  return iso.slice(0, 10) + " " + iso.slice(11, 23);
}

function tenantPage() {
  const tenantId = location.pathname.split("/").filter(Boolean)[1];
  $("tenant-id").textContent = tenantId;
  document.title = `ringtail: tenant ${tenantId}`;
  const body = $("records").tBodies[0];
  const state = { resume: null, rowsMax: 500, paused: false, shown: 0, gaps: 0,
                  failures: 0, rates: [], last: null, filter: "" };

  function filterQuery() {
    const query = new URLSearchParams();
    const opcodes = $("filter-opcodes").value.replace(/\s+/g, "");
    if (opcodes) query.set("opcodes", opcodes);
    if ($("filter-epoch-min").value.trim()) query.set("epoch_min", $("filter-epoch-min").value.trim());
    if ($("filter-epoch-max").value.trim()) query.set("epoch_max", $("filter-epoch-max").value.trim());
    if ($("filter-failure-only").checked) query.set("failure_only", "1");
    return query;
  }

  function urlFor() {
    const query = new URLSearchParams(state.filter);
    if (state.resume !== null) query.set("from", String(state.resume));
    return `/api/tenants/${tenantId}/records?${query}`;
  }

  function trim() {
    while (body.rows.length > state.rowsMax) body.deleteRow(0);
  }

  function counts() {
    $("counts").textContent = `${state.shown} records shown, ${state.failures} failures, ` +
      `${state.gaps} gaps` + (state.lastGap ? ` (last: ${state.lastGap} lost)` : "") +
      `; keeping the last ${state.rowsMax} rows`;
  }

  function addRecords(rows) {
    for (const r of rows) {
      const [seq, ts, slot, opcode, args, epoch, status, failureClass, failureName, backend, digest, failed] = r;
      if (state.resume !== null && seq < state.resume) continue;  // never twice
      const row = body.insertRow();
      row.dataset.seq = seq;
      row.className = failed ? "failure record" : "record";
      cell(row, seq, "seq");
      cell(row, formatTime(ts));
      cell(row, slot);
      cell(row, opcode, "opcode");
      cell(row, args.join(" "));
      cell(row, epoch, "epoch");
      cell(row, status);
      cell(row, failed ? failureName : "", "failure-class");
      cell(row, backend ? `code ${backend}` : "", "backend-code");
      cell(row, digest === "0000000000000000" ? "" : digest);
      if (failed) state.failures++;
      state.shown++;
      state.resume = seq + 1;
    }
    trim();
    counts();
  }

  function addGap(first, last) {
    const row = body.insertRow();
    row.className = "gap";
    row.dataset.gapFirst = first;
    row.dataset.gapLast = last;
    const td = cell(row, `gap: ${last - first + 1} records lost (${first}..${last}), ` +
                         "evicted before this page read them");
    td.colSpan = 10;
    state.gaps++;
    state.lastGap = `${first}..${last}`;  // stays in the counts line once the row scrolls out
    state.resume = Math.max(state.resume ?? 0, last + 1);
    trim();
    counts();
  }

  function addRate(data) {
    if (state.last && data.time > state.last.time) {
      const rate = Math.max(0, (data.next - state.last.next) / (data.time - state.last.time));
      state.rates.push(rate);
      if (state.rates.length > PLOT_POINTS) state.rates.shift();
      $("rate-now").textContent = rate.toFixed(rate < 10 ? 1 : 0);
      svgPolyline($("rate"), state.rates, 600, 60);
    }
    state.last = { time: data.time, next: data.next };
  }

  const stream = new Stream(urlFor, (name, data) => {
    if (name === "hello") {
      state.rowsMax = data.rows_max;
      if (state.resume === null) state.resume = data.start;
      state.last = null;  // a new stream's clock: the plot restarts its deltas
      $("tenant-name").textContent = data.name ? `(${data.name})` : "";
      setStatus("live", "live");
      showMessage("");
      counts();
    } else if (name === "records") addRecords(data);
    else if (name === "gap") addGap(data.first, data.last);
    else if (name === "stats") addRate(data);
    else if (name === "refused") { stream.refused = true; setStatus("refused", "refused"); showMessage(data.message); }
  });

  function restart(clear) {
    if (clear) {
      body.replaceChildren();
      Object.assign(state, { resume: null, shown: 0, failures: 0, gaps: 0, lastGap: null });
    }
    stream.refused = false;
    if (!state.paused) stream.start();
  }

  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filter = filterQuery().toString();
    restart(true);
  });
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "resume" : "pause";
    if (state.paused) { stream.stop(); setStatus("paused", "paused"); }
    else restart(false);  // from the record after the last one shown
  });
  setupToken(() => restart(true));
  restart(true);
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "tenant") tenantPage();
  else tenantsPage();
});
