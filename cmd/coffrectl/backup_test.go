package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/cmd/internal/devtest"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
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
// drTransferKey makes a DR site's transfer key with backup keygen in dir
// (dr.key, dr.key.pub) and returns its path and its passphrase file's.
func drTransferKey(t *testing.T, dir string) (key, pass string) {
	t.Helper()
	pass = filepath.Join(dir, "pass")
	if err := os.WriteFile(pass, []byte("correct horse battery\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	key = filepath.Join(dir, "dr.key")
	if code, _, errOut := runCLI(t, "backup", "keygen", "--out", key, "--passphrase-file", pass); code != exitOK {
		t.Fatalf("keygen: %s", errOut)
	}
	return key, pass
}

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

// TestBackupExportLarge runs the data embassy through coffrectl against a
// real coffred (`coffred dev`, whose messages are bounded at 1 MiB) with a
// backup larger than that: the approval that executes the export fetches
// the backup and checks its size and hash, the DR site imports it into a
// fresh store, it is fetched again, refused for what is not an executed
// export, and deleted.
func TestBackupExportLarge(t *testing.T) {
	srv := devtest.Start(t)
	for k, v := range srv.Env {
		t.Setenv(k, v)
	}
	g := globals{server: srv.Env["COFFRE_ADDR"], ca: srv.Env["COFFRE_CA"], cert: srv.Env["COFFRE_CERT"], key: srv.Env["COFFRE_KEY"], timeout: 30 * time.Second}
	c, closeConn, err := adminClient(g)
	if err != nil {
		t.Fatal(err)
	}
	defer closeConn()
	const keyrings = 4000
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < keyrings; i += 8 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := c.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: fmt.Sprintf("acme/k%05d", i)})
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	key, pass := drTransferKey(t, dir)
	out := filepath.Join(dir, "paris.backup")
	code, stdout, stderr := runCLI(t, "backup", "export", "--to", key+".pub", "--out", out)
	if code != exitOK || !strings.Contains(stdout, "wrote "+out) || !regexp.MustCompile(`sha256 +[0-9a-f]{64} \(checked\)`).MatchString(stdout) {
		t.Fatalf("export: exit %d\n%s%s", code, stdout, stderr)
	}
	m := regexp.MustCompile(`proposal ([0-9a-f]{16}) executed`).FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("export: no proposal id in\n%s", stderr)
	}
	id := m[1]
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) <= 1<<20 {
		t.Fatalf("the backup is %d bytes; the test needs one over the server's 1 MiB message limit", len(data))
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v %v", fi, err)
	}

	// The DR site imports it into a fresh store: every keyring arrives.
	drPath := filepath.Join(dir, "dr.db")
	code, stdout, stderr = runCLI(t, "backup", "import", "--in", out, "--transfer-key", key, "--passphrase-file", pass,
		"--trust", srv.Env["COFFRE_AUDIT_VERIFIER"], "--store", "bbolt:"+drPath)
	if code != exitOK || !strings.Contains(stdout, "signed by trusted key") {
		t.Fatalf("import: exit %d\n%s%s", code, stdout, stderr)
	}
	dr, err := store.OpenBolt(drPath, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := dr.List(context.Background(), "keyrings/acme/k")
	dr.Close()
	if err != nil || len(got) != keyrings {
		t.Fatalf("the DR store holds %d of the %d keyrings (%v)", len(got), keyrings, err)
	}

	// The server keeps it: the same bytes again, until deleted.
	again := filepath.Join(dir, "again.backup")
	if code, stdout, stderr := runCLI(t, "backup", "fetch", "--proposal", id, "--out", again); code != exitOK {
		t.Fatalf("fetch: exit %d\n%s%s", code, stdout, stderr)
	}
	if b, err := os.ReadFile(again); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("fetched again: %d bytes, %v", len(b), err)
	}
	// One more export-free proposal to fetch from.
	code, _, stderr = runCLI(t, "keyring", "schedule-deletion", "acme/k00000", "--version", "0", "--days", "7")
	m = regexp.MustCompile(`proposal ([0-9a-f]{16}) executed`).FindStringSubmatch(stderr)
	if code != exitOK || m == nil {
		t.Fatalf("schedule-deletion: exit %d\n%s", code, stderr)
	}
	other := m[1]
	missing := filepath.Join(dir, "missing.backup")
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"existing file", []string{"backup", "fetch", "--proposal", id, "--out", again}, exitError, "refusing to overwrite"},
		{"unknown proposal", []string{"backup", "fetch", "--proposal", "0123456789abcdef", "--out", missing}, exitError, "NotFound: quorum: no such proposal"},
		{"not an export", []string{"backup", "fetch", "--proposal", other, "--out", missing}, exitError, "InvalidArgument: invalid argument: proposal " + other + " is a keyring.schedule_destruction, not a backup.export"},
		{"no --out", []string{"backup", "fetch", "--proposal", id}, exitUsage, "--proposal and --out are required"},
		{"delete not an export", []string{"backup", "delete", "--proposal", other}, exitError, "not a backup.export"},
	} {
		code, _, errOut := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) {
			t.Errorf("%s: exit %d, %s", tc.name, code, errOut)
		}
	}
	if code, stdout, stderr := runCLI(t, "backup", "delete", "--proposal", id); code != exitOK || !strings.Contains(stdout, "deleted the stored backup") {
		t.Fatalf("delete: exit %d\n%s%s", code, stdout, stderr)
	}
	if code, _, errOut := runCLI(t, "backup", "fetch", "--proposal", id, "--out", missing); code != exitError || !strings.Contains(errOut, "NotFound") {
		t.Fatalf("fetch after delete: exit %d %s", code, errOut)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Fatalf("a refused fetch left %s: %v", missing, err)
	}
}

