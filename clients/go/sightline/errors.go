package sightline

import (
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed Sightline call: the gRPC status code and the server's message.
//
// Every call made through a Client returns its failures as *Error (streams too, from Recv). Test
// for a kind of failure with errors.Is and the sentinels below, or read Code:
//
//	if errors.Is(err, sightline.ErrInvalidArgument) { ... }
//
// status.Code(err) and status.FromError(err) keep working, as Error carries the original status.
type Error struct {
	Code    codes.Code
	Message string
	status  *status.Status
}

// Sentinels for errors.Is: an *Error matches the sentinel of its code.
var (
	ErrCancelled          = &Error{Code: codes.Canceled}
	ErrInvalidArgument    = &Error{Code: codes.InvalidArgument}
	ErrDeadlineExceeded   = &Error{Code: codes.DeadlineExceeded}
	ErrNotFound           = &Error{Code: codes.NotFound}
	ErrPermissionDenied   = &Error{Code: codes.PermissionDenied}
	ErrResourceExhausted  = &Error{Code: codes.ResourceExhausted}
	ErrFailedPrecondition = &Error{Code: codes.FailedPrecondition}
	ErrUnimplemented      = &Error{Code: codes.Unimplemented}
	ErrInternal           = &Error{Code: codes.Internal}
	ErrUnavailable        = &Error{Code: codes.Unavailable}
	ErrUnauthenticated    = &Error{Code: codes.Unauthenticated}
)

// Codes that mean the request itself was at fault: retrying it unchanged cannot succeed.
var callerErrorCodes = map[codes.Code]bool{
	codes.InvalidArgument:    true,
	codes.NotFound:           true,
	codes.AlreadyExists:      true,
	codes.FailedPrecondition: true,
	codes.OutOfRange:         true,
	codes.Unauthenticated:    true,
	codes.PermissionDenied:   true,
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code.String()
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// Is reports whether target is the sentinel of e's code.
func (e *Error) Is(target error) bool {
	sentinel, ok := target.(*Error)
	return ok && sentinel.status == nil && sentinel.Message == "" && sentinel.Code == e.Code
}

// GRPCStatus returns the status the error was made from, for status.FromError and status.Code.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

// CallerError reports whether the request itself was at fault (bad argument, unknown id, not
// allowed), as opposed to server or network trouble that a retry may get past.
func (e *Error) CallerError() bool {
	return callerErrorCodes[e.Code]
}

// AsError converts an error returned by a generated stub into *Error. nil stays nil, and errors
// that carry no gRPC status (io.EOF at the end of a stream, for one) are returned unchanged.
func AsError(err error) error {
	if err == nil {
		return nil
	}
	if _, already := err.(*Error); already {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &Error{Code: st.Code(), Message: st.Message(), status: st}
}
