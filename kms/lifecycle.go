package kms

// The KEK lifecycle, after NIST SP 800-57 (DESIGN.md, "Key states"):
//
//	active ──rotate──▶ deactivated ◀──enable── disabled
//	                        │                    ▲  │
//	                        └──────disable───────┘  │ schedule (7–30 days)
//	                                                ▼
//	              disabled ◀──cancel── destroy_scheduled ──DestroyDue──▶ destroyed
//
// A deactivated version may also be scheduled directly.
//
// Compromise is a mark that is never lifted ([Service.MarkCompromised]): an
// active or deactivated version becomes compromised and decrypts, for
// rewrapping only; a disabled or pre-active one is marked without ever
// decrypting again (stored disabled, with the mark). A compromised version
// is never the primary and cannot be enabled or disabled; its destruction
// can be scheduled, and cancelling that returns it to compromised without
// decrypting: what a compromised version may do only shrinks.
//
// Every transition is one compare-and-swap of the keyring record (see
// [Service.update]), so a crash leaves the record before or after it, never
// half way, and of several Coffre nodes racing exactly one wins each
// transition.
//
// This file decides what is allowed; who may ask (the quorum) and the audit
// entries are the server's: the executors [Service.DestroyDue] and
// [Service.RotateDue] call back before each change so that the audit entry
// is durable first (invariant 3).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
)

// Bounds of the lifecycle settings.
const (
	// MinRotationPeriod and MaxRotationPeriod bound a keyring's automatic
	// rotation period. A day at least, because every rotation adds a version
	// and a keyring holds at most [MaxVersions] (daily rotation reaches it
	// in five and a half years; weekly in 38); ten years at most, because a
	// longer period is no rotation at all.
	MinRotationPeriod = 24 * time.Hour
	MaxRotationPeriod = 3650 * 24 * time.Hour
	// MinDestroyDays and MaxDestroyDays bound the grace period of
	// [Service.ScheduleDestroy], during which destruction can be cancelled.
	MinDestroyDays = 7
	MaxDestroyDays = 30
)

func checkRotationPeriod(d time.Duration) error {
	if d < MinRotationPeriod || d > MaxRotationPeriod {
		return fmt.Errorf("%w: rotation period %v is outside %v..%v (or 0 for none)", ErrInvalidArgument, d, MinRotationPeriod, MaxRotationPeriod)
	}
	return nil
}

// clone returns a copy of r whose Versions the caller may change. The
// wrapped bytes are shared: they are only ever replaced, never modified.
func (r *keyringRecord) clone() *keyringRecord {
	c := *r
	c.Versions = append([]versionRecord(nil), r.Versions...)
	return &c
}

// update changes keyring id by compare-and-swap of its record, retried on
// a concurrent write. change gets a copy of the current record to modify
// and reports whether it changed anything; nothing is written when it did
// not, and the current record is returned. change may run several times
// (once per attempt) and must decide afresh each time.
func (s *Service) update(ctx context.Context, id KeyringID, what string, change func(next *keyringRecord) (bool, error)) (*keyringRecord, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	key := keyringKey(id)
	for range maxCASAttempts {
		cur, rev, err := s.read(ctx, id)
		if err != nil {
			return nil, err
		}
		next := cur.clone()
		changed, err := change(next)
		if err != nil {
			return nil, err
		}
		if !changed {
			return cur, nil
		}
		next.Format = next.format()
		value := next.encode()
		// Never write what no server would read back: a bug here must not
		// turn into a keyring that every node refuses.
		if _, err := decodeRecord(key, value); err != nil {
			return nil, fmt.Errorf("kms: %s of keyring %s would store an invalid record: %w", what, id, err)
		}
		gen := s.cacheGen()
		newRev, err := s.store.CompareAndSwap(ctx, key, rev, value)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, storeErr(err)
		}
		s.remember(key, next, newRev, gen)
		return next, nil
	}
	return nil, fmt.Errorf("%w: keyring %s changed %d times during %s; try again", ErrUnavailable, id, maxCASAttempts, what)
}

