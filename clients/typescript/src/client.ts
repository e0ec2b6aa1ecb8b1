// The Sightline client: InferenceService and ExplanationsService over gRPC (Connect for Node, HTTP/2),
// with the Python SDK's calls and result types.
import { createClient, type Client as ConnectClient, type Interceptor } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { Explanation } from "./explanation.js";
import { malformedResponse, toSightlineError, SightlineError } from "./errors.js";
import { ExplanationsService, type GetExplanationResponse } from "./gen/sightline/v1/explanations_pb.js";
import { InferenceService } from "./gen/sightline/v1/inference_pb.js";
import type { Explanation as ExplanationProto } from "./gen/sightline/v1/types_pb.js";
import {
  estimateRequest,
  explainRequest,
  generateRequest,
  type ExplainCallOptions,
  type ExplainMethods,
  type ExplainOptions,
  type GenerateOptions,
  type Prompt,
} from "./requests.js";
import {
  decodeEstimate,
  decodeExplanationPage,
  decodeGeneration,
  decodeMethodInfo,
  decodeStreamChunk,
  type Estimate,
  type ExplanationPage,
  type Generation,
  type MethodInfo,
  type StreamChunk,
} from "./results.js";
import { sessionOptions, type TlsOptions } from "./tls.js";

export const DEFAULT_TARGET = "127.0.0.1:50051";

export interface ClientOptions {
  /** Sent on every call as `authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** The default deadline of every call in milliseconds (unset: none); each call's `timeoutMs` overrides it. */
  timeoutMs?: number;
  /** `true`: TLS trusting Node's bundled CAs; `TlsOptions` (see `tlsFromFiles`): a given CA and, with a
   * certificate and key, mutual TLS. Unset or false: plaintext. */
  tls?: boolean | TlsOptions;
  /** Connect interceptors run around every call, e.g. for tracing. */
  interceptors?: Interceptor[];
}

/** Per-call settings, accepted by every method. */
export interface CallOptions {
  timeoutMs?: number;
  /** Aborting it cancels the call (the call then fails with CancelledError). */
  signal?: AbortSignal;
}

export interface WaitOptions extends CallOptions {
  /** Wait up to this many seconds (within the deadline) for the explanation to finish; 0 returns at once. */
  waitSeconds?: number;
}

export interface EstimateOptions extends CallOptions {
  promptTokens: number;
  outputTokens: number;
  options?: ExplainOptions;
  model?: string;
}

export interface ListOptions extends CallOptions {
  /** 0 or unset lets the server choose (20; it serves at most 100). */
  pageSize?: number;
  /** The previous page's `nextPageToken`. */
  pageToken?: string;
}

/**
 * A Sightline client. `target` is `host:port` (or an `http://` / `https://` URL). Failed calls reject with a
 * `SightlineError` subclass named after the gRPC status (`InvalidArgumentError`, `UnauthenticatedError`, ...).
 * Call `close()` when done, to close the HTTP/2 connection.
 */
