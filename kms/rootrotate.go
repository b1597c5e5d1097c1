package kms

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms/store"
)

// Root rotation
//
// A KEK version records the ID of the root that wrapped it. A Service holds
// one current root, which wraps every new version, and any number of
// previous roots, which only unwrap. RotateRoot moves every stored KEK
// version from a previous root to the current one; when RootUsage shows no
// version left under an old root, that root can be removed from the
// configuration and its key destroyed in the HSM (pkcs11.DestroyRoot).

// previousRoots checks Config.PreviousRoots and indexes them by ID.
func previousRoots(cur hsm.Root, prev []hsm.Root) (map[string]hsm.Root, error) {
	m := make(map[string]hsm.Root, len(prev))
	for i, r := range prev {
		if r == nil {
			return nil, fmt.Errorf("kms: Config.PreviousRoots[%d] is nil", i)
		}
		id := r.ID()
		if id == cur.ID() {
			// One ID for two roots would make a version's RootID say
			// nothing about which key wrapped it.
			return nil, fmt.Errorf("kms: Config.PreviousRoots[%d] has the ID of the current root, %s", i, id)
		}
		if _, dup := m[id]; dup {
			return nil, fmt.Errorf("kms: Config.PreviousRoots lists root %s twice", id)
		}
		m[id] = r
	}
	return m, nil
}

// rootFor returns the root whose ID is id, or nil if the service holds none.
func (s *Service) rootFor(id string) hsm.Root {
	if id == s.root.ID() || s.aliases[id] {
		return s.root
	}
	return s.previous[id]
}

// rootAliases checks Config.RootAliases against the roots' own IDs.
func rootAliases(cur hsm.Root, prev map[string]hsm.Root, aliases []string) (map[string]bool, error) {
	m := make(map[string]bool, len(aliases))
	for i, a := range aliases {
		switch {
		case a == "" || a == cur.ID():
			return nil, fmt.Errorf("kms: Config.RootAliases[%d] %q is empty or the root's own ID", i, a)
		case prev[a] != nil:
			return nil, fmt.Errorf("kms: Config.RootAliases[%d] %q is the ID of a previous root", i, a)
		case m[a]:
			return nil, fmt.Errorf("kms: Config.RootAliases lists %q twice", a)
		}
		m[a] = true
	}
	return m, nil
}

