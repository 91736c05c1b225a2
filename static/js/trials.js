// Trial runner for a just-noticeable-difference session (PAT paper, section 6 protocol):
// fixation, image 1 (first_ms), blank (blank_ms), image 2 (second_ms), then "same or different?".
//
// Timing. Both images of a trial are fetched and decoded (`img.decode()`) before the trial
// starts, so neither network nor decoding can delay a switch or hint at anything. Every switch
// happens inside a requestAnimationFrame callback: a phase ends at the first frame whose
// timestamp is at least (intended duration - half a frame) after the frame that started it,
// which picks the frame count closest to the intended duration. The measured duration of a
// phase is the difference between the rAF timestamps of the two switches; the frame interval
// is the median rAF interval measured before the first trial. Switching only toggles the CSS
// `visibility` of elements that are already laid out, so no switch causes layout work.
//
// Data. Each judgment is POSTed as soon as it is given, with an idempotency key, and retried
// with capped exponential backoff on network errors, 5xx and 429 (a retry with the same key
// can never store it twice). After the last trial the session is completed on the server,
// which only hands out the completion code when every trial has a stored judgment.

const FIXATION_MS = 500;
const INTER_TRIAL_MS = 300;
const FRAME_SAMPLES = 60;
const MAX_RESPONSE_MS = 10 * 60 * 1000; // the server refuses slower responses
const KEYS = { f: "same", j: "different" };

const root = document.getElementById("runner");
const ui = {
  progress: document.getElementById("progress"),
  stage: document.getElementById("stage"),
  fixation: document.getElementById("fixation"),
  prompt: document.getElementById("prompt"),
  ready: document.getElementById("ready"),
  begin: document.getElementById("begin"),
  status: document.getElementById("status"),
  buttons: [...document.querySelectorAll("#prompt button[data-response]")],
};

class FatalError extends Error {}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));
const show = (el, visible) => el.classList.toggle("is-visible", visible);

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------ server

function csrfToken() {
  const name = root.dataset.csrfCookie || "csrftoken";
  for (const part of document.cookie.split(";")) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return decodeURIComponent(value.join("="));
  }
  return root.dataset.csrfToken || "";
}

