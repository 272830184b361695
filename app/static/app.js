// The tuneqdm web page: plain JavaScript over the /v1 REST API, no build step.
// The API key stays in sessionStorage (this tab only); images are fetched with the key and
// shown from blob URLs, since an <img src> cannot send an Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = ["succeeded", "failed", "canceled"];
const POLL_MS = 1000;
// Weight of the newest step in the smoothed loss line (an exponential moving average).
const EMA_ALPHA = 0.2;
const state = {
  key: sessionStorage.getItem("tuneqdm.key") || "",
  job: null,          // id of the fine-tune shown in the job card
  losses: [],         // [step, loss] pairs seen while polling that job
  smoothed: [],       // [step, loss] of the exponential moving average drawn over them
  jobName: "",        // the watched fine-tune's name (or id) and adapter, for its delete prompt
  jobAdapter: null,
  bases: [],          // GET /v1/bases: names, families, sizes and request defaults
  adapterBases: new Map(),  // adapter id -> its base's name
  adapters: [],       // GET /v1/adapters' page, for the generation's choices
  sampleBlobs: new Map(),  // sample url -> blob: URL, so each progress image is fetched once
  eventCursor: null,  // next_cursor of the job's event log read so far
  hasEvents: true,
  timer: null,
  canDelete: { finetune: true, generation: true, adapter: true },
  hasSamples: true,
};

// --- the API --------------------------------------------------------------------------------

