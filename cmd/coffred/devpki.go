package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"io/fs"
	"math/big"
	"net"
	"os"
	"slices"
	"time"
)

// The development PKI: a local CA that issues the server certificate and
// the admin client certificate of "coffred dev". It is for a developer's
// machine only; every key is ECDSA P-256 in a 0600 file.

const (
	devCAValidity   = 10 * 365 * 24 * time.Hour
	devLeafValidity = 365 * 24 * time.Hour
	// devRenewBefore: a leaf closer than this to expiry is reissued at the
	// next start, so a long-lived dev directory keeps working.
	devRenewBefore = 30 * 24 * time.Hour
)

type devCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// leafSpec describes a certificate issued by the dev CA.
type leafSpec struct {
	certFile, keyFile string
	commonName        string
	usage             x509.ExtKeyUsage
	dnsNames          []string
	ips               []net.IP
}

// ensureCA loads the dev CA from certFile and keyFile or, if neither
// exists, creates it. It reports whether it created one.
func ensureCA(certFile, keyFile string, now time.Time) (*devCA, bool, error) {
	certExists, keyExists := fileExists(certFile), fileExists(keyFile)
	switch {
	case certExists && keyExists:
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, false, fmt.Errorf("dev CA: %w", err)
		}
		signer, ok := pair.PrivateKey.(crypto.Signer)
		if !ok {
			return nil, false, fmt.Errorf("dev CA: %s: not a signing key", keyFile)
		}
		if !pair.Leaf.IsCA {
			return nil, false, fmt.Errorf("dev CA: %s is not a CA certificate", certFile)
		}
		if now.After(pair.Leaf.NotAfter) {
			return nil, false, fmt.Errorf("dev CA: %s expired on %s; remove the dev directory to start over", certFile, pair.Leaf.NotAfter.Format(time.DateOnly))
		}
		return &devCA{cert: pair.Leaf, key: signer}, false, nil
	case certExists || keyExists:
		// Half a CA cannot be repaired without invalidating what it issued;
		// say so rather than guess.
		return nil, false, fmt.Errorf("dev CA: only one of %s and %s exists; remove the dev directory to start over", certFile, keyFile)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, false, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "Coffre development CA", Organization: []string{"Coffre dev"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(devCAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, false, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, false, err
	}
	// The key first: a CA certificate without its key would block the next
	// start, while a stray key without a certificate is reported above.
	if err := writeKeyFile(keyFile, key); err != nil {
		return nil, false, err
	}
	if err := atomicfile.WriteFile(certFile, pemCert(der), 0o644); err != nil {
		return nil, false, err
	}
	return &devCA{cert: cert, key: key}, true, nil
}

// ensureLeaf keeps the certificate in spec's files if it is still good (its
// key matches, it chains to ca, it has the usage and names asked for, and
// it is not about to expire) and issues a new one otherwise. It reports
// whether it issued.
func (ca *devCA) ensureLeaf(spec leafSpec, now time.Time) (bool, error) {
	if ca.leafIsGood(spec, now) {
		return false, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return false, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: spec.commonName, Organization: []string{"Coffre dev"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(devLeafValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{spec.usage},
		BasicConstraintsValid: true,
		DNSNames:              spec.dnsNames,
		IPAddresses:           spec.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return false, err
	}
	if err := writeKeyFile(spec.keyFile, key); err != nil {
		return false, err
	}
	if err := atomicfile.WriteFile(spec.certFile, pemCert(der), 0o644); err != nil {
		return false, err
	}
	return true, nil
}

func (ca *devCA) leafIsGood(spec leafSpec, now time.Time) bool {
	pair, err := tls.LoadX509KeyPair(spec.certFile, spec.keyFile)
	if err != nil {
		return false
	}
	leaf := pair.Leaf
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:       roots,
		CurrentTime: now.Add(devRenewBefore),
		KeyUsages:   []x509.ExtKeyUsage{spec.usage},
	}); err != nil {
		return false
	}
	if leaf.Subject.CommonName != spec.commonName || !slices.Equal(leaf.DNSNames, spec.dnsNames) {
		return false
	}
	return slices.EqualFunc(leaf.IPAddresses, spec.ips, net.IP.Equal)
}

func randomSerial() *big.Int {
	// 128 random bits, as CA/Browser Forum practice asks (at least 64).
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n.Add(n, big.NewInt(1))
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func writeKeyFile(name string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	defer clear(der)
	defer clear(data)
	return atomicfile.WriteFile(name, data, 0o600)
}

func fileExists(name string) bool {
	_, err := os.Lstat(name)
	return err == nil || !errors.Is(err, fs.ErrNotExist)
}
