// The farm dashboard: plain JavaScript, same origin only.
"use strict";

const PHASES = ["sync", "materialise", "build", "export", "push"];
// The agent's phase names → the five the timeline shows.
const PHASE_CLASS = { "context sync": "sync", "upload": "push" };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (r.status === 401) {
    location.href = "/login";
    throw new Error("no session");
  }
  if (!r.ok) throw new Error(url + ": " + r.status + " " + (await r.text()));
  return r.json();
}

// One bar per platform, split by phase; `scale` is the longest total shown, in ms.
function timeline(p, scale) {
  const bar = el("span", { class: "bar", "data-platform": p.platform });
  if (p.state === "running") {
    bar.append(el("span", { class: "running-bar", title: "running" }));
    return bar;
  }
  for (const ph of p.phases) {
    const cls = PHASE_CLASS[ph.name] || (PHASES.includes(ph.name) ? ph.name : "other");
    const seg = el("span", { class: cls, "data-phase": ph.name, title: ph.name + " " + ph.ms + " ms" });
    seg.style.width = (100 * ph.ms / Math.max(scale, 1)) + "%";
    bar.append(seg);
  }
  return bar;
}

function total(p) {
  return p.phases.reduce((a, ph) => a + ph.ms, 0);
}

function seconds(ms) {
  return ms == null ? "" : (ms / 1000).toFixed(1) + " s";
}

function platformCells(p, scale) {
  return [
    el("span", { class: "platform" }, p.platform),
    el("span", { class: "state state-" + p.state, "data-platform": p.platform }, p.state),
    el("span", { class: "agent" }, p.agent || ""),
    el("span", { class: "placement" }, p.placement),
    timeline(p, scale),
    el("span", { class: "duration" }, seconds(p.duration_ms)),
  ];
}

function setRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function overview() {
  const o = await getJson("/api/overview");
  document.getElementById("me").textContent = o.me + " (" + o.role + ")";
  setRows(document.querySelector("#agents tbody"), o.agents.map((a) =>
    el("tr", { class: "agent", "data-agent": a.name },
      el("td", { class: "name" }, a.name),
      el("td", { class: "state state-" + a.state }, a.state),
      el("td", { class: "native" }, a.native.join(", ")),
      el("td", { class: "emulated" }, a.emulated.join(", ")),
      el("td", { class: "labels" }, Object.entries(a.labels).map(([k, v]) => k + "=" + v).join(", ")),
      el("td", { class: "slots" }, a.busy + "/" + a.capacity),
      el("td", { class: "seen" }, ago(a.last_seen_ms)),
      el("td", { class: "builder" }, a.builder))));
  const queue = Object.entries(o.queue);
  document.getElementById("queue").replaceChildren(...(queue.length
    ? queue.map(([p, n]) => el("li", { "data-platform": p }, p + ": " + n + " waiting"))
    : [el("li", {}, "empty")]));
  const scale = Math.max(1, ...o.builds.flatMap((b) => b.platforms.map(total)));
  setRows(document.querySelector("#builds tbody"), o.builds.map((b) =>
    el("tr", { class: "build", "data-build": b.id },
      el("td", {}, el("a", { href: "/builds/" + encodeURIComponent(b.id) }, b.id)),
      el("td", { class: "state state-" + b.state }, b.state),
      el("td", { class: "client" }, b.client),
      el("td", { class: "tags" }, b.tags.join(" ")),
      el("td", { class: "platforms" }, ...b.platforms.map((p) => el("div", {}, ...platformCells(p, scale)))))));
}

async function buildPage(id) {
  const b = await getJson("/api/builds/" + encodeURIComponent(id));
  const state = document.getElementById("state");
  state.textContent = b.state;
  state.className = "state-" + b.state;
  document.getElementById("summary").textContent =
    "client " + b.client + (b.tags.length ? "; tags " + b.tags.join(" ") : "") +
    (b.index ? "; index " + b.index : "") + (b.error ? "; " + b.error : "");
  const scale = Math.max(1, ...b.platforms.map(total));
  setRows(document.querySelector("#platforms tbody"), b.platforms.map((p) =>
    el("tr", { class: "platform", "data-platform": p.platform },
      ...platformCells(p, scale).map((c) => el("td", {}, c)))));
  document.getElementById("cancel").disabled = !["queued", "running", "stitching"].includes(b.state);
  return b.state;
}

function followLog(id) {
  const log = document.getElementById("log");
  const source = new EventSource("/api/builds/" + encodeURIComponent(id) + "/logs");
  // Each (re)connection replays the stored lines from the start.
  source.addEventListener("open", () => log.replaceChildren());
  source.addEventListener("log", (e) => {
    const l = JSON.parse(e.data);
    log.append(el("span", { class: "line", "data-platform": l.platform }, "[" + l.platform + "] " + l.line + "\n"));
    log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", () => {
    source.close();
    document.getElementById("log-state").textContent = "(ended)";
  });
}

function every(ms, f) {
  const tick = () => f().catch((e) => console.error(e)).finally(() => setTimeout(tick, ms));
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "overview") every(1000, overview);
  if (page === "build") {
    const id = document.body.dataset.build;
    getJson("/api/overview").then((o) => { document.getElementById("me").textContent = o.me + " (" + o.role + ")"; });
    every(1000, () => buildPage(id));
    followLog(id);
    document.getElementById("cancel").addEventListener("click", async () => {
      const r = await fetch("/api/builds/" + encodeURIComponent(id) + "/cancel",
        { method: "POST", credentials: "same-origin", headers: { "x-farm-dashboard": "1" } });
      document.getElementById("cancel-result").textContent = r.ok ? "cancelled" : await r.text();
      buildPage(id);
    });
  }
});
