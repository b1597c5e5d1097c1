// Package attesttest helps tests that need TPM EK certificates: a local EK
// certificate authority that issues certificates shaped like those of TPM
// manufacturers (TCG EK Credential Profile 2.0): an empty subject, a
// critical subject alternative name holding a directoryName with the TCG
// attributes tpmManufacturer, tpmModel and tpmVersion, the extended key
// usage tcg-kp-EKCertificate, and a key usage of keyEncipherment (RSA) or
// keyAgreement (ECC).
//
// It is for tests only: keys live in memory and failures end the test.
package attesttest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"testing"
	"time"
)

// TCG EK Credential Profile OIDs.
var (
	oidSubjectAltName  = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidEKCertificate   = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
)

// Default TPM attributes of issued certificates: those the TPM simulator
// (Microsoft's reference implementation) reports.
const (
	DefaultManufacturer = "id:4D534654" // "MSFT"
	DefaultModel        = "coffre test TPM"
	DefaultVersion      = "id:00010002"
)

// EKCA is a local EK certificate authority: a root made by [NewEKCA], or
// an intermediate made by [EKCA.NewIntermediate].
type EKCA struct {
	cert *x509.Certificate
	key  crypto.Signer

	// Manufacturer, Model and Version go into the TCG subject alternative
	// name of the certificates IssueEKCert issues; they start as the
	// Default values.
	Manufacturer, Model, Version string
}

// NewEKCA makes a root EK CA (ECDSA P-256), valid from an hour ago for
// twenty years.
func NewEKCA(t testing.TB) *EKCA {
	t.Helper()
	return newCA(t, nil, "Coffre Test TPM EK Root CA")
}

// NewIntermediate makes an intermediate CA under ca, as manufacturers
// issue EK certificates from intermediates. Verify with the root's Pool
// as roots and the intermediate's Pool as intermediates.
func (ca *EKCA) NewIntermediate(t testing.TB) *EKCA {
	t.Helper()
	return newCA(t, ca, "Coffre Test TPM EK Intermediate CA")
}

func newCA(t testing.TB, parent *EKCA, cn string) *EKCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{Organization: []string{"Coffre test"}, CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	issuer, signer := tmpl, crypto.Signer(key)
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &EKCA{cert: cert, key: key, Manufacturer: DefaultManufacturer, Model: DefaultModel, Version: DefaultVersion}
}

// Certificate returns the CA's certificate.
func (ca *EKCA) Certificate() *x509.Certificate { return ca.cert }

// CertPEM returns the CA's certificate in PEM, as an operator would add it
// with `coffrectl ca add-ek-root`.
func (ca *EKCA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// Pool returns a pool holding the CA's certificate.
func (ca *EKCA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// IssueEKCert issues an EK certificate (DER) for pub, an *rsa.PublicKey or
// *ecdsa.PublicKey, valid from notBefore to notAfter (which may lie in the
// past, to make an expired certificate).
func (ca *EKCA) IssueEKCert(t testing.TB, pub crypto.PublicKey, notBefore, notAfter time.Time) []byte {
	t.Helper()
	usage := x509.KeyUsageKeyEncipherment
	switch pub.(type) {
	case *rsa.PublicKey:
	case *ecdsa.PublicKey:
		usage = x509.KeyUsageKeyAgreement
	default:
		t.Fatalf("attesttest: EK key %T is not RSA or ECDSA", pub)
	}
	san, err := SANExtension(ca.Manufacturer, ca.Model, ca.Version)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              usage,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{oidEKCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{san},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatalf("attesttest: issuing the EK certificate: %v", err)
	}
	return der
}

// SANExtension returns the critical subject alternative name of a TCG EK
// certificate: GeneralNames holding one directoryName whose single RDN
// holds tpmManufacturer, tpmModel and tpmVersion as UTF8Strings (the EK
// Credential Profile's encoding).
func SANExtension(manufacturer, model, version string) (pkix.Extension, error) {
	utf8 := func(s string) asn1.RawValue {
		return asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagUTF8String, Bytes: []byte(s)}
	}
	type attr struct {
		Type  asn1.ObjectIdentifier
		Value asn1.RawValue
	}
	// encoding/asn1 encodes a slice type whose name ends in SET as a SET OF.
	type rdnSET []attr
	name, err := asn1.Marshal([]rdnSET{{
		{oidTPMManufacturer, utf8(manufacturer)},
		{oidTPMModel, utf8(model)},
		{oidTPMVersion, utf8(version)},
	}})
	if err != nil {
		return pkix.Extension{}, err
	}
	names, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectAltName, Critical: true, Value: names}, nil
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n.Add(n, big.NewInt(1))
}
