// Trial runner of every protocol (studyapp.protocols; the study's `protocol` block of the session
// state, absent for JND):
// - jnd: fixation, image 1 (first_ms), blank (blank_ms), image 2 (second_ms), then "same or
//   different?" (PAT paper, section 6 protocol);
// - rating with pairs: the same sequence, then buttons 1..N (digit keys);
// - 2afc: fixation, then the reference in the middle and copies left and right, all three
//   together for first_ms, then "left or right?";
// - label and single-image rating: fixation, the image for first_ms, then the answer buttons
//   (digit keys 1..9 for the first nine).
// The same rAF switching, timing measurement, pixel-exact drawing and buffer serve them all: a
// protocol is only its images, its phases (each measured from frame timestamps) and its answers.
//
// Steps: refuse touch-only devices → measure the display → choose the pixel scale (below) →
// refuse a window smaller than the stimulus (re-checked on every resize, and before every
// trial) → instructions with two example pairs (first visit only) →
// practice trials with feedback → main trials, with a break every `break_every` of them → wait
// until the server has acknowledged every answer → complete the session → end page.
//
// Timing. Both images of a trial are fetched and decoded (`img.decode()`) before the trial
// starts, so neither network nor decoding can delay a switch or hint at anything (the next
// trial's images are fetched while the participant answers the current one). Every switch
// happens inside a requestAnimationFrame callback: a phase ends at the first frame whose
// timestamp is at least (intended duration - half a frame) after the frame that started it,
// which picks the frame count closest to the intended duration. The measured duration of a
// phase is the difference between the rAF timestamps of the two switches; the frame interval
// is the median rAF interval measured before the first trial. Switching only toggles the CSS
// `visibility` of elements that are already laid out, so no switch causes layout work, and no
// request is started while a stimulus is on screen (retries wait for the prompt).
//
// Pixel-exact display (issue 17). Each image pixel is drawn as an n×n block of device pixels,
// with no smoothing: the image's CSS size is natural × n / devicePixelRatio (Chromium lays out
// and snaps at device resolution, so that is a whole number of device pixels on the device
// grid), with `image-rendering: pixelated` for n > 1. The study states n (`display_scale`),
// or 0 for the image's own CSS size, i.e. n = devicePixelRatio; when that is not whole (Windows
// at 125 %, a browser zoom) the study's `display_rule` says what to do: "nearest" (draw at the
// nearest whole n; the server flags the session as rescaled), "reset_zoom" (ask, and wait
// until the ratio is whole) or "refuse". After layout the runner asks the browser how many
// device pixels each image covers (ResizeObserver, device-pixel-content-box); each judgment
// carries {scale: n, device_pixel_ratio, exact}, exact = false meaning resampled. A change of
// the ratio (zoom, window moved to another screen) is watched with a matchMedia resolution
// query: a pair on screen at that moment is shown again, at the new scale.
//
// Data (see buffer.js). Each judgment is written to localStorage and POSTed at once with an
// idempotency key, retried with backoff until the server acknowledges it. A reload resumes at
// the next trial that is neither stored on the server nor buffered locally, and re-sends the
// buffer. The session is completed (and the end page shown) only once the buffer is empty.

import {
  Outbox, backoffDelay, isRetryable, newKey, offline, request, retryPause, sleep,
} from "./buffer.js";

const FIXATION_MS = 500;
const INTER_TRIAL_MS = 300;
const FEEDBACK_MS = 1500;
const FRAME_SAMPLES = 60;
const MAX_RESPONSE_MS = 10 * 60 * 1000; // the server refuses slower responses
// Room the runner needs around the stimulus: progress line, prompt, status, gaps, padding (px).
const MARGIN_WIDTH = 32;
const MARGIN_HEIGHT = 240;

