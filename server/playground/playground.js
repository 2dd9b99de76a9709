// adasd playground: streams one request with "adasd": {"token_sources": true} and renders each
// token as a span coloured by its source. No build step, no dependencies; the API key lives only
// in the password field and the requests made with it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SOURCES = ["standard", "relaxed", "correction", "bonus", "forced", "ar"];
  // what tests (and curious users, from the console) can read: the raw data of the last runs
  const state = { runs: {}, busy: false, controller: null, model: null };
  window.adasdPlayground = state;

  class RequestFailed extends Error {}

  // ------------------------------------------------------------------ formatting

  const fmt = (x, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(digits));
  const ratio = (a, b) => (b ? a / b : null);

  function describe(t) {
    const parts = [`${t.source}`, `round ${t.round}`];
    if (t.entropy !== null && t.entropy !== undefined) parts.push(`draft entropy ${fmt(t.entropy)} nats`);
    if (t.js_distance !== null && t.js_distance !== undefined) parts.push(`JS distance ${fmt(t.js_distance)}`);
    if (t.posterior !== null && t.posterior !== undefined) parts.push(`P(A|d) ${fmt(t.posterior)}`);
    if (t.rejected) parts.push(`replaced the draft's ${JSON.stringify(t.rejected.text)}`);
    parts.push(`token ${t.token_id} ${JSON.stringify(t.text)}`);
    return parts.join(" · ");
  }

  function errorMessage(status, body) {
    const e = body && body.error;
    if (!e || typeof e !== "object") return `The server answered ${status}.`;
    const where = [e.type, e.param ? `param ${e.param}` : null, e.code].filter(Boolean).join(", ");
    let text = `Error${status ? " " + status : ""}${where ? " (" + where + ")" : ""}: ${e.message}`;
    if (status === 401) text += "\nEnter the server's API key in the API key field and run again.";
    return text;
  }

  // ------------------------------------------------------------------ one run (one panel)

  class Run {
    constructor(panel, method) {
      this.panel = panel;
      this.method = method;
      this.out = $(`out-${panel}`);
      this.counters = $(`counters-${panel}`);
      this.inspector = $(`inspect-${panel}`);
      this.sources = [];
      this.rounds = [];
      this.text = "";
      this.usage = null;
      this.error = null;
      this.done = false;
      this.chunkLog = []; // [{ms, tokens}] at each chunk: shows that it streamed
      this.t0 = performance.now();
      this.tFirst = null;
      this.tEnd = null;
      this.out.textContent = "";
      this.out.dataset.state = "streaming";
      this.inspector.textContent = "";
      this.current = -1;
      $(`title-${panel}`).textContent = panel === "main" ? `Output: ${method}` : "Same request, method ar";
      this.render();
    }

    onChunk(msg) {
      if (msg.usage) this.usage = msg.usage;
      for (const choice of msg.choices || []) {
        if (choice.index !== 0) continue;
        const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
        const adasd = choice.adasd;
        if (adasd) {
          for (const t of adasd.token_sources) this.addToken(t);
          this.rounds.push(...adasd.rounds);
        } else if (text) {
          this.out.append(document.createTextNode(text)); // a server without token sources
        }
        this.text += text;
        if (this.tFirst === null && (text || adasd)) this.tFirst = performance.now();
      }
      this.chunkLog.push({ ms: performance.now() - this.t0, tokens: this.sources.length });
      this.render();
    }

    addToken(t) {
      const span = document.createElement("span");
      span.className = `tok src-${SOURCES.includes(t.source) ? t.source : "ar"}${t.text ? "" : " empty"}`;
      span.textContent = t.text;
      span.dataset.i = String(this.sources.length);
      span.title = describe(t);
      this.sources.push(t);
      this.out.append(span);
    }

    finish(error) {
      this.done = true;
      this.error = error || null;
      this.tEnd = performance.now();
      this.out.dataset.state = error ? "error" : "done";
      this.render();
    }

    get seconds() {
      return ((this.tEnd ?? performance.now()) - this.t0) / 1000;
    }

    get tokensPerSecond() {
      return ratio(this.sources.length, this.seconds);
    }

    stats() {
      const sum = (key) => this.rounds.reduce((a, r) => a + (r[key] || 0), 0);
      const drafted = sum("drafted"), accepted = sum("accepted"), relaxed = sum("relaxed");
      const last = this.rounds[this.rounds.length - 1] || {};
      const counts = Object.fromEntries(SOURCES.map((s) => [s, 0]));
      for (const t of this.sources) counts[t.source] = (counts[t.source] || 0) + 1;
      return { drafted, accepted, relaxed, last, counts };
    }

    render() {
      const { drafted, accepted, relaxed, last, counts } = this.stats();
      const spec = (this.usage && this.usage.speculative) || {};
      const rows = [
        ["tokens", "tokens", String(this.sources.length)],
        ["completion_tokens", "completion tokens (usage)", this.usage ? String(this.usage.completion_tokens) : "—"],
        ["rounds", "rounds", String(this.rounds.length)],
        ["acceptance", "acceptance", fmt(ratio(accepted, drafted))],
        ["relaxed_share", "relaxed share", fmt(ratio(relaxed, accepted))],
        ["mean_draft_length", "mean draft length", fmt(ratio(drafted, this.rounds.length), 2)],
        ["entropy_threshold", "T_G", fmt(last.entropy_threshold)],
      ];
      if (last.js_threshold !== null && last.js_threshold !== undefined) {
        rows.push(["js_threshold", "T_V", fmt(last.js_threshold)]);
      } else if (last.kde_accepted !== null && last.kde_accepted !== undefined) {
        rows.push(["kde", "KDE sizes (A / R)", `${last.kde_accepted} / ${last.kde_rejected}`]);
      }
      const speedup = spec.estimated_speedup ?? last.estimated_speedup;
      rows.push(
        ["estimated_speedup", "est. speedup", speedup === undefined ? "—" : `${fmt(speedup, 2)}x`],
        ["tokens_per_second", "tokens/s", fmt(this.tokensPerSecond, 1)],
        ["ttft", "first token", this.tFirst === null ? "—" : `${Math.round(this.tFirst - this.t0)} ms`],
        ["seconds", "time", `${fmt(this.seconds, 2)} s`],
      );
      const dl = this.counters;
      dl.textContent = "";
      for (const [key, label, value] of rows) {
        const div = document.createElement("div");
        const dt = document.createElement("dt");
        const dd = document.createElement("dd");
        dt.textContent = label;
        dd.textContent = value;
        dd.dataset.key = key;
        div.append(dt, dd);
        dl.append(div);
      }
      if (this.panel === "main") {
        for (const li of document.querySelectorAll("#legend .legend-item")) {
          li.querySelector(".count").textContent = String(counts[li.dataset.source] || 0);
        }
      }
    }

    // keyboard and pointer inspection of one token
    select(i) {
      const spans = this.out.querySelectorAll(".tok");
      if (!spans.length) return;
      i = Math.max(0, Math.min(spans.length - 1, i));
      if (this.current >= 0 && spans[this.current]) spans[this.current].classList.remove("current");
      this.current = i;
      spans[i].classList.add("current");
      spans[i].scrollIntoView({ block: "nearest" });
      this.inspector.textContent = `Token ${i + 1} of ${spans.length}: ${describe(this.sources[i])}`;
    }
  }

  // ------------------------------------------------------------------ requests

  function readForm() {
    const num = (id) => {
      const v = $(id).value.trim();
      return v === "" ? null : Number(v);
    };
    return {
      chat: document.querySelector("input[name=mode]:checked").value === "chat",
      prompt: $("prompt").value,
      system: $("system").value,
      method: $("method").value,
      verification: $("verification").value,
      k: num("k"),
      temperature: num("temperature"),
      maxTokens: num("max-tokens"),
      seed: num("seed"),
      warmStart: $("warm-start").checked,
      ignoreEos: $("ignore-eos").checked,
      schema: $("json-schema").value.trim(),
    };
  }

  function requestBody(f, method) {
    const adasd = { token_sources: true, method, verification: f.verification, warm_start: f.warmStart };
    if (f.k !== null) adasd.k = f.k;
    const body = { stream: true, stream_options: { include_usage: true }, adasd };
    if (state.model) body.model = state.model;
    if (f.maxTokens !== null) body.max_tokens = f.maxTokens;
    if (f.temperature !== null) body.temperature = f.temperature;
    if (f.seed !== null) body.seed = f.seed;
    if (f.ignoreEos) body.ignore_eos = true;
    if (f.schema) {
      body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: JSON.parse(f.schema), strict: true } };
    }
    if (f.chat) {
      body.messages = [];
      if (f.system.trim()) body.messages.push({ role: "system", content: f.system });
      body.messages.push({ role: "user", content: f.prompt });
    } else {
      body.prompt = f.prompt;
    }
    return body;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function stream(run, f) {
    const url = f.chat ? "/v1/chat/completions" : "/v1/completions";
    let resp;
    try {
      resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(requestBody(f, run.method)),
                                signal: state.controller.signal });
    } catch (e) {
      throw new RequestFailed(e.name === "AbortError" ? "Stopped." : `Could not reach the server: ${e.message}`);
    }
    if (!resp.ok) {
      const raw = await resp.text();
      let body = null;
      try { body = JSON.parse(raw); } catch { /* not JSON: shown as text below */ }
      throw new RequestFailed(body ? errorMessage(resp.status, body) : `Error ${resp.status}: ${raw.slice(0, 400)}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") return;
            const msg = JSON.parse(data);
            if (msg.error) throw new RequestFailed(errorMessage(null, msg)); // after the first chunk
            run.onChunk(msg);
          }
        }
      }
    } catch (e) {
      if (e instanceof RequestFailed) throw e;
      throw new RequestFailed(e.name === "AbortError" ? "Stopped." : `The stream broke off: ${e.message}`);
    }
    throw new RequestFailed("The stream ended without [DONE].");
  }

  async function runOne(panel, f, method) {
    const run = new Run(panel, method);
    state.runs[panel] = run;
    try {
      await stream(run, f);
      run.finish();
    } catch (e) {
      run.finish(e.message);
      throw e;
    }
    return run;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = !text;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("run").disabled = busy;
    $("compare").disabled = busy;
    $("stop").disabled = !busy;
    document.body.dataset.busy = busy ? "1" : "0";
  }

  async function start(compare) {
    if (state.busy) return;
    const form = $("form");
    if (!form.reportValidity()) return;
    const f = readForm();
    showError("");
    if (f.schema) {
      try { JSON.parse(f.schema); } catch (e) {
        showError(`The JSON schema is not JSON: ${e.message}`);
        $("json-schema").focus();
        return;
      }
    }
    $("comparison").textContent = "";
    $("panels").classList.toggle("compare", compare);
    $("panel-ar").hidden = !compare;
    state.runs = {};
    state.controller = new AbortController();
    setBusy(true);
    try {
      const main = await runOne("main", f, f.method);
      if (compare) {
        const ar = await runOne("ar", f, "ar");
        const speed = ratio(main.tokensPerSecond, ar.tokensPerSecond);
        $("comparison").textContent =
          `${main.method}: ${main.sources.length} tokens in ${fmt(main.seconds, 2)} s (${fmt(main.tokensPerSecond, 1)} tokens/s); ` +
          `ar: ${ar.sources.length} tokens in ${fmt(ar.seconds, 2)} s (${fmt(ar.tokensPerSecond, 1)} tokens/s): ` +
          `${main.method} runs at ${fmt(speed, 2)}x ar's tokens/s.`;
      }
    } catch (e) {
      showError(e.message);
      if (/\b401\b/.test(e.message)) $("api-key").focus();
    } finally {
      setBusy(false);
    }
  }

  // ------------------------------------------------------------------ server info

  async function loadInfo() {
    const info = $("server-info");
    try {
      const r = await fetch("/ready");
      const body = await r.json();
      if (body.model) state.model = body.model;
      if (r.ok) {
        info.textContent = `Serving ${body.model} · context ${body.context_length} tokens · ${body.device}`;
        if (body.context_length) {
          const maxTokens = $("max-tokens"); // no max attribute: the server says what is too long
          // a small model's context: leave room for the prompt (the user's own value stays)
          if (!maxTokens.dataset.touched && Number(maxTokens.value) > body.context_length / 2) {
            maxTokens.value = String(Math.floor(body.context_length / 2));
          }
        }
        return;
      }
      info.textContent = `The server is ${body.status || "not ready"}${body.error ? ": " + body.error : ""}; retrying…`;
    } catch (e) {
      info.textContent = `Could not reach the server (${e.message}); retrying…`;
    }
    setTimeout(loadInfo, 2000);
  }

  // ------------------------------------------------------------------ wiring

  function setMode() {
    const chat = document.querySelector("input[name=mode]:checked").value === "chat";
    for (const el of document.querySelectorAll(".chat-only")) el.hidden = !chat;
    $("prompt-label").textContent = chat ? "User message" : "Prompt";
  }

  function wireOutput(panel) {
    const out = $(`out-${panel}`);
    const run = () => state.runs[panel];
    out.addEventListener("keydown", (e) => {
      const r = run();
      if (!r || !r.sources.length) return;
      const moves = { ArrowRight: r.current + 1, ArrowLeft: r.current - 1, Home: 0, End: r.sources.length - 1 };
      if (!(e.key in moves) || e.ctrlKey || e.metaKey || e.altKey) return;
      e.preventDefault();
      r.select(r.current < 0 && e.key !== "End" ? 0 : moves[e.key]);
    });
    out.addEventListener("mouseover", (e) => {
      const span = e.target.closest(".tok");
      const r = run();
      if (span && r && span.dataset.i !== undefined) r.select(Number(span.dataset.i));
    });
  }

  async function copyText(target) {
    const out = $(target);
    const text = out.textContent; // spans' text only: the ∅ of empty tokens is generated content
    try {
      await navigator.clipboard.writeText(text);
      return;
    } catch { /* no clipboard permission: select the text so that Ctrl+C copies it */ }
    const range = document.createRange();
    range.selectNodeContents(out);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("form").addEventListener("submit", (e) => {
      e.preventDefault();
      start(false);
    });
    $("compare").addEventListener("click", () => start(true));
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        start(false);
      }
    });
    for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", setMode);
    $("max-tokens").addEventListener("input", () => { $("max-tokens").dataset.touched = "1"; });
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", () => copyText(button.dataset.target));
    }
    wireOutput("main");
    wireOutput("ar");
    setMode();
    loadInfo();
  });
})();
