// Talking to the participant API without losing anything.
//
// `request()` sends one JSON request. `Outbox` holds the judgments that the server has not yet
// acknowledged: each is written to localStorage (key `bufferKey(token)`) before it is sent, so it
// survives network loss, a crash and a reload, and is removed only once the server has answered
// 200/201 (stored now, or stored before under the same idempotency key) or 409 (the trial already
// has a judgment: another tab answered it; or the server refuses it for good, e.g. an expired
// lease): the first stored answer stands. Each answer is sent at once, with its own retry loop
// (writes queue behind one another in `request`, so "at once" means after the write in flight,
// never after another answer's backoff); network errors, 5xx and 429 are retried with capped
// exponential backoff with jitter (Retry-After is honoured), for as long as it takes, and at
// once when the browser fires `online`; a retry is held back while a stimulus is on screen, so
// that it cannot cost a frame.

export const bufferKey = (token) => `perceptlab:v1:judgments:${token}`;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The pause before a retry: the backoff delay, cut short the moment the browser reports that
// the network is back (`online`), so nobody waits out a long backoff after an outage.
export function retryPause(ms) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("online", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    window.addEventListener("online", done);
  });
}

// Whether the browser knows it is offline (navigator.onLine is false only when it is sure).
export const offline = () => typeof navigator !== "undefined" && navigator.onLine === false;

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;

// "Equal jitter": half the exponential delay, plus a random share of the other half, so that many
// participants cut off together do not all come back at the same instant.
export function backoffDelay(attempt, retryAfterMs = 0) {
  const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.max(0, attempt - 1));
  return Math.max(retryAfterMs, ceiling / 2 + Math.random() * (ceiling / 2));
}

export const isRetryable = (status) => status === 0 || status === 429 || status >= 500;

function csrfToken(cookieName, fallback) {
  for (const part of document.cookie.split(";")) {
    const [key, ...value] = part.trim().split("=");
    if (key === cookieName) return decodeURIComponent(value.join("="));
  }
  return fallback || "";
}

// One JSON request → {status, data, retryAfterMs}; status 0 means the network failed (or the
// request stalled for REQUEST_TIMEOUT_MS). Writes (anything but GET) go out one at a time: a
// session's writes are few and small, and a backlog re-sent after an outage then reaches the
// server as a queue, not as a burst.
const REQUEST_TIMEOUT_MS = 15000;
let writes = Promise.resolve();

export function request(url, options = {}) {
  if ((options.method || "GET") === "GET") return send(url, options);
  const result = writes.then(() => send(url, options));
  writes = result.catch(() => {});
  return result;
}

async function send(url, { method = "GET", body, csrf = {} } = {}) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
  let response;
  try {
    response = await fetch(url, {
      method,
      credentials: "same-origin",
      cache: "no-store",
      signal: abort.signal,
      headers: {
        Accept: "application/json",
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...(method === "GET" ? {} : { "X-CSRFToken": csrfToken(csrf.cookie || "csrftoken", csrf.token) }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    clearTimeout(timer);
    console.warn(`${method} ${url}: network error`, error.message || error);
    return { status: 0, data: { error: "network error" }, retryAfterMs: 0 };
  }
  let data;
  try {
    data = await response.json();
  } catch {
    data = { error: `unexpected answer (HTTP ${response.status})` };
  } finally {
    clearTimeout(timer);
  }
  const retryAfter = Number(response.headers.get("Retry-After"));
  return { status: response.status, data, retryAfterMs: retryAfter > 0 ? retryAfter * 1000 : 0 };
}

// A random idempotency key (crypto.randomUUID needs a secure context; getRandomValues does not).
export function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export class Outbox {
  // url: the judgments endpoint; token: the session token (names the buffer);
  // hooks: {csrf, idle: () => Promise (resolves when no stimulus is on screen),
  //         onRetrying(bool), onRejected(body, status, data)}.
  constructor(url, token, hooks = {}) {
    this.url = url;
    this.key = bufferKey(token);
    this.hooks = hooks;
    this.items = new Map(); // position → judgment body (with its idempotency key)
    this.sending = new Map(); // position → Promise of its send loop
    this.failing = new Set(); // positions whose last attempt failed (network, 5xx, 429)
    this.wakers = new Set();
    this.load();
    window.addEventListener("online", () => this.wake());
  }

  load() {
    try {
      const saved = JSON.parse(localStorage.getItem(this.key) || "null");
      for (const body of saved?.judgments || []) this.items.set(body.position, body);
    } catch (error) {
      console.warn("the local answer buffer could not be read:", error);
    }
  }

  persist() {
    try {
      if (this.items.size) {
        localStorage.setItem(this.key, JSON.stringify({ judgments: [...this.items.values()] }));
      } else {
        localStorage.removeItem(this.key);
      }
    } catch (error) {
      // Private mode or a full quota: the answers are still kept (and re-sent) in memory.
      console.warn("answers cannot be buffered across reloads:", error);
    }
  }

  get size() {
    return this.items.size;
  }

  has(position) {
    return this.items.has(position);
  }

  // Store a judgment locally and send it at once; answers waiting for a retry are tried again
  // now too (a new answer going out is a good sign that the network may be back).
  add(body) {
    this.items.set(body.position, body);
    this.persist();
    this.wake();
    this.start();
  }

  // Forget buffered answers for trials the server already holds a judgment for (ours, stored
  // before a reload, or another tab's).
  reconcile(trials) {
    let changed = false;
    for (const trial of trials) {
      if (trial.answered && this.items.has(trial.position)) {
        this.items.delete(trial.position);
        changed = true;
      }
    }
    if (changed) this.persist();
  }

  clear() {
    this.items.clear();
    this.persist();
  }

  wake() {
    for (const resolve of this.wakers) resolve();
    this.wakers.clear();
  }

  // Send every buffered answer that is not being sent already, each on its own.
  start() {
    for (const [position, body] of this.items) {
      if (!this.sending.has(position)) {
        this.sending.set(
          position,
          this.send(body).finally(() => this.sending.delete(position)),
        );
      }
    }
  }

  // Resolves once every buffered judgment has been acknowledged.
  async drain() {
    while (this.items.size) {
      this.start();
      await Promise.all(this.sending.values());
    }
  }

  setFailing(position, failing) {
    if (failing) this.failing.add(position);
    else this.failing.delete(position);
    this.hooks.onRetrying?.(this.failing.size > 0);
  }

  async send(body) {
    for (let attempt = 1; this.items.get(body.position) === body; attempt++) {
      const { status, data, retryAfterMs } = await request(this.url, {
        method: "POST",
        body,
        csrf: this.hooks.csrf,
      });
      if (isRetryable(status)) {
        this.setFailing(body.position, true);
        await Promise.race([
          retryPause(backoffDelay(attempt, retryAfterMs)),
          new Promise((resolve) => this.wakers.add(resolve)),
        ]);
        if (this.hooks.idle) await this.hooks.idle();
        continue;
      }
      this.setFailing(body.position, false);
      if (status === 409) {
        console.warn(`answer to trial ${body.position} not stored:`, data.error);
      } else if (status !== 200 && status !== 201) {
        console.error(`answer to trial ${body.position} refused (${status}):`, data.error);
        this.hooks.onRejected?.(body, status, data);
      }
      if (this.items.get(body.position) === body) {
        this.items.delete(body.position);
        this.persist();
      }
      return;
    }
  }
}
