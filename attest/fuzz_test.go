package attest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/attesttest"
)

// Every parser of node input is fuzzed. The targets check that the code
// never panics and that every failure is a refusal (*attest.Error), never
// another kind of error: a node must always get a reason.

func mustRefusal(t *testing.T, err error) {
	t.Helper()
	var e *attest.Error
	if err != nil && (!errors.As(err, &e) || e.Reason == "" || e.Check == nil) {
		t.Fatalf("not a refusal with a reason: %v", err)
	}
}

// seedRSAPublic is the RSA key of the seeds (the process's test key).
func seedRSAPublic(t testing.TB) *rsa.PublicKey {
	t.Helper()
	k := testRSAKey(t)
	return &rsa.PublicKey{N: new(big.Int).Set(k.N), E: k.E}
}

func FuzzParseEKPublic(f *testing.F) {
	rsaPub := seedRSAPublic(f)
	der, _ := x509.MarshalPKIXPublicKey(rsaPub)
	ecc, _ := ecdsa.ParseRawPrivateKey(elliptic.P256(), softAKScalar)
	eccDER, _ := x509.MarshalPKIXPublicKey(ecc.Public())
	ekECC := tpm2.ECCEKTemplate
	ekECC.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: eccXY(f, &ecc.PublicKey)[0]},
		Y: tpm2.TPM2BECCParameter{Buffer: eccXY(f, &ecc.PublicKey)[1]},
	})
	f.Add(der)
	f.Add(eccDER)
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	f.Add(rsaEKPublic(rsaPub))
	f.Add(rsaEKPublic(rsaPub)[2:])
	f.Add(tpm2.Marshal(tpm2.New2B(ekECC)))
	f.Add(tpm2.Marshal(ekECC))
	f.Fuzz(func(t *testing.T, b []byte) {
		ek, err := attest.ParseEKPublic(b)
		mustRefusal(t, err)
		if err != nil {
			return
		}
		if ek.PublicKey == nil || len(ek.Fingerprint) != 64 {
			t.Fatalf("accepted EK without key or fingerprint: %+v", ek)
		}
		// What was accepted can be challenged or is refused cleanly.
		_, err = attest.NewChallenge(nil, ek, softAKFor(t).publicBytes, []uint32{7}, time.Minute, now)
		mustRefusal(t, err)
	})
}

func FuzzParseEKCertificate(f *testing.F) {
	ca := attesttest.NewEKCA(f)
	good := ca.IssueEKCert(f, seedRSAPublic(f), now.Add(-time.Hour), now.Add(time.Hour))
	ecc, _ := ecdsa.ParseRawPrivateKey(elliptic.P256(), softAKScalar)
	f.Add(good)
	f.Add(ca.IssueEKCert(f, ecc.Public(), now.Add(-time.Hour), now.Add(time.Hour)))
	f.Add(append(bytes.Clone(good), make([]byte, 64)...))
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good}))
	if b, err := os.ReadFile(filepath.Join("..", "testdata", "tpm2-tools", "ek-cert.der")); err == nil {
		f.Add(b) // swtpm's EK certificate, when present
	}
	pool := ca.Pool()
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := attest.ParseEKCertificate(b)
		mustRefusal(t, err)
		if err != nil {
			return
		}
		if _, err := attest.EKCertTPMInfo(c); err != nil {
			t.Fatalf("accepted certificate without TPM info: %v", err)
		}
		_, err = attest.VerifyEKCertificate(b, pool, nil, now)
		mustRefusal(t, err)
	})
}

func FuzzParseAKPublic(f *testing.F) {
	for _, tmpl := range akTemplates(f) {
		f.Add(tpm2.Marshal(tpm2.New2B(tmpl)))
	}
	f.Add(rsaEKPublic(seedRSAPublic(f)))
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, name, err := attest.ParseAKPublic(b)
		mustRefusal(t, err)
		if err != nil {
			return
		}
		if err := attest.CheckAKTemplate(pub); err != nil {
			t.Fatalf("ParseAKPublic accepted what CheckAKTemplate refuses: %v", err)
		}
		if len(name) != 34 {
			t.Fatalf("name of %d bytes", len(name))
		}
	})
}

// FuzzVerifyQuote fuzzes the quote and signature bytes against a fixed
// (soft) AK, PCR values and qualifying data; the seeds verify.
func FuzzVerifyQuote(f *testing.F) {
	ak := softAKFor(f)
	in := defaultSoftQuoteInput()
	quote := tpm2.Marshal(ak.attestFor(in))
	f.Add(quote, ak.sign(f, quote, tpm2.TPMAlgSHA256))
	f.Add(quote, ak.sign(f, quote, tpm2.TPMAlgSHA384))
	if _, err := attest.VerifyQuote(ak.public, quote, ak.sign(f, quote, tpm2.TPMAlgSHA256), in.pcrs, in.extra); err != nil {
		f.Fatalf("seed does not verify: %v", err)
	}
	f.Fuzz(func(t *testing.T, quote, sig []byte) {
		qi, err := attest.VerifyQuote(ak.public, quote, sig, in.pcrs, in.extra)
		mustRefusal(t, err)
		if err == nil && len(qi.PCRs) != len(in.pcrs) {
			t.Fatalf("verified quote selects %v", qi.PCRs)
		}
	})
}

// FuzzEventLog fuzzes ReplayEventLog, the event log entry point, against
// the PCR values of the recorded workstation log.
func FuzzEventLog(f *testing.F) {
	arch := readEventLog(f, "arch-linux-workstation.bin")
	pcrs := replaySHA256(f, arch)
	for _, name := range []string{"arch-linux-workstation.bin", "glinux-alex.bin", "debian-10.bin"} {
		f.Add(readEventLog(f, name))
	}
	f.Add(newAgileLog().event(7, 4, "\x00\x00\x00\x00").event(0, 8, "fw").Bytes())
	f.Add(append(bytes.Clone(arch), bytes.Repeat([]byte{0xFF}, 16)...))
	f.Fuzz(func(t *testing.T, log []byte) {
		mustRefusal(t, attest.ReplayEventLog(log, pcrs))
	})
}

// TestSoftAKIsNotATPM documents what the soft AK of the fuzz targets is:
// the template check cannot tell it from a TPM key, which is why the
// protocol binds the AK to the EK by credential activation.
func TestSoftAKIsNotATPM(t *testing.T) {
	if err := attest.CheckAKTemplate(softAKFor(t).public); err != nil {
		t.Fatal(err)
	}
}
