package kms

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// lifecycleFixture is a keyring with versions 1..n and one envelope (and
// its data key) per version.
type lifecycleFixture struct {
	*fixture
	clock *testClock
	id    KeyringID
	ec    map[string]string
	envs  [][]byte // envs[v-1] was made under version v
	keys  [][]byte
}

func newLifecycle(t *testing.T, versions int) *lifecycleFixture {
	t.Helper()
	clock := newTestClock()
	f := &lifecycleFixture{fixture: newFixture(t, Config{Now: clock.Now}), clock: clock, id: mustID(t, "acme/disks"), ec: map[string]string{"volume": "v"}}
	ctx := ctxT(t)
	if _, err := f.svc.CreateKeyring(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	for v := 1; v <= versions; v++ {
		if v > 1 {
			if _, err := f.svc.RotateKeyring(ctx, f.id); err != nil {
				t.Fatal(err)
			}
		}
		dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec)
		if err != nil || dk.KeyVersion != uint32(v) {
			t.Fatalf("data key under v%d: %v", v, err)
		}
		f.envs = append(f.envs, dk.Envelope)
		f.keys = append(f.keys, bytes.Clone(dk.Plaintext.Expose()))
	}
	return f
}

// decrypts reports whether the envelope of version v opens to its key;
// any failure other than exactly ErrDecrypt fails the test.
func (f *lifecycleFixture) decrypts(t *testing.T, svc *Service, v uint32) bool {
	t.Helper()
	got, err := svc.Decrypt(ctxT(t), f.id.Tenant, f.envs[v-1], f.ec)
	if err == nil {
		if !bytes.Equal(got.Expose(), f.keys[v-1]) {
			t.Fatalf("version %d decrypted to another key", v)
		}
		return true
	}
	if err != ErrDecrypt || got != nil {
		t.Fatalf("decrypt under version %d: %v, %v; want nil or exactly ErrDecrypt", v, got, err)
	}
	return false
}

func (f *lifecycleFixture) want(t *testing.T, k *Keyring, states ...KeyState) {
	t.Helper()
	if len(k.Versions) != len(states) {
		t.Fatalf("keyring has %d versions, want %d", len(k.Versions), len(states))
	}
	for i, st := range states {
		if k.Versions[i].State != st {
			t.Fatalf("version %d is %v, want %v (all: %+v)", i+1, k.Versions[i].State, st, k.Versions)
		}
	}
}

func (f *lifecycleFixture) rev(t *testing.T) int64 {
	t.Helper()
	kv, err := f.store.Get(ctxT(t), keyringKey(f.id))
	if err != nil {
		t.Fatal(err)
	}
	return kv.Revision
}

// cached reports whether this service holds version v of keyring id's KEK
// unwrapped.
func cached(t *testing.T, svc *Service, id KeyringID, v uint32) bool {
	t.Helper()
	rec, _, err := svc.read(ctxT(t), id)
	if err != nil {
		t.Fatal(err)
	}
	svc.keks.mu.Lock()
	defer svc.keks.mu.Unlock()
	_, ok := svc.keks.entries[kekRef{uid: string(rec.UID), version: v}]
	return ok
}

func noEvent[T any](T) error { return nil }

func TestDisableEnable(t *testing.T) {
	f := newLifecycle(t, 3)
	ctx := ctxT(t)
	for v := uint32(1); v <= 3; v++ {
		if !f.decrypts(t, f.svc, v) {
			t.Fatalf("version %d does not decrypt", v)
		}
	}
	_, err := f.svc.DisableVersion(ctx, f.id, 3)
	if !errors.Is(err, ErrFailedPrecondition) || !strings.Contains(err.Error(), "rotate first") {
		t.Fatalf("disable the primary: %v", err)
	}
	if _, err := f.svc.DisableVersion(ctx, f.id, 0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("disable version 0: %v", err)
	}
	if _, err := f.svc.DisableVersion(ctx, f.id, 9); !errors.Is(err, ErrNotFound) {
		t.Fatalf("disable version 9: %v", err)
	}
	if _, err := f.svc.DisableVersion(ctx, mustID(t, "acme/nope"), 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("disable on a missing keyring: %v", err)
	}
	if !cached(t, f.svc, f.id, 1) {
		t.Fatal("version 1 not cached after decrypting")
	}
	k, err := f.svc.DisableVersion(ctx, f.id, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateDeactivated, StateActive)
	if cached(t, f.svc, f.id, 1) {
		t.Fatal("disabled version's KEK still cached")
	}
	if f.decrypts(t, f.svc, 1) || !f.decrypts(t, f.svc, 2) || !f.decrypts(t, f.svc, 3) {
		t.Fatal("after disabling v1: want only v2 and v3 to decrypt")
	}
	if _, err := f.svc.ReEncrypt(ctx, "acme", f.envs[0], f.ec, KeyringID{}, nil); err != ErrDecrypt {
		t.Fatalf("re-encrypt under a disabled version: %v", err)
	}
	rev := f.rev(t)
	if _, err := f.svc.DisableVersion(ctx, f.id, 1); err != nil || f.rev(t) != rev {
		t.Fatalf("disabling again: %v, or the record was rewritten", err)
	}
	if _, err := f.svc.EnableVersion(ctx, f.id, 3); err != nil || f.rev(t) != rev {
		t.Fatalf("enabling the active primary: %v, or the record was rewritten", err)
	}
	k, err = f.svc.EnableVersion(ctx, f.id, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDeactivated, StateDeactivated, StateActive)
	if !f.decrypts(t, f.svc, 1) {
		t.Fatal("re-enabled version does not decrypt")
	}
	// Enabling does not make a version encrypt.
	if dk, err := f.svc.GenerateDataKey(ctx, f.id, nil); err != nil || dk.KeyVersion != 3 {
		t.Fatalf("after enable: %v", err)
	}
}

