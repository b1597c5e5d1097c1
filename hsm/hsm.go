// Package hsm defines the seam between Coffre and the hardware security
// modules that hold its root keys, and parses the RFC 7512 pkcs11: URIs that
// name those keys.
//
// A root key never leaves its HSM: Coffre asks the HSM to wrap and unwrap
// keyring KEKs under it. The PKCS#11 implementation lives in
// [github.com/coffre-kms/coffre/hsm/pkcs11]; nothing else in Coffre touches a
// vendor client.
//
// # Errors
//
// Callers match errors with [errors.Is] against the sentinels below:
//   - [ErrUnavailable]: the HSM, its token or its session is gone; the call
//     may succeed later without any change on Coffre's side (the
//     implementation reconnects by itself).
//   - [ErrKeyNotFound]: the token is there but holds no key by that name.
//   - [ErrKeyExists]: a root key by that name already exists.
//   - [ErrUnwrap]: the wrapped bytes or their associated data are not what
//     this root wrapped; the cause is never told apart.
package hsm

import (
	"context"
	"errors"
)

// Sentinel errors; see the package documentation for their contract.
var (
	ErrUnavailable = errors.New("hsm: unavailable")
	ErrKeyNotFound = errors.New("hsm: key not found")
	ErrKeyExists   = errors.New("hsm: key already exists")
	ErrUnwrap      = errors.New("hsm: unwrap failed")
)

// Root is a root key held inside an HSM. It wraps and unwraps key material
// (keyring KEKs) under that key; the root key itself is never readable.
//
// Implementations are safe for concurrent use.
type Root interface {
	// ID names the root key stably (its URI without any query), so that a
	// wrapped KEK records which root wrapped it.
	ID() string
	// Wrap encrypts key inside the HSM, authenticating aad with it.
	Wrap(ctx context.Context, key, aad []byte) ([]byte, error)
	// Unwrap reverses Wrap. Any mismatch in wrapped or aad yields ErrUnwrap.
	// The caller owns the returned slice and zeroizes it.
	Unwrap(ctx context.Context, wrapped, aad []byte) ([]byte, error)
	// Close releases the sessions; it does not touch the key.
	Close() error
}

// Attributes are the security-relevant attributes of a key as the HSM
// reports them, read back rather than assumed.
type Attributes struct {
	Token            bool
	Private          bool
	Modifiable       bool
	Sensitive        bool
	Extractable      bool
	AlwaysSensitive  bool
	NeverExtractable bool
	Encrypt, Decrypt bool
	Wrap, Unwrap     bool
	Sign, Verify     bool
	Derive           bool
	ValueLen         int
}

// AttributeReader is implemented by roots that can report their key's
// attributes (ceremony checks and tests use it).
type AttributeReader interface {
	Attributes(ctx context.Context) (Attributes, error)
}
