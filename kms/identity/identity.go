// Package identity owns the signing identities of Coffre's administrators:
// the hybrid Ed25519 + ML-DSA-65 public keys that the quorum checks
// approvals against, their one-line text form, and the signature format.
//
// A signature is valid only if both halves verify, so an identity stays
// sound while either algorithm does: Ed25519 against today's attackers
// (and smartcards that only do EdDSA), ML-DSA-65 (FIPS 204) against a
// quantum one.
//
// # Formats
//
// Public key, text form (one line, what an admin hands to the quorum):
//
//	coffre-admin1:<unpadded base64url of Ed25519 public key (32) ‖ ML-DSA-65 public key (1952)>
//
// Signature (binary, [SignatureSize] bytes):
//
//	Ed25519 signature (64, pure Ed25519 of RFC 8032 over msg) ‖ ML-DSA-65 signature (3309, over msg
//	with the context string [MLDSAContext])
//
// Pure Ed25519 over the message itself (not a hash of it) is what a
// PKCS#11 token computes with CKM_EDDSA and no parameters, so a smartcard
// can hold the Ed25519 half. The ML-DSA context string keeps these
// signatures from being taken for ML-DSA signatures made for another
// purpose with the same key.
//
// # Errors
//
// [PublicKey.Verify] reports every failure — wrong length, either half
// invalid — as [ErrBadSignature] and nothing more. [ParsePublicKey] reports
// malformed keys with errors wrapping [ErrMalformedKey].
//
// The server side needs only [PublicKey]; [PrivateKey] is the software
// [Signer] that coffrectl loads from a passphrase-protected file. Keys on
// a token are signers too (see cmd/internal/adminkey).
package identity

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// Sizes of the binary forms.
const (
	// PublicKeySize is the size of a public key's binary form.
	PublicKeySize = ed25519.PublicKeySize + mldsa65.PublicKeySize
	// SignatureSize is the size of a hybrid signature.
	SignatureSize = ed25519.SignatureSize + mldsa65.SignatureSize
	// SeedSize is the size of each of the two private seeds.
	SeedSize = 32
	// PrivateKeySize is the size of [PrivateKey.MarshalSeeds]: the
	// Ed25519 seed then the ML-DSA-65 seed (FIPS 204 ξ).
	PrivateKeySize = 2 * SeedSize
)

// MLDSAContext is the FIPS 204 context string of every ML-DSA-65 signature
// an admin identity makes. Changing it invalidates every signature and
// every token-held key's signing path (hsm/pkcs11 repeats it, since it may
// not import this package; its tests check the two agree).
const MLDSAContext = "coffre-admin-v1"

// TextPrefix starts the text form of a public key; the digit is the format
// version.
const TextPrefix = "coffre-admin1:"

// Errors; see the package documentation for their contract.
var (
	ErrBadSignature = errors.New("identity: bad signature")
	ErrMalformedKey = errors.New("identity: malformed admin public key")
)

// PublicKey is an admin's hybrid public key. The zero value is not usable;
// obtain one from [ParsePublicKey], [NewPublicKey] or a [Signer].
type PublicKey struct {
	raw []byte // Ed25519 ‖ ML-DSA-65, PublicKeySize bytes
	ed  ed25519.PublicKey
	ml  *mldsa65.PublicKey
}

// NewPublicKey builds a public key from its two raw halves, as a token
// reports them.
func NewPublicKey(ed25519Key, mldsa65Key []byte) (*PublicKey, error) {
	if len(ed25519Key) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: Ed25519 key of %d bytes, want %d", ErrMalformedKey, len(ed25519Key), ed25519.PublicKeySize)
	}
	if len(mldsa65Key) != mldsa65.PublicKeySize {
		return nil, fmt.Errorf("%w: ML-DSA-65 key of %d bytes, want %d", ErrMalformedKey, len(mldsa65Key), mldsa65.PublicKeySize)
	}
	raw := make([]byte, 0, PublicKeySize)
	raw = append(raw, ed25519Key...)
	raw = append(raw, mldsa65Key...)
	return PublicKeyFromBytes(raw)
}

