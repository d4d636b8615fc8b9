// The convserve page: a client of the server's public REST routes, nothing more.
//   GET  /v1/models                                      every model, its versions and their states
//   POST /v1/models/{model}/versions/{version}:explain   top-k, the model's input, heat maps, block maps
// With --auth-token-file every call carries "Authorization: Bearer <token>"; the token is asked for
// once and kept in this tab's session storage, never in a URL.

const TOKEN_KEY = "convserve-token";
// The heat colours of serving.core.pictures.HEAT_STOPS: the CLI's overlays and this page agree.
const HEAT_STOPS = [
  [0.0, 0, 0, 128],
  [0.35, 0, 90, 255],
  [0.6, 255, 40, 0],
  [0.85, 255, 200, 0],
  [1.0, 255, 255, 160],
];
const TOP_K = 5;

// `ticket` numbers the explain calls: only the newest one's answer is drawn (an older one may come last).
const state = { models: [], choice: null, bytes: null, answer: null, method: "cam", ticket: 0 };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  let body = {};
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    body = { error: text.slice(0, 300) };
  }
  if (!response.ok) throw new ApiError(response.status, body.error || `${response.status} ${response.statusText}`);
  return { body, response };
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function askForToken(why) {
  $("token-why").textContent = why;
  $("token-panel").hidden = false;
  $("token-input").focus();
}

// ---- models ----

function describeInput(input) {
  if (!input || !input.height) return "—";
  const mode = input.color_mode === "L" ? "greyscale" : `colour (${input.channel_order || "RGB"})`;
  return `${input.height} × ${input.width} ${mode}, ${input.resize || "stretch"}`;
}

