package server

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/coffre-kms/coffre/kms"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// TestLifecycleOverGRPC drives the single-admin lifecycle calls and the
// quorum-gated destruction through AdminService.
func TestLifecycleOverGRPC(t *testing.T) {
	f := newFixture(t)
	ctx := callCtx(t)
	admin := f.gated(t)
	if _, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RotateKeyring(ctx, &coffrev1.RotateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatal(err)
	}
	v1 := &coffrev1.KeyVersionRequest{Keyring: "acme/disks", Version: 1}
	k, err := admin.DisableKeyVersion(ctx, v1)
	if err != nil || k.GetVersions()[0].GetState() != coffrev1.KeyState_KEY_STATE_DISABLED {
		t.Fatalf("disable: %v %v", k, err)
	}
	_, err = admin.DisableKeyVersion(ctx, &coffrev1.KeyVersionRequest{Keyring: "acme/disks", Version: 2})
	wantCode(t, err, codes.FailedPrecondition, "rotate first")
	if k, err = admin.EnableKeyVersion(ctx, v1); err != nil || k.GetVersions()[0].GetState() != coffrev1.KeyState_KEY_STATE_DEACTIVATED {
		t.Fatalf("enable: %v %v", k, err)
	}
	if k, err = admin.SetRotationPeriod(ctx, &coffrev1.SetRotationPeriodRequest{Keyring: "acme/disks", PeriodSeconds: 30 * 24 * 3600}); err != nil ||
		k.GetRotationPeriodSeconds() != 30*24*3600 || k.GetNextRotationTime() == nil {
		t.Fatalf("rotation period: %v %v", k, err)
	}
	_, err = admin.SetRotationPeriod(ctx, &coffrev1.SetRotationPeriodRequest{Keyring: "acme/disks", PeriodSeconds: 60})
	wantCode(t, err, codes.InvalidArgument, "")
	if k, err = admin.SetMinDecryptionVersion(ctx, &coffrev1.KeyVersionRequest{Keyring: "acme/disks", Version: 2}); err != nil || k.GetMinDecryptionVersion() != 2 {
		t.Fatalf("min decryption version: %v %v", k, err)
	}
	if _, err = admin.SetMinDecryptionVersion(ctx, &coffrev1.KeyVersionRequest{Keyring: "acme/disks", Version: 1}); err != nil {
		t.Fatal(err)
	}

	// Destruction is a proposal; with this fixture's 1-of-1 quorum it runs
	// at once.
	var sched coffrev1.Keyring
	err = admin.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_ScheduleKeyDestruction{ScheduleKeyDestruction: &coffrev1.ScheduleKeyDestructionRequest{Keyring: "acme/disks", Version: 1, Days: 7}}}, &sched)
	if err != nil || sched.GetVersions()[0].GetState() != coffrev1.KeyState_KEY_STATE_DESTROY_SCHEDULED || sched.GetVersions()[0].GetDestroyTime() == nil {
		t.Fatalf("schedule destruction: %v %v", &sched, err)
	}
	_, err = admin.Propose(ctx, &coffrev1.ProposeRequest{Operation: &coffrev1.Operation{Op: &coffrev1.Operation_ScheduleKeyDestruction{ScheduleKeyDestruction: &coffrev1.ScheduleKeyDestructionRequest{Keyring: "acme/disks", Version: 1, Days: 31}}}})
	wantCode(t, err, codes.InvalidArgument, "7 to 30 days")
	if k, err = admin.CancelKeyDestruction(ctx, v1); err != nil || k.GetVersions()[0].GetState() != coffrev1.KeyState_KEY_STATE_DISABLED {
		t.Fatalf("cancel: %v %v", k, err)
	}
}

// TestRewrapEnvelope moves an envelope to its keyring's primary version
// through AdminService: same data key, newer version, never another keyring.
func TestRewrapEnvelope(t *testing.T) {
	f := newFixture(t)
	ctx := callCtx(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	id, _ := kms.ParseKeyringID("acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	ec := map[string]string{"volume": "v1"}
	dk, err := f.svc.GenerateDataKey(ctx, id, ec)
	if err != nil {
		t.Fatal(err)
	}
	same, err := admin.RewrapEnvelope(ctx, &coffrev1.RewrapEnvelopeRequest{Tenant: "acme", Envelope: dk.Envelope, Context: ec})
	if err != nil || same.GetChanged() || !bytes.Equal(same.GetEnvelope(), dk.Envelope) {
		t.Fatalf("rewrap under the primary: %v %v", same, err)
	}
	if _, err := f.svc.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	moved, err := admin.RewrapEnvelope(ctx, &coffrev1.RewrapEnvelopeRequest{Tenant: "acme", Envelope: dk.Envelope, Context: ec})
	if err != nil || !moved.GetChanged() || moved.GetKeyVersion() != 2 {
		t.Fatalf("rewrap: %v %v", moved, err)
	}
	got, err := f.svc.Decrypt(ctx, "acme", moved.GetEnvelope(), ec)
	if err != nil || !bytes.Equal(got.Expose(), dk.Plaintext.Expose()) {
		t.Fatalf("rewrapped envelope: %v", err)
	}
	info, _ := kms.ParseEnvelopeInfo(moved.GetEnvelope())
	if info.Keyring != id {
		t.Fatalf("rewrapped into %v", info.Keyring)
	}
	_, err = admin.RewrapEnvelope(ctx, &coffrev1.RewrapEnvelopeRequest{Tenant: "acme", Envelope: dk.Envelope, Context: map[string]string{"volume": "v2"}})
	wantCode(t, err, codes.InvalidArgument, "decryption failed")
	_, err = admin.RewrapEnvelope(ctx, &coffrev1.RewrapEnvelopeRequest{Tenant: "other", Envelope: dk.Envelope, Context: ec})
	wantCode(t, err, codes.InvalidArgument, "another tenant")
}
