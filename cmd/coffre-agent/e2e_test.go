package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/attest/agent/swtpmtest"
	"github.com/coffre-kms/coffre/cmd/internal/adminkey"
	"github.com/coffre-kms/coffre/cmd/internal/devtest"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms/server/admintest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// These tests run the whole attested-release path with real parts: coffred
// (`coffred dev`: SoftHSM root, bbolt, TLS), swtpm TPMs manufactured with EK
// certificates from a local CA, the admin API with the admin certificate, and
// this command's own code (run) as the node agent.

type world struct {
	t     *testing.T
	srv   *devtest.Server
	admin *admintest.Gated
}

func newWorld(t *testing.T) *world {
	srv := devtest.Start(t)
	ca, err := os.ReadFile(srv.Env["COFFRE_CA"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(srv.Env["COFFRE_CERT"], srv.Env["COFFRE_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(srv.Env["COFFRE_ADDR"], grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert},
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// The dev server's quorum is its one dev admin: sign with that key.
	keyFile, err := os.ReadFile(srv.Env["COFFRE_ADMIN_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	pass, err := keyfile.ReadPassphrase(srv.Env["COFFRE_ADMIN_PASSPHRASE_FILE"], "", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := adminkey.ParseFile(keyFile, pass)
	if err != nil {
		t.Fatal(err)
	}
	return &world{t: t, srv: srv, admin: &admintest.Gated{AdminServiceClient: coffrev1.NewAdminServiceClient(conn), Key: key}}
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// agentRun runs the coffre-agent command line in process against the world.
func (w *world) agentRun(tpmSpec string, args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	full := append(args, "--server", w.srv.Env["COFFRE_ADDR"], "--ca", w.srv.Env["COFFRE_CA"], "--tpm", tpmSpec)
	code := run(context.Background(), full, &out, &errb)
	return code, out.String(), errb.String()
}

func (w *world) mustAgent(tpmSpec string, args ...string) string {
	w.t.Helper()
	code, out, errOut := w.agentRun(tpmSpec, args...)
	if code != 0 {
		w.t.Fatalf("coffre-agent %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// trustEKCA adds every certificate of a swtpm local CA as an EK root.
func (w *world) trustEKCA(sw *swtpmtest.SWTPM) {
	w.t.Helper()
	rest := sw.CACertPEM()
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return
		}
		if _, err := w.admin.AddEKRoot(callCtx(w.t), &coffrev1.AddEKRootRequest{Certificate: pem.EncodeToMemory(b)}); err != nil {
			w.t.Fatalf("AddEKRoot: %v", err)
		}
	}
}

// identity runs `coffre-agent identity` and returns the EK certificate and
// the PCR values it read.
func (w *world) identity(sw *swtpmtest.SWTPM) ([]byte, map[uint32][]byte) {
	w.t.Helper()
	dir := w.t.TempDir()
	w.mustAgent(sw.Spec(), "identity", "--out", dir, "--pcrs", "0,7,16")
	cert, err := os.ReadFile(filepath.Join(dir, "ek-cert.pem"))
	if err != nil {
		w.t.Fatalf("swtpm has no EK certificate: %v", err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "pcrs.json"))
	if err != nil {
		w.t.Fatal(err)
	}
	var hexes map[string]string
	if err := json.Unmarshal(raw, &hexes); err != nil {
		w.t.Fatal(err)
	}
	pcrs := map[uint32][]byte{}
	for k, v := range hexes {
		i, err := strconv.ParseUint(k, 10, 5)
		if err != nil {
			w.t.Fatal(err)
		}
		pcrs[uint32(i)], _ = hex.DecodeString(v)
	}
	return cert, pcrs
}

func (w *world) setClass(name string, pcrs map[uint32][]byte) {
	w.t.Helper()
	c := &coffrev1.NodeClass{Name: name}
	for _, i := range []uint32{0, 7, 16} {
		c.Pcrs = append(c.Pcrs, &coffrev1.PCRReference{Index: i, Sha256: pcrs[i]})
	}
	if _, err := w.admin.SetNodeClass(callCtx(w.t), &coffrev1.SetNodeClassRequest{Class: c}); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) enroll(name, class string, ekCert []byte, labels map[string]string) error {
	_, err := w.admin.EnrollNode(callCtx(w.t), &coffrev1.EnrollNodeRequest{
		Name: name, Class: class, Labels: labels, Ek: &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: ekCert},
	})
	return err
}

func (w *world) keyring(id, class string, labels map[string]string, release coffrev1.Release) {
	w.t.Helper()
	if _, err := w.admin.CreateKeyring(callCtx(w.t), &coffrev1.CreateKeyringRequest{Id: id}); err != nil {
		w.t.Fatal(err)
	}
	if _, err := w.admin.SetKeyringPolicy(callCtx(w.t), &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{
		Keyring: id, AllowedClasses: []string{class}, RequiredLabels: labels, Release: release,
	}}); err != nil {
		w.t.Fatal(err)
	}
}

// TestSWTPMAttestedRelease: a swtpm with an EK certificate from a local CA is
// enrolled by that certificate; the agent attests, gets data keys sealed to
// its binding key (HPKE) or bound to its TPM (duplicate blob with PolicyPCR),
// opens them, and encrypts and decrypts a file — all through the CLI.
func TestSWTPMAttestedRelease(t *testing.T) {
	w := newWorld(t)
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	w.trustEKCA(sw)
	ekCert, pcrs := w.identity(sw)
	w.setClass("storage", pcrs)
	if err := w.enroll("qc-store-1", "storage", ekCert, map[string]string{"site": "qc-1", "jurisdiction": "ca-qc"}); err != nil {
		t.Fatal(err)
	}
	w.keyring("qc/volumes", "storage", map[string]string{"jurisdiction": "ca-qc"}, coffrev1.Release_RELEASE_HPKE)
	w.keyring("qc/sealed", "storage", nil, coffrev1.Release_RELEASE_TPM)

	out := w.mustAgent(sw.Spec(), "attest")
	for _, want := range []string{"node     qc-store-1", "class    storage", "jurisdiction=ca-qc,site=qc-1"} {
		if !strings.Contains(out, want) {
			t.Errorf("attest output lacks %q:\n%s", want, out)
		}
	}
	dir := t.TempDir()
	for _, kr := range []string{"qc/volumes", "qc/sealed"} {
		wrapped, plain, again := filepath.Join(dir, "w.json"), filepath.Join(dir, "k1"), filepath.Join(dir, "k2")
		w.mustAgent(sw.Spec(), "datakey", "--keyring", kr, "--context", "volume=v1", "--out-wrapped", wrapped, "--out-plain", plain)
		w.mustAgent(sw.Spec(), "decrypt", "--in-wrapped", wrapped, "--out-plain", again)
		k1, _ := os.ReadFile(plain)
		k2, _ := os.ReadFile(again)
		if len(k1) != 32 || !bytes.Equal(k1, k2) {
			t.Fatalf("%s: datakey and decrypt disagree (%d bytes)", kr, len(k1))
		}
		if fi, _ := os.Stat(plain); fi.Mode().Perm() != 0o600 {
			t.Errorf("plaintext key file mode %v", fi.Mode().Perm())
		}
	}
	src, enc, dec := filepath.Join(dir, "data"), filepath.Join(dir, "data.cff"), filepath.Join(dir, "data.out")
	payload := bytes.Repeat([]byte("sovereign "), 20_000)
	os.WriteFile(src, payload, 0o600)
	w.mustAgent(sw.Spec(), "encrypt-file", "--keyring", "qc/volumes", "--context", "path=/data", "--in", src, "--out", enc)
	w.mustAgent(sw.Spec(), "decrypt-file", "--in", enc, "--out", dec)
	if got, _ := os.ReadFile(dec); !bytes.Equal(got, payload) {
		t.Fatal("decrypt-file did not give back the file")
	}
	if ct, _ := os.ReadFile(enc); bytes.Contains(ct, []byte("sovereign")) {
		t.Fatal("encrypted file holds plaintext")
	}

	// The TPM-bound key opens only in the class's PCR state: after PCR 16
	// changes, the node cannot even attest, and so gets nothing.
	extendPCR(t, sw, 16)
	code, _, errOut := w.agentRun(sw.Spec(), "datakey", "--keyring", "qc/sealed", "--out-wrapped", filepath.Join(dir, "x.json"))
	if code == 0 || !strings.Contains(errOut, "PCR 16") {
		t.Fatalf("release after a PCR 16 change: exit %d: %s", code, errOut)
	}
}

// TestSWTPMPCR7Changed: a node whose PCR 7 (Secure Boot state) differs from
// its class's reference value is refused, and told which PCR.
func TestSWTPMPCR7Changed(t *testing.T) {
	w := newWorld(t)
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	w.trustEKCA(sw)
	ekCert, pcrs := w.identity(sw)
	w.setClass("storage", pcrs)
	if err := w.enroll("n1", "storage", ekCert, nil); err != nil {
		t.Fatal(err)
	}
	extendPCR(t, sw, 7)
	code, _, errOut := w.agentRun(sw.Spec(), "attest")
	if code == 0 || !strings.Contains(errOut, "PermissionDenied") || !strings.Contains(errOut, "PCR 7") {
		t.Fatalf("attest with PCR 7 changed: exit %d: %s", code, errOut)
	}
}

// TestSWTPMEKCertFromAnotherCA: a TPM whose EK certificate comes from a CA
// that is not an EK root cannot be enrolled by it.
func TestSWTPMEKCertFromAnotherCA(t *testing.T) {
	w := newWorld(t)
	trusted := swtpmtest.Start(t, swtpmtest.Options{})
	other := swtpmtest.Start(t, swtpmtest.Options{}) // its own local CA
	w.trustEKCA(trusted)
	ekCert, pcrs := w.identity(other)
	w.setClass("storage", pcrs)
	err := w.enroll("rogue", "storage", ekCert, nil)
	if err == nil {
		t.Fatal("EK certificate from an unknown CA enrolled")
	}
	t.Logf("refused: %v", err)
	// And the unenrolled TPM cannot attest.
	if code, _, errOut := w.agentRun(other.Spec(), "attest"); code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("unenrolled TPM attested: exit %d %s", code, errOut)
	}
}

// TestSWTPMTenantIsolation: tenant B's node presents tenant A's envelope and
// is refused; so is a release from a keyring whose policy wants another
// jurisdiction.
func TestSWTPMTenantIsolation(t *testing.T) {
	w := newWorld(t)
	a := swtpmtest.Start(t, swtpmtest.Options{})
	b := swtpmtest.Start(t, swtpmtest.Options{})
	w.trustEKCA(a)
	w.trustEKCA(b)
	certA, pcrs := w.identity(a)
	certB, _ := w.identity(b)
	w.setClass("storage", pcrs) // fresh swtpms share their initial PCR values
	if err := w.enroll("node-a", "storage", certA, map[string]string{"jurisdiction": "ca-qc"}); err != nil {
		t.Fatal(err)
	}
	if err := w.enroll("node-b", "storage", certB, map[string]string{"jurisdiction": "lu"}); err != nil {
		t.Fatal(err)
	}
	w.keyring("tenanta/disks", "storage", map[string]string{"jurisdiction": "ca-qc"}, coffrev1.Release_RELEASE_HPKE)
	w.keyring("tenantb/disks", "storage", map[string]string{"jurisdiction": "lu"}, coffrev1.Release_RELEASE_HPKE)

	dir := t.TempDir()
	wrappedA := filepath.Join(dir, "a.json")
	w.mustAgent(a.Spec(), "datakey", "--keyring", "tenanta/disks", "--out-wrapped", wrappedA)
	code, _, errOut := w.agentRun(b.Spec(), "decrypt", "--in-wrapped", wrappedA, "--out-plain", filepath.Join(dir, "stolen"))
	if code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("tenant B opened tenant A's envelope: exit %d %s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "stolen")); err == nil {
		t.Fatal("a plaintext file was written for a refused decrypt")
	}
	code, _, errOut = w.agentRun(b.Spec(), "datakey", "--keyring", "tenanta/disks", "--out-wrapped", filepath.Join(dir, "b.json"))
	if code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("node-b got a data key of tenanta: exit %d %s", code, errOut)
	}
	w.mustAgent(b.Spec(), "datakey", "--keyring", "tenantb/disks", "--out-wrapped", filepath.Join(dir, "b.json"))
}

// TestSWTPMRevokedMidSession: a node holding a live session is revoked; its
// very next release is refused, without a retry that could succeed.
func TestSWTPMRevokedMidSession(t *testing.T) {
	w := newWorld(t)
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	w.trustEKCA(sw)
	ekCert, pcrs := w.identity(sw)
	w.setClass("storage", pcrs)
	if err := w.enroll("n1", "storage", ekCert, nil); err != nil {
		t.Fatal(err)
	}
	w.keyring("acme/disks", "storage", nil, coffrev1.Release_RELEASE_HPKE)

	// The Go client, as storage software embeds it, holding one session.
	ctx := callCtx(t)
	tpm, err := agent.OpenTPM(sw.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	a, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(w.srv.Env["COFFRE_CA"])
	pool.AppendCertsFromPEM(ca)
	conn, err := grpc.NewClient(w.srv.Env["COFFRE_ADDR"], grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := agent.NewClient(conn, a, agent.ClientOptions{})
	if _, _, err := c.GenerateDataKey(ctx, "acme/disks", nil); err != nil {
		t.Fatal(err)
	}
	before := c.Session()
	if _, err := w.admin.RevokeNode(callCtx(t), &coffrev1.RevokeNodeRequest{Name: "n1"}); err != nil {
		t.Fatal(err)
	}
	_, _, err = c.GenerateDataKey(ctx, "acme/disks", nil)
	if code := status.Code(err); code != codes.PermissionDenied && code != codes.Unauthenticated {
		t.Fatalf("release after revocation: %v", err)
	}
	if s := c.Session(); s != nil && s.Token == before.Token {
		// Even if the client still holds the token, the server ended it.
		if _, _, err := c.GenerateDataKey(ctx, "acme/disks", nil); err == nil {
			t.Fatal("revoked node's session still releases")
		}
	}
	// swtpm serves one connection at a time: let the CLI have it.
	a.Close()
	tpm.Close()
	if code, _, errOut := w.agentRun(sw.Spec(), "attest"); code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("revoked node attested again: exit %d %s", code, errOut)
	}
}

// extendPCR changes a PCR of the swtpm behind the agent's back, as a
// changed boot component would.
func extendPCR(t *testing.T, sw *swtpmtest.SWTPM, pcr uint32) {
	t.Helper()
	tpm := sw.Open(t)
	defer tpm.Close()
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
			HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{0x42}, 32),
		}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}
