// Offline checks of the decoding and request building, on messages made here and sent through the real
// binary encoding; test/live.test.ts runs the client against the real stack.
import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  Explanation,
  InvalidArgumentError,
  Matrix,
  SightlineError,
  UnauthenticatedError,
  proto,
} from "../src/index.js";
import { toSightlineError } from "../src/errors.js";
import { explainSpec, generateRequest } from "../src/requests.js";

function float32Tensor(shape: number[], values: number[]): proto.Tensor {
  const data = new Uint8Array(values.length * 4);
  const view = new DataView(data.buffer);
  values.forEach((value, index) => view.setFloat32(index * 4, value, true));
  return create(proto.TensorSchema, { dtype: proto.DType.FLOAT32, shape: shape.map(BigInt), data });
}

function int32Tensor(shape: number[], values: number[]): proto.Tensor {
  const data = new Uint8Array(values.length * 4);
  const view = new DataView(data.buffer);
  values.forEach((value, index) => view.setInt32(index * 4, value, true));
  return create(proto.TensorSchema, { dtype: proto.DType.INT32, shape: shape.map(BigInt), data });
}

// Four tokens, the last two generated and explained: attributions are [2 targets, 3 sources].
function explanationMessage(attributions: proto.Tensor): proto.Explanation {
  return create(proto.ExplanationSchema, {
    explanationId: "exp_test",
    state: proto.ExplanationState.SUCCEEDED,
    tokens: [
      { id: 1, text: "<s>" },
      { id: 2, text: "Paris" },
      { id: 3, text: " is", logprob: -0.5 },
      { id: 4, text: " nice", logprob: -1.5 },
    ],
    promptLength: 2,
    targetPositions: [2, 3],
    results: [
      {
        method: "input_x_gradient",
        attributions,
        extras: { top_token_ids: int32Tensor([2, 2, 1], [7, -8, 9, 2147483647]) },
      },
    ],
  });
}

test("float32 tensors decode exactly from any byte offset of the response", () => {
  const values = [0.1, -2.5, 0, 3.4028234663852886e38, -1e-45, 0.333];
  const alignments = new Set<number>();
  // 1 to 4 characters of text before the tensor put its bytes at every offset modulo 4 of the parsed buffer,
  // where a Float32Array over the same memory would throw for three of them.
  for (const padding of [1, 2, 3, 4]) {
    const message = explanationMessage(float32Tensor([2, 3], values));
    message.error = "x".repeat(padding);
    const parsed = fromBinary(proto.ExplanationSchema, toBinary(proto.ExplanationSchema, message));
    const offset = parsed.results[0].attributions!.data.byteOffset;
    alignments.add(offset % 4);
    const matrix = new Explanation(parsed).attributions();
    assert.deepEqual(matrix.shape, [2, 3]);
    assert.deepEqual(Array.from(matrix.values), Array.from(new Float32Array(values)), `byte offset ${offset}`);
  }
  assert.equal(alignments.size, 4, "the paddings put the tensor bytes at every alignment");
});

test("int32 extras decode to nested arrays and rows", () => {
  const explanation = new Explanation(explanationMessage(float32Tensor([2, 3], [1, 2, 3, 4, 5, 6])));
  const extra = explanation.result("input_x_gradient").extras.top_token_ids;
  assert.equal(extra.dtype, "int32");
  assert.deepEqual(extra.toArray(), [[[7], [-8]], [[9], [2147483647]]]);
  assert.deepEqual(extra.row(1, 0), [9]);
  assert.deepEqual(extra.row(-1, -1), [2147483647]);
  assert.throws(() => extra.row(2), RangeError);
});

