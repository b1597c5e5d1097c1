package attest

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// tpm2ToolsDir holds evidence recorded from tpm2-tools 5.4 against swtpm
// 0.7.1 by testdata/make-tpm2-tools-evidence.sh (see its README.md).
var tpm2ToolsDir = filepath.Join("..", "testdata", "tpm2-tools")

func readTPM2Tools(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(tpm2ToolsDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tpm2ToolsNonce(t testing.TB) []byte {
	t.Helper()
	n, err := hex.DecodeString(strings.TrimSpace(string(readTPM2Tools(t, "nonce.hex"))))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// extended is the value of a PCR that started at zero and was extended once
// with the SHA-256 of data, as the recording script does with
// tpm2_pcrextend.
func extended(data string) []byte {
	m := sha256.Sum256([]byte(data))
	v := sha256.Sum256(append(make([]byte, 32), m[:]...))
	return v[:]
}

func TestTPM2ToolsPCRsRecorded(t *testing.T) {
	want := map[uint32][]byte{
		0:  make([]byte, 32),
		7:  extended("coffre secure boot state"),
		16: extended("coffre debug pcr"),
	}
	for _, name := range []string{"quote.pcrs", "quote-ecc.pcrs", "quote-plain.pcrs", "pcrread-sha256.pcrs"} {
		got, err := ParseTPM2ToolsPCRs(readTPM2Tools(t, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if len(got) != len(want) {
			t.Errorf("%s: %d PCRs, want %d", name, len(got), len(want))
		}
		for i, v := range want {
			if !bytes.Equal(got[i], v) {
				t.Errorf("%s: PCR %d = %x, want %x", name, i, got[i], v)
			}
		}
	}

	// All 24 PCRs: three TPML_DIGEST blocks of 8, 8 and 8 digests.
	all, err := ParseTPM2ToolsPCRs(readTPM2Tools(t, "pcrread-sha256-all.pcrs"))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 24 {
		t.Fatalf("pcrread-sha256-all.pcrs: %d PCRs, want 24", len(all))
	}
	for i, v := range want {
		if !bytes.Equal(all[i], v) {
			t.Errorf("pcrread-sha256-all.pcrs: PCR %d = %x, want %x", i, all[i], v)
		}
	}
	// The PCR-Client profile resets PCRs 17 to 22 to all ones, 23 to zero.
	if ones := bytes.Repeat([]byte{0xff}, 32); !bytes.Equal(all[17], ones) {
		t.Errorf("PCR 17 = %x, want all ones", all[17])
	}
}

func TestTPM2ToolsPCRsRefused(t *testing.T) {
	good := readTPM2Tools(t, "quote.pcrs")
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := map[string][]byte{
		// tpm2_pcrread sha1:0,7+sha256:0,7 -F serialized
		"SHA-1 bank": readTPM2Tools(t, "pcrread-sha1-sha256.pcrs"),
		// tpm2_pcrread -o without -F serialized
		"values format":  readTPM2Tools(t, "pcrread-sha256.values"),
		"empty":          nil,
		"truncated":      good[:len(good)-1],
		"extra list":     append(bytes.Clone(good), make([]byte, tssDigestList)...),
		"no selection":   mutate(func(b []byte) []byte { b[0] = 0; return b }),
		"17 selections":  mutate(func(b []byte) []byte { b[0] = 17; return b }),
		"SHA-384 bank":   mutate(func(b []byte) []byte { b[4] = byte(tpm2.TPMAlgSHA384); return b }),
		"select 5 bytes": mutate(func(b []byte) []byte { b[6] = 5; return b }),
		"no PCR":         mutate(func(b []byte) []byte { b[7], b[9] = 0, 0; return b }),
		"extra PCR":      mutate(func(b []byte) []byte { b[8] = 1; return b }),
		"missing PCR":    mutate(func(b []byte) []byte { b[9] = 0; return b }),
		"2 lists":        mutate(func(b []byte) []byte { b[tssPCRSelectionList] = 2; return b }),
		"0 digests":      mutate(func(b []byte) []byte { b[tssPCRFileHeaderSize] = 0; return b }),
		"9 digests":      mutate(func(b []byte) []byte { b[tssPCRFileHeaderSize] = 9; return b }),
		"short digest":   mutate(func(b []byte) []byte { b[tssPCRFileHeaderSize+4] = 20; return b }),
		"duplicate bank": mutate(func(b []byte) []byte {
			b[0] = 2
			copy(b[4+tssPCRSelectionSize:], b[4:4+tssPCRSelectionSize])
			return b
		}),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			pcrs, err := ParseTPM2ToolsPCRs(b)
			if !errors.Is(err, ErrPCR) {
				t.Fatalf("got %v, %v; want an ErrPCR refusal", pcrs, err)
			}
			t.Log(err)
		})
	}
}

func TestTPM2ToolsQuoteMessage(t *testing.T) {
	msg := readTPM2Tools(t, "quote.msg")
	got, err := ParseTPM2ToolsQuote(msg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Error("tpm2-tools 5.4 writes a bare TPMS_ATTEST, but the parser changed it")
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](got)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(att.ExtraData.Buffer, tpm2ToolsNonce(t)) {
		t.Errorf("qualifying data %x, want the raw nonce", att.ExtraData.Buffer)
	}

	// With a TPM2B_ATTEST size prefix, as older tools wrote it.
	prefixed := append([]byte{byte(len(msg) >> 8), byte(len(msg))}, msg...)
	got, err = ParseTPM2ToolsQuote(prefixed)
	if err != nil || !bytes.Equal(got, msg) {
		t.Errorf("size-prefixed message: %v", err)
	}

	bad := map[string][]byte{
		"empty":     nil,
		"truncated": msg[:len(msg)-1],
		"trailing":  append(bytes.Clone(msg), 0),
		"magic":     append([]byte{0xfe}, msg[1:]...),
		"type":      append(append(bytes.Clone(msg[:4]), 0x80, 0x17), msg[6:]...), // TPM_ST_ATTEST_CERTIFY
		"signature": readTPM2Tools(t, "quote.sig"),
	}
	for name, b := range bad {
		if _, err := ParseTPM2ToolsQuote(b); !errors.Is(err, ErrQuote) {
			t.Errorf("%s: got %v, want an ErrQuote refusal", name, err)
		}
	}
}

func TestTPM2ToolsSignature(t *testing.T) {
	for _, name := range []string{"quote.sig", "quote-ecc.sig"} {
		b := readTPM2Tools(t, name)
		got, err := ParseTPM2ToolsSignature(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(got, b) {
			t.Errorf("%s: the tss format is a TPMT_SIGNATURE and should pass unchanged", name)
		}
	}
	for _, name := range []string{"quote-plain.sig", "quote-ecc-plain.sig", "quote.msg", "ak.pub"} {
		if _, err := ParseTPM2ToolsSignature(readTPM2Tools(t, name)); !errors.Is(err, ErrSignature) {
			t.Errorf("%s: got %v, want an ErrSignature refusal", name, err)
		} else {
			t.Log(err)
		}
	}
	hmac := tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg:    tpm2.TPMAlgHMAC,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgHMAC, &tpm2.TPMTHA{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}),
	})
	if _, err := ParseTPM2ToolsSignature(hmac); !errors.Is(err, ErrSignature) {
		t.Errorf("HMAC signature: got %v, want an ErrSignature refusal", err)
	}
}

func TestTPM2ToolsPlainSignature(t *testing.T) {
	for _, c := range []struct{ ak, plain string }{
		{"ak.pub", "quote-plain.sig"},
		{"ak-ecc.pub", "quote-ecc-plain.sig"},
	} {
		ak, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, c.ak))
		if err != nil {
			t.Fatal(err)
		}
		sig, err := ParseTPM2ToolsPlainSignature(readTPM2Tools(t, c.plain), ak.Public)
		if err != nil {
			t.Fatalf("%s: %v", c.plain, err)
		}
		if _, err := ParseTPM2ToolsSignature(sig); err != nil {
			t.Errorf("%s: converted signature does not parse: %v", c.plain, err)
		}
	}

	rsaAK, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ak.pub"))
	if err != nil {
		t.Fatal(err)
	}
	eccAK, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ak-ecc.pub"))
	if err != nil {
		t.Fatal(err)
	}
	pemAK, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ak.pem"))
	if err != nil {
		t.Fatal(err)
	}
	plain := readTPM2Tools(t, "quote-plain.sig")
	eccPlain := readTPM2Tools(t, "quote-ecc-plain.sig")
	for name, c := range map[string]struct {
		sig []byte
		ak  *tpm2.TPMTPublic
	}{
		"no AK":             {plain, nil},
		"PEM AK, no scheme": {plain, pemAK.Public},
		"RSA short":         {plain[:255], rsaAK.Public},
		"RSA sig, ECC AK":   {plain, eccAK.Public},
		"ECC sig, RSA AK":   {eccPlain, rsaAK.Public},
		"ECC trailing":      {append(bytes.Clone(eccPlain), 0), eccAK.Public},
		"ECC truncated":     {eccPlain[:len(eccPlain)-1], eccAK.Public},
		"ECC negative r":    {[]byte{0x30, 0x06, 0x02, 0x01, 0xff, 0x02, 0x01, 0x01}, eccAK.Public},
	} {
		if _, err := ParseTPM2ToolsPlainSignature(c.sig, c.ak); !errors.Is(err, ErrSignature) {
			t.Errorf("%s: got %v, want an ErrSignature refusal", name, err)
		}
	}
}

