package kms

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

// refusesEnableDisable fails the test unless version v of f's keyring is
// compromised and both EnableVersion and DisableVersion refuse it without
// writing.
func (f *lifecycleFixture) refusesEnableDisable(t *testing.T, v uint32) {
	t.Helper()
	ctx := ctxT(t)
	rev := f.rev(t)
	if _, err := f.svc.EnableVersion(ctx, f.id, v); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("enable compromised v%d: %v", v, err)
	}
	if _, err := f.svc.DisableVersion(ctx, f.id, v); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("disable compromised v%d: %v", v, err)
	}
	if f.rev(t) != rev {
		t.Fatal("record rewritten by a refused enable or disable")
	}
}

// TestCompromisedSurvivesCancel: scheduling a compromised version's
// destruction and cancelling it leaves it compromised, not disabled; it
// cannot be enabled, and no longer decrypts (what a compromised version may
// do only shrinks). Before the fix the cancel made it plain disabled and
// EnableVersion made it deactivated: the mark was gone.
func TestCompromisedSurvivesCancel(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	if _, err := f.svc.MarkCompromised(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
	if !f.decrypts(t, f.svc, 1) {
		t.Fatal("compromised v1 does not decrypt for rewrapping")
	}
	k, err := f.svc.ScheduleDestroy(ctx, f.id, 1, MinDestroyDays)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDestroyScheduled, StateActive)
	if k, err = f.svc.CancelDestroy(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateActive)
	f.refusesEnableDisable(t, 1)
	if f.decrypts(t, f.svc, 1) || cached(t, f.svc, f.id, 1) {
		t.Fatal("compromised v1 decrypts, or stays cached, after a cancelled destruction")
	}
	// The same on a node that reads the record from the store, and again
	// after a whole-keyring schedule and cancel.
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.CancelDestroy(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	other, err := New(Config{Store: f.store, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	k, err = other.GetKeyring(ctx, f.id)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateDisabled)
	if f.decrypts(t, other, 1) {
		t.Fatal("another node decrypts compromised v1")
	}
	f.refusesEnableDisable(t, 1)
	// Marking again changes nothing; destruction still works.
	rev := f.rev(t)
	if _, err := f.svc.MarkCompromised(ctx, f.id, 1); err != nil || f.rev(t) != rev {
		t.Fatalf("marking again: %v, or the record was rewritten", err)
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(MinDestroyDays * 24 * time.Hour)
	if done, err := f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 1 || done[0].Version != 1 {
		t.Fatalf("destroy compromised v1: %+v, %v", done, err)
	}
	k, _ = f.svc.GetKeyring(ctx, f.id)
	f.want(t, k, StateDestroyed, StateDisabled)
}

// TestCompromisedPrimaryNeverEncrypts: a disabled primary (after a
// cancelled destruction of the whole keyring) marked compromised is
// replaced at once by a fresh primary, disabled too so that marking does
// not restart encryption; the compromised version can never be enabled
// again and no data key is ever issued under it. Before the fix it stayed
// the primary, and schedule/cancel/enable made it active.
func TestCompromisedPrimaryNeverEncrypts(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.CancelDestroy(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	k, err := f.svc.MarkCompromised(ctx, f.id, 2)
	if err != nil {
		t.Fatal(err)
	}
	if k.Primary != 3 {
		t.Fatalf("compromised v2 is still the primary (primary v%d)", k.Primary)
	}
	f.want(t, k, StateDisabled, StateCompromised, StateDisabled)
	if _, err := f.svc.GenerateDataKey(ctx, f.id, f.ec); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("marking restarted encryption: %v", err)
	}
	if f.decrypts(t, f.svc, 2) {
		t.Fatal("v2, disabled when marked, decrypts")
	}
	// The reviewer's sequence: schedule and cancel the keyring again, then
	// try to enable the compromised version.
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 0, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	if k, err = f.svc.CancelDestroy(ctx, f.id, 0); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateCompromised, StateDisabled)
	f.refusesEnableDisable(t, 2)
	if k, err = f.svc.EnableVersion(ctx, f.id, 3); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateCompromised, StateActive)
	dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec)
	if err != nil || dk.KeyVersion != 3 {
		t.Fatalf("data key after enabling the new primary: %+v, %v", dk, err)
	}
	// An active compromised primary is still replaced by an active one.
	if k, err = f.svc.MarkCompromised(ctx, f.id, 3); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateDisabled, StateCompromised, StateCompromised, StateActive)
	if dk, err := f.svc.GenerateDataKey(ctx, f.id, f.ec); err != nil || dk.KeyVersion != 4 {
		t.Fatalf("data key after marking the active primary: %+v, %v", dk, err)
	}
}

