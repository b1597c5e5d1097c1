// Package hsmtest gives tests a real SoftHSM2 token and root key, so that
// code which needs an HSM is tested against a PKCS#11 implementation rather
// than a mock of one.
//
// Each [NewSoftHSM] makes a private token directory and configuration file
// under t.TempDir and points SOFTHSM2_CONF at it with t.Setenv. SoftHSM reads
// SOFTHSM2_CONF only in C_Initialize, and package
// [github.com/coffre-kms/coffre/hsm/pkcs11] finalises the library when the
// last Root on it is closed, so successive tests in one process each get
// their own empty SoftHSM.
//
// # No parallel tests
//
// A PKCS#11 library is process-global state and the environment is too, so
// tests that use this package must not call t.Parallel (t.Setenv panics if
// they do), and every Root a test opens must be closed by the end of that
// test ([NewRoot] arranges it with t.Cleanup). Parallelism across packages
// is fine: each test binary is its own process.
//
// The package fails the test — it never skips it — when SoftHSM2 is not
// installed: a skipped HSM test looks like a passing one.
package hsmtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// Module is the SoftHSM2 PKCS#11 module as installed by the Debian package
// softhsm2 (libsofthsm2).
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// SoftHSM is a private SoftHSM2 instance: a token directory and the
// configuration file that SOFTHSM2_CONF names for the rest of the test.
type SoftHSM struct {
	// Dir is the instance's directory (a t.TempDir).
	Dir string
	// ConfPath is the softhsm2.conf in Dir.
	ConfPath string
	// TokenDir is the directory SoftHSM keeps tokens in, one subdirectory
	// per token; tests that simulate a removed token move those.
	TokenDir string
}

// NewSoftHSM makes an empty SoftHSM2 instance for t and sets SOFTHSM2_CONF
// to it until the end of t.
func NewSoftHSM(t testing.TB) *SoftHSM {
	t.Helper()
	return newSoftHSM(t, Module)
}

func newSoftHSM(t testing.TB, module string) *SoftHSM {
	t.Helper()
	if _, err := os.Stat(module); err != nil {
		t.Fatalf("hsmtest: SoftHSM2 is required and its module is missing (%v); install the Debian package softhsm2 (apt-get install softhsm2)", err)
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatalf("hsmtest: %v", err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	content := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", tokens)
	if err := os.WriteFile(conf, []byte(content), 0o600); err != nil {
		t.Fatalf("hsmtest: %v", err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	return &SoftHSM{Dir: dir, ConfPath: conf, TokenDir: tokens}
}

// NewToken initialises a token labelled label with random security-officer
// and user PINs, and returns the path of a file (mode 0600) holding the user
// PIN, ready for a pin-source.
func (s *SoftHSM) NewToken(t testing.TB, label string) (pinFile string) {
	t.Helper()
	before, _ := os.ReadDir(s.TokenDir)
	soPIN, userPIN := randomPIN(), randomPIN()
	f, err := os.CreateTemp(s.Dir, "user-pin-*") // created 0600
	if err != nil {
		t.Fatalf("hsmtest: %v", err)
	}
	if _, err := f.WriteString(userPIN + "\n"); err != nil {
		t.Fatalf("hsmtest: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("hsmtest: %v", err)
	}
	const hint = "; if SoftHSM is using another token directory, a Root from an earlier test in this process was not closed " +
		"(the library then stays initialised with the old SOFTHSM2_CONF)"
	if err := pkcs11.InitToken(context.Background(), Module, label, soPIN, userPIN); err != nil {
		t.Fatalf("hsmtest: initialising token %q: %v%s", label, err, hint)
	}
	after, _ := os.ReadDir(s.TokenDir)
	if len(after) != len(before)+1 {
		t.Fatalf("hsmtest: token %q was not created in %s%s", label, s.TokenDir, hint)
	}
	return f.Name()
}

// RootURI returns the pkcs11: URI of key object on token label, with the
// SoftHSM module and pinFile as pin-source.
func (s *SoftHSM) RootURI(label, object, pinFile string) string {
	u := hsm.URI{Token: label, Object: object, ModulePath: Module, PINSource: "file:" + pinFile}
	return u.String()
}

// NewRoot returns a root key on a fresh SoftHSM: token "coffre-test", key
// "root", made by pkcs11.CreateRoot. It is closed when t ends.
func NewRoot(t testing.TB) *pkcs11.Root {
	t.Helper()
	s := NewSoftHSM(t)
	pin := s.NewToken(t, "coffre-test")
	r, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: s.RootURI("coffre-test", "root", pin)})
	if err != nil {
		t.Fatalf("hsmtest: creating the root key: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("hsmtest: closing the root: %v", err)
		}
	})
	return r
}

func randomPIN() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}
