// stc-serve console: plain JS, no build step, no CDN. Talks to the same HTTP API with the API key as a header.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$("key").value = params.get("key") || localStorage.getItem("stc-key") || "";
$("key").onchange = () => localStorage.setItem("stc-key", $("key").value);
let selected = null, history = {}, eventsAbort = null;
const HISTORY = 120;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(body ? {"Content-Type": "application/json"} : {}),
                               body: body ? JSON.stringify(body) : undefined});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}
// Server-sent events over fetch (EventSource cannot send the API key header).
async function sse(path, init, onEvent, signal) {
  const r = await fetch(path, Object.assign({headers: headers(init.json ? {"Content-Type": "application/json"} : {}),
                                             signal}, init, {body: init.json ? JSON.stringify(init.json) : undefined}));
  if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error((d.error && d.error.message) || r.statusText); }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += dec.decode(value, {stream: true});
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, at); buf = buf.slice(at + 2);
      let ev = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) ev = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(ev, JSON.parse(data));
    }
  }
}
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }

async function refresh() {
  let list;
  try { list = (await api("GET", "/streams")).streams; $("status").textContent = "ok · " + list.length + " streams"; }
  catch (e) { $("status").textContent = "error: " + e.message; return; }
  const body = $("streams").querySelector("tbody");
  body.replaceChildren();
  for (const s of list) {
    const tr = document.createElement("tr");
    tr.dataset.stream = s.stream_id;
    if (s.stream_id === selected) tr.className = "sel";
    const img = document.createElement("img");
    img.alt = "latest frame";
    frameInto(img, s.stream_id);
    const td = document.createElement("td"); td.appendChild(img); tr.appendChild(td);
    for (const v of [s.stream_id, s.state, s.ingest.frames_in, s.ingest.frames_encoded, s.ingest.frames_dropped,
                     s.kv_bytes ?? "-"]) tr.appendChild(cell(String(v)));
    tr.onclick = () => select(s.stream_id);
    body.appendChild(tr);
    const h = history[s.stream_id] = history[s.stream_id] || [];
    h.push([s.ingest.frames_in, s.ingest.frames_encoded, s.ingest.frames_dropped, s.kv_bytes || 0]);
    if (h.length > HISTORY) h.shift();
  }
  if (!selected && list.length) select(list[0].stream_id);
  draw();
  if (selected) refreshWatches();
}
async function frameInto(img, sid) {
  const r = await fetch("/streams/" + encodeURIComponent(sid) + "/frame.jpg", {headers: headers()});
  if (r.ok) img.src = URL.createObjectURL(await r.blob());
}
function draw() {
  const c = $("chart"), g = c.getContext("2d"), h = history[selected] || [];
  g.clearRect(0, 0, c.width, c.height);
  $("chart-of").textContent = selected ? "(" + selected + ")" : "";
  if (h.length < 2) return;
  const colors = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"];
  const left = Math.max(1, ...h.map((r) => Math.max(r[0], r[1], r[2]))), right = Math.max(1, ...h.map((r) => r[3]));
  for (let k = 0; k < 4; k++) {
    const top = k === 3 ? right : left;
    g.strokeStyle = colors[k]; g.beginPath();
    h.forEach((r, i) => { const x = i * (c.width - 1) / (HISTORY - 1), y = c.height - 1 - r[k] / top * (c.height - 10);
                          i ? g.lineTo(x, y) : g.moveTo(x, y); });
    g.stroke();
  }
}
function select(sid) {
  if (sid === selected) return;
  selected = sid;
  $("selected").textContent = "on " + sid;
  $("events").replaceChildren();
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = new AbortController();
  sse("/streams/" + encodeURIComponent(sid) + "/events", {method: "GET"}, onWatchEvent, eventsAbort.signal)
    .catch(() => {});
  refreshWatches();
}
function onWatchEvent(kind, ev) {
  const li = document.createElement("li");
  if (kind === "end" || ev.type === "end") {  // the stream closed, ended or was reaped: its watches stopped
    li.textContent = `[end] ${ev.reason || ""} (${ev.watches_stopped ?? 0} watches stopped)`;
    $("events").prepend(li);
    return;
  }
  const what = ev.answer !== undefined ? JSON.stringify(ev.answer) : (ev.score !== undefined ? "P(yes)=" + ev.score.toFixed(2) : "");
  li.textContent = `[${kind}] ${ev.question || ""} ${what} (pts ${ev.pts ?? "-"}, frame ${ev.frame_index ?? "-"})`;
  if (kind === "alert") { li.className = "alert"; $("alerts").prepend(li); }
  else { $("events").prepend(li); while ($("events").children.length > 50) $("events").lastChild.remove(); }
}
async function refreshWatches() {
  try {
    const ws = (await api("GET", "/streams/" + encodeURIComponent(selected) + "/watches")).watches;
    $("watches").replaceChildren(...ws.map((w) => {
      const li = document.createElement("li");
      li.textContent = `${w.request.question} (${w.request.mode}, every ${w.request.every_s}s) ticks=${w.ticks} alerts=${w.alerts} `;
      const b = document.createElement("button"); b.textContent = "delete";
      b.onclick = () => api("DELETE", `/streams/${encodeURIComponent(selected)}/watches/${w.watch_id}`).then(refreshWatches);
      li.appendChild(b); return li;
    }));
  } catch (e) { $("watches").textContent = e.message; }
}
$("create").onsubmit = async (e) => {
  e.preventDefault();
  const src = $("source").value.trim();
  try { const s = await api("POST", "/streams", src ? {source: src} : {}); select(s.stream_id); refresh(); }
  catch (err) { $("status").textContent = "error: " + err.message; }
};
$("ask").onsubmit = async (e) => {
  e.preventDefault();
  if (!selected) return;
  const out = $("answer"); out.textContent = ""; out.dataset.done = "false";
  try {
    await sse("/streams/" + encodeURIComponent(selected) + "/questions",
              {method: "POST", json: {question: $("question").value || "What is happening?"}},
              (kind, d) => { if (kind === "token") out.textContent += d.text;
                             else if (kind === "done") out.dataset.done = "true";
                             else if (kind === "error") out.textContent += " [error: " + d.message + "]"; });
  } catch (err) { out.textContent = "error: " + err.message; }
};
$("watch").onsubmit = async (e) => {
  e.preventDefault();
  if (!selected) return;
  try {
    await api("POST", "/streams/" + encodeURIComponent(selected) + "/watches",
              {question: $("wquestion").value || "Is there a person?", mode: $("wmode").value,
               every_s: parseFloat($("wevery").value), threshold: parseFloat($("wthr").value)});
    refreshWatches();
  } catch (err) { $("status").textContent = "error: " + err.message; }
};
refresh();
setInterval(refresh, 1000);
