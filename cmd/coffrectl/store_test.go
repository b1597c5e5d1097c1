package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
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

// TestStoreMigrateRefusals: store migrate refuses a source that is not an
// existing, non-empty store (creating nothing: bbolt would make a missing
// file), and etcd endpoints that would not be protected as the flags say;
// over mutual TLS 1.3 to a real etcd it migrates.
func TestStoreMigrateRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cluster := etcdtest.StartClusterWith(t, 1, etcdtest.Options{TLS: true})
	ca, cert, key := cluster.TLSFiles()
	to := "etcd:" + strings.Join(cluster.Endpoints(), ",")
	tlsFlags := []string{"--etcd-ca", ca, "--etcd-cert", cert, "--etcd-key", key}
	dir := t.TempDir()
	migrateArgs := func(from, to string, extra ...string) []string {
		return append([]string{"store", "migrate", "--from", "bbolt:" + from, "--to", to, "--prefix", "/coffre/"}, extra...)
	}

	emptyStore := filepath.Join(dir, "empty.db")
	st, err := store.OpenBolt(emptyStore, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	emptyFile := filepath.Join(dir, "zero.db")
	if err := os.WriteFile(emptyFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "cofre.db") // a typo
	keyPEM, err := os.ReadFile(key)
	if err != nil {
		t.Fatal(err)
	}
	looseKey := filepath.Join(dir, "loose-key.pem")
	if err := os.WriteFile(looseKey, keyPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		args     []string
		code     int
		inStderr string
	}{
		{"missing source", migrateArgs(missing, to, tlsFlags...), exitError, "does not exist"},
		{"source a directory", migrateArgs(dir, to, tlsFlags...), exitError, "not a regular file"},
		{"source an empty file", migrateArgs(emptyFile, to, tlsFlags...), exitError, "empty file"},
		{"source without keys", migrateArgs(emptyStore, to, tlsFlags...), exitError, "holds no keys"},
		{"http endpoint with TLS", migrateArgs(emptyStore, "etcd:"+strings.Replace(cluster.Endpoint(0), "https://", "http://", 1), tlsFlags...), exitUsage, "plaintext"},
		{"http endpoint after https with TLS", migrateArgs(emptyStore, to+",http://127.0.0.1:1", tlsFlags...), exitUsage, "plaintext"},
		{"https endpoint without TLS", migrateArgs(emptyStore, to), exitUsage, "no TLS configuration"},
		{"missing source, bad endpoint", migrateArgs(missing, "etcd:http://10.0.0.1:2379"), exitUsage, "not on loopback"},
		{"client key readable by others", migrateArgs(emptyStore, to, "--etcd-ca", ca, "--etcd-cert", cert, "--etcd-key", looseKey), exitError, "chmod 600"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := run(ctx, tc.args, &out, &errOut); code != tc.code || !strings.Contains(errOut.String(), tc.inStderr) {
				t.Errorf("exit %d, want %d; stdout %q; stderr %q, want %q", code, tc.code, out.String(), errOut.String(), tc.inStderr)
			}
		})
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the missing source was created: %v", err)
	}
	dst, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre/", TLS: cluster.ClientTLS()})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if kvs, err := dst.List(ctx, ""); err != nil || len(kvs) != 0 {
		t.Fatalf("destination after the refusals: %d keys, %v", len(kvs), err)
	}

	// A real store migrates over mutual TLS.
	src := filepath.Join(dir, "coffre.db")
	st, err = store.OpenBolt(src, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Put(ctx, "keyrings/acme/disks", []byte("v")); err != nil {
		t.Fatal(err)
	}
	st.Close()
	var out, errOut bytes.Buffer
	if code := run(ctx, migrateArgs(src, to, tlsFlags...), &out, &errOut); code != 0 || !strings.Contains(out.String(), "migrated and verified 1 keys") {
		t.Fatalf("migrate over TLS: exit %d: %s%s", code, out.String(), errOut.String())
	}
	if kv, err := dst.Get(ctx, "keyrings/acme/disks"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("migrated key: %+v, %v", kv, err)
	}

	// The etcd client configuration asks for TLS 1.3.
	cfg, err := etcdTLS(ca, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MinVersion != tls.VersionTLS13 {
		t.Fatalf("etcdTLS: MinVersion %#x, want TLS 1.3", cfg.MinVersion)
	}
}

// TestAuditVerifyReplica: a node's audit log replicated to a real etcd is
// verified from etcd alone with `coffrectl audit verify --store`, and an
// entry altered in etcd is caught, named by index.
func TestAuditVerifyReplica(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cluster := etcdtest.StartCluster(t, 1)
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-audit/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	signer, err := audit.GenerateSigner("node-1")
	if err != nil {
		t.Fatal(err)
	}
	pub := filepath.Join(t.TempDir(), "verifier.pub")
	if err := os.WriteFile(pub, signer.Verifier().Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(audit.Options{Dir: t.TempDir(), Node: "node-1", Origin: "test/node-1", Signer: signer, Replicator: kms.StoreAuditReplica{Store: st}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"}, Operation: "test.op", Decision: audit.Allow, Reason: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil { // final checkpoint, replicated
		t.Fatal(err)
	}
	args := []string{"audit", "verify", "--store", "etcd:" + strings.Join(cluster.Endpoints(), ","), "--prefix", "/coffre-audit/", "--node", "node-1", "--verifier", pub}
	var out, errOut bytes.Buffer
	if code := run(ctx, args, &out, &errOut); code != 0 || !strings.Contains(out.String(), "audit log of node node-1 (replicated) verified: 20 entries") {
		t.Fatalf("verify: exit %d: %s%s", code, out.String(), errOut.String())
	}

	// Alter one entry's operation in etcd, keeping it canonical and the
	// batch well-formed (a Zstandard frame after its format byte 2).
	kvs, err := st.List(ctx, "audit/node-1/entries/")
	if err != nil || len(kvs) == 0 {
		t.Fatalf("replicated batches: %v, %v", kvs, err)
	}
	kv := kvs[len(kvs)-1]
	zr, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	body, err := zr.DecodeAll(kv.Value[1:], nil)
	if kv.Value[0] != 2 || err != nil {
		t.Fatalf("replicated batch: format %d: %v", kv.Value[0], err)
	}
	alteredBody := bytes.Replace(body, []byte(`"test.op"`), []byte(`"tset.op"`), 1)
	if bytes.Equal(alteredBody, body) {
		t.Fatal("test did not alter the batch")
	}
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	altered := zw.EncodeAll(alteredBody, []byte{2})
	if _, err := st.Put(ctx, kv.Key, altered); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	errOut.Reset()
	if code := run(ctx, args, &out, &errOut); code != exitError || !strings.Contains(errOut.String(), `does not verify: node "node-1": fork at size`) {
		t.Fatalf("verify of an altered replica: exit %d: %s%s", code, out.String(), errOut.String())
	}
	if code := run(ctx, []string{"audit", "verify", "--store", "etcd:x", "--dir", t.TempDir(), "--verifier", pub}, &out, &errOut); code != exitUsage {
		t.Fatalf("--store and --dir without --node: exit %d", code)
	}
}
