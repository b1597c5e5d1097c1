package attest_test

import (
	"bytes"
	"crypto/elliptic"
	"errors"
	"testing"

	"github.com/cloudflare/circl/hpke"
	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// akTemplates are AK public areas with real keys, one per accepted scheme.
func akTemplates(t testing.TB) map[string]tpm2.TPMTPublic {
	t.Helper()
	n := testRSAKey(t).N.FillBytes(make([]byte, 256))
	withRSA := func(tmpl tpm2.TPMTPublic) tpm2.TPMTPublic {
		tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: n})
		return tmpl
	}
	p384 := testECCKey(t, elliptic.P384())
	ecc384 := tpmtest.ECCP384AKTemplate
	ecc384.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: eccXY(t, &p384.PublicKey)[0]},
		Y: tpm2.TPM2BECCParameter{Buffer: eccXY(t, &p384.PublicKey)[1]},
	})
	return map[string]tpm2.TPMTPublic{
		"RSA RSASSA-SHA256":      withRSA(tpmtest.RSAAKTemplate),
		"RSA RSAPSS-SHA256":      withRSA(tpmtest.RSAPSSAKTemplate),
		"ECC P-256 ECDSA-SHA256": *softAKFor(t).public,
		"ECC P-384 ECDSA-SHA384": ecc384,
	}
}

