// Typed views of the responses besides the explanation itself: generations, stream chunks, the method
// catalogue, estimates and explanation listings (the Python SDK's sightline.types, camelCase).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import {
  ParamType as ParamTypeProto,
  type EstimateExplanationResponse,
  type ListExplanationsResponse,
  type MethodInfo as MethodInfoProto,
  type MethodParam as MethodParamProto,
} from "./gen/sightline/v1/explanations_pb.js";
import type { GenerateResponse, GenerateStreamResponse } from "./gen/sightline/v1/inference_pb.js";
import { FinishReason as FinishReasonProto } from "./gen/sightline/v1/types_pb.js";
import type { Explanation as ExplanationProto, Usage as UsageProto } from "./gen/sightline/v1/types_pb.js";
import type { ParamValue } from "./requests.js";
import { Explanation, decodeExplanationState, decodeToken, type ExplanationState, type Token } from "./explanation.js";

export type FinishReason = "unspecified" | "stop" | "length" | "abort" | "context_length";
export type ParamType = "unspecified" | "int" | "float" | "string" | "bool";

// Values a newer server may add read as "unspecified" rather than failing the whole response.
const FINISH_REASONS: Partial<Record<FinishReasonProto, FinishReason>> = {
  [FinishReasonProto.STOP]: "stop",
  [FinishReasonProto.LENGTH]: "length",
  [FinishReasonProto.ABORT]: "abort",
  [FinishReasonProto.CONTEXT_LENGTH]: "context_length",
};
const PARAM_TYPES: Partial<Record<ParamTypeProto, ParamType>> = {
  [ParamTypeProto.INT]: "int",
  [ParamTypeProto.FLOAT]: "float",
  [ParamTypeProto.STRING]: "string",
  [ParamTypeProto.BOOL]: "bool",
};

export interface Usage {
  readonly inputTokens: number;
  readonly outputTokens: number;
}

export interface Generation {
  readonly requestId: string;
  readonly traceId: string;
  readonly model: string;
  readonly text: string;
  readonly promptTokenIds: readonly number[];
  readonly outputTokens: readonly Token[];
  readonly finishReason: FinishReason;
  readonly usage: Usage;
  /** Set when an explanation was requested. */
  readonly explanationId: string;
  /** Attached in sync mode; in async mode fetch it with `getExplanation(explanationId)`. */
  readonly explanation: Explanation | undefined;
  readonly raw: GenerateResponse;
}

/**
 * One message of a generation stream: the start (`kind` "start", with the prompt's token ids), the tokens
 * produced since the previous message ("delta"), or the end ("end", with the finish reason, usage and
 * explanation). Fields a kind does not carry are empty or undefined.
 */
export interface StreamChunk {
  readonly kind: "start" | "delta" | "end";
  readonly requestId: string;
  readonly traceId: string;
  readonly outputTokens: readonly Token[];
  readonly textDelta: string;
  /** Set on the start only. */
  readonly promptTokenIds: readonly number[];
  /** Set on the end only, like `usage` and the explanation. */
  readonly finishReason: FinishReason | undefined;
  readonly usage: Usage | undefined;
  readonly explanationId: string;
  readonly explanation: Explanation | undefined;
  readonly raw: GenerateStreamResponse;
}

export interface MethodParam {
  readonly name: string;
  readonly type: ParamType;
  /** The value used when a request leaves the parameter out, of the parameter's type. */
  readonly defaultValue: ParamValue | undefined;
  readonly description: string;
  /** Inclusive bounds of a numeric parameter, if it has them. */
  readonly minimum: number | undefined;
  readonly maximum: number | undefined;
  /** The accepted values of a string parameter that is an enumeration; else empty. */
  readonly choices: readonly string[];
}

export interface MethodInfo {
  readonly name: string;
  readonly description: string;
  readonly params: readonly MethodParam[];
  readonly needsGradients: boolean;
  readonly usesCache: boolean;
  readonly supportsContrastiveTargets: boolean;
  readonly multimodal: boolean;
  /** Whether results carry a `[targets, tokens - 1]` attribution matrix. */
  readonly attributesTokens: boolean;
  readonly raw: MethodInfoProto;
}