// rootNames lists the IDs of the roots the service holds, for messages.
func (s *Service) rootNames() string {
	if len(s.previous) == 0 {
		return s.root.ID()
	}
	ids := make([]string, 0, len(s.previous))
	for id := range s.previous {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return s.root.ID() + " (previous: " + strings.Join(ids, ", ") + ")"
}

// RootRotation counts what [Service.RotateRoot] did and found.
type RootRotation struct {
	// Root is the ID of the current root, which now wraps every KEK
	// version counted in Rewrapped and Current.
	Root string
	// Keyrings is the number of keyrings examined; KeyringsUpdated how many
	// of their records this run rewrote.
	Keyrings        int
	KeyringsUpdated int
	// Rewrapped counts the KEK versions this run moved to Root; Current the
	// ones found under Root already; Destroyed the destroyed versions
	// skipped, which hold no key material.
	Rewrapped int
	Current   int
	Destroyed int
}

// RotateRoot rewraps every stored KEK version that a previous root wraps
// under the current root: each KEK is unwrapped in the old HSM root,
// wrapped in the new one, checked to unwrap there to the same key, and
// zeroized; the associated data (keyring incarnation and version) is
// unchanged. Each keyring is one compare-and-swap of its record, retried on
// a concurrent write, so envelopes keep opening throughout and no KEK is
// ever written in the clear.
//
// It is idempotent and resumable: a run that stops half-way (a cancelled
// ctx, a crash, an HSM outage) leaves some keyrings under the new root and
// some under the old, all usable while the old root is still configured
// as a previous root, and running it again finishes the job; a run with
// nothing left to do changes nothing and reports Rewrapped == 0.
//
// In a cluster, every node must hold the new root as current (and the old
// one as previous) before the run: a node still wrapping under the old root
// would add versions under it afterwards. [Service.RootUsage] shows any.
//
// progress, if not nil, is called after each keyring with the number
// done and the total. The counts returned are valid with an error too: they
// say what was done before it. A version wrapped by a root the service does
// not hold fails the run with [ErrFailedPrecondition] (configure that root
// in Config.PreviousRoots); one whose wrapped KEK fails authentication in
// its root (a tampered store) fails it too, and is left as it is.
func (s *Service) RotateRoot(ctx context.Context, progress func(done, total int)) (RootRotation, error) {
	res := RootRotation{Root: s.root.ID()}
	kvs, err := s.store.List(ctx, keyringPrefix)
	if err != nil {
		return res, storeErr(err)
	}
	for i, kv := range kvs {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		rec, err := decodeRecord(kv.Key, kv.Value)
		if err != nil {
			return res, err
		}
		if err := s.rotateKeyringRoot(ctx, rec.id(), &res); err != nil {
			return res, err
		}
		res.Keyrings++
		if progress != nil {
			progress(i+1, len(kvs))
		}
	}
	return res, nil
}

// rotateKeyringRoot moves keyring id's KEK versions to the current root in
// one compare-and-swap, adding to res only what was committed.
func (s *Service) rotateKeyringRoot(ctx context.Context, id KeyringID, res *RootRotation) error {
	key := keyringKey(id)
	for range maxCASAttempts {
		cur, rev, err := s.read(ctx, id)
		if errors.Is(err, ErrNotFound) {
			return nil // deleted since the listing: nothing to move
		}
		if err != nil {
			return err
		}
		next := *cur
		next.Versions = append([]versionRecord(nil), cur.Versions...)
		var rewrapped, current, destroyed int
		for i := range next.Versions {
			v := &next.Versions[i]
			switch {
			case len(v.Wrapped) == 0:
				destroyed++
			case v.RootID == s.root.ID():
				current++
			default:
				w, err := s.rewrap(ctx, &next, v)
				if err != nil {
					return err
				}
				v.RootID, v.Wrapped = s.root.ID(), w
				rewrapped++
			}
		}
		if rewrapped > 0 {
			gen := s.cacheGen()
			newRev, err := s.store.CompareAndSwap(ctx, key, rev, next.encode())
			if errors.Is(err, store.ErrConflict) {
				continue
			}
			if err != nil {
				return storeErr(err)
			}
			s.remember(key, &next, newRev, gen)
			res.KeyringsUpdated++
		}
		res.Rewrapped += rewrapped
		res.Current += current
		res.Destroyed += destroyed
		return nil
	}
	return fmt.Errorf("%w: keyring %s changed %d times during root rotation; run it again", ErrUnavailable, id, maxCASAttempts)
}

// rewrap unwraps version v of rec under the root that wrapped it and wraps
// it under the current root, with the same associated data. The new blob is
// unwrapped once more and compared before it is returned: after a root
// rotation the old root may be destroyed, and a blob the new root cannot
// open would then be a KEK lost.
func (s *Service) rewrap(ctx context.Context, rec *keyringRecord, v *versionRecord) ([]byte, error) {
	// A previous root, or the current one under an alias (the version is
	// then rewritten under the root's own ID).
	old := s.rootFor(v.RootID)
	if old == nil {
		return nil, fmt.Errorf("%w: KEK %s v%d is wrapped by root %s; this server holds %s",
			ErrFailedPrecondition, rec.id(), v.Version, v.RootID, s.rootNames())
	}
	aad := kekAAD(rec, v.Version)
	kek, err := old.Unwrap(ctx, v.Wrapped, aad)
	if errors.Is(err, hsm.ErrUnwrap) {
		slog.Error("kms: wrapped KEK failed authentication in the HSM during root rotation", "keyring", rec.id().String(), "version", v.Version)
		return nil, fmt.Errorf("kms: KEK %s v%d does not unwrap under root %s: the stored keyring was altered", rec.id(), v.Version, old.ID())
	}
	if err != nil {
		return nil, fmt.Errorf("kms: root rotation: unwrap KEK %s v%d under %s: %w", rec.id(), v.Version, old.ID(), hsmErr(err))
	}
	defer clear(kek)
	if len(kek) != 32 {
		return nil, fmt.Errorf("kms: KEK %s v%d unwrapped to %d bytes", rec.id(), v.Version, len(kek))
	}
	w, err := s.root.Wrap(ctx, kek, aad)
	if err != nil {
		return nil, fmt.Errorf("kms: root rotation: wrap KEK %s v%d under %s: %w", rec.id(), v.Version, s.root.ID(), hsmErr(err))
	}
	check, err := s.root.Unwrap(ctx, w, aad)
	if err != nil {
		return nil, fmt.Errorf("kms: root rotation: KEK %s v%d rewrapped under %s does not unwrap: %w", rec.id(), v.Version, s.root.ID(), hsmErr(err))
	}
	same := bytes.Equal(check, kek)
	clear(check)
	if !same {
		return nil, fmt.Errorf("kms: root rotation: KEK %s v%d rewrapped under %s unwraps to another key; nothing written", rec.id(), v.Version, s.root.ID())
	}
	return w, nil
}

// RootUsage counts, by root ID, the stored KEK versions that hold key
// material (destroyed versions hold none). An old root may be destroyed
// once it no longer appears here: until then some KEK depends on it. A
// version is counted under the root that unwraps it here, so one recorded
// under an alias of the current root (a DR site) counts under that root's
// own ID; one whose root this service does not hold counts under the ID it
// records.
func (s *Service) RootUsage(ctx context.Context) (map[string]int, error) {
	kvs, err := s.store.List(ctx, keyringPrefix)
	if err != nil {
		return nil, storeErr(err)
	}
	usage := make(map[string]int)
	for _, kv := range kvs {
		rec, err := decodeRecord(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		for _, v := range rec.Versions {
			if len(v.Wrapped) == 0 {
				continue
			}
			if r := s.rootFor(v.RootID); r != nil {
				usage[r.ID()]++
			} else {
				usage[v.RootID]++
			}
		}
	}
	return usage, nil
}