func TestTPM2ToolsAKPublic(t *testing.T) {
	for _, c := range []struct{ pub, name, pem string }{
		{"ak.pub", "ak.name", "ak.pem"},
		{"ak-ecc.pub", "ak-ecc.name", "ak-ecc.pem"},
	} {
		tss, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, c.pub))
		if err != nil {
			t.Fatalf("%s: %v", c.pub, err)
		}
		if !tss.TemplateChecked || tss.TPM2BPublic == nil {
			t.Errorf("%s: template not checked", c.pub)
		}
		if want := readTPM2Tools(t, c.name); !bytes.Equal(tss.Name, want) {
			t.Errorf("%s: name %x, tpm2_createak -n wrote %x", c.pub, tss.Name, want)
		}

		p, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, c.pem))
		if err != nil {
			t.Fatalf("%s: %v", c.pem, err)
		}
		if p.TemplateChecked || p.TPM2BPublic != nil || p.Name != nil {
			t.Errorf("%s: a PEM key claims a checked template", c.pem)
		}
		if p.Public.ObjectAttributes != (tpm2.TPMAObject{}) {
			t.Errorf("%s: made-up TPMT_PUBLIC has attributes %+v", c.pem, p.Public.ObjectAttributes)
		}
		// The same key either way.
		k1, err := tpm2.Pub(*tss.Public)
		if err != nil {
			t.Fatal(err)
		}
		k2, err := tpm2.Pub(*p.Public)
		if err != nil {
			t.Fatal(err)
		}
		if !k1.(interface{ Equal(x crypto.PublicKey) bool }).Equal(k2) {
			t.Errorf("%s and %s hold different keys", c.pub, c.pem)
		}
		// DER (tpm2_createak -f der) is the PEM's body.
		block, _ := pem.Decode(readTPM2Tools(t, c.pem))
		d, err := ParseTPM2ToolsAKPublic(block.Bytes)
		if err != nil {
			t.Fatalf("%s as DER: %v", c.pem, err)
		}
		if k3, _ := tpm2.Pub(*d.Public); !k1.(interface{ Equal(x crypto.PublicKey) bool }).Equal(k3) {
			t.Errorf("%s as DER holds a different key", c.pem)
		}
	}

	akPub := readTPM2Tools(t, "ak.pub")
	akPEM := readTPM2Tools(t, "ak.pem")
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: readTPM2Tools(t, "ek-cert.der")})
	bad := map[string][]byte{
		"empty":          nil,
		"truncated":      akPub[:len(akPub)-1],
		"trailing":       append(bytes.Clone(akPub), 0),
		"bare TPMT":      akPub[2:],
		"signature":      readTPM2Tools(t, "quote.sig"),
		"PEM truncated":  akPEM[:len(akPEM)/2],
		"PEM trailing":   append(bytes.Clone(akPEM), []byte("junk")...),
		"PEM cert":       certPEM,
		"DER garbage":    {0x30, 0x03, 0x02, 0x01, 0x01},
		"EK cert as DER": readTPM2Tools(t, "ek-cert.der"),
	}
	for name, b := range bad {
		if _, err := ParseTPM2ToolsAKPublic(b); !errors.Is(err, ErrAK) {
			t.Errorf("%s: got %v, want an ErrAK refusal", name, err)
		}
	}
}

