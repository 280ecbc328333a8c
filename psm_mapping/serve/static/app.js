// psm-mapping explorer: the page uses only the server's HTTP API (see the README).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const base = location.origin + location.pathname.replace(/[^/]*$/, "");
  // the server's token (psm-map serve prints the page's URL with ?token=... when it has one):
  // sent as a header with the page's own requests and in the URLs of tiles, images and downloads
  const token = new URLSearchParams(location.search).get("token") || "";
  function withToken(url) {
    return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
  }
  const state = { text: "", audio: null, audioName: "", zoom_level: null, month: 0, hour: -1,
                  band: "similarity", opacity: 0.8, summary: null };
  const recent = [];
  let info = null, map = null, pollTimer = null, runId = 0;

  function setStatus(msg, cls) {
    const s = $("status");
    s.textContent = msg;
    s.className = "muted " + (cls || "");
  }

  function queryParams(withView) {
    const p = new URLSearchParams();
    if (state.text) p.set("text", state.text);
    if (state.audio) p.set("audio", state.audio);
    if (state.month > 0) p.set("month", String(state.month));
    if (state.hour >= 0) p.set("hour", String(state.hour));
    if (withView) {
      p.set("zoom_level", String(state.zoom_level));
      p.set("band", state.band);
    }
    return p;
  }

  function hasQuery() { return Boolean(state.text || state.audio); }

  async function getJSON(url, opts) {
    opts = Object.assign({}, opts || {});
    if (token) opts.headers = Object.assign({}, opts.headers || {}, { "X-PSM-Token": token });
    const r = await fetch(url, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
    return body;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return (a !== 0 && (a < 0.01 || a >= 1e4)) ? v.toExponential(3) : v.toFixed(a < 10 ? 4 : 2);
  }

  // ------------------------------------------------------------------ progress while computing
  function startPolling() {
    stopPolling();
    pollTimer = setInterval(async () => {
      try {
        const p = await getJSON(base + "api/progress");
        if (p.jobs.length) {
          const j = p.jobs[0];
          const pct = j.total > 1 ? " " + Math.round(100 * j.done / j.total) + "%" : "";
          setStatus("Computing: " + j.what + pct + " …", "busy");
        }
      } catch (e) { /* the query's own answer reports errors */ }
    }, 300);
  }
  function stopPolling() { if (pollTimer) clearInterval(pollTimer); pollTimer = null; }

  // ------------------------------------------------------------------ queries
  async function runQuery(remember) {
    if (!hasQuery()) { setStatus("Type a sound (or drop a clip) first."); return; }
    const id = ++runId;
    document.body.dataset.state = "computing";
    setStatus("Computing the map …", "busy");
    startPolling();
    const t0 = performance.now();
    try {
      const summary = await getJSON(base + "api/query?" + queryParams(false).toString());
      if (id !== runId) return;
      state.summary = summary;
      $("approximate").hidden = !summary.approximate;
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      setStatus("“" + summary.query + "” ready in " + secs + " s. Click the map for values.");
      if (remember) remember_(summary.query);
      updateLayer();
    } catch (e) {
      if (id !== runId) return;
      setStatus(e.message, "error");
      document.body.dataset.state = "error";
    } finally {
      if (id === runId) stopPolling();
    }
  }

  function remember_(label) {
    const entry = { label: label, text: state.text, audio: state.audio, audioName: state.audioName,
                    month: state.month, hour: state.hour };
    const key = JSON.stringify([entry.text, entry.audio, entry.month, entry.hour]);
    const i = recent.findIndex((r) => JSON.stringify([r.text, r.audio, r.month, r.hour]) === key);
    if (i >= 0) recent.splice(i, 1);
    recent.unshift(entry);
    recent.length = Math.min(recent.length, 12);
    renderRecent();
  }

  function renderRecent() {
    const ul = $("recent");
    ul.textContent = "";
    for (const r of recent) {
      const li = document.createElement("li");
      let label = r.label;
      if (r.month > 0) label += " · month " + r.month;
      if (r.hour >= 0) label += " · " + r.hour + "h";
      li.textContent = label;
      li.addEventListener("click", () => {
        Object.assign(state, { text: r.text, audio: r.audio, audioName: r.audioName, month: r.month, hour: r.hour });
        $("text").value = r.text || "";
        $("audio-name").textContent = r.audioName ? "clip: " + r.audioName : "";
        $("month").value = r.month; $("hour").value = r.hour; showMetadata();
        runQuery(false);
      });
      ul.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ the overlay
  function tileTemplate() {
    return withToken(base + "tiles/{z}/{x}/{y}.png?" + queryParams(true).toString());
  }

  function updateLayer() {
    if (!map || (!hasQuery() && state.band !== "uncertainty")) return;
    const url = tileTemplate();
    const src = map.getSource("psm");
    document.body.dataset.state = "loading-tiles";
    if (src) {
      src.setTiles([url]);
    } else {
      const b = info.lonlat_bounds;
      map.addSource("psm", { type: "raster", tiles: [url], tileSize: 256, bounds: b, maxzoom: 22 });
      map.addLayer({ id: "psm", type: "raster", source: "psm",
                     paint: { "raster-opacity": state.opacity, "raster-fade-duration": 0,
                              "raster-resampling": "nearest" } }, "footprint");
    }
    document.body.dataset.tiles = url;
    map.once("idle", () => { if (document.body.dataset.tiles === url) document.body.dataset.state = "tiles-loaded"; });
    const dl = $("download");
    dl.href = withToken(base + "api/export.tif?" + queryParams(false).toString());
    dl.classList.remove("disabled");
    $("copy-xyz").disabled = false;
    $("xyz-url").value = url;
    $("xyz-url").hidden = false;
    const qx = $("qgis-xml");
    qx.href = withToken(base + "api/qgis-connection.xml?" + queryParams(true).toString());
    qx.classList.remove("disabled");
    updateLegend();
    writeAddress();
  }

  function updateLegend() {
    const s = state.summary;
    if (!s) return;
    const zl = String(state.zoom_level);
    const z = s.zoom_levels.find((e) => String(e.zoom_level) === zl);
    const range = z ? z[state.band] : null;
    $("legend").hidden = false;
    $("legend-img").src = withToken(base + "api/legend.png?band=" + state.band);
    let lo = "–", hi = "–";
    if (range && range.min !== null) {  // enough decimals to tell the two ends apart
      const span = Math.abs(range.max - range.min) || Math.abs(range.max) || 1;
      const dec = Math.min(8, Math.max(2, Math.ceil(-Math.log10(span)) + 2));
      lo = range.min.toFixed(dec); hi = range.max.toFixed(dec);
    }
    $("legend-min").textContent = lo;
    $("legend-max").textContent = hi;
  }

  // ------------------------------------------------------------------ controls
  function buildZoomButtons() {
    const box = $("zoom-buttons");
    box.textContent = "";
    for (const level of info.levels) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = level === "mean" ? "mean" : "z" + level;
      b.dataset.level = String(level);
      b.addEventListener("click", () => {
        state.zoom_level = level;
        for (const o of box.children) o.classList.toggle("active", o === b);
        updateLayer();
      });
      box.appendChild(b);
    }
    state.zoom_level = info.levels[0];
    box.children[0].classList.add("active");
  }

  // the month/hour the store's means were fused with: the sliders start there (answered from the
  // stored means, exact at every zoom); "any" is the model's unknown month/hour, a re-fused view
  function storedSetting() {
    const sm = (info && info.stored_metadata) || {};
    return { month: sm.month || 0, hour: (sm.hour === null || sm.hour === undefined) ? -1 : sm.hour };
  }

  function showMetadata() {
    const st = storedSetting(), tag = " (stored)";
    $("month-out").textContent = (state.month > 0 ? String(state.month) : "any") + (state.month === st.month ? tag : "");
    $("hour-out").textContent = (state.hour >= 0 ? state.hour + ":00" : "any") + (state.hour === st.hour ? tag : "");
  }

  // the view lives in the page's address (?text=&month=&hour=&zoom_level=&band=), so a link or a
  // reload shows the same map; the token stays in it
  function readAddress() {
    const a = new URLSearchParams(location.search), num = (k, lo, hi) => {
      if (!a.has(k) || a.get(k) === "") return null;
      const v = Number(a.get(k));
      return Number.isInteger(v) && v >= lo && v <= hi ? v : null;
    };
    const month = num("month", 0, 12), hour = num("hour", -1, 23);
    if (month !== null) state.month = month;
    if (hour !== null) state.hour = hour;
    const zl = a.get("zoom_level");
    if (zl !== null && info.levels.map(String).includes(zl)) state.zoom_level = info.levels.find((l) => String(l) === zl);
    const band = a.get("band");
    if (band && Array.from($("band").options).some((o) => o.value === band)) state.band = band;
    state.text = (a.get("text") || "").trim();
  }

  function writeAddress() {
    const p = queryParams(true);
    if (token) p.set("token", token);
    if (state.month === 0) p.set("month", "0");  // "any", unlike no month (the stored one)
    if (state.hour < 0) p.set("hour", "-1");
    history.replaceState(null, "", location.pathname + "?" + p.toString());
  }

  function showState() {
    $("text").value = state.text;
    $("month").value = state.month; $("hour").value = state.hour; showMetadata();
    $("band").value = state.band;
    for (const b of $("zoom-buttons").children) b.classList.toggle("active", b.dataset.level === String(state.zoom_level));
  }

  function wireControls() {
    $("query-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.text = $("text").value.trim();
      runQuery(true);
    });
    for (const name of ["month", "hour"]) {
      const el = $(name);
      el.addEventListener("input", () => { state[name] = Number(el.value); showMetadata(); });
      el.addEventListener("change", () => { state[name] = Number(el.value); showMetadata(); if (hasQuery()) runQuery(true); });
    }
    $("band").addEventListener("change", () => { state.band = $("band").value; updateLayer(); });
    $("opacity").addEventListener("input", () => {
      state.opacity = Number($("opacity").value);
      if (map && map.getLayer("psm")) map.setPaintProperty("psm", "raster-opacity", state.opacity);
    });
    $("copy-xyz").addEventListener("click", async () => {
      const url = $("xyz-url").value;
      try {
        await navigator.clipboard.writeText(url);
        setStatus("XYZ URL copied: in QGIS add it under XYZ Tiles → New Connection.");
      } catch (e) {
        $("xyz-url").select();
        setStatus("Copy the selected URL (Ctrl-C) into QGIS → XYZ Tiles → New Connection.");
      }
    });
    const drop = $("drop");
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
    });
    $("audio-file").addEventListener("change", () => { const f = $("audio-file").files[0]; if (f) upload(f); });
  }

  async function upload(file) {
    if (info && file.size > info.max_upload_bytes) {
      setStatus(file.name + " is larger than the server's upload limit (" +
                Math.round(info.max_upload_bytes / 1048576) + " MB): send a shorter clip.", "error");
      return;
    }
    setStatus("Uploading " + file.name + " …", "busy");
    const fd = new FormData();
    fd.append("file", file, file.name);
    try {
      const r = await getJSON(base + "api/audio", { method: "POST", body: fd });
      state.audio = r.id; state.audioName = r.name;
      $("audio-name").textContent = "clip: " + r.name + " (clear the text box for the clip alone)";
      state.text = $("text").value.trim();
      runQuery(true);
    } catch (e) {
      setStatus(e.message, "error");
    }
  }

  // ------------------------------------------------------------------ the map
  function popupHTML(p) {
    const rows = Object.keys(p.similarity).map((z) =>
      "<tr><td>" + (z === "mean" ? "mean" : "z" + z) + "</td><td>" + fmt(p.similarity[z]) + "</td><td>" +
      fmt(p.score[z]) + "</td><td>" + fmt(p.uncertainty[z]) + "</td></tr>").join("");
    const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
    return '<div class="popup"><b>' + esc(p.query) + "</b><br><span class=\"muted\">pixel " + p.row + ", " + p.col +
      " · " + p.pixel_centre.lon.toFixed(5) + ", " + p.pixel_centre.lat.toFixed(5) + "</span>" +
      "<table><tr><th>zoom</th><th>similarity</th><th>score</th><th>uncertainty</th></tr>" + rows + "</table></div>";
  }

  function inside(lng, lat) {
    const b = info.lonlat_bounds;
    return lng >= b[0] && lng <= b[2] && lat >= b[1] && lat <= b[3];
  }

  function initMap() {
    const style = { version: 8, sources: {}, layers: [{ id: "bg", type: "background", paint: { "background-color": "#dfe3e6" } }] };
    if (info.basemap) {
      style.sources.basemap = { type: "raster", tiles: [info.basemap.url], tileSize: 256, attribution: info.basemap.attribution };
      style.layers.push({ id: "basemap", type: "raster", source: "basemap" });
    }
    const b = info.lonlat_bounds;
    map = new maplibregl.Map({ container: "map", style: style, bounds: [[b[0], b[1]], [b[2], b[3]]],
                               fitBoundsOptions: { padding: 40 }, attributionControl: { compact: true },
                               preserveDrawingBuffer: true });
    map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
    map.addControl(new maplibregl.ScaleControl(), "bottom-right");
    map.on("load", () => {
      map.addSource("footprint", { type: "geojson", data: withToken(base + "api/footprint.geojson") });
      map.addLayer({ id: "footprint", type: "line", source: "footprint",
                     paint: { "line-color": "#d62728", "line-width": 2 } });
      window.psm.map = map;
      map.once("idle", () => {
        document.body.dataset.state = "ready";
        if (state.text) runQuery(true);  // a link with ?text= shows its map
      });
    });
    map.on("click", async (e) => {
      if (!hasQuery()) return;
      const { lng, lat } = e.lngLat;
      const popup = new maplibregl.Popup({ maxWidth: "340px" }).setLngLat(e.lngLat);
      if (!inside(lng, lat)) {
        popup.setHTML('<div class="popup">Outside the store: click inside the red outline.</div>').addTo(map);
        return;
      }
      const p = queryParams(false);
      p.set("lon", lng.toFixed(7)); p.set("lat", lat.toFixed(7));
      try {
        const v = await getJSON(base + "api/point?" + p.toString());
        popup.setHTML(popupHTML(v)).addTo(map);
      } catch (err) {
        popup.setHTML('<div class="popup">' + err.message.replace(/</g, "&lt;") + "</div>").addTo(map);
      }
    });
  }

  async function init() {
    window.psm = { state: state, map: null, token: token };
    try {
      info = await getJSON(base + "api/info");
    } catch (e) {
      setStatus("The server did not answer /api/info: " + e.message, "error");
      document.body.dataset.state = "error";
      return;
    }
    window.psm.info = info;
    $("store-info").textContent = info.width + " × " + info.height + " px of " + info.pixel_size_m + " m · " +
      info.sat_type + " · " + info.checkpoint;
    $("untrained").hidden = !info.untrained;
    $("metadata-group").hidden = !info.metadata_adjustable;
    buildZoomButtons();
    const st = storedSetting();
    state.month = st.month; state.hour = st.hour;
    readAddress();
    showState();
    wireControls();
    initMap();
  }

  init();
})();
