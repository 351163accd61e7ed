// anyorder trace viewer: one card per example, one panel per (run, decoder), a step slider per
// card. The data format is described in anyorder/viewer/data.py. No network, no libraries.
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const KIND = ["commit", "remask", "edit"];
const cards = [];
let active = null;

function tokStr(t) { return t < 0 ? "_" : (D.vocab[t] !== undefined ? D.vocab[t] : String(t)); }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) { return v === null || v === undefined ? "–" : (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v)); }

// The state of every answer position after the events of steps < s, in record order.
// st[j] = index of the position's last event (-1: none). Returns the state and the count committed.
function replay(row, s) {
  const M = row.ans.length, st = new Int32Array(M).fill(-1), ev = row.ev;
  for (let e = 0; e < ev.length; e += 5) {
    if (ev[e] >= s) continue;  // events are in record order; steps of later records never go back
    st[ev[e + 1]] = e / 5;
  }
  let n = 0;
  for (let j = 0; j < M; j++) if (st[j] >= 0 && ev[st[j] * 5 + 2] !== 1) n++;
  return { st, committed: n };
}

function cellClass(row, idx, s) {
  if (idx < 0) return ["c-masked", 1];
  const ev = row.ev, b = idx * 5, kind = ev[b + 2], step = ev[b], a = 0.35 + 0.65 * ev[b + 4] / 1000;
  if (kind === 1) return ["c-remask", 1];
  if (kind === 2) return [step === s - 1 ? "c-edit this" : "c-edit", a];
  return [step === s - 1 ? "c-now" : "c-old", a];
}

function drawHeat(P) {
  const row = P.row, S = Math.max(row.steps, 1), M = Math.max(row.ans.length, 1);
  const cw = Math.max(1, Math.min(10, Math.floor(320 / S))), ch = Math.max(1, Math.min(8, Math.floor(160 / M)));
  const c = P.heat;
  c.width = S * cw; c.height = M * ch;
  c.style.width = Math.min(S * cw, 320) + "px";
  c.style.height = Math.min(M * ch, 240) + "px";
  const g = c.getContext("2d");
  g.fillStyle = "#f4f4f4"; g.fillRect(0, 0, c.width, c.height);
  const ev = row.ev;
  for (let e = 0; e < ev.length; e += 5) {
    const k = ev[e + 2], a = 0.25 + 0.75 * ev[e + 4] / 1000;
    g.fillStyle = k === 1 ? "rgb(229,57,53)" : k === 2 ? `rgba(230,130,0,${a})` : `rgba(66,110,200,${a})`;
    g.fillRect(ev[e] * cw, ev[e + 1] * ch, cw, ch);
  }
}

function metricsLine(P) {
  const r = P.row, m = P.m;
  m.textContent = "";
  m.append(`AFP ${fmt(r.afp)} · τ ${fmt(r.tau)} · NFE ${fmt(r.nfe)} · `);
  if (r.ok === undefined || r.ok === null) m.append("running…");
  else m.append(el("span", r.ok ? "ok" : "bad", r.ok ? "correct" : "wrong"));
  P.count = el("span", "count");
  m.append(" · committed ", P.count);
}

function buildPanel(card, panel, row) {
  const P = { panel, row, cells: [] };
  const box = el("div", "panel");
  box.append(el("h3", "", panel.label));
  P.m = el("div", "metrics");
  box.append(P.m);
  const grid = panel.grid && panel.grid[0] * panel.grid[1] === row.ans.length, inAns = new Set(row.ans);
  box.append(el("div", "prompt", row.x.filter((t, i) => !inAns.has(i)).map(tokStr).join(grid ? " " : "")));
  const seq = el("div", grid ? "seq grid" : "seq text");
  P.text = !grid;
  if (grid) seq.style.gridTemplateColumns = `repeat(${panel.grid[1]}, 22px)`;
  for (let j = 0; j < row.ans.length; j++) {
    const c = el("span", "cell c-masked", "_");
    c.dataset.j = j;
    P.cells.push(c);
    seq.append(c);
  }
  const wrap = el("div", "heatwrap"), body = el("div", "pbody");
  P.heat = el("canvas", "heat");
  P.heat.title = "position (down) x step (right): blue committed, orange edited, red re-masked; shade = confidence";
  P.cursor = el("div", "cursor");
  wrap.append(P.heat, P.cursor);
  body.append(seq, wrap);
  box.append(body);
  P.box = box;
  box.dataset.panel = card.panels.length;
  metricsLine(P);
  drawHeat(P);
  return P;
}

