package audit

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// Signature types used in key IDs (C2SP signed-note: the key ID is the
// first 4 bytes of SHA-256(name ‖ 0x0A ‖ type ‖ public key)).
//
// SigTypeEd25519 is the standard signed-note Ed25519 type. SigTypeMLDSA65 is
// Coffre-specific: signed-note allocates no identifier for ML-DSA-65, so
// Coffre uses 0x06 for an ML-DSA-65 signature (FIPS 204, empty context) over
// the note text. Only Coffre verifiers understand it; generic note tools
// see the Ed25519 line and ignore the other as an unknown key.
const (
	SigTypeEd25519 byte = 0x01
	SigTypeMLDSA65 byte = 0x06
)

// ErrCheckpoint marks a checkpoint (signed note) that does not parse or
// whose signatures do not verify.
var ErrCheckpoint = errors.New("audit: bad checkpoint")

const sigPrefix = "— " // U+2014 EM DASH, then a space

// ReadSignerFile reads a signer key file written by [WriteSignerFile]. It
// refuses a file that group or others can read or write.
func ReadSignerFile(path string) (*Signer, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("audit: signer key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("audit: signer key %s: mode %v, want 0600", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path) // #nosec G304 -- operator-supplied key path
	if err != nil {
		return nil, fmt.Errorf("audit: signer key: %w", err)
	}
	defer clear(b)
	return ParseSigner(b)
}

// WriteSignerFile writes s's private keys to a new file with mode 0600. It
// does not overwrite an existing file.
func WriteSignerFile(path string, s *Signer) (err error) {
	b, err := s.MarshalPrivate()
	if err != nil {
		return err
	}
	defer clear(b)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600) // #nosec G304 -- operator-supplied key path
	if err != nil {
		return fmt.Errorf("audit: signer key: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	if _, err := f.Write(b); err != nil {
		return fmt.Errorf("audit: signer key: %w", err)
	}
	return f.Sync()
}

// Signer signs checkpoints with an Ed25519 and an ML-DSA-65 key under one
// note name. A checkpoint verifies only if both signatures verify. It holds
// private keys: it never prints them.
type Signer struct {
	name   string
	edPriv ed25519.PrivateKey
	mlSeed [mldsa65.SeedSize]byte
	mlPriv *mldsa65.PrivateKey
	v      *Verifier
}

// Verifier checks checkpoint signatures made by one Signer.
type Verifier struct {
	name   string
	edPub  ed25519.PublicKey
	mlPub  *mldsa65.PublicKey
	edID   uint32
	mlID   uint32
	mlPubB []byte
}

// GenerateSigner creates a new signer with fresh keys. The name is the note
// key name: non-empty, no white space and no '+'.
func GenerateSigner(name string) (*Signer, error) {
	var edSeed, mlSeed [32]byte
	if _, err := rand.Read(edSeed[:]); err != nil {
		return nil, err
	}
	if _, err := rand.Read(mlSeed[:]); err != nil {
		return nil, err
	}
	return newSigner(name, edSeed[:], mlSeed)
}

func validKeyName(name string) bool {
	return name != "" && utf8.ValidString(name) && !strings.ContainsAny(name, "+ \t\n\r") &&
		!strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

func newSigner(name string, edSeed []byte, mlSeed [32]byte) (*Signer, error) {
	if !validKeyName(name) {
		return nil, fmt.Errorf("audit: invalid signer name %q", name)
	}
	s := &Signer{name: name, edPriv: ed25519.NewKeyFromSeed(edSeed), mlSeed: mlSeed}
	mlPub, mlPriv := mldsa65.NewKeyFromSeed(&s.mlSeed)
	s.mlPriv = mlPriv
	pubB, err := mlPub.MarshalBinary()
	if err != nil {
		return nil, err
	}
	edPub, _ := s.edPriv.Public().(ed25519.PublicKey)
	s.v = &Verifier{name: name, edPub: edPub, mlPub: mlPub, mlPubB: pubB,
		edID: keyID(name, SigTypeEd25519, edPub), mlID: keyID(name, SigTypeMLDSA65, pubB)}
	return s, nil
}

func keyID(name string, typ byte, pub []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name))
	h.Write([]byte{'\n', typ})
	h.Write(pub)
	return binary.BigEndian.Uint32(h.Sum(nil))
}

// Name returns the signer's note key name.
func (s *Signer) Name() string { return s.name }

// String redacts the keys.
func (s *Signer) String() string { return "audit.Signer(" + s.name + ", keys redacted)" }

// GoString redacts the keys.
func (s *Signer) GoString() string { return s.String() }

// Verifier returns the public half of s.
func (s *Signer) Verifier() *Verifier { return s.v }

const signerHeader = "coffre-audit-signer v1"

