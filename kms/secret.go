package kms

import (
	"fmt"
	"log/slog"
)

const redacted = "[redacted]"

// Secret holds key material. It never prints — String, GoString, Format,
// MarshalText, MarshalJSON and slog all show "[redacted]" — and Zero wipes
// it. The zero value and nil are empty secrets.
//
// Go's garbage collector may have copied the bytes before Zero runs, so
// zeroization is best effort; what Secret guarantees is that the bytes do
// not reach a log, an error or a JSON document by accident.
type Secret struct {
	b []byte
}

// NewSecret takes ownership of b: the caller must not use b afterwards.
func NewSecret(b []byte) *Secret { return &Secret{b: b} }

// Expose returns the key bytes for immediate use. The caller must not keep,
// log or return them; they are wiped by Zero.
func (s *Secret) Expose() []byte {
	if s == nil {
		return nil
	}
	return s.b
}

// Len returns the length of the key in bytes.
func (s *Secret) Len() int {
	if s == nil {
		return 0
	}
	return len(s.b)
}

// Zero overwrites the key bytes and empties the secret.
func (s *Secret) Zero() {
	if s == nil {
		return
	}
	clear(s.b)
	s.b = nil
}

// String implements fmt.Stringer without revealing anything.
func (s *Secret) String() string { return redacted }

// GoString implements fmt.GoStringer without revealing anything.
func (s *Secret) GoString() string { return redacted }

// Format implements fmt.Formatter so that every verb, %x and %v included,
// prints "[redacted]".
func (s *Secret) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// MarshalText keeps the secret out of text encodings.
func (s *Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// MarshalJSON keeps the secret out of JSON encodings.
func (s *Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }

// LogValue keeps the secret out of structured logs.
func (s *Secret) LogValue() slog.Value { return slog.StringValue(redacted) }
