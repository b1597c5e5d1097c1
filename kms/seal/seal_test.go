package seal

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

func TestSealOpen(t *testing.T) {
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParsePublicKey(k.Public().String())
	if err != nil || !pub.Equal(k.Public()) {
		t.Fatalf("public key text round trip: %v", err)
	}
	ct, err := Seal(pub, []byte("test v1"), []byte("aad"), []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := Open(k, []byte("test v1"), []byte("aad"), ct)
	if err != nil || string(pt) != "secret" {
		t.Fatalf("Open = %q, %v", pt, err)
	}
	other, _ := GenerateKey()
	flipped := bytes.Clone(ct)
	flipped[len(flipped)-1] ^= 1
	for name, f := range map[string]func() ([]byte, error){
		"other key":  func() ([]byte, error) { return Open(other, []byte("test v1"), []byte("aad"), ct) },
		"other info": func() ([]byte, error) { return Open(k, []byte("test v2"), []byte("aad"), ct) },
		"other aad":  func() ([]byte, error) { return Open(k, []byte("test v1"), []byte("bad"), ct) },
		"flipped":    func() ([]byte, error) { return Open(k, []byte("test v1"), []byte("aad"), flipped) },
		"truncated":  func() ([]byte, error) { return Open(k, []byte("test v1"), []byte("aad"), ct[:40]) },
	} {
		if _, err := f(); !errors.Is(err, ErrOpen) {
			t.Errorf("%s: %v, want ErrOpen", name, err)
		}
	}
	if s := fmt.Sprint(k); s != "seal.PrivateKey(redacted)" {
		t.Errorf("private key prints as %q", s)
	}
	for _, bad := range []string{"", "coffre-xwing1:", "coffre-xwing1:!!", "age1xyz"} {
		if _, err := ParsePublicKey(bad); err == nil {
			t.Errorf("ParsePublicKey(%q) accepted", bad)
		}
	}
}

func FuzzParsePublicKey(f *testing.F) {
	k, _ := GenerateKey()
	f.Add(k.Public().String())
	f.Add("coffre-xwing1:AAAA")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePublicKey(s)
		if err == nil && p.String() == "" {
			t.Fatal("parsed key prints empty")
		}
	})
}
