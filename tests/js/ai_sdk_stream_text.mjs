// The Vercel AI SDK's default OpenAI provider, as its README shows it: createOpenAI({baseURL})(model)
// calls POST /v1/responses. Usage: node ai_sdk_stream_text.mjs BASE_URL MODEL PROMPT_FILE
// Prints one JSON line: {"text", "finishReason", "usage"}.
import { readFileSync } from "node:fs";
import { createOpenAI } from "@ai-sdk/openai";
import { streamText } from "ai";

const [baseURL, model, promptFile] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: "unused" });
const result = streamText({ model: openai(model), prompt: readFileSync(promptFile, "utf8") });
let text = "";
for await (const part of result.textStream) text += part;
console.log(JSON.stringify({
  text, finishReason: await result.finishReason, usage: await result.usage,
}));
