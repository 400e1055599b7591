// The annotation page. It asks the server for the task to judge (an opaque handle, a prompt and two texts)
// and shows it as text only: prompts and responses are untrusted, so they never become markup. Each click
// gets a submission id once, and the verdict is resent with that same id until the server acknowledges it;
// the server answers a repeated id with the first verdict, so a lost reply or a restarted server neither
// loses a verdict nor doubles it. An answer that asking again will not change (4xx) is shown as an error.
"use strict";

const KEYS = {"1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right",
              "3": "tie", t: "tie", "4": "both_bad", x: "both_bad"};
const REQUEST_TIMEOUT_MS = 20000;
const MAX_BACKOFF_MS = 8000;

const token = location.pathname.split("/").pop();
const $ = (id) => document.getElementById(id);
const buttons = Array.from(document.querySelectorAll("[data-choice]"));

let task = null;  // the task on screen
let shownAt = 0;  // when it was shown: a verdict records the seconds it took
let busy = true;  // a request is under way; choices wait for it

class ApiError extends Error {}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function newId() {
  // randomUUID exists only in secure contexts (https or localhost), and a server on a LAN address is plain http.
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
  status.hidden = !text;
}

// While busy, the buttons are disabled and the one for `chosen` (the verdict being sent) stays marked.
function setBusy(value, chosen = null) {
  busy = value;
  for (const button of buttons) {
    button.disabled = value;
    button.classList.toggle("chosen", button.dataset.choice === chosen);
  }
  $("task").setAttribute("aria-busy", String(value));
}

// The server's JSON answer to GET `path` or, with a body, POST. While the server cannot be reached, fails
// (5xx) or cuts its answer off, the same request is sent again with growing pauses; an answer that asking
// again will not change (4xx) is thrown as an ApiError.
async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch(`../api/${token}/${path}`, {
        ...init, cache: "no-store", signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
      if (response.status < 500) {
        const data = await response.json().catch(() => null);
        if (!response.ok) throw new ApiError(data?.error || `The server answered ${response.status}.`);
        if (data !== null) {
          setStatus("");
          return data;
        }
      }
    } catch (err) {
      if (err instanceof ApiError) throw err;
    }
    setStatus(body === undefined ? "Reconnecting…" : "Reconnecting… your choice is kept and will be sent.", "warn");
    await sleep(Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt) * (0.5 + Math.random() / 2));
  }
}

function messageElement(message) {
  const item = document.createElement("div");
  item.className = "message";
  item.dataset.role = message.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = typeof message.content === "string" ? message.content : JSON.stringify(message.content, null, 2);
  item.append(role, text);
  return item;
}

function show(data) {
  const {done, total} = data.progress;
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
  $("progress-text").textContent = `${done} of ${total} judged`;
  if (data.done) {
    task = null;
    $("task").hidden = true;
    $("done").hidden = false;
    return;
  }
  task = data;
  $("prompt").replaceChildren(...data.prompt.map(messageElement));
  $("left").textContent = data.left;
  $("right").textContent = data.right;
  $("rationale").value = "";
  $("done").hidden = true;
  $("task").hidden = false;
  window.scrollTo(0, 0);
  shownAt = performance.now();
  setBusy(false);
}

function fail(err) {
  setStatus(err.message, "error");
  setBusy(false);
}

async function choose(choice) {
  if (busy || task === null) return;
  setBusy(true, choice);
  const verdict = {
    handle: task.handle, choice, submission: newId(),
    rationale: $("rationale").value, seconds: (performance.now() - shownAt) / 1000,
  };
  try {
    await call("verdict", verdict);
    show(await call("next"));
  } catch (err) {
    fail(err);
  }
}

for (const button of buttons) button.addEventListener("click", () => choose(button.dataset.choice));

document.addEventListener("keydown", (event) => {
  if (event.target.matches?.("textarea, input")) {  // typing, not choosing
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
  const choice = KEYS[event.key.length === 1 ? event.key.toLowerCase() : event.key];
  if (choice) {
    event.preventDefault();
    choose(choice);
  }
});

call("next").then(show, fail);
