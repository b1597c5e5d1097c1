package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), args, &o, &e)
	return code, o.String(), e.String()
}

// TestBackupImportCLI runs the DR side of the data-embassy flow through
// the command line: make the transfer key, receive a backup made for it,
// inspect it, import it into a bbolt store (twice: the second is a no-op),
// and refuse it under a wrong passphrase or an untrusted signer.
func TestBackupImportCLI(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	pass := filepath.Join(dir, "pass")
	if err := os.WriteFile(pass, []byte("correct horse battery\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, "dr.key")

	code, out, errOut := runCLI(t, "backup", "keygen", "--out", keyPath, "--passphrase-file", pass)
	if code != exitOK {
		t.Fatalf("keygen: %d %s", code, errOut)
	}
	pub, err := seal.ParsePublicKey(out)
	if err != nil {
		t.Fatalf("keygen printed %q: %v", out, err)
	}
	if b, err := os.ReadFile(keyPath + ".pub"); err != nil || strings.TrimSpace(string(b)) != pub.String() {
		t.Fatalf("%s.pub: %q, %v", keyPath, b, err)
	}
	if fi, err := os.Stat(keyPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %v", fi, err)
	}
	if b, _ := os.ReadFile(keyPath); !bytes.Contains(b, []byte("BEGIN COFFRE TRANSFER KEY")) {
		t.Fatalf("key file is not a transfer key file:\n%s", b)
	}
	if code, _, errOut := runCLI(t, "backup", "keygen", "--out", keyPath, "--passphrase-file", pass); code != exitError || !strings.Contains(errOut, "refusing to overwrite") {
		t.Fatalf("keygen over an existing key: %d %s", code, errOut)
	}

	// The primary: a keyring and a class, exported to the DR key.
	src, err := store.OpenBolt(filepath.Join(dir, "primary.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	svc, err := kms.New(kms.Config{Store: src, Root: hsmtest.NewRoot(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	id, _ := kms.ParseKeyringID("acme/disks")
	if _, err := svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	rel, err := kms.NewReleaseService(svc, kms.ReleaseConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer rel.Close()
	if _, err := rel.SetNodeClass(ctx, &kms.NodeClass{Name: "storage", PCRs: map[uint32][]byte{7: make([]byte, 32)}}); err != nil {
		t.Fatal(err)
	}
	signer, err := audit.GenerateSigner("primary.example")
	if err != nil {
		t.Fatal(err)
	}
	data, err := kms.ExportBackup(ctx, src, kms.ExportOptions{To: pub, Signer: signer, Origin: "paris-1", Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	backupPath := filepath.Join(dir, "paris.backup")
	var o bytes.Buffer
	if err := writeExportedBackup(&env{stdout: &o}, backupPath, data); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(o.String(), "origin     paris-1") {
		t.Fatalf("export output:\n%s", o.String())
	}
	if err := writeExportedBackup(&env{stdout: &o}, backupPath, data); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("export over an existing file: %v", err)
	}
	if err := writeExportedBackup(&env{stdout: &o}, filepath.Join(dir, "junk"), []byte("junk")); err == nil {
		t.Fatal("export wrote a non-backup")
	}
	trustPath := filepath.Join(dir, "primary.pub")
	if err := os.WriteFile(trustPath, signer.Verifier().Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}

	code, out, errOut = runCLI(t, "backup", "inspect", "--in", backupPath)
	if code != exitOK || !strings.Contains(out, "signer     primary.example") || !strings.Contains(out, "sealed to  "+kms.TransferKeyFingerprint(pub)) {
		t.Fatalf("inspect: %d\n%s%s", code, out, errOut)
	}

	dst := "bbolt:" + filepath.Join(dir, "dr.db")
	imp := func(args ...string) (int, string, string) {
		return runCLI(t, append([]string{"backup", "import", "--in", backupPath, "--store", dst}, args...)...)
	}
	wrongPass := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrongPass, []byte("not the passphrase\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	other, err := audit.GenerateSigner("primary.example")
	if err != nil {
		t.Fatal(err)
	}
	otherPath := filepath.Join(dir, "other.pub")
	if err := os.WriteFile(otherPath, other.Verifier().Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"wrong passphrase", []string{"--transfer-key", keyPath, "--passphrase-file", wrongPass, "--trust", trustPath}, exitError, "wrong passphrase"},
		{"untrusted signer", []string{"--transfer-key", keyPath, "--passphrase-file", pass, "--trust", otherPath}, exitError, "not signed by a trusted key"},
		{"no trust", []string{"--transfer-key", keyPath, "--passphrase-file", pass}, exitUsage, "--trust"},
		{"bad store", []string{"--transfer-key", keyPath, "--passphrase-file", pass, "--trust", trustPath, "--store", "mysql:x"}, exitUsage, "--store must be"},
	} {
		code, _, errOut := imp(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) {
			t.Errorf("%s: exit %d, %s", tc.name, code, errOut)
		}
	}

	for i, want := range []string{"2 written, 0 already present", "0 written, 2 already present"} {
		code, out, errOut := imp("--transfer-key", keyPath, "--passphrase-file", pass, "--trust", otherPath, "--trust", trustPath)
		if code != exitOK || !strings.Contains(out, want) || !strings.Contains(out, "signed by trusted key primary.example") {
			t.Fatalf("import %d: exit %d\n%s%s", i+1, code, out, errOut)
		}
	}
	st, err := store.OpenBolt(filepath.Join(dir, "dr.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, k := range []string{"keyrings/acme/disks", "classes/storage"} {
		got, err := st.Get(ctx, k)
		if err != nil {
			t.Fatalf("DR store %s: %v", k, err)
		}
		want, _ := src.Get(ctx, k)
		if !bytes.Equal(got.Value, want.Value) {
			t.Fatalf("DR store %s differs from the primary", k)
		}
	}
}