// TestTPM2ToolsAKTemplateRefused: an EK is a TPM key but not an AK
// (restricted decrypt, not sign); its tpm2_createek -u file is refused by
// the template check.
func TestTPM2ToolsAKTemplateRefused(t *testing.T) {
	if _, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ek.pub")); !errors.Is(err, ErrAK) {
		t.Fatalf("EK accepted as an AK: %v", err)
	}
}

// tpm2ToolsQuote reads one recorded quote (prefix "quote" or "quote-ecc")
// in the form VerifyQuote takes it.
type tpm2ToolsQuote struct {
	ak         *tpm2.TPMTPublic
	quote, sig []byte
	pcrs       map[uint32][]byte
}

func loadTPM2ToolsQuote(t *testing.T, ak, prefix string) tpm2ToolsQuote {
	t.Helper()
	a, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, ak))
	if err != nil {
		t.Fatal(err)
	}
	q, err := ParseTPM2ToolsQuote(readTPM2Tools(t, prefix+".msg"))
	if err != nil {
		t.Fatal(err)
	}
	rawSig := readTPM2Tools(t, prefix+".sig")
	s, err := ParseTPM2ToolsSignature(rawSig)
	if err != nil {
		s, err = ParseTPM2ToolsPlainSignature(rawSig, a.Public)
	}
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseTPM2ToolsPCRs(readTPM2Tools(t, prefix+".pcrs"))
	if err != nil {
		t.Fatal(err)
	}
	return tpm2ToolsQuote{a.Public, q, s, p}
}

