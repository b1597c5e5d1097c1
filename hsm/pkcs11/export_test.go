package pkcs11

import (
	"context"

	p11 "github.com/miekg/pkcs11"
)

// FillPool takes every session slot of r, as if that many operations were in
// flight, until release is called.
func FillPool(r *Root) (release func()) {
	for i := 0; i < r.size; i++ {
		r.slots <- struct{}{}
	}
	return func() {
		for i := 0; i < r.size; i++ {
			<-r.slots
		}
	}
}

// GCMWithKey runs the AES-GCM path of Wrap and Unwrap (the same seam calls,
// on a pooled session of r) under a session key with the given value, so
// that known-answer vectors can check how IV, AAD and tag reach the token.
func GCMWithKey(ctx context.Context, r *Root, key, iv, aad, in []byte, decrypt bool) ([]byte, error) {
	var out []byte
	err := r.do(ctx, func(s session, _ objectHandle) error {
		var h p11.ObjectHandle
		err := s.m.call(s.gen, func(c *p11.Ctx) error {
			var err error
			h, err = c.CreateObject(s.h, []*p11.Attribute{
				p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
				p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
				p11.NewAttribute(p11.CKA_TOKEN, false),
				p11.NewAttribute(p11.CKA_ENCRYPT, true),
				p11.NewAttribute(p11.CKA_DECRYPT, true),
				p11.NewAttribute(p11.CKA_VALUE, key),
			})
			return err
		})
		if err != nil {
			return err
		}
		defer s.destroy(objectHandle(h))
		if decrypt {
			out, err = s.decryptGCM(objectHandle(h), iv, aad, in)
		} else {
			out, _, err = s.encryptGCM(objectHandle(h), iv, aad, in)
		}
		return err
	})
	return out, err
}

// ModuleGeneration returns how many times this package has initialised the
// library at path (0 if never loaded).
func ModuleGeneration(path string) uint64 {
	registry.Lock()
	m := registry.mods[path]
	registry.Unlock()
	if m == nil {
		return 0
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.gen
}