const root = document.getElementById("runner");
const $ = (id) => document.getElementById(id);
const ui = {
  displayDetail: $("display-detail"),
  progress: $("progress"),
  stage: $("stage"),
  fixation: $("fixation"),
  prompt: $("prompt"),
  panel: $("panel"),
  panelText: $("panel-text"),
  continue: $("continue"),
  feedback: $("feedback"),
  status: $("status"),
  tooSmallDetail: $("too-small-detail"),
  introPractice: $("intro-practice"),
  introStart: $("intro-start"),
  buttons: [...document.querySelectorAll("#prompt button[data-response]")],
};
// Between the images of a 2AFC triplet (CSS px): apart enough to be three images, close
// enough to compare at a glance.
const TRIPLET_GAP_PX = 24;
const csrf = { cookie: root.dataset.csrfCookie, token: root.dataset.csrfToken };

class FatalError extends Error {}
// The display was refused (the study's display_rule "refuse"): the page already says why.
class DisplayRefused extends Error {}

let settings = null; // state.study, once loaded
let scaledStimulus = { width: 0, height: 0 }; // state.stimulus: the largest image, image pixels
// The protocol's trial (state.study.protocol; JND when absent, as it was before protocols).
let spec = null;
function trialSpec(study) {
  if (study.protocol) return study.protocol;
  return {
    protocol: "jnd", n_images: 2, phases: ["first_ms", "blank_ms", "second_ms"],
    question: "Same or different?", answers: ["same", "different"],
    keys: { [study.key_same]: "same", [study.key_different]: "different" }, feedback: true,
  };
}
// Images shown one after the other (jnd, rating pairs) or all at once (2afc, one image).
const sequential = () => spec.phases.length === 3;
// What a trial is called to the participant ("pair" for JND, as before protocols).
const trialNoun = () => (spec.protocol === "jnd" || (spec.protocol === "rating" && spec.n_images === 2) ? "pair" : "trial");

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));
const show = (el, visible) => el.classList.toggle("is-visible", visible);
const setStep = (step) => (root.dataset.step = step);

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------ presentation state

// While a stimulus is on screen nothing else may start (requests, retries): `idle()` waits.
const presentation = {
  active: false,
  waiters: [],
  begin() {
    this.active = true;
  },
  end() {
    this.active = false;
    for (const resolve of this.waiters.splice(0)) resolve();
  },
  idle() {
    return this.active ? new Promise((resolve) => this.waiters.push(resolve)) : Promise.resolve();
  },
};

// ------------------------------------------------------------------------------ server

// "Connection problem" is shown while the outbox or any other request is being retried.
const CONNECTION_PROBLEM =
  "Connection problem: your answers are kept and will be sent when it is back.";
const retrying = new Set();
// The browser says so at once when the network goes: say so too, and clear it when it is back
// (every waiting retry then runs at once: buffer.js retryPause).
window.addEventListener("offline", () => {
  if (!ui.status.classList.contains("error")) {
    setStatus("Connection problem: no network. Waiting for it to come back…");
  }
});
window.addEventListener("online", () => {
  if (!ui.status.classList.contains("error") && retrying.size === 0) setStatus("");
});
function showRetrying(source, on) {
  const before = retrying.size > 0;
  if (on) retrying.add(source);
  else retrying.delete(source);
  if (retrying.size > 0 && !before) {
    setStatus(CONNECTION_PROBLEM);
  } else if (retrying.size === 0 && before && !ui.status.classList.contains("error")) {
    setStatus("");
  }
}

// A request that is retried (backoff with jitter) on network errors, 5xx and 429.
async function persistent(url, options = {}) {
  for (let attempt = 1; ; attempt++) {
    const result = await request(url, { ...options, csrf });
    if (!isRetryable(result.status)) {
      if (attempt > 1) showRetrying(url, false);
      return result;
    }
    showRetrying(url, true);
    await retryPause(backoffDelay(attempt, result.retryAfterMs));
    await presentation.idle();
  }
}

async function fetchState() {
  const { status, data } = await persistent(root.dataset.stateUrl);
  if (status !== 200) throw new FatalError(data.error || `could not load the session (${status})`);
  return data;
}

