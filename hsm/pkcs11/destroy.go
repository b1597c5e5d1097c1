package pkcs11

import (
	"context"
	"fmt"

	"github.com/coffre-kms/coffre/hsm"
)

// DestroyRoot destroys the root key named by cfg.URI on its token
// (C_DestroyObject): the last step of a root rotation, once no stored KEK is
// wrapped by that key any more. It cannot be undone, and every KEK still
// wrapped by the key becomes unreadable for ever (crypto-shredding); the
// caller checks beforehand, under a quorum, that none is left.
//
// Only an AES secret key matching the URI's object and/or id is destroyed,
// and only when exactly one matches. It returns an error wrapping
// [hsm.ErrKeyNotFound] when there is none (so that a repeated destruction
// reports what happened rather than succeeding silently), and one wrapping
// [hsm.ErrUnavailable] when the token cannot be reached. Roots opened on the
// key in this process are not closed; their next call fails.
func DestroyRoot(ctx context.Context, cfg Config) error {
	r, err := newRoot(cfg, false)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mod, err = acquireModule(r.uri.ModulePath)
	if err != nil {
		return err
	}
	defer r.mod.release()
	s, _, err := r.loginSession(ctx, true)
	if err != nil {
		return err
	}
	defer s.close()
	hs, err := s.findObjects(r.uri.Object, r.uri.ID, true)
	if err != nil {
		return r.keyErr("searching for", err)
	}
	switch len(hs) {
	case 0:
		return fmt.Errorf("%w: %s", hsm.ErrKeyNotFound, r.id)
	case 1:
	default:
		return fmt.Errorf("pkcs11: %d AES keys match %s; add id= to the URI to say which one to destroy", len(hs), r.id)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.destroy(hs[0]); err != nil {
		return r.keyErr("destroying", err)
	}
	return nil
}
