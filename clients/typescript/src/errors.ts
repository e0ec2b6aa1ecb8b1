// The errors the SDK throws for failed calls: one class per gRPC status code, all SightlineError, so that
// callers can `catch (e) { if (e instanceof InvalidArgumentError) ... }` without knowing Connect's types.
import { Code, ConnectError } from "@connectrpc/connect";

/** gRPC status code names as the gRPC spec (and the Python SDK's `grpc.StatusCode`) spell them. */
export type StatusName =
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

const STATUS_NAMES: Record<Code, StatusName> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

// Codes that mean the request itself will never be accepted as is (retrying cannot help), as opposed to
// server or network trouble; the same set as the Python SDK's CALLER_ERROR_CODES.
const CALLER_ERROR_CODES: ReadonlySet<Code> = new Set([
  Code.InvalidArgument,
  Code.NotFound,
  Code.AlreadyExists,
  Code.FailedPrecondition,
  Code.OutOfRange,
  Code.Unauthenticated,
  Code.PermissionDenied,
]);

/** A Sightline call failed. `code` is the gRPC status code, `details` the server's message. */
export class SightlineError extends Error {
  readonly code: Code;
  readonly status: StatusName;
  readonly details: string;

  constructor(code: Code, details: string, options?: { cause?: unknown }) {
    super(details ? `${STATUS_NAMES[code]}: ${details}` : STATUS_NAMES[code], options);
    this.name = new.target.name;
    this.code = code;
    this.status = STATUS_NAMES[code];
    this.details = details;
  }

  /** Whether the request itself was at fault (bad argument, unknown id, not allowed). */
  get isCallerError(): boolean {
    return CALLER_ERROR_CODES.has(this.code);
  }
}

export class CancelledError extends SightlineError {}
export class UnknownError extends SightlineError {}
export class InvalidArgumentError extends SightlineError {}
export class DeadlineExceededError extends SightlineError {}
export class NotFoundError extends SightlineError {}
export class AlreadyExistsError extends SightlineError {}
export class PermissionDeniedError extends SightlineError {}
export class ResourceExhaustedError extends SightlineError {}
export class FailedPreconditionError extends SightlineError {}
export class AbortedError extends SightlineError {}
export class OutOfRangeError extends SightlineError {}
export class UnimplementedError extends SightlineError {}
export class InternalError extends SightlineError {}
export class UnavailableError extends SightlineError {}
export class DataLossError extends SightlineError {}
export class UnauthenticatedError extends SightlineError {}

type ErrorClass = new (code: Code, details: string, options?: { cause?: unknown }) => SightlineError;

const ERROR_CLASSES: Record<Code, ErrorClass> = {
  [Code.Canceled]: CancelledError,
  [Code.Unknown]: UnknownError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.Aborted]: AbortedError,
  [Code.OutOfRange]: OutOfRangeError,
  [Code.Unimplemented]: UnimplementedError,
  [Code.Internal]: InternalError,
  [Code.Unavailable]: UnavailableError,
  [Code.DataLoss]: DataLossError,
  [Code.Unauthenticated]: UnauthenticatedError,
};

/** The typed error for a status code. */
export function errorFor(code: Code, details: string, cause?: unknown): SightlineError {
  const ErrorType = ERROR_CLASSES[code] ?? UnknownError;
  return new ErrorType(code, details, cause === undefined ? undefined : { cause });
}

/** Convert whatever a Connect call threw into the typed error for its status; SightlineErrors pass through. */
export function toSightlineError(reason: unknown): SightlineError {
  if (reason instanceof SightlineError) {
    return reason;
  }
  const error = ConnectError.from(reason);
  return errorFor(error.code, error.rawMessage, reason);
}

/** A response the SDK cannot decode (a server bug or version skew), reported like any other failed call. */
export function malformedResponse(problem: string): SightlineError {
  return new InternalError(Code.Internal, `malformed response from the server: ${problem}`);
}
