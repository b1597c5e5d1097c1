package identity

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

func mustKey(t testing.TB) *PrivateKey {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustSign(t testing.TB, k Signer, msg []byte) []byte {
	t.Helper()
	sig, err := k.Sign(context.Background(), msg)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

func TestSignVerify(t *testing.T) {
	k := mustKey(t)
	msg := []byte("proposal sha256:0123")
	sig := mustSign(t, k, msg)
	if len(sig) != SignatureSize {
		t.Fatalf("signature of %d bytes, want %d", len(sig), SignatureSize)
	}
	if err := k.Public().Verify(msg, sig); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	// The halves are what the format says: pure Ed25519 over msg, and
	// ML-DSA-65 with the fixed context (so a token's CKM_EDDSA can make the
	// first half).
	if !ed25519.Verify(k.Public().Ed25519(), msg, sig[:ed25519.SignatureSize]) {
		t.Error("first half is not a pure Ed25519 signature over msg")
	}
	if !mldsa65.Verify(k.Public().ml, msg, []byte("coffre-admin-v1"), sig[ed25519.SignatureSize:]) {
		t.Error(`second half is not ML-DSA-65 over msg with context "coffre-admin-v1"`)
	}
	if err := k.Public().Verify([]byte("proposal sha256:0124"), sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("Verify(other message) = %v, want ErrBadSignature", err)
	}
	// Hedged ML-DSA: two signatures of one message differ, both verify.
	sig2 := mustSign(t, k, msg)
	if bytes.Equal(sig, sig2) {
		t.Error("two ML-DSA signatures are identical; signing is not hedged")
	}
	if err := k.Public().Verify(msg, sig2); err != nil {
		t.Errorf("Verify(second signature): %v", err)
	}
}

func TestVerifyRefusesBadSignatures(t *testing.T) {
	k, other := mustKey(t), mustKey(t)
	pub := k.Public()
	msg := []byte("enroll node n1")
	sig := mustSign(t, k, msg)
	otherSig := mustSign(t, other, msg)
	edLen := ed25519.SignatureSize

	flip := func(i int) []byte {
		s := bytes.Clone(sig)
		s[i] ^= 0x01
		return s
	}
	// An ML-DSA-65 signature made with another context string.
	var noCtx [mldsa65.SignatureSize]byte
	var seed [32]byte
	copy(seed[:], k.mlSeed[:])
	_, mlPriv := mldsa65.NewKeyFromSeed(&seed)
	if err := mldsa65.SignTo(mlPriv, msg, nil, false, noCtx[:]); err != nil {
		t.Fatal(err)
	}

	cases := map[string][]byte{
		"empty":                         nil,
		"short by one":                  sig[:len(sig)-1],
		"long by one":                   append(bytes.Clone(sig), 0),
		"Ed25519 half only":             sig[:edLen],
		"ML-DSA half only":              sig[edLen:],
		"Ed25519 first byte flipped":    flip(0),
		"Ed25519 last byte flipped":     flip(edLen - 1),
		"ML-DSA first byte flipped":     flip(edLen),
		"ML-DSA last byte flipped":      flip(len(sig) - 1),
		"Ed25519 half of another key":   append(bytes.Clone(otherSig[:edLen]), sig[edLen:]...),
		"ML-DSA half of another key":    append(bytes.Clone(sig[:edLen]), otherSig[edLen:]...),
		"halves in the wrong order":     append(bytes.Clone(sig[edLen:]), sig[:edLen]...),
		"ML-DSA with no context string": append(bytes.Clone(sig[:edLen]), noCtx[:]...),
		"all zero":                      make([]byte, SignatureSize),
	}
	for name, s := range cases {
		if err := pub.Verify(msg, s); err != ErrBadSignature { //nolint:errorlint // the contract is this exact error
			t.Errorf("%s: Verify = %v, want exactly ErrBadSignature", name, err)
		}
	}
	if err := other.Public().Verify(msg, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("another key verifies the signature: %v", err)
	}
	var zero PublicKey
	if err := zero.Verify(msg, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("zero PublicKey: Verify = %v", err)
	}
	var nilKey *PublicKey
	if err := nilKey.Verify(msg, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("nil PublicKey: Verify = %v", err)
	}
	// The untouched signature still verifies: the cases above failed for
	// their change, not for some other reason.
	if err := pub.Verify(msg, sig); err != nil {
		t.Fatal(err)
	}
}

func TestTextForm(t *testing.T) {
	k := mustKey(t)
	pub := k.Public()
	s := pub.String()
	if !strings.HasPrefix(s, "coffre-admin1:") || strings.ContainsAny(s, "=+/ \n") {
		t.Fatalf("text form %q", s)
	}
	if want := len("coffre-admin1:") + base64.RawURLEncoding.EncodedLen(32+1952); len(s) != want {
		t.Errorf("text form of %d characters, want %d", len(s), want)
	}
	back, err := ParsePublicKey(s)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Equal(pub) || back.String() != s || back.Fingerprint() != pub.Fingerprint() {
		t.Error("round trip changed the key")
	}
	if mustKey(t).Public().Equal(pub) {
		t.Error("two generated keys are Equal")
	}
	var text PublicKey
	if err := text.UnmarshalText([]byte(s)); err != nil || !text.Equal(pub) {
		t.Errorf("UnmarshalText: %v", err)
	}
	// A parsed key verifies what the original key signed.
	msg := []byte("m")
	if err := back.Verify(msg, mustSign(t, k, msg)); err != nil {
		t.Errorf("parsed key does not verify: %v", err)
	}

	fp := pub.Fingerprint()
	if !strings.HasPrefix(fp, "sha256:") || len(fp) != len("sha256:")+32 {
		t.Errorf("Fingerprint() = %q", fp)
	}

	body := s[len(TextPrefix):]
	last := body[len(body)-1]
	// 1984 bytes = 661 groups of 3 and 1 byte left: the last character
	// carries 2 bits, its 4 low bits must be zero. Find a character with
	// the same 2 high bits and non-zero low bits.
	idx := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", last)
	nonCanonical := body[:len(body)-1] + string("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[idx|1])
	refused := map[string]string{
		"empty":                   "",
		"no prefix":               body,
		"other version":           "coffre-admin2:" + body,
		"upper-case prefix":       "COFFRE-ADMIN1:" + body,
		"padded":                  s + "=",
		"trailing newline":        s + "\n",
		"leading space":           " " + s,
		"one character short":     s[:len(s)-1],
		"one character long":      s + "A",
		"standard base64":         TextPrefix + strings.NewReplacer("-", "+", "_", "/").Replace(body),
		"non-canonical last char": TextPrefix + nonCanonical,
		"line break inside":       TextPrefix + body[:10] + "\n" + body[11:],
		"Ed25519 key only":        TextPrefix + base64.RawURLEncoding.EncodeToString(pub.Ed25519()),
		"audit note key":          "coffre+01234567+AQ",
	}
	if !strings.ContainsAny(body, "-_") {
		delete(refused, "standard base64") // nothing to replace in this key
	}
	for name, in := range refused {
		if _, err := ParsePublicKey(in); !errors.Is(err, ErrMalformedKey) {
			t.Errorf("%s: ParsePublicKey = %v, want ErrMalformedKey", name, err)
		}
	}
	if _, err := NewPublicKey(make([]byte, 31), make([]byte, mldsa65.PublicKeySize)); !errors.Is(err, ErrMalformedKey) {
		t.Errorf("NewPublicKey(short Ed25519) = %v", err)
	}
	if _, err := NewPublicKey(make([]byte, 32), make([]byte, mldsa65.PublicKeySize+1)); !errors.Is(err, ErrMalformedKey) {
		t.Errorf("NewPublicKey(long ML-DSA) = %v", err)
	}
}

// TestKnownSeeds checks the seed format against published vectors: the
// Ed25519 seed is RFC 8032's secret key (test 1) and the ML-DSA seed is
// FIPS 204 ξ (checked against Wycheproof in TestWycheproofMLDSA65Sign).
func TestKnownSeeds(t *testing.T) {
	edSeed, _ := hex.DecodeString("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
	wantPub, _ := hex.DecodeString("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
	wantSig, _ := hex.DecodeString("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155" +
		"5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
	k, err := NewPrivateKey(edSeed, make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k.Public().Ed25519(), wantPub) {
		t.Errorf("Ed25519 public key %x, want %x", k.Public().Ed25519(), wantPub)
	}
	sig := mustSign(t, k, nil)
	if !bytes.Equal(sig[:64], wantSig) {
		t.Errorf("Ed25519 half of the signature of the empty message %x, want RFC 8032's %x", sig[:64], wantSig)
	}
}

func TestPrivateKeySeeds(t *testing.T) {
	k := mustKey(t)
	seeds := k.MarshalSeeds()
	if len(seeds) != PrivateKeySize {
		t.Fatalf("MarshalSeeds: %d bytes", len(seeds))
	}
	k2, err := ParsePrivateKey(seeds)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Public().Equal(k.Public()) {
		t.Error("the seeds do not give back the same public key")
	}
	msg := []byte("x")
	if err := k.Public().Verify(msg, mustSign(t, k2, msg)); err != nil {
		t.Errorf("key from seeds signs for another identity: %v", err)
	}
	for _, n := range []int{0, 32, 63, 65} {
		if _, err := ParsePrivateKey(make([]byte, n)); err == nil {
			t.Errorf("ParsePrivateKey accepted %d bytes", n)
		}
	}

	k2.Zero()
	if _, err := k2.Sign(context.Background(), msg); !errors.Is(err, ErrZeroed) {
		t.Errorf("Sign after Zero = %v, want ErrZeroed", err)
	}
	if !bytes.Equal(k2.MarshalSeeds(), make([]byte, PrivateKeySize)) {
		t.Error("Zero left seed bytes")
	}
	if !bytes.Equal(k2.ed, make([]byte, len(k2.ed))) {
		t.Error("Zero left the expanded Ed25519 key")
	}
	if k2.ml.Equal(k.ml) {
		t.Error("Zero left the expanded ML-DSA key")
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := k.Sign(ctx, msg); !errors.Is(err, context.Canceled) {
		t.Errorf("Sign(cancelled) = %v", err)
	}
}

func TestPrivateKeyRedacted(t *testing.T) {
	k := mustKey(t)
	seeds := k.MarshalSeeds()
	secrets := []string{
		hex.EncodeToString(seeds[:32]), hex.EncodeToString(seeds[32:]),
		strings.ToUpper(hex.EncodeToString(seeds[:32])),
		base64.StdEncoding.EncodeToString(seeds[:32]), base64.StdEncoding.EncodeToString(seeds[32:]),
		fmt.Sprint(seeds[:32]), fmt.Sprint(seeds[:8]),
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		for _, v := range []any{k, *k, []any{k}, struct{ K *PrivateKey }{k}} {
			out := fmt.Sprintf(verb, v)
			for _, s := range secrets {
				if strings.Contains(out, s) {
					t.Errorf("fmt %s of %T leaks a seed: %s", verb, v, out)
				}
			}
		}
	}
	if !strings.Contains(k.String(), "REDACTED") || !strings.Contains(k.String(), k.Public().Fingerprint()) {
		t.Errorf("String() = %q", k.String())
	}
}
