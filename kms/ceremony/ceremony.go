// Package ceremony owns the cryptography of the recoverable root-key
// ceremony: making a root key outside the HSM only to split it among key
// custodians, and rebuilding it from a quorum of them for a restore into
// a new HSM (a disaster-recovery site, a data embassy). It never talks to
// an HSM; cmd/coffrectl puts the key it returns into one with
// hsm/pkcs11.ImportRoot and zeroizes it.
//
// # Split
//
// [Split] draws a uniformly random scalar s of the Ristretto255 group, so
// that Shamir's scheme (github.com/cloudflare/circl/secretsharing) works
// over its prime field, and derives the AES-256 root key as
// HKDF-SHA256(s, info "coffre root key v1"). It shares s among N
// custodians with threshold M (2 ≤ M ≤ N ≤ 255): any M shares rebuild s,
// fewer reveal nothing about it. Each share value is sealed to its
// custodian's public key (package seal: HPKE with X-Wing, info
// "coffre custodian share v1", the share file's canonical headers as
// associated data) and written as a [Share] file that the custodian
// carries on removable media.
//
// Every share file names the ceremony (a random id), the root key id, M,
// N, its index, its custodian's public key, the time, and a commitment to
// the root: HMAC-SHA256 keyed by the root over "coffre root commitment v1"
// and the ceremony id. [Combine] recomputes it over what it rebuilt, so a
// wrong or forged share (anyone can seal a value to a custodian's public
// key) is caught before the result reaches an HSM.
//
// # Memory
//
// The scalar, the root key and opened share values are kept in [Secret]s:
// memory outside the Go heap, locked against swap where RLIMIT_MEMLOCK
// allows (Secret.Locked says whether it did), overwritten when destroyed.
// The library copies that the group arithmetic and HPKE make on the heap
// (circl's scalars and polynomial, the HPKE plaintext) are cleared where
// this package can reach them and are otherwise beyond its control: run
// ceremonies on an offline machine that is wiped afterwards.
//
// # Errors
//
// Callers match with errors.Is: [ErrShareFormat] (a file that is not a
// share), [ErrWrongCustodian] and [ErrShareOpen] (a share that does not
// open with the key given), [ErrTooFewShares], [ErrMixedShares],
// [ErrDuplicateShare] (a set of shares that cannot rebuild the root), and
// [ErrCommitment] (shares that combine, but not into the committed root).
package ceremony

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/cloudflare/circl/group"
	"github.com/cloudflare/circl/secretsharing"

	"github.com/coffre-kms/coffre/kms/seal"
)

// Limits of a split.
const (
	// MinThreshold is the smallest threshold: a root that one custodian
	// can rebuild alone is a plaintext copy of the root.
	MinThreshold = 2
	// MaxShares bounds the number of shares (and so of custodians).
	MaxShares = 255
)

// RootKeySize is the size of the root key: AES-256.
const RootKeySize = 32

// Labels that separate the uses of the ceremony's keys.
const (
	rootInfo        = "coffre root key v1"
	shareInfo       = "coffre custodian share v1"
	commitmentLabel = "coffre root commitment v1\n"
)

// Sentinel errors; see the package documentation.
var (
	ErrShareFormat    = errors.New("ceremony: not a valid custodian share file")
	ErrWrongCustodian = errors.New("ceremony: the custodian key given is not the one this share is sealed to")
	ErrShareOpen      = errors.New("ceremony: the share does not open: altered file or wrong key")
	ErrTooFewShares   = errors.New("ceremony: fewer shares than the threshold")
	ErrMixedShares    = errors.New("ceremony: the shares are not all of the same ceremony")
	ErrDuplicateShare = errors.New("ceremony: the same share is given twice")
	ErrCommitment     = errors.New("ceremony: the shares do not rebuild the committed root key")
)

var grp = group.Ristretto255

// SplitOptions describe a recoverable root.
type SplitOptions struct {
	// RootID is the root key's id (its URI without query).
	RootID string
	// Threshold is how many shares rebuild the root (M).
	Threshold int
	// Custodians are the public keys the shares are sealed to, one share
	// each, in order (share i goes to Custodians[i-1]); N is their number.
	// They must be distinct.
	Custodians []*seal.PublicKey
	// Now is the ceremony's time; zero means time.Now().
	Now time.Time
	// Progress, if set, is called before each share is sealed.
	Progress func(index, total int, to *seal.PublicKey)
}