func TestMinDecryptionVersion(t *testing.T) {
	f := newLifecycle(t, 3)
	ctx := ctxT(t)
	if _, err := f.svc.SetMinDecryptionVersion(ctx, f.id, 4); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("minimum above the primary: %v", err)
	}
	f.decrypts(t, f.svc, 1) // cache it
	k, err := f.svc.SetMinDecryptionVersion(ctx, f.id, 2)
	if err != nil || k.MinDecryptionVersion != 2 {
		t.Fatalf("set minimum: %+v, %v", k, err)
	}
	// Below the minimum, nothing is destroyed or even disabled.
	f.want(t, k, StateDeactivated, StateDeactivated, StateActive)
	if cached(t, f.svc, f.id, 1) {
		t.Fatal("KEK below the minimum still cached")
	}
	if f.decrypts(t, f.svc, 1) || !f.decrypts(t, f.svc, 2) || !f.decrypts(t, f.svc, 3) {
		t.Fatal("with minimum 2: want only v2 and v3 to decrypt")
	}
	// A service that never saw the keyring reads the minimum from the store.
	other, err := New(Config{Store: f.store, Root: f.root})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if f.decrypts(t, other, 1) {
		t.Fatal("another service decrypts below the minimum")
	}
	if _, err := f.svc.SetMinDecryptionVersion(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	if !f.decrypts(t, f.svc, 1) {
		t.Fatal("version 1 does not decrypt once the minimum is lifted")
	}
}

