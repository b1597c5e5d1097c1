package hsmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

func TestNewSoftHSM(t *testing.T) {
	s := NewSoftHSM(t)
	if got := os.Getenv("SOFTHSM2_CONF"); got != s.ConfPath {
		t.Errorf("SOFTHSM2_CONF = %q, want %q", got, s.ConfPath)
	}
	conf, err := os.ReadFile(s.ConfPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"directories.tokendir = " + s.TokenDir + "\n", "objectstore.backend = file\n", "log.level = ERROR\n"} {
		if !strings.Contains(string(conf), want) {
			t.Errorf("softhsm2.conf lacks %q:\n%s", want, conf)
		}
	}
	if fi, err := os.Stat(s.TokenDir); err != nil || !fi.IsDir() {
		t.Errorf("token directory: %v", err)
	}
}

func TestNewToken(t *testing.T) {
	s := NewSoftHSM(t)
	pinFile := s.NewToken(t, "tok")
	fi, err := os.Stat(pinFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("PIN file mode %04o, want 0600", fi.Mode().Perm())
	}
	uri := s.RootURI("tok", "k", pinFile)
	u, err := hsm.ParseURI(uri)
	if err != nil {
		t.Fatalf("RootURI %q: %v", uri, err)
	}
	if err := u.ValidateKey(); err != nil {
		t.Error(err)
	}
	if pin, err := u.PIN(); err != nil || len(pin) < 16 {
		t.Errorf("PIN() = %d chars, %v", len(pin), err)
	}
	if _, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: uri}); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("Open on the new token: %v, want ErrKeyNotFound", err)
	}
	// A second token in the same instance.
	s.NewToken(t, "tok2")
}

func TestNewRoot(t *testing.T) {
	r := NewRoot(t)
	if got, want := r.ID(), "pkcs11:token=coffre-test;object=root"; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
	ctx := context.Background()
	w, err := r.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Unwrap(ctx, w, nil); err != nil {
		t.Fatal(err)
	}
}

// fatalTB records a Fatal instead of failing the real test.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (f *fatalTB) Skip(...any)          { panic("hsmtest skipped a test") }
func (f *fatalTB) Skipf(string, ...any) { panic("hsmtest skipped a test") }
func (f *fatalTB) SkipNow()             { panic("hsmtest skipped a test") }

// TestMissingModuleFails: without SoftHSM the test fails, naming the
// package to install; it is never skipped.
func TestMissingModuleFails(t *testing.T) {
	f := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		newSoftHSM(f, "/nonexistent/libsofthsm2.so")
	}()
	<-done
	if !strings.Contains(f.msg, "softhsm2") || !strings.Contains(f.msg, "Debian package") {
		t.Errorf("Fatal message %q does not name the Debian package", f.msg)
	}
}
