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

/** One message of a generation stream: the tokens produced since the previous one. */
export interface StreamChunk {
  readonly requestId: string;
  readonly traceId: string;
  readonly outputTokens: readonly Token[];
  readonly textDelta: string;
  /** Set on the first chunk only. */
  readonly promptTokenIds: readonly number[];
  /** Set on the last chunk only, like `usage` and the explanation. */
  readonly finishReason: FinishReason | undefined;
  readonly usage: Usage | undefined;
  readonly explanationId: string;
  readonly explanation: Explanation | undefined;
  readonly raw: GenerateStreamResponse;
}

export interface MethodParam {
  readonly name: string;
  readonly type: ParamType;
  /** The default rendered as text. */
  readonly defaultValue: string;
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
  return {
    requestId: response.requestId,
    traceId: response.traceId,
    outputTokens: response.outputTokens.map(decodeToken),
    textDelta: response.textDelta,
    promptTokenIds: [...response.promptTokenIds],
    finishReason:
      response.finishReason === FinishReasonProto.UNSPECIFIED
        ? undefined
        : (FINISH_REASONS[response.finishReason] ?? "unspecified"),
    usage: decodeUsage(response.usage),
    explanationId: response.explanationId,
    explanation: optionalExplanation(response.explanation),
    raw: response,
  };
}

function decodeMethodParam(param: MethodParamProto): MethodParam {
  return {
    name: param.name,
    type: PARAM_TYPES[param.type] ?? "unspecified",
    defaultValue: param.defaultValue,
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
