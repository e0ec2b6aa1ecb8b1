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
  topCells,
} from "../src/index.js";
import { toSightlineError } from "../src/errors.js";
import { explainSpec, generateRequest } from "../src/requests.js";

function float32Tensor(shape: number[], values: number[]): proto.Tensor {
  return create(proto.TensorSchema, { dtype: proto.Dtype.FLOAT32, shape, floatValues: values });
}

function int32Tensor(shape: number[], values: number[]): proto.Tensor {
  return create(proto.TensorSchema, { dtype: proto.Dtype.INT32, shape, intValues: values });
}

// Four tokens, the last two generated and explained: attributions are [2 targets, 3 sources].
function explanationMessage(attributions: proto.Tensor): proto.Explanation {
  return create(proto.ExplanationSchema, {
    explanationId: "exp_test",
    state: proto.ExplanationState.SUCCEEDED,
    tokens: [
      { id: 1, text: "<s>", role: proto.TokenRole.TEMPLATE },
      { id: 2, text: "Paris", role: proto.TokenRole.USER, messageIndex: 0 },
      { id: 3, text: " is", logprob: -0.5, role: proto.TokenRole.OUTPUT },
      { id: 4, text: " nice", logprob: -1.5, role: proto.TokenRole.OUTPUT },
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

test("float32 tensors survive the binary encoding exactly, as raw little-endian float32 on the wire", () => {
  const values = [0.1, -2.5, 0, 3.4028234663852886e38, -1e-45, 0.333];
  const message = explanationMessage(float32Tensor([2, 3], values));
  const parsed = fromBinary(proto.ExplanationSchema, toBinary(proto.ExplanationSchema, message));
  const matrix = new Explanation(parsed).attributions();
  assert.equal(matrix.dtype, "float32");
  assert.deepEqual(matrix.shape, [2, 3]);
  // Each number is the float32 nearest the one written, unchanged by decoding.
  assert.deepEqual(Array.from(matrix.values), Array.from(new Float32Array(values)));
  assert.deepEqual(matrix.toArray(), [Array.from(new Float32Array(values.slice(0, 3))), Array.from(new Float32Array(values.slice(3)))]);
  // The packed field's payload is the float32 bytes themselves (what the proto documents for other clients).
  const bytes = toBinary(proto.TensorSchema, float32Tensor([2, 3], values));
  const raw = new Uint8Array(new Float32Array(values).buffer);
  assert.deepEqual(bytes.slice(bytes.length - raw.length), raw);
});

test("a tensor whose elements are not where its dtype says, or do not fill its shape, is refused", () => {
  const mixed = create(proto.TensorSchema, { dtype: proto.Dtype.FLOAT32, shape: [1], intValues: [1] });
  assert.throws(() => Matrix.fromProto(mixed), /float32 tensor carries 1 int_values/);
  assert.throws(() => Matrix.fromProto(float32Tensor([2, 2], [1, 2, 3])), /3 values do not fill a float32 tensor of shape \[2, 2\]/);
  assert.throws(() => Matrix.fromProto(create(proto.TensorSchema, { shape: [0] })), /unsupported tensor dtype 0/);
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
  // Only the caller's words: the template token at position 0 is left out.
  assert.deepEqual(
    explanation.topSources(1, 5, { contentOnly: true }).map((source) => source.position),
    [1],
  );
  assert.deepEqual(
    explanation.tokens.map((token) => [token.role, token.messageIndex, token.isContent]),
    [
      ["template", undefined, false],
      ["user", 0, true],
      ["output", undefined, false],
      ["output", undefined, false],
    ],
  );
});

test("a matrix that does not fit the explanation is refused with the shapes named", () => {
  assert.throws(
    () => new Explanation(explanationMessage(float32Tensor([3, 2], [1, 2, 3, 4, 5, 6]))),
    /attributions of 'input_x_gradient' have shape \[3, 2\], expected \[2, 3\]/,
  );
});

test("prompts: text, chat messages and token ids each become their input case", () => {
  assert.equal(generateRequest("Hi", {}).input?.kind.case, "prompt");
  const chat = generateRequest([{ role: "user", content: "Hi" }], {}).input?.kind;
  assert.equal(chat?.case, "chat");
  assert.deepEqual(
    chat?.case === "chat" && chat.value.messages.map(({ role, content }) => [role, content]),
    [["user", "Hi"]],
  );
  const ids = generateRequest([1, 2, 3], { seed: 7, stop: "." }).input?.kind;
  assert.deepEqual(ids?.case === "promptTokenIds" && ids.value.ids, [1, 2, 3]);
  assert.throws(() => generateRequest([], {}), TypeError);
  assert.throws(() => generateRequest([{ role: "user", content: "Hi", name: "x" } as never], {}), /exactly the keys/);
  const sampling = generateRequest("Hi", { seed: 7, stop: ".", maxTokens: 4 }).sampling;
  assert.equal(sampling?.seed, 7);
  assert.deepEqual(sampling?.stop, ["."]);
  assert.equal(sampling?.temperature, undefined, "unset sampling fields stay unset for the server's defaults");
});

test("explain takes a name, a list or a dict of typed parameters", () => {
  assert.deepEqual(
    explainSpec("saliency", "sync", undefined)?.methods.map((method) => method.name),
    ["saliency"],
  );
  const spec = explainSpec(
    { integrated_gradients: { steps: 8, baseline: "pad", alpha: 0.5, big: 2 ** 40, absolute: true }, occlusion: {} },
    "async",
    { granularity: "word" },
  );
  assert.deepEqual(
    spec?.methods.map((method) => [
      method.name,
      Object.fromEntries(Object.entries(method.params).map(([name, value]) => [name, [value.kind.case, value.kind.value]])),
    ]),
    [
      [
        "integrated_gradients",
        {
          steps: ["intValue", 8],
          baseline: ["stringValue", "pad"],
          alpha: ["floatValue", 0.5],
          big: ["floatValue", 2 ** 40],
          absolute: ["boolValue", true],
        },
      ],
      ["occlusion", {}],
    ],
  );
  assert.throws(() => explainSpec({ occlusion: { window: null as never } }, "sync", undefined), /must be a boolean, number or string/);
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

test("topCells ranks every picture's cells with their boxes in the picture as sent", () => {
  // Two 2 x 2 grids over 224 x 224 seen pixels; picture 0 was sent at 448 x 448, picture 1 at 112 x 224.
  const grid = (imageIndex: number, originalWidth: number, originalHeight: number) => ({
    imageIndex, rows: 2, cols: 2, height: 224, width: 224, rowEdges: [0, 112, 224], colEdges: [0, 112, 224],
    originalWidth, originalHeight,
  });
  const message = explanationMessage(float32Tensor([2, 3], [0, 0, 0, 1, 2, 0]));
  message.imageGrids = [grid(0, 448, 448), grid(1, 112, 224)].map((g) => create(proto.ImageGridSchema, g));
  message.results.push(
    create(proto.MethodResultSchema, {
      method: "occlusion",
      imageAttributions: [
        { imageIndex: 0, cells: float32Tensor([2, 2, 2], [0.25, 0, 0, 0.5, 0, -0.75, 0.125, 0]) },
        { imageIndex: 1, cells: float32Tensor([2, 2, 2], [0, 0.375, 0, 0, -0.5, 0, 0, 0]) },
      ],
    }),
  );
  const explanation = new Explanation(fromBinary(proto.ExplanationSchema, toBinary(proto.ExplanationSchema, message)));
  assert.deepEqual(topCells(explanation, 0, 3), [
    { imageIndex: 0, row: 1, col: 1, box: { left: 224, top: 224, right: 448, bottom: 448 }, score: 0.5 },
    { imageIndex: 1, row: 0, col: 1, box: { left: 56, top: 0, right: 112, bottom: 112 }, score: 0.375 },
    { imageIndex: 0, row: 0, col: 0, box: { left: 0, top: 0, right: 224, bottom: 224 }, score: 0.25 },
  ]);
  assert.deepEqual(topCells(explanation, 1, 1, "occlusion"), [
    { imageIndex: 0, row: 0, col: 1, box: { left: 224, top: 0, right: 448, bottom: 224 }, score: -0.75 },
  ]);
  assert.throws(() => topCells(explanation, 0, 1, "input_x_gradient"), /scores no picture cells/);
  assert.throws(() => topCells(explanation, 2, 1), /do not hold target 2/);
});
