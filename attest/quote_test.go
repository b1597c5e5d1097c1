package attest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// softAK is an ECDSA P-256 key outside any TPM wearing the template of a
// restricted AK. It lets tests and fuzz targets build quotes byte by byte
// to exercise the parsing and checking of VerifyQuote without a TPM; what
// it signs proves nothing about a TPM, which is why real AKs must be
// restricted and activated.
type softAK struct {
	key         *ecdsa.PrivateKey
	public      *tpm2.TPMTPublic
	publicBytes []byte // TPM2B_PUBLIC
	name        []byte
}

// softAKScalar makes the soft AK the same in every run, so that fuzz
// corpus entries stay meaningful.
var softAKScalar = bytes.Repeat([]byte{0x42}, 32)

func softAKFor(t testing.TB) *softAK {
	t.Helper()
	key, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), softAKScalar)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := tpmtest.ECCAKTemplate
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: eccXY(t, &key.PublicKey)[0]},
		Y: tpm2.TPM2BECCParameter{Buffer: eccXY(t, &key.PublicKey)[1]},
	})
	b := tpm2.Marshal(tpm2.New2B(tmpl))
	pub, name, err := attest.ParseAKPublic(b)
	if err != nil {
		t.Fatal(err)
	}
	return &softAK{key: key, public: pub, publicBytes: b, name: name}
}

// sign makes a TPMT_SIGNATURE (ECDSA, hash alg) over msg.
func (a *softAK) sign(t testing.TB, msg []byte, hashAlg tpm2.TPMIAlgHash) []byte {
	t.Helper()
	var digest []byte
	switch hashAlg {
	case tpm2.TPMAlgSHA384:
		d := sha512.Sum384(msg)
		digest = d[:]
	default:
		d := sha256.Sum256(msg)
		digest = d[:]
	}
	r, s, err := ecdsa.Sign(rand.Reader, a.key, digest)
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       hashAlg,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r.FillBytes(make([]byte, 32))},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s.FillBytes(make([]byte, 32))},
		}),
	})
}

// softQuoteInput is what a soft quote covers.
type softQuoteInput struct {
	pcrs  map[uint32][]byte
	extra []byte
}

func defaultSoftQuoteInput() softQuoteInput {
	p7 := sha256.Sum256([]byte("PCR 7"))
	return softQuoteInput{
		pcrs:  map[uint32][]byte{0: make([]byte, 32), 7: p7[:]},
		extra: attest.QualifyingData(bytes.Repeat([]byte{9}, 32), []byte("binding key")),
	}
}

// attestFor is the TPMS_ATTEST a TPM would make for in.
func (a *softAK) attestFor(in softQuoteInput) tpm2.TPMSAttest {
	var idx []uint
	d := sha256.New()
	for _, i := range []uint32{0, 7} {
		if v, ok := in.pcrs[i]; ok {
			idx = append(idx, uint(i))
			d.Write(v)
		}
	}
	return tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            tpm2.TPMSTAttestQuote,
		QualifiedSigner: tpm2.TPM2BName{Buffer: a.name},
		ExtraData:       tpm2.TPM2BData{Buffer: in.extra},
		ClockInfo:       tpm2.TPMSClockInfo{Clock: 1234, ResetCount: 2, RestartCount: 1, Safe: true},
		FirmwareVersion: 0x2020_0101,
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
			PCRSelect: tpmtest.Selection(idx...),
			PCRDigest: tpm2.TPM2BDigest{Buffer: d.Sum(nil)},
		}),
	}
}

