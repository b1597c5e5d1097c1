// Package adminkey gives coffrectl an admin's signing identity, wherever it
// is kept: in a passphrase-encrypted file ([Generate], PEM type "COFFRE
// ADMIN KEY", see package keyfile) or on a PKCS#11 token named by a pkcs11:
// URI ([GenerateToken], and hsm/pkcs11's AdminKey). [Load] opens either as
// an [identity.Signer].
//
// # File format
//
// The plaintext sealed by keyfile is text:
//
//	coffre-admin-key v1
//	name <admin name>
//	ed25519 <base64 of the 32-byte Ed25519 seed>
//	mldsa65 <base64 of the 32-byte ML-DSA-65 seed (FIPS 204 ξ)>
package adminkey

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/identity"
)

// PEMType is the PEM block type of an admin key file.
const PEMType = "COFFRE ADMIN KEY"

const header = "coffre-admin-key v1"

// maxName bounds an admin name; it is an identifier, not prose.
const maxName = 64

// maxFile bounds what Load reads: an admin key file is about 300 bytes.
const maxFile = 64 << 10

// ErrBadKeyFile is wrapped by every error about the content of a key file
// that opened under its passphrase (a wrong passphrase is
// keyfile.ErrPassphrase).
var ErrBadKeyFile = errors.New("adminkey: malformed admin key file")

// ValidName reports whether name can name an admin: 1 to 64 characters
// among letters, digits and . _ - @.
func ValidName(name string) error {
	if name == "" || len(name) > maxName {
		return fmt.Errorf("adminkey: admin name must have 1 to %d characters", maxName)
	}
	for _, c := range name {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.ContainsRune("._-@", c)
		if !ok {
			return fmt.Errorf("adminkey: admin name %q: only letters, digits and . _ - @ are allowed", name)
		}
	}
	return nil
}

// Generate makes a new admin key named name and returns it as a key file
// encrypted under passphrase with the Argon2id parameters p, with its
// public key.
func Generate(name string, passphrase []byte, p keyfile.Params) (file []byte, pub *identity.PublicKey, err error) {
	if err := ValidName(name); err != nil {
		return nil, nil, err
	}
	k, err := identity.GenerateKey()
	if err != nil {
		return nil, nil, err
	}
	defer k.Zero()
	plain := marshal(name, k)
	defer clear(plain)
	file, err = keyfile.Encrypt(PEMType, plain, passphrase, p)
	if err != nil {
		return nil, nil, err
	}
	return file, k.Public(), nil
}

func marshal(name string, k *identity.PrivateKey) []byte {
	seeds := k.MarshalSeeds()
	defer clear(seeds)
	var b bytes.Buffer
	b.Grow(256)
	b.WriteString(header + "\nname " + name + "\ned25519 ")
	writeB64(&b, seeds[:identity.SeedSize])
	b.WriteString("\nmldsa65 ")
	writeB64(&b, seeds[identity.SeedSize:])
	b.WriteString("\n")
	return b.Bytes()
}

// writeB64 encodes straight into b, so that no intermediate string (which
// could not be cleared) holds a seed.
func writeB64(b *bytes.Buffer, v []byte) {
	enc := base64.NewEncoder(base64.StdEncoding, b)
	_, _ = enc.Write(v) // bytes.Buffer does not fail
	_ = enc.Close()
}

// ParseFile opens an admin key file under passphrase and returns the
// admin's name and key. The caller zeroizes the key.
func ParseFile(file, passphrase []byte) (name string, key *identity.PrivateKey, err error) {
	plain, err := keyfile.Decrypt(PEMType, file, passphrase)
	if err != nil {
		return "", nil, err
	}
	defer clear(plain)
	return parse(plain)
}

