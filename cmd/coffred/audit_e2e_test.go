package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/cmd/internal/devtest"
	"github.com/coffre-kms/coffre/kms/audit"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// TestAuditFailClosed runs coffred dev with its audit log on a small tmpfs
// of its own, a simulated TPM node attesting to it. It checks, with real
// parts only:
//   - releases and admin calls are audited and answered;
//   - the audit log never holds the data keys' bytes;
//   - when the log's file system is full, releases and admin calls are
//     refused with Unavailable and health says NOT_SERVING;
//   - once space is freed, service resumes by itself, and the log verifies.
func TestAuditFailClosed(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	auditDir := filepath.Join(dir, "audit")
	if err := os.MkdirAll(auditDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// A file system of its own that the test can fill: the real "disk
	// full" condition. Needs root, as make test runs.
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", auditDir).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs for the audit log (the test needs root): %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", auditDir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", auditDir, err, out)
		}
	})

	// The simulated node: its identity for enrollment first.
	const tpmSpec = "simulator:4242"
	nodeDir := filepath.Join(dir, "node")
	writeIdentity(t, tpmSpec, nodeDir)

	srv := devtest.StartIn(t, dir, "--node-tpm", tpmSpec)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(srv.Env["COFFRE_CA"])
	pool.AppendCertsFromPEM(caPEM)
	adminCert, err := tls.LoadX509KeyPair(srv.Env["COFFRE_CERT"], srv.Env["COFFRE_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	adminConn, err := grpc.NewClient(srv.Env["COFFRE_ADDR"], grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{adminCert}})))
	if err != nil {
		t.Fatal(err)
	}
	defer adminConn.Close()
	admin := coffrev1.NewAdminServiceClient(adminConn)
	healthc := healthpb.NewHealthClient(adminConn)
	nodeConn, err := grpc.NewClient(srv.Env["COFFRE_ADDR"], grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: pool})))
	if err != nil {
		t.Fatal(err)
	}
	defer nodeConn.Close()
	tpm, err := agent.OpenTPM(tpmSpec)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	a, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	client := agent.NewClient(nodeConn, a, agent.ClientOptions{})

	call := func() context.Context {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		t.Cleanup(cancel)
		return c
	}
	var keys [][]byte
	for range 5 {
		k, _, err := client.GenerateDataKey(ctx, devNodeKeyring, map[string]string{"volume": "v1"})
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	if _, err := admin.CreateKeyring(call(), &coffrev1.CreateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatal(err)
	}

	// Fill the audit file system.
	filler := filepath.Join(auditDir, "filler")
	fillDisk(t, filler)

	// The log may still have room for some entries: the space it allocated
	// ahead (at most audit.Options.Preallocate, 4 MiB, less on this small
	// file system) and its last page. Those releases are durable and
	// answered. Then the next one must be refused.
	refused := false
	for i := 0; i < 20000 && !refused; i++ {
		k, _, err := client.GenerateDataKey(ctx, devNodeKeyring, nil)
		switch status.Code(err) {
		case codes.OK:
			keys = append(keys, k)
		case codes.Unavailable:
			refused = true
		default:
			t.Fatalf("release with a full audit disk: %v, want OK or Unavailable", err)
		}
	}
	if !refused {
		t.Fatal("20000 releases answered with a full audit disk")
	}
	if _, _, err := client.GenerateDataKey(ctx, devNodeKeyring, nil); status.Code(err) != codes.Unavailable {
		t.Fatalf("release after the first refusal: %v, want Unavailable", err)
	}
	if _, err := admin.RotateKeyring(call(), &coffrev1.RotateKeyringRequest{Id: "acme/disks"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("admin call with a full audit disk: %v, want Unavailable", err)
	}
	waitHealth(t, healthc, coffrev1.KeyService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)

	// Free the space: service resumes by itself.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	waitHealth(t, healthc, coffrev1.KeyService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	// Nothing was rotated: the refused call did not happen.
	k, err := admin.GetKeyring(call(), &coffrev1.GetKeyringRequest{Id: "acme/disks"})
	if err != nil || k.GetPrimaryVersion() != 1 {
		t.Fatalf("keyring after the refused rotation: %v, %v", k, err)
	}
	k2, _, err := client.GenerateDataKey(ctx, devNodeKeyring, nil)
	if err != nil {
		t.Fatalf("release after the disk was freed: %v", err)
	}
	keys = append(keys, k2)
	if _, err := admin.RotateKeyring(call(), &coffrev1.RotateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatalf("admin call after the disk was freed: %v", err)
	}

	// The log holds decisions, never key material.
	var logBytes []byte
	filepath.Walk(auditDir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			logBytes = append(logBytes, b...)
		}
		return nil
	})
	for i, k := range keys {
		if len(k) != 32 {
			t.Fatalf("key %d has %d bytes", i, len(k))
		}
		if bytes.Contains(logBytes, k) || bytes.Contains(logBytes, []byte(hex.EncodeToString(k))) {
			t.Fatalf("the audit log contains data key %d", i)
		}
	}
	for _, want := range []string{`"op":"key.generate_data_key"`, `"op":"admin.CreateKeyring"`, `"decision":"allow"`} {
		if !bytes.Contains(logBytes, []byte(want)) {
			t.Errorf("the audit log lacks %s", want)
		}
	}

	// Stop the server (final checkpoint), then verify the whole log offline.
	srv.Stop()
	// The JSON-lines sink caught up with everything, the outage included.
	lines, err := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	n := bytes.Count(lines, []byte("\n"))
	signer := readSigner(t, filepath.Join(dir, "audit-signer.key"))
	rep, err := audit.VerifyDir(auditDir, signer.Verifier())
	if err != nil {
		t.Fatalf("audit log does not verify after the outage: %v", err)
	}
	if uint64(n) != rep.Entries {
		t.Fatalf("audit.jsonl has %d lines, the log %d entries", n, rep.Entries)
	}
	t.Logf("audit log verified: %d entries, %d checkpoints; audit.jsonl complete", rep.Entries, rep.Checkpoints)
}

func writeIdentity(t *testing.T, spec, dir string) {
	t.Helper()
	ctx := context.Background()
	tpm, err := agent.OpenTPM(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	a, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	_, _, values, err := a.Quote(ctx, make([]byte, 32), []uint32{0, 7, 16})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ek.pub"), a.EKPublic(), 0o644); err != nil {
		t.Fatal(err)
	}
	hexv := map[string]string{}
	for i, v := range values {
		hexv[strconv.FormatUint(uint64(i), 10)] = hex.EncodeToString(v)
	}
	b, _ := json.Marshal(hexv)
	if err := os.WriteFile(filepath.Join(dir, "pcrs.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return
			}
			t.Fatal(err)
		}
	}
}

func waitHealth(t *testing.T, h healthpb.HealthClient, svc string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		cancel()
		if err == nil && r.GetStatus() == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health of %s: %v, %v; want %v within 10s", svc, r.GetStatus(), err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func readSigner(t *testing.T, path string) *audit.Signer {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := audit.ParseSigner(b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
