// The client against a real Sightline stack (gateway, vLLM, Redis, explainer). tests/e2e/test_typescript_client.py
// starts one and runs this file with its addresses in the environment:
//   SIGHTLINE_TARGET            a gateway that requires API keys and serves TLS
//   SIGHTLINE_TLS_CA            the PEM CA that signed its certificate
//   SIGHTLINE_API_KEY           a key it accepts
//   SIGHTLINE_PLAINTEXT_TARGET  a plaintext gateway without keys
//   SIGHTLINE_DECODED_OUT       where to write the decoded explanation for the cross-language check
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, test } from "node:test";
import {
  Client,
  InvalidArgumentError,
  SightlineError,
  UnauthenticatedError,
  tlsFromFiles,
  type Explanation,
  type Generation,
  type StreamChunk,
} from "../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run this file through tests/e2e/test_typescript_client.py`);
  }
  return value;
}

const target = required("SIGHTLINE_TARGET");
const tls = tlsFromFiles({ ca: required("SIGHTLINE_TLS_CA") });
const apiKey = required("SIGHTLINE_API_KEY");
const QUESTION = [{ role: "user", content: "What is the capital of France?" }];
// Explaining on two cores takes a while; the calls still carry a deadline, so a hung stack fails the test.
const TIMEOUT_MS = 300_000;

let client: Client;
let france: Generation;

before(async () => {
  client = new Client(target, { apiKey, tls, timeoutMs: TIMEOUT_MS });
  france = await client.generate(QUESTION, { maxTokens: 16, explain: ["input_x_gradient", "logit_lens"] });
});

after(() => client.close());

function parisIndex(explanation: Explanation): number {
  const index = explanation.targetPositions.findIndex((position) => explanation.tokens[position].text === " Paris");
  assert.notEqual(index, -1, `no " Paris" among the explained tokens of ${JSON.stringify(france.text)}`);
  return index;
}

test("ListMethods over TLS with an API key, and over plaintext without one", async () => {
  const methods = await client.listMethods();
  const byName = new Map(methods.map((method) => [method.name, method]));
  assert.ok(byName.has("input_x_gradient") && byName.has("logit_lens"), [...byName.keys()].join(", "));
  assert.equal(byName.get("input_x_gradient")?.attributesTokens, true);
  assert.equal(byName.get("logit_lens")?.attributesTokens, false);
  const steps = byName.get("integrated_gradients")?.params.find((param) => param.name === "steps");
  assert.equal(steps?.type, "int");
  assert.equal(typeof steps?.defaultValue, "number");

  const plaintext = new Client(required("SIGHTLINE_PLAINTEXT_TARGET"), { timeoutMs: 60_000 });
  try {
    assert.deepEqual(
      (await plaintext.listMethods()).map((method) => method.name),
      methods.map((method) => method.name),
    );
  } finally {
    plaintext.close();
  }
});

