package hsm

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func uintp(v uint) *uint { return &v }

func TestParseURIGood(t *testing.T) {
	for _, tc := range []struct {
		in    string
		want  URI
		canon string
		keyID string
	}{
		{
			in:    "pkcs11:token=coffre;object=root-2026?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/coffre/pin",
			want:  URI{Token: "coffre", Object: "root-2026", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "file:/etc/coffre/pin"},
			canon: "pkcs11:token=coffre;object=root-2026?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/coffre/pin",
			keyID: "pkcs11:token=coffre;object=root-2026",
		},
		{
			// Attribute order does not matter; the canonical form sorts.
			in:    "pkcs11:id=%01%02%ff;object=k;serial=ab12;slot-id=0042;manufacturer=SoftHSM%20project;token=t",
			want:  URI{Token: "t", Manufacturer: "SoftHSM project", Serial: "ab12", SlotID: uintp(42), Object: "k", ID: []byte{1, 2, 0xff}},
			canon: "pkcs11:token=t;manufacturer=SoftHSM%20project;serial=ab12;slot-id=42;object=k;id=%01%02%FF",
			keyID: "pkcs11:token=t;serial=ab12;slot-id=42;object=k;id=%01%02%FF",
		},
		{
			// Percent-encoded text, UTF-8 labels, and characters RFC 7512
			// allows unencoded.
			in:    "pkcs11:token=Caf%C3%A9%3Bx;object=a:b@c!$'()*+,=d&e",
			want:  URI{Token: "Café;x", Object: "a:b@c!$'()*+,=d&e"},
			canon: "pkcs11:token=Caf%C3%A9%3Bx;object=a:b@c!$'()*+,%3Dd%26e",
			keyID: "pkcs11:token=Caf%C3%A9%3Bx;object=a:b@c!$'()*+,%3Dd%26e",
		},
		{
			in:    "PKCS11:token=a;id=A?pin-source=file:///run/secrets/coffre%20pin%25",
			want:  URI{Token: "a", ID: []byte("A"), PINSource: "file:///run/secrets/coffre pin%"},
			canon: "pkcs11:token=a;id=%41?pin-source=file:///run/secrets/coffre%20pin%25",
			keyID: "pkcs11:token=a;id=%41",
		},
		{
			// Partial URIs parse; ValidateKey is the key-level check.
			in:    "pkcs11:",
			want:  URI{},
			canon: "pkcs11:",
			keyID: "pkcs11:",
		},
		{
			in:    "pkcs11:slot-id=0;object=r?module-path=/opt/hsm/lib%20x.so",
			want:  URI{SlotID: uintp(0), Object: "r", ModulePath: "/opt/hsm/lib x.so"},
			canon: "pkcs11:slot-id=0;object=r?module-path=/opt/hsm/lib%20x.so",
			keyID: "pkcs11:slot-id=0;object=r",
		},
	} {
		t.Run(tc.in, func(t *testing.T) {
			u, err := ParseURI(tc.in)
			if err != nil {
				t.Fatalf("ParseURI: %v", err)
			}
			if !reflect.DeepEqual(*u, tc.want) {
				t.Errorf("got %+v, want %+v", *u, tc.want)
			}
			if got := u.String(); got != tc.canon {
				t.Errorf("String() = %q, want %q", got, tc.canon)
			}
			if got := u.KeyID(); got != tc.keyID {
				t.Errorf("KeyID() = %q, want %q", got, tc.keyID)
			}
			u2, err := ParseURI(u.String())
			if err != nil {
				t.Fatalf("re-parse of %q: %v", u.String(), err)
			}
			if !reflect.DeepEqual(u, u2) {
				t.Errorf("re-parse differs: %+v vs %+v", u, u2)
			}
		})
	}
}

