// Worldsmith play page: keys up the WebSocket, frames down it, played at the video's frame rate.
// No build step, no dependencies. window.worldsmith exposes the state (stats, send) for tests and curious users.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYMAP = { KeyW: "w", KeyA: "a", KeyS: "s", KeyD: "d", ArrowUp: "up", ArrowDown: "down", ArrowLeft: "left", ArrowRight: "right" };
const ORDER = ["w", "s", "d", "a", "right", "left", "up", "down"];
const LABEL = { w: "W", s: "S", d: "D", a: "A", right: "→", left: "←", up: "↑", down: "↓" };

const state = {
  ws: null, info: null, connected: false, started: false, paused: false, mode: "frame", fps: 16,
  held: new Set(), seq: 0, pressTimes: new Map(),           // key state changes the server has not yet answered
  expect: 0, header: null, decodeChain: Promise.resolve(),  // frames still due for the current header
  queue: [], nextDue: 0, received: [],                      // decoded frames waiting to be shown; receive times
  path: [], mime: "image/jpeg",
};
const stats = {
  framesReceived: 0, framesShown: 0, chunks: 0, keyLatencies: [], chunkLatencies: [], lastHeader: null,
  messages: [], saved: null, started: 0, uploaded: null, closed: null,
};
window.worldsmith = { state, stats, send: (m) => send(m) };

// ---------------------------------------------------------------- connection
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setConn("connecting…", "");
  ws.onopen = () => { state.connected = true; setConn("connected", "on"); };
  ws.onclose = (ev) => {
    state.connected = false; state.started = false;
    stats.closed = { code: ev.code, reason: ev.reason };
    if (ev.code === 1013) return;  // busy: the message already said so
    setConn("disconnected", "off");
    const why = ev.code === 1009 ? "The last message was too large for the server (upload limit)." : `The connection closed (code ${ev.code}).`;
    showOverlay("Disconnected", why + " Your downloads stay available.", "Reconnect");
    enableControls(false);
  };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(typeof msg === "string" || msg instanceof ArrayBuffer ? msg : JSON.stringify(msg));
}

function setConn(text, cls) { $("conn-text").textContent = text; $("dot").className = "dot " + cls; }

// ---------------------------------------------------------------- messages
function onJson(m) {
  stats.messages.push(m.type);
  switch (m.type) {
    case "hello": return onHello(m);
    case "busy":
      setConn("busy", "busy");
      showOverlay("Server busy", m.message, "Try again");
      return toast("busy", m.message, "notice");
    case "started":
      state.started = true; state.paused = false; state.path = []; state.queue = []; state.pressTimes.clear();
      state.expect = 1; state.header = { type: "started", preview: true };
      stats.started += 1; stats.framesShown = 0;
      hideOverlay(); enableControls(true); $("btn-pause").firstChild.textContent = "Pause ";
      $("take").textContent = `take ${m.take}` + (m.kind === "video" ? ` · ${m.history_latents} latents of history` : "");
      $("saved").classList.add("hidden");
      $("stage").focus();
      return toast("started", m.message, "info");
    case "chunk":
      state.header = m; state.expect = m.frames; stats.chunks += 1; stats.lastHeader = m;
      stats.chunkLatencies.push(m.latency_s);
      state.path.push(m.pose);
      updateStats(m);
      return;
    case "uploaded":
      stats.uploaded = m;
      toast("upload", `${m.kind === "video" ? `video, ${m.frames} frames` : "image"}: ${m.framing}`, "info");
      return send({ type: "start", source: "upload" });
    case "saved": return onSaved(m);
    case "notice":
      if (/limit/.test(m.message)) setPaused(true);
      return toast("note", m.message, "notice");
    case "error":
      if (m.where === "step") setPaused(true);
      if (m.where === "start" && !state.started) showOverlay("Could not start", m.message);
      return toast(m.where || "error", m.message, "error");
  }
}

