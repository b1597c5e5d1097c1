package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/attest/agent/swtpmtest"
)

// verifyEKCert checks that the agent's EK certificate chains to the
// swtpm's local CA and certifies the agent's EK.
func verifyEKCert(t *testing.T, sw *swtpmtest.SWTPM, a *agent.Agent) {
	t.Helper()
	der := a.EKCertificate()
	if der == nil {
		t.Fatal("no EK certificate read from NV")
	}
	cert := parseEKCert(t, der)
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:     sw.CAPool(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		t.Fatalf("EK certificate does not chain to the swtpmtest CA: %v", err)
	}
	if k, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(ekPublicKey(t, a)) {
		t.Fatalf("EK certificate is for another key than the EK")
	}
}

// TestSWTPMAgent runs every Agent operation on a real swtpm, which has
// no resource manager, and checks after each that nothing stayed loaded
// but the EK and AK.
func TestSWTPMAgent(t *testing.T) {
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	tpm := sw.Open(t)
	requireHandles(t, tpm, 0, "swtpm start")
	ctx := context.Background()
	a := newAgent(t, tpm, agent.Options{})
	requireHandles(t, tpm, 2, "New")
	verifyEKCert(t, sw, a)

	secret := []byte("swtpm credential secret")
	blob, enc := makeCredential(t, a, secret)
	if got, err := a.Activate(ctx, blob, enc); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Activate = %q, %v", got, err)
	}
	requireHandles(t, tpm, 2, "Activate")

	nonce := bytes.Repeat([]byte{3}, 32)
	pcrs := []uint32{0, 1, 2, 3, 4, 5, 6, 7, 16}
	quote, sig, vals, err := a.Quote(ctx, nonce, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	checkQuote(t, a, nonce, quote, sig, pcrs, vals)
	requireHandles(t, tpm, 2, "Quote")

	key := bytes.Repeat([]byte{0xc3}, 32)
	envelope := []byte("env")
	srv := mustServerSession(t, a.BindingPublicKey())
	sk, err := a.DeriveSessionKey(srv.enc)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := sk.Open(srv.seal(key, envelope), envelope); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("session key Open = %x, %v", got, err)
	}
	requireHandles(t, tpm, 2, "DeriveSessionKey")

	bound := []uint32{7, 16}
	dup := makeDuplicate(t, a.EKPublic(), key, bound, vals)
	if got, err := a.OpenTPM(ctx, dup, bound); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("OpenTPM = %x, %v", got, err)
	}
	requireHandles(t, tpm, 2, "OpenTPM")

	corrupt := makeDuplicate(t, a.EKPublic(), key, bound, vals)
	corrupt.Duplicate[len(corrupt.Duplicate)-1] ^= 1
	if _, err := a.OpenTPM(ctx, corrupt, bound); !errors.Is(err, agent.ErrOpen) {
		t.Fatalf("corrupted duplicate: %v, want ErrOpen", err)
	}
	requireHandles(t, tpm, 2, "failed import")

	extendPCR(t, tpm, 16, "after release")
	if _, err := a.OpenTPM(ctx, dup, bound); !errors.Is(err, agent.ErrPCRPolicy) {
		t.Fatalf("OpenTPM after a PCR extend: %v, want ErrPCRPolicy", err)
	}
	requireHandles(t, tpm, 2, "OpenTPM refused by policy")

	// Many releases in a row: a leak would exhaust swtpm's three object
	// slots within a few iterations.
	dup2 := makeDuplicate(t, a.EKPublic(), key, bound, readPCRs(t, tpm, bound))
	for i := range 5 {
		if _, err := a.OpenTPM(ctx, dup2, bound); err != nil {
			t.Fatalf("release %d: %v", i, err)
		}
	}
	requireHandles(t, tpm, 2, "repeated OpenTPM")

	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	requireHandles(t, tpm, 0, "Close")
}

func TestSWTPMECC(t *testing.T) {
	sw := swtpmtest.Start(t, swtpmtest.Options{ECC: true})
	tpm := sw.Open(t)
	ctx := context.Background()
	a := newAgent(t, tpm, agent.Options{EKAlgorithm: "ecc"})
	verifyEKCert(t, sw, a)

	blob, enc := makeCredential(t, a, []byte("ecc"))
	if got, err := a.Activate(ctx, blob, enc); err != nil || string(got) != "ecc" {
		t.Fatalf("Activate = %q, %v", got, err)
	}
	nonce := bytes.Repeat([]byte{4}, 32)
	pcrs := []uint32{7}
	quote, sig, vals, err := a.Quote(ctx, nonce, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	checkQuote(t, a, nonce, quote, sig, pcrs, vals)
	key := bytes.Repeat([]byte{5}, 32)
	if got, err := a.OpenTPM(ctx, makeDuplicate(t, a.EKPublic(), key, pcrs, vals), pcrs); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("OpenTPM = %x, %v", got, err)
	}
	requireHandles(t, tpm, 2, "ECC operations")

	// The RSA EK certificate swtpm_setup wrote is there too.
	_ = a.Close()
	r := newAgent(t, tpm, agent.Options{})
	verifyEKCert(t, sw, r)
}

func TestSWTPMUnixSocket(t *testing.T) {
	sw := swtpmtest.Start(t, swtpmtest.Options{Unix: true})
	tpm := sw.Open(t)
	a := newAgent(t, tpm, agent.Options{})
	verifyEKCert(t, sw, a)
	nonce := bytes.Repeat([]byte{6}, 32)
	quote, sig, vals, err := a.Quote(context.Background(), nonce, []uint32{0})
	if err != nil {
		t.Fatal(err)
	}
	checkQuote(t, a, nonce, quote, sig, []uint32{0}, vals)
	_ = a.Close()
	requireHandles(t, tpm, 0, "Close")
}

// A restart is a reboot: same identity and certificate, PCRs reset.
func TestSWTPMRestart(t *testing.T) {
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	tpm := sw.Open(t)
	a := newAgent(t, tpm, agent.Options{})
	ek, ak, cert := a.EKPublic(), a.AKPublic(), a.EKCertificate()
	extendPCR(t, tpm, 16, "x")
	_ = a.Close()
	_ = tpm.Close()

	sw.Restart(t)
	tpm2nd := sw.Open(t)
	b := newAgent(t, tpm2nd, agent.Options{})
	if !bytes.Equal(ek, b.EKPublic()) || !bytes.Equal(ak, b.AKPublic()) || !bytes.Equal(cert, b.EKCertificate()) {
		t.Errorf("identity changed across a restart")
	}
	if v := readPCRs(t, tpm2nd, []uint32{16})[16]; !bytes.Equal(v, make([]byte, 32)) {
		t.Errorf("PCR 16 = %x after restart, want zero", v)
	}
}

// A dead swtpm is a transport error with the deadline honoured, and the
// transport reconnects once it is back.
func TestSWTPMTransport(t *testing.T) {
	sw := swtpmtest.Start(t, swtpmtest.Options{})
	tpm := sw.Open(t)
	ctx := context.Background()
	a := newAgent(t, tpm, agent.Options{})
	_ = a.Close()
	sw.Stop()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := agent.New(cctx, tpm, agent.Options{})
	if !errors.Is(err, agent.ErrTransport) {
		t.Fatalf("New on a stopped swtpm: %v, want ErrTransport", err)
	}
	sw.Restart(t)
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatalf("after restart the transport did not reconnect: %v", err)
	}
}