// TestCheckAKTemplate: the accepted AKs pass; each way of not being a
// trustworthy AK is refused with ErrAK and a reason saying what is wrong.
func TestCheckAKTemplate(t *testing.T) {
	good := akTemplates(t)
	for name, tmpl := range good {
		if err := attest.CheckAKTemplate(&tmpl); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	rsa := good["RSA RSASSA-SHA256"]
	ecc := good["ECC P-256 ECDSA-SHA256"]
	edit := func(base tpm2.TPMTPublic, f func(*tpm2.TPMTPublic)) *tpm2.TPMTPublic {
		f(&base)
		return &base
	}
	rsaParms := func(f func(*tpm2.TPMSRSAParms)) func(*tpm2.TPMTPublic) {
		return func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.RSADetail()
			c := *d
			f(&c)
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &c)
		}
	}
	eccParms := func(f func(*tpm2.TPMSECCParms)) func(*tpm2.TPMTPublic) {
		return func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.ECCDetail()
			c := *d
			f(&c)
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &c)
		}
	}
	rsaScheme := func(s tpm2.TPMAlgID, h tpm2.TPMAlgID) func(*tpm2.TPMSRSAParms) {
		return func(c *tpm2.TPMSRSAParms) {
			c.Scheme = tpm2.TPMTRSAScheme{Scheme: s, Details: tpm2.NewTPMUAsymScheme(s, &tpm2.TPMSSigSchemeRSASSA{HashAlg: h})}
			if s == tpm2.TPMAlgNull {
				c.Scheme = tpm2.TPMTRSAScheme{Scheme: s}
			}
		}
	}
	for _, c := range []struct {
		name   string
		pub    *tpm2.TPMTPublic
		reason string
	}{
		{"not restricted", edit(rsa, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Restricted = false }), "not restricted"},
		{"not a signing key", edit(rsa, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = false }), "not a signing key"},
		{"also decrypts", edit(rsa, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true }), "sign-only"},
		{"not fixedTPM", edit(ecc, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }), "fixedTPM"},
		{"not fixedParent", edit(ecc, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedParent = false }), "fixedParent"},
		{"imported key", edit(ecc, func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SensitiveDataOrigin = false }), "sensitiveDataOrigin"},
		{"SHA-1 name", edit(rsa, func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }), "name algorithm"},
		{"SHA-384 name", edit(ecc, func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA384 }), "name algorithm"},
		{"RSA scheme NULL", edit(rsa, rsaParms(rsaScheme(tpm2.TPMAlgNull, 0))), "RSASSA or RSAPSS"},
		{"RSASSA-SHA1", edit(rsa, rsaParms(rsaScheme(tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA1))), "SHA-256"},
		{"RSASSA-SHA384", edit(rsa, rsaParms(rsaScheme(tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA384))), "SHA-256"},
		{"RSA-1024", edit(rsa, rsaParms(func(c *tpm2.TPMSRSAParms) { c.KeyBits = 1024 })), "1024 bits"},
		{"RSA modulus short", edit(rsa, func(p *tpm2.TPMTPublic) {
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 255)})
		}), "modulus"},
		{"RSA exponent 3", edit(rsa, rsaParms(func(c *tpm2.TPMSRSAParms) { c.Exponent = 3 })), "exponent"},
		{"RSA with symmetric", edit(rsa, rsaParms(func(c *tpm2.TPMSRSAParms) {
			c.Symmetric = tpm2.TPMTSymDefObject{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			}
		})), "symmetric"},
		{"ECC scheme NULL", edit(ecc, eccParms(func(c *tpm2.TPMSECCParms) { c.Scheme = tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull} })), "ECDSA is required"},
		{"ECDSA-SHA1", edit(ecc, eccParms(func(c *tpm2.TPMSECCParms) {
			c.Scheme = tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA1})}
		})), "SHA-256 or SHA-384"},
		{"P-521", edit(ecc, eccParms(func(c *tpm2.TPMSECCParms) { c.CurveID = tpm2.TPMECCNistP521 })), "P-256 or P-384"},
		{"point off the curve", edit(ecc, func(p *tpm2.TPMTPublic) {
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
				X: tpm2.TPM2BECCParameter{Buffer: bytes.Repeat([]byte{1}, 32)}, Y: tpm2.TPM2BECCParameter{Buffer: bytes.Repeat([]byte{2}, 32)},
			})
		}), "not on the curve"},
		{"ECC with KDF", edit(ecc, eccParms(func(c *tpm2.TPMSECCParms) {
			c.KDF = tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgKDF1SP800108, Details: tpm2.NewTPMUKDFScheme(tpm2.TPMAlgKDF1SP800108, &tpm2.TPMSKDFSchemeKDF1SP800108{HashAlg: tpm2.TPMAlgSHA256})}
		})), "KDF"},
		{"EK", edit(tpm2.RSAEKTemplate, func(p *tpm2.TPMTPublic) { p.Unique = rsa.Unique }), "signing key"},
		{"KEYEDHASH", &tpm2.TPMTPublic{
			Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: rsa.ObjectAttributes,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
			Unique:     tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)}),
		}, "RSA or ECC"},
		{"nil", nil, "no AK"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := attest.CheckAKTemplate(c.pub)
			wantReason(t, wantRefusal(t, err, attest.ErrAK), c.reason)
			if c.pub == nil {
				return
			}
			// The same public area sent by a node is refused by
			// ParseAKPublic too.
			_, _, err = attest.ParseAKPublic(tpm2.Marshal(tpm2.New2B(*c.pub)))
			wantRefusal(t, err, attest.ErrAK)
		})
	}
}

// TestParseAKPublic: the name is the TPM's, and the encoding is strict.
func TestParseAKPublic(t *testing.T) {
	tpm := tpmtest.Open(t)
	for name, tmpl := range map[string]tpm2.TPMTPublic{
		"RSA": tpmtest.RSAAKTemplate, "RSAPSS": tpmtest.RSAPSSAKTemplate, "ECC": tpmtest.ECCAKTemplate, "ECC P-384": tpmtest.ECCP384AKTemplate,
	} {
		t.Run(name, func(t *testing.T) {
			ak := tpmtest.AK(t, tpm, tmpl)
			pub, n, err := attest.ParseAKPublic(ak.PublicBytes)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(n, ak.Name.Buffer) {
				t.Errorf("name %x, the TPM says %x", n, ak.Name.Buffer)
			}
			if pub.Type != tmpl.Type {
				t.Errorf("type %v", pub.Type)
			}
		})
	}
	ak := softAKFor(t).publicBytes
	for name, b := range map[string][]byte{
		"empty":         nil,
		"size only":     {0, 0},
		"size too big":  append([]byte{0xff, 0xff}, ak[2:]...),
		"trailing byte": append(bytes.Clone(ak), 0),
		"bare TPMT":     ak[2:],
		"truncated":     ak[:len(ak)-1],
		"huge":          make([]byte, 5000),
	} {
		_, _, err := attest.ParseAKPublic(b)
		if !errors.Is(err, attest.ErrAK) {
			t.Errorf("%s: %v, want ErrAK", name, err)
		}
	}
}

