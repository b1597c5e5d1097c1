// Package attest verifies TPM 2.0 evidence on the server side: EK
// certificates and pinned EK keys, AK templates, credential activation
// (TPM2_MakeCredential, done here without a TPM), quotes, PCR values against
// reference values, and TCG event logs. It also makes the TPM duplicate
// blobs that only one TPM, in one PCR state, can import.
//
// [Verify] is the only way to obtain a [Verified]: whoever holds one holds
// state that every check passed on. Defaults are the safe choice: SHA-256
// bank only, nonce required, event log replayed when the class asks for it.
//
// The node side (TPM access, quoting, opening released keys) is the
// separate package attest/agent; the wire messages between them are in
// proto/coffre/v1.
//
// # Use
//
// Enrollment: [VerifyEKCertificate] (a certificate chaining to the TPM
// manufacturer CAs; Go's x509 cannot verify one alone) or [ParseEKPublic]
// (a pinned key), and [EK.WithTPMPublic] to join the public area the agent
// sends. Revocation lists are the server's: [CheckRevoked], [SerialKey].
//
// Challenge: [NewChallenge] checks the AK ([ParseAKPublic],
// [CheckAKTemplate]) and makes the credential and nonce. Completion:
// [Verify]. Offline checks of a single quote or log: [VerifyQuote],
// [QualifyingData], [ReplayEventLog]. TPM-bound release: [SealToTPM],
// [SealPolicy].
//
// # Errors
//
// Every refusal is a *[Error] naming the check that failed; callers match
// the check with errors.Is against the sentinels ErrEK, ErrAK, ErrNonce,
// ErrSecret, ErrQuote, ErrSignature, ErrPCR, ErrEventLog and ErrBindingKey.
// The Reason is for people; code never looks at it. Errors that are not
// refusals (a nil pool of EK roots, a policy without a time, failing
// randomness) are plain errors: the server's own faults, not the node's.
//
// # Firmware quirks
//
// Departures from the TCG specifications that real TPMs and firmware make
// and that the verifier tolerates are all in one table, firmwareQuirks
// (quirks.go). They are tried only after the strict reading failed, and
// the ones a node needed are named in [EK].Quirks and [Verified].Quirks.
package attest

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// Sentinels for the checks of Verify and its helpers.
var (
	ErrEK         = errors.New("EK")          // certificate chain, expiry, revocation, public key
	ErrAK         = errors.New("AK")          // template, name, binding to the EK
	ErrNonce      = errors.New("nonce")       // expired, foreign or replayed challenge
	ErrSecret     = errors.New("credential")  // activated secret does not match
	ErrQuote      = errors.New("quote")       // TPMS_ATTEST structure, magic, type, qualifying data
	ErrSignature  = errors.New("signature")   // quote signature
	ErrPCR        = errors.New("PCR")         // selection, digest, reference values
	ErrEventLog   = errors.New("event log")   // parse or replay
	ErrBindingKey = errors.New("binding key") // not a valid X-Wing public key
)

// Error is a refusal: which check failed and why, in words an operator can
// act on. It never carries secrets.
type Error struct {
	Check  error  // one of the sentinels
	Reason string // e.g. "PCR 7 is 3f…, the class expects 9a…"
}

func (e *Error) Error() string { return "attestation refused: " + e.Check.Error() + ": " + e.Reason }

// refuse makes the *Error for a failed check.
func refuse(check error, format string, args ...any) *Error {
	return &Error{Check: check, Reason: fmt.Sprintf(format, args...)}
}

// Is reports whether target is e's check.
func (e *Error) Is(target error) bool { return target == e.Check }

// EK is a parsed endorsement key: from a certificate that chained to an EK
// root, or pinned at enrollment.
type EK struct {
	Public      *tpm2.TPMTPublic  // nil when only a PKIX key was pinned
	PublicKey   crypto.PublicKey  // *rsa.PublicKey or *ecdsa.PublicKey
	Certificate *x509.Certificate // nil for a pinned key
	// Fingerprint is hex SHA-256 of the PKIX DER of PublicKey: the node's
	// identity, the same whichever form the EK came in.
	Fingerprint string
	// Quirks names the entries of the firmware quirks table that parsing
	// the EK certificate needed (normally none), for the audit log.
	Quirks []string
}

// Challenge is the server's record of one challenge. It is made by
// NewChallenge, kept by the server, and consumed by exactly one Verify.
type Challenge struct {
	ID              string
	Nonce           []byte // 32 random bytes
	EK              *EK
	AKPublic        []byte // TPM2B_PUBLIC exactly as challenged
	AKName          []byte // TPM2B_NAME contents of the AK
	Secret          []byte // the credential secret; never leaves the server
	CredentialBlob  []byte // TPM2B_ID_OBJECT buffer, without its size field
	EncryptedSecret []byte // TPM2B_ENCRYPTED_SECRET buffer, without its size field
	PCRSelection    []uint32
	Expires         time.Time
}

// Evidence is what a node sends to complete a challenge; every field is
// outside input.
type Evidence struct {
	ActivatedSecret []byte
	AKPublic        []byte // TPM2B_PUBLIC
	Quote           []byte // TPMS_ATTEST
	Signature       []byte // TPMT_SIGNATURE
	PCRs            map[uint32][]byte
	EventLog        []byte
	BindingKey      []byte // X-Wing public key
}

// Policy is what the node's class demands.
type Policy struct {
	// PCRs are the reference values (SHA-256 bank) the quote must cover
	// and match exactly.
	PCRs map[uint32][]byte
	// RequireEventLog demands a TCG event log that replays to the quoted
	// PCRs.
	RequireEventLog bool
	// Now is the verification time. Verify refuses to run without it.
	Now time.Time
	// RevokedFingerprints and RevokedSerials, when set, are checked once
	// more at completion (see CheckRevoked), so that a node revoked between
	// its challenge and its evidence is refused.
	RevokedFingerprints map[string]bool
	RevokedSerials      map[string]bool
}

// Verified is attestation state that passed every check. Only Verify makes
// one.
type Verified struct {
	EK         *EK
	AKName     []byte
	BindingKey []byte
	PCRs       map[uint32][]byte // the quoted, verified SHA-256 values
	// EvidenceHash is SHA-256 over the evidence, for audit entries.
	EvidenceHash [32]byte
	// ChallengeID is the challenge this evidence answered.
	ChallengeID string
	// Quote is what the verified quote says besides the PCRs.
	Quote *QuoteInfo
	// Quirks names the entries of the firmware quirks table that the EK
	// certificate or the event log needed (normally none).
	Quirks   []string
	verified bool
}

// Valid reports whether v was made by Verify. A Verified built any other
// way (a zero value, a struct literal in another package) is not valid;
// code that acts on attestation state checks Valid first.
func (v *Verified) Valid() bool { return v != nil && v.verified }
