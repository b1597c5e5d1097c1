package kms

import (
	"fmt"
	"strings"
)

// maxNameLen bounds each part of a keyring id; with the slash an id fits in
// 127 bytes, which the envelope encodes in one length byte.
const maxNameLen = 63

// KeyringID names a keyring: the tenant that owns it and its name within
// the tenant. Its text form is "tenant/name".
type KeyringID struct {
	Tenant string
	Name   string
}

// String returns "tenant/name".
func (id KeyringID) String() string { return id.Tenant + "/" + id.Name }

// IsZero reports whether id is the zero KeyringID.
func (id KeyringID) IsZero() bool { return id == KeyringID{} }

// ParseKeyringID parses and validates "tenant/name". Each part is 1 to 63
// characters of lowercase letters, digits, '-' and '_', starting with a
// letter or digit.
func ParseKeyringID(s string) (KeyringID, error) {
	tenant, name, ok := strings.Cut(s, "/")
	if !ok {
		return KeyringID{}, fmt.Errorf("%w: keyring %q: want TENANT/NAME", ErrInvalidArgument, s)
	}
	id := KeyringID{Tenant: tenant, Name: name}
	if err := id.Validate(); err != nil {
		return KeyringID{}, err
	}
	return id, nil
}

// Validate checks both parts of id.
func (id KeyringID) Validate() error {
	if err := ValidateTenant(id.Tenant); err != nil {
		return err
	}
	if err := validateName("keyring name", id.Name); err != nil {
		return err
	}
	return nil
}

// ValidateTenant checks a tenant name.
func ValidateTenant(tenant string) error { return validateName("tenant", tenant) }

func validateName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%w: %s is empty", ErrInvalidArgument, what)
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("%w: %s %q is longer than %d characters", ErrInvalidArgument, what, s, maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case (c == '-' || c == '_') && i > 0:
		default:
			return fmt.Errorf("%w: %s %q: character %q at %d is not allowed (lowercase letters, digits, '-' and '_', starting with a letter or digit)",
				ErrInvalidArgument, what, s, c, i)
		}
	}
	return nil
}
