package kms

import (
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
)

// TestLifecycleRoundAudits runs the server's lifecycle round against a
// real audit log: a due rotation and a due destruction each leave an entry
// naming the keyring and version before they happen; with the log closed
// (unwritable), nothing happens.
func TestLifecycleRoundAudits(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	signer, err := audit.GenerateSigner("test")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "audit")
	open := func() *audit.Log {
		l, err := audit.Open(audit.Options{Dir: dir, Node: "n1", Origin: "test", Signer: signer})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, MinDestroyDays); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.SetRotationPeriod(ctx, f.id, MinRotationPeriod); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(MinDestroyDays*24*time.Hour + time.Minute)
	logger := slog.New(slog.DiscardHandler)

	// The log cannot be written: neither the destruction nor the rotation
	// happens.
	closed := open()
	closed.Close()
	f.svc.LifecycleRound(ctx, closed, logger)
	k, err := f.svc.GetKeyring(ctx, f.id)
	if err != nil || k.Versions[0].State != StateDestroyScheduled || len(k.Versions) != 2 {
		t.Fatalf("with the audit log closed: %+v %v", k, err)
	}

	log := open()
	defer log.Close()
	f.svc.LifecycleRound(ctx, log, logger)
	k, err = f.svc.GetKeyring(ctx, f.id)
	if err != nil || k.Versions[0].State != StateDestroyed || len(k.Versions) != 3 || k.Primary != 3 {
		t.Fatalf("after the round: %+v %v", k, err)
	}
	if _, err := f.svc.Decrypt(ctx, f.id.Tenant, f.envs[0], f.ec); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("envelope under the destroyed version: %v", err)
	}
	recs, err := log.Read(ctx, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, r := range recs {
		ops = append(ops, r.Entry.Operation+":"+r.Entry.Keyring)
		if r.Entry.Operation == "lifecycle.destroy" && (r.Entry.KeyVersion != 1 || !strings.Contains(r.Entry.Reason, "crypto-shred")) {
			t.Errorf("destroy entry %+v", r.Entry)
		}
	}
	if strings.Join(ops, " ") != "lifecycle.rotate:acme/disks lifecycle.destroy:acme/disks" {
		t.Errorf("audit entries %q", ops)
	}
}
