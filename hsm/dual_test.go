package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// twoVendors is one SoftHSM with two tokens standing for the HSMs of two
// vendors, each holding a root key, plus a second key on token B.
type twoVendors struct {
	s          *hsmtest.SoftHSM
	a, b, b2   *pkcs11.Root
	pinA, pinB string
	dirB       string // token B's directory in s.TokenDir
}

// retry is the roots' reconnect interval, short so outages heal quickly.
const retry = 10 * time.Millisecond

func newTwoVendors(t *testing.T) *twoVendors {
	t.Helper()
	v := &twoVendors{s: hsmtest.NewSoftHSM(t)}
	v.pinA = v.s.NewToken(t, "vendor-a")
	before := dirs(t, v.s.TokenDir)
	v.pinB = v.s.NewToken(t, "vendor-b")
	for d := range dirs(t, v.s.TokenDir) {
		if !before[d] {
			v.dirB = filepath.Join(v.s.TokenDir, d)
		}
	}
	v.a = createRoot(t, v.s.RootURI("vendor-a", "root-a", v.pinA))
	v.b = createRoot(t, v.s.RootURI("vendor-b", "root-b", v.pinB))
	v.b2 = createRoot(t, v.s.RootURI("vendor-b", "root-b2", v.pinB))
	return v
}

func dirs(t *testing.T, dir string) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, e := range ents {
		m[e.Name()] = true
	}
	return m
}

func createRoot(t *testing.T, uri string) *pkcs11.Root {
	t.Helper()
	r, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: uri, RetryInterval: retry})
	if err != nil {
		t.Fatalf("CreateRoot(%s): %v", uri, err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

func TestDualWrapNeedsBothRoots(t *testing.T) {
	v := newTwoVendors(t)
	ctx := context.Background()
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	aad := []byte("keyring acme/payroll v1")
	ab := hsm.NewDual(v.a, v.b)

	w, err := ab.Wrap(ctx, key, aad)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ab.Unwrap(ctx, w, aad)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Dual(A,B).Unwrap = %x, %v; want the key", got, err)
	}
	// A fresh Dual over the same two roots (as after a restart) unwraps it.
	if got, err := hsm.NewDual(v.a, v.b).Unwrap(ctx, w, aad); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("another Dual(A,B): %x, %v", got, err)
	}

	for name, r := range map[string]hsm.Root{
		"A alone":      v.a,
		"B alone":      v.b,
		"Dual(B,A)":    hsm.NewDual(v.b, v.a),
		"Dual(A,B2)":   hsm.NewDual(v.a, v.b2),
		"Dual(B2,B)":   hsm.NewDual(v.b2, v.b),
		"Dual(A,A)":    hsm.NewDual(v.a, v.a),
		"Dual(Dual..)": hsm.NewDual(hsm.NewDual(v.a, v.b), v.b),
		"B2 alone":     v.b2,
		"Dual(B,B)":    hsm.NewDual(v.b, v.b),
		"Dual(B2,A)":   hsm.NewDual(v.b2, v.a),
	} {
		if got, err := r.Unwrap(ctx, w, aad); !errors.Is(err, hsm.ErrUnwrap) || got != nil {
			t.Errorf("%s unwrapped a Dual(A,B) blob: %x, %v; want hsm.ErrUnwrap", name, got, err)
		}
	}

	// Other associated data, and a tampered blob, are refused with
	// ErrUnwrap alone whichever layer notices.
	if _, err := ab.Unwrap(ctx, w, []byte("keyring acme/payroll v2")); err != hsm.ErrUnwrap {
		t.Errorf("other aad: %v; want exactly hsm.ErrUnwrap", err)
	}
	for i := range w {
		bad := bytes.Clone(w)
		bad[i] ^= 0x01
		if _, err := ab.Unwrap(ctx, bad, aad); err != hsm.ErrUnwrap {
			t.Fatalf("bit flip at %d: %v; want exactly hsm.ErrUnwrap", i, err)
		}
	}

	// The layers authenticate their own domain: B over A with the
	// caller's aad unchanged (what a naive composition would store) is not
	// a dual blob, and each layer opens only with its prefix.
	naiveInner, err := v.a.Wrap(ctx, key, aad)
	if err != nil {
		t.Fatal(err)
	}
	naive, err := v.b.Wrap(ctx, naiveInner, aad)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ab.Unwrap(ctx, naive, aad); !errors.Is(err, hsm.ErrUnwrap) {
		t.Errorf("undomain-separated layers accepted: %v", err)
	}
	inner, err := v.b.Unwrap(ctx, w, append([]byte("coffre dual outer v1\x00"), aad...))
	if err != nil {
		t.Fatalf("outer layer with the documented aad: %v", err)
	}
	got, err = v.a.Unwrap(ctx, inner, append([]byte("coffre dual inner v1\x00"), aad...))
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("inner layer with the documented aad: %v", err)
	}
	if _, err := v.a.Unwrap(ctx, inner, aad); !errors.Is(err, hsm.ErrUnwrap) {
		t.Errorf("inner layer opened with the bare aad: %v", err)
	}
}

