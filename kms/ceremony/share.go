package ceremony

import (
	"bytes"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/seal"
)

// SharePEMType is the PEM type of a custodian share file.
const SharePEMType = "COFFRE CUSTODIAN SHARE"

const (
	shareVersion = 1
	// ceremonyIDSize is the size of a ceremony id (hex in files).
	ceremonyIDSize = 16
	// commitmentSize is the size of the root commitment (HMAC-SHA256).
	commitmentSize = 32
	// scalarSize is the size of a Ristretto255 scalar: a share's value and
	// the shared secret.
	scalarSize = 32
	// xwingCiphertextSize is X-Wing's encapsulation size; a sealed share
	// is that, the share value and the AES-GCM tag.
	xwingCiphertextSize = 1120
	sealedShareSize     = xwingCiphertextSize + scalarSize + 16
	maxRootIDLen        = 1024
	maxShareFileSize    = 16 << 10
)

// The header lines of a share file, in the order of its canonical form
// (alphabetical, as encoding/pem writes them).
const (
	hCeremony   = "Ceremony"
	hCommitment = "Commitment"
	hCreated    = "Created"
	hCustodian  = "Custodian"
	hIndex      = "Index"
	hRoot       = "Root"
	hThreshold  = "Threshold"
	hTotal      = "Total"
	hVersion    = "Version"
)

var headerOrder = []string{hCeremony, hCommitment, hCreated, hCustodian, hIndex, hRoot, hThreshold, hTotal, hVersion}

// Share is one custodian's share of a root key as carried in a file: who
// it is sealed to, which ceremony and root it belongs to, and the share
// value sealed (HPKE X-Wing, see package seal) to the custodian's key with
// the file's headers as associated data. A Share holds no secret: opening
// it needs the custodian's private key ([Share.Open]).
type Share struct {
	// Ceremony identifies the split: shares of different splits never
	// combine, even of the same root.
	Ceremony string
	// Root is the root key's id: its URI without the query (see
	// hsm.URI.KeyID).
	Root string
	// Threshold is how many shares rebuild the root (M); Total how many
	// were made (N); Index this share's number, 1..Total.
	Threshold, Total, Index int
	// Custodian is the public key the share is sealed to.
	Custodian *seal.PublicKey
	// Created is when the ceremony ran (UTC, whole seconds).
	Created time.Time
	// Commitment is HMAC-SHA256 under the root key of a fixed label and
	// the ceremony id: it lets a restore check what it rebuilt, and
	// reveals nothing about the key.
	Commitment []byte
	// Sealed is the sealed share value.
	Sealed []byte
}

// Summary describes the share in one line, for progress and errors.
func (s *Share) Summary() string {
	return fmt.Sprintf("share %d of %d (threshold %d) of root %s, ceremony %s", s.Index, s.Total, s.Threshold, s.Root, s.Ceremony)
}

func (s *Share) headers() map[string]string {
	return map[string]string{
		hCeremony:   s.Ceremony,
		hCommitment: hex.EncodeToString(s.Commitment),
		hCreated:    s.Created.UTC().Format(time.RFC3339),
		hCustodian:  s.Custodian.String(),
		hIndex:      strconv.Itoa(s.Index),
		hRoot:       s.Root,
		hThreshold:  strconv.Itoa(s.Threshold),
		hTotal:      strconv.Itoa(s.Total),
		hVersion:    strconv.Itoa(shareVersion),
	}
}

// AAD returns the share's canonical header bytes: what the sealed value is
// bound to, so that no header can be changed (index, threshold, root,
// ceremony, commitment) without the share failing to open.
func (s *Share) AAD() []byte {
	h := s.headers()
	var b bytes.Buffer
	b.WriteString("coffre custodian share v1\n")
	for _, k := range headerOrder {
		b.WriteString(k)
		b.WriteString(": ")
		b.WriteString(h[k])
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Marshal returns the share file: one PEM block of type
// "COFFRE CUSTODIAN SHARE" whose headers say what the share is and whose
// body is the sealed value.
func (s *Share) Marshal() ([]byte, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: SharePEMType, Headers: s.headers(), Bytes: s.Sealed}), nil
}

