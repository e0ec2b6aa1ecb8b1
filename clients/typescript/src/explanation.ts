// Typed, read-only views of an explanation, decoded from `sightline.v1.Explanation` (the Python SDK's
// sightline.types.Explanation and its parts, with camelCase names).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  ExplanationErrorCode as ExplanationErrorCodeProto,
  ExplanationState as ExplanationStateProto,
  TargetScore as TargetScoreProto,
  TokenRole as TokenRoleProto,
  type Explanation as ExplanationProto,
  type Faithfulness as FaithfulnessProto,
  type MethodResult as MethodResultProto,
  type StepScores as StepScoresProto,
  type Token as TokenProto,
} from "./gen/sightline/v1/types_pb.js";
import { Matrix, optionalMatrix } from "./matrix.js";

export type ExplanationState = "unspecified" | "pending" | "running" | "succeeded" | "failed" | "cancelled";
/** What an explained token's score was; attributions explain this number. */
export type TargetScore = "unspecified" | "logprob" | "probability" | "logit";
/** Which part of a sequence a token belongs to: the chat template's markup, a system prompt, a user's or an
 * earlier assistant message's content, a text or token-id prompt (all the caller's), or generated output. */
export type TokenRole = "unspecified" | "template" | "system" | "user" | "assistant" | "prompt" | "output";
/** Why an explanation failed: the request is invalid for the model ("invalid_input", not retried), every worker
 * that took it stopped ("attempts_exhausted"), or a method failed unexpectedly ("internal", a server bug). */
export type ExplanationErrorCode = "unspecified" | "invalid_input" | "attempts_exhausted" | "internal";

// Values a newer server may add read as "unspecified" rather than failing the whole response.
const EXPLANATION_STATES: Partial<Record<ExplanationStateProto, ExplanationState>> = {
  [ExplanationStateProto.PENDING]: "pending",
  [ExplanationStateProto.RUNNING]: "running",
  [ExplanationStateProto.SUCCEEDED]: "succeeded",
  [ExplanationStateProto.FAILED]: "failed",
  [ExplanationStateProto.CANCELLED]: "cancelled",
};
const TARGET_SCORES: Partial<Record<TargetScoreProto, TargetScore>> = {
  // The protocol treats an unset score as the log-probability.
  [TargetScoreProto.UNSPECIFIED]: "logprob",
  [TargetScoreProto.LOGPROB]: "logprob",
  [TargetScoreProto.PROBABILITY]: "probability",
  [TargetScoreProto.LOGIT]: "logit",
};
const TOKEN_ROLES: Partial<Record<TokenRoleProto, TokenRole>> = {
  [TokenRoleProto.TEMPLATE]: "template",
  [TokenRoleProto.SYSTEM]: "system",
  [TokenRoleProto.USER]: "user",
  [TokenRoleProto.ASSISTANT]: "assistant",
  [TokenRoleProto.PROMPT]: "prompt",
  [TokenRoleProto.OUTPUT]: "output",
};
const ERROR_CODES: Partial<Record<ExplanationErrorCodeProto, ExplanationErrorCode>> = {
  [ExplanationErrorCodeProto.INVALID_INPUT]: "invalid_input",
  [ExplanationErrorCodeProto.ATTEMPTS_EXHAUSTED]: "attempts_exhausted",
  [ExplanationErrorCodeProto.INTERNAL]: "internal",
};
const FINAL_STATES: ReadonlySet<ExplanationState> = new Set(["succeeded", "failed", "cancelled"]);

export function decodeExplanationState(state: ExplanationStateProto): ExplanationState {
  return EXPLANATION_STATES[state] ?? "unspecified";
}

export interface Token {
  readonly id: number;
  /** The token's text as the tokenizer renders it on its own (may be a word piece). */
  readonly text: string;
  /** The serving engine's log-probability, for generated tokens. */
  readonly logprob: number | undefined;
  /** Which part of the sequence the token belongs to (set on an explanation's tokens). */
  readonly role: TokenRole;
  /** For a token of a chat message's content: the message's index in the request's messages. */
  readonly messageIndex: number | undefined;
  /** Whether the caller wrote this token: a chat message's content, or a text or token-id prompt (not the chat
   * template's markup or default system prompt, nor generated output). */
  readonly isContent: boolean;
}

