package kms

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"unicode/utf8"
)

// Envelope format v1; ENVELOPE.md is the specification.
const (
	envelopeMagic   = "CFE"
	envelopeVersion = 1
	nonceSize       = 32
	dataKeySize     = 32
	tagSize         = 16
	// headerFixed is magic, version, the id length byte and the KEK version.
	headerFixed = len(envelopeMagic) + 1 + 1 + 4
	// MaxEnvelopeSize bounds an envelope of format v1 (a 127-byte keyring
	// id); anything longer is refused before parsing.
	MaxEnvelopeSize = headerFixed + 2*maxNameLen + 1 + nonceSize + dataKeySize + tagSize
	envelopeLabel   = "coffre envelope v1 data-key wrap"
)

// Limits of the caller-supplied encryption context.
const (
	MaxContextPairs    = 64
	MaxContextKeyLen   = 256
	MaxContextValueLen = 1024
)

// envelope is a parsed envelope of format v1.
type envelope struct {
	keyring    KeyringID
	version    uint32
	header     []byte // everything before the ciphertext, bound as AAD
	nonce      []byte
	ciphertext []byte
}

// parseEnvelope parses b strictly. Its errors describe the structure only —
// never anything that depends on a key — and wrap ErrInvalidArgument.
func parseEnvelope(b []byte) (*envelope, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: envelope: %s", ErrInvalidArgument, fmt.Sprintf(format, args...))
	}
	if len(b) > MaxEnvelopeSize {
		return nil, bad("%d bytes is longer than any valid envelope (%d)", len(b), MaxEnvelopeSize)
	}
	if len(b) < headerFixed {
		return nil, bad("truncated (%d bytes)", len(b))
	}
	if string(b[:3]) != envelopeMagic {
		return nil, bad("not a Coffre envelope")
	}
	if b[3] != envelopeVersion {
		return nil, bad("unsupported format version %d (this server reads version %d)", b[3], envelopeVersion)
	}
	idLen := int(b[4])
	want := headerFixed + idLen + nonceSize + dataKeySize + tagSize
	if len(b) != want {
		return nil, bad("length %d, want %d for a %d-byte keyring id", len(b), want, idLen)
	}
	off := 5
	id, err := ParseKeyringID(string(b[off : off+idLen]))
	if err != nil {
		return nil, bad("keyring id: %v", errors.Unwrap(err))
	}
	off += idLen
	version := binary.BigEndian.Uint32(b[off:])
	if version == 0 {
		return nil, bad("KEK version 0")
	}
	off += 4
	return &envelope{
		keyring:    id,
		version:    version,
		header:     b[:off+nonceSize],
		nonce:      b[off : off+nonceSize],
		ciphertext: b[off+nonceSize:],
	}, nil
}

// appendHeader appends the v1 header up to and including the nonce.
func appendHeader(dst []byte, id KeyringID, version uint32, nonce []byte) []byte {
	s := id.String()
	dst = append(dst, envelopeMagic...)
	dst = append(dst, envelopeVersion, byte(len(s))) // #nosec G115 -- a valid id is at most 127 bytes
	dst = append(dst, s...)
	dst = binary.BigEndian.AppendUint32(dst, version)
	return append(dst, nonce...)
}

// envelopeAAD binds the header, the caller's tenant, the keyring and the
// canonical encryption context. Every field is length-prefixed so that no
// two distinct inputs share an encoding.
func envelopeAAD(header []byte, tenant string, id KeyringID, ec []byte) []byte {
	aad := make([]byte, 0, len(header)+12+len(tenant)+len(id.String())+len(ec))
	aad = append(aad, header...)
	aad = appendLP(aad, []byte(tenant))
	aad = appendLP(aad, []byte(id.String()))
	return appendLP(aad, ec)
}

func appendLP(dst, b []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(b))) // #nosec G115 -- callers bound b far below 4 GiB
	return append(dst, b...)
}

