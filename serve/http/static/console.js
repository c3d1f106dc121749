// stc-serve console: plain JS, no build step, no CDN. Talks to the same HTTP API with the API key as a header.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$("key").value = params.get("key") || localStorage.getItem("stc-key") || "";
$("key").onchange = () => localStorage.setItem("stc-key", $("key").value);
let selected = null, history = {}, eventsAbort = null;
const HISTORY = 120, blobs = new Map();  // thumbnail url -> object URL (bounded below)

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
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const sec = (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(1) + " s");
const enc = encodeURIComponent;
// Images need the key header: fetch them and show object URLs (thumbnails are immutable, so they are cached).
async function imgInto(img, url, cache) {
  if (cache && blobs.has(url)) { img.src = blobs.get(url); return; }
  const r = await fetch(url, {headers: headers()});
  if (!r.ok) return;
  const src = URL.createObjectURL(await r.blob());
  if (cache) { blobs.set(url, src); if (blobs.size > 300) blobs.delete(blobs.keys().next().value); }
  else if (img.dataset.src) URL.revokeObjectURL(img.dataset.src);
  img.dataset.src = src;
  img.src = src;
}

// ---- the camera grid -------------------------------------------------------------------------------------------
async function refresh() {
  let list;
  try { list = (await api("GET", "/streams")).streams; $("status").textContent = "ok · " + list.length + " streams"; }
  catch (e) { $("status").textContent = "error: " + e.message; return; }
  const grid = $("grid"), ids = new Set(list.map((s) => s.stream_id));
  for (const t of [...grid.children]) if (!ids.has(t.dataset.stream)) t.remove();
  for (const s of list) {
    const tile = grid.querySelector(`.tile[data-stream="${CSS.escape(s.stream_id)}"]`) || newTile(s);
    tile.classList.toggle("sel", s.stream_id === selected);
    tile.querySelector(".state").textContent = s.state;
    tile.querySelector(".encoded").textContent = s.ingest.frames_encoded;
    tile.querySelector(".in").textContent = s.ingest.frames_in;
    tile.querySelector(".dropped").textContent = s.ingest.frames_dropped;
    imgInto(tile.querySelector("img"), "/streams/" + enc(s.stream_id) + "/frame.jpg", false);
    const h = history[s.stream_id] = history[s.stream_id] || [];
    h.push([s.ingest.frames_in, s.ingest.frames_encoded, s.ingest.frames_dropped, s.kv_bytes || 0]);
    if (h.length > HISTORY) h.shift();
  }
  if (!selected && list.length) select(list[0].stream_id);
  draw();
  if (selected) { refreshWatches(); refreshTimeline(); }
}
function newTile(s) {
  const tile = el("div", "tile");
  tile.dataset.stream = s.stream_id;
  const img = el("img"); img.alt = "latest frame of " + s.stream_id;
  tile.append(img, el("span", "state"), el("div", "name", s.stream_id));
  const labels = el("div", "labels");
  for (const [k, v] of Object.entries(s.labels || {})) labels.append(el("span", "chip", k + "=" + v));
  const counts = el("div", "counts");
  counts.append("in ", el("span", "in"), " · enc ", el("span", "encoded"), " · drop ", el("span", "dropped"));
  tile.append(labels, counts, el("div", "fleet"));
  tile.onclick = () => select(s.stream_id);
  $("grid").append(tile);
  return tile;
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
  for (const t of $("grid").children) t.classList.toggle("sel", t.dataset.stream === sid);
  $("events").replaceChildren(); $("found").replaceChildren(); $("strip").replaceChildren(); $("viewer").hidden = true;
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = new AbortController();
  sse("/streams/" + enc(sid) + "/events", {method: "GET"}, onWatchEvent, eventsAbort.signal).catch(() => {});
  refreshWatches(); refreshTimeline();
}
function parseLabels(text) {
  const out = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at > 0) out[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return out;
}

// ---- a fleet question: answers land on each tile -------------------------------------------------------------
$("fleet").onsubmit = async (e) => {
  e.preventDefault();
  const mode = $("fmode").value, body = {question: $("fquestion").value || "Is there a person?", mode,
                                         selector: parseLabels($("fselector").value)};
  for (const t of $("grid").children) { t.classList.remove("top"); t.querySelector(".fleet").replaceChildren(); }
  $("fleet-status").textContent = "asking…";
  try {
    await sse("/questions", {method: "POST", json: body}, (kind, d) => {
      if (kind === "answer") showFleetAnswer(d);
      else if (kind === "done") {
        for (const r of d.ranking) {
          const tile = $("grid").querySelector(`.tile[data-stream="${CSS.escape(r.stream_id)}"]`);
          if (!tile) continue;
          tile.querySelector(".fleet").prepend(el("span", "rank", "#" + r.rank));
          if (r.rank === 1) tile.classList.add("top");
        }
        $("fleet-status").textContent = `${d.answered} answered, ${d.failed} failed, ${Math.round(d.total_ms)} ms`;
        $("fleet-status").dataset.done = "true";
      }
    });
  } catch (err) { $("fleet-status").textContent = "error: " + err.message; }
};
function showFleetAnswer(d) {
  const tile = $("grid").querySelector(`.tile[data-stream="${CSS.escape(d.stream_id)}"]`);
  if (!tile) return;
  const out = tile.querySelector(".fleet");
  out.replaceChildren();
  if (d.status !== 200) { out.append(el("span", "err", "error: " + d.error.message)); return; }
  if (d.score !== undefined) {
    out.append(el("span", "score", "P(yes)=" + d.score.toFixed(2)));
    const bar = el("div", "bar"); bar.style.width = Math.round(100 * d.score) + "%"; out.append(bar);
  } else out.append(el("span", "text", d.answer));
}