export function decodeToken(token: TokenProto): Token {
  const role = TOKEN_ROLES[token.role] ?? "unspecified";
  return {
    id: token.id,
    text: token.text,
    logprob: token.logprob,
    role,
    messageIndex: token.messageIndex,
    isContent: token.messageIndex !== undefined || role === "prompt",
  };
}

/** Why an explanation failed. */
export interface ExplanationError {
  readonly code: ExplanationErrorCode;
  /** What happened, for a person. */
  readonly message: string;
  /** Machine-readable context: "attempts", and "exception" for "internal". */
  readonly details: Readonly<Record<string, string>>;
}

/** Options of `topSources` and `topGroups`. */
export interface RankOptions {
  /** The method whose matrix to rank; by default the first that has one. */
  method?: string;
  /** `topSources` only: rank only the tokens the caller wrote (`Token.isContent`), e.g. a chat's message
   * contents without the template around them. */
  contentOnly?: boolean;
}

/** One source token's contribution to a target token. */
export interface Source {
  readonly position: number;
  readonly token: Token;
  readonly score: number;
}

/** Source tokens `[start, end)` that aggregated attributions are reported for: a word or a span. */
export interface SourceGroup {
  readonly start: number;
  readonly end: number;
  readonly label: string;
}

/** ERASER faithfulness of one method's attributions, averaged over the explained tokens. */
export interface Faithfulness {
  readonly fractions: readonly number[];
  readonly comprehensiveness: readonly number[];
  readonly sufficiency: readonly number[];
  readonly randomComprehensiveness: readonly number[];
  readonly randomSufficiency: readonly number[];
  readonly aopcComprehensiveness: number;
  readonly aopcSufficiency: number;
  readonly randomAopcComprehensiveness: number;
  readonly randomAopcSufficiency: number;
  /** The token id that stood in for removed tokens. */
  readonly replacementTokenId: number;
  /** Whether the attributions beat random ones on both AOPC metrics. */
  readonly beatsRandom: boolean;
}

export interface MethodResult {
  readonly method: string;
  /** float32 `[targets, tokens - 1]`: row `i` scores every token before target `i`; undefined for methods
   * that do not attribute to tokens. */
  readonly attributions: Matrix | undefined;
  /** Method-specific outputs, e.g. logit lens `top_token_ids`, `top_logprobs`, `target_logprobs`. */
  readonly extras: Readonly<Record<string, Matrix>>;
  readonly seconds: number;
  /** float32 `[targets, sourceGroups.length]`: attributions per source group, as the explain options asked. */
  readonly aggregated: Matrix | undefined;
  readonly faithfulness: Faithfulness | undefined;
}

/** How the explainer's replica of the model scored each explained token (target index order). */
export interface StepScores {
  readonly logprobs: readonly number[];
  readonly probabilities: readonly number[];
  /** Entropy (nats) of the next-token distribution at the explained position. */
  readonly entropies: readonly number[];
  /** 1 when the explained token was the most likely one. */
  readonly ranks: readonly number[];
  /** int32 `[targets, k]`: the most likely tokens at each explained position. */
  readonly topTokenIds: Matrix;
  /** float32 `[targets, k]`: their log-probabilities. */
  readonly topLogprobs: Matrix;
}

export interface Fidelity {
  readonly recomputedLogprobs: readonly number[];
  /** max |recomputed - served| over the generated tokens. */
  readonly maxAbsLogprobDiff: number;
}

export interface MethodProgress {
  readonly method: string;
  readonly fraction: number;
  readonly secondsLeft: number;
}

/** How far a job has got, as its worker last published it; `fraction` is 1 only once it succeeded. */
export interface Progress {
  readonly fraction: number;
  readonly secondsLeft: number;
  readonly methods: readonly MethodProgress[];
}

/** What one layer's residual stream predicts at one target position. */
export interface LogitLensLayer {
  /** 0 is the embedding output, the last is the final layer. */
  readonly layer: number;
  readonly topTokenIds: readonly number[];
  readonly topLogprobs: readonly number[];
  /** This layer's log-probability of the token actually at the target position. */
  readonly targetLogprob: number;
}

type MatrixKind = "attributions" | "aggregated";
const MATRIX_KINDS: Record<MatrixKind, { has: string; lacks: string }> = {
  attributions: { has: "attributes to tokens", lacks: "does not attribute to tokens" },
  aggregated: { has: "has aggregated attributions", lacks: "has no aggregated attributions" },
};