// PublicKeyFromBytes parses the binary form (Ed25519 ‖ ML-DSA-65).
func PublicKeyFromBytes(b []byte) (*PublicKey, error) {
	if len(b) != PublicKeySize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrMalformedKey, len(b), PublicKeySize)
	}
	raw := append([]byte(nil), b...)
	// Every byte string of this size is a valid ML-DSA-65 public key
	// (ρ, then t1 packed 10 bits a coefficient with no spare bits), so one
	// key has exactly one binary form and one fingerprint.
	var packed [mldsa65.PublicKeySize]byte
	copy(packed[:], raw[ed25519.PublicKeySize:])
	ml := new(mldsa65.PublicKey)
	ml.Unpack(&packed)
	return &PublicKey{raw: raw, ed: ed25519.PublicKey(raw[:ed25519.PublicKeySize:ed25519.PublicKeySize]), ml: ml}, nil
}

// ParsePublicKey parses the text form "coffre-admin1:…". Surrounding white
// space is not accepted: callers trim lines they read from files.
func ParsePublicKey(s string) (*PublicKey, error) {
	rest, ok := strings.CutPrefix(s, TextPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: does not start with %q", ErrMalformedKey, TextPrefix)
	}
	if n := base64.RawURLEncoding.EncodedLen(PublicKeySize); len(rest) != n {
		return nil, fmt.Errorf("%w: %d characters after %q, want %d", ErrMalformedKey, len(rest), TextPrefix, n)
	}
	// Strict: no padding, no line breaks, and the unused low bits of the
	// last character must be zero, so that one key has one text form.
	b, err := base64.RawURLEncoding.Strict().DecodeString(rest)
	if err != nil {
		return nil, fmt.Errorf("%w: bad base64url: %v", ErrMalformedKey, err)
	}
	return PublicKeyFromBytes(b)
}

// String returns the text form.
func (pk *PublicKey) String() string {
	return TextPrefix + base64.RawURLEncoding.EncodeToString(pk.raw)
}

// MarshalText returns the text form, so that public keys can sit in JSON
// and configuration files.
func (pk *PublicKey) MarshalText() ([]byte, error) { return []byte(pk.String()), nil }

// UnmarshalText parses the text form.
func (pk *PublicKey) UnmarshalText(b []byte) error {
	p, err := ParsePublicKey(string(b))
	if err != nil {
		return err
	}
	*pk = *p
	return nil
}

// Bytes returns a copy of the binary form: Ed25519 ‖ ML-DSA-65.
func (pk *PublicKey) Bytes() []byte { return append([]byte(nil), pk.raw...) }

// Ed25519 returns a copy of the Ed25519 half.
func (pk *PublicKey) Ed25519() ed25519.PublicKey { return append(ed25519.PublicKey(nil), pk.ed...) }

// Equal reports whether pk and other are the same key (both halves).
func (pk *PublicKey) Equal(other *PublicKey) bool {
	if pk == nil || other == nil {
		return pk == other
	}
	return subtle.ConstantTimeCompare(pk.raw, other.raw) == 1
}

// Fingerprint names the key stably and briefly: "sha256:" and the first 16
// bytes of SHA-256 of the binary form, in hex.
func (pk *PublicKey) Fingerprint() string {
	h := sha256.Sum256(pk.raw)
	return "sha256:" + hex.EncodeToString(h[:16])
}

// Verify checks a hybrid signature over msg. Both halves must verify; any
// failure is [ErrBadSignature].
func (pk *PublicKey) Verify(msg, sig []byte) error {
	if pk == nil || pk.ml == nil || len(sig) != SignatureSize {
		return ErrBadSignature
	}
	edSig, mlSig := sig[:ed25519.SignatureSize], sig[ed25519.SignatureSize:]
	// Both are checked whatever the first says: the time taken tells
	// nothing about which half failed.
	edOK := ed25519.Verify(pk.ed, msg, edSig)
	mlOK := mldsa65.Verify(pk.ml, msg, []byte(MLDSAContext), mlSig)
	if !edOK || !mlOK {
		return ErrBadSignature
	}
	return nil
}

// Signer makes hybrid signatures under one admin identity: a key in a file
// ([PrivateKey]) or on a smartcard. Sign may reach a device, hence ctx.
type Signer interface {
	Public() *PublicKey
	Sign(ctx context.Context, msg []byte) ([]byte, error)
}

// PrivateKey is a software admin key: two 32-byte seeds. It never prints
// them; call [PrivateKey.Zero] when done.
type PrivateKey struct {
	edSeed [SeedSize]byte
	mlSeed [SeedSize]byte
	ed     ed25519.PrivateKey
	ml     *mldsa65.PrivateKey
	pub    *PublicKey
	zeroed bool
}