// TestCheckBindingKey: only a canonical X-Wing public key is a binding key.
func TestCheckBindingKey(t *testing.T) {
	bk := bindingKey(t)
	if err := attest.CheckBindingKey(bk); err != nil {
		t.Fatal(err)
	}
	p256, _, err := hpke.KEM_P256_HKDF_SHA256.Scheme().GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	p256b, _ := p256.MarshalBinary()
	for name, b := range map[string][]byte{
		"empty":     nil,
		"short":     bk[:len(bk)-1],
		"long":      append(bytes.Clone(bk), 0),
		"P-256 KEM": p256b,
		// ML-KEM-768 coefficients must be below q = 3329: all-0xFF
		// encodes 4095.
		"ML-KEM part not reduced": bytes.Repeat([]byte{0xFF}, len(bk)),
	} {
		t.Run(name, func(t *testing.T) {
			wantRefusal(t, attest.CheckBindingKey(b), attest.ErrBindingKey)
		})
	}
}

// TestVerifyRefusesBadInputs covers Verify's own checks that need no
// quote: caller bugs are plain errors, node faults are refusals.
func TestVerifyRefusesBadInputs(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.ECCAKTemplate)
	ref := subset(tpmtest.ReadPCRs(t, tpm, 7), 7)
	ch := n.challenge(t, 7)
	ev := n.answer(t, ch, 7)
	if _, err := attest.Verify(ch, ev, policyFor(ref)); err != nil {
		t.Fatalf("control: %v", err)
	}

	var refusal *attest.Error
	for name, run := range map[string]func() error{
		"nil challenge": func() error { _, err := attest.Verify(nil, ev, policyFor(ref)); return err },
		"nil evidence":  func() error { _, err := attest.Verify(ch, nil, policyFor(ref)); return err },
		"no time": func() error {
			_, err := attest.Verify(ch, ev, attest.Policy{PCRs: ref})
			return err
		},
		"short reference value": func() error {
			_, err := attest.Verify(ch, ev, policyFor(map[uint32][]byte{7: ref[7][:20]}))
			return err
		},
		"challenge without secret": func() error {
			c := *ch
			c.Secret = nil
			_, err := attest.Verify(&c, ev, policyFor(ref))
			return err
		},
	} {
		if err := run(); err == nil || errors.As(err, &refusal) {
			t.Errorf("%s: %v, want a plain error", name, err)
		}
	}

	t.Run("bad binding key", func(t *testing.T) {
		e := *ev
		e.BindingKey = e.BindingKey[:100]
		_, err := attest.Verify(ch, &e, policyFor(ref))
		wantRefusal(t, err, attest.ErrBindingKey)
	})
	t.Run("revoked between challenge and evidence", func(t *testing.T) {
		pol := policyFor(ref)
		pol.RevokedFingerprints = map[string]bool{n.ek.Fingerprint: true}
		_, err := attest.Verify(ch, ev, pol)
		wantRefusal(t, err, attest.ErrEK)
	})
	t.Run("wrong secret", func(t *testing.T) {
		e := *ev
		e.ActivatedSecret = bytes.Clone(ev.ActivatedSecret)
		e.ActivatedSecret[0] ^= 1
		_, err := attest.Verify(ch, &e, policyFor(ref))
		wantRefusal(t, err, attest.ErrSecret)
	})
}
