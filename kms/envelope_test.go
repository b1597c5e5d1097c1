package kms

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func testEnvelope(t testing.TB) []byte {
	t.Helper()
	id := KeyringID{Tenant: "acme", Name: "disks"}
	env := appendHeader(nil, id, 7, bytes.Repeat([]byte{0xaa}, nonceSize))
	return append(env, bytes.Repeat([]byte{0xbb}, dataKeySize+tagSize)...)
}

func TestParseEnvelope(t *testing.T) {
	good := testEnvelope(t)
	e, err := parseEnvelope(good)
	if err != nil {
		t.Fatal(err)
	}
	if e.keyring.String() != "acme/disks" || e.version != 7 || len(e.nonce) != nonceSize || len(e.ciphertext) != dataKeySize+tagSize {
		t.Fatalf("parsed %+v", e)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "truncated"},
		{"truncated header", good[:6], "truncated"},
		{"truncated body", good[:len(good)-1], "length"},
		{"trailing byte", append(bytes.Clone(good), 0), "length"},
		{"bad magic", mut(func(b []byte) []byte { b[0] = 'X'; return b }), "not a Coffre envelope"},
		{"future version", mut(func(b []byte) []byte { b[3] = 2; return b }), "unsupported format version 2"},
		{"id length too long", mut(func(b []byte) []byte { b[4] = 200; return b }), "length"},
		{"bad keyring id", mut(func(b []byte) []byte { b[5] = 'A'; return b }), "keyring id"},
		{"no slash", mut(func(b []byte) []byte { b[9] = 'x'; return b }), "keyring id"},
		{"version zero", mut(func(b []byte) []byte { copy(b[15:19], []byte{0, 0, 0, 0}); return b }), "KEK version 0"},
		{"oversized", make([]byte, MaxEnvelopeSize+1), "longer than any valid envelope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := parseEnvelope(tc.in)
			if e != nil || !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("parseEnvelope = %v, %v; want ErrInvalidArgument mentioning %q", e, err, tc.want)
			}
		})
	}
}

func TestCanonicalContext(t *testing.T) {
	a, err := canonicalContext(map[string]string{"b": "2", "a": "1"})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := canonicalContext(map[string]string{"a": "1", "b": "2"})
	if !bytes.Equal(a, b) {
		t.Fatal("context encoding depends on map order")
	}
	// Length prefixes keep ("ab","c") and ("a","bc") apart.
	c, _ := canonicalContext(map[string]string{"ab": "c"})
	d, _ := canonicalContext(map[string]string{"a": "bc"})
	if bytes.Equal(c, d) {
		t.Fatal("ambiguous context encoding")
	}
	empty, _ := canonicalContext(nil)
	if len(empty) != 4 {
		t.Fatalf("empty context encodes to %x", empty)
	}
	big := map[string]string{}
	for i := range MaxContextPairs + 1 {
		big[strings.Repeat("k", i+1)] = "v"
	}
	for name, ec := range map[string]map[string]string{
		"empty key":  {"": "v"},
		"long key":   {strings.Repeat("k", MaxContextKeyLen+1): "v"},
		"long value": {"k": strings.Repeat("v", MaxContextValueLen+1)},
		"bad utf8":   {"k": "\xff"},
		"too many":   big,
	} {
		if _, err := canonicalContext(ec); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
}

func TestParseKeyringID(t *testing.T) {
	for _, ok := range []string{"acme/disks", "a/b", "t-1/n_2", strings.Repeat("a", 63) + "/" + strings.Repeat("b", 63)} {
		if _, err := ParseKeyringID(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "acme", "/disks", "acme/", "Acme/disks", "acme/di sks", "acme/-x", "a/b/c", "acme/dïsks",
		strings.Repeat("a", 64) + "/b", "acme/disks\x00"} {
		if _, err := ParseKeyringID(bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%q: err = %v, want ErrInvalidArgument", bad, err)
		}
	}
}

// FuzzParseEnvelope: the parser of outside input never panics, and what it
// accepts re-encodes to the same bytes.
func FuzzParseEnvelope(f *testing.F) {
	f.Add(testEnvelope(f))
	f.Add([]byte("CFE\x01"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := parseEnvelope(b)
		if err != nil {
			if e != nil || !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("error %v with result %v", err, e)
			}
			return
		}
		re := append(appendHeader(nil, e.keyring, e.version, e.nonce), e.ciphertext...)
		if !bytes.Equal(re, b) {
			t.Fatalf("re-encoding differs:\n%x\n%x", re, b)
		}
	})
}

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret([]byte("super-secret-key-material-000000"))
	for _, out := range []string{
		s.String(), s.GoString(),
	} {
		if strings.Contains(out, "super") {
			t.Fatalf("secret printed: %s", out)
		}
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		if out := sprintf(verb, s); strings.Contains(out, "super") || strings.Contains(out, "7375706572") || out != redacted {
			t.Fatalf("%s printed %q", verb, out)
		}
	}
	j, _ := s.MarshalJSON()
	if strings.Contains(string(j), "super") {
		t.Fatal("secret in JSON")
	}
	b := s.Expose()
	s.Zero()
	if !bytes.Equal(b, make([]byte, len(b))) || s.Len() != 0 {
		t.Fatal("Zero left key bytes behind")
	}
}

func sprintf(verb string, v any) string { return fmt.Sprintf(verb, v) }

// TestEnvelopeKeyKAT pins the envelope KDF to a value computed outside Go
// (Python's hmac module over the message ENVELOPE.md specifies).
func TestEnvelopeKeyKAT(t *testing.T) {
	kek, nonce := make([]byte, 32), make([]byte, 32)
	for i := range 32 {
		kek[i], nonce[i] = byte(i), byte(32+i)
	}
	const want = "b4e5025f68f071d7a4cfd265259742e51be8ed5c761c65e5c6a2e48a1aee9b21"
	if got := fmt.Sprintf("%x", envelopeKey(kek, nonce)); got != want {
		t.Fatalf("envelopeKey = %s, want %s", got, want)
	}
}
