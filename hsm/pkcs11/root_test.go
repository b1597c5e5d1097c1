package pkcs11_test

// These tests run against a real SoftHSM2 (package hsmtest); none of them
// may call t.Parallel, since the PKCS#11 library and SOFTHSM2_CONF are
// process-global.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io/fs"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

const testToken = "coffre-test"

// env is one SoftHSM with one token.
type env struct {
	s   *hsmtest.SoftHSM
	pin string // path of the user PIN file
	uri string // the URI of key "root"
}

func newEnv(t testing.TB) *env {
	t.Helper()
	s := hsmtest.NewSoftHSM(t)
	pin := s.NewToken(t, testToken)
	return &env{s: s, pin: pin, uri: s.RootURI(testToken, "root", pin)}
}

func mustClose(t testing.TB, r *pkcs11.Root) {
	t.Helper()
	if err := r.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func create(t testing.TB, cfg pkcs11.Config) *pkcs11.Root {
	t.Helper()
	r, err := pkcs11.CreateRoot(context.Background(), cfg)
	if err != nil {
		t.Fatalf("CreateRoot: %v", err)
	}
	t.Cleanup(func() { mustClose(t, r) })
	return r
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func roundTrip(t testing.TB, r hsm.Root, key, aad []byte) []byte {
	t.Helper()
	ctx := context.Background()
	w, err := r.Wrap(ctx, key, aad)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	got, err := r.Unwrap(ctx, w, aad)
	if err != nil {
		t.Fatalf("Unwrap: %v", err)
	}
	if !bytes.Equal(got, key) {
		t.Fatalf("Unwrap = %x, want %x", got, key)
	}
	return w
}

func TestCreateAndReopen(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: e.uri})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := r.ID(), "pkcs11:token=coffre-test;object=root"; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
	key, aad := randBytes(32), []byte("keyring-1|v1")
	w := roundTrip(t, r, key, aad)
	mustClose(t, r)
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := r.Wrap(ctx, key, aad); !errors.Is(err, pkcs11.ErrClosed) {
		t.Errorf("Wrap after Close: %v, want ErrClosed", err)
	}

	r2, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.uri})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer mustClose(t, r2)
	if r2.ID() != r.ID() {
		t.Errorf("reopened ID %q != %q", r2.ID(), r.ID())
	}
	got, err := r2.Unwrap(ctx, w, aad)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("reopened Unwrap = %x, %v", got, err)
	}
}

func TestCreateRootWithID(t *testing.T) {
	e := newEnv(t)
	uri := "pkcs11:token=coffre-test;object=root;id=%C0%FF%EE?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin
	r := create(t, pkcs11.Config{URI: uri})
	if got, want := r.ID(), "pkcs11:token=coffre-test;object=root;id=%C0%FF%EE"; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
	w := roundTrip(t, r, randBytes(32), nil)
	// The key can be found by its id alone.
	byID := "pkcs11:token=coffre-test;id=%C0%FF%EE?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin
	r2, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: byID})
	if err != nil {
		t.Fatalf("Open by id: %v", err)
	}
	defer mustClose(t, r2)
	if _, err := r2.Unwrap(context.Background(), w, nil); err != nil {
		t.Errorf("Unwrap through the id URI: %v", err)
	}
}

func TestWrapFormat(t *testing.T) {
	r := hsmtest.NewRoot(t)
	ctx := context.Background()
	for _, n := range []int{1, 16, 32, 64, 1000} {
		for _, aad := range [][]byte{nil, {}, []byte("a"), randBytes(300)} {
			key := randBytes(n)
			w := roundTrip(t, r, key, aad)
			if len(w) != 1+12+n+16 {
				t.Errorf("len(Wrap(%d bytes)) = %d, want %d", n, len(w), 1+12+n+16)
			}
			if w[0] != 0x01 {
				t.Errorf("format byte %#x, want 0x01", w[0])
			}
			w2, err := r.Wrap(ctx, key, aad)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(w[1:13], w2[1:13]) {
				t.Errorf("two wraps used the same IV %x", w[1:13])
			}
		}
	}
	// nil and empty aad are the same associated data.
	w, _ := r.Wrap(ctx, []byte("k"), nil)
	if _, err := r.Unwrap(ctx, w, []byte{}); err != nil {
		t.Errorf("nil vs empty aad: %v", err)
	}
	if _, err := r.Wrap(ctx, nil, nil); err == nil {
		t.Error("Wrap of an empty key succeeded")
	}
}