function onHello(m) {
  state.info = m; state.fps = m.fps; state.mime = m.frame_format === "webp" ? "image/webp" : "image/jpeg";
  const canvas = $("view");
  canvas.width = m.width; canvas.height = m.height;
  document.documentElement.style.setProperty("--aspect", `${m.width} / ${m.height}`);
  const b = m.bundle;
  $("bundle").textContent = `${b.path} · ${b.stage || "bundle"}${b.step != null ? " step " + b.step : ""} · ${m.width}×${m.height} @ ${m.fps} fps · ${m.frames_per_chunk} frames per chunk · ${m.device}`;
  $("limit").textContent = `up to ${(m.upload_limit_bytes / 2 ** 20).toFixed(0)} MiB; any aspect ratio is centre-cropped to ${m.width}×${m.height}`;
  renderGallery(m.gallery);
  if (!state.started) showOverlay("Pick a place to start", m.gallery.length
    ? "Choose a frame below, or drop an image or a video here. Then hold W to walk."
    : "Drop an image or a video here (or use Upload). Then hold W to walk.");
}

function onFrame(buf) {
  if (state.expect <= 0) return;  // not announced: ignore
  state.expect -= 1;
  const header = state.header, first = header && !header.seenFirst;
  if (header) header.seenFirst = true;
  if (header && header.type === "chunk") { stats.framesReceived += 1; state.received.push(performance.now()); }
  const blob = new Blob([buf], { type: state.mime });
  state.decodeChain = state.decodeChain.then(() => createImageBitmap(blob)).then((bmp) => {
    state.queue.push({ bmp, header: first ? header : null, chunk: !!header && header.type === "chunk" });
  }).catch(() => toast("frame", "a frame could not be decoded", "error"));
}

// ---------------------------------------------------------------- playback
function frameLoop(now) {
  requestAnimationFrame(frameLoop);
  if (!state.queue.length || now < state.nextDue) return;
  const perChunk = state.info ? state.info.frames_per_chunk : 16;
  while (state.queue.length > 2 * perChunk + 1) {  // far behind (a slow tab): skip ahead rather than lag
    const skipped = state.queue.shift();
    if (skipped.header) markShown(skipped.header, now);
    skipped.bmp.close();
  }
  const item = state.queue.shift();
  const ctx = $("view").getContext("2d");
  ctx.drawImage(item.bmp, 0, 0, $("view").width, $("view").height);
  item.bmp.close();
  if (item.chunk) stats.framesShown += 1;
  if (item.header) markShown(item.header, now);
  state.nextDue = Math.max(now, state.nextDue) + 1000 / state.fps;
}

function markShown(header, now) {
  if (header.type !== "chunk") return;
  for (const [seq, t] of state.pressTimes) {  // every key change this chunk answers
    if (seq <= header.seq) { stats.keyLatencies.push(now - t); state.pressTimes.delete(seq); }
  }
  drawMap();
  const last = stats.keyLatencies.slice(-9);
  if (last.length) {
    const med = median(last);
    $("hud-key").textContent = med.toFixed(0);
    $("st-key").textContent = `${med.toFixed(0)} ms (median of ${last.length})`;
  }
}

// ---------------------------------------------------------------- keys
function keysChanged(pressed) {
  state.seq += 1;
  if (pressed) state.pressTimes.set(state.seq, performance.now());
  const held = ORDER.filter((k) => state.held.has(k));
  send({ type: "keys", held, seq: state.seq });
  for (const el of document.querySelectorAll("kbd[data-key]")) el.classList.toggle("down", state.held.has(el.dataset.key));
  $("held").textContent = held.map((k) => LABEL[k]).join(" + ");
}

window.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement) return;
  const k = KEYMAP[e.code];
  if (k) {
    e.preventDefault();
    if (!e.repeat && !state.held.has(k)) { state.held.add(k); keysChanged(true); }
  } else if (e.code === "Space" && state.started) { e.preventDefault(); togglePause(); }
  else if (e.code === "KeyR" && state.started && !e.ctrlKey && !e.metaKey) send({ type: "reset" });
});
window.addEventListener("keyup", (e) => {
  const k = KEYMAP[e.code];
  if (k && state.held.has(k)) { e.preventDefault(); state.held.delete(k); keysChanged(false); }
});
window.addEventListener("blur", () => { if (state.held.size) { state.held.clear(); keysChanged(false); } });