function describeTraining(metadata) {
  if (!metadata) return "—";
  const parts = [];
  if (metadata.dataset) parts.push(`dataset ${metadata.dataset}`);
  if (metadata.test_accuracy) parts.push(`test accuracy ${(100 * Number(metadata.test_accuracy)).toFixed(2)} %`);
  if (metadata.precision) parts.push(`precision ${metadata.precision}`);
  return parts.length ? parts.join(", ") : "—";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderModels() {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  const select = $("model-select");
  select.replaceChildren();
  for (const model of state.models) {
    const versions = model.version_states && model.version_states.length
      ? model.version_states
      : [{ version: model.version, state: model.state, reason: model.reason }];
    for (const version of versions) {
      const loaded = version.version === model.version && model.input;
      const row = body.insertRow();
      row.dataset.model = model.name;
      row.dataset.version = version.version;
      cell(row, model.name);
      cell(row, String(version.version));
      cell(row, version.reason ? `${version.state}: ${version.reason}` : version.state, `state ${version.state}`);
      cell(row, loaded ? describeInput(model.input) : "—");
      const labels = loaded ? model.labels || [] : [];
      cell(row, labels.length ? `${labels.length}: ${labels.slice(0, 10).join(", ")}${labels.length > 10 ? ", …" : ""}` : "—");
      cell(row, loaded ? describeTraining(model.metadata) : "—");
      cell(row, loaded ? (model.explain_methods || []).join(", ") : "—");
      if (version.state === "READY" && loaded) {
        const option = new Option(`${model.name} version ${version.version}`, `${model.name}\n${version.version}`);
        select.add(option);
      }
    }
  }
  $("models").hidden = false;
  const ready = select.options.length;
  $("models-status").textContent = ready
    ? `${state.models.length} model(s); ${ready} version(s) ready.`
    : "No version is ready to classify: see the states below.";
  $("file").disabled = !ready;
  chooseModel();
}

function chooseModel() {
  const [name, version] = ($("model-select").value || "").split("\n");
  const model = state.models.find((m) => m.name === name);
  state.choice = model ? { model, version: Number(version) } : null;
  const offered = model ? model.explain_methods || [] : [];
  for (const radio of document.querySelectorAll("input[name=method]")) {
    radio.disabled = !offered.includes(radio.value);
  }
  $("methods-why").textContent = model && !offered.includes("cam")
    ? "No class activation map: this version has no explain graph (explain.onnx); occlusion works for any model."
    : "";
  if (!offered.includes(state.method) && offered.length) state.method = offered[0];
  for (const radio of document.querySelectorAll("input[name=method]")) radio.checked = radio.value === state.method;
}

async function loadModels() {
  try {
    const { body } = await api("/v1/models");
    state.models = body.models || [];
    $("token-panel").hidden = true;
    showError("");
    renderModels();
  } catch (error) {
    $("models-status").textContent = "Nothing loads until the server answers.";
    if (error.status === 401 || error.status === 403) {
      const had = sessionStorage.getItem(TOKEN_KEY);
      askForToken(had
        ? `The server refused the token (${error.message}). Enter the right one.`
        : "This server asks for a bearer token (it runs with --auth-token-file), so nothing loads " +
          "without one. Enter it once: it is kept in this tab's session storage, never in the address.");
    }
    showError(error.message);
  }
}

// ---- classify and explain ----

function decodeBase64(text) {
  const raw = atob(text || "");
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function floats(tensor) {
  const bytes = decodeBase64(tensor.data);
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(bytes.length / 4);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(4 * i, true); // little-endian on the wire
  return values;
}

function drawPixels(canvas, tensor) {
  const [height, width, channels] = tensor.shape.map(Number);
  const bytes = decodeBase64(tensor.data);
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    for (let c = 0; c < 3; c++) image.data[4 * i + c] = bytes[i * channels + (channels === 1 ? 0 : c)];
    image.data[4 * i + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

function heatColour(value) {
  for (let s = 1; s < HEAT_STOPS.length; s++) {
    const [x1, ...c1] = HEAT_STOPS[s];
    const [x0, ...c0] = HEAT_STOPS[s - 1];
    if (value <= x1) {
      const t = x1 === x0 ? 0 : (value - x0) / (x1 - x0);
      return c0.map((v, i) => Math.round(v + t * (c1[i] - v)));
    }
  }
  return HEAT_STOPS[HEAT_STOPS.length - 1].slice(1);
}

function drawHeat(canvas, tensor) {
  const [height, width] = tensor.shape.map(Number);
  const values = floats(tensor);
  const top = values.reduce((a, b) => Math.max(a, b), 0);
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  values.forEach((value, i) => {
    const [r, g, b] = heatColour(top > 0 ? Math.max(value, 0) / top : 0);
    image.data.set([r, g, b, 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
  return top;
}

function renderClasses(image) {
  const list = $("classes");
  list.replaceChildren();
  const result = image.result;
  result.class_index.forEach((index, rank) => {
    const probability = result.probability[rank];
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "class";
    button.dataset.classIndex = index;
    button.setAttribute("aria-pressed", String(index === image.class_index));
    button.textContent = result.label[rank];
    button.addEventListener("click", () => explain(index));
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * probability).toFixed(1)}%`;
    const value = document.createElement("span");
    value.className = "probability";
    value.textContent = `${(100 * probability).toFixed(2)} %`;
    item.append(button, bar, value);
    list.append(item);
  });
  const abstain = $("abstain");
  abstain.hidden = !result.abstain;
  abstain.textContent = result.abstain
    ? `The model abstains: its score ${Number(result.score).toFixed(3)} is below the threshold set at ` +
      "export, so this image may be unlike anything it was trained on."
    : "";
}

function renderWhy() {
  const image = state.answer && state.answer.images[0];
  if (!image) return;
  const maps = Object.fromEntries((image.maps || []).map((m) => [m.method, m.map]));
  const method = maps[state.method] ? state.method : Object.keys(maps)[0];
  const heat = $("heat");
  heat.dataset.method = method || "";
  if (method) {
    const top = drawHeat(heat, maps[method]);
    heat.dataset.max = String(top);
    $("heat-caption").textContent = method === "cam"
      ? `Grad-CAM of “${image.label}” over the last conv block: pale yellow is the strongest evidence (${top.toPrecision(3)}).`
      : `Occlusion for “${image.label}”: how much its probability drops when a patch there is covered (at most ${(100 * top).toFixed(1)} points).`;
  }
  $("why").hidden = false;
}

function renderBlocks(image) {
  const blocks = $("blocks");
  blocks.replaceChildren();
  for (const block of image.blocks || []) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${block.grid_png}`;
    img.alt = `Activation maps of block ${block.block}`;
    const caption = document.createElement("figcaption");
    caption.textContent = block.caption;
    figure.append(img, caption);
    blocks.append(figure);
  }
  if (!blocks.children.length) {
    blocks.textContent = "This version has no explain graph, so its activation maps cannot be shown.";
  }
}

// The answer's receipt: where the server's time went, and the batches the image ran in.
function receiptText(receipt) {
  if (!receipt) return "";
  const ms = (value) => `${Number(value || 0).toFixed(1)} ms`;
  const sizes = (receipt.batch_sizes || []).join(", ");
  return ` (decode ${ms(receipt.decode_ms)}, queue ${ms(receipt.queue_ms)}, compute ` +
    `${ms(receipt.compute_ms)}, other ${ms(receipt.other_ms)}; batches of ${sizes || "—"})`;
}

function render(answer, timing, elapsed) {
  const image = answer.images[0];
  if (image.result && image.result.error) {
    $("result").hidden = true;
    $("why").hidden = true;
    showError(image.result.error.message);
    return;
  }
  showError("");
  state.answer = answer;
  drawPixels($("seen"), image.model_input);
  drawPixels($("base"), image.model_input);
  const [height, width] = image.model_input.shape;
  $("seen-caption").textContent = `As the model sees it: ${height} × ${width}, after the server's resize`;
  renderClasses(image);
  const server = /total;dur=([\d.]+)/.exec(timing || "");
  $("timings").textContent = `Server: ${server ? `${Number(server[1]).toFixed(1)} ms` : "—"}` +
    `${receiptText(answer.receipt)}; round trip in this browser: ${elapsed.toFixed(1)} ms ` +
    `(model ${answer.model} version ${answer.version}).`;
  $("explained").textContent = `Why “${image.label}” (class ${image.class_index}):`;
  $("result").hidden = false;
  renderWhy();
  renderBlocks(image);
}

async function explain(classIndex) {
  if (!state.choice || !state.bytes) return;
  const { model, version } = state.choice;
  const params = new URLSearchParams();
  const offered = model.explain_methods || [];
  offered.forEach((m) => params.append("method", m));
  if (offered.includes("cam")) {
    params.set("activations", "true");
    params.set("activation_grids", "true");
  }
  params.set("top_k", String(Math.min(TOP_K, (model.labels || []).length || TOP_K)));
  if (classIndex !== undefined) params.set("class_index", String(classIndex));
  const path = `/v1/models/${encodeURIComponent(model.name)}/versions/${version}:explain?${params}`;
  const ticket = ++state.ticket;
  document.body.setAttribute("aria-busy", "true");
  try {
    const started = performance.now();
    const { body, response } = await api(path, {
      method: "POST",
      body: state.bytes,
      headers: { "Content-Type": "application/octet-stream" },
    });
    if (ticket !== state.ticket) return; // a newer image or class was asked for meanwhile
    render(body, response.headers.get("Server-Timing"), performance.now() - started);
  } catch (error) {
    if (ticket !== state.ticket) return;
    $("result").hidden = true;
    $("why").hidden = true;
    showError(error.message);
    if (error.status === 401 || error.status === 403) askForToken(`The server refused the call: ${error.message}`);
  } finally {
    document.body.removeAttribute("aria-busy");
  }
}

async function useFile(file) {
  if (!file) return;
  state.bytes = new Uint8Array(await file.arrayBuffer());
  const sent = $("sent");
  if (sent.src) URL.revokeObjectURL(sent.src);
  sent.src = URL.createObjectURL(file);
  $("sent-caption").textContent = `As sent: ${file.name || "pasted image"}, ${state.bytes.length} bytes`;
  await explain();
}

function setOpacity() {
  $("heat").style.opacity = String(Number($("opacity").value) / 100);
}

function wire() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    loadModels();
  });
  $("model-select").addEventListener("change", () => {
    chooseModel();
    explain();
  });
  $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])][0];
    if (file) useFile(file);
  });
  for (const radio of document.querySelectorAll("input[name=method]")) {
    radio.addEventListener("change", () => {
      state.method = radio.value;
      renderWhy();
    });
  }
  $("opacity").addEventListener("input", setOpacity);
  setOpacity();
}

wire();
loadModels();
