package attest_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/attesttest"
)

var (
	rsaKeyOnce sync.Once
	rsaKey     *rsa.PrivateKey
)

// testRSAKey is one RSA-2048 key for the software-only tests.
func testRSAKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	rsaKeyOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return rsaKey
}

func testECCKey(t testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func pkixFingerprint(t testing.TB, pub crypto.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// rsaEKPublic is the TPM2B_PUBLIC of an EK of template L-1 with key k.
func rsaEKPublic(k *rsa.PublicKey) []byte {
	t := tpm2.RSAEKTemplate
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
	return tpm2.Marshal(tpm2.New2B(t))
}

// TestEKCertOtherCAOrExpired: an EK certificate is accepted only when it
// chains to a configured manufacturer CA and is valid now, and its key
// is the EK.
func TestEKCertOtherCAOrExpired(t *testing.T) {
	ca := attesttest.NewEKCA(t)
	other := attesttest.NewEKCA(t)
	key := &testRSAKey(t).PublicKey
	year := 365 * 24 * time.Hour
	good := ca.IssueEKCert(t, key, now.Add(-year), now.Add(10*year))

	t.Run("good", func(t *testing.T) {
		ek, err := attest.VerifyEKCertificate(good, ca.Pool(), nil, now)
		if err != nil {
			t.Fatalf("VerifyEKCertificate: %v", err)
		}
		if ek.Certificate == nil || ek.Fingerprint != pkixFingerprint(t, key) || len(ek.Quirks) != 0 {
			t.Fatalf("EK %+v", ek)
		}
		info, err := attest.EKCertTPMInfo(ek.Certificate)
		if err != nil {
			t.Fatal(err)
		}
		if info != (attest.TPMInfo{Manufacturer: attesttest.DefaultManufacturer, Model: attesttest.DefaultModel, Version: attesttest.DefaultVersion}) {
			t.Errorf("TPMInfo %+v", info)
		}
		// Go alone refuses it: the reason ParseEKCertificate exists.
		c, err := x509.ParseCertificate(good)
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.Verify(x509.VerifyOptions{Roots: ca.Pool(), CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		var uce x509.UnhandledCriticalExtension
		if !errors.As(err, &uce) {
			t.Errorf("Go's x509 verified a TCG EK certificate (%v); is the SAN still critical?", err)
		}
		// PEM is accepted too.
		pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good})
		if _, err := attest.VerifyEKCertificate(pemCert, ca.Pool(), nil, now); err != nil {
			t.Errorf("PEM: %v", err)
		}
	})
	t.Run("ECC P-256 EK through an intermediate", func(t *testing.T) {
		inter := ca.NewIntermediate(t)
		ecc := testECCKey(t, elliptic.P256())
		der := inter.IssueEKCert(t, ecc.Public(), now.Add(-year), now.Add(year))
		ek, err := attest.VerifyEKCertificate(der, ca.Pool(), inter.Pool(), now)
		if err != nil {
			t.Fatalf("VerifyEKCertificate: %v", err)
		}
		if ek.Fingerprint != pkixFingerprint(t, ecc.Public()) {
			t.Errorf("fingerprint %s", ek.Fingerprint)
		}
		_, err = attest.VerifyEKCertificate(der, ca.Pool(), nil, now)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("other CA", func(t *testing.T) {
		der := other.IssueEKCert(t, key, now.Add(-year), now.Add(10*year))
		_, err := attest.VerifyEKCertificate(der, ca.Pool(), nil, now)
		wantReason(t, wantRefusal(t, err, attest.ErrEK), "does not chain to a configured TPM manufacturer CA")
		// The other CA's own intermediate offered as an intermediate does
		// not help either.
		_, err = attest.VerifyEKCertificate(der, ca.Pool(), other.Pool(), now)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("expired", func(t *testing.T) {
		der := ca.IssueEKCert(t, key, now.Add(-10*year), now.Add(-24*time.Hour))
		_, err := attest.VerifyEKCertificate(der, ca.Pool(), nil, now)
		wantReason(t, wantRefusal(t, err, attest.ErrEK), "expired")
	})
	t.Run("not yet valid", func(t *testing.T) {
		der := ca.IssueEKCert(t, key, now.Add(24*time.Hour), now.Add(10*year))
		_, err := attest.VerifyEKCertificate(der, ca.Pool(), nil, now)
		wantReason(t, wantRefusal(t, err, attest.ErrEK), "not valid before")
	})
	t.Run("no roots", func(t *testing.T) {
		_, err := attest.VerifyEKCertificate(good, nil, nil, now)
		var e *attest.Error
		if err == nil || errors.As(err, &e) {
			t.Fatalf("nil roots: %v, want a plain error (a configuration bug, not a refusal)", err)
		}
	})
	t.Run("padded in NV", func(t *testing.T) {
		for _, pad := range []byte{0x00, 0xFF} {
			padded := append(bytes.Clone(good), bytes.Repeat([]byte{pad}, 300)...)
			ek, err := attest.VerifyEKCertificate(padded, ca.Pool(), nil, now)
			if err != nil {
				t.Fatalf("padding %02x: %v", pad, err)
			}
			if len(ek.Quirks) != 1 {
				t.Errorf("quirks %v", ek.Quirks)
			}
		}
		_, err := attest.VerifyEKCertificate(append(bytes.Clone(good), 0, 1, 0), ca.Pool(), nil, now)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("public area joined", func(t *testing.T) {
		ek, err := attest.VerifyEKCertificate(good, ca.Pool(), nil, now)
		if err != nil {
			t.Fatal(err)
		}
		joined, err := ek.WithTPMPublic(rsaEKPublic(key))
		if err != nil || joined.Public == nil || joined.Certificate == nil || joined.Fingerprint != ek.Fingerprint {
			t.Fatalf("WithTPMPublic: %v %+v", err, joined)
		}
		otherKey, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		_, err = ek.WithTPMPublic(rsaEKPublic(&otherKey.PublicKey))
		wantRefusal(t, err, attest.ErrEK)
		// A PKIX key is not a public area.
		der, _ := x509.MarshalPKIXPublicKey(key)
		_, err = ek.WithTPMPublic(der)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("revoked", func(t *testing.T) {
		ek, err := attest.VerifyEKCertificate(good, ca.Pool(), nil, now)
		if err != nil {
			t.Fatal(err)
		}
		if err := attest.CheckRevoked(ek, map[string]bool{"00": true}, map[string]bool{"00:1": true}); err != nil {
			t.Fatalf("not revoked: %v", err)
		}
		err = attest.CheckRevoked(ek, map[string]bool{ek.Fingerprint: true}, nil)
		wantReason(t, wantRefusal(t, err, attest.ErrEK), "revoked")
		serial := attest.SerialKey(ek.Certificate.RawIssuer, ek.Certificate.SerialNumber)
		err = attest.CheckRevoked(ek, nil, map[string]bool{serial: true})
		wantReason(t, wantRefusal(t, err, attest.ErrEK), "revoked")
		// The same serial from another issuer is another certificate.
		otherSerial := attest.SerialKey([]byte("another issuer name"), ek.Certificate.SerialNumber)
		if err := attest.CheckRevoked(ek, nil, map[string]bool{otherSerial: true}); err != nil {
			t.Fatalf("revoked by another issuer's serial: %v", err)
		}
	})
}

// TestEKCertificateShape: certificates that are not TCG EK certificates
// are refused, whoever signed them.
func TestEKCertificateShape(t *testing.T) {
	caKey := testECCKey(t, elliptic.P256())
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "shape CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	pool := x509.NewCertPool()
	pool.AddCert(caCert)

	san, err := attesttest.SANExtension("id:49465800", "SLB9670", "id:00070055")
	if err != nil {
		t.Fatal(err)
	}
	issue := func(t *testing.T, pub crypto.PublicKey, edit func(*x509.Certificate)) []byte {
		t.Helper()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(2), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
			KeyUsage: x509.KeyUsageKeyEncipherment, ExtraExtensions: []pkix.Extension{san},
			UnknownExtKeyUsage: []asn1.ObjectIdentifier{attest.OIDEKCertificate},
		}
		edit(tmpl)
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, pub, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	rsaPub := &testRSAKey(t).PublicKey

	if _, err := attest.VerifyEKCertificate(issue(t, rsaPub, func(*x509.Certificate) {}), pool, nil, now); err != nil {
		t.Fatalf("control certificate: %v", err)
	}
	// One RDN per attribute, non-critical SAN, no EKU: all seen in the
	// field, all accepted.
	perRDN := func() pkix.Extension {
		utf8 := func(s string) asn1.RawValue {
			return asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagUTF8String, Bytes: []byte(s)}
		}
		name, _ := asn1.Marshal(pkix.RDNSequence{
			{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: utf8("id:53544D20")}},
			{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: utf8("ST33")}},
			{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: utf8("id:00010101")}},
		})
		v, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}})
		return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Value: v}
	}()
	der := issue(t, rsaPub, func(c *x509.Certificate) {
		c.ExtraExtensions = []pkix.Extension{perRDN}
		c.UnknownExtKeyUsage = nil
	})
	ek, err := attest.VerifyEKCertificate(der, pool, nil, now)
	if err != nil {
		t.Fatalf("per-RDN SAN: %v", err)
	}
	if info, _ := attest.EKCertTPMInfo(ek.Certificate); info.Manufacturer != "id:53544D20" || info.Model != "ST33" {
		t.Errorf("TPMInfo %+v", info)
	}

	sanWith := func(names ...asn1.RawValue) pkix.Extension {
		v, _ := asn1.Marshal(names)
		return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: v}
	}
	dirName := func(attrs ...pkix.AttributeTypeAndValue) asn1.RawValue {
		name, _ := asn1.Marshal(pkix.RDNSequence{attrs})
		return asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}
	}
	m := pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:49465800"}
	mo := pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "SLB9670"}
	v := pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:00070055"}
	dns := asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("tpm.example")}

	for name, edit := range map[string]func(*x509.Certificate){
		"no SAN": func(c *x509.Certificate) { c.ExtraExtensions = nil },
		"SAN without tpmVersion": func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{sanWith(dirName(m, mo))}
		},
		"tpmModel twice": func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{sanWith(dirName(m, mo, mo, v))}
		},
		"DNS name beside the directoryName": func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{sanWith(dirName(m, mo, v), dns)}
		},
		"SAN not DER": func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: []byte{0x30, 0x80}}}
		},
		"serverAuth only": func(c *x509.Certificate) {
			c.UnknownExtKeyUsage = nil
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		},
		"unknown critical extension": func(c *x509.Certificate) {
			c.ExtraExtensions = append(c.ExtraExtensions, pkix.Extension{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Critical: true, Value: []byte{5, 0}})
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := attest.VerifyEKCertificate(issue(t, rsaPub, edit), pool, nil, now)
			wantRefusal(t, err, attest.ErrEK)
		})
	}
	t.Run("RSA-1024 key", func(t *testing.T) {
		small, err := rsa.GenerateKey(rand.Reader, 1024)
		if err != nil {
			t.Fatal(err)
		}
		_, err = attest.VerifyEKCertificate(issue(t, &small.PublicKey, func(*x509.Certificate) {}), pool, nil, now)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("P-521 key", func(t *testing.T) {
		_, err = attest.VerifyEKCertificate(issue(t, testECCKey(t, elliptic.P521()).Public(), func(*x509.Certificate) {}), pool, nil, now)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("not a certificate", func(t *testing.T) {
		for _, b := range [][]byte{nil, []byte("junk"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte{1}})} {
			_, err := attest.ParseEKCertificate(b)
			wantRefusal(t, err, attest.ErrEK)
		}
		_, err := attest.EKCertTPMInfo(nil)
		wantRefusal(t, err, attest.ErrEK)
	})
}

// TestParseEKPublic: every accepted form gives the same EK, and keys or
// public areas that cannot be an EK are refused.
func TestParseEKPublic(t *testing.T) {
	key := &testRSAKey(t).PublicKey
	fp := pkixFingerprint(t, key)
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		t.Fatal(err)
	}
	tpm2b := rsaEKPublic(key)
	for name, b := range map[string][]byte{
		"PKIX DER":     der,
		"PKIX PEM":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}),
		"TPM2B_PUBLIC": tpm2b,
		"TPMT_PUBLIC":  tpm2b[2:],
	} {
		ek, err := attest.ParseEKPublic(b)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if ek.Fingerprint != fp {
			t.Errorf("%s: fingerprint %s, want %s", name, ek.Fingerprint, fp)
		}
		if (ek.Public != nil) != (name == "TPM2B_PUBLIC" || name == "TPMT_PUBLIC") {
			t.Errorf("%s: Public %v", name, ek.Public)
		}
	}

	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	smallDER, _ := x509.MarshalPKIXPublicKey(&small.PublicKey)
	p521DER, _ := x509.MarshalPKIXPublicKey(testECCKey(t, elliptic.P521()).Public())
	edDER := []byte{0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00}
	edDER = append(edDER, make([]byte, 32)...)
	ekTemplate := func(edit func(*tpm2.TPMTPublic)) []byte {
		tp := tpm2.RSAEKTemplate
		tp.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: key.N.FillBytes(make([]byte, 256))})
		edit(&tp)
		return tpm2.Marshal(tpm2.New2B(tp))
	}
	for name, b := range map[string][]byte{
		"empty":           nil,
		"RSA-1024":        smallDER,
		"P-521":           p521DER,
		"Ed25519":         edDER,
		"trailing byte":   append(bytes.Clone(tpm2b), 0),
		"signing EK":      ekTemplate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = true }),
		"not restricted":  ekTemplate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Restricted = false }),
		"not fixedTPM":    ekTemplate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }),
		"SHA-1 name":      ekTemplate(func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }),
		"PEM certificate": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := attest.ParseEKPublic(b)
			wantRefusal(t, err, attest.ErrEK)
		})
	}
}