/** An explanation: every token, the explained (target) positions, and each method's result. */
export class Explanation {
  readonly explanationId: string;
  readonly state: ExplanationState;
  /** Why the explanation failed, when state is "failed". */
  readonly error: ExplanationError | undefined;
  readonly model: string;
  readonly weightsDigest: string;
  /** Every token of the sequence: prompt first, then the generated output. */
  readonly tokens: readonly Token[];
  readonly promptLength: number;
  /** Indices into `tokens` of the tokens explained; "target index" below indexes this. */
  readonly targetPositions: readonly number[];
  /** Results by method name, in the order the server sent them. */
  readonly results: Readonly<Record<string, MethodResult>>;
  readonly fidelity: Fidelity | undefined;
  /** The foil of each explained token, for contrastive explanations; else empty. */
  readonly foilTokenIds: readonly number[];
  readonly targetScore: TargetScore;
  readonly stepScores: StepScores | undefined;
  /** The groups `MethodResult.aggregated` is reported over, in sequence order. */
  readonly sourceGroups: readonly SourceGroup[];
  /** Whether the hidden states came from the cache rather than a fresh forward pass. */
  readonly cacheHit: boolean;
  readonly traceId: string;
  readonly attempts: number;
  readonly createdAt: Date | undefined;
  readonly completedAt: Date | undefined;
  /** Who stopped the explanation and how, when state is "cancelled". */
  readonly cancelledBy: string;
  /** How far the job has got, while pending or running (1 once succeeded). */
  readonly progress: Progress | undefined;
  /** The message this was decoded from, for fields this class does not map. */
  readonly raw: ExplanationProto;

  /** Decode and check an explanation; throws RangeError when its parts do not fit together. */
  constructor(explanation: ExplanationProto) {
    this.explanationId = explanation.explanationId;
    this.state = decodeExplanationState(explanation.state);
    this.error = explanation.error && {
      code: ERROR_CODES[explanation.error.code] ?? "unspecified",
      message: explanation.error.message,
      details: { ...explanation.error.details },
    };
    this.model = explanation.model;
    this.weightsDigest = explanation.weightsDigest;
    this.tokens = explanation.tokens.map(decodeToken);
    this.promptLength = explanation.promptLength;
    this.targetPositions = [...explanation.targetPositions];
    const results: Record<string, MethodResult> = {};
    for (const result of explanation.results) {
      results[result.method] = decodeMethodResult(result); // a method listed twice keeps its last result
    }
    this.results = results;
    this.fidelity = explanation.fidelity && {
      recomputedLogprobs: [...explanation.fidelity.recomputedLogprobs],
      maxAbsLogprobDiff: explanation.fidelity.maxAbsLogprobDiff,
    };
    this.foilTokenIds = [...explanation.foilTokenIds];
    this.targetScore = TARGET_SCORES[explanation.targetScore] ?? "unspecified";
    this.stepScores = explanation.stepScores && decodeStepScores(explanation.stepScores);
    this.sourceGroups = explanation.sourceGroups.map(({ start, end, label }) => ({ start, end, label }));
    this.cacheHit = explanation.cacheHit;
    this.traceId = explanation.traceId;
    this.attempts = explanation.attempts;
    this.createdAt = optionalDate(explanation.createdAt);
    this.completedAt = optionalDate(explanation.completedAt);
    this.cancelledBy = explanation.cancelledBy;
    this.progress = explanation.progress && {
      fraction: explanation.progress.fraction,
      secondsLeft: explanation.progress.secondsLeft,
      methods: explanation.progress.methods.map(({ method, fraction, secondsLeft }) => ({
        method,
        fraction,
        secondsLeft,
      })),
    };
    this.raw = explanation;
    this.check();
  }

  /** Whether the explanation reached a final state (succeeded, failed or cancelled). */
  get finished(): boolean {
    return FINAL_STATES.has(this.state);
  }

  /** Names of the results that carry an attribution matrix, in result order. */
  get tokenAttributionMethods(): string[] {
    return this.methodsWith("attributions");
  }

  result(method: string): MethodResult {
    const result = this.results[method];
    if (result === undefined) {
      throw new RangeError(`no result for method '${method}'; results: ${Object.keys(this.results).sort().join(", ")}`);
    }
    return result;
  }