// Split makes a new root key and its custodian shares (see the package
// documentation). The caller imports root into the HSM, writes the shares
// out, and destroys root.
func Split(opts SplitOptions) (root *Secret, shares []*Share, err error) {
	n, m := len(opts.Custodians), opts.Threshold
	switch {
	case n < MinThreshold || n > MaxShares:
		return nil, nil, fmt.Errorf("ceremony: %d custodians; want %d to %d", n, MinThreshold, MaxShares)
	case m < MinThreshold || m > n:
		return nil, nil, fmt.Errorf("ceremony: threshold %d with %d custodians; want %d ≤ threshold ≤ %d", m, n, MinThreshold, n)
	}
	for i, c := range opts.Custodians {
		if c == nil {
			return nil, nil, fmt.Errorf("ceremony: custodian %d has no key", i+1)
		}
		for j := range i {
			if c.Equal(opts.Custodians[j]) {
				// One person holding two shares lowers the threshold.
				return nil, nil, fmt.Errorf("ceremony: custodians %d and %d have the same key; each custodian holds one share", j+1, i+1)
			}
		}
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	now = now.UTC().Truncate(time.Second)
	idb := make([]byte, ceremonyIDSize)
	if _, err := rand.Read(idb); err != nil {
		return nil, nil, err
	}
	id := hex.EncodeToString(idb)

	s := grp.RandomScalar(rand.Reader)
	defer s.SetUint64(0)
	sb, err := s.MarshalBinary()
	if err != nil {
		return nil, nil, err
	}
	secret := secretFrom(sb)
	defer secret.Destroy()
	rk, err := deriveRoot(secret)
	if err != nil {
		return nil, nil, err
	}
	ok := false
	defer func() {
		if !ok {
			rk.Destroy()
		}
	}()
	commitment := commit(rk, id)

	dealer := secretsharing.New(rand.Reader, uint(m-1), s) // #nosec G115 -- 2 ≤ m ≤ 255
	raw := dealer.Share(uint(n))                           // #nosec G115 -- n ≤ 255
	defer func() {
		for _, r := range raw {
			r.Value.SetUint64(0)
		}
	}()
	// Self-check before anything is written: the last M shares rebuild s.
	back, err := secretsharing.Recover(uint(m-1), raw[n-m:]) // #nosec G115 -- as above
	if err != nil || !back.IsEqual(s) {
		return nil, nil, errors.New("ceremony: internal error: the shares do not rebuild the secret")
	}
	back.SetUint64(0)

	shares = make([]*Share, n)
	for i, to := range opts.Custodians {
		if opts.Progress != nil {
			opts.Progress(i+1, n, to)
		}
		sh := &Share{
			Ceremony: id, Root: opts.RootID, Threshold: m, Total: n, Index: i + 1,
			Custodian: to, Created: now, Commitment: commitment,
			Sealed: make([]byte, sealedShareSize), // placeholder for validate
		}
		if err := sh.validate(); err != nil {
			return nil, nil, err
		}
		v, err := raw[i].Value.MarshalBinary()
		if err != nil {
			return nil, nil, err
		}
		sealed, err := seal.Seal(to, []byte(shareInfo), sh.AAD(), v)
		clear(v)
		if err != nil {
			return nil, nil, fmt.Errorf("ceremony: sealing share %d: %w", i+1, err)
		}
		if len(sealed) != sealedShareSize {
			return nil, nil, fmt.Errorf("ceremony: sealed share of %d bytes, want %d", len(sealed), sealedShareSize)
		}
		sh.Sealed = sealed
		shares[i] = sh
	}
	ok = true
	return rk, shares, nil
}

// deriveRoot derives the root key from the shared scalar's bytes.
func deriveRoot(secret *Secret) (*Secret, error) {
	k, err := hkdf.Key(sha256.New, secret.Bytes(), nil, rootInfo, RootKeySize)
	if err != nil {
		return nil, err
	}
	return secretFrom(k), nil
}

// commit returns the commitment to root for ceremony id.
func commit(root *Secret, id string) []byte {
	mac := hmac.New(sha256.New, root.Bytes())
	mac.Write([]byte(commitmentLabel))
	mac.Write([]byte(id))
	return mac.Sum(nil)
}

// OpenedShare is a share opened with its custodian's key: the file's
// description and the share value, held in a [Secret]. Destroy it once
// combined.
type OpenedShare struct {
	*Share
	value *Secret
}

// Destroy overwrites the share value.
func (o *OpenedShare) Destroy() { o.value.Destroy() }

// Open opens the share with its custodian's private key. A key that is not
// the share's custodian yields [ErrWrongCustodian]; a share that does not
// open (an altered file, or a custodian key whose public half was written
// into a forged header) yields [ErrShareOpen].
func (s *Share) Open(k *seal.PrivateKey) (*OpenedShare, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if !k.Public().Equal(s.Custodian) {
		return nil, fmt.Errorf("%w (%s)", ErrWrongCustodian, s.Summary())
	}
	pt, err := seal.Open(k, []byte(shareInfo), s.AAD(), s.Sealed)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", ErrShareOpen, s.Summary())
	}
	v := secretFrom(pt)
	if _, err := toScalar(v); err != nil {
		v.Destroy()
		return nil, fmt.Errorf("%w (%s): the value is not a share", ErrShareOpen, s.Summary())
	}
	return &OpenedShare{Share: s, value: v}, nil
}