function maxSteps(card) { return Math.max(0, ...card.panels.map(P => P.row.steps)); }

function setStep(card, s) {
  const S = maxSteps(card);
  s = Math.max(0, Math.min(S, s | 0));
  card.step = s;
  card.slider.max = S;
  card.slider.value = s;
  card.label.textContent = `step ${s} / ${S}`;
  for (const P of card.panels) {
    const { st, committed } = replay(P.row, s);
    P.state = st;
    if (!P.shown) P.shown = new Array(P.cells.length).fill("");
    for (let j = 0; j < P.cells.length; j++) {
      const idx = st[j], [cls, a] = cellClass(P.row, idx, s);
      let tok = idx >= 0 ? P.row.ev[idx * 5 + 3] : -1;
      // text: a hole keeps the width of its final token (drawn blank), so a step re-paints and
      // never re-flows a 1k-token line
      if (tok < 0 && P.text && P.row.tok && P.row.tok.length) tok = P.row.tok[j];
      const key = `${cls}|${a.toFixed(3)}|${tok}`;
      if (P.shown[j] === key) continue;  // touch only the cells that change: no needless style work
      P.shown[j] = key;
      const c = P.cells[j];
      c.className = "cell " + cls;
      c.style.setProperty("--a", a.toFixed(3));
      c.textContent = tokStr(tok);
    }
    P.count.textContent = `${committed} / ${P.cells.length}`;
    P.box.dataset.committed = committed;
    P.cursor.style.left = (P.row.steps ? Math.min(s, P.row.steps) / P.row.steps * parseFloat(P.heat.style.width) : 0) + "px";
  }
}

function play(card) {
  if (card.timer) { clearInterval(card.timer); card.timer = null; card.play.textContent = "play"; return; }
  if (card.step >= maxSteps(card)) setStep(card, 0);
  card.play.textContent = "pause";
  card.timer = setInterval(() => {
    if (card.step >= maxSteps(card)) { play(card); return; }
    setStep(card, card.step + 1);
  }, 350);
}

// A card: its header (slider, play) and one panel per decode that has row i.
function renderCard(card) {
  if (card.rendered) return;
  card.rendered = true;
  const head = el("div", "ex-head");
  head.append(el("b", "", card.title));
  card.play = el("button", "play", "play");
  card.play.onclick = () => { active = card; play(card); };
  card.slider = el("input");
  card.slider.type = "range"; card.slider.min = 0; card.slider.step = 1;
  card.slider.oninput = () => { active = card; setStep(card, +card.slider.value); };
  card.label = el("span", "steplabel");
  head.append(card.play, card.slider, card.label);
  const panels = el("div", "panels");
  card.panels = [];
  for (const [panel, row] of card.sources) {
    const P = buildPanel(card, panel, row);
    card.panels.push(P);
    panels.append(P.box);
  }
  card.el.textContent = "";
  card.el.append(head, panels);
  card.el.style.minHeight = "";
  setStep(card, card.initial === undefined ? maxSteps(card) : card.initial);
}

function addCard(container, title, sources, first) {
  const card = { el: el("section", "example"), title, sources, rendered: false, step: 0 };
  card.el.dataset.example = cards.length;
  card.el.style.minHeight = "140px";
  card.el.addEventListener("mouseenter", () => { if (active) active.el.classList.remove("active"); active = card; card.el.classList.add("active"); });
  card.el.__card = card;
  if (first) container.prepend(card.el); else container.append(card.el);
  cards.push(card);
  observer.observe(card.el);
  return card;
}

