// kiln web UI: plain ES2020, no build step, no external requests. Talks to the native job API (/api/v1).
//
// One job at a time per page: while a job is queued or running, Generate (and Ctrl+Enter) is disabled and
// Cancel is enabled; other clients can still queue jobs on the server at the same time.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const AUTH_KEY = "kiln-auth";
  const FINAL = new Set(["done", "failed", "cancelled", "interrupted"]);
  const FILL_VALUES = { "fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3 };
  const RESIZE_VALUES = { "just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2 };

  const state = {
    info: null,
    mode: "txt2img",
    job: null, // {id, abort: AbortController} while one is queued or running
    results: new Map(), // job id -> final job status (with params, infotexts, seeds, image_urls)
    selected: null, // {jobId, index}
    hasInit: false,
    cnImage: null, // the ControlNet panel's control image, a data URL
    pendingRetry: null, // what to run again once credentials are given
    older: undefined, // the job id the next page of the history starts before (null: no more pages)
  };
  const HISTORY_PAGE = 8; // jobs per page of the gallery's history

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  // ------------------------------------------------------------------ HTTP with optional credentials
  function b64utf8(text) {
    let bin = "";
    for (const b of new TextEncoder().encode(text)) bin += String.fromCharCode(b);
    return btoa(bin);
  }

  function authHeader() {
    const value = sessionStorage.getItem(AUTH_KEY);
    if (!value) return null;
    return value.includes(":") ? "Basic " + b64utf8(value) : "Bearer " + value;
  }

  function formatDetail(detail) {
    if (detail == null) return "";
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) { // FastAPI's validation errors: [{loc, msg, type}, ...]
      return detail.map((d) => {
        if (d && typeof d === "object" && d.msg) {
          const where = (d.loc || []).filter((p) => p !== "body").join(".");
          return where ? `${where}: ${d.msg}` : d.msg;
        }
        return typeof d === "string" ? d : JSON.stringify(d);
      }).join("; ");
    }
    return JSON.stringify(detail);
  }

  async function errorMessage(res) {
    let message = "";
    try {
      const body = await res.json();
      message = formatDetail(body.detail !== undefined ? body.detail : body.error);
    } catch (_) { /* not JSON */ }
    if (!message) message = `The server answered ${res.status} ${res.statusText || ""}`.trim();
    if (res.status === 503) {
      const after = res.headers.get("Retry-After");
      if (after) message += ` (retry in ${after} s)`;
    }
    return message;
  }

  /** fetch() with credentials; rejects with ApiError (status 0: no connection) or AbortError. */
  async function api(path, { method, json, signal } = {}) {
    const headers = {};
    const auth = authHeader();
    if (auth) headers.Authorization = auth;
    if (json !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, {
        method: method || (json !== undefined ? "POST" : "GET"), headers, signal, cache: "no-store",
        body: json === undefined ? undefined : (typeof json === "string" ? json : JSON.stringify(json)),
      });
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      throw new ApiError("Cannot reach the server. Is kiln serve still running?", 0);
    }
    if (res.status === 401) {
      showAuth();
      throw new ApiError(auth ? "The API token or user:password was not accepted."
        : "This server needs an API token or user:password (field at the top).", 401);
    }
    if (!res.ok) throw new ApiError(await errorMessage(res), res.status);
    if (auth) $("auth-box").hidden = true;
    return res;
  }

  function showAuth() {
    const box = $("auth-box");
    if (box.hidden) {
      box.hidden = false;
      $("auth").value = sessionStorage.getItem(AUTH_KEY) || "";
      $("auth").focus();
    }
  }

  function saveAuth(event) {
    event.preventDefault();
    const value = $("auth").value.trim();
    if (!value) return;
    sessionStorage.setItem(AUTH_KEY, value);
    clearError();
    const retry = state.pendingRetry;
    state.pendingRetry = null;
    if (!state.info) loadInfo().then(() => { if (retry && retry !== loadInfo) retry(); });
    else if (retry) retry();
  }

  // ------------------------------------------------------------------ messages
  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }

  function clearError() {
    $("error").textContent = "";
    $("error").hidden = true;
  }

  /** Shows an error to the user; `retry` runs again after credentials are entered when it was a 401. */
  function fail(error, retry) {
    if (error && error.name === "AbortError") return;
    if (error instanceof ApiError) {
      if (error.status === 401 && retry) state.pendingRetry = retry;
      showError(error.message);
    } else {
      console.error(error);
      showError("Unexpected error in the web UI; the browser console has the details.");
    }
  }

  // ------------------------------------------------------------------ server info
  function option(value, label, data) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    if (data) Object.assign(o.dataset, data);
    return o;
  }

  async function loadInfo() {
    try {
      const info = await (await api("/api/v1/info")).json();
      applyInfo(info);
      applyStyles(await (await api("/sdapi/v1/prompt-styles")).json());
      applyControlNet(await (await api("/controlnet/model_list")).json(),
        await (await api("/controlnet/module_list")).json());
      applyUpscalers(await (await api("/sdapi/v1/upscalers")).json());
      if (state.older === undefined) await loadHistory();
    } catch (e) {
      $("model").textContent = "not connected";
      fail(e, loadInfo);
    }
  }

  function applyInfo(info) {
    state.info = info;
    $("model").textContent = `${info.model} · kiln ${info.version}`;
    const sampler = $("sampler");
    const previous = sampler.value;
    sampler.replaceChildren(...info.samplers.map((s) => option(s.label, s.label, { name: s.name })));
    const labels = info.samplers.map((s) => s.label);
    sampler.value = labels.includes(previous) ? previous : (labels.includes("Euler a") ? "Euler a" : labels[0]);
    const schedule = $("schedule");
    const prevSchedule = schedule.value;
    schedule.replaceChildren(option("", "Automatic"), ...info.schedules.map((s) => option(s.name, s.label)));
    schedule.value = info.schedules.some((s) => s.name === prevSchedule) ? prevSchedule : "";

    const lim = info.limits || {};
    const unit = info.size_unit || 8;
    for (const id of ["width", "height"]) {
      const el = $(id);
      el.min = unit;
      el.step = unit;
      if (lim.max_size) el.max = lim.max_size;
      if (!state.results.size) el.value = info.native_size;
    }
    if (lim.max_steps) $("steps").max = lim.max_steps;
    if (lim.max_batch_size) $("batch-size").max = lim.max_batch_size;
    if (lim.max_n_iter) $("batch-count").max = lim.max_n_iter;
    if (lim.max_prompt_chars) $("prompt").maxLength = lim.max_prompt_chars;
    $("mask-help").textContent = "Paint over the image to inpaint that area (white = repaint). " +
      "Without a mask the whole image is redrawn." +
      (info.inpainting ? "" : " This model is not an inpainting model: masked areas are repainted by blending.");
    setRunning(!!state.job);
  }

  /** The upscalers (/sdapi/v1/upscalers: resamplers and model files) in the hires fix and Extras lists. */
  function applyUpscalers(list) {
    const names = list.map((u) => u.name);
    const fill = (id, choices, fallback) => {
      const el = $(id);
      const previous = el.value;
      el.replaceChildren(...choices.map((n) => option(n, n)));
      el.value = choices.includes(previous) ? previous : fallback;
    };
    fill("hr-upscaler", ["Latent", ...names.filter((n) => n !== "None")], "Latent");
    fill("ex-upscaler-1", names, names.includes("Lanczos") ? "Lanczos" : names[0]);
    fill("ex-upscaler-2", names, "None");
  }

  /** The server's prompt styles (--styles-file) in the picker; hidden when there are none. */
  function applyStyles(styles) {
    const select = $("styles");
    const chosen = new Set(selectedStyles());
    select.replaceChildren(...styles.map((s) => {
      const o = option(s.name, s.name);
      o.title = [s.prompt, s.negative_prompt && `negative: ${s.negative_prompt}`].filter(Boolean).join("\n");
      o.selected = chosen.has(s.name);
      return o;
    }));
    select.size = Math.min(6, Math.max(2, styles.length));
    $("styles-field").hidden = styles.length === 0;
  }

  /** The ControlNet panel's model and preprocessor choices; without models the panel says how to add some. */
  function applyControlNet(models, modules) {
    const names = models.model_list.filter((m) => m !== "None");
    const model = $("cn-model");
    const previous = model.value;
    model.replaceChildren(...names.map((m) => option(m, m)));
    if (names.includes(previous)) model.value = previous;
    $("cn-empty").hidden = names.length > 0;
    $("cn-enabled").disabled = names.length === 0;
    if (!names.length) $("cn-enabled").checked = false;
    const module = $("cn-module");
    const chosen = module.value || "none";
    module.replaceChildren(...modules.module_list.map((m) => option(m, m)));
    module.value = modules.module_list.includes(chosen) ? chosen : "none";
  }

  /** The ControlNet unit of the request (sd-webui-controlnet's fields), or null when the panel is off. */
  function controlNetUnit(mode) {
    if (!$("cn-enabled").checked) return null;
    if (!$("cn-model").value) throw new ApiError("ControlNet: choose a model.", 0);
    if (!state.cnImage && mode !== "img2img") throw new ApiError("ControlNet: choose a control image.", 0);
    const unit = {
      enabled: true, model: $("cn-model").value, module: $("cn-module").value,
      weight: readFloat("cn-weight", "ControlNet weight"),
      guidance_start: readFloat("cn-start", "ControlNet guidance start"),
      guidance_end: readFloat("cn-end", "ControlNet guidance end"),
      control_mode: $("cn-control-mode").value, resize_mode: "Crop and Resize", pixel_perfect: true,
    };
    if (state.cnImage) unit.image = state.cnImage; // img2img without one: the server takes the init image
    return unit;
  }

  async function onControlImage() {
    const file = $("cn-image").files[0];
    if (!file) return;
    clearError();
    state.cnImage = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    const preview = $("cn-preview");
    preview.src = state.cnImage;
    preview.hidden = false;
    $("cn-detect").disabled = false;
  }

  /** The control map the chosen preprocessor makes of the control image (POST /controlnet/detect). */
  async function detectControlMap() {
    if (!state.cnImage) return;
    clearError();
    try {
      const res = await api("/controlnet/detect", { json: JSON.stringify({
        controlnet_module: $("cn-module").value, controlnet_input_images: [state.cnImage],
        controlnet_processor_res: Math.max(64, Math.min(readInt("width", "Width"), readInt("height", "Height"))),
      }) });
      $("cn-preview").src = "data:image/png;base64," + (await res.json()).images[0];
    } catch (e) {
      fail(e, detectControlMap);
    }
  }

  function selectedStyles() {
    return [...$("styles").selectedOptions].map((o) => o.value);
  }

  // ------------------------------------------------------------------ the request
  function readInt(id, what) {
    const text = $(id).value.trim();
    if (!/^-?\d+$/.test(text)) throw new ApiError(`${what} must be a whole number, got "${text}"`, 0);
    return parseInt(text, 10);
  }

  function readFloat(id, what) {
    const text = $(id).value.trim();
    const v = Number(text);
    if (text === "" || !Number.isFinite(v)) throw new ApiError(`${what} must be a number, got "${text}"`, 0);
    return v;
  }

  /** The JSON body of a txt2img / img2img request (A1111 field names), from the form. */
  function buildRequest(mode) {
    const seedText = $("seed").value.trim() || "-1";
    if (!/^-?\d+$/.test(seedText)) {
      throw new ApiError(`Seed must be a whole number (-1 = random), got "${seedText}"`, 0);
    }
    const seedExact = Number.isSafeInteger(Number(seedText));
    const body = {
      prompt: $("prompt").value,
      negative_prompt: $("negative-prompt").value,
      sampler_name: $("sampler").value || null,
      scheduler: $("schedule").value || null,
      steps: readInt("steps", "Steps"),
      cfg_scale: readFloat("cfg", "CFG scale"),
      width: readInt("width", "Width"),
      height: readInt("height", "Height"),
      seed: seedExact ? Number(seedText) : "__kiln_seed__",
      batch_size: readInt("batch-size", "Batch size"),
      n_iter: readInt("batch-count", "Batch count"),
    };
    const styles = selectedStyles();
    if (styles.length) body.styles = styles;
    if (mode === "img2img") {
      if (!state.hasInit) throw new ApiError("Choose an init image first (img2img tab).", 0);
      body.init_images = [$("init-canvas").toDataURL("image/png")];
      body.denoising_strength = readFloat("strength", "Denoising strength");
      body.resize_mode = Number($("resize-mode").value);
      if (maskHasPaint()) {
        body.mask = maskPng();
        body.mask_blur = readFloat("mask-blur", "Mask blur");
        body.inpainting_fill = Number($("inpainting-fill").value);
        body.inpaint_full_res = $("inpaint-full-res").checked;
      }
    }
    if (mode === "txt2img" && $("hr-enabled").checked) {
      body.enable_hr = true;
      body.hr_upscaler = $("hr-upscaler").value;
      body.hr_scale = readFloat("hr-scale", "Hires upscale by");
      body.hr_second_pass_steps = readInt("hr-steps", "Hires steps");
      body.denoising_strength = readFloat("hr-strength", "Hires denoising");
    }
    const unit = controlNetUnit(mode);
    if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
    const json = JSON.stringify(body);
    // seeds beyond 2^53 keep every digit: JSON numbers, not JS doubles
    return seedExact ? json : json.replace('"__kiln_seed__"', seedText);
  }

  // ------------------------------------------------------------------ jobs
  function setRunning(running) {
    $("generate").disabled = running || !state.info;
    $("cancel").disabled = !running;
    $("generate").textContent = running ? "Generating…" : "Generate";
    document.querySelector(".output").setAttribute("aria-busy", running ? "true" : "false");
  }

  async function generate() {
    if (state.job || !state.info) return;
    clearError();
    const mode = state.mode;
    let json;
    try {
      json = buildRequest(mode);
    } catch (e) {
      fail(e);
      return;
    }
    const job = { id: null, abort: new AbortController() };
    state.job = job;
    setRunning(true);
    $("progress-text").textContent = "Submitting…";
    const preview = $("preview");
    preview.hidden = true;
    preview.removeAttribute("src");
    let status;
    try {
      status = await (await api(`/api/v1/${mode}`, { json, signal: job.abort.signal })).json();
    } catch (e) {
      state.job = null;
      setRunning(false);
      setProgress({ progress: 0, state: "idle" });
      $("progress-text").textContent = "Idle";
      fail(e, generate);
      return;
    }
    job.id = status.id;
    $("progress").dataset.job = status.id;
    onProgress(job, status);
    follow(job);
  }

  async function follow(job) {
    let final = null;
    try {
      final = await streamEvents(job);
    } catch (e) {
      if (e && e.name === "AbortError") return;
      // the stream broke: fall back to polling the job's status
    }
    if (!final) final = await pollUntilFinal(job);
    if (final) finish(job, final);
  }

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r\n|\r|\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  /** Reads the job's server-sent events (fetch, so credentials can be sent); resolves with the final status. */
  async function streamEvents(job) {
    const res = await api(`/api/v1/jobs/${job.id}/events`, { signal: job.abort.signal });
    if (!res.body) return null;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
        const ev = parseEvent(buffer.slice(0, m.index));
        buffer = buffer.slice(m.index + m[0].length);
        if (!ev) continue;
        let status;
        try {
          status = JSON.parse(ev.data);
        } catch (_) {
          continue;
        }
        if (FINAL.has(ev.event)) {
          reader.cancel().catch(() => {});
          return status;
        }
        if (ev.event === "progress") onProgress(job, status);
      }
    }
    return null;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function pollUntilFinal(job) {
    for (let delay = 300; state.job === job && !job.abort.signal.aborted; delay = Math.min(delay * 1.5, 3000)) {
      await sleep(delay);
      try {
        const status = await (await api(`/api/v1/jobs/${job.id}`, { signal: job.abort.signal })).json();
        if ($("error").textContent.startsWith("Cannot reach")) clearError();
        if (FINAL.has(status.state)) return status;
        onProgress(job, status);
        delay = 300;
      } catch (e) {
        if (e && e.name === "AbortError") return null;
        if (e instanceof ApiError && e.status === 404) {
          endLocally(job, "The server no longer knows this job.");
          return null;
        }
        fail(e); // no connection / credentials: keep trying
      }
    }
    return null;
  }

  function fmtSeconds(s) {
    if (s == null || !Number.isFinite(s)) return "";
    if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  function setProgress(status) {
    const p = Math.max(0, Math.min(1, Number(status.progress) || 0));
    const el = $("progress");
    el.dataset.progress = String(p);
    el.dataset.state = status.state || "idle";
    el.setAttribute("aria-valuenow", String(Math.round(p * 100)));
    el.querySelector(".bar").style.width = `${(p * 100).toFixed(1)}%`;
    return p;
  }

  function onProgress(job, status) {
    if (job !== state.job) return;
    const p = setProgress(status);
    let text;
    if (status.state === "queued") {
      text = status.position ? `Queued: position ${status.position}` : "Queued";
    } else {
      const parts = [`${Math.floor(p * 100)}%`];
      if (status.sampling_steps) parts.push(`step ${status.sampling_step}/${status.sampling_steps}`);
      const nIter = status.params && status.params.n_iter;
      if (nIter > 1) parts.push(`batch ${(status.batch || 0) + 1}/${nIter}`);
      if (status.eta != null) parts.push(`ETA ${fmtSeconds(status.eta)}`);
      text = parts.join(" · ");
    }
    $("progress-text").textContent = text;
    if (status.preview) {
      const img = $("preview");
      img.src = status.preview;
      img.hidden = false;
    }
  }

  function endLocally(job, message) {
    if (job !== state.job) return;
    job.abort.abort();
    state.job = null;
    setRunning(false);
    $("progress").dataset.state = "unknown";
    $("progress-text").textContent = "Stopped following the job";
    showError(message);
  }

  function finish(job, status) {
    if (job !== state.job) return;
    state.job = null;
    setRunning(false);
    setProgress(status);
    const took = status.finished && status.started ? ` in ${fmtSeconds(status.finished - status.started)}` : "";
    const n = status.images || 0;
    const images = `${n} image${n === 1 ? "" : "s"}`;
    const text = {
      done: `Done: ${images}${took}`,
      failed: "Failed",
      cancelled: "Cancelled before it started",
      interrupted: `Interrupted${n ? `: kept ${images}` : ""}`,
    }[status.state] || status.state;
    $("progress-text").textContent = text;
    if (status.state === "failed") showError(status.error || "The job failed.");
    if (n > 0) {
      $("preview").hidden = true; // the results replace the live preview; without any, the last preview stays
      addResults(status);
    }
  }

  async function cancel() {
    const job = state.job;
    if (!job) return;
    $("cancel").disabled = true;
    if (!job.id) { // still submitting
      job.abort.abort();
      return;
    }
    $("progress-text").textContent = "Cancelling…";
    try {
      await api(`/api/v1/jobs/${job.id}/cancel`, { method: "POST" });
      // the final event (cancelled / interrupted) ends the job in the UI
    } catch (e) {
      if (e instanceof ApiError && (e.status === 0 || e.status === 404)) {
        endLocally(job, e.message);
      } else {
        if (state.job === job) $("cancel").disabled = false;
        fail(e, cancel);
      }
    }
  }

  // ------------------------------------------------------------------ gallery
  /** Sets an <img> to an API image and resolves with its src; with credentials the image is fetched first
   * and shown from a blob: URL (an <img src> cannot send an Authorization header). */
  async function showApiImage(img, url) {
    if (!authHeader()) {
      img.src = url;
      return url;
    }
    try {
      const blob = await (await api(url)).blob();
      img.src = URL.createObjectURL(blob);
      return img.src;
    } catch (e) {
      fail(e);
      return null;
    }
  }

  /** The next page of the server's job history (newest first), below what the gallery shows. */
  async function loadHistory() {
    const before = state.older ? `&before=${encodeURIComponent(state.older)}` : "";
    const page = await (await api(`/api/v1/jobs?limit=${HISTORY_PAGE}${before}`)).json();
    for (const status of page.jobs) {
      if (FINAL.has(status.state) && status.images > 0 && !state.results.has(status.id)) {
        addResults(status, { older: true });
      }
    }
    state.older = page.next;
    $("gallery-more").hidden = !page.next;
  }

  /** Deletes the selected result's job on the server (its images and files), and from the gallery. */
  async function deleteSelected() {
    const sel = selectedResult();
    if (!sel) return;
    try {
      await api(`/api/v1/jobs/${sel.status.id}`, { method: "DELETE" });
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) {
        fail(e);
        return;
      }
    }
    state.results.delete(sel.status.id);
    for (const img of $("gallery").querySelectorAll("img.result")) {
      if (img.dataset.job === sel.status.id) img.remove();
    }
    state.selected = null;
    const next = $("gallery").querySelector("img.result");
    if (next) select(next.dataset.job, Number(next.dataset.index));
    else $("viewer").hidden = true;
  }

  /** A job's images in the gallery: a new result first (and selected), a history page's at the end. */
  function addResults(status, { older = false } = {}) {
    state.results.set(status.id, status);
    const frag = document.createDocumentFragment();
    status.image_urls.forEach((url, i) => {
      const img = document.createElement("img");
      img.className = "result";
      img.tabIndex = 0;
      img.setAttribute("role", "button");
      const seed = status.seeds && status.seeds[i];
      img.alt = `Result ${i + 1} of ${status.image_urls.length}${seed != null ? `, seed ${seed}` : ""}`;
      img.dataset.job = status.id;
      img.dataset.index = String(i);
      img.dataset.url = url;
      img.ready = showApiImage(img, url);
      frag.append(img);
    });
    $("empty").hidden = true;
    if (older) {
      $("gallery").append(frag);
      if (!state.selected) select(status.id, 0);
      return;
    }
    $("gallery").prepend(frag); // newest first
    select(status.id, 0);
  }

  function selectedResult() {
    if (!state.selected) return null;
    const status = state.results.get(state.selected.jobId);
    return status ? { status, index: state.selected.index } : null;
  }

  function select(jobId, index) {
    const status = state.results.get(jobId);
    if (!status) return;
    state.selected = { jobId, index };
    let chosen = null;
    for (const img of $("gallery").querySelectorAll("img.result")) {
      const on = img.dataset.job === jobId && Number(img.dataset.index) === index;
      img.classList.toggle("selected", on);
      img.setAttribute("aria-pressed", on ? "true" : "false");
      if (on) chosen = img;
    }
    $("viewer").hidden = false;
    const big = $("selected");
    const link = $("download");
    const seed = status.seeds && status.seeds[index];
    big.alt = chosen ? chosen.alt : `Result ${index + 1}`;
    link.download = `kiln-${status.id}-${index}${seed != null ? "-" + seed : ""}.png`;
    Promise.resolve(chosen ? chosen.ready : showApiImage(big, status.image_urls[index])).then((src) => {
      const now = state.selected;
      if (!src || !now || now.jobId !== jobId || now.index !== index) return;
      big.src = src;
      link.href = src;
    });
    $("infotext").textContent = (status.infotexts && status.infotexts[index]) || "(no parameters)";
    $("reuse").disabled = false;
    $("send-to-img2img").disabled = false;
    $("delete").disabled = false;
    $("seed-reuse").disabled = seed == null;
  }

  function onGalleryActivate(event) {
    const img = event.target.closest("img.result");
    if (!img) return;
    if (event.type === "keydown") {
      if (event.key !== "Enter" && event.key !== " ") return;
      event.preventDefault();
    }
    select(img.dataset.job, Number(img.dataset.index));
  }

  function setValue(id, value) {
    if (value === undefined || value === null) return;
    const el = $(id);
    el.value = String(value);
    el.dispatchEvent(new Event("input", { bubbles: true }));
  }

  /** Fills the form from the selected result's job parameters. */
  function reuseParameters() {
    const sel = selectedResult();
    if (!sel) return;
    const p = sel.status.params || {};
    const prompt = Array.isArray(p.prompt) ? p.prompt[sel.index % p.prompt.length] : p.prompt;
    setValue("prompt", prompt);
    setValue("negative-prompt", p.negative_prompt);
    // the job's prompts already hold the styles it asked for: choosing them again would apply them twice
    for (const o of $("styles").options) o.selected = false;
    const samplers = (state.info && state.info.samplers) || [];
    const spec = samplers.find((s) => s.name === p.sampler) || samplers.find((s) => s.label === p.sampler);
    if (spec) setValue("sampler", spec.label);
    // the server reports the schedule it used; the sampler's own default shows as "Automatic" again
    const explicit = p.schedule && (!spec || (spec.schedule && p.schedule !== spec.schedule));
    const known = [...$("schedule").options].some((o) => o.value === p.schedule);
    setValue("schedule", explicit && known ? p.schedule : "");
    setValue("steps", p.steps);
    setValue("cfg", p.cfg_scale);
    setValue("width", p.width);
    setValue("height", p.height);
    setValue("seed", p.seed);
    setValue("batch-size", p.batch_size);
    setValue("batch-count", p.n_iter);
    if (sel.status.mode === "img2img") {
      setValue("strength", p.strength);
      if (p.resize_mode in RESIZE_VALUES) setValue("resize-mode", RESIZE_VALUES[p.resize_mode]);
      if (p.inpaint_fill in FILL_VALUES) setValue("inpainting-fill", FILL_VALUES[p.inpaint_fill]);
      setValue("mask-blur", p.mask_blur);
      if (p.inpaint_area) $("inpaint-full-res").checked = p.inpaint_area === "masked";
    }
  }

  function reuseSeed() {
    const sel = selectedResult();
    if (!sel || !sel.status.seeds) return;
    setValue("seed", sel.status.seeds[sel.index]);
  }

  async function sendToImg2img() {
    const sel = selectedResult();
    if (!sel) return;
    try {
      const blob = await (await api(sel.status.image_urls[sel.index])).blob();
      await drawInit(await createImageBitmap(blob));
      switchTab("img2img");
    } catch (e) {
      fail(e, sendToImg2img);
    }
  }

  // ------------------------------------------------------------------ img2img: init image and mask
  function maxInitSide() {
    const max = (state.info && state.info.limits && state.info.limits.max_size) || 1024;
    return Math.min(2048, Math.max(512, max));
  }

  async function drawInit(bitmap) {
    const scale = Math.min(1, maxInitSide() / Math.max(bitmap.width, bitmap.height));
    const w = Math.max(1, Math.round(bitmap.width * scale));
    const h = Math.max(1, Math.round(bitmap.height * scale));
    const canvas = $("init-canvas");
    const mask = $("mask-canvas");
    canvas.width = mask.width = w;
    canvas.height = mask.height = h;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, w, h);
    if (bitmap.close) bitmap.close();
    clearMask();
    $("canvas-box").hidden = false;
    state.hasInit = true;
  }

  async function onInitFile() {
    const file = $("init-image").files[0];
    if (!file) return;
    clearError();
    try {
      await drawInit(await createImageBitmap(file));
    } catch (e) {
      console.error(e);
      showError(`Cannot read ${file.name} as an image.`);
    }
  }

  function clearMask() {
    const mask = $("mask-canvas");
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  }

  function maskHasPaint() {
    const mask = $("mask-canvas");
    if (!state.hasInit || !mask.width || !mask.height) return false;
    const data = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  /** The mask as the API wants it: a black/white PNG data URL the size of the init image (white = repaint). */
  function maskPng() {
    const mask = $("mask-canvas");
    const out = document.createElement("canvas");
    out.width = mask.width;
    out.height = mask.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(mask, 0, 0);
    return out.toDataURL("image/png");
  }

  function setupBrush() {
    const mask = $("mask-canvas");
    let stroke = null; // {id, last}

    const point = (e) => {
      const r = mask.getBoundingClientRect();
      return { x: (e.clientX - r.left) * mask.width / r.width, y: (e.clientY - r.top) * mask.height / r.height };
    };
    const paint = (a, b) => {
      const ctx = mask.getContext("2d");
      const r = mask.getBoundingClientRect();
      const size = Number($("brush-size").value) * (r.width ? mask.width / r.width : 1);
      ctx.globalCompositeOperation = $("mask-erase").checked ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "#fff";
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.lineWidth = size;
      if (a.x === b.x && a.y === b.y) { // a dot: zero-length lines are not stroked
        ctx.beginPath();
        ctx.arc(a.x, a.y, size / 2, 0, Math.PI * 2);
        ctx.fill();
      } else {
        ctx.beginPath();
        ctx.moveTo(a.x, a.y);
        ctx.lineTo(b.x, b.y);
        ctx.stroke();
      }
      ctx.globalCompositeOperation = "source-over";
    };

    mask.addEventListener("pointerdown", (e) => {
      if (e.pointerType === "mouse" && e.button !== 0) return;
      e.preventDefault();
      mask.setPointerCapture(e.pointerId);
      const p = point(e);
      stroke = { id: e.pointerId, last: p };
      paint(p, p);
    });
    mask.addEventListener("pointermove", (e) => {
      if (!stroke || e.pointerId !== stroke.id) return;
      e.preventDefault();
      const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
      for (const ev of events.length ? events : [e]) {
        const p = point(ev);
        paint(stroke.last, p);
        stroke.last = p;
      }
    });
    const end = (e) => {
      if (stroke && e.pointerId === stroke.id) stroke = null;
    };
    mask.addEventListener("pointerup", end);
    mask.addEventListener("pointercancel", end);
  }

  // ------------------------------------------------------------------ tabs, keyboard, wiring
  const MODES = ["txt2img", "img2img", "extras"];

  function switchTab(mode) {
    state.mode = mode;
    for (const m of MODES) {
      const tab = $(`tab-${m}`);
      tab.setAttribute("aria-selected", m === mode ? "true" : "false");
      tab.tabIndex = m === mode ? 0 : -1;
    }
    $("img2img-panel").hidden = mode !== "img2img";
    $("hires").hidden = mode !== "txt2img";
    $("params").hidden = mode === "extras";
    $("extras-panel").hidden = mode !== "extras";
  }

  // ------------------------------------------------------------------ Extras: /sdapi/v1/extra-single-image
  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new ApiError("Cannot read that file.", 0));
      reader.readAsDataURL(file);
    });
  }

  async function runExtras() {
    const error = $("ex-error");
    error.hidden = true;
    const file = $("ex-image").files[0];
    const run = $("ex-run");
    try {
      if (!file) throw new ApiError("Choose an image first.", 0);
      run.disabled = true;
      run.textContent = "Upscaling…";
      const body = {
        image: await readDataUrl(file),
        upscaler_1: $("ex-upscaler-1").value,
        upscaler_2: $("ex-upscaler-2").value,
        extras_upscaler_2_visibility: Number($("ex-visibility").value),
        upscaling_resize: readFloat("ex-resize", "Resize"),
      };
      const out = await (await api("/sdapi/v1/extra-single-image", { json: body })).json();
      const url = "data:image/png;base64," + out.image;
      $("ex-result").src = url;
      $("ex-result").hidden = false;
      $("ex-download").href = url;
      $("ex-download").download = file.name.replace(/\.[^.]*$/, "") + ".png";
      $("ex-download").hidden = false;
      // the server's escaped text in <p> … <br>: parsed inertly, shown as text
      $("ex-info").textContent = new DOMParser().parseFromString(out.html_info, "text/html").body.textContent;
    } catch (e) {
      if (e instanceof ApiError) {
        error.textContent = e.message;
        error.hidden = false;
      } else fail(e);
    } finally {
      run.disabled = false;
      run.textContent = "Upscale";
    }
  }

  function bindOutput(inputId, outputId, format) {
    const update = () => { $(outputId).textContent = format($(inputId).value); };
    $(inputId).addEventListener("input", update);
    update();
  }

  function init() {
    $("params").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
    $("generate").addEventListener("click", (e) => { e.preventDefault(); generate(); });
    $("cancel").addEventListener("click", cancel);
    $("seed-random").addEventListener("click", () => setValue("seed", -1));
    $("seed-reuse").addEventListener("click", reuseSeed);
    $("reuse").addEventListener("click", reuseParameters);
    $("send-to-img2img").addEventListener("click", sendToImg2img);
    $("gallery").addEventListener("click", onGalleryActivate);
    $("gallery-more").addEventListener("click", () => loadHistory().catch((e) => fail(e)));
    $("delete").addEventListener("click", deleteSelected);
    $("gallery").addEventListener("keydown", onGalleryActivate);
    $("auth-box").addEventListener("submit", saveAuth);
    $("init-image").addEventListener("change", onInitFile);
    $("clear-mask").addEventListener("click", clearMask);
    $("cn-image").addEventListener("change", () => onControlImage().catch((e) => fail(e, onControlImage)));
    $("cn-detect").addEventListener("click", detectControlMap);
    $("tab-txt2img").addEventListener("click", () => switchTab("txt2img"));
    $("tab-img2img").addEventListener("click", () => switchTab("img2img"));
    $("tab-extras").addEventListener("click", () => switchTab("extras"));
    $("extras-panel").addEventListener("submit", (e) => { e.preventDefault(); runExtras(); });
    document.querySelector(".tabs").addEventListener("keydown", (e) => {
      if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
      const step = e.key === "ArrowRight" ? 1 : MODES.length - 1;
      const next = MODES[(MODES.indexOf(state.mode) + step) % MODES.length];
      switchTab(next);
      $(`tab-${next}`).focus();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.target.closest("#auth-box")) {
        e.preventDefault();
        if (state.mode === "extras") runExtras();
        else generate();
      }
    });
    bindOutput("brush-size", "brush-size-value", (v) => v);
    bindOutput("strength", "strength-value", (v) => Number(v).toFixed(2));
    bindOutput("ex-visibility", "ex-visibility-value", (v) => Number(v).toFixed(2));
    setupBrush();
    switchTab("txt2img");
    setRunning(false);
    loadInfo();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