func TestParseURIBad(t *testing.T) {
	for _, tc := range []struct {
		in, attr, reason string
	}{
		{"", "", "not a pkcs11 URI"},
		{"file:/etc/pin", "", "not a pkcs11 URI"},
		{"pkcs11", "", "not a pkcs11 URI"},
		{"pkcs11:token=a;label=b", "label", "unknown path attribute"},
		{"pkcs11:token=a;x-vendor=b", "x-vendor", "unknown path attribute"},
		{"pkcs11:token=a;type=secret-key", "type", "secret key"},
		{"pkcs11:token=a;model=SoftHSM", "model", "not used"},
		{"pkcs11:token=a?module-name=softhsm2", "module-name", "absolute path"},
		{"pkcs11:token=a?foo=bar", "foo", "unknown query attribute"},
		{"pkcs11:token=a;token=b", "token", "duplicate"},
		{"pkcs11:token=a?module-path=/a&module-path=/b", "module-path", "duplicate"},
		{"pkcs11:token=a?pin-value=1234", "pin-value", "leaks"},
		{"pkcs11:token=a;pin-value=1234", "pin-value", "leaks"},
		{"pkcs11:token=a?pin-source=file:/p&pin-value=1234", "pin-value", "leaks"},
		{"pkcs11:token=a?module-path=lib/softhsm2.so", "module-path", "absolute"},
		{"pkcs11:token=a?module-path=", "module-path", "empty value"},
		{"pkcs11:slot-id=0x1", "slot-id", "decimal"},
		{"pkcs11:slot-id=-1", "slot-id", "decimal"},
		{"pkcs11:slot-id=+1", "slot-id", "decimal"},
		{"pkcs11:slot-id=99999999999999999999999", "slot-id", "out of range"},
		{"pkcs11:token=a%2", "token", "truncated percent-encoding"},
		{"pkcs11:token=a%zz", "token", "invalid percent-encoding"},
		{"pkcs11:token=a b", "token", "must be percent-encoded"},
		{"pkcs11:object=a/b", "object", "'/' must be percent-encoded"},
		{"pkcs11:token=%ff", "token", "UTF-8"},
		{"pkcs11:token=a%00b", "token", "control character"},
		{"pkcs11:token=0123456789012345678901234567890123", "token", "longer than 32"},
		{"pkcs11:serial=01234567890123456", "serial", "longer than 16"},
		{"pkcs11:token", "", "without \"=\""},
		{"pkcs11:token=a;;object=b", "", "without \"=\""},
		{"pkcs11:=a", "", "empty name"},
		{"pkcs11:token=", "token", "empty value"},
		{"pkcs11:token=a?", "", "empty query"},
		{"pkcs11:token=a?pin-source", "", "without \"=\""},
		{"pkcs11:token=a?token=b", "token", "duplicate"},
		{"pkcs11:?object=b", "object", "path attribute"},
		{"pkcs11:module-path=/x", "module-path", "query attribute"},
		{"pkcs11:token=a?pin-source=/etc/pin", "pin-source", "file: URI"},
		{"pkcs11:token=a?pin-source=|/bin/getpin", "pin-source", "file: URI"},
		{"pkcs11:token=a?pin-source=file:pin", "pin-source", "absolute"},
		{"pkcs11:token=a?pin-source=file://host/pin", "pin-source", "host"},
		{"pkcs11:token=a?pin-source=file:/p;x", "pin-source", "';' must be percent-encoded"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			u, err := ParseURI(tc.in)
			if err == nil {
				t.Fatalf("ParseURI(%q) = %+v, want error", tc.in, u)
			}
			var ue *URIError
			if !errors.As(err, &ue) {
				t.Fatalf("error %v is not a *URIError", err)
			}
			if ue.Attr != tc.attr {
				t.Errorf("Attr = %q, want %q (%v)", ue.Attr, tc.attr, err)
			}
			if !strings.Contains(ue.Reason, tc.reason) {
				t.Errorf("Reason = %q, want it to mention %q", ue.Reason, tc.reason)
			}
			if tc.attr != "" && !strings.Contains(err.Error(), tc.attr) {
				t.Errorf("error %q does not name attribute %q", err, tc.attr)
			}
		})
	}
}