func TestUnwrapFailures(t *testing.T) {
	r := hsmtest.NewRoot(t)
	ctx := context.Background()
	key, aad := randBytes(32), []byte("tenant|keyring|v7")
	w, err := r.Wrap(ctx, key, aad)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, wrapped, aad []byte) {
		t.Helper()
		got, err := r.Unwrap(ctx, wrapped, aad)
		if err == nil {
			t.Errorf("%s: Unwrap succeeded: %x", name, got)
			return
		}
		// Exactly the sentinel: no detail that could serve as an oracle.
		if err != hsm.ErrUnwrap { //nolint:errorlint // the contract is the bare sentinel
			t.Errorf("%s: Unwrap error %q, want exactly hsm.ErrUnwrap", name, err)
		}
	}
	check("wrong aad", w, []byte("tenant|keyring|v8"))
	check("missing aad", w, nil)
	check("extra aad", w, append(append([]byte{}, aad...), 0))
	for i := range w {
		for bit := 0; bit < 8; bit++ {
			f := bytes.Clone(w)
			f[i] ^= 1 << bit
			check("flipped bit", f, aad)
		}
	}
	for n := 0; n < len(w); n++ {
		check("truncated", w[:n], aad)
	}
	check("extended", append(bytes.Clone(w), 0), aad)
	check("nil", nil, aad)

	// The root still works after all those failures.
	roundTrip(t, r, key, aad)
}

func TestOtherRootCannotUnwrap(t *testing.T) {
	e := newEnv(t)
	pin2 := e.s.NewToken(t, "coffre-other")
	r1 := create(t, pkcs11.Config{URI: e.uri})
	r2 := create(t, pkcs11.Config{URI: e.s.RootURI("coffre-other", "root", pin2)})
	if r1.ID() == r2.ID() {
		t.Fatalf("two roots share ID %q", r1.ID())
	}
	ctx := context.Background()
	w, err := r1.Wrap(ctx, randBytes(32), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r2.Unwrap(ctx, w, nil); err != hsm.ErrUnwrap { //nolint:errorlint
		t.Errorf("other root's Unwrap: %v, want hsm.ErrUnwrap", err)
	}
	// Closing one root leaves the other, on the same module, working.
	mustClose(t, r1)
	roundTrip(t, r2, randBytes(32), nil)
}

func TestCreateRootTwice(t *testing.T) {
	e := newEnv(t)
	create(t, pkcs11.Config{URI: e.uri})
	_, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: e.uri})
	if !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("second CreateRoot: %v, want hsm.ErrKeyExists", err)
	}
	if !strings.Contains(err.Error(), "pkcs11:token=coffre-test;object=root") {
		t.Errorf("error %q does not name the key", err)
	}
	// Same id under another label is refused too.
	withID := "pkcs11:token=coffre-test;object=a;id=%01?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin
	create(t, pkcs11.Config{URI: withID})
	otherLabelSameID := "pkcs11:token=coffre-test;object=b;id=%01?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin
	if _, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: otherLabelSameID}); !errors.Is(err, hsm.ErrKeyExists) {
		t.Errorf("CreateRoot with a used id: %v, want hsm.ErrKeyExists", err)
	}
}

func TestOpenMissing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.uri})
	if !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("Open of a missing key: %v, want hsm.ErrKeyNotFound", err)
	}
	if !strings.Contains(err.Error(), "pkcs11:token=coffre-test;object=root") {
		t.Errorf("error %q does not name the key", err)
	}

	_, err = pkcs11.Open(ctx, pkcs11.Config{URI: e.s.RootURI("no-such-token", "root", e.pin)})
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), `token "no-such-token" not present`) {
		t.Errorf("Open on a missing token: %v, want ErrUnavailable naming the token", err)
	}
}

