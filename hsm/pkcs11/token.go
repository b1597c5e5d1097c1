package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/coffre-kms/coffre/hsm"
)

// InitToken initialises a free (uninitialised) slot of the module as a new
// token with label, owned by soPIN, and sets its user PIN: C_InitToken, then
// a security-officer login and C_InitPIN. It is meant for development
// environments and tests (SoftHSM always offers one free slot); production
// tokens are initialised by their vendor's tools in a ceremony.
//
// It returns an error wrapping [ErrTokenExists] if a token with that label
// is present, since initialising over it would destroy its keys.
func InitToken(ctx context.Context, modulePath, label, soPIN, userPIN string) error {
	if !filepath.IsAbs(modulePath) {
		return fmt.Errorf("pkcs11: InitToken: module path %q is not absolute", modulePath)
	}
	if err := checkLabel(label); err != nil {
		return fmt.Errorf("pkcs11: InitToken: label %q: %v", label, err)
	}
	if soPIN == "" || userPIN == "" {
		return errors.New("pkcs11: InitToken: empty PIN")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	m, err := acquireModule(modulePath)
	if err != nil {
		return err
	}
	defer m.release()
	gen, err := m.ensureInitialized()
	if err != nil {
		return err
	}
	ts, err := m.tokens(gen)
	if err != nil {
		return fmt.Errorf("%w: module %s: listing slots: %v", hsm.ErrUnavailable, modulePath, err)
	}
	free, found := uint(0), false
	for _, t := range ts {
		if t.initialized && t.label == label {
			return fmt.Errorf("%w: %q in slot %d", ErrTokenExists, label, t.slot)
		}
		if !t.initialized && !found {
			free, found = t.slot, true
		}
	}
	if !found {
		return fmt.Errorf("pkcs11: InitToken: module %s has no slot with an uninitialised token", modulePath)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := m.initToken(gen, free, soPIN, label); err != nil {
		return fmt.Errorf("pkcs11: C_InitToken on slot %d: %w", free, err)
	}
	s, err := m.openSession(gen, free, true)
	if err != nil {
		return fmt.Errorf("pkcs11: token %q: C_OpenSession: %w", label, err)
	}
	defer s.close()
	if err := s.loginSO(soPIN); err != nil {
		return fmt.Errorf("pkcs11: token %q: security officer C_Login: %w", label, err)
	}
	if err := s.initPIN(userPIN); err != nil {
		_ = s.logout()
		return fmt.Errorf("pkcs11: token %q: C_InitPIN: %w", label, err)
	}
	if err := s.logout(); err != nil {
		return fmt.Errorf("pkcs11: token %q: C_Logout: %w", label, err)
	}
	return nil
}

// checkLabel checks a token label: CK_TOKEN_INFO.label is 32 bytes of UTF-8
// padded with spaces, so a longer label is cut and outer spaces are lost.
func checkLabel(label string) error {
	switch {
	case label == "":
		return errors.New("empty")
	case len(label) > 32:
		return errors.New("longer than 32 bytes")
	case !utf8.ValidString(label):
		return errors.New("not valid UTF-8")
	case strings.TrimSpace(label) != label:
		return errors.New("leading or trailing spaces")
	case strings.IndexFunc(label, unicode.IsControl) >= 0:
		return errors.New("contains a control character")
	}
	return nil
}
