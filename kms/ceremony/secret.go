package ceremony

import (
	"crypto/subtle"
	"fmt"
	"sync"
)

// Secret is key material that a ceremony holds in the clear for a moment:
// the root key, the shared scalar, an opened share. Its bytes live in
// memory outside the Go heap, locked against swapping where the system
// allows it (see [Secret.Locked]), and are overwritten by [Secret.Destroy].
// A Secret never prints its content.
type Secret struct {
	mu     sync.Mutex
	b      []byte
	locked bool
	free   func([]byte)
}

// newSecret returns a zeroed Secret of n bytes.
func newSecret(n int) *Secret {
	b, locked, free := allocLocked(n)
	return &Secret{b: b, locked: locked, free: free}
}

// secretFrom copies src into a new Secret and clears src.
func secretFrom(src []byte) *Secret {
	s := newSecret(len(src))
	copy(s.b, src)
	clear(src)
	return s
}

// Bytes returns the secret's bytes, valid until Destroy. The caller must
// not keep or copy them beyond its need.
func (s *Secret) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b
}

// Len returns the size of the secret (0 once destroyed).
func (s *Secret) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.b)
}

// Locked reports whether the memory is locked against swapping. When it is
// not (RLIMIT_MEMLOCK too low, or a system without mlock), the secret is
// still zeroized, but it may have reached swap meanwhile: callers warn the
// operator.
func (s *Secret) Locked() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.locked
}

// Equal compares two secrets in constant time.
func (s *Secret) Equal(o *Secret) bool {
	return subtle.ConstantTimeCompare(s.Bytes(), o.Bytes()) == 1
}

// Destroy overwrites the secret and releases its memory. It is safe to call
// more than once.
func (s *Secret) Destroy() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b == nil {
		return
	}
	clear(s.b)
	s.free(s.b)
	s.b = nil
}

// String redacts the secret.
func (s *Secret) String() string { return fmt.Sprintf("ceremony.Secret(%d bytes, redacted)", s.Len()) }

// GoString redacts the secret.
func (s *Secret) GoString() string { return s.String() }

// Format redacts the secret whatever the verb.
func (s *Secret) Format(f fmt.State, _ rune) { _, _ = fmt.Fprint(f, s.String()) }