func TestTPM2ToolsVerifyQuote(t *testing.T) {
	nonce := tpm2ToolsNonce(t)
	for _, c := range []struct{ ak, prefix string }{
		{"ak.pub", "quote"},
		{"ak.pub", "quote-plain"},
		{"ak-ecc.pub", "quote-ecc"},
		{"ak-ecc.pub", "quote-ecc-plain"},
	} {
		t.Run(c.prefix, func(t *testing.T) {
			q := loadTPM2ToolsQuote(t, c.ak, c.prefix)
			// tpm2_quote -q puts the nonce itself in extraData: evidence
			// made by hand is not bound to a binding key.
			info, err := VerifyQuote(q.ak, q.quote, q.sig, q.pcrs, nonce)
			if err != nil {
				t.Fatalf("recorded quote refused: %v", err)
			}
			if info == nil || !slices.Equal(info.PCRs, []uint32{0, 7, 16}) {
				t.Fatalf("quote info %+v, want PCRs 0, 7, 16", info)
			}
			// Not the agent's convention: tpm2_quote -q took the nonce as is.
			if _, err := VerifyQuote(q.ak, q.quote, q.sig, q.pcrs, QualifyingData(nonce, nil)); !errors.Is(err, ErrQuote) {
				t.Errorf("SHA-256(nonce) as qualifying data: %v", err)
			}
			if _, err := VerifyQuote(q.ak, q.quote, q.sig, q.pcrs, extended("another nonce")); !errors.Is(err, ErrQuote) && !errors.Is(err, ErrNonce) {
				t.Errorf("wrong nonce: got %v, want a quote/nonce refusal", err)
			}
		})
	}
}

