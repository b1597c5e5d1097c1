// Package seal encrypts small secrets — custodian shares of a root key,
// store backups — to a person's or a site's long-term public key with HPKE
// (RFC 9180) in base mode over the hybrid post-quantum KEM X-Wing
// (ML-KEM-768 + X25519), HKDF-SHA256 and AES-256-GCM.
//
// Keys have a text form that fits on one line, in a file or a ceremony
// record: "coffre-xwing1:" followed by unpadded base64url.
package seal

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"
)

var (
	suite  = hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM)
	scheme = hpke.KEM_XWING.Scheme()
)

const publicPrefix = "coffre-xwing1:"

// ErrOpen is the one error of every failure to open a sealed message.
var ErrOpen = errors.New("seal: cannot open: wrong key or altered message")

// PublicKey is an X-Wing public key that messages are sealed to.
type PublicKey struct{ pk kem.PublicKey }

// PrivateKey is an X-Wing private key. It does not print.
type PrivateKey struct {
	sk   kem.PrivateKey
	seed []byte
}

// GenerateKey makes a fresh key pair from a random 32-byte seed.
func GenerateKey() (*PrivateKey, error) {
	seed := make([]byte, scheme.SeedSize())
	if _, err := rand.Read(seed); err != nil {
		return nil, err
	}
	return NewPrivateKey(seed)
}

// NewPrivateKey derives the key pair from seed (X-Wing's 32-byte seed).
func NewPrivateKey(seed []byte) (*PrivateKey, error) {
	if len(seed) != scheme.SeedSize() {
		return nil, fmt.Errorf("seal: seed of %d bytes, want %d", len(seed), scheme.SeedSize())
	}
	_, sk := scheme.DeriveKeyPair(seed)
	return &PrivateKey{sk: sk, seed: append([]byte(nil), seed...)}, nil
}

// Seed returns a copy of the private seed, for storing in an encrypted file.
func (k *PrivateKey) Seed() []byte { return append([]byte(nil), k.seed...) }

// Public returns the public half.
func (k *PrivateKey) Public() *PublicKey { return &PublicKey{pk: k.sk.Public()} }

// Zero clears the seed held by k (best effort: the KEM's expanded key is
// held by the library).
func (k *PrivateKey) Zero() { clear(k.seed) }

// String redacts the key.
func (k *PrivateKey) String() string { return "seal.PrivateKey(redacted)" }

// GoString redacts the key.
func (k *PrivateKey) GoString() string { return k.String() }

// String returns the one-line text form of the key.
func (p *PublicKey) String() string {
	b, err := p.pk.MarshalBinary()
	if err != nil {
		panic(err) // X-Wing public keys always marshal
	}
	return publicPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// Equal reports whether p and q are the same key.
func (p *PublicKey) Equal(q *PublicKey) bool { return q != nil && p.pk.Equal(q.pk) }

// ParsePublicKey reads the text form written by String.
func ParsePublicKey(s string) (*PublicKey, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), publicPrefix)
	if !ok {
		return nil, fmt.Errorf("seal: public key must start with %q", publicPrefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil {
		return nil, fmt.Errorf("seal: public key: %v", err)
	}
	if len(b) != scheme.PublicKeySize() {
		return nil, fmt.Errorf("seal: public key of %d bytes, want %d", len(b), scheme.PublicKeySize())
	}
	pk, err := scheme.UnmarshalBinaryPublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("seal: public key: %v", err)
	}
	return &PublicKey{pk: pk}, nil
}

// Seal encrypts plaintext to to. info separates uses (it must name the
// purpose, such as "coffre custodian share v1"); aad is authenticated, not
// encrypted. The result is the KEM encapsulation followed by the ciphertext.
func Seal(to *PublicKey, info, aad, plaintext []byte) ([]byte, error) {
	s, err := suite.NewSender(to.pk, info)
	if err != nil {
		return nil, err
	}
	enc, sealer, err := s.Setup(rand.Reader)
	if err != nil {
		return nil, err
	}
	ct, err := sealer.Seal(plaintext, aad)
	if err != nil {
		return nil, err
	}
	return append(enc, ct...), nil
}

// Open reverses Seal. Every failure is ErrOpen.
func Open(k *PrivateKey, info, aad, sealed []byte) ([]byte, error) {
	n := scheme.CiphertextSize()
	if len(sealed) < n+16 {
		return nil, ErrOpen
	}
	r, err := suite.NewReceiver(k.sk, info)
	if err != nil {
		return nil, ErrOpen
	}
	opener, err := r.Setup(sealed[:n])
	if err != nil {
		return nil, ErrOpen
	}
	pt, err := opener.Open(sealed[n:], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}