// ---------------------------------------------------------------- controls
function togglePause() { setPaused(!state.paused); send({ type: state.paused ? "pause" : "resume" }); }
function setPaused(p) { state.paused = p; $("btn-pause").firstChild.textContent = p ? "Resume " : "Pause "; }
$("btn-pause").onclick = togglePause;
$("btn-reset").onclick = () => send({ type: "reset" });
$("btn-save").onclick = () => { $("btn-save").disabled = true; $("btn-save").textContent = "Writing…"; send({ type: "save" }); };
$("overlay-btn").onclick = () => { hideOverlay(); connect(); };
function enableControls(on) { for (const id of ["btn-pause", "btn-reset", "btn-save"]) $(id).disabled = !on; }

function onSaved(m) {
  stats.saved = m;
  $("btn-save").disabled = false; $("btn-save").textContent = "Download this session";
  const f = m.files, box = $("saved");
  box.innerHTML = "";
  const title = document.createElement("div");
  title.innerHTML = `<b>Take ${m.take} saved.</b> `;
  for (const [label, key] of [["video (mp4)", "mp4"], ["pose JSON", "pose"], ["sidecar", "sidecar"], ["start", "start"], ["all (zip)", "zip"]]) {
    const a = document.createElement("a"); a.href = f[key]; a.textContent = label; a.download = ""; title.appendChild(a);
  }
  const code = document.createElement("code"); code.textContent = m.replay;
  box.append(title, code); box.classList.remove("hidden");
  const a = document.createElement("a"); a.href = f.zip; a.download = ""; document.body.appendChild(a); a.click(); a.remove();
}

// ---------------------------------------------------------------- starts
function renderGallery(items) {
  const g = $("gallery");
  if (!items.length) return;
  g.innerHTML = "";
  $("mode").classList.toggle("hidden", !items.some((it) => it.clip));
  items.forEach((it) => {
    const b = document.createElement("button");
    b.className = "thumb"; b.title = it.label; b.dataset.index = it.index;
    b.innerHTML = `<img alt="" src="${it.url}"><span></span>`;
    b.querySelector("span").textContent = it.label;
    b.onclick = () => {
      for (const t of g.querySelectorAll(".thumb")) t.classList.toggle("on", t === b);
      send({ type: "start", source: "gallery", index: it.index, video: state.mode === "clip" && it.clip });
    };
    g.appendChild(b);
  });
}
for (const b of document.querySelectorAll("#mode button")) {
  b.onclick = () => { state.mode = b.dataset.mode; for (const o of document.querySelectorAll("#mode button")) o.classList.toggle("on", o === b); };
}

async function upload(file) {
  if (!file) return;
  const limit = state.info ? state.info.upload_limit_bytes : Infinity;
  if (file.size > limit) {
    return toast("upload", `${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the limit is ${(limit / 2 ** 20).toFixed(1)} MiB`, "error");
  }
  send({ type: "upload", name: file.name, size: file.size });
  send(await file.arrayBuffer());
}
$("file").onchange = (e) => { upload(e.target.files[0]); e.target.value = ""; };
const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.remove("hidden"); });
stage.addEventListener("dragleave", () => $("drop").classList.add("hidden"));
stage.addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.add("hidden"); upload(e.dataTransfer.files[0]); });
stage.addEventListener("click", () => stage.focus());

