package main

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/coffre-kms/coffre/cmd/internal/adminkey"
	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms/identity"
)

func adminKeyCommands() []*command {
	var name, out, passFile, token string
	return []*command{
		{
			path: "admin keygen", args: "", nargs: 0,
			summary: "Make an admin signing key (Ed25519 + ML-DSA-65) in a passphrase-protected file or on a PKCS#11 token; print its public key.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&name, "name", "", "the admin's `NAME` (letters, digits, . _ - @)")
				fs.StringVar(&out, "out", "", "write the key to `FILE` (mode 0600; an existing file is never overwritten)")
				fs.StringVar(&token, "token", "", "make the key on the token named by this pkcs11: `URI` (object= is its label; defaults to --name) instead of a file")
				fs.StringVar(&passFile, "passphrase-file", "", "read the new key's passphrase from the first line of `FILE` (mode 0600) instead of the terminal")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if err := adminkey.ValidName(name); err != nil {
					return fmt.Errorf("%w: --name: %v", errUsage, err)
				}
				switch {
				case (out == "") == (token == ""):
					return fmt.Errorf("%w: give exactly one of --out FILE and --token pkcs11:URI", errUsage)
				case token != "" && passFile != "":
					return fmt.Errorf("%w: --passphrase-file is for --out; a token key is protected by the token's PIN", errUsage)
				case token != "":
					return keygenToken(ctx, e, name, token)
				}
				return keygenFile(e, name, out, passFile)
			},
		},
		{
			path: "admin pubkey", args: "", nargs: 0,
			summary: "Print the public key line of the admin key named by --admin-key (a key file or a pkcs11: URI).",
			run: func(ctx context.Context, e *env, _ []string) error {
				// --admin-key and --admin-passphrase-file are the global
				// flags that the proposal commands sign with.
				ref := e.g.adminKey
				if ref == "" {
					return fmt.Errorf("%w: --admin-key FILE|pkcs11:URI (or COFFRE_ADMIN_KEY) is required", errUsage)
				}
				if adminkey.IsTokenRef(ref) {
					if _, err := hsm.ParseURI(ref); err != nil {
						return fmt.Errorf("%w: --admin-key: %v", errUsage, err)
					}
				}
				n, pub, err := adminkey.Describe(ctx, ref, func() ([]byte, error) {
					return keyfile.ReadPassphrase(e.g.adminPassFile, "Passphrase of admin key "+ref+": ", e.stderr)
				})
				if err != nil {
					return err
				}
				where := map[string]string{"file": ref}
				if adminkey.IsTokenRef(ref) {
					where = map[string]string{"token": ref}
				}
				return printAdminKey(e, n, pub, where)
			},
		},
	}
}

func keygenFile(e *env, name, out, passFile string) (err error) {
	pass, err := newAdminPassphrase(e, passFile)
	if err != nil {
		return err
	}
	defer clear(pass)
	file, pub, err := adminkey.Generate(name, pass, kdfParams())
	if err != nil {
		return err
	}
	// Claim the name first with O_EXCL, so that a file appearing meanwhile
	// is not replaced; the atomic write then fills it.
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600) // #nosec G304 -- the operator names the output file
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s already exists; not overwriting a key file", out)
	}
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.Remove(out) // our empty placeholder; err says what failed
		}
	}()
	if err := atomicfile.WriteFile(out, file, 0o600); err != nil {
		return err
	}
	return printAdminKey(e, name, pub, map[string]string{"file": out})
}

func keygenToken(ctx context.Context, e *env, name, token string) error {
	u, err := hsm.ParseURI(token)
	if err != nil {
		return fmt.Errorf("%w: --token: %v", errUsage, err)
	}
	switch {
	case u.Object == "":
		u.Object = name
	case u.Object != name:
		return fmt.Errorf("%w: --token names object %q but --name is %q; they must agree", errUsage, u.Object, name)
	}
	pub, err := adminkey.GenerateToken(ctx, u.String())
	if errors.Is(err, hsm.ErrKeyExists) {
		return fmt.Errorf("the token already holds a key named %q; nothing was changed (%w)", name, err)
	}
	if err != nil {
		return err
	}
	return printAdminKey(e, name, pub, map[string]string{"token": u.KeyID()})
}

// newAdminPassphrase reads the passphrase of a new key file: from the
// file, or typed twice on the terminal.
func newAdminPassphrase(e *env, passFile string) ([]byte, error) {
	p, err := keyfile.ReadPassphrase(passFile, "Passphrase for the new admin key: ", e.stderr)
	if err != nil || passFile != "" {
		return p, err
	}
	again, err := keyfile.ReadPassphrase("", "Repeat the passphrase: ", e.stderr)
	if err != nil {
		clear(p)
		return nil, err
	}
	defer clear(again)
	if subtle.ConstantTimeCompare(p, again) != 1 {
		clear(p)
		return nil, errors.New("the two passphrases differ")
	}
	return p, nil
}

// printAdminKey prints the public key line on stdout (so that it can be
// redirected to a file and handed to the quorum) and a note on stderr; with
// --json, one object on stdout.
func printAdminKey(e *env, name string, pub *identity.PublicKey, where map[string]string) error {
	if e.g.json {
		v := map[string]string{"name": name, "public_key": pub.String(), "fingerprint": pub.Fingerprint()}
		for k, w := range where {
			v[k] = w
		}
		return json.NewEncoder(e.stdout).Encode(v)
	}
	var note bytes.Buffer
	fmt.Fprintf(&note, "admin %s, fingerprint %s", name, pub.Fingerprint())
	for k, w := range where {
		fmt.Fprintf(&note, ", %s %s", k, w)
	}
	fmt.Fprintln(e.stderr, note.String())
	_, err := fmt.Fprintln(e.stdout, pub.String())
	return err
}
