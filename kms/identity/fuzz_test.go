package identity

import (
	"bytes"
	"context"
	"errors"
	"testing"
)

// fuzzKey is a fixed identity, so that the fuzzer's corpus stays meaningful
// from run to run.
func fuzzKey(f *testing.F) *PrivateKey {
	f.Helper()
	seeds := bytes.Repeat([]byte{0x42}, PrivateKeySize)
	k, err := ParsePrivateKey(seeds)
	if err != nil {
		f.Fatal(err)
	}
	return k
}

func FuzzParsePublicKey(f *testing.F) {
	k := fuzzKey(f)
	s := k.Public().String()
	f.Add(s)
	f.Add(s[:len(s)-1])
	f.Add(s + "=")
	f.Add(TextPrefix)
	f.Add("")
	f.Add("coffre-admin1:AAAA")
	f.Fuzz(func(t *testing.T, in string) {
		pub, err := ParsePublicKey(in)
		if err != nil {
			if !errors.Is(err, ErrMalformedKey) {
				t.Fatalf("error %v does not wrap ErrMalformedKey", err)
			}
			return
		}
		// One key, one text form.
		if got := pub.String(); got != in {
			t.Fatalf("ParsePublicKey(%q).String() = %q", in, got)
		}
		back, err := PublicKeyFromBytes(pub.Bytes())
		if err != nil || !back.Equal(pub) {
			t.Fatalf("binary round trip: %v", err)
		}
		// Whatever key parses, verifying must not panic.
		_ = pub.Verify([]byte("m"), make([]byte, SignatureSize))
	})
}

func FuzzVerify(f *testing.F) {
	k := fuzzKey(f)
	pub := k.Public()
	msg := []byte("approve proposal sha256:00")
	sig, err := k.Sign(context.Background(), msg)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(msg, sig)
	f.Add(msg, sig[:len(sig)-1])
	f.Add([]byte{}, []byte{})
	f.Add(msg, make([]byte, SignatureSize))
	f.Fuzz(func(t *testing.T, m, s []byte) {
		err := pub.Verify(m, s)
		if err != nil && err != ErrBadSignature { //nolint:errorlint // the contract is this exact error
			t.Fatalf("Verify returned %v, want nil or ErrBadSignature", err)
		}
		// Nothing the fuzzer finds may verify over another message.
		if err == nil && !bytes.Equal(m, msg) {
			t.Fatalf("a signature over %q verified", m)
		}
	})
}