// checkRotate says why next cannot be rotated, if it cannot.
func (s *Service) checkRotate(next *keyringRecord) error {
	switch st := next.version(next.Primary).state(); st {
	case StateDestroyScheduled:
		return fmt.Errorf("%w: keyring %s is scheduled for destruction; cancel that before rotating it", ErrFailedPrecondition, next.id())
	case StateDestroyed:
		return fmt.Errorf("%w: keyring %s is destroyed", ErrFailedPrecondition, next.id())
	}
	return nil
}

// rotate makes the next version the primary: the staged pre-active one if
// there is one, else a new one; the active version before it is
// deactivated and keeps decrypting.
func (s *Service) rotate(ctx context.Context, next *keyringRecord) error {
	if err := s.checkRotate(next); err != nil {
		return err
	}
	staged := next.preActive()
	if staged == nil {
		v, err := s.stage(ctx, next)
		if err != nil {
			return err
		}
		staged = v
	}
	for i := range next.Versions {
		if next.Versions[i].State == StateActive.String() {
			next.Versions[i].State = StateDeactivated.String()
		}
	}
	staged = next.version(staged.Version) // stage may have moved the versions
	staged.State = StateActive.String()
	next.Primary = staged.Version
	if next.RotationPeriod != 0 {
		// From now, not from when it was due: a node that was down for a
		// month rotates once, not thirty times.
		next.NextRotationTime = s.now().UTC().Add(next.RotationPeriod)
	}
	return nil
}

