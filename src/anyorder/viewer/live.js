// anyorder serve: the form, and a decode streamed step by step into a new card (Server-Sent Events).
(function () {
  const V = window.anyorderViewer, D = V.D;
  const $ = id => document.getElementById(id);
  $("live").hidden = false;
  $("goto").parentElement.hidden = true;
  const sel = $("f-decoder");
  for (const name of D.decoders) {
    const o = document.createElement("option");
    o.value = name; o.textContent = name;
    if (name === D.default_decoder) o.selected = true;
    sel.append(o);
  }
  if (D.input !== "puzzle") $("input-label").hidden = true;
  let source = null, n = 0;

  function stop() { if (source) { source.close(); source = null; } $("f-run").disabled = false; }

  $("form").addEventListener("submit", ev => {
    ev.preventDefault();
    stop();
    $("error").textContent = "";
    $("status").textContent = "decoding…";
    $("f-run").disabled = true;
    const q = new URLSearchParams();
    for (const [k, v] of new FormData($("form")).entries()) if (String(v).trim() !== "") q.append(k, v);
    let card = null, P = null;
    source = new EventSource("/decode?" + q.toString());
    // only messages with data: a connection error is also an "error" event, without data
    const on = (name, fn) => source.addEventListener(name, e => { if (e.data !== undefined) fn(JSON.parse(e.data)); });
    on("start", d => {
      Object.assign(D.vocab, d.vocab);
      d.row.tok = []; d.row.ok = null;
      card = V.addCard($("examples"), `decode ${n++}: ${d.panel.label}`, [[d.panel, d.row]], true);
      card.initial = 0;
      V.renderCard(card);
      P = card.panels[0];
      card.el.dataset.state = "running";
      if (d.warning) $("status").textContent = "warning: puzzle " + d.warning;
    });
    on("step", d => {
      Object.assign(D.vocab, d.vocab);
      for (const x of d.ev) P.row.ev.push(x);
      for (const x of d.alt) P.row.alt.push(x);
      P.row.steps = Math.max(P.row.steps, d.steps);
      card.el.dataset.streamed = (+card.el.dataset.streamed || 0) + 1;
      V.drawHeat(P);
      V.setStep(card, P.row.steps);  // follow the decode
    });
    on("done", d => {
      Object.assign(D.vocab, d.vocab);
      Object.assign(P.row, { tok: d.tok, afp: d.afp, tau: d.tau, nfe: d.nfe, ok: d.ok });
      P.panel.metrics = d.metrics;
      V.metricsLine(P);
      V.setStep(card, V.maxSteps(card));
      card.el.dataset.tokens = d.tokens.join(" ");
      card.el.dataset.state = "done";
      $("status").textContent = "done: " + Object.entries(d.metrics).filter(([k]) => k !== "tokens_per_s")
        .map(([k, v]) => `${k} ${v === null ? "–" : (+v).toFixed(3)}`).join(", ");
      stop();
    });
    on("failure", d => {
      $("error").textContent = d.message;
      $("status").textContent = "";
      if (card) card.el.dataset.state = "error";
      stop();
    });
    source.onerror = () => { if (source) { $("error").textContent = "connection to the server lost"; $("status").textContent = ""; stop(); } };
  });
  window.__viewerReady = performance.now();
})();