test("Generate with a SYNC explanation: the answer, its matrices and top sources", () => {
  assert.match(france.text, /Paris/);
  assert.equal(france.finishReason === "stop" || france.finishReason === "length", true, france.finishReason);
  const explanation = france.explanation;
  assert.ok(explanation, "a SYNC explanation is attached");
  assert.equal(explanation.state, "succeeded");
  assert.equal(explanation.explanationId, france.explanationId);
  // The explained sequence is exactly the prompt and output that were served.
  assert.deepEqual(
    explanation.tokens.map((token) => token.id),
    [...france.promptTokenIds, ...france.outputTokens.map((token) => token.id)],
  );
  assert.equal(explanation.promptLength, france.promptTokenIds.length);
  assert.ok(explanation.fidelity && explanation.fidelity.maxAbsLogprobDiff < 0.02, JSON.stringify(explanation.fidelity));

  const attributions = explanation.attributions("input_x_gradient");
  assert.equal(attributions.dtype, "float32");
  assert.deepEqual(attributions.shape, [explanation.targetPositions.length, explanation.tokens.length - 1]);
  assert.ok(attributions.values.every(Number.isFinite));
  assert.deepEqual(explanation.tokenAttributionMethods, ["input_x_gradient"]);

  const paris = parisIndex(explanation);
  const position = explanation.targetPositions[paris];
  const row = attributions.row(paris);
  // Cells at or after the target's own position are 0; the prefix is attributed.
  assert.ok(row.slice(position).every((cell) => cell === 0));
  assert.ok(row.slice(0, position).some((cell) => cell !== 0));
  const sources = explanation.topSources(paris, 3);
  assert.equal(sources.length, 3);
  for (const source of sources) {
    assert.ok(source.position < position);
    assert.equal(source.score, row[source.position]);
    assert.equal(source.token, explanation.tokens[source.position]);
  }
  const strengths = sources.map((source) => Math.abs(source.score));
  assert.deepEqual(strengths, [...strengths].sort((a, b) => b - a));
  assert.equal(strengths[0], Math.max(...row.slice(0, position).map(Math.abs)));

  // Token roles: the chat template's markup around the question, the question itself as message 0, the answer.
  const prompt = explanation.tokens.slice(0, explanation.promptLength);
  const question = prompt.filter((token) => token.isContent);
  assert.ok(question.every((token) => token.role === "user" && token.messageIndex === 0));
  assert.equal(question.map((token) => token.text).join("").trim(), QUESTION[0].content);
  assert.ok(prompt.some((token) => token.role === "template"));
  assert.ok(explanation.tokens.slice(explanation.promptLength).every((token) => token.role === "output"));
  // Ranked within the words the user wrote, leaving out the template around them.
  const content = explanation.topSources(paris, 3, { contentOnly: true });
  assert.equal(content.length, 3);
  assert.ok(content.every((source) => source.token.isContent && source.position < position));
  const contentStrengths = content.map((source) => Math.abs(source.score));
  assert.deepEqual(contentStrengths, [...contentStrengths].sort((a, b) => b - a));

  // logit_lens: int32 and float32 extras of rank 3, read per layer.
  const layers = explanation.logitLens(paris);
  const lens = explanation.result("logit_lens");
  assert.equal(lens.extras.top_token_ids.dtype, "int32");
  assert.equal(layers.length, lens.extras.top_token_ids.shape[0]);
  assert.ok(layers.length > 2);
  // The last layer is the model's own prediction: greedy decoding chose its top token.
  assert.equal(layers[layers.length - 1].topTokenIds[0], explanation.tokens[position].id);
});

test("GenerateStream: async iteration yields the answer token by token, the explanation last", async () => {
  const chunks: StreamChunk[] = [];
  for await (const chunk of client.generateStream(QUESTION, { maxTokens: 16, explain: "logit_lens" })) {
    chunks.push(chunk);
  }
  // One start, the deltas, one end.
  assert.deepEqual(
    [chunks[0].kind, chunks[chunks.length - 1].kind],
    ["start", "end"],
  );
  assert.ok(chunks.slice(1, -1).length > 1 && chunks.slice(1, -1).every((chunk) => chunk.kind === "delta"));
  assert.deepEqual(chunks[0].promptTokenIds, france.promptTokenIds);
  assert.equal(chunks.map((chunk) => chunk.textDelta).join(""), france.text);
  assert.deepEqual(
    chunks.flatMap((chunk) => chunk.outputTokens.map((token) => token.id)),
    france.outputTokens.map((token) => token.id),
  );
  const last = chunks[chunks.length - 1];
  assert.equal(last.finishReason, france.finishReason);
  assert.equal(last.usage?.outputTokens, france.outputTokens.length);
  assert.equal(last.explanation?.state, "succeeded");
  assert.deepEqual(Object.keys(last.explanation?.results ?? {}), ["logit_lens"]);
  assert.ok(chunks.slice(0, -1).every((chunk) => chunk.finishReason === undefined && chunk.explanation === undefined));

  // Leaving the loop at the first tokens ends the call there; the client goes on serving.
  let first: StreamChunk | undefined;
  for await (const chunk of client.generateStream(QUESTION, { maxTokens: 16 })) {
    if (chunk.kind === "delta") {
      first = chunk;
      break;
    }
  }
  assert.ok(first && first.outputTokens.length >= 1 && france.text.startsWith(first.textDelta), JSON.stringify(first));
  assert.ok((await client.listMethods()).length > 0);
});