// TestURIErrorNeverEchoesPIN checks that no error repeats a PIN, whether it
// was written as pin-value or slipped into a misspelt attribute.
func TestURIErrorNeverEchoesPIN(t *testing.T) {
	const pin = "s3cr3t-4711"
	for _, in := range []string{
		"pkcs11:token=a?pin-value=" + pin,
		"pkcs11:token=a?pin-source=file:/p&pin-value=" + pin,
		"pkcs11:token=a;pin-value=" + pin,
		"pkcs11:token=a?pinvalue=" + pin,
		"pkcs11:token=a?pin%2Dvalue=" + pin,
		"pkcs11:token=a;" + pin,
		"pkcs11:token=a?" + pin,
		"pkcs11:token=a;pin=" + pin + "?module-path=relative",
		pin,
	} {
		_, err := ParseURI(in)
		if err == nil {
			t.Fatalf("ParseURI(%q) succeeded", in)
		}
		if strings.Contains(err.Error(), pin) {
			t.Errorf("error for %q leaks the PIN: %v", in, err)
		}
		var ue *URIError
		if errors.As(err, &ue) && strings.Contains(ue.URI+ue.Attr+ue.Reason, pin) {
			t.Errorf("URIError fields for %q leak the PIN: %+v", in, ue)
		}
	}
}

func TestValidateKey(t *testing.T) {
	for in, ok := range map[string]bool{
		"pkcs11:token=a;object=r":           true,
		"pkcs11:serial=1;id=%01":            true,
		"pkcs11:slot-id=3;object=r":         true,
		"pkcs11:object=r":                   false,
		"pkcs11:token=a":                    false,
		"pkcs11:manufacturer=m;object=r":    false,
		"pkcs11:?module-path=/x":            false,
		"pkcs11:token=a;manufacturer=m":     false,
		"pkcs11:token=a;object=r;id=%01%02": true,
	} {
		u, err := ParseURI(in)
		if err != nil {
			t.Fatalf("ParseURI(%q): %v", in, err)
		}
		err = u.ValidateKey()
		if (err == nil) != ok {
			t.Errorf("ValidateKey(%q) = %v, want ok=%v", in, err, ok)
		}
		var ue *URIError
		if err != nil && !errors.As(err, &ue) {
			t.Errorf("ValidateKey error %v is not a *URIError", err)
		}
	}
}

