package attesttest_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/attesttest"
)

// TestIssuedCertificatesAreTCGShaped: what the CA issues is what the
// verifier accepts, and carries the TPM attributes it was given.
func TestIssuedCertificatesAreTCGShaped(t *testing.T) {
	ca := attesttest.NewEKCA(t)
	if b, _ := pem.Decode(ca.CertPEM()); b == nil || b.Type != "CERTIFICATE" {
		t.Fatal("CertPEM is not a PEM certificate")
	}
	inter := ca.NewIntermediate(t)
	inter.Manufacturer, inter.Model, inter.Version = "id:49465800", "SLB9672", "id:000F0010"
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	der := inter.IssueEKCert(t, k.Public(), now.Add(-time.Minute), now.Add(time.Hour))
	ek, err := attest.VerifyEKCertificate(der, ca.Pool(), inter.Pool(), now)
	if err != nil {
		t.Fatal(err)
	}
	info, err := attest.EKCertTPMInfo(ek.Certificate)
	if err != nil || info != (attest.TPMInfo{Manufacturer: "id:49465800", Model: "SLB9672", Version: "id:000F0010"}) {
		t.Fatalf("TPM info %+v, %v", info, err)
	}
	c, _ := x509.ParseCertificate(der)
	if len(c.Subject.Names) != 0 || c.KeyUsage != x509.KeyUsageKeyAgreement {
		t.Errorf("subject %v, key usage %v", c.Subject, c.KeyUsage)
	}
}
