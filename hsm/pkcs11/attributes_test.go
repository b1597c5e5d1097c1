package pkcs11_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// foreign returns a second handle on the SoftHSM library, as another
// component of the process (or a misbehaving one) would hold. It shares the
// library's global state with the Roots under test.
func foreign(t testing.TB) *p11.Ctx {
	t.Helper()
	c := p11.New(hsmtest.Module)
	if c == nil {
		t.Fatalf("cannot load %s", hsmtest.Module)
	}
	t.Cleanup(c.Destroy)
	return c
}

// slotOf finds the slot of the token labelled label through c.
func slotOf(t testing.TB, c *p11.Ctx, label string) uint {
	t.Helper()
	slots, err := c.GetSlotList(true)
	if err != nil {
		t.Fatalf("GetSlotList: %v", err)
	}
	for _, s := range slots {
		if ti, err := c.GetTokenInfo(s); err == nil && ti.Label == label {
			return s
		}
	}
	t.Fatalf("token %q not found", label)
	return 0
}

func TestRootAttributes(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri})
	ctx := context.Background()

	a, err := r.Attributes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := hsm.Attributes{
		Token: true, Private: true, Modifiable: false, Sensitive: true, Extractable: false,
		AlwaysSensitive: true, NeverExtractable: true,
		Encrypt: true, Decrypt: true, Wrap: false, Unwrap: false,
		Sign: false, Verify: false, Derive: false, ValueLen: 32,
	}
	if a != want {
		t.Errorf("Attributes() = %+v\nwant           %+v", a, want)
	}
	var _ hsm.AttributeReader = r

	// Independently of the package: a raw session of this process (logged
	// in, since login state is per process and token) reads the same
	// attributes, and the token refuses to reveal CKA_VALUE.
	c := foreign(t)
	slot := slotOf(t, c, testToken)
	sh, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseSession(sh)
	if err := c.FindObjectsInit(sh, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, "root")}); err != nil {
		t.Fatal(err)
	}
	hs, _, err := c.FindObjects(sh, 10)
	c.FindObjectsFinal(sh)
	if err != nil || len(hs) != 1 {
		t.Fatalf("FindObjects: %v, %d objects", err, len(hs))
	}
	got, err := c.GetAttributeValue(sh, hs[0], []*p11.Attribute{
		p11.NewAttribute(p11.CKA_TOKEN, nil),
		p11.NewAttribute(p11.CKA_PRIVATE, nil),
		p11.NewAttribute(p11.CKA_SENSITIVE, nil),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
		p11.NewAttribute(p11.CKA_NEVER_EXTRACTABLE, nil),
		p11.NewAttribute(p11.CKA_ALWAYS_SENSITIVE, nil),
		p11.NewAttribute(p11.CKA_WRAP, nil),
		p11.NewAttribute(p11.CKA_UNWRAP, nil),
		p11.NewAttribute(p11.CKA_MODIFIABLE, nil),
		p11.NewAttribute(p11.CKA_ID, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	wantBool := map[uint]bool{
		p11.CKA_TOKEN: true, p11.CKA_PRIVATE: true, p11.CKA_SENSITIVE: true, p11.CKA_EXTRACTABLE: false, p11.CKA_NEVER_EXTRACTABLE: true,
		p11.CKA_ALWAYS_SENSITIVE: true, p11.CKA_WRAP: false, p11.CKA_UNWRAP: false, p11.CKA_MODIFIABLE: false,
	}
	for _, at := range got {
		if at.Type == p11.CKA_ID {
			if len(at.Value) != 16 {
				t.Errorf("CKA_ID is %d bytes, want 16 random bytes", len(at.Value))
			}
			continue
		}
		if v := len(at.Value) == 1 && at.Value[0] != 0; v != wantBool[at.Type] {
			t.Errorf("attribute 0x%x = %v, want %v", at.Type, v, wantBool[at.Type])
		}
	}
	val, err := c.GetAttributeValue(sh, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)})
	var rv p11.Error
	if !errors.As(err, &rv) || rv != p11.CKR_ATTRIBUTE_SENSITIVE {
		t.Errorf("GetAttributeValue(CKA_VALUE) = %v, %v; want CKR_ATTRIBUTE_SENSITIVE", val, err)
	}
	// Nor can the attributes be relaxed (CKA_MODIFIABLE=false).
	err = c.SetAttributeValue(sh, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_EXTRACTABLE, true)})
	if err == nil {
		t.Error("SetAttributeValue(CKA_EXTRACTABLE=true) succeeded")
	}
}