test("GetExplanation fetches an ASYNC explanation by id once it is done", async () => {
  const generation = await client.generate(QUESTION, { maxTokens: 8, explain: "logit_lens", mode: "async" });
  assert.equal(generation.explanation, undefined);
  assert.match(generation.explanationId, /^exp_/);
  const explanation = await client.getExplanation(generation.explanationId, { waitSeconds: 120 });
  assert.equal(explanation.state, "succeeded");
  assert.ok(explanation.finished);
  assert.equal(explanation.explanationId, generation.explanationId);
  assert.deepEqual(
    explanation.tokens.slice(explanation.promptLength).map((token) => token.id),
    generation.outputTokens.map((token) => token.id),
  );
  assert.deepEqual(Object.keys(explanation.results), ["logit_lens"]);
});

test("a missing or wrong API key is an UnauthenticatedError", async () => {
  for (const key of [undefined, `${apiKey}x`]) {
    const stranger = new Client(target, { apiKey: key, tls, timeoutMs: 60_000 });
    try {
      await assert.rejects(stranger.listMethods(), (error: unknown) => {
        assert.ok(error instanceof UnauthenticatedError, String(error));
        assert.ok(error instanceof SightlineError);
        assert.equal(error.status, "UNAUTHENTICATED");
        assert.ok(error.isCallerError);
        assert.ok(error.details.length > 0);
        return true;
      });
    } finally {
      stranger.close();
    }
  }
});

test("a bad request is an InvalidArgumentError naming what is wrong", async () => {
  await assert.rejects(client.generate(QUESTION, { maxTokens: 4, explain: ["no_such_method"] }), (error: unknown) => {
    assert.ok(error instanceof InvalidArgumentError, String(error));
    assert.equal(error.status, "INVALID_ARGUMENT");
    assert.match(error.details, /no_such_method/);
    assert.match(error.details, /input_x_gradient/, "the message lists the methods that exist");
    return true;
  });
  // An unknown explanation id is a caller error too, of its own class.
  await assert.rejects(client.getExplanation("exp_00000000000000000000000000000000"), (error: unknown) => {
    assert.ok(error instanceof SightlineError && error.isCallerError, String(error));
    return true;
  });
});

test("the README's example answers and explains the France question", async () => {
  const example = fileURLToPath(new URL("../examples/france.js", import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [example, required("SIGHTLINE_PLAINTEXT_TARGET")], {
    timeout: TIMEOUT_MS,
  });
  const [answer, ...sources] = stdout.trim().split("\n");
  assert.match(answer, /Paris/);
  assert.equal(sources.length, 3, stdout);
  for (const line of sources) {
    assert.match(line, /^\d+ ".*" -?\d+\.\d{4}$/);
  }
});

test("the decoded explanation, written for the cross-language comparison", () => {
  const explanation = france.explanation!;
  const decoded = {
    explanationId: explanation.explanationId,
    tokenIds: explanation.tokens.map((token) => token.id),
    targetPositions: explanation.targetPositions,
    attributions: explanation.attributions("input_x_gradient").toArray(),
    logitLens: Object.fromEntries(
      Object.entries(explanation.result("logit_lens").extras).map(([name, matrix]) => [name, matrix.toArray()]),
    ),
    topSources: explanation.targetPositions.map((_, index) =>
      explanation.topSources(index, 5).map((source) => [source.position, source.token.id, source.score]),
    ),
    contentTopSources: explanation.targetPositions.map((_, index) =>
      explanation
        .topSources(index, 5, { contentOnly: true })
        .map((source) => [source.position, source.token.id, source.score]),
    ),
  };
  writeFileSync(required("SIGHTLINE_DECODED_OUT"), JSON.stringify(decoded));
});