// TestNewChallengeRefusals: NewChallenge checks what it is given.
func TestNewChallengeRefusals(t *testing.T) {
	ek, err := attest.ParseEKPublic(rsaEKPublic(&testRSAKey(t).PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	ak := softAKFor(t).publicBytes
	if _, err := attest.NewChallenge(rand.Reader, ek, ak, []uint32{7, 7, 0}, time.Minute, now); err != nil {
		t.Fatalf("control: %v", err)
	}
	ch, _ := attest.NewChallenge(nil, ek, ak, []uint32{16, 7, 7, 0}, time.Minute, now)
	if ch == nil || len(ch.PCRSelection) != 3 || ch.PCRSelection[0] != 0 || ch.PCRSelection[2] != 16 {
		t.Errorf("PCR selection %v, want [0 7 16]", ch.PCRSelection)
	}

	// A pinned RSA-3072 EK has no default template to assume.
	big3072, err := rsa.GenerateKey(rand.Reader, 3072)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&big3072.PublicKey)
	pinned, err := attest.ParseEKPublic(der)
	if err != nil {
		t.Fatal(err)
	}
	_, err = attest.NewChallenge(rand.Reader, pinned, ak, nil, time.Minute, now)
	wantReason(t, wantRefusal(t, err, attest.ErrEK), "default template")

	_, err = attest.NewChallenge(rand.Reader, nil, ak, nil, time.Minute, now)
	wantRefusal(t, err, attest.ErrEK)
	_, err = attest.NewChallenge(rand.Reader, ek, ak[:10], nil, time.Minute, now)
	wantRefusal(t, err, attest.ErrAK)
	_, err = attest.NewChallenge(rand.Reader, ek, rsaEKPublic(&testRSAKey(t).PublicKey), nil, time.Minute, now)
	wantRefusal(t, err, attest.ErrAK)

	// Caller bugs are plain errors.
	var refusal *attest.Error
	for name, err := range map[string]error{
		"zero TTL": func() error { _, err := attest.NewChallenge(rand.Reader, ek, ak, nil, 0, now); return err }(),
		"no time": func() error {
			_, err := attest.NewChallenge(rand.Reader, ek, ak, nil, time.Minute, time.Time{})
			return err
		}(),
		"PCR 24": func() error {
			_, err := attest.NewChallenge(rand.Reader, ek, ak, []uint32{24}, time.Minute, now)
			return err
		}(),
	} {
		if err == nil || errors.As(err, &refusal) {
			t.Errorf("%s: %v, want a plain error", name, err)
		}
	}
}
