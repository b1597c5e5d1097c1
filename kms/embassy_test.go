package kms

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/ceremony"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
)

// TestDataEmbassy runs the whole data-embassy path with real parts: a
// recoverable root ceremony (2 of 3 custodians) imports the root into the
// primary's SoftHSM; the primary makes envelopes and exports a signed
// backup to the DR site's transfer key; the DR site, on another SoftHSM
// instance, restores the root from two custodians' shares, imports the
// backup and opens every envelope the primary made — its token named
// otherwise, through Config.RootAliases, then under its own ID after a root
// rotation. One share alone restores nothing.
func TestDataEmbassy(t *testing.T) {
	ctx := context.Background()
	const rootID = "pkcs11:token=coffre;object=root"

	var custodians []*seal.PrivateKey
	var pubs []*seal.PublicKey
	for range 3 {
		k, err := seal.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		custodians, pubs = append(custodians, k), append(pubs, k.Public())
	}
	secret, shares, err := ceremony.Split(ceremony.SplitOptions{RootID: rootID, Threshold: 2, Custodians: pubs, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}

	// The primary site.
	primaryHSM := hsmtest.NewSoftHSM(t)
	pin := primaryHSM.NewToken(t, "coffre")
	root, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: primaryHSM.RootURI("coffre", "root", pin)}, secret.Bytes())
	secret.Destroy()
	if err != nil {
		t.Fatal(err)
	}
	if root.ID() != rootID {
		t.Fatalf("root id %s, want %s", root.ID(), rootID)
	}
	primaryStore, err := store.OpenBolt(filepath.Join(t.TempDir(), "primary.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer primaryStore.Close()
	svc, err := New(Config{Store: primaryStore, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	type made struct {
		tenant string
		env    []byte
		key    []byte
		ec     map[string]string
	}
	var envelopes []made
	for _, name := range []string{"qc/volumes", "lu/archive"} {
		id, _ := ParseKeyringID(name)
		if _, err := svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
		for v := range 3 {
			ec := map[string]string{"volume": name, "n": string(rune('a' + v))}
			dk, err := svc.GenerateDataKey(ctx, id, ec)
			if err != nil {
				t.Fatal(err)
			}
			envelopes = append(envelopes, made{id.Tenant, dk.Envelope, bytes.Clone(dk.Plaintext.Expose()), ec})
			if _, err := svc.RotateKeyring(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	}
	transfer, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	signer, err := audit.GenerateSigner("primary")
	if err != nil {
		t.Fatal(err)
	}
	backup, err := ExportBackup(ctx, primaryStore, ExportOptions{To: transfer.Public(), Signer: signer, Origin: "coffre.primary.example"})
	if err != nil {
		t.Fatal(err)
	}
	// The primary closes its HSM, so that this process's SoftHSM library
	// can be initialised again on the DR site's instance.
	svc.Close()
	if err := root.Close(); err != nil {
		t.Fatal(err)
	}

	// The DR site: another SoftHSM instance, an empty token of the same
	// name, and two custodians.
	drHSM := hsmtest.NewSoftHSM(t)
	drPIN := drHSM.NewToken(t, "embassy-lu")
	drURI := drHSM.RootURI("embassy-lu", "root", drPIN)
	one, err := shares[1].Open(custodians[1])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ceremony.Combine([]*ceremony.OpenedShare{one}); !errors.Is(err, ceremony.ErrTooFewShares) {
		t.Fatalf("one share of a 2-of-3: %v, want ErrTooFewShares", err)
	}
	three, err := shares[2].Open(custodians[2])
	if err != nil {
		t.Fatal(err)
	}
	restored, err := ceremony.Combine([]*ceremony.OpenedShare{three, one})
	if err != nil {
		t.Fatal(err)
	}
	drRoot, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: drURI}, restored.Bytes())
	restored.Destroy()
	if err != nil {
		t.Fatal(err)
	}
	defer drRoot.Close()
	drStore, err := store.OpenBolt(filepath.Join(t.TempDir(), "dr.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer drStore.Close()
	sum, err := ImportBackup(ctx, drStore, backup, ImportOptions{Key: transfer, Trusted: []*audit.Verifier{signer.Verifier()}})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Written == 0 || sum.Signer != "primary" {
		t.Fatalf("import summary %+v", sum)
	}
	// The DR HSM names its token otherwise: without an alias the versions,
	// recorded under the primary's root ID, are refused; with it they open.
	unaliased, err := New(Config{Store: drStore, Root: drRoot})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unaliased.Decrypt(ctx, envelopes[0].tenant, envelopes[0].env, envelopes[0].ec); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("DR without the root alias: %v, want ErrFailedPrecondition", err)
	}
	unaliased.Close()
	dr, err := New(Config{Store: drStore, Root: drRoot, RootAliases: []string{rootID}})
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close()
	for i, m := range envelopes {
		got, err := dr.Decrypt(ctx, m.tenant, m.env, m.ec)
		if err != nil {
			t.Fatalf("envelope %d at the DR site: %v", i, err)
		}
		if !bytes.Equal(got.Expose(), m.key) {
			t.Fatalf("envelope %d opened to another key", i)
		}
	}
	// The versions recorded under the alias are counted under the root
	// that unwraps them here: nothing shows the DR root unused.
	if u, err := dr.RootUsage(ctx); err != nil || len(u) != 1 || u[drRoot.ID()] != 8 {
		t.Fatalf("RootUsage at the DR site: %v, %v; want 8 under %s", u, err, drRoot.ID())
	}
	// A root rotation at the DR site moves every version to the DR root's
	// own ID; the alias is then no longer needed.
	rot, err := dr.RotateRoot(ctx, nil)
	if err != nil || rot.Rewrapped != 8 { // 2 keyrings × versions 1..4
		t.Fatalf("root rotation at the DR site: %+v, %v", rot, err)
	}
	dr2, err := New(Config{Store: drStore, Root: drRoot})
	if err != nil {
		t.Fatal(err)
	}
	defer dr2.Close()
	for i, m := range envelopes {
		if got, err := dr2.Decrypt(ctx, m.tenant, m.env, m.ec); err != nil || !bytes.Equal(got.Expose(), m.key) {
			t.Fatalf("envelope %d after the DR root rotation: %v", i, err)
		}
	}
}