// ---- moments and the timeline of the selected camera ---------------------------------------------------------
$("moments").onsubmit = async (e) => {
  e.preventDefault();
  if (!selected) return;
  $("found").replaceChildren(el("li", "", "searching…"));
  try {
    const r = await api("POST", "/streams/" + enc(selected) + "/moments",
                        {query: $("mquery").value || "Is there a person?", method: $("mmethod").value, top_k: 5});
    $("found").replaceChildren(...r.moments.map((m) => {
      const li = el("li", "moment");
      const img = el("img"); if (m.thumbnail) imgInto(img, m.thumbnail.url, true);
      li.append(img, `${sec(m.pts_start)} – ${sec(m.pts_end)}  score ${m.score.toFixed(2)} (${m.blocks} block${m.blocks > 1 ? "s" : ""})`);
      li.onclick = () => view(m.thumbnail, `${m.query}: ${sec(m.pts_start)} – ${sec(m.pts_end)}, score ${m.score.toFixed(2)}`);
      return li;
    }));
    if (!r.moments.length) $("found").replaceChildren(el("li", "", "no blocks in range"));
    $("found").dataset.done = "true";
    refreshTimeline();
  } catch (err) { $("found").replaceChildren(el("li", "err", "error: " + err.message)); }
};
function view(thumb, caption) {
  $("viewer").hidden = false;
  $("vcap").textContent = caption;
  if (thumb) imgInto($("vimg"), thumb.url, true); else $("vimg").removeAttribute("src");
}
async function refreshTimeline() {
  let tl;
  try { tl = await api("GET", "/streams/" + enc(selected) + "/timeline"); } catch (e) { return; }
  if (tl.stream_id !== selected) return;  // the selection changed meanwhile
  const strip = $("strip"), shown = new Set([...strip.children].map((i) => i.dataset.url));
  for (const t of tl.thumbnails.slice(-30)) {
    if (shown.has(t.url)) continue;
    const img = el("img"); img.dataset.url = t.url; img.title = `${sec(t.pts_start)} – ${sec(t.pts_end)}`;
    imgInto(img, t.url, true);
    img.onclick = () => view(t, `chunk ${sec(t.pts_start)} – ${sec(t.pts_end)}`);
    strip.append(img);
  }
  while (strip.children.length > 30) strip.firstChild.remove();
  $("timeline").replaceChildren(...tl.entries.slice(-60).reverse().map((x) => {
    const li = el("li", "entry");
    li.dataset.kind = x.kind;
    const img = el("img"); if (x.thumbnail) imgInto(img, x.thumbnail.url, true);
    const what = x.kind === "caption" ? JSON.stringify(x.text) : x.kind === "moment" ? `${x.text} → ${sec(x.pts)} – ${sec(x.pts_end)}`
      : `${x.question || ""} P(yes)=${(x.score ?? 0).toFixed(2)}`;
    li.append(img, el("span", "kind k-" + x.kind, x.kind), ` ${sec(x.pts)} ${what}`);
    li.onclick = () => view(x.thumbnail, `${x.kind} at ${sec(x.pts)}: ${what}`);
    return li;
  }));
}

// ---- watches, alerts, questions on the selected camera ---------------------------------------------------------
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
    const ws = (await api("GET", "/streams/" + enc(selected) + "/watches")).watches;
    $("watches").replaceChildren(...ws.map((w) => {
      const li = document.createElement("li");
      li.textContent = `${w.request.question} (${w.request.mode}, every ${w.request.every_s}s) ticks=${w.ticks} alerts=${w.alerts} `;
      const b = document.createElement("button"); b.textContent = "delete";
      b.onclick = () => api("DELETE", `/streams/${enc(selected)}/watches/${w.watch_id}`).then(refreshWatches);
      li.appendChild(b); return li;
    }));
  } catch (e) { $("watches").textContent = e.message; }
}
$("create").onsubmit = async (e) => {
  e.preventDefault();
  const src = $("source").value.trim(), body = {labels: parseLabels($("labels").value)};
  if (src) body.source = src;
  try { const s = await api("POST", "/streams", body); select(s.stream_id); refresh(); }
  catch (err) { $("status").textContent = "error: " + err.message; }
};
$("ask").onsubmit = async (e) => {
  e.preventDefault();
  if (!selected) return;
  const out = $("answer"); out.textContent = ""; out.dataset.done = "false";
  try {
    await sse("/streams/" + enc(selected) + "/questions",
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
    await api("POST", "/streams/" + enc(selected) + "/watches",
              {question: $("wquestion").value || "Is there a person?", mode: $("wmode").value,
               every_s: parseFloat($("wevery").value), threshold: parseFloat($("wthr").value)});
    refreshWatches();
  } catch (err) { $("status").textContent = "error: " + err.message; }
};
refresh();
setInterval(refresh, 1000);