// TestTPM2ToolsVerifyPEM: with the AK as PEM there is no template; the
// key and the signature are still checked.
func TestTPM2ToolsVerifyPEM(t *testing.T) {
	nonce := tpm2ToolsNonce(t)
	for _, c := range []struct{ pem, prefix string }{
		{"ak.pem", "quote"},
		{"ak-ecc.pem", "quote-ecc"},
	} {
		ak, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, c.pem))
		if err != nil {
			t.Fatal(err)
		}
		q := loadTPM2ToolsQuote(t, c.pem, c.prefix)
		if _, err := VerifyQuote(ak.Public, q.quote, q.sig, q.pcrs, nonce); !errors.Is(err, ErrAK) {
			t.Errorf("%s: VerifyQuote accepted a key without a template: %v", c.pem, err)
		}
		if _, err := VerifyTPM2ToolsQuote(ak, q.quote, q.sig, q.pcrs, nonce); err != nil {
			t.Errorf("%s: %v", c.pem, err)
		}
		if ak.Public.ObjectAttributes != (tpm2.TPMAObject{}) {
			t.Errorf("%s: VerifyTPM2ToolsQuote wrote its assumed template into the AK", c.pem)
		}
		if _, err := VerifyTPM2ToolsQuote(ak, q.quote, q.sig, q.pcrs, extended("x")); !errors.Is(err, ErrQuote) {
			t.Errorf("%s: wrong nonce: %v", c.pem, err)
		}
	}
	rsaPEM, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ak.pem"))
	if err != nil {
		t.Fatal(err)
	}
	eccPEM, err := ParseTPM2ToolsAKPublic(readTPM2Tools(t, "ak-ecc.pem"))
	if err != nil {
		t.Fatal(err)
	}
	rsaQ := loadTPM2ToolsQuote(t, "ak.pub", "quote")
	eccQ := loadTPM2ToolsQuote(t, "ak-ecc.pub", "quote-ecc")
	if _, err := VerifyTPM2ToolsQuote(eccPEM, rsaQ.quote, rsaQ.sig, rsaQ.pcrs, nonce); !errors.Is(err, ErrSignature) {
		t.Errorf("RSA quote under the ECC PEM key: %v", err)
	}
	if _, err := VerifyTPM2ToolsQuote(rsaPEM, eccQ.quote, eccQ.sig, eccQ.pcrs, nonce); !errors.Is(err, ErrSignature) {
		t.Errorf("ECC quote under the RSA PEM key: %v", err)
	}
	if _, err := VerifyTPM2ToolsQuote(rsaPEM, rsaQ.quote, rsaQ.sig, rsaQ.pcrs, nil); !errors.Is(err, ErrNonce) {
		t.Errorf("no nonce: %v", err)
	}
}

// TestTPM2ToolsFlippedBit flips every bit of the quote, the signature and
// the PCR values in turn: each flip must be refused, with the check that
// owns the flipped part.
func TestTPM2ToolsFlippedBit(t *testing.T) {
	nonce := tpm2ToolsNonce(t)
	q := loadTPM2ToolsQuote(t, "ak.pub", "quote")
	if _, err := VerifyQuote(q.ak, q.quote, q.sig, q.pcrs, nonce); err != nil {
		t.Fatal(err)
	}
	refused := func(what string, i int, err error, checks ...error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s bit %d flipped: accepted", what, i)
		}
		for _, c := range checks {
			if errors.Is(err, c) {
				return
			}
		}
		t.Fatalf("%s bit %d flipped: %v, want one of %v", what, i, err, checks)
	}
	for i := range len(q.quote) * 8 {
		b := bytes.Clone(q.quote)
		b[i/8] ^= 1 << (i % 8)
		_, err := VerifyQuote(q.ak, b, q.sig, q.pcrs, nonce)
		// A flip is caught while parsing the structure (quote) or by the
		// signature over it, which VerifyQuote checks before reading any
		// field.
		refused("quote", i, err, ErrSignature, ErrQuote)
	}
	// The signature: only the bits that make it a signature over the
	// message matter; a flip in the header is a parse or scheme refusal.
	for i := range len(q.sig) * 8 {
		b := bytes.Clone(q.sig)
		b[i/8] ^= 1 << (i % 8)
		_, err := VerifyQuote(q.ak, q.quote, b, q.pcrs, nonce)
		refused("signature", i, err, ErrSignature)
	}
	raw := readTPM2Tools(t, "quote.pcrs")
	for _, idx := range []uint32{0, 7, 16} {
		for bit := range 256 {
			pcrs := map[uint32][]byte{}
			for k, v := range q.pcrs {
				pcrs[k] = bytes.Clone(v)
			}
			pcrs[idx][bit/8] ^= 1 << (bit % 8)
			_, err := VerifyQuote(q.ak, q.quote, q.sig, pcrs, nonce)
			refused("PCR value", bit, err, ErrPCR)
		}
	}
	// A bit flipped in the PCR file itself is refused by the parser or,
	// when it lands in a value, by the quote's PCR digest; flips in
	// unused slots and padding change nothing that is read.
	for i := range len(raw) * 8 {
		b := bytes.Clone(raw)
		b[i/8] ^= 1 << (i % 8)
		pcrs, err := ParseTPM2ToolsPCRs(b)
		if err != nil {
			refused("PCR file", i, err, ErrPCR)
			continue
		}
		if _, err := VerifyQuote(q.ak, q.quote, q.sig, pcrs, nonce); err == nil {
			for k, v := range pcrs {
				if !bytes.Equal(v, q.pcrs[k]) || len(pcrs) != len(q.pcrs) {
					t.Fatalf("PCR file bit %d flipped: changed PCR %d accepted", i, k)
				}
			}
		} else {
			refused("PCR file", i, err, ErrPCR)
		}
	}
}