// TestVerifyQuoteSoft checks VerifyQuote's structure and signature checks
// on quotes built byte by byte.
func TestVerifyQuoteSoft(t *testing.T) {
	ak := softAKFor(t)
	in := defaultSoftQuoteInput()
	good := tpm2.Marshal(ak.attestFor(in))
	qi, err := attest.VerifyQuote(ak.public, good, ak.sign(t, good, tpm2.TPMAlgSHA256), in.pcrs, in.extra)
	if err != nil {
		t.Fatalf("control quote: %v", err)
	}
	if len(qi.PCRs) != 2 || qi.PCRs[0] != 0 || qi.PCRs[1] != 7 || qi.Clock != 1234 || qi.ResetCount != 2 ||
		qi.RestartCount != 1 || !qi.Safe || qi.FirmwareVersion != 0x2020_0101 || !bytes.Equal(qi.QualifiedSigner, ak.name) {
		t.Errorf("QuoteInfo %+v", qi)
	}

	signed := func(edit func(*tpm2.TPMSAttest)) []byte {
		a := ak.attestFor(in)
		edit(&a)
		return tpm2.Marshal(a)
	}
	sel := func(s ...tpm2.TPMSPCRSelection) func(*tpm2.TPMSAttest) {
		return func(a *tpm2.TPMSAttest) {
			q, _ := a.Attested.Quote()
			a.Attested = tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
				PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: s}, PCRDigest: q.PCRDigest,
			})
		}
	}
	sha256Sel := tpmtest.Selection(0, 7).PCRSelections[0]
	for _, c := range []struct {
		name  string
		quote []byte
		check error
	}{
		{"magic", signed(func(a *tpm2.TPMSAttest) { a.Magic = 0xff544348 }), attest.ErrQuote},
		{"certify, not quote", tpm2.Marshal(tpm2.TPMSAttest{
			Magic: tpm2.TPMGeneratedValue, Type: tpm2.TPMSTAttestCertify,
			QualifiedSigner: tpm2.TPM2BName{Buffer: ak.name}, ExtraData: tpm2.TPM2BData{Buffer: in.extra},
			Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{Name: tpm2.TPM2BName{Buffer: ak.name}, QualifiedName: tpm2.TPM2BName{Buffer: ak.name}}),
		}), attest.ErrQuote},
		{"other extraData", signed(func(a *tpm2.TPMSAttest) { a.ExtraData.Buffer = bytes.Repeat([]byte{1}, 32) }), attest.ErrQuote},
		{"trailing byte", append(bytes.Clone(good), 0), attest.ErrQuote},
		{"SHA-1 bank", signed(sel(tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA1, PCRSelect: sha256Sel.PCRSelect})), attest.ErrPCR},
		{"two banks", signed(sel(sha256Sel, tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA384, PCRSelect: []byte{0, 0, 0}})), attest.ErrPCR},
		{"PCR 24", signed(sel(tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0x81, 0, 0, 1}})), attest.ErrPCR},
		{"no PCR", signed(sel(tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0, 0, 0}})), attest.ErrPCR},
		{"digest", signed(func(a *tpm2.TPMSAttest) {
			q, _ := a.Attested.Quote()
			q.PCRDigest.Buffer = bytes.Repeat([]byte{3}, 32)
		}), attest.ErrPCR},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := attest.VerifyQuote(ak.public, c.quote, ak.sign(t, c.quote, tpm2.TPMAlgSHA256), in.pcrs, in.extra)
			wantRefusal(t, err, c.check)
		})
	}

	goodSig := ak.sign(t, good, tpm2.TPMAlgSHA256)
	flipped := bytes.Clone(goodSig)
	flipped[len(flipped)-1] ^= 1
	rsaSig := tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg:    tpm2.TPMAlgRSASSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgRSASSA, &tpm2.TPMSSignatureRSA{Hash: tpm2.TPMAlgSHA256, Sig: tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}}),
	})
	for name, sig := range map[string][]byte{
		"bit flipped":        flipped,
		"SHA-384 signature":  ak.sign(t, good, tpm2.TPMAlgSHA384),
		"RSASSA signature":   rsaSig,
		"empty":              nil,
		"trailing byte":      append(bytes.Clone(goodSig), 0),
		"another key signed": softAKOther(t).sign(t, good, tpm2.TPMAlgSHA256),
	} {
		t.Run("signature "+name, func(t *testing.T) {
			_, err := attest.VerifyQuote(ak.public, good, sig, in.pcrs, in.extra)
			wantRefusal(t, err, attest.ErrSignature)
		})
	}

	t.Run("no qualifying data expected", func(t *testing.T) {
		_, err := attest.VerifyQuote(ak.public, good, goodSig, in.pcrs, nil)
		var e *attest.Error
		if err == nil || errors.As(err, &e) {
			t.Fatalf("got %v, want a plain error", err)
		}
	})
	t.Run("nil AK", func(t *testing.T) {
		_, err := attest.VerifyQuote(nil, good, goodSig, in.pcrs, in.extra)
		wantRefusal(t, err, attest.ErrAK)
	})
}

// softAKOther is a second soft AK with another key.
func softAKOther(t testing.TB) *softAK {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &softAK{key: k}
}