  /** The attribution matrix of `method`, by default of the first method that has one. */
  attributions(method?: string): Matrix {
    return this.matrix("attributions", method);
  }

  /** The per-group matrix of `method` (see `sourceGroups`), by default of the first method that has one. */
  aggregated(method?: string): Matrix {
    return this.matrix("aggregated", method);
  }

  /**
   * The `k` tokens that most influenced target `targetIndex`, strongest first. Only the target's causal
   * prefix (positions before it) is ranked, by absolute score; scores keep their sign; ties keep the earlier
   * position first. `contentOnly` ranks only the tokens the caller wrote.
   */
  topSources(targetIndex: number, k = 5, options: RankOptions = {}): Source[] {
    const scores = this.attributions(options.method).row(targetIndex);
    const prefix = Array.from({ length: this.targetPositions[targetIndex] }, (_, position) => position).filter(
      (position) => !options.contentOnly || this.tokens[position].isContent,
    );
    return strongest(scores, prefix, k).map((position) => ({
      position,
      token: this.tokens[position],
      score: scores[position],
    }));
  }

  /** The `k` source groups that most influenced target `targetIndex`, strongest first, with their scores. */
  topGroups(targetIndex: number, k = 5, options: Pick<RankOptions, "method"> = {}): Array<{ group: SourceGroup; score: number }> {
    const scores = this.aggregated(options.method).row(targetIndex);
    const position = this.targetPositions[targetIndex];
    const before = this.sourceGroups.flatMap((group, index) => (group.start < position ? [index] : []));
    return strongest(scores, before, k).map((index) => ({ group: this.sourceGroups[index], score: scores[index] }));
  }

  /** Per-layer predictions at target `targetIndex`, from the logit lens method's documented extras. */
  logitLens(targetIndex: number, method = "logit_lens"): LogitLensLayer[] {
    const { extras } = this.result(method);
    const [topTokenIds, topLogprobs, targetLogprobs] = ["top_token_ids", "top_logprobs", "target_logprobs"].map(
      (name) => {
        const extra = extras[name];
        if (extra === undefined) {
          throw new RangeError(`${method} result has no '${name}' extra; extras: ${Object.keys(extras).sort().join(", ")}`);
        }
        return extra;
      },
    );
    return Array.from({ length: topTokenIds.shape[0] }, (_, layer) => ({
      layer,
      topTokenIds: topTokenIds.row(layer, targetIndex),
      topLogprobs: topLogprobs.row(layer, targetIndex),
      targetLogprob: targetLogprobs.row(layer)[targetIndex],
    }));
  }

  private methodsWith(kind: MatrixKind): string[] {
    return Object.values(this.results)
      .filter((result) => result[kind] !== undefined)
      .map((result) => result.method);
  }

  private matrix(kind: MatrixKind, method: string | undefined): Matrix {
    const { has, lacks } = MATRIX_KINDS[kind];
    const name = method ?? this.methodsWith(kind)[0];
    if (name === undefined) {
      throw new RangeError(`no result ${has}; results: ${Object.keys(this.results).sort().join(", ")}`);
    }
    const matrix = this.result(name)[kind];
    if (matrix === undefined) {
      throw new RangeError(`method '${name}' ${lacks}`);
    }
    return matrix;
  }

  // Checked once here so that topSources() and friends can index without surprises.
  private check(): void {
    const tokens = this.tokens.length;
    const targets = this.targetPositions.length;
    for (const position of this.targetPositions) {
      if (!(position >= 0 && position < tokens)) {
        throw new RangeError(`target position ${position} is outside the ${tokens} tokens`);
      }
    }
    for (const { start, end } of this.sourceGroups) {
      if (!(start >= 0 && start < end && end <= tokens)) {
        throw new RangeError(`source group [${start}, ${end}) is outside the ${tokens} tokens`);
      }
    }
    if (this.foilTokenIds.length > 0 && this.foilTokenIds.length !== targets) {
      throw new RangeError(`${this.foilTokenIds.length} foil token ids for ${targets} targets`);
    }
    if (this.stepScores !== undefined) {
      checkStepScores(this.stepScores, targets);
    }
    const expected: Record<MatrixKind, [number[], string]> = {
      attributions: [[targets, Math.max(tokens - 1, 0)], `${tokens} tokens`],
      aggregated: [[targets, this.sourceGroups.length], `${this.sourceGroups.length} source groups`],
    };
    for (const [name, result] of Object.entries(this.results)) {
      for (const kind of ["attributions", "aggregated"] as const) {
        const matrix = result[kind];
        const [shape, sources] = expected[kind];
        if (matrix !== undefined && matrix.shape.join(",") !== shape.join(",")) {
          throw new RangeError(
            `${kind} of '${name}' have shape [${matrix.shape.join(", ")}], expected [${shape.join(", ")}]` +
              ` for ${targets} targets over ${sources}`,
          );
        }
      }
    }
  }
}

