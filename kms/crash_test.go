package kms

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/store"
)

// TestRotationCrash kills a process with SIGKILL in the middle of KEK
// rotations, again and again, and checks after each kill that the keyring
// has exactly one active version, versions numbered without gaps, at least
// every acknowledged rotation, and that every version still unwraps in the
// HSM.
func TestRotationCrash(t *testing.T) {
	hs := hsmtest.NewSoftHSM(t)
	pin := hs.NewToken(t, "crash")
	uri := hs.RootURI("crash", "root", pin)
	ctx := ctxT(t)
	root, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	db := filepath.Join(t.TempDir(), "coffre.db")
	id := mustID(t, "acme/disks")
	withService(t, db, root, func(svc *Service) {
		if _, err := svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	})

	acked := uint32(1)
	for round := range 10 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRotationCrashChild$")
		cmd.Env = append(os.Environ(), "COFFRE_CRASH_DB="+db, "COFFRE_CRASH_ROOT="+uri)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Let it acknowledge a few rotations, then kill it at a random
		// moment, usually in the middle of the next one.
		lines := bufio.NewScanner(out)
		want := 1 + rand.IntN(4)
		for n := 0; n < want && lines.Scan(); n++ {
			var v uint32
			if _, err := fmt.Sscanf(lines.Text(), "rotated to %d", &v); err != nil {
				t.Fatalf("child said %q", lines.Text())
			}
			acked = v
		}
		time.Sleep(time.Duration(rand.IntN(20_000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for lines.Scan() { // acknowledged before the kill landed
			fmt.Sscanf(lines.Text(), "rotated to %d", &acked)
		}
		cmd.Wait()

		withService(t, db, root, func(svc *Service) {
			k, err := svc.GetKeyring(ctx, id) // refuses a record with ≠1 active version
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			active := 0
			for i, v := range k.Versions {
				if v.Version != uint32(i+1) {
					t.Fatalf("round %d: versions %+v", round, k.Versions)
				}
				if v.State == StateActive {
					active++
				}
			}
			if active != 1 || k.Primary < acked || k.Primary > acked+1 {
				t.Fatalf("round %d: %d active, primary %d, acknowledged %d", round, active, k.Primary, acked)
			}
			rec, _, err := svc.read(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			for i := range rec.Versions {
				if err := svc.withKEK(ctx, rec, &rec.Versions[i], func([]byte) error { return nil }); err != nil {
					t.Fatalf("round %d: version %d does not unwrap: %v", round, i+1, err)
				}
			}
			acked = k.Primary
		})
	}
	t.Logf("10 kills; keyring at version %d", acked)
}

func withService(t *testing.T, db string, root *pkcs11.Root, f func(*Service)) {
	t.Helper()
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	svc, err := New(Config{Store: st, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	f(svc)
}

// TestRotationCrashChild is the process TestRotationCrash kills: it rotates
// in a loop and reports each acknowledged rotation.
func TestRotationCrashChild(t *testing.T) {
	db, uri := os.Getenv("COFFRE_CRASH_DB"), os.Getenv("COFFRE_CRASH_ROOT")
	if db == "" {
		t.Skip("helper process of TestRotationCrash, run only by it")
	}
	ctx := context.Background()
	root, err := pkcs11.Open(ctx, pkcs11.Config{URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(db, store.BoltOptions{LockTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(Config{Store: st, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	id := KeyringID{Tenant: "acme", Name: "disks"}
	for {
		k, err := svc.RotateKeyring(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("rotated to %d\n", k.Primary)
	}
}