// ---------------------------------------------------------------- display
function updateStats(m) {
  const now = performance.now();
  state.received = state.received.filter((t) => now - t < 2000);
  const fps = state.received.length / 2;
  $("hud-lat").textContent = (m.latency_s * 1000).toFixed(0);
  $("hud-fps").textContent = fps.toFixed(1);
  $("st-lat").textContent = `${(m.latency_s * 1000).toFixed(0)} ms (median ${(median(stats.chunkLatencies.slice(-20)) * 1000).toFixed(0)})`;
  $("st-split").textContent = `${(m.model_s * 1000).toFixed(0)} / ${(m.decode_s * 1000).toFixed(0)} ms`;
  $("st-fps").textContent = `${fps.toFixed(1)} (video ${state.fps})`;
  $("st-count").textContent = `${stats.chunks} · ${stats.framesReceived}`;
  $("st-ctx").textContent = `${m.context_latents} of ${m.latents} latents`;
  $("st-drop").textContent = `${m.dropped_chunks || 0}`;
  $("pos").textContent = `x ${m.pose.x.toFixed(2)} · z ${m.pose.z.toFixed(2)} · yaw ${m.pose.yaw_deg.toFixed(0)}°`;
  stats.fpsDelivered = fps;
}

function drawMap() {
  const c = $("map"), ctx = c.getContext("2d"), P = state.path;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.strokeStyle = "rgba(255,255,255,.05)"; ctx.lineWidth = 1;
  for (let x = 0; x < c.width; x += 24) { ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, c.height); ctx.stroke(); }
  for (let y = 0; y < c.height; y += 24) { ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(c.width, y); ctx.stroke(); }
  const pts = [{ x: 0, z: 0, yaw_deg: 0 }, ...P];
  const xs = pts.map((p) => p.x), zs = pts.map((p) => p.z);
  const span = Math.max(0.5, Math.max(...xs) - Math.min(...xs), Math.max(...zs) - Math.min(...zs));
  const s = Math.min(c.width, c.height) * 0.8 / span;
  const cx = (Math.max(...xs) + Math.min(...xs)) / 2, cz = (Math.max(...zs) + Math.min(...zs)) / 2;
  const X = (p) => c.width / 2 + (p.x - cx) * s, Y = (p) => c.height / 2 - (p.z - cz) * s;  // forward (+z) is up
  const grad = ctx.createLinearGradient(0, 0, c.width, 0);
  grad.addColorStop(0, "#38bdf8"); grad.addColorStop(1, "#5eead4");
  ctx.strokeStyle = grad; ctx.lineWidth = 2.5; ctx.lineJoin = "round"; ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p), Y(p)) : ctx.moveTo(X(p), Y(p))));
  ctx.stroke();
  ctx.fillStyle = "#8b98a8"; ctx.beginPath(); ctx.arc(X(pts[0]), Y(pts[0]), 3.5, 0, 7); ctx.fill();
  const last = pts[pts.length - 1], a = (last.yaw_deg * Math.PI) / 180;
  ctx.save(); ctx.translate(X(last), Y(last)); ctx.rotate(a);
  ctx.fillStyle = "#5eead4"; ctx.beginPath(); ctx.moveTo(0, -9); ctx.lineTo(6, 6); ctx.lineTo(0, 3); ctx.lineTo(-6, 6); ctx.closePath(); ctx.fill();
  ctx.restore();
}

function showOverlay(title, text, button) {
  $("overlay-title").textContent = title; $("overlay-text").textContent = text;
  $("overlay-btn").textContent = button || ""; $("overlay-btn").classList.toggle("hidden", !button);
  $("overlay").classList.remove("hidden");
}
function hideOverlay() { $("overlay").classList.add("hidden"); }

function toast(title, text, kind) {
  const t = document.createElement("div");
  t.className = `toast ${kind}`;
  const b = document.createElement("b"); b.textContent = title;
  t.append(b, document.createTextNode(text));
  $("toasts").appendChild(t);
  setTimeout(() => t.remove(), kind === "error" ? 9000 : 5000);
  while ($("toasts").children.length > 4) $("toasts").firstChild.remove();
}

function median(a) { if (!a.length) return NaN; const s = [...a].sort((x, y) => x - y); return s[Math.floor(s.length / 2)]; }

drawMap();
requestAnimationFrame(frameLoop);
connect();