function decodeMethodResult(result: MethodResultProto): MethodResult {
  const extras: Record<string, Matrix> = {};
  for (const [name, tensor] of Object.entries(result.extras)) {
    extras[name] = Matrix.fromProto(tensor);
  }
  return {
    method: result.method,
    attributions: optionalMatrix(result.attributions),
    extras,
    seconds: result.seconds,
    aggregated: optionalMatrix(result.aggregated),
    faithfulness: result.faithfulness && decodeFaithfulness(result.faithfulness),
  };
}

function decodeFaithfulness(faithfulness: FaithfulnessProto): Faithfulness {
  const fractions = [...faithfulness.fractions];
  const curves = [
    faithfulness.comprehensiveness,
    faithfulness.sufficiency,
    faithfulness.randomComprehensiveness,
    faithfulness.randomSufficiency,
  ];
  if (curves.some((curve) => curve.length !== fractions.length)) {
    throw new RangeError(`faithfulness curves do not all have one value per fraction (${fractions.length})`);
  }
  return {
    fractions,
    comprehensiveness: [...faithfulness.comprehensiveness],
    sufficiency: [...faithfulness.sufficiency],
    randomComprehensiveness: [...faithfulness.randomComprehensiveness],
    randomSufficiency: [...faithfulness.randomSufficiency],
    aopcComprehensiveness: faithfulness.aopcComprehensiveness,
    aopcSufficiency: faithfulness.aopcSufficiency,
    randomAopcComprehensiveness: faithfulness.randomAopcComprehensiveness,
    randomAopcSufficiency: faithfulness.randomAopcSufficiency,
    replacementTokenId: faithfulness.replacementTokenId,
    beatsRandom:
      faithfulness.aopcComprehensiveness > faithfulness.randomAopcComprehensiveness &&
      faithfulness.aopcSufficiency < faithfulness.randomAopcSufficiency,
  };
}

function decodeStepScores(scores: StepScoresProto): StepScores {
  if (scores.topTokenIds === undefined || scores.topLogprobs === undefined) {
    throw new RangeError("step scores lack their top-k tensors");
  }
  return {
    logprobs: [...scores.logprobs],
    probabilities: [...scores.probabilities],
    entropies: [...scores.entropies],
    ranks: [...scores.ranks],
    topTokenIds: Matrix.fromProto(scores.topTokenIds),
    topLogprobs: Matrix.fromProto(scores.topLogprobs),
  };
}

function checkStepScores(scores: StepScores, targets: number): void {
  const lengths = new Set([
    scores.logprobs.length,
    scores.probabilities.length,
    scores.entropies.length,
    scores.ranks.length,
  ]);
  const { topTokenIds, topLogprobs } = scores;
  if (
    lengths.size !== 1 ||
    !lengths.has(targets) ||
    topTokenIds.ndim !== 2 ||
    topTokenIds.shape.join(",") !== topLogprobs.shape.join(",") ||
    topTokenIds.shape[0] !== targets
  ) {
    throw new RangeError(
      `step scores do not cover the ${targets} targets: score lengths ${[...lengths].sort().join(", ")},` +
        ` top-k shapes [${topTokenIds.shape.join(", ")}] and [${topLogprobs.shape.join(", ")}]`,
    );
  }
}

/** The `k` of `indices` with the largest |scores[index]|; ties keep the earlier index first (a stable sort). */
function strongest(scores: readonly number[], indices: number[], k: number): number[] {
  if (!Number.isInteger(k) || k < 1) {
    throw new RangeError(`k must be an integer of at least 1, got ${k}`);
  }
  return [...indices].sort((a, b) => Math.abs(scores[b]) - Math.abs(scores[a])).slice(0, k);
}

function optionalDate(timestamp: Timestamp | undefined): Date | undefined {
  return timestamp && timestampDate(timestamp);
}
