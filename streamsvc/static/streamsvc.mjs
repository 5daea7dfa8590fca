/*
 * streamsvc browser client as an ES module:
 *
 *   import { chat, StreamsvcError } from "/static/streamsvc.mjs";
 *
 * The code lives in streamsvc.js, a classic script that also works in a plain
 * <script> tag; importing it here runs it once (as part of this module graph)
 * and it defines globalThis.streamsvc, which is re-exported below. Use one
 * form per page: the two forms are two copies, and an error of one is not an
 * instanceof the other's StreamsvcError.
 */
import "./streamsvc.js";

const api = globalThis.streamsvc;

export const {
  SSEParser,
  StreamsvcError,
  chat,
  chatFetch,
  createStream,
  listModels,
  readEvents,
  stopStream,
  version,
} = api;

export default api;
