package server

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/quorum"
)

// Messages of the statuses whose cause must not reach the caller. The
// detail of an unavailable HSM or store (module paths, slot numbers, file
// names) and of an internal failure is for the server log only.
const (
	msgDecrypt     = "decryption failed"
	msgUnavailable = "the HSM or the key store is unavailable; retry later"
	msgInternal    = "internal error"
)

// toStatus is the one mapping from kms errors to gRPC statuses. The kms
// package promises that the messages of its invalid-argument, not-found,
// exists, precondition, unauthenticated, permission-denied and
// resource-exhausted errors describe the request and never hold key
// material, so they are passed on: a node must learn which attestation
// check failed ("attestation refused: PCR: PCR 7 is …"), and an
// administrator which character of a keyring name was refused. Everything
// else gets a fixed message.
//
// ErrDecrypt is tested first: a decryption failure must look the same
// whatever else its error chain says.
func toStatus(err error) *status.Status {
	switch {
	case err == nil:
		return status.New(codes.OK, "")
	case errors.Is(err, kms.ErrDecrypt):
		return status.New(codes.InvalidArgument, msgDecrypt)
	case errors.Is(err, kms.ErrUnavailable), errors.Is(err, quorum.ErrUnavailable):
		// Before the deadline cases: an HSM, store or audit replica that
		// did not answer within Coffre's own bound is unavailable, even
		// though a context deadline is in the error's chain.
		return status.New(codes.Unavailable, msgUnavailable)
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "the call's deadline passed")
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "the call was canceled")
	case errors.Is(err, quorum.ErrNoQuorum), errors.Is(err, quorum.ErrNotPending), errors.Is(err, quorum.ErrDuplicate):
		return status.New(codes.FailedPrecondition, err.Error())
	case errors.Is(err, quorum.ErrNotAdmin), errors.Is(err, quorum.ErrBadApproval):
		return status.New(codes.PermissionDenied, err.Error())
	case errors.Is(err, quorum.ErrInvalid):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, quorum.ErrNotFound):
		return status.New(codes.NotFound, err.Error())
	case errors.Is(err, quorum.ErrExists):
		return status.New(codes.AlreadyExists, err.Error())
	case errors.Is(err, quorum.ErrLimit):
		return status.New(codes.ResourceExhausted, err.Error())
	case errors.Is(err, kms.ErrInvalidArgument):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, kms.ErrNotFound):
		return status.New(codes.NotFound, err.Error())
	case errors.Is(err, kms.ErrExists):
		return status.New(codes.AlreadyExists, err.Error())
	case errors.Is(err, kms.ErrFailedPrecondition):
		return status.New(codes.FailedPrecondition, err.Error())
	case errors.Is(err, kms.ErrUnauthenticated):
		return status.New(codes.Unauthenticated, err.Error())
	case errors.Is(err, kms.ErrPermissionDenied):
		// The reason is for the caller: which attestation check failed,
		// which policy condition is unmet, that the node was revoked.
		return status.New(codes.PermissionDenied, err.Error())
	case errors.Is(err, kms.ErrResourceExhausted):
		return status.New(codes.ResourceExhausted, err.Error())
	default:
		return status.New(codes.Internal, msgInternal)
	}
}

// fail maps err with toStatus and logs the detail the caller does not get.
func (s *Server) fail(ctx context.Context, err error) error {
	if ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)) {
		// Not the caller's deadline (it is still running): one inside
		// Coffre, such as the store engine's own request timeout.
		err = fmt.Errorf("%w: %w", kms.ErrUnavailable, err)
	}
	st := toStatus(err)
	switch st.Code() {
	case codes.Internal, codes.Unavailable:
		// kms errors never hold key material, so their text may be logged.
		s.log.ErrorContext(ctx, "call failed", "method", methodFrom(ctx), "code", st.Code().String(), "err", err)
	}
	return st.Err()
}