// Every error of the API is an RFC 9457 problem: `detail` says what to fix, `errors` lists
// the fields at fault ({field, message}) when the input was invalid.
class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail);
    this.status = status;
    this.errors = problem.errors || [];
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${state.key}` } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let problem = { detail: response.statusText };
    try {
      const body = await response.json();
      if (typeof body.detail === "string") problem = body;
    } catch (_) { /* not JSON: a proxy answered */ }
    throw new ApiError(response.status, problem);
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.blob();
}

async function imageUrl(path) {
  return URL.createObjectURL(await api("GET", path));
}

function showError(id, error) {
  const el = $(id);
  el.textContent = error ? error.message : "";
  el.hidden = !error;
}

// --- small DOM helpers ----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const kib = (n) => (n < 1024 * 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);

// What a delete removes and what it keeps (docs/api.md "What is kept"), named in its prompt.
function deletePrompt(kind, id, name, adapterId) {
  const what = name ? `"${name}" (${id})` : id;
  if (kind === "adapter") {
    return `Delete the adapter ${what}?\n\nDeleted: the adapter file and its exports.\n`
      + "Kept: the fine-tune that trained it (its progress images and log) and the images "
      + "already generated with it.";
  }
  if (kind === "finetune") {
    const adapter = adapterId
      ? `its adapter ${adapterId} (delete it under Adapters)`
      : "any adapter it made (delete it under Adapters)";
    return `Delete the fine-tune ${what}?\n\nDeleted: its photos, checkpoints, progress `
      + `images and event log (a queued or running job is canceled first).\nKept: ${adapter}.`;
  }
  return `Delete the generation ${what}?\n\nDeleted: its prompt and images.\n`
    + "Kept: the adapter it used.";
}

function deleteButton(kind, id, after, name = "") {
  if (!state.canDelete[kind]) return "";
  return el("button", {
    type: "button", class: "danger small", "data-delete": id,
    onclick: async () => {
      if (!confirm(deletePrompt(kind, id, name))) return;
      await remove(kind, id);
      await after();
    },
  }, "Delete");
}

// DELETE /v1/finetunes/{id} and /v1/generations/{id} exist only on services that have them: a
// 404/405 to a DELETE of an object the service just listed means "not supported", so the
// buttons disappear.
async function remove(kind, id) {
  const path = { finetune: "/v1/finetunes/", generation: "/v1/generations/", adapter: "/v1/adapters/" }[kind];
  try {
    await api("DELETE", path + id);
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      state.canDelete[kind] = false;
      if (kind === "finetune") $("delete-job").hidden = true;
    } else {
      alert(error.message);
    }
  }
}

// Which DELETE routes this service has, from its OpenAPI document.
async function discover() {
  try {
    const paths = (await (await fetch("/openapi.json")).json()).paths;
    state.canDelete.finetune = Boolean(paths["/v1/finetunes/{finetune_id}"]?.delete);
    state.canDelete.generation = Boolean(paths["/v1/generations/{generation_id}"]?.delete);
    state.hasSamples = Boolean(paths["/v1/finetunes/{finetune_id}/samples"]?.get);
    state.hasEvents = Boolean(paths["/v1/finetunes/{finetune_id}/events"]?.get);
  } catch (_) { /* keep the optimistic defaults; a 404/405 hides the buttons later */ }
  $("delete-job").hidden = !state.canDelete.finetune;
}

// --- key ------------------------------------------------------------------------------------

async function useKey(key) {
  state.key = key;
  try {
    await api("GET", "/v1/adapters?limit=1");
  } catch (error) {
    $("key-status").textContent = error.message;
    $("key-status").className = "error";
    $("app").hidden = true;
    return;
  }
  sessionStorage.setItem("tuneqdm.key", key);
  $("key-status").textContent = "Connected.";
  $("key-status").className = "ok";
  $("app").hidden = false;
  await Promise.all([refreshBases(), refreshFinetunes(), refreshAdapters(), refreshGenerations()]);
}

// The bases this deployment serves, the default first (a fine-tune that names none uses it).
async function refreshBases() {
  let page;
  try {
    page = await api("GET", "/v1/bases");
  } catch (_) {
    return; // the default base only
  }
  const bases = [...page.data].sort((a, b) => Number(b.default) - Number(a.default));
  state.bases = bases;
  $("base").replaceChildren(...bases.map((b) => el("option", { value: b.default ? "" : b.name },
    `${b.name}${b.default ? " (default)" : ""}, ${b.family}, ${b.bits}-bit, ${b.native_resolution} px`)));
  if (!bases.length) $("base").replaceChildren(el("option", { value: "" }, "default"));
  fillGenerateChoices();
  applyBase();
}

// What a generation runs on: an adapter (on its own base), or a base without one. A base is
// the option `base:NAME`; the default base is "" (the request then names none).
const BASE_CHOICE = "base:";

function fillGenerateChoices(adapters = state.adapters) {
  state.adapters = adapters;
  const select = $("gen-adapter");
  const chosen = select.value;
  const plain = state.bases.length
    ? state.bases.map((b) => el("option", { value: b.default ? "" : BASE_CHOICE + b.name },
      `${b.name} without an adapter${b.default ? " (default)" : ""}`))
    : [el("option", { value: "" }, "base model (no adapter)")];
  select.replaceChildren(...plain,
    ...adapters.map((a) => el("option", { value: a.id }, `${a.name || a.id} (${a.tokens.join(", ")})`)));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

// The base a generation with the chosen option runs on.
function generationBase() {
  const chosen = $("gen-adapter").value;
  if (chosen.startsWith(BASE_CHOICE)) return baseNamed(chosen.slice(BASE_CHOICE.length));
  return baseNamed(state.adapterBases.get(chosen) || "");
}

// A base by name ("" or unknown: the default one), from GET /v1/bases.
function baseNamed(name) {
  return state.bases.find((b) => b.name === name) || state.bases.find((b) => b.default) || null;
}

// The forms' fields take their ranges, defaults and rules from the base they run on
// (GET /v1/bases): the fine-tune's chosen base, the generation's adapter's (or chosen) base.
// The page holds none of its own.
function applyBase() {
  const fields = [
    ["resolution", baseNamed($("base").value)],
    ["gen-size", generationBase()],
  ];
  for (const [id, base] of fields) {
    if (!base) continue;
    const { min, max } = base.sizes;
    Object.assign($(id), { min, max, step: base.size_multiple, placeholder: `${base.sizes.default} (native)` });
    $(id).title = `${base.name}: ${min}–${max} px, multiples of ${base.size_multiple}; empty: its native ${base.sizes.default} px`;
    $(id).dataset.base = base.name;
  }
  const base = baseNamed($("base").value);
  if (base?.finetune) {
    $("steps").placeholder = `${base.finetune.steps} (default)`;
    $("base-info").textContent = `${base.name}: family ${base.family}; a fine-tune trains `
      + `${base.finetune.steps} steps at ${base.finetune.resolution} px unless told otherwise.`;
  }
  applyGenerationRules(generationBase());
}

// A base's generation rules (GET /v1/bases `generation`): defaults as placeholders, and the
// fields its family does not use disabled (the API would refuse them by name).
function applyGenerationRules(base) {
  const rules = base?.generation;
  if (!rules) return;
  $("gen-steps").placeholder = `${rules.steps} (default)`;
  const guided = rules.guidance !== "none";
  Object.assign($("gen-guidance"), { disabled: !guided, placeholder: guided ? `${rules.guidance_scale} (default)` : "not used" });
  $("gen-guidance").title = rules.guidance_meaning;
  Object.assign($("gen-negative"), { disabled: !rules.negative_prompt });
  $("gen-negative").placeholder = rules.negative_prompt
    ? "optional: what the image should not show"
    : "not used by this base (its guidance has no negative pass)";
  $("gen-base-info").textContent = `${base.name} (${base.family}): ${rules.steps} steps, `
    + `guidance ${rules.guidance} (${rules.guidance_meaning}), scheduler ${rules.scheduler}`
    + `${rules.negative_prompt ? ", negative prompt accepted" : ""}.`;
  $("gen-base-info").dataset.base = base.name;
}
$("base").addEventListener("change", applyBase);
$("gen-adapter").addEventListener("change", applyBase);

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  useKey($("api-key").value.trim());
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem("tuneqdm.key");
  state.key = "";
  $("api-key").value = "";
  $("app").hidden = true;
  $("key-status").textContent = "Forgotten.";
  $("key-status").className = "muted";
});

// --- fine-tunes -----------------------------------------------------------------------------

$("photos").addEventListener("change", () => {
  const box = $("previews");
  box.replaceChildren();
  for (const file of $("photos").files) {
    const caption = el("figcaption", {}, file.name);
    const img = el("img", { src: URL.createObjectURL(file), alt: "" });
    img.addEventListener("error", () => { caption.textContent = `${file.name} (not readable here)`; });
    box.append(el("figure", {}, img, caption));
  }
});

$("finetune-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("finetune-error", null);
  const form = new FormData();
  for (const file of $("photos").files) form.append("images", file);
  form.append("instance_prompt", $("instance-prompt").value);
  if ($("ft-name").value) form.append("name", $("ft-name").value);
  if ($("base").value) form.append("base", $("base").value);
  const params = { method: $("method").value };
  // Unset: the base's own bit width (another one is refused).
  if ($("bits").value) params.bits = Number($("bits").value);
  if ($("steps").value) params.steps = Number($("steps").value);
  if ($("resolution").value) params.resolution = Number($("resolution").value);
  const prompts = $("validation-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  if (prompts.length) params.validation_prompts = prompts;
  if ($("sample-every").value) params.sample_every = Number($("sample-every").value);
  form.append("params", JSON.stringify(params));
  $("start-finetune").disabled = true;
  try {
    const job = await api("POST", "/v1/finetunes", form);
    await refreshFinetunes();
    watch(job.id);
  } catch (error) {
    showError("finetune-error", error);
  } finally {
    $("start-finetune").disabled = false;
  }
});

// What a job is doing (GET /v1/finetunes/{id} `phase`), with why it waits while queued.
const phaseText = (job) => (job.phase ? job.phase + (job.waiting_reason ? `: ${job.waiting_reason}` : "") : "");

async function refreshFinetunes() {
  const page = await api("GET", "/v1/finetunes?limit=10");
  $("finetunes").replaceChildren(...page.data.map((job) => el("tr", { "data-finetune": job.id },
    el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); watch(job.id); } },
      job.name || job.id)),
    el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)),
    el("td", { class: "phase" }, job.phase || ""),
    el("td", { class: "progress" }, `${job.progress.step}/${job.progress.total}`),
    el("td", {}, when(job.created_at)))));
}

function watch(id) {
  clearTimeout(state.timer);
  state.job = id;
  state.losses = [];
  state.smoothed = [];
  state.jobName = "";
  state.jobAdapter = null;
  state.eventCursor = null;
  for (const blob of state.sampleBlobs.values()) URL.revokeObjectURL(blob);
  state.sampleBlobs.clear();
  $("samples").replaceChildren();
  $("sample-prompts").textContent = "";
  $("samples-block").hidden = true;
  $("job").hidden = false;
  poll();
}

async function poll() {
  const id = state.job;
  let job;
  try {
    job = await api("GET", `/v1/finetunes/${id}`);
  } catch (error) {
    $("job-detail").textContent = error.message;
    return;
  }
  if (id !== state.job) return;
  const { step, total } = job.progress;
  // The table below the card moves with it: its row shows the same status, phase and step.
  await Promise.all([readEvents(id), refreshFinetunes().catch(() => {})]);
  if (id !== state.job) return;
  if (job.loss !== null && !state.losses.some(([s]) => s === step)) state.losses.push([step, job.loss]);
  state.losses.sort((a, b) => a[0] - b[0]);
  $("job-title").textContent = `${job.name || job.id} — ${job.instance_prompt}`;
  $("job-status").textContent = job.status;
  $("job-status").className = `badge ${job.status}`;
  $("job-phase").textContent = phaseText(job);
  state.jobName = job.name || "";
  state.jobAdapter = job.adapter_id;
  const bits = [`step ${step}/${total}`];
  if (job.loss !== null) bits.push(`loss ${job.loss.toFixed(4)}`);
  if (job.eta_seconds !== null) bits.push(`about ${Math.round(job.eta_seconds)} s left`);
  if (job.group_size) bits.push(`training with ${job.group_size - 1} other fine-tune(s)`);
  if (job.error) bits.push(job.error);
  if (job.adapter_id) bits.push(`adapter ${job.adapter_id}`);
  $("job-detail").textContent = bits.join(" · ");
  $("job-progress").max = total;
  $("job-progress").value = step;
  $("cancel-job").hidden = FINAL.includes(job.status);
  plotLoss($("loss-plot"), state.losses);
  await showSamples(id);
  if (FINAL.includes(job.status)) {
    await refreshAdapters();
    if (job.adapter_id) {
      $("gen-adapter").value = job.adapter_id;
      applyBase();  // a value set here fires no change event
    }
  } else {
    state.timer = setTimeout(poll, POLL_MS);
  }
}

// The loss history from the job's event log (its progress entries), read on from the last
// cursor: a job opened after it finished still gets its whole plot.
async function readEvents(id) {
  if (!state.hasEvents) return;
  let page;
  do {
    const after = state.eventCursor ? `&cursor=${encodeURIComponent(state.eventCursor)}` : "";
    try {
      page = await api("GET", `/v1/finetunes/${id}/events?limit=100${after}`);
    } catch (error) {
      if (error.status === 405 || (error.status === 404 && !error.message.includes(id))) state.hasEvents = false;
      return;
    }
    if (id !== state.job) return;
    for (const event of page.data) {
      const { step, loss } = event.data;
      if (event.type === "progress" && !state.losses.some(([s]) => s === step)) state.losses.push([step, loss]);
    }
    state.eventCursor = page.next_cursor;
  } while (page.has_more);
}

// Images rendered during training, where the service offers them.
async function showSamples(id) {
  if (!state.hasSamples) return;
  let page;
  try {
    page = await api("GET", `/v1/finetunes/${id}/samples`);
  } catch (error) {
    if (error.status === 404 || error.status === 405) state.hasSamples = false;
    return;
  }
  // One column per step, one image per validation prompt (top to bottom), same seeds at
  // every step: what changes from column to column is the training.
  const byStep = new Map();
  const prompts = [];
  for (const sample of page.data || []) {
    if (!state.sampleBlobs.has(sample.url)) state.sampleBlobs.set(sample.url, await imageUrl(sample.url));
    if (!byStep.has(sample.step)) byStep.set(sample.step, []);
    byStep.get(sample.step).push(sample);
    prompts[sample.prompt_index] = sample.prompt;
  }
  if (id !== state.job) return;
  $("samples").replaceChildren(...[...byStep].map(([step, samples]) => el("figure", { class: "step", "data-step": step },
    ...samples.map((s) => el("img", {
      src: state.sampleBlobs.get(s.url), "data-url": s.url, alt: s.prompt, title: `${s.prompt} (seed ${s.seed})`,
    })),
    el("figcaption", {}, step === 0 ? "step 0 (base)" : `step ${step}`))));
  $("sample-prompts").textContent = `top to bottom: ${prompts.map((p, i) => `${i + 1}. ${p}`).join(" · ")}`;
  $("samples-block").hidden = byStep.size === 0;
}

$("cancel-job").addEventListener("click", async () => {
  try {
    await api("POST", `/v1/finetunes/${state.job}/cancel`);
  } catch (error) {
    alert(error.message);
  }
});
$("delete-job").addEventListener("click", async () => {
  if (!confirm(deletePrompt("finetune", state.job, state.jobName, state.jobAdapter))) return;
  await remove("finetune", state.job);
  if (state.canDelete.finetune) {
    clearTimeout(state.timer);
    $("job").hidden = true;
    await Promise.all([refreshFinetunes(), refreshAdapters()]);
  }
});

// The exponential moving average of the reported losses (the first value starts it): one
// step's loss is noisy (its timestep and noise are drawn at random), the average shows the trend.
function smooth(points, alpha = EMA_ALPHA) {
  let average = null;
  return points.map(([s, l]) => {
    average = average === null ? l : alpha * l + (1 - alpha) * average;
    return [s, average];
  });
}

// The loss values seen while polling, a thin line, with their smoothed line drawn over them, on
// a canvas (no chart library).
function plotLoss(canvas, points) {
  state.smoothed = smooth(points);
  canvas.dataset.points = String(points.length);
  const ctx = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  const pad = 44;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#666";
  ctx.font = "11px sans-serif";
  if (points.length === 0) {
    ctx.fillText("loss: waiting for the first steps…", pad, h / 2);
    return;
  }
  const steps = points.map(([s]) => s);
  const losses = points.map(([, l]) => l);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  let [l0, l1] = [Math.min(...losses), Math.max(...losses)];
  if (l1 - l0 < 1e-9) { l0 -= 0.5; l1 += 0.5; }
  const x = (s) => pad + ((s - s0) / (s1 - s0)) * (w - 2 * pad);
  const y = (l) => h - pad - 10 - ((l - l0) / (l1 - l0)) * (h - 2 * pad);
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(pad, pad - 10, w - 2 * pad, h - 2 * pad);
  ctx.fillText(l1.toFixed(3), 2, pad - 6);
  ctx.fillText(l0.toFixed(3), 2, h - pad - 6);
  ctx.fillText(`step ${s0}`, pad, h - 4);
  ctx.fillText(`step ${s1}`, w - pad - 40, h - 4);
  const line = (series, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    series.forEach(([s, l], i) => (i ? ctx.lineTo(x(s), y(l)) : ctx.moveTo(x(s), y(l))));
    ctx.stroke();
  };
  line(points, "#93c5fd", 1);
  ctx.fillStyle = "#93c5fd";
  for (const [s, l] of points) ctx.fillRect(x(s) - 1.5, y(l) - 1.5, 3, 3);
  line(state.smoothed, "#dc2626", 3);
}

// --- adapters -------------------------------------------------------------------------------

async function refreshAdapters() {
  const page = await api("GET", "/v1/adapters?limit=50");
  $("adapters").replaceChildren(...page.data.map((a) => el("tr", { "data-adapter": a.id },
    el("td", {}, a.name ? `${a.name} ` : "", el("code", {}, a.id)),
    el("td", {}, `${a.method}, ${a.bits}-bit, ${a.intervals} interval(s)`),
    el("td", {}, kib(a.size_bytes)),
    el("td", {}, when(a.created_at)),
    el("td", {},
      el("button", { type: "button", class: "small", onclick: () => { $("gen-adapter").value = a.id; applyBase(); $("gen-prompt").focus(); } }, "Use"),
      " ",
      deleteButton("adapter", a.id, refreshAdapters, a.name || "")))));
  state.adapterBases = new Map(page.data.map((a) => [a.id, a.base_model]));
  fillGenerateChoices(page.data);
  applyBase();
}

// --- generations ----------------------------------------------------------------------------

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  // A new request: the previous one's status line and images go, whatever this one does.
  showError("generate-error", null);
  $("generate-status").textContent = "";
  $("generate-phase").textContent = "";
  for (const img of $("gen-images").querySelectorAll("img")) URL.revokeObjectURL(img.src);
  $("gen-images").replaceChildren();
  const chosen = $("gen-adapter").value;
  const body = { adapter_id: chosen.startsWith(BASE_CHOICE) ? null : chosen || null, prompt: $("gen-prompt").value };
  if (chosen.startsWith(BASE_CHOICE)) body.base = chosen.slice(BASE_CHOICE.length);
  if ($("gen-compare").checked) body.compare_base = true;
  body.num_images = Number($("gen-num").value || 1);
  if ($("gen-steps").value) body.steps = Number($("gen-steps").value);
  if ($("gen-guidance").value && !$("gen-guidance").disabled) body.guidance_scale = Number($("gen-guidance").value);
  if ($("gen-negative").value.trim() && !$("gen-negative").disabled) body.negative_prompt = $("gen-negative").value;
  if ($("gen-size").value) body.width = body.height = Number($("gen-size").value);
  if ($("gen-seed").value) body.seed = Number($("gen-seed").value);
  $("generate").disabled = true;
  try {
    let gen = await api("POST", "/v1/generations", body);
    $("generate-status").textContent = `${gen.id}: ${gen.status}…`;
    $("generate-phase").textContent = phaseText(gen);
    while (!FINAL.includes(gen.status)) {
      await new Promise((r) => setTimeout(r, POLL_MS / 2));
      gen = await api("GET", `/v1/generations/${gen.id}`);
      $("generate-status").textContent = `${gen.id}: ${gen.status}…`;
      $("generate-phase").textContent = phaseText(gen);
    }
    $("generate-status").textContent = `${gen.id}: ${gen.status}`;
    $("generate-phase").textContent = "";
    if (gen.status !== "succeeded") throw new Error(gen.error || `generation ${gen.status}`);
    await showGeneration(gen);
  } catch (error) {
    showError("generate-error", error);
  } finally {
    $("generate").disabled = false;
    await refreshGenerations();
  }
});

// The generation's images; with compare_base each adapter image with the base's of the same
// seed beside it (`base: true` in `images`).
async function showGeneration(gen) {
  const figures = [];
  const ours = gen.images.filter((i) => !i.base);
  const bases = new Map(gen.images.filter((i) => i.base).map((i) => [i.seed, i]));
  for (const image of ours) {
    const img = el("img", { src: await imageUrl(image.url), alt: gen.prompt, class: "generated" });
    const base = bases.get(image.seed);
    if (!base) {
      figures.push(el("figure", {}, img, el("figcaption", {}, `seed ${image.seed}`)));
      continue;
    }
    const baseImg = el("img", { src: await imageUrl(base.url), alt: `${gen.prompt} (base)`, class: "generated base" });
    figures.push(el("figure", { class: "pair", "data-seed": image.seed },
      el("div", {}, img, baseImg),
      el("figcaption", {}, `seed ${image.seed}: adapter | base`)));
  }
  $("gen-images").replaceChildren(...figures);
}

async function refreshGenerations() {
  let page;
  try {
    page = await api("GET", "/v1/generations?limit=10");
  } catch (_) {
    return; // a service without the list endpoint
  }
  $("generations").replaceChildren(...page.data.map((g) => el("tr", {},
    el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); showGeneration(g); } }, g.id)),
    el("td", {}, el("span", { class: `badge ${g.status}` }, g.status)),
    el("td", { class: "phase" }, g.phase || ""),
    el("td", {}, g.prompt),
    el("td", {}, deleteButton("generation", g.id, refreshGenerations)))));
}

// --- start ----------------------------------------------------------------------------------

discover().then(() => {
  if (state.key) {
    $("api-key").value = state.key;
    useKey(state.key);
  }
});
