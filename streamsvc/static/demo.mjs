/*
 * The demo chat page: a thin layer over the browser client (streamsvc.mjs).
 *
 * Model text only ever goes into the page as text (one Text node per answer,
 * grown with appendData): never innerHTML, so "<script>" in an answer is
 * shown, not run. The conversation history lives in this page and is sent
 * whole with each request; the server keeps none.
 */
import { StreamsvcError, chat, listModels, stopStream } from "./streamsvc.mjs";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  newChat: $("new-chat"),
  conversation: $("conversation"),
  empty: $("empty"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  extra: $("extra"),
  status: $("status"),
  ttft: $("ttft"),
  events: $("events"),
  rate: $("rate"),
  tokens: $("tokens"),
  tokensStat: $("tokens-stat"),
  reconnects: $("reconnects"),
  streamId: $("stream-id"),
  template: $("turn-template"),
};

const MODEL_KEY = "streamsvc.demo.model";
/**
 * A rate is shown only over at least this long and this many events: an answer
 * that arrives at once would otherwise show thousands of events per second.
 */
const RATE_MIN_MS = 250;
const RATE_MIN_EVENTS = 3;

/** The conversation so far, as OpenAI messages: sent with every request. */
let history = [];
/** Which conversation a finishing answer belongs to ("New chat" starts another). */
let conversation = 0;
/** The answer being streamed: its AbortController and stream id, or null. */
let current = null;
/**
 * The last stream not known to have ended, for the pagehide DELETE. Kept
 * apart from `current` because a navigation aborts the EventSource before
 * pagehide fires: by then the read has failed and `current` is gone, but the
 * stream still runs on the server.
 */
let unfinished = null;

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
  ui.status.title = text; // the footer keeps one line: a long status is cut, whole on hover
}