test("topSources ranks the causal prefix by absolute score, ties keeping the earlier position", () => {
  // Row 1 (target at position 3) scores positions 0..2; row 0 (position 2) only 0..1.
  const explanation = new Explanation(explanationMessage(float32Tensor([2, 3], [0.5, -0.5, 0, -1, 1, 2])));
  const first = explanation.topSources(0, 5);
  assert.deepEqual(
    first.map((source) => [source.position, source.score]),
    [
      [0, 0.5],
      [1, -0.5],
    ],
  );
  const second = explanation.topSources(1, 2);
  assert.deepEqual(
    second.map((source) => [source.position, source.token.text, source.score]),
    [
      [2, " is", 2],
      [0, "<s>", -1],
    ],
  );
  assert.throws(() => explanation.topSources(1, 0), RangeError);
});

test("a matrix that does not fit the explanation is refused with the shapes named", () => {
  assert.throws(
    () => new Explanation(explanationMessage(float32Tensor([3, 2], [1, 2, 3, 4, 5, 6]))),
    /attributions of 'input_x_gradient' have shape \[3, 2\], expected \[2, 3\]/,
  );
  assert.throws(() => Matrix.fromProto(float32Tensor([2, 2], [1, 2, 3])), RangeError);
});

test("prompts: text, chat messages and token ids each become their input case", () => {
  assert.equal(generateRequest("Hi", {}).input?.input.case, "prompt");
  const chat = generateRequest([{ role: "user", content: "Hi" }], {}).input?.input;
  assert.equal(chat?.case, "chat");
  assert.deepEqual(
    chat?.case === "chat" && chat.value.messages.map(({ role, content }) => [role, content]),
    [["user", "Hi"]],
  );
  const ids = generateRequest([1, 2, 3], { seed: 7, stop: "." }).input?.input;
  assert.deepEqual(ids?.case === "promptTokenIds" && ids.value.ids, [1, 2, 3]);
  assert.throws(() => generateRequest([], {}), TypeError);
  assert.throws(() => generateRequest([{ role: "user", content: "Hi", name: "x" } as never], {}), /exactly the keys/);
  const sampling = generateRequest("Hi", { seed: 7, stop: ".", maxTokens: 4 }).sampling;
  assert.equal(sampling?.seed, 7n);
  assert.deepEqual(sampling?.stop, ["."]);
  assert.equal(sampling?.temperature, undefined, "unset sampling fields stay unset for the server's defaults");
});

test("explain takes a name, a list or a dict of parameters", () => {
  assert.deepEqual(
    explainSpec("saliency", "sync", undefined)?.methods.map((method) => method.name),
    ["saliency"],
  );
  const spec = explainSpec({ integrated_gradients: { steps: 8 }, occlusion: {} }, "async", { granularity: "word" });
  assert.deepEqual(
    spec?.methods.map((method) => [method.name, method.params]),
    [
      ["integrated_gradients", { steps: 8 }],
      ["occlusion", {}],
    ],
  );
  assert.equal(spec?.mode, proto.ExplainMode.ASYNC);
  assert.equal(spec?.aggregation?.granularity, proto.Granularity.WORD);
  assert.equal(explainSpec([], "sync", undefined), undefined);
  assert.throws(() => explainSpec([], "sync", { faithfulness: true }), /need at least one method/);
  assert.throws(() => explainSpec("saliency", "sync", { spans: [[0, 1, "a"]] }), /only used with granularity 'span'/);
});

test("failed calls become the error class of their status", () => {
  const unauthenticated = toSightlineError(new ConnectError("missing API key", Code.Unauthenticated));
  assert.ok(unauthenticated instanceof UnauthenticatedError && unauthenticated instanceof SightlineError);
  assert.equal(unauthenticated.status, "UNAUTHENTICATED");
  assert.equal(unauthenticated.details, "missing API key");
  assert.equal(unauthenticated.message, "UNAUTHENTICATED: missing API key");
  assert.ok(unauthenticated.isCallerError);
  const invalid = toSightlineError(new ConnectError("bad", Code.InvalidArgument));
  assert.ok(invalid instanceof InvalidArgumentError);
  assert.equal(toSightlineError(new ConnectError("down", Code.Unavailable)).isCallerError, false);
});
