/*
 * streamsvc browser client: read streamsvc answers as they are generated.
 *
 * Two ways to load it (docs/browser.md):
 *   <script src="/static/streamsvc.js"></script>      sets globalThis.streamsvc
 *   import { chat } from "/static/streamsvc.mjs";     the same functions as an ES module
 *
 * This file is a classic script on purpose: a file with `export` is a syntax
 * error as a classic script, so the ES module (streamsvc.mjs) imports this
 * file and re-exports what it defines. No build step, no dependencies.
 *
 * What it handles for you:
 *   - the prompt goes in a POST body (POST /v1/streams), never in a URL;
 *   - EventSource reads events_url and, after a network blip, reconnects by
 *     itself with Last-Event-ID: the server replays what was missed and the
 *     model is not asked again;
 *   - the EventSource is closed on `done` and on `error`, so the browser
 *     never reconnects to a finished stream;
 *   - errors are StreamsvcError objects with a `code` from streamsvc's closed
 *     set (plus the client's own `network_error`, `protocol_error`,
 *     `unsupported`);
 *   - an AbortSignal stops the generation (DELETE /v1/streams/{id});
 *   - chatFetch() reads POST /v1/chat/stream with fetch, for places
 *     without EventSource.
 */
(function (root) {
  "use strict";

  const VERSION = "0.1.0";

  /** An error with a `code` (streamsvc's closed set, or a client code). */
  class StreamsvcError extends Error {
    /**
     * @param {string} message what went wrong
     * @param {object} details code, status (HTTP, or null inside a stream),
     *   retryable, param (the request field at fault), retryAfter (seconds),
     *   streamId, cause
     */
    constructor(message, details = {}) {
      super(message, details.cause === undefined ? undefined : { cause: details.cause });
      this.name = "StreamsvcError";
      this.code = details.code || "internal_error";
      this.status = details.status ?? null;
      this.retryable = Boolean(details.retryable);
      this.param = details.param ?? null;
      this.retryAfter = details.retryAfter ?? null;
      this.streamId = details.streamId ?? null;
    }
  }

  // -------------------------------------------------------------------------
  // small helpers

  function resolveUrl(path, options) {
    const base = options.baseUrl || (root.location && root.location.href);
    return base ? new URL(path, base).href : path;
  }

  function abortReason(signal) {
    if (signal.reason !== undefined) return signal.reason;
    return new DOMException("The operation was aborted.", "AbortError");
  }

  function fetchImpl(options) {
    const impl = options.fetch || root.fetch;
    if (typeof impl !== "function") {
      throw new StreamsvcError("fetch is not available here", { code: "unsupported" });
    }
    return impl;
  }

  function postJson(url, body, options, { accept = "application/json", signal } = {}) {
    return fetchImpl(options)(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: accept, ...options.headers },
      body: JSON.stringify(body),
      credentials: options.credentials || "same-origin",
      signal,
    });
  }

  function streamIdOf(eventId) {
    const colon = eventId ? eventId.lastIndexOf(":") : -1;
    return colon > 0 ? eventId.slice(0, colon) : null;
  }

  /** A StreamsvcError from a non-2xx answer with an OpenAI-shaped error body. */
  async function errorFromResponse(response) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch (_) {
      // not JSON (a proxy's error page): the status says enough
    }
    const retryAfter = Number(response.headers.get("Retry-After"));
    return new StreamsvcError(error.message || `HTTP ${response.status}`, {
      code: error.code || (response.status >= 500 ? "upstream_error" : "bad_request"),
      status: response.status,
      retryable: response.status === 429 || response.status >= 500,
      param: error.param,
      retryAfter: Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null,
      streamId: response.headers.get("X-Stream-ID"),
    });
  }

  /** A StreamsvcError from the data of an `event: error`. */
  function errorFromEvent(data, eventId) {
    let parsed = {};
    try {
      parsed = JSON.parse(data);
    } catch (_) {
      parsed = { code: "protocol_error", message: `error event that is not JSON: ${data}` };
    }
    return new StreamsvcError(parsed.message || "stream error", {
      code: parsed.code,
      retryable: parsed.retryable,
      retryAfter: parsed.retry_after,
      streamId: streamIdOf(eventId),
    });
  }

  /** Gathers what one answer says: the text of choice 0, the last event id, counts. */
  class Collector {
    constructor(options) {
      this.options = options;
      this.parts = [];
      this.events = 0;
      this.reconnects = 0;
      this.lastEventId = "";
      this.streamId = null;
    }

    /** A delta event: JSON data, handed to onDelta; throws on data that is not JSON. */
    delta(data, eventId) {
      let delta;
      try {
        delta = JSON.parse(data);
      } catch (_) {
        throw new StreamsvcError(`delta event that is not JSON: ${data.slice(0, 200)}`,
          { code: "protocol_error", streamId: streamIdOf(eventId) });
      }
      this.seen(eventId);
      this.events += 1;
      if ((delta.index || 0) === 0 && typeof delta.content === "string") {
        this.parts.push(delta.content);
      }
      if (this.options.onDelta) this.options.onDelta(delta, eventId);
    }

    /** A failover event: the answer goes on from another attempt (continuation). */
    failover(data, eventId) {
      this.seen(eventId);
      let info = {};
      try {
        info = JSON.parse(data);
      } catch (_) { /* a seam without details is still a seam */ }
      if (this.options.onFailover) this.options.onFailover(info, eventId);
    }

    seen(eventId) {
      if (eventId) {
        this.lastEventId = eventId;
        this.streamId = this.streamId || streamIdOf(eventId);
      }
    }

    /** The result of an answer that ended with `done`. */
    result(data, eventId) {
      this.seen(eventId);
      let done = {};
      try {
        done = JSON.parse(data);
      } catch (_) {
        // a done event is the end whatever it carries
      }
      return {
        streamId: this.streamId,
        text: this.parts.join(""),
        finishReason: done.finish_reason ?? null,
        usage: done.usage ?? null,
        done,
        events: this.events,
        reconnects: this.reconnects,
        lastEventId: this.lastEventId,
      };
    }
  }

  // -------------------------------------------------------------------------
  // SSE parsing for the fetch reader (WHATWG "event stream interpretation")

  /**
   * Incremental Server-Sent Events parser: feed it text, get events back.
   *
   * feed(text) returns the events completed by `text` as
   * {type, data, lastEventId}; feed("", true) at the end of the body drops an
   * unfinished event, as browsers do. retry holds the last `retry:` value.
   */
  class SSEParser {
    constructor() {
      this.pending = ""; // an unfinished line, or a CR that may be half of a CRLF
      this.started = false;
      this.data = [];
      this.type = "";
      this.lastEventId = "";
      this.retry = null;
    }

    feed(text, final = false) {
      let input = this.pending + text;
      if (!this.started && input.length > 0) {
        this.started = true;
        // One leading BOM is dropped, only at the very start of the stream.
        if (input.charCodeAt(0) === 0xfeff) input = input.slice(1);
      }
      const events = [];
      let start = 0;
      for (let i = 0; i < input.length; i += 1) {
        const c = input.charCodeAt(i);
        if (c !== 10 && c !== 13) continue;
        // Lines end in CRLF, CR or LF; a CR last in this text may be followed
        // by the LF of the same CRLF in the next text: keep it until then.
        if (c === 13 && i + 1 === input.length && !final) break;
        this.line(input.slice(start, i), events);
        if (c === 13 && input.charCodeAt(i + 1) === 10) i += 1;
        start = i + 1;
      }
      this.pending = input.slice(start);
      if (final) {
        // The body ended: an unterminated line or event is discarded.
        this.pending = "";
        this.data = [];
        this.type = "";
      }
      return events;
    }

    line(line, events) {
      if (line === "") {
        if (this.data.length > 0) {
          events.push({ type: this.type || "message", data: this.data.join("\n"),
                        lastEventId: this.lastEventId });
        }
        // As per the spec, the last event id is not reset between events.
        this.data = [];
        this.type = "";
        return;
      }
      if (line.charCodeAt(0) === 58) return; // ":" starts a comment (the heartbeat)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1); // one space after ":" only
      if (field === "data") this.data.push(value);
      else if (field === "event") this.type = value;
      else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
      else if (field === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
    }
  }

  // -------------------------------------------------------------------------
  // the API

  /**
   * POST /v1/streams: start a resumable stream; the upstream starts at once.
   *
   * @param {object} body an OpenAI chat body ({model, messages, ...})
   * @param {object} [options] baseUrl, headers, credentials, fetch
   * @returns {Promise<{id: string, eventsUrl: string, expiresAt: number}>}
   * @throws {StreamsvcError} the server's error (400 bad_request, 404 model_not_found, ...)
   */
  async function createStream(body, options = {}) {
    let response;
    try {
      response = await postJson(resolveUrl("/v1/streams", options), body, options);
    } catch (cause) {
      throw new StreamsvcError(`POST /v1/streams failed: ${cause.message}`,
        { code: "network_error", retryable: true, cause });
    }
    if (!response.ok) throw await errorFromResponse(response);
    const created = await response.json();
    return {
      id: created.id,
      eventsUrl: resolveUrl(created.events_url, options),
      expiresAt: created.expires_at,
    };
  }

  /**
   * DELETE /v1/streams/{id}: stop a generation; readers get done "cancelled".
   *
   * keepalive lets the request outlive the page (a Stop right before unload).
   * @returns {Promise<{id: string, status: "cancelled" | "ended"}>}
   */
  async function stopStream(id, options = {}) {
    const response = await fetchImpl(options)(
      resolveUrl(`/v1/streams/${encodeURIComponent(id)}`, options),
      { method: "DELETE", headers: { ...options.headers }, keepalive: true,
        credentials: options.credentials || "same-origin" },
    );
    if (!response.ok) throw await errorFromResponse(response);
    return response.json();
  }

  /**
   * Read a stream's events with EventSource until `done` or `error`.
   *
   * A network blip is survived: EventSource reconnects by itself and sends
   * Last-Event-ID, the server replays from there (onReconnect, then onResume,
   * are called). The EventSource is closed on `done`, on `error`, when the
   * browser gives up, and on abort, so nothing is ever re-sent.
   *
   * @param {string} eventsUrl events_url of a stream, or a one-shot
   *   /v1/chat/stream?q=... URL
   * @param {object} [options] onDelta(delta, eventId), onFailover(info, eventId),
   *   onReconnect(lastEventId),
   *   onResume(lastEventId), signal (closes the reader only: chat() also
   *   stops the generation), EventSource (a constructor, e.g. a polyfill),
   *   eventSourceInit (its second argument)
   * @returns {Promise<object>} {streamId, text, finishReason, usage, done,
   *   events, reconnects, lastEventId}
   */
  function readEvents(eventsUrl, options = {}) {
    const EventSourceImpl = options.EventSource || root.EventSource;
    if (typeof EventSourceImpl !== "function") {
      return Promise.reject(new StreamsvcError(
        "EventSource is not available here; use chatFetch()", { code: "unsupported" }));
    }
    const { signal } = options;
    if (signal && signal.aborted) return Promise.reject(abortReason(signal));
    return new Promise((resolve, reject) => {
      const collector = new Collector(options);
      const source = new EventSourceImpl(eventsUrl, options.eventSourceInit);
      let settled = false;
      let reconnecting = false;
      const onAbort = () => finish(reject, abortReason(signal));
      const finish = (settle, value) => {
        if (settled) return;
        settled = true;
        source.close();
        if (signal) signal.removeEventListener("abort", onAbort);
        settle(value);
      };
      // A handler that throws ends the read with that error, instead of an
      // uncaught exception and a stream left open.
      const guard = (handler) => (event) => {
        if (settled) return;
        try {
          handler(event);
        } catch (error) {
          finish(reject, error);
        }
      };
      source.onopen = guard(() => {
        if (!reconnecting) return;
        reconnecting = false;
        if (options.onResume) options.onResume(collector.lastEventId);
      });
      source.onmessage = guard((event) => collector.delta(event.data, event.lastEventId));
      source.addEventListener("failover", guard((event) => {
        collector.failover(event.data, event.lastEventId);
      }));
      source.addEventListener("done", guard((event) => {
        finish(resolve, collector.result(event.data, event.lastEventId));
      }));
      source.addEventListener("error", guard((event) => {
        if (typeof event.data === "string") {
          // event: error from the server: a typed error, and the end
          collector.seen(event.lastEventId);
          finish(reject, errorFromEvent(event.data, event.lastEventId));
        } else if (source.readyState === 2 /* CLOSED */) {
          // The browser gave up: an answer that was not a 200 event stream
          // (404: the stream expired), or a polyfill that does not retry.
          finish(reject, new StreamsvcError(
            "the event stream failed and the browser will not reconnect (expired or unknown stream?)",
            { code: "network_error", streamId: collector.streamId }));
        } else if (!reconnecting) {
          // CONNECTING: the browser reconnects by itself, with Last-Event-ID.
          reconnecting = true;
          collector.reconnects += 1;
          if (options.onReconnect) options.onReconnect(collector.lastEventId);
        }
      }));
      if (signal) signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /**
   * Ask for an answer and read it: POST /v1/streams, then EventSource.
   *
   * Aborting `signal` closes the EventSource and stops the generation
   * (DELETE /v1/streams/{id}); the promise then rejects with the signal's
   * reason (an AbortError). Also an abort during the POST stops the stream
   * it created.
   *
   * @param {object} body an OpenAI chat body ({model, messages, ...})
   * @param {object} [options] everything createStream() and readEvents()
   *   take, plus onStream({id, eventsUrl, expiresAt}) once the stream exists
   * @returns {Promise<object>} as readEvents()
   * @throws {StreamsvcError|DOMException}
   *
   * @example
   *   const answer = await streamsvc.chat(
   *     { model: "echo", messages: [{ role: "user", content: "Hi" }] },
   *     { onDelta: (d) => { if (d.content) out.append(d.content); }, signal });
   */
  async function chat(body, options = {}) {
    const { signal } = options;
    if (signal && signal.aborted) throw abortReason(signal);
    // The POST gets no signal: aborting it half-way could leave a stream
    // running that we never learnt the id of. We stop it below instead.
    const stream = await createStream(body, options);
    try {
      if (signal && signal.aborted) throw abortReason(signal);
      if (options.onStream) options.onStream(stream);
      return await readEvents(stream.eventsUrl, options);
    } catch (error) {
      if (signal && signal.aborted) {
        // Best effort: should the DELETE not get through, the server stops
        // the stream anyway once no reader has been back for resume_grace_s.
        await stopStream(stream.id, options).catch(() => undefined);
      }
      throw error;
    }
  }

  /**
   * Ask for an answer and read it with fetch: POST /v1/chat/stream.
   *
   * For places without EventSource (workers, some webviews), or when the
   * request needs headers EventSource cannot send. The stream is not
   * resumable: a broken connection ends it with a network_error, and the
   * server stops the upstream as soon as this client goes away (aborting
   * `signal` is enough to stop it).
   *
   * @param {object} body an OpenAI chat body
   * @param {object} [options] baseUrl, headers, credentials, fetch, signal,
   *   onDelta(delta, eventId), onFailover(info, eventId), onStream({id})
   * @returns {Promise<object>} as readEvents() (reconnects is always 0)
   */
  async function chatFetch(body, options = {}) {
    const { signal } = options;
    let response;
    try {
      response = await postJson(resolveUrl("/v1/chat/stream", options), body, options,
        { accept: "text/event-stream", signal });
    } catch (cause) {
      if (signal && signal.aborted) throw abortReason(signal);
      throw new StreamsvcError(`POST /v1/chat/stream failed: ${cause.message}`,
        { code: "network_error", retryable: true, cause });
    }
    if (!response.ok) throw await errorFromResponse(response);
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream")) {
      await response.body?.cancel();
      throw new StreamsvcError(`expected text/event-stream, got ${type || "no type"}`,
        { code: "protocol_error", status: response.status });
    }
    const collector = new Collector(options);
    collector.streamId = response.headers.get("X-Stream-ID");
    if (options.onStream) options.onStream({ id: collector.streamId, eventsUrl: null });
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    const parser = new SSEParser();
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (cause) {
          if (signal && signal.aborted) throw abortReason(signal);
          throw new StreamsvcError(`the connection broke: ${cause.message}`,
            { code: "network_error", streamId: collector.streamId, cause });
        }
        const text = chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
        for (const event of parser.feed(text, chunk.done)) {
          if (event.type === "message") collector.delta(event.data, event.lastEventId);
          else if (event.type === "failover") collector.failover(event.data, event.lastEventId);
          else if (event.type === "done") return collector.result(event.data, event.lastEventId);
          else if (event.type === "error") throw errorFromEvent(event.data, event.lastEventId);
        }
        if (chunk.done) {
          throw new StreamsvcError("the stream ended before its done event",
            { code: "network_error", streamId: collector.streamId });
        }
      }
    } finally {
      // Whoever opens the body closes it: after done, on error and on abort.
      reader.cancel().catch(() => undefined);
    }
  }

  /**
   * GET /v1/models: the model names the server serves.
   * @returns {Promise<string[]>}
   */
  async function listModels(options = {}) {
    let response;
    try {
      response = await fetchImpl(options)(resolveUrl("/v1/models", options), {
        headers: { ...options.headers }, credentials: options.credentials || "same-origin",
      });
    } catch (cause) {
      throw new StreamsvcError(`GET /v1/models failed: ${cause.message}`,
        { code: "network_error", retryable: true, cause });
    }
    if (!response.ok) throw await errorFromResponse(response);
    return (await response.json()).data.map((model) => model.id);
  }

  const api = Object.freeze({
    SSEParser,
    StreamsvcError,
    chat,
    chatFetch,
    createStream,
    listModels,
    readEvents,
    stopStream,
    version: VERSION,
  });

  if (typeof module === "object" && module && module.exports) module.exports = api; // CommonJS
  root.streamsvc = api;
})(globalThis);