// validate checks the fields' ranges, for Marshal and ParseShare alike.
func (s *Share) validate() error {
	switch {
	case len(s.Ceremony) != 2*ceremonyIDSize || !isLowerHex(s.Ceremony):
		return shareErr(hCeremony, "want %d lowercase hex digits", 2*ceremonyIDSize)
	case len(s.Commitment) != commitmentSize:
		return shareErr(hCommitment, "want %d bytes", commitmentSize)
	case s.Custodian == nil:
		return shareErr(hCustodian, "missing")
	case s.Created.IsZero() || s.Created.Nanosecond() != 0:
		return shareErr(hCreated, "want a time in whole seconds")
	case s.Root == "" || len(s.Root) > maxRootIDLen || strings.IndexFunc(s.Root, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0:
		return shareErr(hRoot, "want a key id (a pkcs11: URI without query) of printable ASCII, at most %d bytes", maxRootIDLen)
	case s.Threshold < MinThreshold || s.Threshold > s.Total || s.Total > MaxShares:
		return shareErr(hThreshold, "threshold %d of %d shares: want %d ≤ threshold ≤ total ≤ %d", s.Threshold, s.Total, MinThreshold, MaxShares)
	case s.Index < 1 || s.Index > s.Total:
		return shareErr(hIndex, "%d: want 1..%d", s.Index, s.Total)
	case len(s.Sealed) != sealedShareSize:
		return shareErr("body", "%d bytes of sealed share, want %d", len(s.Sealed), sealedShareSize)
	}
	return nil
}

func shareErr(field, format string, a ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrShareFormat, field, fmt.Sprintf(format, a...))
}

// ParseShare reads a share file written by [Share.Marshal]. It is strict:
// the file must be exactly the one PEM block, with exactly the expected
// headers, in canonical form (so that two files for one share are
// byte-identical and a changed file is seen as changed). Every error wraps
// [ErrShareFormat].
func ParseShare(b []byte) (*Share, error) {
	if len(b) > maxShareFileSize {
		return nil, shareErr("file", "%d bytes, more than a share file can be", len(b))
	}
	if !bytes.HasPrefix(b, []byte("-----BEGIN "+SharePEMType+"-----\n")) {
		return nil, shareErr("file", "does not start with the line -----BEGIN %s-----", SharePEMType)
	}
	block, rest := pem.Decode(b)
	if block == nil || block.Type != SharePEMType {
		return nil, shareErr("file", "not a PEM block of type %q", SharePEMType)
	}
	if len(rest) != 0 {
		return nil, shareErr("file", "data after the END line")
	}
	h := block.Headers
	if len(h) != len(headerOrder) {
		return nil, shareErr("headers", "%d header lines, want %d (%s)", len(h), len(headerOrder), strings.Join(headerOrder, ", "))
	}
	for _, k := range headerOrder {
		if _, ok := h[k]; !ok {
			return nil, shareErr(k, "missing")
		}
	}
	if h[hVersion] != strconv.Itoa(shareVersion) {
		return nil, shareErr(hVersion, "%q, want %d", h[hVersion], shareVersion)
	}
	s := &Share{Ceremony: h[hCeremony], Root: h[hRoot], Sealed: block.Bytes}
	var err error
	if s.Commitment, err = hex.DecodeString(h[hCommitment]); err != nil {
		return nil, shareErr(hCommitment, "not hex")
	}
	if s.Created, err = time.Parse(time.RFC3339, h[hCreated]); err != nil {
		return nil, shareErr(hCreated, "not an RFC 3339 time")
	}
	if s.Custodian, err = seal.ParsePublicKey(h[hCustodian]); err != nil {
		return nil, shareErr(hCustodian, "%v", err)
	}
	for _, f := range []struct {
		name string
		dst  *int
	}{{hIndex, &s.Index}, {hThreshold, &s.Threshold}, {hTotal, &s.Total}} {
		if *f.dst, err = parseCount(h[f.name]); err != nil {
			return nil, shareErr(f.name, "%v", err)
		}
	}
	if err := s.validate(); err != nil {
		return nil, err
	}
	// Canonical form: what we would write is what was read.
	again, err := s.Marshal()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(again, b) {
		return nil, shareErr("file", "not in canonical form (re-encoded, reformatted or with extra white space)")
	}
	return s, nil
}

// parseCount parses a small decimal number written by strconv.Itoa.
func parseCount(v string) (int, error) {
	if v == "" || len(v) > 3 || (len(v) > 1 && v[0] == '0') {
		return 0, fmt.Errorf("%q: want a number from 1 to %d", v, MaxShares)
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > MaxShares {
		return 0, fmt.Errorf("%q: want a number from 1 to %d", v, MaxShares)
	}
	return n, nil
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