// TestRootAttributesPkcs11Tool cross-checks the key with OpenSC's
// pkcs11-tool, a second, unrelated PKCS#11 client.
func TestRootAttributesPkcs11Tool(t *testing.T) {
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Fatalf("pkcs11-tool is required for this test; install the Debian package opensc: %v", err)
	}
	e := newEnv(t)
	create(t, pkcs11.Config{URI: e.uri})
	pin, err := os.ReadFile(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	// SOFTHSM2_CONF is in the environment (t.Setenv), so the tool sees the
	// same token directory. SoftHSM's file backend locks per object, so a
	// second process may read the token while this one has it open.
	base := []string{"--module", hsmtest.Module, "--token-label", testToken, "--login", "--pin", strings.TrimSpace(string(pin))}
	out, err := exec.Command(tool, append(base, "--list-objects", "--type", "secrkey")...).CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	text := string(out)
	t.Logf("pkcs11-tool --list-objects:\n%s", text)
	for _, want := range []string{
		"Secret Key Object; AES length 32",
		"label:      root",
		"Usage:      encrypt, decrypt\n",
		"Access:     sensitive, always sensitive, never extractable, local",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("pkcs11-tool output lacks %q", want)
		}
	}
	if strings.Count(text, "Secret Key Object") != 1 {
		t.Errorf("want exactly one secret key on the token")
	}
	for _, bad := range []string{"wrap", "unwrap", "derive", "sign", "verify"} {
		if line := usageLine(text); strings.Contains(line, bad) {
			t.Errorf("usage %q includes %s", line, bad)
		}
	}

	out, err = exec.Command(tool, append(base, "--read-object", "--type", "secrkey", "--label", "root")...).CombinedOutput()
	if err == nil {
		t.Errorf("pkcs11-tool read the key value:\n%s", out)
	}

	// CKA_PRIVATE, seen from outside: without logging in, another process
	// does not even see the key.
	out, err = exec.Command(tool, "--module", hsmtest.Module, "--token-label", testToken, "--list-objects", "--type", "secrkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects without login: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "Secret Key Object") {
		t.Errorf("pkcs11-tool lists the key without logging in (CKA_PRIVATE is false):\n%s", out)
	}
}

func usageLine(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "Usage:") {
			return l
		}
	}
	return ""
}

// TestOpenRefusesUnsafeKey puts a key on the token that violates the root
// key invariants and checks that Open will not use it.
func TestOpenRefusesUnsafeKey(t *testing.T) {
	e := newEnv(t)
	// A Root on another key keeps the process logged in to the token.
	create(t, pkcs11.Config{URI: e.s.RootURI(testToken, "good", e.pin)})

	c := foreign(t)
	slot := slotOf(t, c, testToken)
	sh, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseSession(sh)
	gen := func(label string, extra ...*p11.Attribute) {
		t.Helper()
		tmpl := append([]*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_LABEL, label),
			p11.NewAttribute(p11.CKA_ENCRYPT, true),
			p11.NewAttribute(p11.CKA_DECRYPT, true),
		}, extra...)
		if _, err := c.GenerateKey(sh, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, tmpl); err != nil {
			t.Fatalf("GenerateKey(%s): %v", label, err)
		}
	}
	safe := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_WRAP, false), p11.NewAttribute(p11.CKA_UNWRAP, false), p11.NewAttribute(p11.CKA_DERIVE, false),
		// SoftHSM defaults CKA_MODIFIABLE to true.
		p11.NewAttribute(p11.CKA_PRIVATE, true), p11.NewAttribute(p11.CKA_MODIFIABLE, false),
	}
	gen("defaults", p11.NewAttribute(p11.CKA_VALUE_LEN, 32)) // SoftHSM's permissive defaults
	gen("aes128", append(safe, p11.NewAttribute(p11.CKA_VALUE_LEN, 16))...)
	gen("extractable", append(safe[1:], p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, true), p11.NewAttribute(p11.CKA_VALUE_LEN, 32))...)
	gen("ok", append(safe, p11.NewAttribute(p11.CKA_VALUE_LEN, 32))...)

	for label, want := range map[string]string{
		"defaults":    "CKA_WRAP or CKA_UNWRAP",
		"aes128":      "CKA_VALUE_LEN is 16",
		"extractable": "CKA_EXTRACTABLE is true",
	} {
		r, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: e.s.RootURI(testToken, label, e.pin)})
		if err == nil {
			mustClose(t, r)
			t.Errorf("Open(%s) accepted an unsafe key", label)
			continue
		}
		if !strings.Contains(err.Error(), "not safe") || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%s): %v; want it to say %q", label, err, want)
		}
	}
	r, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: e.s.RootURI(testToken, "ok", e.pin)})
	if err != nil {
		t.Fatalf("Open of a safe key: %v", err)
	}
	mustClose(t, r)
}