func TestOpenErrors(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	var ue *hsm.URIError

	// Wrong PIN: the token refuses it; that is not an outage. (Checked
	// while no other Root is logged in to the token: login state belongs to
	// the process, and a second login reports "already logged in" without
	// looking at the PIN.)
	wrong := e.s.Dir + "/wrong-pin"
	if err := os.WriteFile(wrong, []byte("00000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: e.s.RootURI(testToken, "root", wrong)})
	if err == nil {
		mustClose(t, r)
	}
	if err == nil || errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "refused the user PIN") {
		t.Errorf("wrong PIN: %v", err)
	}
	create(t, pkcs11.Config{URI: e.uri})

	// PIN file readable by others.
	loose := e.s.Dir + "/loose-pin"
	pin, _ := os.ReadFile(e.pin)
	if err := os.WriteFile(loose, pin, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = pkcs11.Open(ctx, pkcs11.Config{URI: e.s.RootURI(testToken, "root", loose)})
	if !errors.As(err, &ue) || ue.Attr != "pin-source" || !strings.Contains(err.Error(), "0644") {
		t.Errorf("group/world-readable PIN file: %v", err)
	}
	if strings.Contains(err.Error(), strings.TrimSpace(string(pin))) {
		t.Errorf("error leaks the PIN: %v", err)
	}

	// Missing PIN file.
	_, err = pkcs11.Open(ctx, pkcs11.Config{URI: e.s.RootURI(testToken, "root", e.s.Dir+"/nope")})
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing PIN file: %v, want fs.ErrNotExist", err)
	}

	// pin-value is refused before anything is loaded.
	_, err = pkcs11.Open(ctx, pkcs11.Config{URI: "pkcs11:token=coffre-test;object=root?module-path=" + hsmtest.Module + "&pin-value=1234"})
	if !errors.As(err, &ue) || ue.Attr != "pin-value" || strings.Contains(err.Error(), "1234") {
		t.Errorf("pin-value: %v", err)
	}

	for name, cfg := range map[string]pkcs11.Config{
		"empty URI":         {},
		"no key":            {URI: "pkcs11:token=coffre-test?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin},
		"no token":          {URI: "pkcs11:object=root?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin},
		"no module":         {URI: "pkcs11:token=coffre-test;object=root?pin-source=file:" + e.pin},
		"no pin-source":     {URI: "pkcs11:token=coffre-test;object=root?module-path=" + hsmtest.Module},
		"too many sessions": {URI: e.uri, Sessions: 65},
		"negative sessions": {URI: e.uri, Sessions: -1},
		"negative retry":    {URI: e.uri, RetryInterval: -time.Second},
		"not a module":      {URI: "pkcs11:token=coffre-test;object=root?module-path=/etc/hostname&pin-source=file:" + e.pin},
		"missing module":    {URI: "pkcs11:token=coffre-test;object=root?module-path=/nonexistent/lib.so&pin-source=file:" + e.pin},
	} {
		if r, err := pkcs11.Open(ctx, cfg); err == nil {
			mustClose(t, r)
			t.Errorf("%s: Open succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}

	// CreateRoot needs a label.
	byID := "pkcs11:token=coffre-test;id=%01?module-path=" + hsmtest.Module + "&pin-source=file:" + e.pin
	if _, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: byID}); !errors.As(err, &ue) || ue.Attr != "object" {
		t.Errorf("CreateRoot without object: %v", err)
	}
}

func TestInitTokenTwice(t *testing.T) {
	newEnv(t)
	err := pkcs11.InitToken(context.Background(), hsmtest.Module, testToken, "12345678", "87654321")
	if !errors.Is(err, pkcs11.ErrTokenExists) {
		t.Errorf("InitToken over an existing label: %v, want ErrTokenExists", err)
	}
	for _, label := range []string{"", " x", strings.Repeat("a", 33), "a\x00b"} {
		if err := pkcs11.InitToken(context.Background(), hsmtest.Module, label, "12345678", "87654321"); err == nil {
			t.Errorf("InitToken(%q) succeeded", label)
		}
	}
}

// TestSoftHSMConfReread checks what hsmtest relies on: once every Root is
// closed, the library is finalised and the next Open reads the new
// SOFTHSM2_CONF, so a token of the previous instance is not visible.
func TestSoftHSMConfReread(t *testing.T) {
	e1 := newEnv(t)
	r1 := create(t, pkcs11.Config{URI: e1.uri})
	mustClose(t, r1)

	e2 := hsmtest.NewSoftHSM(t) // a new, empty instance
	_, err := pkcs11.Open(context.Background(), pkcs11.Config{URI: e1.uri})
	if !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Open against the new SOFTHSM2_CONF: %v; want the old token to be absent", err)
	}
	pin := e2.NewToken(t, testToken)
	create(t, pkcs11.Config{URI: e2.RootURI(testToken, "root", pin)})
}

func TestContext(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, Sessions: 2})
	w := roundTrip(t, r, randBytes(32), nil)

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.Wrap(cancelled, randBytes(32), nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Wrap with a cancelled context: %v", err)
	}
	if _, err := pkcs11.Open(cancelled, pkcs11.Config{URI: e.uri}); !errors.Is(err, context.Canceled) {
		t.Errorf("Open with a cancelled context: %v", err)
	}

	// Waiting for a pooled session honours the deadline.
	release := pkcs11.FillPool(r)
	ctx, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	start := time.Now()
	_, err := r.Unwrap(ctx, w, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Unwrap with the pool exhausted: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Unwrap waited %v past its deadline", d)
	}
	release()
	if _, err := r.Unwrap(context.Background(), w, nil); err != nil {
		t.Errorf("Unwrap after the pool freed: %v", err)
	}
}

func TestConcurrent(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, Sessions: 4})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				key, aad := randBytes(32), randBytes(8)
				w, err := r.Wrap(ctx, key, aad)
				if err != nil {
					errs <- err
					return
				}
				got, err := r.Unwrap(ctx, w, aad)
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, key) {
					errs <- errors.New("round trip mismatch")
					return
				}
				if _, err := r.Unwrap(ctx, w, nil); err != hsm.ErrUnwrap { //nolint:errorlint
					errs <- errors.New("wrong aad accepted or wrong error: " + errString(err))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// BenchmarkUnwrap measures a KEK cache miss: one AES-GCM decryption of a
// 32-byte KEK inside SoftHSM through the session pool.
func BenchmarkUnwrap(b *testing.B) {
	r := hsmtest.NewRoot(b)
	ctx := context.Background()
	aad := []byte("tenant|keyring|1")
	w, err := r.Wrap(ctx, randBytes(32), aad)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		k, err := r.Unwrap(ctx, w, aad)
		if err != nil {
			b.Fatal(err)
		}
		clear(k)
	}
}
