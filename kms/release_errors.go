package kms

import "errors"

// Sentinel errors of attested release ([ReleaseService]), beside those of
// api.go. Callers match them with errors.Is; the server layer maps each to
// one gRPC status code.
var (
	// ErrUnauthenticated: the caller presented no session, or one that is
	// unknown, has expired, or has sealed MaxReleasesPerSession keys
	// ("session exhausted"). The remedy is to attest (again). The message
	// says which, and nothing about any other session.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: the caller is known but refused — its
	// attestation failed, its node is not enrolled or was revoked, its
	// session was ended, or the keyring's release policy does not admit its
	// node. The message gives the reason and is meant for the caller: an
	// attestation refusal wraps the *attest.Error that names the failed
	// check ("attestation refused: PCR: PCR 7 is …"), and a policy refusal
	// names the keyring and the unmet condition. It never holds key
	// material.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrResourceExhausted: a rate limit set on purpose was reached (for
	// example challenges per EK per minute); retry later. Distinct from
	// ErrUnavailable, which says the server cannot serve anyone.
	ErrResourceExhausted = errors.New("resource exhausted")
)