func parse(plain []byte) (string, *identity.PrivateKey, error) {
	bad := func(what string) (string, *identity.PrivateKey, error) {
		return "", nil, fmt.Errorf("%w: %s", ErrBadKeyFile, what)
	}
	if !bytes.HasSuffix(plain, []byte("\n")) {
		return bad("no final newline")
	}
	lines := bytes.Split(plain[:len(plain)-1], []byte("\n"))
	if len(lines) != 4 || string(lines[0]) != header {
		return bad("not a " + header + " key")
	}
	name, ok := bytes.CutPrefix(lines[1], []byte("name "))
	if !ok {
		return bad(`missing "name" line`)
	}
	if err := ValidName(string(name)); err != nil {
		return bad(err.Error())
	}
	var seeds [identity.PrivateKeySize]byte
	defer clear(seeds[:])
	for i, field := range []string{"ed25519 ", "mldsa65 "} {
		v, ok := bytes.CutPrefix(lines[2+i], []byte(field))
		if !ok {
			return bad(fmt.Sprintf("missing %q line", strings.TrimSpace(field)))
		}
		if base64.StdEncoding.EncodedLen(identity.SeedSize) != len(v) {
			return bad("bad " + strings.TrimSpace(field) + " seed")
		}
		// Decode needs room for DecodedLen bytes (33 for 44 characters
		// without padding) whatever the input turns out to hold.
		var buf [(identity.SeedSize + 2) / 3 * 3]byte
		n, err := base64.StdEncoding.Strict().Decode(buf[:], v)
		copy(seeds[i*identity.SeedSize:(i+1)*identity.SeedSize], buf[:])
		clear(buf[:])
		if err != nil || n != identity.SeedSize {
			return bad("bad " + strings.TrimSpace(field) + " seed")
		}
	}
	k, err := identity.ParsePrivateKey(seeds[:])
	if err != nil {
		return bad(err.Error())
	}
	return string(name), k, nil
}

// IsTokenRef reports whether ref names a key on a token (a pkcs11: URI)
// rather than a file.
func IsTokenRef(ref string) bool {
	return len(ref) >= len("pkcs11:") && strings.EqualFold(ref[:len("pkcs11:")], "pkcs11:")
}

// GenerateToken creates an admin key on the token named by uri (see
// pkcs11.GenerateAdminKey) and returns its public key. The key's name is
// the URI's object.
func GenerateToken(ctx context.Context, uri string) (*identity.PublicKey, error) {
	k, err := pkcs11.GenerateAdminKey(ctx, pkcs11.Config{URI: uri})
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return identity.NewPublicKey(k.Public())
}

// Load opens the admin key ref names: a pkcs11: URI, or else the path of a
// key file, whose passphrase is asked for only then. close releases the
// token or zeroizes the key; call it when done.
func Load(ctx context.Context, ref string, passphrase func() ([]byte, error)) (identity.Signer, func() error, error) {
	if IsTokenRef(ref) {
		k, err := pkcs11.OpenAdminKey(ctx, pkcs11.Config{URI: ref})
		if err != nil {
			return nil, nil, err
		}
		pub, err := identity.NewPublicKey(k.Public())
		if err != nil {
			_ = k.Close() // already failing
			return nil, nil, err
		}
		return &tokenSigner{k: k, pub: pub}, k.Close, nil
	}
	file, err := readFile(ref)
	if err != nil {
		return nil, nil, err
	}
	pass, err := passphrase()
	if err != nil {
		return nil, nil, err
	}
	defer clear(pass)
	_, k, err := ParseFile(file, pass)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", ref, err)
	}
	return k, func() error { k.Zero(); return nil }, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path) // #nosec G304 -- the operator names the key file
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFile {
		return nil, fmt.Errorf("%s is too large for an admin key file", path)
	}
	return b, nil
}

// tokenSigner makes an hsm/pkcs11 AdminKey an identity.Signer, checking
// each signature before it leaves: an approval that does not verify would
// only fail later, at the quorum, far from its cause.
type tokenSigner struct {
	k   *pkcs11.AdminKey
	pub *identity.PublicKey
}

func (s *tokenSigner) Public() *identity.PublicKey { return s.pub }

func (s *tokenSigner) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	sig, err := s.k.Sign(ctx, msg)
	if err != nil {
		return nil, err
	}
	if err := s.pub.Verify(msg, sig); err != nil {
		return nil, fmt.Errorf("adminkey: the token's signature does not verify: %w", err)
	}
	return sig, nil
}

// Describe opens the admin key ref names, as [Load] does, and returns its
// name (from the file, or the URI's object for a token) and public key.
func Describe(ctx context.Context, ref string, passphrase func() ([]byte, error)) (name string, pub *identity.PublicKey, err error) {
	if IsTokenRef(ref) {
		u, err := hsm.ParseURI(ref)
		if err != nil {
			return "", nil, err
		}
		s, closeKey, err := Load(ctx, ref, passphrase)
		if err != nil {
			return "", nil, err
		}
		pub := s.Public()
		return u.Object, pub, closeKey()
	}
	file, err := readFile(ref)
	if err != nil {
		return "", nil, err
	}
	pass, err := passphrase()
	if err != nil {
		return "", nil, err
	}
	defer clear(pass)
	name, k, err := ParseFile(file, pass)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", ref, err)
	}
	k.Zero()
	return name, k.Public(), nil
}