func TestRotationPeriod(t *testing.T) {
	f := newLifecycle(t, 1)
	ctx := ctxT(t)
	for _, bad := range []time.Duration{time.Hour, MinRotationPeriod - 1, MaxRotationPeriod + 1, -time.Hour} {
		if _, err := f.svc.SetRotationPeriod(ctx, f.id, bad); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("period %v: %v", bad, err)
		}
	}
	var events []RotateEvent
	record := func(ev RotateEvent) error { events = append(events, ev); return nil }
	// No period: never due.
	f.clock.Advance(1000 * 24 * time.Hour)
	if done, err := f.svc.RotateDue(ctx, record); err != nil || len(done) != 0 || len(events) != 0 {
		t.Fatalf("rotation without a period: %v, %v", done, err)
	}
	const month = 30 * 24 * time.Hour
	k, err := f.svc.SetRotationPeriod(ctx, f.id, month)
	if err != nil || k.RotationPeriod != month || !k.NextRotationTime.Equal(f.clock.Now().Add(month)) {
		t.Fatalf("set period: %+v, %v", k, err)
	}
	due := k.NextRotationTime
	rev := f.rev(t)
	if _, err := f.svc.SetRotationPeriod(ctx, f.id, month); err != nil || f.rev(t) != rev {
		t.Fatalf("same period again: %v, or the record was rewritten", err)
	}
	f.clock.Advance(month - time.Second)
	if done, err := f.svc.RotateDue(ctx, record); err != nil || len(done) != 0 {
		t.Fatalf("rotation a second early: %v, %v", done, err)
	}
	f.clock.Advance(time.Second)
	// An audit failure stops the rotation.
	auditDown := errors.New("audit log unwritable")
	done, err := f.svc.RotateDue(ctx, func(RotateEvent) error { return auditDown })
	if !errors.Is(err, auditDown) || len(done) != 0 {
		t.Fatalf("rotation with a failing audit: %v, %v", done, err)
	}
	if k, _ := f.svc.GetKeyring(ctx, f.id); len(k.Versions) != 1 {
		t.Fatal("rotated although before failed")
	}
	done, err = f.svc.RotateDue(ctx, record)
	want := RotateEvent{Keyring: f.id, Version: 2, Previous: 1, Due: due}
	if err != nil || len(done) != 1 || done[0] != want || len(events) != 1 || events[0] != want {
		t.Fatalf("due rotation: %+v, %+v, %v; want %+v", done, events, err, want)
	}
	k, _ = f.svc.GetKeyring(ctx, f.id)
	if k.Primary != 2 || !k.NextRotationTime.Equal(f.clock.Now().Add(month)) {
		t.Fatalf("after the rotation: %+v", k)
	}
	if done, _ := f.svc.RotateDue(ctx, record); len(done) != 0 {
		t.Fatal("rotated twice")
	}
	// A manual rotation restarts the period.
	f.clock.Advance(10 * 24 * time.Hour)
	if k, err = f.svc.RotateKeyring(ctx, f.id); err != nil || !k.NextRotationTime.Equal(f.clock.Now().Add(month)) {
		t.Fatalf("manual rotation: %+v, %v", k, err)
	}
	// A keyring that encrypts nothing is not brought back by the schedule.
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, 7); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.CancelDestroy(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(2 * month)
	if done, err := f.svc.RotateDue(ctx, record); err != nil || len(done) != 0 {
		t.Fatalf("rotated a keyring with a disabled primary: %v, %v", done, err)
	}
	k, err = f.svc.SetRotationPeriod(ctx, f.id, 0)
	if err != nil || k.RotationPeriod != 0 || !k.NextRotationTime.IsZero() {
		t.Fatalf("clear period: %+v, %v", k, err)
	}
}