// MarshalPrivate encodes the signer's private keys. The format is text:
//
//	coffre-audit-signer v1
//	name <note key name>
//	ed25519 <base64 of the 32-byte Ed25519 seed>
//	mldsa65 <base64 of the 32-byte ML-DSA-65 seed (FIPS 204 ξ)>
//
// Store it in a file with mode 0600; it is the log's signing authority.
func (s *Signer) MarshalPrivate() ([]byte, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\nname %s\ned25519 %s\nmldsa65 %s\n", signerHeader, s.name,
		base64.StdEncoding.EncodeToString(s.edPriv.Seed()),
		base64.StdEncoding.EncodeToString(s.mlSeed[:]))
	return b.Bytes(), nil
}

// ParseSigner decodes the output of [Signer.MarshalPrivate].
func ParseSigner(b []byte) (*Signer, error) {
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 4 || lines[0] != signerHeader {
		return nil, errors.New("audit: signer key: not a coffre-audit-signer v1 file")
	}
	field := func(line, key string) (string, error) {
		v, ok := strings.CutPrefix(line, key+" ")
		if !ok {
			return "", fmt.Errorf("audit: signer key: missing %q line", key)
		}
		return v, nil
	}
	name, err := field(lines[1], "name")
	if err != nil {
		return nil, err
	}
	seeds := make([][]byte, 2)
	for i, k := range []string{"ed25519", "mldsa65"} {
		v, err := field(lines[2+i], k)
		if err != nil {
			return nil, err
		}
		seeds[i], err = base64.StdEncoding.DecodeString(v)
		if err != nil || len(seeds[i]) != 32 {
			return nil, fmt.Errorf("audit: signer key: bad %s seed", k)
		}
	}
	var ml [32]byte
	copy(ml[:], seeds[1])
	clear(seeds[1])
	s, err := newSigner(name, seeds[0], ml)
	clear(seeds[0])
	clear(ml[:])
	return s, err
}

// sign returns the two signature lines over the note text msg.
func (s *Signer) sign(msg []byte) ([]byte, error) {
	edSig := ed25519.Sign(s.edPriv, msg)
	mlSig := make([]byte, mldsa65.SignatureSize)
	if err := mldsa65.SignTo(s.mlPriv, msg, nil, true, mlSig); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	for _, x := range []struct {
		id  uint32
		sig []byte
	}{{s.v.edID, edSig}, {s.v.mlID, mlSig}} {
		raw := binary.BigEndian.AppendUint32(nil, x.id)
		raw = append(raw, x.sig...)
		fmt.Fprintf(&b, "%s%s %s\n", sigPrefix, s.name, base64.StdEncoding.EncodeToString(raw))
	}
	return b.Bytes(), nil
}

// Name returns the verifier's note key name.
func (v *Verifier) Name() string { return v.name }

// Marshal encodes the verifier as two note verifier keys, one a line, in
// the golang.org/x/mod/sumdb/note vkey shape "name+hexkeyid+base64(type ‖
// public key)": the Ed25519 key (type 0x01, readable by standard tools)
// and the ML-DSA-65 key (Coffre-specific type 0x06).
func (v *Verifier) Marshal() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s+%08x+%s\n", v.name, v.edID, base64.StdEncoding.EncodeToString(append([]byte{SigTypeEd25519}, v.edPub...)))
	fmt.Fprintf(&b, "%s+%08x+%s\n", v.name, v.mlID, base64.StdEncoding.EncodeToString(append([]byte{SigTypeMLDSA65}, v.mlPubB...)))
	return b.Bytes()
}

// ParseVerifier decodes the output of [Verifier.Marshal].
func ParseVerifier(b []byte) (*Verifier, error) {
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 2 {
		return nil, errors.New("audit: verifier key: want two lines (Ed25519 and ML-DSA-65)")
	}
	v := &Verifier{}
	for i, line := range lines {
		parts := strings.SplitN(line, "+", 3)
		if len(parts) != 3 || !validKeyName(parts[0]) {
			return nil, fmt.Errorf("audit: verifier key line %d: malformed", i+1)
		}
		if i == 1 && parts[0] != v.name {
			return nil, errors.New("audit: verifier key: the two keys have different names")
		}
		v.name = parts[0]
		id, err := strconv.ParseUint(parts[1], 16, 32)
		if err != nil || len(parts[1]) != 8 {
			return nil, fmt.Errorf("audit: verifier key line %d: bad key id", i+1)
		}
		raw, err := base64.StdEncoding.DecodeString(parts[2])
		if err != nil || len(raw) < 2 {
			return nil, fmt.Errorf("audit: verifier key line %d: bad key", i+1)
		}
		want := []byte{SigTypeEd25519, SigTypeMLDSA65}[i]
		if raw[0] != want {
			return nil, fmt.Errorf("audit: verifier key line %d: type %#x, want %#x", i+1, raw[0], want)
		}
		pub := raw[1:]
		if uint32(id) != keyID(v.name, want, pub) {
			return nil, fmt.Errorf("audit: verifier key line %d: key id does not match key", i+1)
		}
		if i == 0 {
			if len(pub) != ed25519.PublicKeySize {
				return nil, errors.New("audit: verifier key: bad Ed25519 key size")
			}
			v.edPub, v.edID = ed25519.PublicKey(pub), uint32(id)
		} else {
			var pk mldsa65.PublicKey
			if err := pk.UnmarshalBinary(pub); err != nil {
				return nil, fmt.Errorf("audit: verifier key: bad ML-DSA-65 key: %v", err)
			}
			v.mlPub, v.mlPubB, v.mlID = &pk, pub, uint32(id)
		}
	}
	return v, nil
}