/** An explanation's predicted cost on a deployment, before queueing it. */
export interface Estimate {
  /** Forward passes over the whole sequence, all methods together. */
  readonly passes: number;
  /** Worker seconds (0 until a worker has measured its seconds per pass). */
  readonly seconds: number;
  /** By method, in request order. */
  readonly methods: Readonly<Record<string, { passes: number; seconds: number }>>;
}

/** One entry of `listExplanations`: what was explained, when, and how it stands. */
export interface ExplanationSummary {
  readonly explanationId: string;
  readonly state: ExplanationState;
  readonly model: string;
  readonly methods: readonly string[];
  readonly createdAt: Date | undefined;
  readonly traceId: string;
}

export interface ExplanationPage {
  readonly explanations: readonly ExplanationSummary[];
  /** Pass as `pageToken` for the next page; empty on the last one. */
  readonly nextPageToken: string;
}

function decodeUsage(usage: UsageProto | undefined): Usage | undefined {
  return usage && { inputTokens: usage.inputTokens, outputTokens: usage.outputTokens };
}

function optionalExplanation(explanation: ExplanationProto | undefined): Explanation | undefined {
  return explanation && new Explanation(explanation);
}

export function decodeGeneration(response: GenerateResponse): Generation {
  return {
    requestId: response.requestId,
    traceId: response.traceId,
    model: response.model,
    text: response.text,
    promptTokenIds: [...response.promptTokenIds],
    outputTokens: response.outputTokens.map(decodeToken),
    finishReason: FINISH_REASONS[response.finishReason] ?? "unspecified",
    usage: decodeUsage(response.usage) ?? { inputTokens: 0, outputTokens: 0 },
    explanationId: response.explanationId,
    explanation: optionalExplanation(response.explanation),
    raw: response,
  };
}

export function decodeStreamChunk(response: GenerateStreamResponse): StreamChunk {
  const { event } = response;
  if (event.case === undefined) {
    throw new RangeError("a stream message is neither start, delta nor end");
  }
  const start = event.case === "start" ? event.value : undefined;
  const delta = event.case === "delta" ? event.value : undefined;
  const end = event.case === "end" ? event.value : undefined;
  return {
    kind: event.case,
    requestId: response.requestId,
    traceId: response.traceId,
    outputTokens: (delta?.outputTokens ?? []).map(decodeToken),
    textDelta: delta?.textDelta ?? "",
    promptTokenIds: [...(start?.promptTokenIds ?? [])],
    finishReason:
      end === undefined || end.finishReason === FinishReasonProto.UNSPECIFIED
        ? undefined
        : (FINISH_REASONS[end.finishReason] ?? "unspecified"),
    usage: decodeUsage(end?.usage),
    explanationId: end?.explanationId ?? "",
    explanation: optionalExplanation(end?.explanation),
    raw: response,
  };
}

function decodeMethodParam(param: MethodParamProto): MethodParam {
  return {
    name: param.name,
    type: PARAM_TYPES[param.type] ?? "unspecified",
    defaultValue: param.defaultValue?.kind.value,
    description: param.description,
    minimum: param.minimum,
    maximum: param.maximum,
    choices: [...param.choices],
  };
}

export function decodeMethodInfo(info: MethodInfoProto): MethodInfo {
  return {
    name: info.name,
    description: info.description,
    params: info.params.map(decodeMethodParam),
    needsGradients: info.needsGradients,
    usesCache: info.usesCache,
    supportsContrastiveTargets: info.supportsContrastiveTargets,
    multimodal: info.multimodal,
    attributesTokens: info.attributesTokens,
    raw: info,
  };
}

export function decodeEstimate(response: EstimateExplanationResponse): Estimate {
  const methods: Record<string, { passes: number; seconds: number }> = {};
  for (const { method, passes, seconds } of response.methods) {
    methods[method] = { passes, seconds };
  }
  return { passes: response.passes, seconds: response.seconds, methods };
}

export function decodeExplanationPage(response: ListExplanationsResponse): ExplanationPage {
  return {
    explanations: response.explanations.map((summary) => ({
      explanationId: summary.explanationId,
      state: decodeExplanationState(summary.state),
      model: summary.model,
      methods: [...summary.methods],
      createdAt: summary.createdAt && timestampDate(summary.createdAt),
      traceId: summary.traceId,
    })),
    nextPageToken: response.nextPageToken,
  };
}