func writePIN(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPIN(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		mode          os.FileMode
		want          string
		errText       string
	}{
		{"plain", "1234", 0o600, "1234", ""},
		{"newline", "1234\n", 0o600, "1234", ""},
		{"crlf", "1234\r\n", 0o400, "1234", ""},
		{"spaces kept", " 12 34 \n", 0o600, " 12 34 ", ""},
		{"group readable", "1234\n", 0o640, "", "must not be accessible to group or others"},
		{"world readable", "1234\n", 0o604, "", "must not be accessible to group or others"},
		{"group writable", "1234\n", 0o620, "", "must not be accessible to group or others"},
		{"empty", "", 0o600, "", "empty"},
		{"only newline", "\n", 0o600, "", "empty"},
		{"two lines", "1234\n5678\n", 0o600, "", "more than one line"},
		{"too big", strings.Repeat("1", 5000), 0o600, "", "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writePIN(t, tc.content, tc.mode)
			for _, src := range []string{"file:" + p, "file://" + p} {
				u := &URI{Token: "t", Object: "o", PINSource: src}
				got, err := u.PIN()
				if tc.errText == "" {
					if err != nil || got != tc.want {
						t.Fatalf("PIN() = %q, %v; want %q", got, err, tc.want)
					}
					continue
				}
				if err == nil {
					t.Fatalf("PIN() = %q, want error mentioning %q", got, tc.errText)
				}
				if !strings.Contains(err.Error(), tc.errText) {
					t.Errorf("error %q does not mention %q", err, tc.errText)
				}
				if strings.TrimSpace(tc.content) != "" && strings.Contains(err.Error(), strings.TrimSpace(tc.content)) {
					t.Errorf("error %q leaks the file content", err)
				}
				var ue *URIError
				if !errors.As(err, &ue) || ue.Attr != "pin-source" {
					t.Errorf("error %v is not a URIError on pin-source", err)
				}
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		u := &URI{PINSource: "file:" + filepath.Join(t.TempDir(), "nope")}
		_, err := u.PIN()
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("PIN() error = %v, want fs.ErrNotExist", err)
		}
	})
	t.Run("directory", func(t *testing.T) {
		d := t.TempDir()
		if err := os.Chmod(d, 0o700); err != nil {
			t.Fatal(err)
		}
		u := &URI{PINSource: "file:" + d}
		if _, err := u.PIN(); err == nil || !strings.Contains(err.Error(), "regular file") {
			t.Errorf("PIN() error = %v, want a not-a-regular-file error", err)
		}
	})
	t.Run("no pin-source", func(t *testing.T) {
		if _, err := (&URI{}).PIN(); err == nil || !strings.Contains(err.Error(), "pin-source") {
			t.Errorf("PIN() error = %v", err)
		}
	})
	t.Run("not a file URI", func(t *testing.T) {
		if _, err := (&URI{PINSource: "env:PIN"}).PIN(); err == nil || !strings.Contains(err.Error(), "file:") {
			t.Errorf("PIN() error = %v", err)
		}
	})
	t.Run("through ParseURI", func(t *testing.T) {
		p := writePIN(t, "9876\n", 0o600)
		u, err := ParseURI("pkcs11:token=t;object=o?pin-source=file:" + strings.ReplaceAll(p, " ", "%20"))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := u.PIN(); err != nil || got != "9876" {
			t.Errorf("PIN() = %q, %v", got, err)
		}
	})
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=coffre;object=root-2026?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/coffre/pin",
		"pkcs11:id=%01%02%ff;object=k;serial=ab12;slot-id=0042;manufacturer=SoftHSM%20project;token=t",
		"pkcs11:token=Caf%C3%A9%3Bx;object=a:b@c!$'()*+,=d&e",
		"pkcs11:token=a?pin-value=1234",
		"pkcs11:token=a?pin-source=file:///run/secrets/pin",
		"pkcs11:",
		"pkcs11:slot-id=18446744073709551615",
		"pkcs11:token=a%2",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			var ue *URIError
			if !errors.As(err, &ue) {
				t.Fatalf("error %v is not a *URIError", err)
			}
			if strings.Contains(s, "pin-value=") && strings.Contains(err.Error(), "pin-value=") &&
				!strings.Contains(err.Error(), "pin-value=REDACTED") {
				t.Fatalf("error echoes a pin-value: %v", err)
			}
			return
		}
		canon := u.String()
		u2, err := ParseURI(canon)
		if err != nil {
			t.Fatalf("ParseURI(%q) ok but its String() %q does not re-parse: %v", s, canon, err)
		}
		if !reflect.DeepEqual(u, u2) {
			t.Fatalf("re-parse of %q differs: %+v vs %+v", canon, u, u2)
		}
		if u2.String() != canon {
			t.Fatalf("String() not canonical: %q vs %q", u2.String(), canon)
		}
		k, err := ParseURI(u.KeyID())
		if err != nil {
			t.Fatalf("KeyID %q does not parse: %v", u.KeyID(), err)
		}
		if k.Token != u.Token || k.Serial != u.Serial || k.Object != u.Object || !bytes.Equal(k.ID, u.ID) ||
			!reflect.DeepEqual(k.SlotID, u.SlotID) || k.ModulePath != "" || k.PINSource != "" {
			t.Fatalf("KeyID %q does not identify the same key as %q", u.KeyID(), canon)
		}
	})
}
