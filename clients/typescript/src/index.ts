// Sightline's TypeScript SDK: explainable LLM inference over gRPC (Connect for Node).
export { Client, DEFAULT_TARGET } from "./client.js";
export type { CallOptions, ClientOptions, EstimateOptions, ListOptions, WaitOptions } from "./client.js";
export * from "./errors.js";
export { Explanation } from "./explanation.js";
export type {
  ExplanationState,
  Faithfulness,
  Fidelity,
  LogitLensLayer,
  MethodProgress,
  MethodResult,
  Progress,
  Source,
  SourceGroup,
  StepScores,
  TargetScore,
  Token,
} from "./explanation.js";
export { cellBox, topCells } from "./images.js";
export type { Box, Cell } from "./images.js";
export { Matrix } from "./matrix.js";
export type { NestedNumbers, TensorDType } from "./matrix.js";
export type {
  ChatMessage,
  ExplainCallOptions,
  ExplainMethods,
  ExplainModeName,
  ExplainOptions,
  GenerateOptions,
  GranularityName,
  NormalizationName,
  ParamValue,
  Prompt,
  TargetScoreName,
} from "./requests.js";
export type {
  Estimate,
  ExplanationPage,
  ExplanationSummary,
  FinishReason,
  Generation,
  MethodInfo,
  MethodParam,
  ParamType,
  StreamChunk,
  Usage,
} from "./results.js";
export { tlsFromFiles } from "./tls.js";
export type { TlsOptions } from "./tls.js";
export * as proto from "./proto.js";