// canonicalContext validates ec and encodes it canonically: the pair count,
// then each pair sorted by key, every string length-prefixed.
func canonicalContext(ec map[string]string) ([]byte, error) {
	if len(ec) > MaxContextPairs {
		return nil, fmt.Errorf("%w: context has %d pairs, at most %d are allowed", ErrInvalidArgument, len(ec), MaxContextPairs)
	}
	keys := make([]string, 0, len(ec))
	size := 4
	for k, v := range ec {
		switch {
		case k == "":
			return nil, fmt.Errorf("%w: context key is empty", ErrInvalidArgument)
		case len(k) > MaxContextKeyLen:
			return nil, fmt.Errorf("%w: context key %.32q… is longer than %d bytes", ErrInvalidArgument, k, MaxContextKeyLen)
		case len(v) > MaxContextValueLen:
			return nil, fmt.Errorf("%w: context value of %q is longer than %d bytes", ErrInvalidArgument, k, MaxContextValueLen)
		case !utf8.ValidString(k) || !utf8.ValidString(v):
			return nil, fmt.Errorf("%w: context pair %q is not valid UTF-8", ErrInvalidArgument, k)
		}
		keys = append(keys, k)
		size += 8 + len(k) + len(v)
	}
	sort.Strings(keys)
	out := make([]byte, 0, size)
	out = binary.BigEndian.AppendUint32(out, uint32(len(keys))) // #nosec G115 -- at most MaxContextPairs
	for _, k := range keys {
		out = appendLP(out, []byte(k))
		out = appendLP(out, []byte(ec[k]))
	}
	return out, nil
}

// zeroNonce is the GCM nonce of every envelope: each envelope key is derived
// afresh from a 256-bit random nonce and used for exactly one encryption,
// so a fixed GCM nonce never repeats under one key.
var zeroNonce = make([]byte, 12)

// envelopeKey derives the one-time key of an envelope from the KEK and the
// envelope's nonce with the NIST SP 800-108r1 KDF in counter mode, HMAC-SHA256
// as the PRF and one 256-bit block:
//
//	EK = HMAC-SHA256(KEK, [1]₃₂ ‖ label ‖ 0x00 ‖ nonce ‖ [256]₃₂)
//
// Deriving a key per envelope lifts GCM's limit of 2^32 random nonces per
// key: a KEK may wrap any number of data keys.
func envelopeKey(kek, nonce []byte) []byte {
	var msg [4 + len(envelopeLabel) + 1 + nonceSize + 4]byte
	binary.BigEndian.PutUint32(msg[:], 1)
	n := 4 + copy(msg[4:], envelopeLabel)
	msg[n] = 0
	n += 1 + copy(msg[n+1:], nonce)
	binary.BigEndian.PutUint32(msg[n:], 256)
	mac := hmac.New(sha256.New, kek)
	mac.Write(msg[:])
	return mac.Sum(make([]byte, 0, sha256.Size))
}

// sealAESGCM and openAESGCM are the single AEAD path of the package:
// AES-256-GCM with a 96-bit nonce and a 128-bit tag. The Wycheproof vectors
// run against exactly these two functions.
func sealAESGCM(key, nonce, plaintext, aad []byte) ([]byte, error) {
	aead, err := newAESGCM(key)
	if err != nil {
		return nil, err
	}
	if len(nonce) != aead.NonceSize() {
		return nil, fmt.Errorf("kms: AES-GCM nonce of %d bytes, want %d", len(nonce), aead.NonceSize())
	}
	return aead.Seal(nil, nonce, plaintext, aad), nil
}

func openAESGCM(key, nonce, ciphertext, aad []byte) ([]byte, error) {
	aead, err := newAESGCM(key)
	if err != nil {
		return nil, err
	}
	if len(nonce) != aead.NonceSize() || len(ciphertext) < aead.Overhead() {
		return nil, ErrDecrypt
	}
	pt, err := aead.Open(nil, nonce, ciphertext, aad)
	if err != nil {
		return nil, ErrDecrypt
	}
	return pt, nil
}

func newAESGCM(key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("kms: AES-256-GCM key of %d bytes", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