/** A new turn in the conversation; returns its text node and error element. */
function addTurn(role, label) {
  ui.empty.hidden = true;
  const turn = ui.template.content.firstElementChild.cloneNode(true);
  turn.classList.add(role);
  turn.querySelector(".who").textContent = label;
  const text = document.createTextNode("");
  turn.querySelector(".text").append(text);
  ui.conversation.append(turn);
  return { turn, text, error: turn.querySelector(".error") };
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

/** Timing of one answer: time to first token, text events and text events per second. */
class Meter {
  constructor() {
    this.start = performance.now();
    this.first = null;
    this.last = null;
    this.events = 0;
    ui.ttft.textContent = "–";
    ui.events.textContent = "0";
    ui.rate.textContent = "–";
    ui.tokensStat.hidden = true;
    ui.reconnects.textContent = "0";
  }

  delta() {
    const now = performance.now();
    if (this.first === null) {
      this.first = now;
      ui.ttft.textContent = `${Math.round(now - this.start)} ms`;
    }
    this.last = now;
    this.events += 1;
    ui.events.textContent = String(this.events);
    const elapsed = now - this.first;
    if (this.events >= RATE_MIN_EVENTS && elapsed >= RATE_MIN_MS) {
      ui.rate.textContent = ((this.events - 1) / (elapsed / 1000)).toFixed(1);
    }
  }

  /** The completion tokens, from the usage in the done event (when the upstream gave it). */
  finish(usage) {
    const tokens = usage && usage.completion_tokens;
    if (!Number.isFinite(tokens)) return;
    ui.tokens.textContent = String(tokens);
    ui.tokensStat.hidden = false;
  }
}

/** The extra body fields from the options box: a JSON object, or an error message. */
function extraFields() {
  const raw = ui.extra.value.trim();
  if (raw === "") return {};
  let parsed;
  try {
    parsed = JSON.parse(raw);
  } catch (error) {
    throw new StreamsvcError(`Request options: not JSON (${error.message})`,
      { code: "bad_request", param: "options" });
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new StreamsvcError("Request options: expected a JSON object such as {\"temperature\": 0.2}",
      { code: "bad_request", param: "options" });
  }
  return parsed;
}

function describe(error) {
  if (error instanceof StreamsvcError) {
    const where = error.status ? ` (HTTP ${error.status})` : "";
    return `${error.code}${where}: ${error.message}`;
  }
  return `${error.name || "Error"}: ${error.message || error}`;
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

async function ask(prompt) {
  const model = ui.model.value;
  let extra;
  try {
    extra = extraFields();
  } catch (error) {
    setStatus("error", describe(error));
    return;
  }
  const question = { role: "user", content: prompt };
  const mine = conversation;
  const remember = (reply) => {
    if (mine === conversation) history = [...history, question, reply];
  };
  const body = { ...extra, model, messages: [...history, question] };

  addTurn("user", "you").text.appendData(prompt);
  const answer = addTurn("assistant", model);
  answer.turn.dataset.state = "streaming";
  const parts = [];
  const meter = new Meter();
  const controller = new AbortController();
  current = { controller, streamId: null };
  ui.prompt.value = "";
  ui.streamId.textContent = "";
  setBusy(true);
  setStatus("streaming", "connecting…");
  scrollToEnd();

  try {
    const result = await chat(body, {
      signal: controller.signal,
      onStream: (stream) => {
        current.streamId = stream.id;
        unfinished = stream.id;
        ui.streamId.textContent = stream.id;
        setStatus("streaming", "streaming…");
      },
      onDelta: (delta) => {
        // Only text counts as a token: the first event is often a role alone.
        if ((delta.index || 0) !== 0 || typeof delta.content !== "string") return;
        meter.delta();
        parts.push(delta.content);
        answer.text.appendData(delta.content);
        scrollToEnd();
      },
      onFailover: (info) => {
        // The upstream failed mid-answer and another attempt goes on from here: mark the seam.
        const seam = document.createElement("span");
        seam.className = "seam";
        seam.title = `continued on ${info.to} after ${info.from} failed (${info.code})`;
        answer.text.after(seam);
        answer.text = document.createTextNode("");
        seam.after(answer.text);
      },
      onReconnect: (lastEventId) => {
        setStatus("reconnecting", `connection lost, resuming after ${lastEventId || "the start"}…`);
      },
      onResume: () => {
        ui.reconnects.textContent = String(Number(ui.reconnects.textContent) + 1);
        setStatus("streaming", "resumed, streaming…");
      },
    });
    unfinished = null;
    meter.finish(result.usage);
    answer.turn.dataset.state = "done";
    remember({ role: "assistant", content: result.text });
    setStatus("done", `done: ${result.finishReason}`);
  } catch (error) {
    if (error && error.name === "AbortError") {
      unfinished = null; // chat() has sent the DELETE
      // Stopped: what was shown stays in the history, as the user saw it.
      answer.turn.dataset.state = "stopped";
      remember({ role: "assistant", content: parts.join("") });
      setStatus("stopped", "stopped");
    } else {
      // Failed: the error is shown; the question goes back into the box for another try.
      answer.turn.dataset.state = "error";
      answer.error.textContent = describe(error);
      answer.error.hidden = false;
      if (ui.prompt.value === "") ui.prompt.value = prompt;
      setStatus("error", `error: ${error.code || error.name}`);
    }
  } finally {
    current = null;
    setBusy(false);
    scrollToEnd();
  }
}

async function loadModels() {
  try {
    const models = await listModels();
    ui.model.replaceChildren(...models.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      return option;
    }));
    const saved = localStorage.getItem(MODEL_KEY);
    if (saved && models.includes(saved)) ui.model.value = saved;
    ui.model.disabled = models.length === 0;
    setStatus("idle", models.length ? "ready" : "no models are served");
  } catch (error) {
    setStatus("error", `could not list the models: ${describe(error)}`);
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = ui.prompt.value;
  if (current !== null || prompt.trim() === "" || !ui.model.value) return;
  ask(prompt);
});

ui.prompt.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (CJK input) is not a send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (current !== null) current.controller.abort();
});

ui.newChat.addEventListener("click", () => {
  if (current !== null) current.controller.abort();
  conversation += 1;
  history = [];
  for (const turn of ui.conversation.querySelectorAll(".turn")) turn.remove();
  ui.empty.hidden = false;
  setStatus("idle", "ready");
});

ui.model.addEventListener("change", () => localStorage.setItem(MODEL_KEY, ui.model.value));

// Leaving the page stops the generation at once (the server would stop it
// anyway after resume_grace_s); keepalive lets the DELETE outlive the page.
// A stream that ended with an error gets a DELETE it does not need ("ended").
window.addEventListener("pagehide", () => {
  if (unfinished !== null) stopStream(unfinished).catch(() => undefined);
  unfinished = null;
});

loadModels();