// One JSON request; network errors, 5xx and 429 are retried for as long as it takes (the
// participant sees a notice), anything else is returned as {status, data}.
async function api(url, { method = "GET", body } = {}) {
  let delay = 500;
  for (;;) {
    let response = null;
    try {
      response = await fetch(url, {
        method,
        credentials: "same-origin",
        cache: "no-store",
        headers: {
          Accept: "application/json",
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
          ...(method === "GET" ? {} : { "X-CSRFToken": csrfToken() }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      console.warn(`${method} ${url} failed:`, error);
    }
    if (response && response.status < 500 && response.status !== 429) {
      let data;
      try {
        data = await response.json();
      } catch {
        data = { error: `unexpected answer (HTTP ${response.status})` };
      }
      if (ui.status.dataset.retrying) {
        delete ui.status.dataset.retrying;
        setStatus("");
      }
      return { status: response.status, data };
    }
    ui.status.dataset.retrying = "1";
    setStatus("Connection problem: trying again… (your answers are kept)");
    await sleep(delay * (0.75 + Math.random() / 2));
    delay = Math.min(delay * 2, 15000);
  }
}

async function fetchState() {
  const { status, data } = await api(root.dataset.stateUrl);
  if (status !== 200) throw new FatalError(data.error || `could not load the session (${status})`);
  return data;
}

async function saveJudgment(judgment) {
  const { status, data } = await api(root.dataset.judgmentsUrl, { method: "POST", body: judgment });
  if (status === 200 || status === 201) return;
  if (status === 409) {
    // Already answered (e.g. in another tab): the first stored answer stands.
    console.warn("judgment not stored:", data.error);
    return;
  }
  throw new FatalError(`Your answer could not be saved: ${data.error || status}`);
}

// ------------------------------------------------------------------------------ display

// Median interval between rAF callbacks, in ms (robust to the odd late frame).
async function measureFrameInterval(samples = FRAME_SAMPLES) {
  let previous = await nextFrame();
  const intervals = [];
  while (intervals.length < samples) {
    const now = await nextFrame();
    intervals.push(now - previous);
    previous = now;
  }
  intervals.sort((a, b) => a - b);
  return { frameMs: intervals[Math.floor(intervals.length / 2)], samples: intervals.length };
}

function sendClientInfo({ frameMs, samples }) {
  const info = {
    window_width: window.innerWidth,
    window_height: window.innerHeight,
    screen_width: window.screen.width,
    screen_height: window.screen.height,
    device_pixel_ratio: window.devicePixelRatio,
    frame_ms: Math.round(frameMs * 1000) / 1000,
    refresh_hz: Math.round((1000 / frameMs) * 100) / 100,
    frame_samples: samples,
  };
  api(root.dataset.stateUrl, { method: "PATCH", body: info }).then(({ status, data }) => {
    if (status !== 200) console.warn("client info not stored:", data.error);
  });
}

async function loadImage(url) {
  const img = new Image();
  img.alt = "";
  img.decoding = "sync";
  img.src = url;
  await img.decode(); // rejects if the image cannot be fetched or decoded
  img.width = img.naturalWidth;
  img.height = img.naturalHeight;
  return img;
}

async function loadTrialImages(trial) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await Promise.all(trial.images.map(loadImage));
    } catch (error) {
      if (attempt >= 5) throw new FatalError("The images could not be loaded. Please reload.");
      setStatus("Loading the images is slow: trying again…");
      await sleep(500 * 2 ** attempt);
    }
  }
}

let hiddenDuringTrial = false;
document.addEventListener("visibilitychange", () => {
  if (document.hidden) hiddenDuringTrial = true;
});

// Show fixation → image 1 → blank → image 2 → prompt, switching in rAF callbacks.
// Resolves {first_ms, blank_ms, second_ms, promptAt} (rAF timestamps), or {interrupted: true}
// when the page was hidden meanwhile (rAF stops then, so the durations would be meaningless).
function present(first, second, study, frameMs) {
  const halfFrame = frameMs / 2;
  const phases = [
    { ms: FIXATION_MS, enter: () => show(ui.fixation, true) },
    { ms: study.first_ms, enter: () => { show(ui.fixation, false); show(first, true); } },
    { ms: study.blank_ms, enter: () => show(first, false) },
    { ms: study.second_ms, enter: () => show(second, true) },
    { ms: Infinity, enter: () => { show(second, false); openPrompt(true); } },
  ];
  const startedAt = [];
  hiddenDuringTrial = false;
  return new Promise((resolve) => {
    let current = -1;
    function onFrame(timestamp) {
      if (hiddenDuringTrial) {
        for (const el of [ui.fixation, first, second]) show(el, false);
        resolve({ interrupted: true });
        return;
      }
      if (current < 0) {
        current = 0;
        phases[0].enter();
        startedAt[0] = timestamp;
      }
      // A zero-length phase (blank_ms = 0) is entered and left in the same frame.
      while (current < phases.length - 1 && timestamp - startedAt[current] >= phases[current].ms - halfFrame) {
        current += 1;
        phases[current].enter();
        startedAt[current] = timestamp;
      }
      if (current === phases.length - 1) {
        resolve({
          first_ms: startedAt[2] - startedAt[1],
          blank_ms: startedAt[3] - startedAt[2],
          second_ms: startedAt[4] - startedAt[3],
          promptAt: startedAt[4],
        });
      } else {
        requestAnimationFrame(onFrame);
      }
    }
    requestAnimationFrame(onFrame);
  });
}

// ------------------------------------------------------------------------------ responses

let answerWaiter = null; // set while the prompt accepts an answer

function openPrompt(open) {
  show(ui.prompt, open);
  ui.prompt.setAttribute("aria-hidden", String(!open));
  for (const button of ui.buttons) button.disabled = !open;
}

function answer(response, timeStamp) {
  if (!answerWaiter) return;
  const resolve = answerWaiter;
  answerWaiter = null;
  openPrompt(false);
  resolve({ response, at: timeStamp });
}

function waitForAnswer() {
  return new Promise((resolve) => {
    answerWaiter = resolve;
  });
}

document.addEventListener("keydown", (event) => {
  const response = KEYS[event.key.toLowerCase()];
  if (!response || event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
  event.preventDefault();
  answer(response, event.timeStamp);
});
for (const button of ui.buttons) {
  button.addEventListener("click", (event) => {
    button.blur();
    answer(button.dataset.response, event.timeStamp);
  });
}

function waitForBegin() {
  show(ui.ready, true);
  ui.begin.disabled = false;
  ui.begin.focus();
  return new Promise((resolve) => {
    const go = (event) => {
      if (event.type === "keydown" && event.key !== " ") return;
      event.preventDefault();
      document.removeEventListener("keydown", go);
      ui.begin.removeEventListener("click", go);
      ui.begin.disabled = true;
      ui.begin.blur();
      show(ui.ready, false);
      resolve();
    };
    document.addEventListener("keydown", go);
    ui.begin.addEventListener("click", go);
  });
}

// ------------------------------------------------------------------------------ session

function placeImages(first, second) {
  const width = Math.max(first.width, second.width);
  const height = Math.max(first.height, second.height);
  ui.stage.style.width = `${width}px`;
  ui.stage.style.height = `${height}px`;
  ui.stage.replaceChildren(ui.fixation, first, second);
}

async function runTrial(trial, study, frameMs) {
  const [first, second] = await loadTrialImages(trial);
  first.dataset.slot = "1";
  second.dataset.slot = "2";
  setStatus("");
  placeImages(first, second);
  for (;;) {
    await nextFrame(); // the new images are laid out before the fixation starts
    const shown = await present(first, second, study, frameMs);
    if (shown.interrupted) {
      setStatus("The page was hidden, so that pair will be shown again.");
      while (document.hidden) await sleep(200);
      await sleep(1000);
      setStatus("");
      continue;
    }
    const { response, at } = await waitForAnswer();
    const responseTime = at - shown.promptAt;
    if (responseTime > MAX_RESPONSE_MS) {
      setStatus("That took a while, so the pair will be shown again.");
      await sleep(1500);
      setStatus("");
      continue;
    }
    return {
      position: trial.position,
      response,
      response_time_ms: Math.max(0, responseTime),
      durations: { first_ms: shown.first_ms, blank_ms: shown.blank_ms, second_ms: shown.second_ms },
      idempotency_key: crypto.randomUUID(),
    };
  }
}

async function complete() {
  const { status, data } = await api(root.dataset.completeUrl, { method: "POST", body: {} });
  if (status === 200) return true;
  if (status === 409) return false; // some judgment is missing: run what is left again
  throw new FatalError(data.error || `could not finish the session (${status})`);
}

async function main() {
  let state = await fetchState();
  if (state.completed) {
    window.location.replace(root.dataset.doneUrl);
    return;
  }
  ui.progress.textContent = "Preparing…";
  const display = await measureFrameInterval();
  sendClientInfo(display);
  root.dataset.frameMs = String(display.frameMs);
  ui.progress.textContent = state.study.title;
  await waitForBegin();

  for (let round = 0; round < 3; round++) {
    const total = state.trials.length;
    const open = state.trials.filter((t) => !t.answered);
    let saving = Promise.resolve();
    for (const trial of open) {
      ui.progress.textContent = `Pair ${total - open.length + open.indexOf(trial) + 1} of ${total}`;
      const judgment = await runTrial(trial, state.study, display.frameMs);
      await saving; // the previous answer must be stored before the next one is sent
      saving = saveJudgment(judgment);
      await sleep(INTER_TRIAL_MS);
    }
    await saving;
    ui.progress.textContent = "Saving…";
    if (await complete()) {
      window.location.assign(root.dataset.doneUrl);
      return;
    }
    state = await fetchState();
  }
  throw new FatalError("Some answers could not be saved. Please reload the page.");
}

main().catch((error) => {
  console.error(error);
  openPrompt(false);
  const message = error instanceof FatalError ? error.message : `Something went wrong (${error}).`;
  setStatus(`${message} Your saved answers are kept; reloading continues where you left off.`, true);
});