const outbox = new Outbox(root.dataset.judgmentsUrl, root.dataset.token, {
  csrf,
  idle: () => presentation.idle(),
  onRetrying: (on) => showRetrying("outbox", on),
  onRejected: (body, status, data) =>
    setStatus(`An answer could not be saved (${data.error || status}).`, true),
});

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

let measuredFrames = null; // the rAF measurement, kept for later client-info PATCHes
function sendClientInfo({ frameMs, samples } = measuredFrames, extra = {}) {
  measuredFrames = { frameMs, samples };
  const info = {
    ...extra,
    window_width: window.innerWidth,
    window_height: window.innerHeight,
    screen_width: window.screen.width,
    screen_height: window.screen.height,
    device_pixel_ratio: window.devicePixelRatio,
    frame_ms: Math.round(frameMs * 1000) / 1000,
    refresh_hz: Math.round((1000 / frameMs) * 100) / 100,
    frame_samples: samples,
    webdriver: navigator.webdriver === true,
    ...signals,
  };
  return persistent(root.dataset.stateUrl, { method: "PATCH", body: info }).then(({ status, data }) => {
    if (status !== 200) console.warn("client info not stored:", data.error);
  });
}

// ------------------------------------------------------------------------------ pixel scale

// A ratio this close to a whole number counts as whole (studyapp.display.WHOLE_TOLERANCE).
const isWhole = (ratio) => Math.abs(ratio - Math.round(ratio)) < 1e-3;

// The device pixels per image pixel to draw at the current ratio, or {n: null} when the study's
// rule does not allow drawing now ("reset_zoom", "refuse").
function pixelScale(study, ratio = window.devicePixelRatio) {
  if (study.display_scale > 0) return { n: study.display_scale, ratio };
  if (isWhole(ratio)) return { n: Math.max(1, Math.round(ratio)), ratio };
  if (study.display_rule === "nearest") return { n: Math.max(1, Math.round(ratio)), ratio, rescaled: true };
  return { n: null, ratio, rule: study.display_rule };
}

// CSS pixels of `natural` image pixels drawn at `n` device pixels each.
const cssPixels = (natural, n) => (natural * n) / window.devicePixelRatio;