// TestFetchBackupResumes cuts FetchBackup calls short (as a deadline
// would) and checks that the fetch resumes where it stopped, that a call
// with no progress ends it, and that bytes altered on the way are caught
// by the manifest's hash with no file written.
func TestFetchBackupResumes(t *testing.T) {
	srv := devtest.Start(t)
	for k, v := range srv.Env {
		t.Setenv(k, v)
	}
	dir := t.TempDir()
	key, _ := drTransferKey(t, dir)
	out := filepath.Join(dir, "first.backup")
	code, stdout, stderr := runCLI(t, "backup", "export", "--to", key+".pub", "--out", out)
	m := regexp.MustCompile(`proposal ([0-9a-f]{16}) executed`).FindStringSubmatch(stderr)
	if code != exitOK || m == nil {
		t.Fatalf("export: exit %d\n%s%s", code, stdout, stderr)
	}
	id := m[1]
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	g := globals{server: srv.Env["COFFRE_ADDR"], ca: srv.Env["COFFRE_CA"], cert: srv.Env["COFFRE_CERT"], key: srv.Env["COFFRE_KEY"], timeout: 30 * time.Second}
	real, closeConn, err := adminClient(g)
	if err != nil {
		t.Fatal(err)
	}
	defer closeConn()
	e := &env{g: g, stdout: io.Discard, stderr: io.Discard}

	// The backup of a small dev store fits one message; every call is cut
	// after the manifest and one data message of the test's own size.
	c := &cuttingClient{AdminServiceClient: real, cuts: 3, after: 2, shrink: 1000}
	resumed := filepath.Join(dir, "resumed.backup")
	if err := fetchBackup(context.Background(), e, c, id, resumed, nil); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(resumed); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("resumed fetch: %d bytes, %v", len(b), err)
	}
	if len(c.offsets) != 4 || c.offsets[0] != 0 || c.offsets[1] != 1000 || c.offsets[3] != 3000 {
		t.Fatalf("calls from offsets %v", c.offsets)
	}

	stalled := filepath.Join(dir, "stalled.backup")
	c = &cuttingClient{AdminServiceClient: real, cuts: 1, after: 1}
	if err := fetchBackup(context.Background(), e, c, id, stalled, nil); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a call with no progress: %v", err)
	}
	c = &cuttingClient{AdminServiceClient: real, flip: true}
	if err := fetchBackup(context.Background(), e, c, id, stalled, nil); err == nil || !strings.Contains(err.Error(), "nothing written") {
		t.Fatalf("altered bytes: %v", err)
	}
	other := &coffrev1.BackupManifest{Size: uint64(len(want)), Sha256: strings.Repeat("0", 64)}
	if err := fetchBackup(context.Background(), e, real, id, stalled, other); err == nil || !strings.Contains(err.Error(), "proposal's result names") {
		t.Fatalf("a manifest other than the result's: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 5 { // pass, dr.key(.pub), first, resumed and nothing else
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("files left: %v", names)
	}
}

// cuttingClient passes AdminService calls to the real server, and cuts
// the first cuts FetchBackup streams short after `after` messages with
// DeadlineExceeded, as a call deadline would. With shrink, data messages
// are split to at most shrink bytes (so that a small backup still takes
// several calls); with flip, one data byte is altered.
type cuttingClient struct {
	coffrev1.AdminServiceClient
	cuts, after, shrink int
	flip                bool
	offsets             []uint64
}

func (c *cuttingClient) FetchBackup(ctx context.Context, in *coffrev1.FetchBackupRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[coffrev1.BackupChunk], error) {
	c.offsets = append(c.offsets, in.GetOffset())
	s, err := c.AdminServiceClient.FetchBackup(ctx, in, opts...)
	if err != nil {
		return nil, err
	}
	cs := &cutStream{ServerStreamingClient: s, left: -1, shrink: c.shrink, flip: c.flip}
	if c.cuts > 0 {
		c.cuts--
		cs.left = c.after
	}
	return cs, nil
}

type cutStream struct {
	grpc.ServerStreamingClient[coffrev1.BackupChunk]
	left, shrink int
	flip         bool
	pending      *coffrev1.BackupChunk
}

func (s *cutStream) Recv() (*coffrev1.BackupChunk, error) {
	if s.left == 0 {
		return nil, status.Error(codes.DeadlineExceeded, "cut short by the test")
	}
	s.left--
	m := s.pending
	if m == nil {
		var err error
		if m, err = s.ServerStreamingClient.Recv(); err != nil {
			return nil, err
		}
	}
	s.pending = nil
	if s.shrink > 0 && len(m.GetData()) > s.shrink {
		s.pending = &coffrev1.BackupChunk{Offset: m.GetOffset() + uint64(s.shrink), Data: m.GetData()[s.shrink:]}
		m = &coffrev1.BackupChunk{Offset: m.GetOffset(), Data: m.GetData()[:s.shrink]}
	}
	if s.flip && len(m.GetData()) > 0 {
		d := bytes.Clone(m.GetData())
		d[len(d)/2] ^= 1
		m = &coffrev1.BackupChunk{Offset: m.GetOffset(), Data: d}
		s.flip = false
	}
	return m, nil
}