// TestCompromisedDisabledStaysShut: marking a disabled version, or a staged
// pre-active one, compromised does not make it decrypt; neither can be
// enabled, and a rotation does not promote the staged one. Before the fix
// the disabled version decrypted again once marked.
func TestCompromisedDisabledStaysShut(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	if _, err := f.svc.DisableVersion(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
	k, err := f.svc.MarkCompromised(ctx, f.id, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateActive)
	if f.decrypts(t, f.svc, 1) || cached(t, f.svc, f.id, 1) {
		t.Fatal("disabled v1 decrypts, or is cached, once marked compromised")
	}
	f.refusesEnableDisable(t, 1)
	if _, err := f.svc.ReEncrypt(ctx, f.id.Tenant, f.envs[0], f.ec, KeyringID{}, nil); err != ErrDecrypt {
		t.Fatalf("rewrap off a compromised version that was disabled: %v", err)
	}

	if _, err := f.svc.AddVersion(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	if k, err = f.svc.MarkCompromised(ctx, f.id, 3); err != nil {
		t.Fatal(err)
	}
	f.want(t, k, StateCompromised, StateActive, StateCompromised)
	f.refusesEnableDisable(t, 3)
	if _, err := f.svc.PromoteVersion(ctx, f.id, 3); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("promote a compromised staged version: %v", err)
	}
	if k, err = f.svc.RotateKeyring(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	if k.Primary != 4 {
		t.Fatalf("rotation made v%d the primary, want a fresh v4", k.Primary)
	}
	f.want(t, k, StateCompromised, StateDeactivated, StateCompromised, StateActive)
}

// TestRotateDueStagedVersion: a scheduled rotation that promotes a staged
// version announces (audits) that version, not one past the newest. Before
// the fix the event named version 3 of a keyring of two.
func TestRotateDueStagedVersion(t *testing.T) {
	f := newLifecycle(t, 1)
	ctx := ctxT(t)
	k, err := f.svc.SetRotationPeriod(ctx, f.id, MinRotationPeriod)
	if err != nil {
		t.Fatal(err)
	}
	due := k.NextRotationTime
	if _, err := f.svc.AddVersion(ctx, f.id); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(MinRotationPeriod)
	var announced []RotateEvent
	done, err := f.svc.RotateDue(ctx, func(ev RotateEvent) error { announced = append(announced, ev); return nil })
	want := RotateEvent{Keyring: f.id, Version: 2, Previous: 1, Due: due}
	if err != nil || len(done) != 1 || done[0] != want || len(announced) != 1 || announced[0] != want {
		t.Fatalf("rotation of a staged version: announced %+v, returned %+v, %v; want %+v", announced, done, err, want)
	}
	k, _ = f.svc.GetKeyring(ctx, f.id)
	if k.Primary != 2 || len(k.Versions) != 2 {
		t.Fatalf("after the rotation: primary v%d of %d versions", k.Primary, len(k.Versions))
	}
}

// TestCompromisedLegacyPrimary: a format 2 record that servers before the
// fix could write — the primary in state compromised after MarkCompromised
// of a disabled primary — still reads, never encrypts, and marking the
// version again replaces it as the primary (disabled, as the compromised
// one encrypted nothing).
func TestCompromisedLegacyPrimary(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	kv, err := f.store.Get(ctx, keyringKey(f.id))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := decodeRecord(kv.Key, kv.Value)
	if err != nil {
		t.Fatal(err)
	}
	rec.Versions[1].State = StateCompromised.String()
	if _, err := f.store.CompareAndSwap(ctx, kv.Key, kv.Revision, rec.encode()); err != nil {
		t.Fatal(err)
	}
	other, err := New(Config{Store: f.store, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.GenerateDataKey(ctx, f.id, f.ec); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("data key under a compromised primary: %v", err)
	}
	if !f.decrypts(t, other, 2) {
		t.Fatal("a format 2 compromised version no longer decrypts")
	}
	k, err := other.MarkCompromised(ctx, f.id, 2)
	if err != nil {
		t.Fatal(err)
	}
	if k.Primary != 3 {
		t.Fatalf("compromised v2 is still the primary (primary v%d)", k.Primary)
	}
	f.want(t, k, StateDeactivated, StateCompromised, StateDisabled)
	if kv, err := f.store.Get(ctx, keyringKey(f.id)); err != nil || !bytes.Contains(kv.Value, []byte(`"format":2`)) {
		t.Fatal("a record without the compromised field was not written in format 2")
	}
}