func TestScheduleDestroyVersion(t *testing.T) {
	f := newLifecycle(t, 3)
	ctx := ctxT(t)
	for _, days := range []int{-1, 0, 6, 31, 365} {
		if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, days); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("%d days: %v", days, err)
		}
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 3, 7); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("schedule the primary alone: %v", err)
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 4, 7); !errors.Is(err, ErrNotFound) {
		t.Fatalf("schedule version 4: %v", err)
	}
	if _, err := f.svc.CancelDestroy(ctx, f.id, 1); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("cancel with nothing scheduled: %v", err)
	}
	f.decrypts(t, f.svc, 1) // cache it
	k, err := f.svc.ScheduleDestroy(ctx, f.id, 1, 7)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDestroyScheduled, StateDeactivated, StateActive)
	if at := f.clock.Now().Add(7 * 24 * time.Hour); !k.Versions[0].DestroyTime.Equal(at) {
		t.Fatalf("destroy time %v, want %v", k.Versions[0].DestroyTime, at)
	}
	if f.decrypts(t, f.svc, 1) || cached(t, f.svc, f.id, 1) {
		t.Fatal("a version scheduled for destruction decrypts, or stays cached")
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, 30); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("schedule twice: %v", err)
	}
	for name, op := range map[string]func() (*Keyring, error){
		"disable": func() (*Keyring, error) { return f.svc.DisableVersion(ctx, f.id, 1) },
		"enable":  func() (*Keyring, error) { return f.svc.EnableVersion(ctx, f.id, 1) },
	} {
		if _, err := op(); !errors.Is(err, ErrFailedPrecondition) {
			t.Fatalf("%s a scheduled version: %v", name, err)
		}
	}
	// Cancel: back to disabled, then enabled by hand.
	k, err = f.svc.CancelDestroy(ctx, f.id, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateDeactivated, StateActive)
	if !k.Versions[0].DestroyTime.IsZero() || f.decrypts(t, f.svc, 1) {
		t.Fatal("cancelled version keeps its destroy time, or decrypts while disabled")
	}
	if _, err := f.svc.EnableVersion(ctx, f.id, 1); err != nil || !f.decrypts(t, f.svc, 1) {
		t.Fatalf("enable after cancel: %v", err)
	}

	// Schedule again, from disabled this time, and let the time pass.
	if _, err := f.svc.DisableVersion(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
	if k, err = f.svc.ScheduleDestroy(ctx, f.id, 1, 10); err != nil {
		t.Fatal(err)
	}
	due := k.Versions[0].DestroyTime
	rec, _, err := f.svc.read(ctx, f.id)
	if err != nil {
		t.Fatal(err)
	}
	wrapped := rec.Versions[0].Wrapped
	f.clock.Advance(10*24*time.Hour - time.Second)
	if done, err := f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 0 {
		t.Fatalf("destroyed a second early: %v, %v", done, err)
	}
	f.clock.Advance(time.Second)
	auditDown := errors.New("audit log unwritable")
	if done, err := f.svc.DestroyDue(ctx, func(DestroyEvent) error { return auditDown }); !errors.Is(err, auditDown) || len(done) != 0 {
		t.Fatalf("destroy with a failing audit: %v, %v", done, err)
	}
	if rec, _, _ := f.svc.read(ctx, f.id); rec.Versions[0].state() != StateDestroyScheduled || !bytes.Equal(rec.Versions[0].Wrapped, wrapped) {
		t.Fatal("destroyed although before failed")
	}
	var events []DestroyEvent
	done, err := f.svc.DestroyDue(ctx, func(ev DestroyEvent) error { events = append(events, ev); return nil })
	want := DestroyEvent{Keyring: f.id, Version: 1, DestroyTime: due}
	if err != nil || len(done) != 1 || done[0] != want || len(events) != 1 || events[0] != want {
		t.Fatalf("destroy: %+v, %+v, %v; want %+v", done, events, err, want)
	}

	// The store holds no trace of the wrapped KEK, in any encoding.
	kv, err := f.store.Get(ctx, keyringKey(f.id))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(kv.Value, wrapped) || bytes.Contains(kv.Value, []byte(base64.StdEncoding.EncodeToString(wrapped))) {
		t.Fatal("the stored record still holds the destroyed version's wrapped KEK")
	}
	rec, err = decodeRecord(kv.Key, kv.Value)
	if err != nil || rec.Versions[0].Wrapped != nil || len(rec.Versions[1].Wrapped) == 0 {
		t.Fatalf("stored record after destruction: %v", err)
	}
	k, _ = f.svc.GetKeyring(ctx, f.id)
	f.want(t, k, StateDestroyed, StateDeactivated, StateActive)
	if !k.Versions[0].DestroyTime.Equal(due) {
		t.Fatal("destroyed version lost its destroy time")
	}
	// Gone here, and on a service with nothing cached.
	other, err := New(Config{Store: f.store, Root: f.root})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for _, svc := range []*Service{f.svc, other} {
		if f.decrypts(t, svc, 1) || !f.decrypts(t, svc, 2) || !f.decrypts(t, svc, 3) {
			t.Fatal("after destroying v1: want only v2 and v3 to decrypt")
		}
	}
	if done, err := f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 0 {
		t.Fatalf("destroyed twice: %v, %v", done, err)
	}
	for name, op := range map[string]func() (*Keyring, error){
		"disable":  func() (*Keyring, error) { return f.svc.DisableVersion(ctx, f.id, 1) },
		"enable":   func() (*Keyring, error) { return f.svc.EnableVersion(ctx, f.id, 1) },
		"cancel":   func() (*Keyring, error) { return f.svc.CancelDestroy(ctx, f.id, 1) },
		"schedule": func() (*Keyring, error) { return f.svc.ScheduleDestroy(ctx, f.id, 1, 7) },
	} {
		if _, err := op(); !errors.Is(err, ErrFailedPrecondition) {
			t.Fatalf("%s a destroyed version: %v", name, err)
		}
	}
	// The minimum may still name a destroyed version: it only forbids.
	if _, err := f.svc.SetMinDecryptionVersion(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
}

func TestScheduleDestroyKeyring(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	k, err := f.svc.ScheduleDestroy(ctx, f.id, 0, 7)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDestroyScheduled, StateDestroyScheduled)
	if _, err := f.svc.GenerateDataKey(ctx, f.id, nil); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("generate under a keyring scheduled for destruction: %v", err)
	}
	if _, err := f.svc.RotateKeyring(ctx, f.id); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("rotate a keyring scheduled for destruction: %v", err)
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, 7); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("schedule the keyring twice: %v", err)
	}
	if f.decrypts(t, f.svc, 1) || f.decrypts(t, f.svc, 2) {
		t.Fatal("a keyring scheduled for destruction decrypts")
	}
	// Cancelled, it encrypts nothing until its primary is enabled.
	if k, err = f.svc.CancelDestroy(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateDisabled)
	if _, err := f.svc.GenerateDataKey(ctx, f.id, nil); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("generate with a disabled primary: %v", err)
	}
	if k, err = f.svc.EnableVersion(ctx, f.id, 2); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateActive)
	if dk, err := f.svc.GenerateDataKey(ctx, f.id, nil); err != nil || dk.KeyVersion != 2 {
		t.Fatalf("generate after enabling the primary: %v", err)
	}

	// Version 1 alone for 30 days, then the keyring for 7: each keeps its
	// own time.
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, 30); err != nil {
		t.Fatal(err)
	}
	if k, err = f.svc.ScheduleDestroy(ctx, f.id, 0, 7); err != nil {
		t.Fatal(err)
	}
	if d := k.Versions[0].DestroyTime.Sub(k.Versions[1].DestroyTime); d != 23*24*time.Hour {
		t.Fatalf("destroy times %v apart", d)
	}
	f.clock.Advance(8 * 24 * time.Hour)
	done, err := f.svc.DestroyDue(ctx, noEvent)
	if err != nil || len(done) != 1 || done[0].Version != 2 {
		t.Fatalf("after 8 days: %+v, %v", done, err)
	}
	f.clock.Advance(30 * 24 * time.Hour)
	if done, err = f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 1 || done[0].Version != 1 {
		t.Fatalf("after 38 days: %+v, %v", done, err)
	}
	k, err = f.svc.GetKeyring(ctx, f.id)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDestroyed, StateDestroyed)
	if f.decrypts(t, f.svc, 1) || f.decrypts(t, f.svc, 2) {
		t.Fatal("a destroyed keyring decrypts")
	}
	if _, err := f.svc.GenerateDataKey(ctx, f.id, nil); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("generate under a destroyed keyring: %v", err)
	}
	for name, err := range map[string]error{
		"rotate":   func() error { _, err := f.svc.RotateKeyring(ctx, f.id); return err }(),
		"schedule": func() error { _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, 7); return err }(),
		"cancel":   func() error { _, err := f.svc.CancelDestroy(ctx, f.id, 0); return err }(),
	} {
		if !errors.Is(err, ErrFailedPrecondition) {
			t.Fatalf("%s a destroyed keyring: %v", name, err)
		}
	}
	// The name stays taken: the record is the proof of what happened.
	if _, err := f.svc.CreateKeyring(ctx, f.id); !errors.Is(err, ErrExists) {
		t.Fatalf("create over a destroyed keyring: %v", err)
	}
}

