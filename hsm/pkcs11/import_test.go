package pkcs11_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

func importRoot(t testing.TB, uri string, key []byte) *pkcs11.Root {
	t.Helper()
	r, err := pkcs11.ImportRoot(context.Background(), pkcs11.Config{URI: uri}, key)
	if err != nil {
		t.Fatalf("ImportRoot: %v", err)
	}
	t.Cleanup(func() { mustClose(t, r) })
	return r
}

// TestImportRootRestores is the property the recoverable ceremony rests
// on: a KEK wrapped under a root imported from bytes K into one token
// unwraps under the root imported from the same K into a fresh token, and
// under no other.
func TestImportRootRestores(t *testing.T) {
	e := newEnv(t)
	pinB := e.s.NewToken(t, "restored")
	pinC := e.s.NewToken(t, "other")
	ctx := context.Background()

	k := randBytes(32)
	a := importRoot(t, e.uri, k)
	kek, aad := randBytes(32), []byte("acme/disks\x00v1")
	w := roundTrip(t, a, kek, aad)

	b := importRoot(t, e.s.RootURI("restored", "root", pinB), bytes.Clone(k))
	got, err := b.Unwrap(ctx, w, aad)
	if err != nil {
		t.Fatalf("Unwrap under the restored root: %v", err)
	}
	if !bytes.Equal(got, kek) {
		t.Fatalf("restored root unwrapped %x, want %x", got, kek)
	}
	// And the other way round.
	w2 := roundTrip(t, b, kek, aad)
	if got, err := a.Unwrap(ctx, w2, aad); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("original root on a blob of the restored one: %x, %v", got, err)
	}

	k2 := bytes.Clone(k)
	k2[0] ^= 1
	c := importRoot(t, e.s.RootURI("other", "root", pinC), k2)
	if _, err := c.Unwrap(ctx, w, aad); !errors.Is(err, hsm.ErrUnwrap) {
		t.Fatalf("a root from other bytes unwrapped: %v", err)
	}

	// The imported root reopens like a generated one.
	mustClose(t, a)
	r, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.uri})
	if err != nil {
		t.Fatalf("Open of an imported root: %v", err)
	}
	defer mustClose(t, r)
	if got, err := r.Unwrap(ctx, w, aad); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("reopened imported root: %x, %v", got, err)
	}
}

func TestImportRootAttributes(t *testing.T) {
	e := newEnv(t)
	r := importRoot(t, e.uri, randBytes(32))
	a, err := r.Attributes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// ALWAYS_SENSITIVE and NEVER_EXTRACTABLE are false for any imported
	// key (PKCS#11 v2.40 §4.10): the token did not see its whole life.
	want := hsm.Attributes{
		Token: true, Private: true, Modifiable: false, Sensitive: true, Extractable: false,
		AlwaysSensitive: false, NeverExtractable: false,
		Encrypt: true, Decrypt: true, ValueLen: 32,
	}
	if a != want {
		t.Errorf("Attributes() = %+v\nwant           %+v", a, want)
	}

	// Independently of the package: the token refuses to reveal the value
	// and to relax the attributes.
	c := foreign(t)
	sh, err := c.OpenSession(slotOf(t, c, testToken), p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseSession(sh)
	if err := c.FindObjectsInit(sh, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, "root")}); err != nil {
		t.Fatal(err)
	}
	hs, _, err := c.FindObjects(sh, 10)
	_ = c.FindObjectsFinal(sh)
	if err != nil || len(hs) != 1 {
		t.Fatalf("FindObjects: %v, %d objects", err, len(hs))
	}
	val, err := c.GetAttributeValue(sh, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)})
	var rv p11.Error
	if !errors.As(err, &rv) || rv != p11.CKR_ATTRIBUTE_SENSITIVE {
		t.Errorf("GetAttributeValue(CKA_VALUE) = %v, %v; want CKR_ATTRIBUTE_SENSITIVE", val, err)
	}
	if err := c.SetAttributeValue(sh, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_EXTRACTABLE, true)}); err == nil {
		t.Error("SetAttributeValue(CKA_EXTRACTABLE=true) succeeded")
	}
	got, err := c.GetAttributeValue(sh, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
	if err != nil || len(got) != 1 || len(got[0].Value) != 16 {
		t.Errorf("CKA_ID: %v, %v; want 16 random bytes", got, err)
	}
	got, err = c.GetAttributeValue(sh, hs[0], []*p11.Attribute{
		p11.NewAttribute(p11.CKA_TOKEN, nil), p11.NewAttribute(p11.CKA_PRIVATE, nil), p11.NewAttribute(p11.CKA_MODIFIABLE, nil),
	})
	if err != nil || len(got) != 3 {
		t.Fatalf("GetAttributeValue: %v", err)
	}
	for i, want := range []byte{1, 1, 0} {
		if !bytes.Equal(got[i].Value, []byte{want}) {
			t.Errorf("attribute 0x%x = %x, want %x", got[i].Type, got[i].Value, want)
		}
	}
}

func TestImportRootRefusals(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	k := randBytes(32)

	for _, n := range []int{0, 16, 31, 33, 64} {
		if r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: e.uri}, make([]byte, n)); err == nil {
			mustClose(t, r)
			t.Errorf("ImportRoot accepted a %d-byte key", n)
		}
	}

	// A label already taken — by an imported or a generated key — is
	// refused and the token is left as it was.
	importRoot(t, e.uri, k)
	if r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: e.uri}, k); !errors.Is(err, hsm.ErrKeyExists) {
		if err == nil {
			mustClose(t, r)
		}
		t.Fatalf("second ImportRoot under the same label: %v; want ErrKeyExists", err)
	}
	gen := e.s.RootURI(testToken, "generated", e.pin)
	create(t, pkcs11.Config{URI: gen})
	if r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: gen}, k); !errors.Is(err, hsm.ErrKeyExists) {
		if err == nil {
			mustClose(t, r)
		}
		t.Fatalf("ImportRoot over a generated root: %v; want ErrKeyExists", err)
	}

	// The object is required: it becomes the label.
	u := hsm.URI{Token: testToken, ModulePath: hsmtest.Module, PINSource: "file:" + e.pin}
	if r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: u.String()}, k); err == nil {
		mustClose(t, r)
		t.Error("ImportRoot without object= succeeded")
	}
}