export class Client {
  private readonly session: Http2SessionManager;
  private readonly inference: ConnectClient<typeof InferenceService>;
  private readonly explanations: ConnectClient<typeof ExplanationsService>;

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    const secure = options.tls !== undefined && options.tls !== false;
    const baseUrl = /^https?:\/\//.test(target) ? target : `${secure ? "https" : "http"}://${target}`;
    const tls = options.tls === true ? {} : options.tls || undefined;
    this.session = new Http2SessionManager(baseUrl, undefined, tls && sessionOptions(tls));
    const interceptors = [...(options.interceptors ?? [])];
    if (options.apiKey) {
      // A header on every call rather than call credentials, so that it works over plaintext too.
      const authorization = `Bearer ${options.apiKey}`;
      interceptors.unshift((next) => (request) => {
        request.header.set("authorization", authorization);
        return next(request);
      });
    }
    const transport = createGrpcTransport({
      baseUrl,
      sessionManager: this.session,
      interceptors,
      defaultTimeoutMs: options.timeoutMs,
    });
    this.inference = createClient(InferenceService, transport);
    this.explanations = createClient(ExplanationsService, transport);
  }

  /**
   * Generate a completion of `prompt` and, when `explain` names methods, its explanation. `prompt` is text,
   * chat messages (`{ role, content }`) or token ids. In mode "sync" (the default) the explanation is
   * attached; in "async" only `explanationId` is, for `getExplanation`.
   */
  async generate(prompt: Prompt, options: GenerateOptions & CallOptions = {}): Promise<Generation> {
    const request = generateRequest(prompt, options);
    return unary(() => this.inference.generate(request, callOptions(options)), decodeGeneration);
  }

  /**
   * Like `generate`, yielding chunks as tokens are produced (`for await (const chunk of ...)`); the last one
   * carries the finish reason, usage and explanation. Leaving the loop early cancels the call.
   */
  generateStream(prompt: Prompt, options: GenerateOptions & CallOptions = {}): AsyncGenerator<StreamChunk> {
    const request = generateRequest(prompt, options); // bad arguments throw here, before any iteration
    return stream((signal) => this.inference.generateStream(request, callOptions(options, signal)), decodeStreamChunk);
  }

  /** Explain a given sequence without generating: the explanation in mode "sync", its id in mode "async". */
  explain(
    promptTokenIds: readonly number[],
    outputTokenIds: readonly number[],
    methods: ExplainMethods,
    options?: ExplainCallOptions & CallOptions & { mode?: "sync" },
  ): Promise<Explanation>;
  explain(
    promptTokenIds: readonly number[],
    outputTokenIds: readonly number[],
    methods: ExplainMethods,
    options: ExplainCallOptions & CallOptions & { mode: "async" },
  ): Promise<string>;
  async explain(
    promptTokenIds: readonly number[],
    outputTokenIds: readonly number[],
    methods: ExplainMethods,
    options: ExplainCallOptions & CallOptions = {},
  ): Promise<Explanation | string> {
    const request = explainRequest(promptTokenIds, outputTokenIds, methods, options);
    return unary(
      () => this.explanations.explain(request, callOptions(options)),
      (response) => (options.mode === "async" ? response.explanationId : attached(response.explanation)),
    );
  }

  /** Fetch an explanation, waiting up to `waitSeconds` (within the deadline) for it to finish. */
  async getExplanation(explanationId: string, options: WaitOptions = {}): Promise<Explanation> {
    const request = { explanationId, waitSeconds: options.waitSeconds ?? 0 };
    return unary(() => this.explanations.getExplanation(request, callOptions(options)), attachedExplanation);
  }

  /** Stop a pending or running explanation (idempotent); returns its record. */
  async cancelExplanation(explanationId: string, options: WaitOptions = {}): Promise<Explanation> {
    const request = { explanationId, waitSeconds: options.waitSeconds ?? 0 };
    return unary(() => this.explanations.cancelExplanation(request, callOptions(options)), attachedExplanation);
  }

  /** The explanation now and each time its state or progress changes, ending with the final record. */
  watchExplanation(explanationId: string, options: CallOptions = {}): AsyncGenerator<Explanation> {
    return stream(
      (signal) => this.explanations.watchExplanation({ explanationId }, callOptions(options, signal)),
      attachedExplanation,
    );
  }

  /** Wait for the explanation to finish, calling `onProgress` with each update; returns the final record (or
   * the latest, if the deadline ends the wait first). */
  async waitForExplanation(
    explanationId: string,
    onProgress?: (explanation: Explanation) => void,
    options: CallOptions = {},
  ): Promise<Explanation> {
    let latest: Explanation | undefined;
    try {
      for await (latest of this.watchExplanation(explanationId, options)) {
        onProgress?.(latest);
      }
    } catch (error) {
      if (latest === undefined || !(error instanceof SightlineError) || error.status !== "DEADLINE_EXCEEDED") {
        throw error;
      }
    }
    if (latest === undefined) {
      throw malformedResponse("the watch stream ended without sending the explanation");
    }
    return latest;
  }

  /** The forward passes and seconds explaining such a sequence with `methods` would take, without queueing. */
  async estimateExplanation(methods: ExplainMethods, options: EstimateOptions): Promise<Estimate> {
    const request = estimateRequest(
      methods,
      options.promptTokens,
      options.outputTokens,
      options.options,
      options.model ?? "",
    );
    return unary(() => this.explanations.estimateExplanation(request, callOptions(options)), decodeEstimate);
  }

  /** The attribution methods this deployment offers. */
  async listMethods(options: CallOptions = {}): Promise<MethodInfo[]> {
    return unary(
      () => this.explanations.listMethods({}, callOptions(options)),
      (response) => response.methods.map(decodeMethodInfo),
    );
  }

  /** A page of the caller's tenant's explanations, newest first. */
  async listExplanations(options: ListOptions = {}): Promise<ExplanationPage> {
    const pageSize = options.pageSize ?? 0;
    if (!Number.isInteger(pageSize) || pageSize < 0) {
      throw new RangeError(`pageSize must be an integer >= 0 (0 lets the server choose); got ${pageSize}`);
    }
    const request = { pageSize, pageToken: options.pageToken ?? "" };
    return unary(() => this.explanations.listExplanations(request, callOptions(options)), decodeExplanationPage);
  }

  /** Close the connection; calls still running fail. */
  close(): void {
    this.session.abort();
  }
}

function callOptions(options: CallOptions, signal?: AbortSignal): { timeoutMs?: number; signal?: AbortSignal } {
  const signals = [options.signal, signal].filter((item): item is AbortSignal => item !== undefined);
  return {
    timeoutMs: options.timeoutMs,
    signal: signals.length > 1 ? AbortSignal.any(signals) : signals[0],
  };
}

async function unary<Response, Result>(
  call: () => Promise<Response>,
  decode: (response: Response) => Result,
): Promise<Result> {
  let response: Response;
  try {
    response = await call();
  } catch (error) {
    throw toSightlineError(error);
  }
  return decoded(decode, response);
}

/** A server stream as an async generator; returning early (`break`) aborts the call. */
async function* stream<Response, Result>(
  open: (signal: AbortSignal) => AsyncIterable<Response>,
  decode: (response: Response) => Result,
): AsyncGenerator<Result> {
  const abandoned = new AbortController();
  try {
    for await (const response of open(abandoned.signal)) {
      yield decoded(decode, response);
    }
  } catch (error) {
    throw toSightlineError(error);
  } finally {
    abandoned.abort();
  }
}

/** Decode a response, reporting a malformed one as an INTERNAL SightlineError like any other failed call. */
function decoded<Response, Result>(decode: (response: Response) => Result, response: Response): Result {
  try {
    return decode(response);
  } catch (error) {
    if (error instanceof RangeError) {
      throw malformedResponse(error.message);
    }
    throw error;
  }
}

function attached(explanation: ExplanationProto | undefined): Explanation {
  if (explanation === undefined) {
    throw new RangeError("the server attached no explanation");
  }
  return new Explanation(explanation);
}

function attachedExplanation(response: Pick<GetExplanationResponse, "explanation">): Explanation {
  return attached(response.explanation);
}