// verifyNote checks that note (text, blank line, signature lines) carries
// valid Ed25519 and ML-DSA-65 signatures from v over its text, and returns
// the text. Unknown signature lines (cosignatures) are ignored.
func (v *Verifier) verifyNote(note []byte) (text []byte, err error) {
	text, sigs, err := splitNote(note)
	if err != nil {
		return nil, err
	}
	var edOK, mlOK bool
	for _, s := range sigs {
		if s.name != v.name {
			continue
		}
		switch s.id {
		case v.edID:
			if !ed25519.Verify(v.edPub, text, s.sig) {
				return nil, fmt.Errorf("%w: Ed25519 signature by %s does not verify", ErrCheckpoint, v.name)
			}
			edOK = true
		case v.mlID:
			if !mldsa65.Verify(v.mlPub, text, nil, s.sig) {
				return nil, fmt.Errorf("%w: ML-DSA-65 signature by %s does not verify", ErrCheckpoint, v.name)
			}
			mlOK = true
		}
	}
	if !edOK || !mlOK {
		return nil, fmt.Errorf("%w: missing Ed25519 or ML-DSA-65 signature by %s", ErrCheckpoint, v.name)
	}
	return text, nil
}

type noteSig struct {
	name string
	id   uint32
	sig  []byte
	line string // the whole line, with its newline
}

const maxNoteSize = 1 << 20

// splitNote splits a signed note into its text (ending in a newline) and
// its signature lines.
func splitNote(note []byte) ([]byte, []noteSig, error) {
	if len(note) > maxNoteSize || !utf8.Valid(note) {
		return nil, nil, fmt.Errorf("%w: too large or not UTF-8", ErrCheckpoint)
	}
	i := bytes.Index(note, []byte("\n\n"))
	if i < 0 {
		return nil, nil, fmt.Errorf("%w: no signature block", ErrCheckpoint)
	}
	text, rest := note[:i+1], note[i+2:]
	if len(rest) == 0 || rest[len(rest)-1] != '\n' {
		return nil, nil, fmt.Errorf("%w: signature block does not end in a newline", ErrCheckpoint)
	}
	var sigs []noteSig
	sc := bufio.NewScanner(bytes.NewReader(rest))
	sc.Buffer(make([]byte, 0, 8192), maxNoteSize)
	for sc.Scan() {
		line := sc.Text()
		s, err := parseSigLine(line)
		if err != nil {
			return nil, nil, err
		}
		sigs = append(sigs, s)
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrCheckpoint, err)
	}
	return text, sigs, nil
}

func parseSigLine(line string) (noteSig, error) {
	body, ok := strings.CutPrefix(line, sigPrefix)
	if !ok {
		return noteSig{}, fmt.Errorf("%w: malformed signature line", ErrCheckpoint)
	}
	name, b64, ok := strings.Cut(body, " ")
	if !ok || !validKeyName(name) || strings.Contains(b64, " ") {
		return noteSig{}, fmt.Errorf("%w: malformed signature line", ErrCheckpoint)
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) < 5 {
		return noteSig{}, fmt.Errorf("%w: malformed signature", ErrCheckpoint)
	}
	return noteSig{name: name, id: binary.BigEndian.Uint32(raw), sig: raw[4:], line: line + "\n"}, nil
}

// verifyCosignatures checks that every line of sigs is a signature over
// text by one of witnesses, and that each witness signing gave both its
// Ed25519 and its ML-DSA-65 signature.
func verifyCosignatures(text []byte, sigs []noteSig, witnesses []*Verifier) error {
	type halves struct{ ed, ml bool }
	seen := map[*Verifier]*halves{}
	for _, s := range sigs {
		i := slices.IndexFunc(witnesses, func(w *Verifier) bool {
			return w.name == s.name && (s.id == w.edID || s.id == w.mlID)
		})
		if i < 0 {
			return fmt.Errorf("%w: a signature by %q (key id %08x) is not by a configured witness", ErrCheckpoint, s.name, s.id)
		}
		w := witnesses[i]
		h := seen[w]
		if h == nil {
			h = &halves{}
			seen[w] = h
		}
		if s.id == w.edID {
			if !ed25519.Verify(w.edPub, text, s.sig) {
				return fmt.Errorf("%w: witness %s: Ed25519 cosignature does not verify", ErrCheckpoint, w.name)
			}
			h.ed = true
		} else {
			if !mldsa65.Verify(w.mlPub, text, nil, s.sig) {
				return fmt.Errorf("%w: witness %s: ML-DSA-65 cosignature does not verify", ErrCheckpoint, w.name)
			}
			h.ml = true
		}
	}
	for w, h := range seen {
		if !h.ed || !h.ml {
			return fmt.Errorf("%w: witness %s: the Ed25519 and ML-DSA-65 cosignatures go together", ErrCheckpoint, w.name)
		}
	}
	return nil
}