func toScalar(v *Secret) (group.Scalar, error) {
	sc := grp.NewScalar()
	if v.Len() != scalarSize {
		return nil, errors.New("bad share value")
	}
	if err := sc.UnmarshalBinary(v.Bytes()); err != nil {
		return nil, err
	}
	return sc, nil
}

// CheckSet checks, before any share is opened, that shares can rebuild a
// root: all of one ceremony (same id, root, threshold, total, time and
// commitment), no index twice, and at least the threshold of them. A
// restore calls it before asking custodians for their passphrases and
// before touching an HSM.
func CheckSet(shares []*Share) error {
	if len(shares) == 0 {
		return fmt.Errorf("%w: no share given", ErrTooFewShares)
	}
	first := shares[0]
	seen := make(map[int]bool, len(shares))
	for _, s := range shares {
		if err := s.validate(); err != nil {
			return err
		}
		if s.Ceremony != first.Ceremony || s.Root != first.Root || s.Threshold != first.Threshold ||
			s.Total != first.Total || !s.Created.Equal(first.Created) || !hmac.Equal(s.Commitment, first.Commitment) {
			return fmt.Errorf("%w: %s and %s", ErrMixedShares, first.Summary(), s.Summary())
		}
		if seen[s.Index] {
			return fmt.Errorf("%w: share %d of ceremony %s", ErrDuplicateShare, s.Index, s.Ceremony)
		}
		seen[s.Index] = true
	}
	if len(shares) < first.Threshold {
		return fmt.Errorf("%w: %d share(s) given, root %s needs %d of %d; fewer reveal nothing about it",
			ErrTooFewShares, len(shares), first.Root, first.Threshold, first.Total)
	}
	return nil
}

// Combine rebuilds the root key from opened shares: it checks the set
// (see [CheckSet]), recombines the first Threshold shares, derives the
// root and checks it against the commitment; any share beyond the
// threshold must agree with the others. The caller destroys the result.
func Combine(opened []*OpenedShare) (*Secret, error) {
	hdr := make([]*Share, len(opened))
	for i, o := range opened {
		if o == nil || o.Share == nil || o.value == nil || o.value.Len() == 0 {
			return nil, fmt.Errorf("%w: share %d is not opened", ErrShareOpen, i+1)
		}
		hdr[i] = o.Share
	}
	if err := CheckSet(hdr); err != nil {
		return nil, err
	}
	m := opened[0].Threshold
	ss := make([]secretsharing.Share, len(opened))
	defer func() {
		for _, s := range ss {
			if s.Value != nil {
				s.Value.SetUint64(0)
			}
		}
	}()
	for i, o := range opened {
		v, err := toScalar(o.value)
		if err != nil {
			return nil, fmt.Errorf("%w (%s)", ErrShareOpen, o.Summary())
		}
		ss[i] = secretsharing.Share{ID: grp.NewScalar().SetUint64(uint64(o.Index)), Value: v} // #nosec G115 -- 1..255
	}
	s, err := secretsharing.Recover(uint(m-1), ss[:m]) // #nosec G115 -- 2..255
	if err != nil {
		return nil, fmt.Errorf("ceremony: recombining: %w", err)
	}
	defer s.SetUint64(0)
	// Extra shares: each, in place of the last of the first M, must give
	// the same secret, or it was altered (or forged to its custodian).
	for j := m; j < len(ss); j++ {
		alt := append(append([]secretsharing.Share(nil), ss[:m-1]...), ss[j])
		t, err := secretsharing.Recover(uint(m-1), alt) // #nosec G115 -- as above
		if err != nil {
			return nil, fmt.Errorf("ceremony: recombining: %w", err)
		}
		same := t.IsEqual(s)
		t.SetUint64(0)
		if !same {
			return nil, fmt.Errorf("%w: share %d disagrees with shares %s", ErrCommitment, opened[j].Index, indices(opened[:m]))
		}
	}
	sb, err := s.MarshalBinary()
	if err != nil {
		return nil, err
	}
	secret := secretFrom(sb)
	defer secret.Destroy()
	root, err := deriveRoot(secret)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal(commit(root, opened[0].Ceremony), opened[0].Commitment) {
		root.Destroy()
		return nil, fmt.Errorf("%w: shares %s combine into another key: one of them is altered or forged", ErrCommitment, indices(opened[:m]))
	}
	return root, nil
}

func indices(os []*OpenedShare) string {
	s := ""
	for i, o := range os {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(o.Index)
	}
	return s
}
