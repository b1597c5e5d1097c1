package pkcs11

import (
	"context"
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
)

// rootKeySize is the size of a root key's value: AES-256.
const rootKeySize = 32

// ImportRoot puts key, the value of an AES-256 root key held by the caller
// (the recoverable ceremony and its restore), on the token named by cfg.URI
// with C_CreateObject, and returns it opened. The object gets exactly the
// attributes [CreateRoot] gives a generated key — token, private, sensitive,
// not extractable, not modifiable, encrypt and decrypt only, never wrap,
// unwrap, sign, verify or derive — and they are read back before the key is
// used. Its CKA_LABEL is the URI's object (required), its CKA_ID the URI's
// id or 16 random bytes. If an object with that label or id is already on
// the token it returns an error wrapping [hsm.ErrKeyExists] and changes
// nothing.
//
// PKCS#11 reports an imported key with CKA_ALWAYS_SENSITIVE and
// CKA_NEVER_EXTRACTABLE false: the token cannot vouch for the key's life
// before C_CreateObject, since its value came from outside. That is expected
// and is why a recoverable root exists only through a ceremony that splits
// it into custodian shares and zeroizes it; from the import on, the token
// keeps it sensitive and never lets it out.
//
// The caller keeps ownership of key and zeroizes it. miekg/pkcs11 copies the
// template, key included, into a C buffer that it frees without clearing;
// this package cannot change that, and the ceremony's host is expected to be
// an offline machine that is wiped afterwards.
func ImportRoot(ctx context.Context, cfg Config, key []byte) (*Root, error) {
	if len(key) != rootKeySize {
		return nil, fmt.Errorf("pkcs11: ImportRoot: key of %d bytes, want %d (AES-256)", len(key), rootKeySize)
	}
	r, err := newRoot(cfg, true)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.mod, err = acquireModule(r.uri.ModulePath)
	if err != nil {
		return nil, err
	}
	if err := r.importKey(ctx, key); err != nil {
		r.mod.release()
		return nil, err
	}
	// The key is on the token and r.keyID names it: connect finds it by
	// label and that id (a key slipped in meanwhile under the same label
	// makes it fail rather than be taken), reads the attributes back and
	// refuses an unsafe key, as every reconnect will.
	c, err := r.connect(ctx, false)
	if err != nil {
		r.mod.release()
		return nil, fmt.Errorf("pkcs11: root key %s was imported but cannot be opened: %w", r.id, err)
	}
	r.cur = c
	return r, nil
}

// importKey creates the root key object from key on its own logged-in
// sessions, checks the attributes the token applied and records its CKA_ID
// in r.keyID.
func (r *Root) importKey(ctx context.Context, key []byte) error {
	s, slot, err := r.loginSession(ctx, false)
	if err != nil {
		return err
	}
	defer s.close()
	if err := ctx.Err(); err != nil {
		return err
	}
	_, id, err := r.createKey(s, slot, "imported", "importing", imported, func(rw session, id []byte) (objectHandle, error) {
		return rw.createRootKey(r.uri.Object, id, key)
	})
	if err != nil {
		return err
	}
	r.keyID = append([]byte(nil), id...)
	return nil
}

// imported is what a key made by createRootKey must read back as: the
// attributes of [generated] except the two that only a key born in the
// token can have.
var imported = func() hsm.Attributes {
	a := generated
	a.AlwaysSensitive, a.NeverExtractable = false, false
	return a
}()

// createRootKey makes the root key object from its value: rootKeyTemplate
// plus CKA_VALUE (without CKA_VALUE_LEN, which C_CreateObject refuses for a
// key whose value is given).
func (s session) createRootKey(label string, id, value []byte) (objectHandle, error) {
	if len(value) != rootKeySize {
		return 0, errors.New("pkcs11: root key value is not 32 bytes")
	}
	// NewAttribute keeps the slice itself, not a copy: nothing to clear on
	// the Go side beyond the caller's buffer.
	tmpl := append(rootKeyTemplate(label, id), p11.NewAttribute(p11.CKA_VALUE, value))
	var h p11.ObjectHandle
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		h, err = c.CreateObject(s.h, tmpl)
		return err
	})
	return objectHandle(h), err
}