const observer = new IntersectionObserver(entries => {
  for (const e of entries) if (e.isIntersecting) { renderCard(e.target.__card); observer.unobserve(e.target); }
}, { rootMargin: "600px" });

// the tooltip: token, confidence, step, kind and the alternatives of the hovered position
const tip = document.getElementById("tip");
document.addEventListener("mouseover", ev => {
  const c = ev.target.closest && ev.target.closest(".cell[data-j]");
  if (!c) { tip.hidden = true; return; }
  const card = c.closest(".example").__card, P = card.panels[+c.closest(".panel").dataset.panel];
  const j = +c.dataset.j, idx = P.state[j], row = P.row, lines = [`position ${row.ans[j]} (answer ${j})`];
  tip.dataset.token = ""; tip.dataset.conf = ""; tip.dataset.step = ""; tip.dataset.kind = "";
  if (idx < 0) lines.push("masked");
  else {
    const b = idx * 5, kind = KIND[row.ev[b + 2]];
    tip.dataset.step = row.ev[b]; tip.dataset.kind = kind;
    if (kind === "remask") lines.push(`masked again at step ${row.ev[b]}`);
    else {
      const conf = row.ev[b + 4] / 1000, tok = row.ev[b + 3];
      tip.dataset.token = tokStr(tok); tip.dataset.conf = conf.toFixed(3);
      lines.push(`token ${JSON.stringify(tokStr(tok))}  confidence ${conf.toFixed(3)}`, `${kind === "edit" ? "edited" : "committed"} at step ${row.ev[b]}`);
      const K = P.panel.k_alt || 0;
      if (K && row.alt.length) {
        const alts = [];
        for (let k = 0; k < K; k++) {
          const t = row.alt[(idx * K + k) * 2], p = row.alt[(idx * K + k) * 2 + 1];
          if (t >= 0) alts.push(`${JSON.stringify(tokStr(t))} ${(p / 1000).toFixed(3)}`);
        }
        lines.push("alternatives: " + alts.join(", "));
      }
    }
  }
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  const r = c.getBoundingClientRect();
  tip.style.left = Math.min(r.left, window.innerWidth - 320) + "px";
  tip.style.top = (r.bottom + 4) + "px";
});

document.addEventListener("keydown", ev => {
  // typing in a field, or a focused slider (it steps itself), keeps its keys
  const tag = document.activeElement.tagName;
  if (!active || /INPUT|TEXTAREA|SELECT/.test(tag) || (ev.key === " " && tag === "BUTTON")) return;
  if (ev.key === "ArrowRight") setStep(active, active.step + 1);
  else if (ev.key === "ArrowLeft") setStep(active, active.step - 1);
  else if (ev.key === "Home") setStep(active, 0);
  else if (ev.key === "End") setStep(active, maxSteps(active));
  else if (ev.key === " ") play(active);
  else return;
  ev.preventDefault();
});

document.getElementById("goto").addEventListener("change", ev => {
  const c = cards[+ev.target.value];
  if (c) { renderCard(c); c.el.scrollIntoView(); active = c; }
});

function summary() {
  const s = document.getElementById("summary");
  s.textContent = `${D.examples} examples × ${D.panels.length} decodes. ` + D.panels.map(p =>
    `${p.label}: ` + Object.entries(p.metrics || {}).filter(([k]) => k !== "tokens_per_s").map(([k, v]) => `${k} ${fmt(v)}`).join(", ")).join(" | ");
}

function staticPage() {
  const main = document.getElementById("examples");
  for (let i = 0; i < D.examples; i++) {
    const sources = D.panels.filter(p => p.rows[i]).map(p => [p, p.rows[i]]);
    addCard(main, `example ${i}`, sources);
  }
  if (cards.length) { active = cards[0]; renderCard(cards[0]); cards[0].el.classList.add("active"); }
  summary();
  window.__viewerReady = performance.now();
}

window.anyorderViewer = { D, cards, setStep, renderCard, addCard, replay, metricsLine, drawHeat, maxSteps, el };
if (D.mode === "static") staticPage();