// MarkCompromised records that version v of keyring id is believed known
// outside Coffre, for good: nothing lifts the mark. It never encrypts
// again: if it is the primary, whatever its state, the keyring is rotated
// in the same write, so a compromised version is never the primary. The new
// primary is active only if the compromised one was: a primary disabled
// since a cancelled destruction of the keyring is replaced by a disabled
// one, so that marking does not restart encryption that was stopped
// ([Service.EnableVersion] does).
//
// A version that decrypted (active or deactivated) still decrypts (subject
// to the minimum decryption version), so that its envelopes can be
// rewrapped to the new primary (`coffrectl keyring rewrap`) before it is
// scheduled for destruction; raise the minimum decryption version to stop
// that too. A version that did not (disabled or pre-active) never decrypts
// again. Marking a compromised version again changes nothing; a version
// scheduled for destruction or destroyed is refused with
// ErrFailedPrecondition.
func (s *Service) MarkCompromised(ctx context.Context, id KeyringID, v uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "marking compromised", func(next *keyringRecord) (bool, error) {
		vr, err := lookup(next, v)
		if err != nil {
			return false, err
		}
		st := vr.state()
		switch {
		case st == StateDestroyScheduled || st == StateDestroyed:
			return false, fmt.Errorf("%w: version %d of keyring %s is %s", ErrFailedPrecondition, v, id, st)
		case vr.compromised() && v != next.Primary:
			return false, nil
		}
		// Marking the primary replaces it even when it is compromised
		// already: earlier servers could leave a compromised primary.
		if v == next.Primary {
			if err := s.rotate(ctx, next); err != nil {
				return false, fmt.Errorf("the compromised primary must be replaced: %w", err)
			}
			if st != StateActive {
				next.version(next.Primary).State = StateDisabled.String()
			}
		}
		// rotate may have moved the versions: look the version up again.
		vr = next.version(v)
		switch st {
		case StateActive, StateDeactivated:
			vr.State = StateCompromised.String()
		case StateDisabled, StatePreActive:
			vr.State, vr.Compromised = StateDisabled.String(), true
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	s.purgeRetired(rec)
	return rec.public(), nil
}

// stage appends a new pre-active version to next.
func (s *Service) stage(ctx context.Context, next *keyringRecord) (*versionRecord, error) {
	if len(next.Versions) >= s.maxVersions {
		return nil, fmt.Errorf("%w: keyring %s has %d versions, the most a keyring may have", ErrFailedPrecondition, next.id(), s.maxVersions)
	}
	nv := uint32(len(next.Versions) + 1) // #nosec G115 -- bounded by MaxVersions
	v, err := s.newVersion(ctx, next, nv)
	if err != nil {
		return nil, err
	}
	v.State = StatePreActive.String()
	next.Versions = append(next.Versions, v)
	return &next.Versions[len(next.Versions)-1], nil
}

// preActive returns r's staged version, if any (always the newest).
func (r *keyringRecord) preActive() *versionRecord {
	if n := len(r.Versions); n > 0 && r.Versions[n-1].state() == StatePreActive {
		return &r.Versions[n-1]
	}
	return nil
}

// AddVersion stages a new KEK version of keyring id, pre-active: made and
// wrapped by the HSM root, stored, but neither encrypting nor decrypting
// until PromoteVersion (or the next rotation) makes it the primary. A
// keyring has at most one staged version (ErrFailedPrecondition).
func (s *Service) AddVersion(ctx context.Context, id KeyringID) (*Keyring, error) {
	rec, err := s.update(ctx, id, "version staging", func(next *keyringRecord) (bool, error) {
		if v := next.preActive(); v != nil {
			return false, fmt.Errorf("%w: version %d of keyring %s is staged already: promote it first", ErrFailedPrecondition, v.Version, id)
		}
		if err := s.checkRotate(next); err != nil {
			return false, err
		}
		_, err := s.stage(ctx, next)
		return err == nil, err
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// PromoteVersion makes the staged version v of keyring id the primary; the
// primary before it is deactivated and keeps decrypting.
func (s *Service) PromoteVersion(ctx context.Context, id KeyringID, v uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "promotion", func(next *keyringRecord) (bool, error) {
		vr, err := lookup(next, v)
		if err != nil {
			return false, err
		}
		if vr.state() != StatePreActive {
			return false, fmt.Errorf("%w: version %d of keyring %s is %s, not pre-active", ErrFailedPrecondition, v, id, vr.state())
		}
		return true, s.rotate(ctx, next)
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// lookup returns version v of next, or why there is none.
func lookup(next *keyringRecord, v uint32) (*versionRecord, error) {
	if v == 0 {
		return nil, fmt.Errorf("%w: version 0 of keyring %s: versions start at 1", ErrInvalidArgument, next.id())
	}
	vr := next.version(v)
	if vr == nil {
		return nil, fmt.Errorf("%w: keyring %s has no version %d", ErrNotFound, next.id(), v)
	}
	return vr, nil
}

// dropKEK removes the cached KEK of version v of rec from this node's cache
// and zeroizes it.
func (s *Service) dropKEK(rec *keyringRecord, v uint32) {
	s.keks.drop(kekRef{uid: string(rec.UID), version: v})
}

// purgeRetired drops from this node's KEK cache every version of rec that
// may no longer decrypt, whoever retired it (this node or another).
func (s *Service) purgeRetired(rec *keyringRecord) {
	for i := range rec.Versions {
		if !rec.decrypts(&rec.Versions[i]) {
			s.dropKEK(rec, rec.Versions[i].Version)
		}
	}
}

// drop removes ref from the cache, zeroizing its KEK. An unwrap of ref in
// flight at the same time may still insert it afterwards; such an entry is
// never used (callers check the version's state first) and goes at the
// next purge or when its TTL ends.
func (c *kekCache) drop(ref kekRef) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[ref]; ok {
		c.removeLocked(el)
	}
}

// DisableVersion stops version v of keyring id from decrypting, reversibly
// ([Service.EnableVersion]). The active primary cannot be disabled: it is
// the keyring's only way to encrypt, so rotate first (or schedule the whole
// keyring for destruction). Disabling a disabled version changes nothing; a
// compromised version, a version scheduled for destruction or a destroyed
// one is refused with ErrFailedPrecondition.
func (s *Service) DisableVersion(ctx context.Context, id KeyringID, v uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "disable", func(next *keyringRecord) (bool, error) {
		vr, err := lookup(next, v)
		if err != nil {
			return false, err
		}
		switch st := vr.publicState(); st {
		case StateDisabled:
			return false, nil
		case StateDeactivated:
			vr.State = StateDisabled.String()
			return true, nil
		case StateActive:
			return false, fmt.Errorf("%w: version %d is the primary of keyring %s, its only way to encrypt: rotate first", ErrFailedPrecondition, v, id)
		default:
			return false, fmt.Errorf("%w: version %d of keyring %s is %s", ErrFailedPrecondition, v, id, st)
		}
	})
	if err != nil {
		return nil, err
	}
	s.dropKEK(rec, v)
	return rec.public(), nil
}

// EnableVersion returns a disabled version v of keyring id to service:
// deactivated (decrypt only), or active when it is the primary (which is
// disabled only after a cancelled destruction of the whole keyring, or
// when it replaced a disabled primary marked compromised). Enabling a
// version that decrypts already changes nothing; a compromised version, a
// version scheduled for destruction or a destroyed one is refused with
// ErrFailedPrecondition (cancel the destruction first: it leaves the
// version disabled, or compromised if it was).
func (s *Service) EnableVersion(ctx context.Context, id KeyringID, v uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "enable", func(next *keyringRecord) (bool, error) {
		vr, err := lookup(next, v)
		if err != nil {
			return false, err
		}
		// publicState: a compromised version stored disabled is refused.
		switch st := vr.publicState(); st {
		case StateActive, StateDeactivated:
			return false, nil
		case StateDisabled:
			vr.State = StateDeactivated.String()
			if v == next.Primary {
				vr.State = StateActive.String()
			}
			return true, nil
		default:
			return false, fmt.Errorf("%w: version %d of keyring %s is %s", ErrFailedPrecondition, v, id, st)
		}
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// SetMinDecryptionVersion makes envelopes under versions below v of keyring
// id fail to decrypt (ErrDecrypt), without destroying anything: lowering it
// again restores them. 0 and 1 mean no limit. It cannot exceed the primary
// (ErrFailedPrecondition): that would leave no version to decrypt what the
// keyring encrypts.
func (s *Service) SetMinDecryptionVersion(ctx context.Context, id KeyringID, v uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "minimum decryption version change", func(next *keyringRecord) (bool, error) {
		if v > next.Primary {
			return false, fmt.Errorf("%w: minimum decryption version %d is above the primary %d of keyring %s", ErrFailedPrecondition, v, next.Primary, id)
		}
		if next.MinDecryptionVersion == v {
			return false, nil
		}
		next.MinDecryptionVersion = v
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	s.purgeRetired(rec)
	return rec.public(), nil
}

// SetRotationPeriod makes [Service.RotateDue] rotate keyring id every
// period, the first time one period from now; 0 stops automatic rotation.
// A period outside [MinRotationPeriod]..[MaxRotationPeriod] is
// ErrInvalidArgument. Setting the period it has already changes nothing
// (the next rotation keeps its time).
func (s *Service) SetRotationPeriod(ctx context.Context, id KeyringID, period time.Duration) (*Keyring, error) {
	if period != 0 {
		if err := checkRotationPeriod(period); err != nil {
			return nil, err
		}
	}
	rec, err := s.update(ctx, id, "rotation period change", func(next *keyringRecord) (bool, error) {
		if next.RotationPeriod == period {
			return false, nil
		}
		next.RotationPeriod = period
		next.NextRotationTime = time.Time{}
		if period != 0 {
			next.NextRotationTime = s.now().UTC().Add(period)
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// ScheduleDestroy schedules version of keyring id for destruction in days
// days (MinDestroyDays to MaxDestroyDays, else ErrInvalidArgument). From now
// on the version neither encrypts nor decrypts; [Service.CancelDestroy]
// returns it to disabled (a compromised one to compromised, without
// decrypting) until [Service.DestroyDue] destroys it.
//
// Version 0 schedules the whole keyring: every version not yet scheduled
// or destroyed, the primary included, so the keyring encrypts nothing from
// now on (versions scheduled already keep their own time). A single
// version must not be the primary: the primary is destroyed only with the
// whole keyring, because a keyring with a live name and no key is a trap
// for its callers. To destroy today's primary alone, rotate first.
//
// A version scheduled already is refused with ErrFailedPrecondition (cancel
// first to change its time), and so is a destroyed one.
func (s *Service) ScheduleDestroy(ctx context.Context, id KeyringID, version uint32, days int) (*Keyring, error) {
	if days < MinDestroyDays || days > MaxDestroyDays {
		return nil, fmt.Errorf("%w: destruction in %d days: the grace period is %d to %d days", ErrInvalidArgument, days, MinDestroyDays, MaxDestroyDays)
	}
	var scheduled []uint32
	rec, err := s.update(ctx, id, "destruction scheduling", func(next *keyringRecord) (bool, error) {
		scheduled = scheduled[:0]
		at := s.now().UTC().Add(time.Duration(days) * 24 * time.Hour)
		schedule := func(vr *versionRecord) {
			vr.Compromised = vr.compromised() // the mark outlives the state
			vr.State, vr.DestroyTime = StateDestroyScheduled.String(), at
			scheduled = append(scheduled, vr.Version)
		}
		if version == 0 {
			left := 0
			for i := range next.Versions {
				vr := &next.Versions[i]
				switch vr.state() {
				case StateDestroyed:
					continue
				case StateDestroyScheduled:
				default:
					schedule(vr)
				}
				left++
			}
			switch {
			case left == 0:
				return false, fmt.Errorf("%w: keyring %s is destroyed", ErrFailedPrecondition, id)
			case len(scheduled) == 0:
				return false, fmt.Errorf("%w: every version of keyring %s is scheduled for destruction already", ErrFailedPrecondition, id)
			}
			return true, nil
		}
		vr, err := lookup(next, version)
		if err != nil {
			return false, err
		}
		switch st := vr.state(); {
		case version == next.Primary:
			return false, fmt.Errorf("%w: version %d is the primary of keyring %s: rotate first, or schedule the whole keyring (version 0)", ErrFailedPrecondition, version, id)
		case st == StateDestroyScheduled:
			return false, fmt.Errorf("%w: version %d of keyring %s is scheduled for destruction at %s already; cancel first to change that",
				ErrFailedPrecondition, version, id, vr.DestroyTime.Format(time.RFC3339))
		case st == StateDestroyed:
			return false, fmt.Errorf("%w: version %d of keyring %s is destroyed", ErrFailedPrecondition, version, id)
		}
		schedule(vr)
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	for _, v := range scheduled {
		s.dropKEK(rec, v)
	}
	return rec.public(), nil
}

// CancelDestroy returns version of keyring id, scheduled for destruction,
// to disabled ([Service.EnableVersion] brings it back). A compromised
// version returns to compromised instead, and does not decrypt again:
// nothing brings it back, and it can only be scheduled anew. Version 0
// cancels every scheduled version of the keyring. A version (or keyring)
// with nothing scheduled, or destroyed already, is refused with
// ErrFailedPrecondition: destruction cannot be undone.
func (s *Service) CancelDestroy(ctx context.Context, id KeyringID, version uint32) (*Keyring, error) {
	rec, err := s.update(ctx, id, "destruction cancelling", func(next *keyringRecord) (bool, error) {
		cancel := func(vr *versionRecord) {
			// vr.Compromised stays: disabled with the mark is compromised,
			// and EnableVersion refuses it.
			vr.State, vr.DestroyTime = StateDisabled.String(), time.Time{}
		}
		if version == 0 {
			n := 0
			for i := range next.Versions {
				if next.Versions[i].state() == StateDestroyScheduled {
					cancel(&next.Versions[i])
					n++
				}
			}
			if n == 0 {
				return false, fmt.Errorf("%w: keyring %s has no version scheduled for destruction", ErrFailedPrecondition, id)
			}
			return true, nil
		}
		vr, err := lookup(next, version)
		if err != nil {
			return false, err
		}
		if st := vr.state(); st != StateDestroyScheduled {
			return false, fmt.Errorf("%w: version %d of keyring %s is %s, not scheduled for destruction", ErrFailedPrecondition, version, id, st)
		}
		cancel(vr)
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// DestroyEvent is one KEK version about to be destroyed by
// [Service.DestroyDue].
type DestroyEvent struct {
	Keyring KeyringID
	Version uint32
	// DestroyTime is when the destruction was scheduled to happen.
	DestroyTime time.Time
}

// DestroyDue destroys every KEK version, of every keyring, whose destroy
// time has passed by the service clock, and returns those it destroyed.
//
// For each such version it first calls before, where the caller makes the
// audit entry durable (invariant 3); when before returns an error that
// version is not destroyed (the others are) and the error is part of the
// result. before records an intent: if the version changes in between (a
// cancellation, another node destroying it first) it is not destroyed by
// this call and is missing from the result, so an audit trail must read an
// entry from before together with the returned events. Errors with one
// keyring do not stop the others; they are joined.
//
// # Crypto-shred
//
// Destroying a version erases its wrapped KEK from the keyring record (one
// compare-and-swap: after a crash the version is either intact or gone) and
// drops its unwrapped KEK from this node's cache, zeroizing it. Other nodes
// see the record change through the store watch and stop using the version
// at once (its state is checked on every use); each node's own DestroyDue
// also drops the cached KEKs of every version that may no longer decrypt,
// so run it on every node, and the cache TTL bounds the rest. Envelopes
// under a destroyed version never open again on any node.
//
// KEKs are not HSM objects in Coffre: they exist in the HSM only while it
// unwraps them. What remains are the wrapped bytes in older store history
// (etcd revisions before compaction, bbolt free pages) and in backups: they
// are useless without the HSM root that wrapped them, so the destruction is
// complete once that root is rotated and its HSM object destroyed.
func (s *Service) DestroyDue(ctx context.Context, before func(DestroyEvent) error) ([]DestroyEvent, error) {
	now := s.now()
	var done []DestroyEvent
	gen := s.cacheGen()
	err := s.sweep(ctx, func(kv store.KV, rec *keyringRecord) error {
		// The sweep keeps this node fresh even if its watch lags: the
		// record as listed replaces an older cached one.
		s.remember(kv.Key, rec, kv.Revision, gen)
		s.purgeRetired(rec)
		if !destroyDue(rec, now) {
			return nil
		}
		evs, err := s.destroyDue(ctx, rec.id(), now, before)
		done = append(done, evs...)
		return err
	})
	return done, err
}

// sweep hands every stored keyring, decoded, to visit, and joins the
// errors of those that fail (one keyring does not stop the others); it
// stops when ctx ends.
func (s *Service) sweep(ctx context.Context, visit func(kv store.KV, rec *keyringRecord) error) error {
	kvs, err := s.store.List(ctx, keyringPrefix)
	if err != nil {
		return storeErr(err)
	}
	var errs []error
	for _, kv := range kvs {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		rec, err := decodeRecord(kv.Key, kv.Value)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, visit(kv, rec))
	}
	return errors.Join(errs...)
}

func destroyDue(rec *keyringRecord, now time.Time) bool {
	for i := range rec.Versions {
		if v := &rec.Versions[i]; v.state() == StateDestroyScheduled && !now.Before(v.DestroyTime) {
			return true
		}
	}
	return false
}

func (s *Service) destroyDue(ctx context.Context, id KeyringID, now time.Time, before func(DestroyEvent) error) ([]DestroyEvent, error) {
	announced := make(map[DestroyEvent]bool)
	refused := make(map[DestroyEvent]bool)
	var errs []error
	var destroyed []DestroyEvent
	rec, err := s.update(ctx, id, "destruction", func(next *keyringRecord) (bool, error) {
		destroyed = destroyed[:0]
		for i := range next.Versions {
			vr := &next.Versions[i]
			if vr.state() != StateDestroyScheduled || now.Before(vr.DestroyTime) {
				continue
			}
			ev := DestroyEvent{Keyring: id, Version: vr.Version, DestroyTime: vr.DestroyTime}
			if refused[ev] {
				continue
			}
			if !announced[ev] {
				if err := before(ev); err != nil {
					refused[ev] = true
					errs = append(errs, fmt.Errorf("kms: version %d of keyring %s not destroyed: %w", vr.Version, id, err))
					continue
				}
				announced[ev] = true
			}
			vr.State, vr.Wrapped = StateDestroyed.String(), nil
			destroyed = append(destroyed, ev)
		}
		return len(destroyed) > 0, nil
	})
	if err != nil {
		return nil, errors.Join(append(errs, err)...)
	}
	for _, ev := range destroyed {
		s.dropKEK(rec, ev.Version)
	}
	return destroyed, errors.Join(errs...)
}

// RotateEvent is one rotation about to be made by [Service.RotateDue].
type RotateEvent struct {
	Keyring  KeyringID
	Version  uint32 // the new primary
	Previous uint32 // the primary it replaces
	// Due is the next rotation time that came due.
	Due time.Time
}

// RotateDue rotates every keyring whose next rotation time has passed by
// the service clock, and returns the rotations it made. Each is one
// compare-and-swap that also moves the next rotation time one period past
// now, so that of several nodes running RotateDue at once exactly one
// rotates each keyring.
//
// For each rotation it first calls before, where the caller makes the audit
// entry durable; when before returns an error that keyring is not rotated.
// As with [Service.DestroyDue], before records an intent: a node that loses
// the race to another has called before for a rotation it did not make,
// and does not return it. A keyring whose primary is not active (disabled
// or scheduled for destruction) is not rotated automatically: that would
// bring back encryption that an administrator stopped. Errors with one
// keyring do not stop the others; they are joined.
func (s *Service) RotateDue(ctx context.Context, before func(RotateEvent) error) ([]RotateEvent, error) {
	now := s.now()
	var done []RotateEvent
	err := s.sweep(ctx, func(_ store.KV, rec *keyringRecord) error {
		if !rotationDue(rec, now) {
			return nil
		}
		ev, err := s.rotateDue(ctx, rec.id(), now, before)
		if ev != nil && err == nil {
			done = append(done, *ev)
		}
		return err
	})
	return done, err
}

func rotationDue(rec *keyringRecord, now time.Time) bool {
	return rec.RotationPeriod != 0 && !now.Before(rec.NextRotationTime) &&
		rec.version(rec.Primary).state() == StateActive
}

func (s *Service) rotateDue(ctx context.Context, id KeyringID, now time.Time, before func(RotateEvent) error) (*RotateEvent, error) {
	var announced, made *RotateEvent
	_, err := s.update(ctx, id, "scheduled rotation", func(next *keyringRecord) (bool, error) {
		made = nil
		if !rotationDue(next, now) {
			return false, nil // another node rotated it, or its settings changed
		}
		ev := RotateEvent{Keyring: id, Previous: next.Primary, Due: next.NextRotationTime}
		// Rotate the copy first, so that the event names the version rotate
		// promoted (a staged one, if any); nothing is stored before the
		// audit entry is durable.
		if err := s.rotate(ctx, next); err != nil {
			return false, err
		}
		ev.Version = next.Primary
		if announced == nil || *announced != ev {
			if err := before(ev); err != nil {
				return false, fmt.Errorf("kms: keyring %s not rotated: %w", id, err)
			}
			announced = &ev
		}
		made = &ev
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return made, nil
}