func TestDualID(t *testing.T) {
	v := newTwoVendors(t)
	ab := hsm.NewDual(v.a, v.b)
	if got, want := ab.ID(), "dual(pkcs11:token=vendor-a;object=root-a,pkcs11:token=vendor-b;object=root-b)"; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
	if hsm.NewDual(v.b, v.a).ID() == ab.ID() || hsm.NewDual(v.a, v.b2).ID() == ab.ID() {
		t.Error("different dual roots share an ID")
	}
	if strings.Contains(ab.ID(), "?") {
		t.Errorf("ID %q carries a URI query", ab.ID())
	}

	// Key labels with the separator characters: the ID stays one-to-one.
	// Without escaping, both pairs below would read
	// "dual(pkcs11:token=vendor-a;object=x,pkcs11:token=vendor-b;object=y,z)".
	x := createRoot(t, v.s.RootURI("vendor-a", "x", v.pinA))
	yz := createRoot(t, v.s.RootURI("vendor-b", "y,z", v.pinB))
	x2 := createRoot(t, v.s.RootURI("vendor-a", "x,pkcs11:token=vendor-b;object=y", v.pinA))
	z := createRoot(t, v.s.RootURI("vendor-b", "z", v.pinB))
	one, two := hsm.NewDual(x, yz), hsm.NewDual(x2, z)
	if one.ID() == two.ID() {
		t.Errorf("ambiguous IDs: %q", one.ID())
	}
	if got, want := one.ID(), "dual(pkcs11:token=vendor-a;object=x,pkcs11:token=vendor-b;object=y%2Cz)"; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
}

// TestDualLayerUnavailable: with one vendor's token gone, calls fail with
// that layer's hsm.ErrUnavailable — never ErrUnwrap, which would read as a
// verdict on the data.
func TestDualLayerUnavailable(t *testing.T) {
	v := newTwoVendors(t)
	ctx := context.Background()
	ab := hsm.NewDual(v.a, v.b)
	key := key32()
	w, err := ab.Wrap(ctx, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	away := filepath.Join(v.s.Dir, "vendor-b-away") // outside the token directory
	if err := os.Rename(v.dirB, away); err != nil {
		t.Fatal(err)
	}
	_, err = ab.Unwrap(ctx, w, nil)
	if !errors.Is(err, hsm.ErrUnavailable) || errors.Is(err, hsm.ErrUnwrap) {
		t.Fatalf("Unwrap with token B gone: %v; want hsm.ErrUnavailable", err)
	}
	if !strings.Contains(err.Error(), "outer layer pkcs11:token=vendor-b;object=root-b") {
		t.Errorf("error %q does not name the outer layer", err)
	}
	time.Sleep(retry)
	if _, err := ab.Wrap(ctx, key, nil); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Wrap with token B gone: %v; want hsm.ErrUnavailable", err)
	}
	if err := os.Rename(away, v.dirB); err != nil {
		t.Fatal(err)
	}
	// Recovery once the token is back is the pkcs11 package's business
	// (hsm/pkcs11 TestRecoverTokenRemoved); with three roots sharing the
	// module it rescans for tokens only every 30 s.
}

func TestDualClose(t *testing.T) {
	s := hsmtest.NewSoftHSM(t)
	pinA, pinB := s.NewToken(t, "vendor-a"), s.NewToken(t, "vendor-b")
	ctx := context.Background()
	a, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: s.RootURI("vendor-a", "root", pinA)})
	if err != nil {
		t.Fatal(err)
	}
	b, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: s.RootURI("vendor-b", "root", pinB)})
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	d := hsm.NewDual(a, b)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]*pkcs11.Root{"A": a, "B": b} {
		if _, err := r.Wrap(ctx, key32(), nil); !errors.Is(err, pkcs11.ErrClosed) {
			t.Errorf("root %s after Dual.Close: %v; want pkcs11.ErrClosed", name, err)
		}
	}
	if _, err := d.Wrap(ctx, key32(), nil); !errors.Is(err, pkcs11.ErrClosed) {
		t.Errorf("Dual.Wrap after Close: %v", err)
	}
}

func key32() []byte { return bytes.Repeat([]byte{0x42}, 32) }
