package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// TestStoreMigrate moves a single node's bbolt state into a real etcd
// cluster with `coffrectl store migrate`, then a kms service on etcd with the
// same HSM root serves the migrated keyring and opens an envelope made
// before the move.
func TestStoreMigrate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	root := hsmtest.NewRoot(t)
	db := filepath.Join(t.TempDir(), "coffre.db")
	bolt, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := kms.New(kms.Config{Store: bolt, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := kms.ParseKeyringID("acme/disks")
	if _, err := svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	dk, err := svc.GenerateDataKey(ctx, id, map[string]string{"v": "1"})
	if err != nil {
		t.Fatal(err)
	}
	svc.Close()
	bolt.Close()

	cluster := etcdtest.StartCluster(t, 1)
	args := []string{"store", "migrate", "--from", "bbolt:" + db, "--to", "etcd:" + strings.Join(cluster.Endpoints(), ","), "--prefix", "/coffre-migrated/"}
	var out, errOut bytes.Buffer
	if code := run(ctx, args, &out, &errOut); code != 0 {
		t.Fatalf("migrate: exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "migrated and verified 1 keys") {
		t.Fatalf("migrate said %q", out.String())
	}
	// Run again: the destination is not empty, nothing is merged.
	out.Reset()
	errOut.Reset()
	if code := run(ctx, args, &out, &errOut); code == 0 || !strings.Contains(errOut.String(), "refusing to merge") {
		t.Fatalf("second migrate: exit %d: %s", code, errOut.String())
	}

	et, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-migrated/"})
	if err != nil {
		t.Fatal(err)
	}
	defer et.Close()
	svc2, err := kms.New(kms.Config{Store: et, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer svc2.Close()
	k, err := svc2.GetKeyring(ctx, id)
	if err != nil || k.Primary != 2 || len(k.Versions) != 2 {
		t.Fatalf("migrated keyring: %+v, %v", k, err)
	}
	got, err := svc2.Decrypt(ctx, "acme", dk.Envelope, map[string]string{"v": "1"})
	if err != nil || !bytes.Equal(got.Expose(), dk.Plaintext.Expose()) {
		t.Fatalf("envelope made before the migration: %v", err)
	}

	// Bad arguments are usage errors.
	for _, bad := range [][]string{
		{"store", "migrate", "--from", db, "--to", "etcd:x"},
		{"store", "migrate", "--from", "bbolt:" + db, "--to", "http://x"},
		{"store", "migrate", "--from", "bbolt:" + db, "--to", "etcd:x", "--etcd-ca", "ca.pem"},
	} {
		if code := run(ctx, bad, &out, &errOut); code != exitUsage {
			t.Errorf("%v: exit %d, want %d", bad, code, exitUsage)
		}
	}
}