// TestDestroyOnAnotherNode: a KEK cached by one service is destroyed by
// another on the same store; the first refuses it and drops it.
func TestDestroyOnAnotherNode(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	other, err := New(Config{Store: f.store, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if !f.decrypts(t, f.svc, 1) || !cached(t, f.svc, f.id, 1) {
		t.Fatal("version 1 not decrypted and cached")
	}
	if _, err := other.ScheduleDestroy(ctx, f.id, 1, 7); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(7 * 24 * time.Hour)
	if done, err := other.DestroyDue(ctx, noEvent); err != nil || len(done) != 1 {
		t.Fatalf("destroy on the other node: %v, %v", done, err)
	}
	// This node's own sweep drops the KEK whatever its watch has seen.
	if done, err := f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 0 {
		t.Fatalf("sweep: %v, %v", done, err)
	}
	if cached(t, f.svc, f.id, 1) {
		t.Fatal("destroyed KEK still cached on the first node")
	}
	if f.decrypts(t, f.svc, 1) || !f.decrypts(t, f.svc, 2) {
		t.Fatal("first node: want only v2 to decrypt")
	}
}

// TestLifecycleRaces: two services on one store run the executors at the
// same moment; each keyring is rotated, and each version destroyed, once.
func TestLifecycleRaces(t *testing.T) {
	clock := newTestClock()
	f := newFixture(t, Config{Now: clock.Now})
	ctx := ctxT(t)
	other, err := New(Config{Store: f.store, Root: f.root, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	const n = 6
	var ids []KeyringID
	for i := range n {
		id := KeyringID{Tenant: "acme", Name: "k" + string(rune('a'+i))}
		ids = append(ids, id)
		if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
		if _, err := f.svc.SetRotationPeriod(ctx, id, MinRotationPeriod); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(MinRotationPeriod)
	race := func(run func(*Service) (int, error)) int {
		var wg sync.WaitGroup
		var mu sync.Mutex
		total := 0
		start := make(chan struct{})
		for _, svc := range []*Service{f.svc, other, f.svc, other} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				k, err := run(svc)
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				total += k
				mu.Unlock()
			}()
		}
		close(start)
		wg.Wait()
		return total
	}
	rotated := race(func(svc *Service) (int, error) {
		done, err := svc.RotateDue(ctx, noEvent)
		return len(done), err
	})
	if rotated != n {
		t.Fatalf("%d rotations reported for %d due keyrings", rotated, n)
	}
	for _, id := range ids {
		if k, err := f.svc.GetKeyring(ctx, id); err != nil || len(k.Versions) != 2 || k.Primary != 2 {
			t.Fatalf("keyring %s after the race: %+v, %v", id, k, err)
		}
		if _, err := f.svc.ScheduleDestroy(ctx, id, 1, 7); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(7 * 24 * time.Hour)
	destroyed := race(func(svc *Service) (int, error) {
		done, err := svc.DestroyDue(ctx, noEvent)
		return len(done), err
	})
	if destroyed != n {
		t.Fatalf("%d destructions reported for %d due versions", destroyed, n)
	}
}

// validRecord is a format 2 keyring record using every lifecycle field.
func validRecord() *keyringRecord {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	return &keyringRecord{
		Format: recordFormat, Tenant: "acme", Name: "disks", UID: make([]byte, 16), CreateTime: t0, Primary: 4,
		RotationPeriod: 30 * 24 * time.Hour, NextRotationTime: t0.Add(30 * 24 * time.Hour), MinDecryptionVersion: 2,
		Versions: []versionRecord{
			{Version: 1, State: "destroyed", CreateTime: t0, RootID: "r", DestroyTime: t0.Add(time.Hour)},
			{Version: 2, State: "destroy_scheduled", CreateTime: t0, RootID: "r", Wrapped: []byte{1}, DestroyTime: t0.Add(time.Hour)},
			{Version: 3, State: "disabled", CreateTime: t0, RootID: "r", Wrapped: []byte{1}},
			{Version: 4, State: "active", CreateTime: t0, RootID: "r", Wrapped: []byte{1}},
		},
	}
}

// markedRecord is validRecord in format 3: version 3, disabled, carries the
// compromised mark.
func markedRecord() *keyringRecord {
	r := validRecord()
	r.Format = recordFormatCompromised
	r.Versions[2].Compromised = true
	return r
}

func TestDecodeRecordInvariants(t *testing.T) {
	key := "keyrings/acme/disks"
	if _, err := decodeRecord(key, validRecord().encode()); err != nil {
		t.Fatalf("valid record refused: %v", err)
	}
	// What format 1 servers wrote still reads.
	v1 := []byte(`{"format":1,"tenant":"acme","name":"disks","uid":"AAAAAAAAAAAAAAAAAAAAAA==","create_time":"2030-01-01T00:00:00Z","primary":2,` +
		`"versions":[{"version":1,"state":"deactivated","create_time":"2030-01-01T00:00:00Z","root_id":"r","wrapped":"AQ=="},` +
		`{"version":2,"state":"active","create_time":"2030-01-01T00:00:00Z","root_id":"r","wrapped":"AQ=="}]}`)
	if r, err := decodeRecord(key, v1); err != nil || r.Primary != 2 || r.version(1).state() != StateDeactivated {
		t.Fatalf("format 1 record: %v", err)
	}
	// What servers before the compromised mark wrote still reads, and means
	// what it meant: a compromised version decrypts. Such a record is
	// written back in format 2.
	old := validRecord()
	old.Versions[2].State = "compromised"
	if r, err := decodeRecord(key, old.encode()); err != nil || !r.decrypts(r.version(3)) || r.format() != recordFormat {
		t.Fatalf("format 2 record with a compromised version: %v", err)
	}
	// The mark: reported compromised, never decrypting, written in format 3.
	r, err := decodeRecord(key, markedRecord().encode())
	if err != nil {
		t.Fatalf("format 3 record refused: %v", err)
	}
	if v := r.version(3); r.decrypts(v) || v.publicState() != StateCompromised || r.public().Versions[2].State != StateCompromised || r.format() != recordFormatCompromised {
		t.Fatalf("marked disabled version: decrypts %v, state %v, format %d", r.decrypts(v), v.publicState(), r.format())
	}
	for _, st := range []string{"destroy_scheduled", "destroyed"} {
		m := markedRecord()
		m.Versions[1].Compromised, m.Versions[0].Compromised = st == "destroy_scheduled", st == "destroyed"
		if _, err := decodeRecord(key, m.encode()); err != nil {
			t.Fatalf("marked %s version refused: %v", st, err)
		}
	}
	// A keyring destroyed as a whole has no active version, and that is fine.
	whole := validRecord()
	whole.Versions[3].State, whole.Versions[3].DestroyTime = "destroy_scheduled", whole.CreateTime
	if _, err := decodeRecord(key, whole.encode()); err != nil {
		t.Fatalf("keyring scheduled as a whole refused: %v", err)
	}
	for name, breakIt := range map[string]func(r *keyringRecord){
		"format 4":                   func(r *keyringRecord) { r.Format = 4 },
		"format 0":                   func(r *keyringRecord) { r.Format = 0 },
		"mark in format 2":           func(r *keyringRecord) { r.Versions[2].Compromised = true },
		"mark on the active version": func(r *keyringRecord) { r.Format = 3; r.Versions[3].Compromised = true },
		"mark on a compromised one": func(r *keyringRecord) {
			r.Format = 3
			r.Versions[2].State, r.Versions[2].Compromised = "compromised", true
		},
		"mark on a deactivated one": func(r *keyringRecord) {
			r.Format = 3
			r.Versions[2].State, r.Versions[2].Compromised = "deactivated", true
		},
		"mark on a pre-active one": func(r *keyringRecord) {
			r.Format, r.Primary, r.MinDecryptionVersion = 3, 3, 0
			r.Versions[2].State = "active"
			r.Versions[3].State, r.Versions[3].Compromised = "pre_active", true
		},
		"format 1 with a new state":  func(r *keyringRecord) { r.Format = 1 },
		"two active":                 func(r *keyringRecord) { r.Versions[2].State = "active" },
		"active not the primary":     func(r *keyringRecord) { r.Primary = 3; r.MinDecryptionVersion = 0 },
		"primary out of range":       func(r *keyringRecord) { r.Primary = 5 },
		"primary 0":                  func(r *keyringRecord) { r.Primary = 0 },
		"no versions":                func(r *keyringRecord) { r.Versions = nil },
		"destroyed with wrapped KEK": func(r *keyringRecord) { r.Versions[0].Wrapped = []byte{1} },
		"live without wrapped KEK":   func(r *keyringRecord) { r.Versions[2].Wrapped = nil },
		"scheduled without time":     func(r *keyringRecord) { r.Versions[1].DestroyTime = time.Time{} },
		"destroyed without time":     func(r *keyringRecord) { r.Versions[0].DestroyTime = time.Time{} },
		"disabled with destroy time": func(r *keyringRecord) { r.Versions[2].DestroyTime = r.CreateTime },
		"minimum above the primary":  func(r *keyringRecord) { r.MinDecryptionVersion = 5 },
		"period without next":        func(r *keyringRecord) { r.NextRotationTime = time.Time{} },
		"next without period":        func(r *keyringRecord) { r.RotationPeriod = 0 },
		"period of a minute":         func(r *keyringRecord) { r.RotationPeriod = time.Minute },
		"unknown state":              func(r *keyringRecord) { r.Versions[2].State = "pending" },
		"gap in versions":            func(r *keyringRecord) { r.Versions[2].Version = 7 },
	} {
		r := validRecord()
		breakIt(r)
		if _, err := decodeRecord(key, r.encode()); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzDecodeRecord: the store is not trusted. decodeRecord never panics,
// and what it accepts keeps the invariants the service relies on and reads
// back the same after encoding.
func FuzzDecodeRecord(f *testing.F) {
	f.Add(validRecord().encode())
	f.Add([]byte(`{"format":1,"tenant":"acme","name":"disks","uid":"AAAAAAAAAAAAAAAAAAAAAA==","primary":1,"versions":[{"version":1,"state":"active","wrapped":"AQ=="}]}`))
	f.Add([]byte(`{"format":2,"versions":[{"version":1,"state":"destroyed","wrapped":null}]}`))
	f.Add([]byte(`{"format":2,"primary":4294967295,"min_decryption_version":-1,"rotation_period":1e30}`))
	f.Add(markedRecord().encode())
	key := "keyrings/acme/disks"
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRecord(key, b)
		if err != nil {
			return
		}
		active := 0
		for i := range r.Versions {
			v := &r.Versions[i]
			if v.state() == StateActive {
				active++
			}
			if (v.state() == StateDestroyed) != (len(v.Wrapped) == 0) {
				t.Fatalf("version %d %s with %d wrapped bytes", v.Version, v.State, len(v.Wrapped))
			}
			if v.Compromised && (r.Format < recordFormatCompromised || r.decrypts(v) || v.state() == StateActive) {
				t.Fatalf("version %d %s marked compromised in format %d", v.Version, v.State, r.Format)
			}
		}
		if active > 1 || r.version(r.Primary) == nil {
			t.Fatalf("accepted %d active versions, primary %d", active, r.Primary)
		}
		if _, err := decodeRecord(key, r.encode()); err != nil {
			t.Fatalf("accepted record does not read back: %v", err)
		}
	})
}

// TestLifecycleContextCancel: the executors stop on a cancelled context
// without changing anything.
func TestLifecycleContextCancel(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, 7); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(8 * 24 * time.Hour)
	rev := f.rev(t)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if done, err := f.svc.DestroyDue(cctx, noEvent); err == nil || len(done) != 0 {
		t.Fatalf("DestroyDue on a cancelled context: %v, %v", done, err)
	}
	if f.rev(t) != rev {
		t.Fatal("record changed")
	}
}

// TestMarkCompromised: a compromised version never encrypts again (the
// primary is replaced in the same write), still decrypts so its envelopes
// can be rewrapped, cannot be enabled or disabled, and can be destroyed.
func TestMarkCompromised(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	k, err := f.svc.MarkCompromised(ctx, f.id, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateActive)
	if !f.decrypts(t, f.svc, 1) {
		t.Fatal("a compromised version must still decrypt, for rewrapping")
	}
	// The primary compromised: a fresh primary at once.
	rev := f.rev(t)
	k, err = f.svc.MarkCompromised(ctx, f.id, 2)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateCompromised, StateActive)
	if k.Primary != 3 || f.rev(t) == rev {
		t.Fatalf("primary %d after marking the primary compromised", k.Primary)
	}
	dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec)
	if err != nil || dk.KeyVersion != 3 {
		t.Fatalf("data key after the primary was compromised: v%d, %v", dk.KeyVersion, err)
	}
	moved, err := f.svc.ReEncrypt(ctx, f.id.Tenant, f.envs[1], f.ec, KeyringID{}, nil)
	if err != nil {
		t.Fatalf("rewrap off a compromised version: %v", err)
	}
	if info, _ := ParseEnvelopeInfo(moved); info.KeyVersion != 3 {
		t.Fatalf("rewrapped to v%d", info.KeyVersion)
	}
	// Again: nothing changes; enable and disable refused; destruction
	// allowed.
	rev = f.rev(t)
	if _, err := f.svc.MarkCompromised(ctx, f.id, 1); err != nil || f.rev(t) != rev {
		t.Fatalf("marking again: %v, or the record was rewritten", err)
	}
	if _, err := f.svc.EnableVersion(ctx, f.id, 1); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("enable a compromised version: %v", err)
	}
	if _, err := f.svc.DisableVersion(ctx, f.id, 1); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("disable a compromised version: %v", err)
	}
	if k, err = f.svc.ScheduleDestroy(ctx, f.id, 1, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDestroyScheduled, StateCompromised, StateActive)
	if _, err := f.svc.MarkCompromised(ctx, f.id, 1); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("marking a version scheduled for destruction: %v", err)
	}
	if _, err := f.svc.MarkCompromised(ctx, f.id, 9); !errors.Is(err, ErrNotFound) {
		t.Fatalf("version 9: %v", err)
	}
}