// TestOpenRefusesPublicOrModifiableKey puts on the token, as a vendor tool
// might, AES-256 keys that are right in every respect but one of
// CKA_PRIVATE, CKA_MODIFIABLE and CKA_TOKEN, and checks that Open refuses
// each and names the attribute. A public root can be used by any process
// on the host without the PIN.
func TestOpenRefusesPublicOrModifiableKey(t *testing.T) {
	e := newEnv(t)
	// A Root on another key keeps the library initialised and the process
	// logged in to the token, so that the session object below lives on.
	create(t, pkcs11.Config{URI: e.s.RootURI(testToken, "good", e.pin)})

	c := foreign(t)
	sh, err := c.OpenSession(slotOf(t, c, testToken), p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseSession(sh)
	// gen makes a key with the root template, label and override changed.
	gen := func(label string, override *p11.Attribute) {
		t.Helper()
		tmpl := []*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
			p11.NewAttribute(p11.CKA_VALUE_LEN, 32),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_PRIVATE, true),
			p11.NewAttribute(p11.CKA_MODIFIABLE, false),
			p11.NewAttribute(p11.CKA_SENSITIVE, true),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
			p11.NewAttribute(p11.CKA_ENCRYPT, true),
			p11.NewAttribute(p11.CKA_DECRYPT, true),
			p11.NewAttribute(p11.CKA_WRAP, false),
			p11.NewAttribute(p11.CKA_UNWRAP, false),
			p11.NewAttribute(p11.CKA_SIGN, false),
			p11.NewAttribute(p11.CKA_VERIFY, false),
			p11.NewAttribute(p11.CKA_DERIVE, false),
			p11.NewAttribute(p11.CKA_LABEL, label),
		}
		if override != nil {
			for i, a := range tmpl {
				if a.Type == override.Type {
					tmpl[i] = override
				}
			}
		}
		if _, err := c.GenerateKey(sh, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, tmpl); err != nil {
			t.Fatalf("GenerateKey(%s): %v", label, err)
		}
	}
	gen("public", p11.NewAttribute(p11.CKA_PRIVATE, false))
	gen("modifiable", p11.NewAttribute(p11.CKA_MODIFIABLE, true))
	gen("session", p11.NewAttribute(p11.CKA_TOKEN, false)) // lives as long as sh
	gen("ok", nil)

	for _, tc := range []struct{ label, want string }{
		{"public", "CKA_PRIVATE is false"},
		{"modifiable", "CKA_MODIFIABLE is true"},
		{"session", "CKA_TOKEN is false"},
	} {
		r, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: e.s.RootURI(testToken, tc.label, e.pin)})
		if err == nil {
			mustClose(t, r)
			t.Errorf("Open(%s) accepted an unsafe key", tc.label)
			continue
		}
		if !strings.Contains(err.Error(), "not safe") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%s): %v; want it to say %q", tc.label, err, tc.want)
		}
	}
	r, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: e.s.RootURI(testToken, "ok", e.pin)})
	if err != nil {
		t.Fatalf("Open of the same key with every attribute right: %v", err)
	}
	mustClose(t, r)
}