var _ Signer = (*PrivateKey)(nil)

// ErrZeroed is returned by [PrivateKey.Sign] after [PrivateKey.Zero].
var ErrZeroed = errors.New("identity: private key was zeroed")

// GenerateKey makes a new admin key from crypto/rand.
func GenerateKey() (*PrivateKey, error) {
	var seeds [PrivateKeySize]byte
	defer clear(seeds[:])
	if _, err := rand.Read(seeds[:]); err != nil {
		return nil, err
	}
	return NewPrivateKey(seeds[:SeedSize], seeds[SeedSize:])
}

// NewPrivateKey builds a key from its Ed25519 seed (RFC 8032) and its
// ML-DSA-65 seed (FIPS 204 ξ). The caller may zeroize its copies after.
func NewPrivateKey(ed25519Seed, mldsa65Seed []byte) (*PrivateKey, error) {
	if len(ed25519Seed) != SeedSize || len(mldsa65Seed) != SeedSize {
		return nil, fmt.Errorf("identity: seeds of %d and %d bytes, want %d each", len(ed25519Seed), len(mldsa65Seed), SeedSize)
	}
	k := &PrivateKey{}
	copy(k.edSeed[:], ed25519Seed)
	copy(k.mlSeed[:], mldsa65Seed)
	k.ed = ed25519.NewKeyFromSeed(k.edSeed[:])
	mlPub, mlPriv := mldsa65.NewKeyFromSeed(&k.mlSeed)
	k.ml = mlPriv
	edPub, _ := k.ed.Public().(ed25519.PublicKey)
	pub, err := NewPublicKey(edPub, mlPub.Bytes())
	if err != nil {
		k.Zero()
		return nil, err
	}
	k.pub = pub
	return k, nil
}

// ParsePrivateKey parses the output of [PrivateKey.MarshalSeeds].
func ParsePrivateKey(b []byte) (*PrivateKey, error) {
	if len(b) != PrivateKeySize {
		return nil, fmt.Errorf("identity: private key of %d bytes, want %d", len(b), PrivateKeySize)
	}
	return NewPrivateKey(b[:SeedSize], b[SeedSize:])
}

// MarshalSeeds returns the Ed25519 seed then the ML-DSA-65 seed (64 bytes).
// The caller zeroizes the result.
func (k *PrivateKey) MarshalSeeds() []byte {
	out := make([]byte, 0, PrivateKeySize)
	out = append(out, k.edSeed[:]...)
	return append(out, k.mlSeed[:]...)
}

// Public returns the public key.
func (k *PrivateKey) Public() *PublicKey { return k.pub }

// Sign returns Ed25519(msg) ‖ ML-DSA-65(msg, context [MLDSAContext]). The
// ML-DSA signature is hedged (FIPS 204 randomised signing), as FIPS 204
// recommends where randomness is available.
func (k *PrivateKey) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if k.zeroed {
		return nil, ErrZeroed
	}
	sig := make([]byte, SignatureSize)
	copy(sig, ed25519.Sign(k.ed, msg))
	if err := mldsa65.SignTo(k.ml, msg, []byte(MLDSAContext), true, sig[ed25519.SignatureSize:]); err != nil {
		return nil, fmt.Errorf("identity: ML-DSA-65 signing: %w", err)
	}
	return sig, nil
}

// Zero overwrites the key material. The key cannot sign afterwards.
func (k *PrivateKey) Zero() {
	clear(k.edSeed[:])
	clear(k.mlSeed[:])
	clear(k.ed)
	if k.ml != nil {
		*k.ml = mldsa65.PrivateKey{}
	}
	k.zeroed = true
}

// String redacts the key; it names the public key's fingerprint. String,
// GoString and Format have value receivers so that a copy of the struct
// redacts too.
func (k PrivateKey) String() string {
	if k.pub == nil {
		return "identity.PrivateKey(REDACTED)"
	}
	return "identity.PrivateKey(" + k.pub.Fingerprint() + ", REDACTED)"
}

// GoString redacts the key.
func (k PrivateKey) GoString() string { return k.String() }

// Format redacts the key under every verb, %x and %#v included.
func (k PrivateKey) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(k.String())) }