// TestTPM2ToolsQuoteOtherAK: the RSA quote does not verify under the ECC AK
// of the same TPM, nor the other way round.
func TestTPM2ToolsQuoteOtherAK(t *testing.T) {
	nonce := tpm2ToolsNonce(t)
	rsaQ := loadTPM2ToolsQuote(t, "ak.pub", "quote")
	eccQ := loadTPM2ToolsQuote(t, "ak-ecc.pub", "quote-ecc")
	if _, err := VerifyQuote(eccQ.ak, rsaQ.quote, rsaQ.sig, rsaQ.pcrs, nonce); !errors.Is(err, ErrSignature) && !errors.Is(err, ErrQuote) {
		t.Errorf("RSA quote under the ECC AK: %v", err)
	}
	if _, err := VerifyQuote(rsaQ.ak, eccQ.quote, eccQ.sig, eccQ.pcrs, nonce); !errors.Is(err, ErrSignature) && !errors.Is(err, ErrQuote) {
		t.Errorf("ECC quote under the RSA AK: %v", err)
	}
}

func tpm2ToolsPool(t *testing.T, names ...string) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	for _, n := range names {
		if !p.AppendCertsFromPEM(readTPM2Tools(t, n)) {
			t.Fatalf("%s holds no certificate", n)
		}
	}
	return p
}

func TestTPM2ToolsEKCertificate(t *testing.T) {
	der := readTPM2Tools(t, "ek-cert.der")
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	ek, err := VerifyEKCertificate(der, tpm2ToolsPool(t, "ca-root.pem"), tpm2ToolsPool(t, "ca-intermediate.pem"), now)
	if err != nil {
		t.Fatalf("swtpm EK certificate refused by its own CA: %v", err)
	}
	// The certificate is for the EK tpm2_createek made with the default
	// template.
	ekPub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](readTPM2Tools(t, "ek.pub"))
	if err != nil {
		t.Fatal(err)
	}
	contents, err := ekPub.Contents()
	if err != nil {
		t.Fatal(err)
	}
	key, err := tpm2.Pub(*contents)
	if err != nil {
		t.Fatal(err)
	}
	pkix, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(pkix); ek.Fingerprint != hex.EncodeToString(sum[:]) {
		t.Errorf("EK fingerprint %s is not that of tpm2_createek's EK", ek.Fingerprint)
	}

	// Another swtpm local CA, made by the same script: same names, other keys.
	if _, err := VerifyEKCertificate(der, tpm2ToolsPool(t, "other-ca-root.pem"), tpm2ToolsPool(t, "other-ca-intermediate.pem"), now); !errors.Is(err, ErrEK) {
		t.Errorf("EK certificate accepted by another CA: %v", err)
	}
	// The right root without the intermediate: no chain.
	if _, err := VerifyEKCertificate(der, tpm2ToolsPool(t, "ca-root.pem"), nil, now); !errors.Is(err, ErrEK) {
		t.Errorf("EK certificate accepted without its intermediate: %v", err)
	}
}