// Zoom watch: `display.changed` is set when the ratio changes. Browsers announce it through a
// resolution media query (re-armed for each new ratio) and a resize; the ratio is also read on
// every frame of a presentation and twice a second while waiting for a whole ratio, because an
// emulated change (DevTools, CDP) announces nothing.
const display = { changed: false, ratio: window.devicePixelRatio, listeners: new Set() };
function noteRatio() {
  if (window.devicePixelRatio === display.ratio) return;
  display.ratio = window.devicePixelRatio;
  signals.zoom_changes += 1;
  display.changed = true;
  for (const listener of display.listeners) listener();
}
function watchRatio() {
  const query = window.matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`);
  query.addEventListener("change", () => {
    noteRatio();
    watchRatio();
  }, { once: true });
}
window.addEventListener("resize", noteRatio);

// Resolves the scale to draw at, waiting (rule "reset_zoom") for a whole ratio; with the rule
// "refuse" a ratio that is not whole ends the session here (FatalError, after telling the server).
async function ensurePixelScale(study, resumeStep) {
  let scale = pixelScale(study);
  if (scale.n !== null) return scale;
  if (scale.rule === "refuse") {
    setStep("display-refused");
    await sendClientInfo(measuredFrames, { display_refused: true });
    throw new DisplayRefused();
  }
  setStep("reset-zoom");
  let poll = null;
  await new Promise((resolve) => {
    const check = () => {
      scale = pixelScale(study);
      ui.displayDetail.textContent =
        `Your screen now shows ${window.devicePixelRatio.toFixed(2)} screen pixels per page pixel ` +
        `(${Math.round(window.devicePixelRatio * 100)}% scaling); this study needs a whole ` +
        "number (100% or 200%).";
      if (scale.n !== null) {
        display.listeners.delete(check);
        window.removeEventListener("resize", check);
        resolve();
      }
    };
    poll = setInterval(noteRatio, 500);
    display.listeners.add(check);
    window.addEventListener("resize", check);
    check();
  }).finally(() => clearInterval(poll));
  setStep(resumeStep);
  return scale;
}

// Device pixels the browser gives `el` (ResizeObserver device-pixel-content-box), or null where
// the browser cannot say.
function devicePixelSize(el) {
  if (!("ResizeObserver" in window) || !("devicePixelContentBoxSize" in ResizeObserverEntry.prototype)) {
    return Promise.resolve(null);
  }
  return new Promise((resolve) => {
    const observer = new ResizeObserver((entries) => {
      observer.disconnect();
      const box = entries[0].devicePixelContentBoxSize?.[0];
      resolve(box ? { width: box.inlineSize, height: box.blockSize } : null);
    });
    try {
      observer.observe(el, { box: "device-pixel-content-box" });
    } catch {
      resolve(null);
    }
  });
}

// true: every image covers exactly natural × n device pixels; false: resampled; null: unknown.
async function drawnExactly(images, n) {
  const sizes = await Promise.all(images.map(devicePixelSize));
  if (sizes.some((size) => size === null)) return null;
  return images.every((img, i) =>
    sizes[i].width === img.naturalWidth * n && sizes[i].height === img.naturalHeight * n);
}

// ------------------------------------------------------------------------------ touch-only devices

// A phone or tablet without mouse or keyboard: no fine pointer, no hover, touch points. (A
// keyboard cannot be detected; a touch screen with a mouse or touchpad passes.)
function touchOnly() {
  const query = (q) => window.matchMedia(q).matches;
  return navigator.maxTouchPoints > 0 && !query("(any-pointer: fine)") && !query("(any-hover: hover)");
}

// The window must hold the stimulus at its drawn size plus the runner around it. Until it
// does, a message says so; it is re-checked on every resize.
// The stage's size in CSS px: one image, or a 2AFC triplet side by side.
function stageWidth(stimulus, n) {
  if (spec.protocol !== "2afc") return Math.ceil(cssPixels(stimulus.width, n));
  return 3 * Math.ceil(cssPixels(stimulus.width, n)) + 2 * TRIPLET_GAP_PX;
}

function windowFits(stimulus) {
  const n = pixelScale(settings).n || 1;
  const need = {
    width: stageWidth(stimulus, n) + MARGIN_WIDTH,
    height: Math.ceil(cssPixels(stimulus.height, n)) + MARGIN_HEIGHT,
  };
  const fits = window.innerWidth >= need.width && window.innerHeight >= need.height;
  return { fits, need };
}

async function ensureWindowFits(stimulus, resumeStep) {
  if (windowFits(stimulus).fits) return;
  setStep("too-small");
  await new Promise((resolve) => {
    const check = () => {
      const { fits, need } = windowFits(stimulus);
      const n = pixelScale(settings).n || 1;
      ui.tooSmallDetail.textContent =
        `The images are ${stageWidth(stimulus, n)} × ` +
        `${Math.ceil(cssPixels(stimulus.height, n))} pixels, so this study needs a ` +
        `window of at least ${need.width} × ${need.height} pixels; yours is ` +
        `${window.innerWidth} × ${window.innerHeight}.`;
      if (fits) {
        window.removeEventListener("resize", check);
        resolve();
      }
    };
    window.addEventListener("resize", check);
    check();
  });
  setStep(resumeStep);
}

function loadImage(url) {
  const img = new Image();
  img.alt = "";
  img.decoding = "sync";
  img.src = url;
  return img.decode().then(() => img);
}

// Every image of a trial, fetched and decoded; retried (with a notice) until they arrive.
const imageCache = new Map(); // position → Promise<[slot 1, slot 2, ...]>
function trialImages(trial) {
  if (!imageCache.has(trial.position)) {
    imageCache.set(
      trial.position,
      (async () => {
        for (let attempt = 1; ; attempt++) {
          try {
            const images = await Promise.all(trial.images.map(loadImage));
            if (attempt > 1) setStatus("");
            return images;
          } catch (error) {
            console.warn(`images of trial ${trial.position} failed to load:`, error.message || error);
            // A failed image is a connection problem (a slow one would still be loading).
            setStatus(
              offline()
                ? "Connection problem: no network. Waiting for it to come back…"
                : "Connection problem: the images could not be loaded. Trying again…",
            );
            await retryPause(backoffDelay(attempt));
          }
        }
      })(),
    );
  }
  return imageCache.get(trial.position);
}

let hiddenDuringTrial = false;
document.addEventListener("visibilitychange", () => {
  if (document.hidden) hiddenDuringTrial = true;
});

// Signals of automation for quality control (studyapp.quality): what the browser says
// (navigator.webdriver), how many trusted (user-made, not script-dispatched) pointer and
// keyboard events the page saw, and how many stimuli were interrupted by the page being hidden.
// Counted here, sent with the display info (PATCH) when the session starts and before it ends.
const signals = { pointer_events: 0, key_events: 0, hidden_stimuli: 0, zoom_changes: 0 };
for (const type of ["pointerdown", "pointermove", "wheel", "touchstart"]) {
  window.addEventListener(type, (event) => {
    if (event.isTrusted) signals.pointer_events += 1;
  }, { passive: true, capture: true });
}
window.addEventListener("keydown", (event) => {
  if (event.isTrusted) signals.key_events += 1;
}, { capture: true });

// Show fixation → the protocol's phases → prompt, switching in rAF callbacks: sequential
// protocols (jnd, rating pairs) image 1 → blank → image 2; the others every image at once.
// Resolves {durations: {phase: ms}, promptAt} (rAF timestamps), or {interrupted} when the page
// was hidden meanwhile (rAF stops then, so the durations would be meaningless) or zoomed.
function present(images, study, frameMs) {
  const halfFrame = frameMs / 2;
  const showAll = (on) => images.forEach((img) => show(img, on));
  const phases = [{ ms: FIXATION_MS, enter: () => show(ui.fixation, true) }];
  if (sequential()) {
    const [first, second] = images;
    phases.push(
      { ms: study.first_ms, enter: () => { show(ui.fixation, false); show(first, true); } },
      { ms: study.blank_ms, enter: () => show(first, false) },
      { ms: study.second_ms, enter: () => show(second, true) },
      { ms: Infinity, enter: () => { show(second, false); openPrompt(true); } },
    );
  } else {
    phases.push(
      { ms: study.first_ms, enter: () => { show(ui.fixation, false); showAll(true); } },
      { ms: Infinity, enter: () => { showAll(false); openPrompt(true); } },
    );
  }
  const startedAt = [];
  hiddenDuringTrial = false;
  display.changed = false;
  return new Promise((resolve) => {
    let current = -1;
    function onFrame(timestamp) {
      noteRatio();
      if (hiddenDuringTrial || display.changed) {
        if (hiddenDuringTrial) signals.hidden_stimuli += 1;
        for (const el of [ui.fixation, ...images]) show(el, false);
        resolve({ interrupted: hiddenDuringTrial ? "hidden" : "zoom" });
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
        const durations = {};
        spec.phases.forEach((phase, i) => (durations[phase] = startedAt[i + 2] - startedAt[i + 1]));
        resolve({ durations, promptAt: startedAt[phases.length - 1] });
      } else {
        requestAnimationFrame(onFrame);
      }
    }
    requestAnimationFrame(onFrame);
  });
}

// ------------------------------------------------------------------------------ input

let keys = { f: "same", j: "different" };
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

const waitForAnswer = () => new Promise((resolve) => (answerWaiter = resolve));

document.addEventListener("keydown", (event) => {
  const response = keys[event.key.toLowerCase()];
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

// Resolves when `button` is clicked or the space bar is pressed.
function waitForSpaceOr(button) {
  button.disabled = false;
  button.focus();
  return new Promise((resolve) => {
    const go = (event) => {
      if (event.type === "keydown" && event.key !== " ") return;
      event.preventDefault();
      document.removeEventListener("keydown", go);
      button.removeEventListener("click", go);
      button.disabled = true;
      button.blur();
      resolve();
    };
    document.addEventListener("keydown", go);
    button.addEventListener("click", go);
  });
}

async function pause(text) {
  ui.panelText.textContent = text;
  show(ui.panel, true);
  await waitForSpaceOr(ui.continue);
  show(ui.panel, false);
}

// ------------------------------------------------------------------------------ steps

// Instructions with examples: a practice trial of each kind of answer the template asks for
// (`.example[data-answer]`; "*": any practice trial with a known answer, for protocols other
// than JND), shown through the same opaque image URLs as the trials, at the trials' pixel scale
// (JND's "different" one is the study's own perturbed pair marked `example`, see
// scheduler.example_pair_ids), else the static illustration in the template (or, where there
// is none, nothing).
async function showIntro(state, nPractice, scale) {
  for (const figure of document.querySelectorAll(".example[data-answer]")) {
    const kind = figure.dataset.answer;
    const practice = state.trials.filter((t) => t.practice && t.answer !== undefined && (kind === "*" || t.answer === kind));
    const trial = practice.find((t) => t.example) || practice[0];
    if (!trial) continue;
    figure.classList.add("from-study");
    figure.hidden = false;
    const caption = figure.querySelector("[data-example-answer]");
    if (caption) caption.textContent = answerText(trial.answer);
    // The practice trial's own decoded images (fetched with retries, like every trial's), put
    // in place of the illustration once they arrive; that trial later moves them to the stage.
    const placeholders = [...figure.querySelectorAll("img")];
    for (const img of placeholders) img.removeAttribute("src");
    // (A placeholder may name its slot, data-slot: a 2AFC example is drawn left, middle, right.)
    const targets = trial.images.map((_, slot) =>
      figure.querySelector(`img[data-slot="${slot + 1}"]`) || placeholders[slot]);
    trialImages(trial).then((images) => {
      images.forEach((img, slot) => {
        const target = targets[slot];
        if (img.isConnected || !target) return; // the trial has already begun
        img.style.width = `${cssPixels(img.naturalWidth, scale.n)}px`;
        img.style.height = `${cssPixels(img.naturalHeight, scale.n)}px`;
        img.style.gridArea = "";
        img.alt = target.alt;
        target.replaceWith(img);
      });
    });
  }
  const noun = trialNoun();
  const some = `${nPractice} practice ${noun}${nPractice === 1 ? "" : "s"}`;
  const practiced = state.trials.filter((t) => t.practice);
  let practiceText = "";
  if (nPractice && practiced.every((t) => t.answer !== undefined)) {
    practiceText = `First come ${some}: after each one you will see whether you were right. `;
  } else if (nPractice && practiced.some((t) => t.answer !== undefined)) {
    practiceText = `First come ${some}: after those with a right answer you will see whether you were right. `;
  } else if (nPractice) {
    practiceText = `First come ${some}, to get used to the ${noun}s. `;
  }
  ui.introPractice.textContent = nPractice ? `${practiceText}Then the real ${noun}s begin.` : "";
  ui.introStart.textContent = nPractice ? "Start the practice" : "Start";
  setStep("intro");
  ui.progress.textContent = state.study.title;
  await waitForSpaceOr(ui.introStart);
  setStep("trials");
}

// How an answer is said in the feedback and the examples.
function answerText(answer) {
  if (spec.protocol === "2afc") return `the ${answer} image is the same as the one in the middle`;
  if (spec.protocol === "rating") return `the two images were identical (${answer} = no difference)`;
  if (spec.protocol === "label") return `it was “${answer}”`;
  return answer === "same" ? "they were the same" : "they were different";
}

async function showFeedback(trial, response) {
  if (trial.answer === undefined) return; // no known answer (a data item, a quality anchor)
  const correct = response === trial.answer;
  ui.feedback.textContent = `${correct ? "Correct" : "Not quite"}: ${answerText(trial.answer)}.`;
  ui.feedback.classList.toggle("correct", correct);
  ui.feedback.classList.toggle("wrong", !correct);
  show(ui.feedback, true);
  await sleep(FEEDBACK_MS);
  show(ui.feedback, false);
}

// Sizes the images for `n` device pixels per image pixel (see "Pixel-exact display"): stacked
// in one place (jnd, rating pairs, one image), or a 2AFC triplet in a row: left (slot 2),
// reference (slot 1) in the middle under the fixation cross, right (slot 3).
function placeImages(images, n) {
  for (const img of images) {
    img.style.width = `${cssPixels(img.naturalWidth, n)}px`;
    img.style.height = `${cssPixels(img.naturalHeight, n)}px`;
  }
  const width = Math.max(...images.map((img) => img.naturalWidth));
  const height = Math.max(...images.map((img) => img.naturalHeight));
  ui.stage.style.height = `${cssPixels(height, n)}px`;
  if (spec.protocol === "2afc") {
    const [reference, left, right] = images;
    const column = `${cssPixels(width, n)}px`;
    ui.stage.style.width = "auto";
    ui.stage.style.gridTemplateColumns = `${column} ${column} ${column}`;
    ui.stage.style.columnGap = `${TRIPLET_GAP_PX}px`;
    left.style.gridArea = "1 / 1";
    reference.style.gridArea = "1 / 2";
    right.style.gridArea = "1 / 3";
    ui.fixation.style.gridArea = "1 / 2";
  } else {
    ui.stage.style.width = `${cssPixels(width, n)}px`;
  }
  ui.stage.replaceChildren(ui.fixation, ...images);
}

async function runTrial(trial, next, study, frameMs) {
  const images = await trialImages(trial);
  images.forEach((img, i) => (img.dataset.slot = String(i + 1)));
  for (;;) {
    const scale = await ensurePixelScale(study, "trials");
    await ensureWindowFits(scaledStimulus, "trials");
    placeImages(images, scale.n);
    await nextFrame(); // the new images are laid out before the fixation starts
    const exact = await drawnExactly(images, scale.n);
    if (display.changed && window.devicePixelRatio !== scale.ratio) continue;
    presentation.begin();
    const shown = await present(images, study, frameMs);
    presentation.end();
    const noun = trialNoun();
    if (shown.interrupted === "zoom") {
      setStatus(`The zoom changed, so that ${noun} will be shown again.`);
      await sleep(1000);
      setStatus("");
      continue;
    }
    if (shown.interrupted) {
      setStatus(`The page was hidden, so that ${noun} will be shown again.`);
      while (document.hidden) await sleep(200);
      await sleep(1000);
      setStatus("");
      continue;
    }
    if (next) trialImages(next); // fetch the next trial's images while this one is answered
    const { response, at } = await waitForAnswer();
    const responseTime = at - shown.promptAt;
    if (responseTime > MAX_RESPONSE_MS) {
      setStatus(`That took a while, so the ${noun} will be shown again.`);
      await sleep(1500);
      setStatus("");
      continue;
    }
    return {
      position: trial.position,
      response,
      response_time_ms: Math.max(0, responseTime),
      durations: shown.durations,
      display: { scale: scale.n, device_pixel_ratio: scale.ratio, exact },
      idempotency_key: newKey(),
    };
  }
}

// The message (if any) to show before `trial`; `resumed`: the first trial after a reload.
function pauseBefore(trial, state, resumed) {
  const main = state.trials.filter((t) => !t.practice);
  const hasPractice = state.trials.some((t) => t.practice);
  const mainIndex = main.indexOf(trial);
  const every = state.study.break_every;
  const practiceOver =
    "The practice is over. From now on you will not be told whether you were right. " +
    "Answer with your first impression.";
  if (resumed) {
    return `Welcome back: you can continue where you left off.${mainIndex === 0 && hasPractice ? ` ${practiceOver}` : ""}`;
  }
  if (mainIndex === 0 && hasPractice) return practiceOver;
  if (mainIndex > 0 && every > 0 && mainIndex % every === 0) {
    return `Time for a short break (${mainIndex} of ${main.length} ${trialNoun()}s done). Press the space bar to continue.`;
  }
  return null;
}

function progressText(trial, state) {
  const group = state.trials.filter((t) => t.practice === trial.practice);
  const noun = trialNoun();
  const label = trial.practice ? `Practice ${noun}` : noun[0].toUpperCase() + noun.slice(1);
  return `${label} ${group.indexOf(trial) + 1} of ${group.length}`;
}

async function complete() {
  const { status, data } = await persistent(root.dataset.completeUrl, { method: "POST", body: {} });
  if (status === 200) return true;
  if (status === 409 && data.code === "session_expired") {
    throw new FatalError(
      `This session has expired: it was left unfinished for too long, so its ${trialNoun()}s went to ` +
        "other participants. Please open the study link again to start afresh.",
    );
  }
  if (status === 409) return false; // some judgment is missing on the server: run it again
  throw new FatalError(data.error || `could not finish the session (${status})`);
}

async function main() {
  let state = await fetchState();
  if (state.completed) {
    outbox.clear();
    window.location.replace(root.dataset.doneUrl);
    return;
  }
  // Answered: stored on the server, or given here (or before a reload) and still buffered.
  let finished = new Set();
  const noteFinished = () => {
    outbox.reconcile(state.trials);
    finished = new Set(state.trials.filter((t) => t.answered || outbox.has(t.position)).map((t) => t.position));
  };
  noteFinished();
  outbox.start(); // re-send what an earlier page left unacknowledged
  spec = trialSpec(state.study);
  keys = { ...spec.keys };
  settings = state.study;
  scaledStimulus = state.stimulus;
  const fresh = finished.size === 0;

  ui.progress.textContent = state.study.title;
  if (touchOnly()) {
    setStep("touch-only");
    ui.progress.textContent = "";
    return;
  }
  const frames = await measureFrameInterval();
  root.dataset.frameMs = String(frames.frameMs);
  watchRatio();
  measuredFrames = frames;
  const scale = await ensurePixelScale(state.study, "trials");
  await ensureWindowFits(state.stimulus, "trials");
  sendClientInfo(frames);
  if (fresh) await showIntro(state, state.trials.filter((t) => t.practice).length, scale);
  setStep("trials");

  let resumed = !fresh;
  for (let round = 0; round < 3; round++) {
    const open = state.trials.filter((t) => !finished.has(t.position));
    for (const [i, trial] of open.entries()) {
      trialImages(trial); // fetch while a pause message is read
      ui.progress.textContent = progressText(trial, state);
      const message = pauseBefore(trial, state, resumed);
      resumed = false;
      if (message) await pause(message);
      const judgment = await runTrial(trial, open[i + 1], state.study, frames.frameMs);
      outbox.add(judgment); // buffered, and sent at once
      finished.add(trial.position);
      imageCache.delete(trial.position);
      if (trial.practice) await showFeedback(trial, judgment.response);
      await sleep(INTER_TRIAL_MS);
    }
    ui.progress.textContent = "Saving your answers…";
    await outbox.drain();
    await sendClientInfo(frames); // the signals as they stand at the end
    if (await complete()) {
      outbox.clear();
      window.location.assign(root.dataset.doneUrl);
      return;
    }
    state = await fetchState();
    noteFinished();
  }
  throw new FatalError("Some answers could not be saved. Please reload the page.");
}

main().catch((error) => {
  if (error instanceof DisplayRefused) return;
  console.error(error);
  openPrompt(false);
  const message = error instanceof FatalError ? error.message : `Something went wrong (${error}).`;
  setStatus(`${message} Your answers are kept; reloading continues where you left off.`, true);
});
