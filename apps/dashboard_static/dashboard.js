// The llama-orch dashboard: every number on it comes from the taps' own API, called with the key kept
// in this closure (never stored, never in a URL). No library, no other origin.
"use strict";

(() => {
  let key = null; // the signed-in key
  let apiBase = ""; // the tap whose API is called: "" (the public tap) or "/private/<client>"
  let defaultBase = "";
  let timer = null;
  let metric = "tokens";
  let lastDays = null; // the chart's data, redrawn when the metric changes
  let grantKey = null; // the idempotency key of the grant form: a retry after a failure reuses it
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const DAYS = 30;
  const COLORS = ["#3b6fd8", "#e0862d", "#3aa35b", "#c2413b", "#8a5cc2", "#7f6a4f", "#d468b0", "#6b7280"];

  // ---- the API ----

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${key}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(apiBase + path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
      });
    } catch (e) {
      throw new ApiError(0, `The stack did not answer (${e.message}).`, "unreachable");
    }
    let data = null;
    try {
      data = await resp.json();
    } catch {
      data = null;
    }
    if (!resp.ok) {
      const err = data && data.error ? data.error : {};
      throw new ApiError(resp.status, err.message || `HTTP ${resp.status}`, err.code || null);
    }
    return data;
  }

  // ---- formatting ----

  function credits(micro) {
    // Integer micro-credits as credits with 6 decimals, without floating point.
    const m = BigInt(micro);
    const whole = m / 1000000n;
    const frac = (m % 1000000n).toString().padStart(6, "0");
    return `${whole.toLocaleString("en-US")}.${frac}`;
  }

  const int = (n) => Number(n).toLocaleString("en-US");
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

  function setMicro(id, micro) {
    const el = $(id);
    el.textContent = credits(micro);
    el.dataset.micro = String(micro);
    el.title = `${int(micro)} micro-credits`;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function fillTable(id, items, fill, empty) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    for (const item of items) {
      const tr = document.createElement("tr");
      fill(tr, item);
      body.appendChild(tr);
    }
    if (!items.length) {
      const tr = document.createElement("tr");
      const td = cell(tr, empty, "hint");
      td.colSpan = $(id).tHead.rows[0].cells.length;
      body.appendChild(tr);
    }
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function notice(message) {
    $("notice").textContent = message;
    $("notice").hidden = !message;
  }

  // ---- sign in and out ----

  function tapBase(tap) {
    const t = tap.trim().replace(/^\/+|\/+$/g, "");
    if (!t || t === "public") return defaultBase;
    if (!/^[A-Za-z0-9._~/-]+$/.test(t)) throw new ApiError(0, `Not a tap: '${t}'.`, null);
    return `/${t.startsWith("private/") ? t : `private/${t}`}`;
  }

  async function signIn(event) {
    event.preventDefault();
    const entered = $("key").value.trim();
    $("key").value = "";
    showError("");
    notice("");
    if (!entered) {
      showError("Enter an API key.");
      return;
    }
    try {
      apiBase = tapBase($("tap").value);
    } catch (e) {
      showError(e.message);
      return;
    }
    key = entered;
    try {
      await showTenant();
    } catch (e) {
      if (e.status === 403) {
        // The admin key: tenant routes refuse it, admin routes take it.
        try {
          await showAdmin();
          return;
        } catch (e2) {
          e = e2;
        }
      }
      key = null;
      view("sign-in-view");
      showError(`Sign-in failed: ${e.message}`);
    }
  }

  function signOut() {
    key = null;
    clearInterval(timer);
    timer = null;
    for (const id of ["requests", "grants", "keys", "tenants", "apps", "nodes"]) $(id).tBodies[0].replaceChildren();
    for (const id of ["chart", "legend", "spend-chart"]) $(id).replaceChildren();
    $("new-key").value = "";
    $("new-key-box").hidden = true;
    $("try-answer").hidden = true;
    $("who").textContent = "";
    showError("");
    notice("");
    view("sign-in-view");
  }

  function view(id) {
    for (const v of ["sign-in-view", "tenant-view", "admin-view"]) $(v).hidden = v !== id;
    const signedIn = id !== "sign-in-view";
    $("refresh").hidden = !signedIn;
    $("sign-out").hidden = !signedIn;
  }

  function every(refresh) {
    clearInterval(timer);
    timer = setInterval(() => {
      if (key && document.visibilityState === "visible") refresh().catch((e) => showError(e.message));
    }, 15000);
  }

  // ---- the tenant's view ----

  async function showTenant() {
    await refreshTenant();
    view("tenant-view");
    every(refreshTenant);
    loadModels().catch((e) => showError(e.message));
  }

  async function refreshTenant() {
    const since = new Date(Date.now() - (DAYS - 1) * 86400e3).toISOString().slice(0, 10);
    const [account, recent, daily, keys] = await Promise.all([
      api("GET", "/v1/account"),
      api("GET", "/v1/usage?limit=20"),
      api("GET", `/v1/usage?group_by=day_model&since=${since}`),
      api("GET", "/v1/keys"),
    ]);
    $("who").textContent = `${account.name} (${account.tenant_id})${apiBase ? ` on ${apiBase}` : ""}`;
    setMicro("balance", account.balance_micro_credits);
    setMicro("held", account.held_micro_credits);
    setMicro("spent", account.spent_micro_credits);
    $("holds-count").textContent = `${account.open_holds.length} open hold(s)`;
    fillTable("grants", account.grants, (tr, g) => {
      cell(tr, when(g.granted_at));
      cell(tr, credits(g.micro_credits), "num");
      cell(tr, credits(g.remaining_micro_credits), "num");
      cell(tr, `${when(g.expires_at)}${g.expired ? " (expired)" : ""}`);
      cell(tr, g.grant_id, "mono");
    }, "No grants yet.");
    fillTable("requests", [...recent.data].reverse(), (tr, r) => {
      tr.dataset.requestId = r.request_id;
      cell(tr, when(r.ts));
      cell(tr, r.model);
      cell(tr, int(r.prompt_tokens), "num");
      cell(tr, int(r.completion_tokens), "num");
      cell(tr, credits(r.cost_micro), "num");
      cell(tr, r.ttft_ms === null ? "" : int(r.ttft_ms), "num");
      cell(tr, r.status);
      cell(tr, r.request_id, "mono");
    }, "No requests yet.");
    const mine = keyId(key);
    fillTable("keys", keys.data, (tr, k) => {
      tr.dataset.keyId = k.key_id;
      cell(tr, k.key_id + (k.key_id === mine ? " (this page)" : ""), "mono");
      cell(tr, k.tap);
      cell(tr, when(k.created_at));
      cell(tr, k.revoked_at ? `revoked ${when(k.revoked_at)}` : "active");
      const td = cell(tr, "");
      if (!k.revoked_at) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = "Revoke";
        b.className = "revoke";
        b.addEventListener("click", () => revokeKey(k.key_id, k.key_id === mine));
        td.appendChild(b);
      }
    }, "No keys.");
    lastDays = daily;
    $("usage-totals").textContent = `${int(daily.totals.requests)} requests, ${int(
      daily.totals.prompt_tokens + daily.totals.completion_tokens)} tokens, ${credits(
      daily.totals.cost_micro_credits)} credits`;
    drawDaily();
  }

  function keyId(raw) {
    const m = /^sk-orch-([a-z2-7]+)-/.exec(raw || "");
    return m ? m[1] : null;
  }

  async function loadModels() {
    const models = await api("GET", "/v1/models");
    const select = $("try-model");
    select.replaceChildren();
    for (const m of models.data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      select.appendChild(o);
    }
  }

  async function tryRequest(event) {
    event.preventDefault();
    showError("");
    const out = $("try-answer");
    out.hidden = false;
    out.textContent = "…";
    const button = event.submitter || $("try").querySelector("button");
    button.disabled = true;
    try {
      const answer = await api("POST", "/v1/chat/completions", {
        model: $("try-model").value,
        messages: [{ role: "user", content: $("try-prompt").value }],
        max_tokens: Number($("try-max").value) || 16,
        temperature: 0, // the model's most likely answer: what a first try should show
      });
      out.textContent = answer.choices[0].message.content;
      out.dataset.requestId = answer.id;
      await untilListed(answer.id);
      await refreshTenant();
    } catch (e) {
      out.textContent = "";
      out.hidden = true;
      showError(`The request failed: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  async function untilListed(requestId) {
    // The request is settled by its replica within a moment; the page shows the balance after it.
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline) {
      const recent = await api("GET", "/v1/usage?limit=50");
      if (recent.data.some((r) => r.request_id === requestId)) return;
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  async function createKey() {
    showError("");
    try {
      const created = await api("POST", "/v1/keys", {});
      $("new-key").value = created.key;
      $("new-key").dataset.keyId = created.key_id;
      $("new-key-box").hidden = false;
      await refreshTenant();
    } catch (e) {
      showError(`No key created: ${e.message}`);
    }
  }

  async function revokeKey(id, own) {
    showError("");
    try {
      await api("DELETE", `/v1/keys/${encodeURIComponent(id)}`);
      if (own) {
        signOut();
        notice("The key this page signed in with is revoked: signed out.");
        return;
      }
      if ($("new-key").dataset.keyId === id) $("new-key-box").hidden = true;
      await refreshTenant();
    } catch (e) {
      showError(`Not revoked: ${e.message}`);
    }
  }

  // ---- charts (SVG, drawn here) ----

  function drawDaily() {
    if (!lastDays) return;
    const days = [];
    for (let i = DAYS - 1; i >= 0; i--) days.push(new Date(Date.now() - i * 86400e3).toISOString().slice(0, 10));
    const models = [...new Set(lastDays.data.map((g) => g.model))].sort();
    const value = (g) => (metric === "tokens" ? g.prompt_tokens + g.completion_tokens : g.cost_micro);
    const stacks = days.map((day) => models.map((m) => {
      const g = lastDays.data.find((x) => x.day === day && x.model === m);
      return g ? value(g) : 0;
    }));
    const bars = stacks.map((s, i) => ({ label: days[i], parts: s }));
    drawBars($("chart"), bars, models, metric === "tokens" ? int : (v) => `${credits(v)} credits`);
    const legend = $("legend");
    legend.replaceChildren();
    models.forEach((m, i) => {
      const span = document.createElement("span");
      const dot = document.createElement("i");
      dot.style.background = COLORS[i % COLORS.length];
      span.append(dot, m);
      legend.appendChild(span);
    });
  }

  function drawBars(box, bars, series, fmt) {
    // Vertical stacked bars: one per entry of bars ({label, parts}), a color per series.
    const W = 720, H = 220, left = 8, bottom = 24, top = 22;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    const max = Math.max(1, ...bars.map((b) => b.parts.reduce((a, v) => a + v, 0)));
    const step = (W - left - 8) / Math.max(1, bars.length);
    const scale = (H - top - bottom) / max;
    const text = (x, y, s, anchor) => {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", x);
      t.setAttribute("y", y);
      t.setAttribute("text-anchor", anchor);
      t.textContent = s;
      svg.appendChild(t);
    };
    for (const y of [top, H - bottom]) {  // the top of the highest bar, labelled, and the axis
      const line = document.createElementNS(SVG, "line");
      for (const [a, v] of [["x1", left], ["x2", W - 8], ["y1", y], ["y2", y]]) line.setAttribute(a, v);
      if (y === top) line.setAttribute("class", "grid");
      svg.appendChild(line);
    }
    text(left, top - 6, fmt(max), "start");
    bars.forEach((b, i) => {
      let y = H - bottom;
      b.parts.forEach((v, s) => {
        if (!v) return;
        const h = Math.max(1, v * scale);
        y -= h;
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", left + i * step + 1);
        r.setAttribute("y", y);
        r.setAttribute("width", Math.max(1, step - 2));
        r.setAttribute("height", h);
        r.setAttribute("fill", COLORS[s % COLORS.length]);
        r.setAttribute("class", "bar");
        const title = document.createElementNS(SVG, "title");
        title.textContent = `${b.label} ${series[s]}: ${fmt(v)}`;
        r.appendChild(title);
        svg.appendChild(r);
      });
    });
    if (bars.length) {
      text(left, H - 6, bars[0].label, "start");
      text(W - 8, H - 6, bars[bars.length - 1].label, "end");
    }
    box.replaceChildren(svg);
  }

  function drawHBars(box, items, fmt) {
    // One horizontal bar per item ({label, value}), its label on the left and its value on the right.
    const W = 720, row = 24, label = 180, right = 150;
    const H = Math.max(1, items.length) * row + 8;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    const max = Math.max(1, ...items.map((i) => i.value));
    items.forEach((item, i) => {
      const y = 4 + i * row;
      const name = document.createElementNS(SVG, "text");
      name.setAttribute("x", label - 8);
      name.setAttribute("y", y + row / 2 + 4);
      name.setAttribute("text-anchor", "end");
      name.textContent = item.label.length > 26 ? `${item.label.slice(0, 25)}…` : item.label;
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", label);
      r.setAttribute("y", y + 3);
      r.setAttribute("width", Math.max(1, (item.value / max) * (W - label - right)));
      r.setAttribute("height", row - 6);
      r.setAttribute("fill", COLORS[0]);
      r.setAttribute("class", "bar");
      const value = document.createElementNS(SVG, "text");
      value.setAttribute("x", W - 4);
      value.setAttribute("y", y + row / 2 + 4);
      value.setAttribute("text-anchor", "end");
      value.textContent = fmt(item.value);
      svg.append(name, r, value);
    });
    if (!items.length) {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", 8);
      t.setAttribute("y", 20);
      t.textContent = "No spend yet.";
      svg.appendChild(t);
    }
    box.replaceChildren(svg);
  }

  // ---- the admin's view ----

  async function showAdmin() {
    await refreshAdmin();
    view("admin-view");
    every(refreshAdmin);
  }

  async function refreshAdmin() {
    const [tenants, spend, apps] = await Promise.all([
      api("GET", "/admin/tenants"),
      api("GET", "/admin/usage?group_by=tenant"),
      api("GET", "/admin/taps"),
    ]);
    $("who").textContent = `admin${apiBase ? ` on ${apiBase}` : ""}`;
    const byTenant = new Map(spend.data.map((g) => [g.key, g]));
    const list = [...tenants.data].sort((a, b) => a.name.localeCompare(b.name) || a.tenant_id.localeCompare(b.tenant_id));
    fillTable("tenants", list, (tr, t) => {
      const g = byTenant.get(t.tenant_id) || { requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_micro: 0 };
      tr.dataset.tenantId = t.tenant_id;
      cell(tr, t.name);
      cell(tr, t.tenant_id, "mono");
      const b = cell(tr, credits(t.balance_micro_credits), "num balance");
      b.dataset.micro = String(t.balance_micro_credits);
      cell(tr, int(g.requests), "num");
      cell(tr, int(g.prompt_tokens + g.completion_tokens), "num");
      cell(tr, credits(g.cost_micro), "num");
    }, "No tenants yet.");
    const select = $("grant-tenant");
    const chosen = select.value;
    select.replaceChildren();
    for (const t of list) {
      const o = document.createElement("option");
      o.value = t.tenant_id;
      o.textContent = `${t.name} (${t.tenant_id})`;
      select.appendChild(o);
    }
    if (chosen) select.value = chosen;
    const top = [...spend.data].sort((a, b) => b.cost_micro - a.cost_micro).slice(0, 20);
    const names = new Map(list.map((t) => [t.tenant_id, t.name]));
    drawHBars($("spend-chart"), top.map((g) => ({ label: names.get(g.key) || g.key, value: g.cost_micro })),
      (v) => `${credits(v)} credits`);
    fillTable("apps", apps.data, (tr, a) => {
      cell(tr, a.name);
      cell(tr, a.kind);
      cell(tr, a.status);
      cell(tr, a.deployments.map((d) => `${d.name}: ${Object.entries(d.replicas).map(([s, n]) => `${n} ${s}`)
        .join(", ") || "none"}`).join("; "));
      cell(tr, int(a.gpus_reserved), "num");
      cell(tr, a.gpu_groups.map((g) => `${g.gpus} on ${g.node_id.slice(0, 12)}`).join(", "));
    }, "No apps.");
    fillTable("nodes", apps.nodes, (tr, n) => {
      cell(tr, n.node_id.slice(0, 12), "mono");
      cell(tr, n.address);
      cell(tr, int(n.gpus_total), "num");
      cell(tr, int(n.gpus_free), "num");
    }, "No nodes.");
  }

  function microOf(text) {
    // "12.5" credits -> 12500000 micro-credits, exactly (no floating point).
    const m = /^\s*(\d{1,9})(?:\.(\d{1,6}))?\s*$/.exec(text);
    if (!m) return null;
    return Number(m[1]) * 1e6 + Number((m[2] || "").padEnd(6, "0"));
  }

  function newGrantKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return `dashboard-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  }

  async function grant(event) {
    event.preventDefault();
    showError("");
    notice("");
    const tenant = $("grant-tenant").value;
    const micro = microOf($("grant-credits").value);
    if (!tenant || !micro) {
      showError("Choose a tenant and a positive amount of credits (up to 6 decimals).");
      return;
    }
    grantKey = grantKey || newGrantKey();
    try {
      const g = await api("POST", `/admin/tenants/${encodeURIComponent(tenant)}/grants`,
        { micro_credits: micro, idempotency_key: grantKey });
      grantKey = null;
      notice(`Granted ${credits(g.micro_credits)} credits to ${tenant}, valid until ${when(g.expires_at)}.`);
      await refreshAdmin();
    } catch (e) {
      showError(`Grant failed: ${e.message}`);
    }
  }

  // ---- wiring ----

  async function start() {
    try {
      const resp = await fetch("config.json", { cache: "no-store" });
      defaultBase = (await resp.json()).api_base || "";
    } catch {
      defaultBase = "";
    }
    apiBase = defaultBase;
    $("sign-in").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("refresh").addEventListener("click", () => {
      showError("");
      const refresh = $("admin-view").hidden ? refreshTenant : refreshAdmin;
      refresh().catch((e) => showError(e.message));
    });
    $("try").addEventListener("submit", tryRequest);
    $("create-key").addEventListener("click", createKey);
    $("grant").addEventListener("submit", grant);
    $("grant-tenant").addEventListener("change", () => { grantKey = null; });
    $("grant-credits").addEventListener("input", () => { grantKey = null; });
    for (const r of document.querySelectorAll('input[name="metric"]')) {
      r.addEventListener("change", () => {
        metric = r.value;
        drawDaily();
      });
    }
    document.addEventListener("visibilitychange", () => {
      if (key && document.visibilityState === "visible") {
        const refresh = $("admin-view").hidden ? refreshTenant : refreshAdmin;
        refresh().catch((e) => showError(e.message));
      }
    });
    document.body.dataset.ready = "1";
  }

  start();
})();