func FuzzParseTPM2ToolsPCRs(f *testing.F) {
	for _, n := range []string{"quote.pcrs", "pcrread-sha256-all.pcrs", "pcrread-sha1-sha256.pcrs", "pcrread-sha256.values"} {
		f.Add(readTPM2Tools(f, n))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pcrs, err := ParseTPM2ToolsPCRs(b)
		if err != nil {
			if !errors.Is(err, ErrPCR) {
				t.Fatalf("refusal is not ErrPCR: %v", err)
			}
			return
		}
		if len(pcrs) == 0 {
			t.Fatal("accepted with no PCR")
		}
		for i, v := range pcrs {
			if i > 31 || len(v) != 32 {
				t.Fatalf("PCR %d has %d bytes", i, len(v))
			}
		}
	})
}

func FuzzParseTPM2ToolsQuote(f *testing.F) {
	for _, n := range []string{"quote.msg", "quote-ecc.msg"} {
		f.Add(readTPM2Tools(f, n))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		q, err := ParseTPM2ToolsQuote(b)
		if err != nil {
			if !errors.Is(err, ErrQuote) {
				t.Fatalf("refusal is not ErrQuote: %v", err)
			}
			return
		}
		if _, err := tpm2.Unmarshal[tpm2.TPMSAttest](q); err != nil {
			t.Fatalf("accepted a message that is not a TPMS_ATTEST: %v", err)
		}
	})
}

func FuzzParseTPM2ToolsSignature(f *testing.F) {
	for _, n := range []string{"quote.sig", "quote-ecc.sig", "quote-plain.sig"} {
		f.Add(readTPM2Tools(f, n))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseTPM2ToolsSignature(b)
		if err != nil {
			if !errors.Is(err, ErrSignature) {
				t.Fatalf("refusal is not ErrSignature: %v", err)
			}
			return
		}
		if !bytes.Equal(s, b) {
			t.Fatal("a tss signature must pass unchanged")
		}
	})
}

func FuzzParseTPM2ToolsPlainSignature(f *testing.F) {
	rsaAK, err := ParseTPM2ToolsAKPublic(readTPM2Tools(f, "ak.pub"))
	if err != nil {
		f.Fatal(err)
	}
	eccAK, err := ParseTPM2ToolsAKPublic(readTPM2Tools(f, "ak-ecc.pub"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(readTPM2Tools(f, "quote-plain.sig"), false)
	f.Add(readTPM2Tools(f, "quote-ecc-plain.sig"), true)
	f.Fuzz(func(t *testing.T, b []byte, ecc bool) {
		ak := rsaAK.Public
		if ecc {
			ak = eccAK.Public
		}
		s, err := ParseTPM2ToolsPlainSignature(b, ak)
		if err != nil {
			if !errors.Is(err, ErrSignature) {
				t.Fatalf("refusal is not ErrSignature: %v", err)
			}
			return
		}
		if _, err := ParseTPM2ToolsSignature(s); err != nil {
			t.Fatalf("converted signature does not parse: %v", err)
		}
	})
}

func FuzzParseTPM2ToolsAKPublic(f *testing.F) {
	for _, n := range []string{"ak.pub", "ak-ecc.pub", "ak.pem", "ak-ecc.pem", "ek.pub"} {
		f.Add(readTPM2Tools(f, n))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ak, err := ParseTPM2ToolsAKPublic(b)
		if err != nil {
			if !errors.Is(err, ErrAK) {
				t.Fatalf("refusal is not ErrAK: %v", err)
			}
			return
		}
		if ak.Public == nil {
			t.Fatal("accepted without a public key")
		}
		if _, err := tpm2.Pub(*ak.Public); err != nil {
			t.Fatalf("accepted an AK with no usable key: %v", err)
		}
		if ak.TemplateChecked != (ak.TPM2BPublic != nil) {
			t.Fatal("TemplateChecked disagrees with the file's format")
		}
	})
}
