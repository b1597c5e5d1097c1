package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms/seal"
)

// custodianPEMType is the PEM type of a key custodian's private key file:
// the X-Wing seed that opens the custodian's shares, encrypted under the
// custodian's passphrase (package keyfile).
const custodianPEMType = "COFFRE CUSTODIAN KEY"

// New custodian key files get kdfParams() (backup.go): the Argon2id
// defaults (only the test binary lowers them).

func custodianCommands() []*command {
	var out, passFile string
	return []*command{{
		path: "custodian keygen", args: "", nargs: 0,
		summary: "Make a key custodian's key pair (X-Wing, for sealed root-key shares): writes FILE (0600, passphrase-encrypted) and FILE.pub, and prints the public key.",
		flags: func(fs *flag.FlagSet) {
			fs.StringVar(&out, "out", "", "private key `FILE` to write (refused if it exists)")
			fs.StringVar(&passFile, "passphrase-file", "", "read the new passphrase from `FILE` (mode 0600) instead of the terminal")
		},
		run: func(_ context.Context, e *env, _ []string) error {
			if out == "" {
				return fmt.Errorf("%w: --out is required", errUsage)
			}
			if err := refuseExisting("a key", out, out+".pub"); err != nil {
				return err
			}
			pass, err := newCustodianPassphrase(passFile, e.stderr)
			if err != nil {
				return err
			}
			defer clear(pass)
			k, err := seal.GenerateKey()
			if err != nil {
				return err
			}
			defer k.Zero()
			seed := k.Seed()
			defer clear(seed)
			b, err := keyfile.Encrypt(custodianPEMType, seed, pass, kdfParams())
			if err != nil {
				return err
			}
			if err := atomicfile.WriteFile(out, b, 0o600); err != nil {
				return err
			}
			pub := k.Public().String()
			if err := atomicfile.WriteFile(out+".pub", []byte(pub+"\n"), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(e.stderr, "wrote custodian key %s (passphrase-protected) and %s.pub; fingerprint %s\n", out, out, fingerprint(k.Public()))
			if e.g.json {
				return json.NewEncoder(e.stdout).Encode(map[string]any{
					"key_file": out, "public_key": pub, "fingerprint": fingerprint(k.Public()),
				})
			}
			// stdout is the public key alone, so that it can be piped or
			// saved as is.
			fmt.Fprintln(e.stdout, pub)
			return nil
		},
	}}
}

// newCustodianPassphrase reads a new passphrase from file or, on a
// terminal, twice.
func newCustodianPassphrase(file string, stderr io.Writer) ([]byte, error) {
	p, err := keyfile.ReadPassphrase(file, "new passphrase for the custodian key: ", stderr)
	if err != nil {
		return nil, err
	}
	if file != "" {
		return p, nil
	}
	again, err := keyfile.ReadPassphrase("", "repeat the passphrase: ", stderr)
	if err != nil {
		clear(p)
		return nil, err
	}
	defer clear(again)
	if !bytes.Equal(p, again) {
		clear(p)
		return nil, errors.New("the passphrases differ")
	}
	return p, nil
}

// fingerprint is a short name for a custodian public key in progress
// lines and audit entries: the first 16 hex digits of the SHA-256 of its
// text form.
func fingerprint(pk *seal.PublicKey) string {
	sum := sha256.Sum256([]byte(pk.String()))
	return "xwing:" + hex.EncodeToString(sum[:8])
}

// parseCustodianPublic reads a custodian public key given on the command
// line: the key's text form itself or a file holding it (FILE.pub).
func parseCustodianPublic(arg string) (*seal.PublicKey, error) {
	if strings.HasPrefix(arg, "coffre-xwing1:") {
		return seal.ParsePublicKey(arg)
	}
	b, err := readInput("--custodian", arg)
	if err != nil {
		return nil, err
	}
	if bytes.Contains(b, []byte("PRIVATE")) || bytes.Contains(b, []byte(custodianPEMType)) {
		return nil, fmt.Errorf("--custodian %s is a private key file; give the custodian's public key (%s.pub)", arg, arg)
	}
	pk, err := seal.ParsePublicKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("--custodian %s: %w", arg, err)
	}
	return pk, nil
}

// readCustodianKey opens a custodian's private key file with the
// passphrase from passFile or, if empty, the terminal.
func readCustodianKey(path, passFile string, stderr io.Writer) (*seal.PrivateKey, error) {
	b, err := readInput("--custodian-key", path)
	if err != nil {
		return nil, err
	}
	pass, err := keyfile.ReadPassphrase(passFile, fmt.Sprintf("passphrase for custodian key %s: ", path), stderr)
	if err != nil {
		return nil, fmt.Errorf("custodian key %s: %w", path, err)
	}
	defer clear(pass)
	seed, err := keyfile.Decrypt(custodianPEMType, b, pass)
	if err != nil {
		return nil, fmt.Errorf("custodian key %s: %w", path, err)
	}
	defer clear(seed)
	return seal.NewPrivateKey(seed)
}