// TestPreActiveVersion: a staged version is stored and wrapped but neither
// encrypts nor decrypts until promoted; the next rotation promotes it
// rather than making another; one at a time.
func TestPreActiveVersion(t *testing.T) {
	f := newLifecycle(t, 1)
	ctx := ctxT(t)
	k, err := f.svc.AddVersion(ctx, f.id)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateActive, StatePreActive)
	if k.Primary != 1 {
		t.Fatalf("primary %d after staging", k.Primary)
	}
	if dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec); err != nil || dk.KeyVersion != 1 {
		t.Fatalf("data key while v2 is staged: v%d, %v", dk.KeyVersion, err)
	}
	if _, err := f.svc.AddVersion(ctx, f.id); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("a second staged version: %v", err)
	}
	if _, err := f.svc.PromoteVersion(ctx, f.id, 1); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("promoting the active version: %v", err)
	}
	if k, err = f.svc.PromoteVersion(ctx, f.id, 2); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDeactivated, StateActive)
	dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec)
	if err != nil || dk.KeyVersion != 2 {
		t.Fatalf("data key after promotion: v%d, %v", dk.KeyVersion, err)
	}
	if !f.decrypts(t, f.svc, 1) {
		t.Fatal("v1 stopped decrypting")
	}
	// A rotation with a staged version promotes it.
	if _, err := f.svc.AddVersion(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	if k, err = f.svc.RotateKeyring(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDeactivated, StateDeactivated, StateActive)
	if k.Primary != 3 {
		t.Fatalf("rotation with v3 staged made v%d primary", k.Primary)
	}
}
