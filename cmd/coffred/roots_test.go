package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms"
)

// TestOpenRoots: hsm.second_root makes the server's root a dual root over
// both keys, and hsm.previous_roots are opened beside it.
func TestOpenRoots(t *testing.T) {
	s := hsmtest.NewSoftHSM(t)
	pinA, pinB := s.NewToken(t, "vendor-a"), s.NewToken(t, "vendor-b")
	uriA, uriB, uriOld := s.RootURI("vendor-a", "root", pinA), s.RootURI("vendor-b", "root", pinB), s.RootURI("vendor-a", "old", pinA)
	ctx := context.Background()
	for _, uri := range []string{uriA, uriB, uriOld} {
		r, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: uri})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
	closeAll := func(closers []func() error) {
		for _, c := range closers {
			if err := c(); err != nil {
				t.Errorf("close: %v", err)
			}
		}
	}

	root, previous, closers, err := openRoots(ctx, HSMConfig{RootKey: uriA, SecondRoot: uriB, PreviousRoots: []string{uriOld, uriA}, Sessions: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(closers) != 4 {
		t.Errorf("%d closers for 4 keys", len(closers))
	}
	if want := "dual(pkcs11:token=vendor-a;object=root,pkcs11:token=vendor-b;object=root)"; root.ID() != want {
		t.Errorf("root ID %q, want %q", root.ID(), want)
	}
	if len(previous) != 2 || previous[0].ID() != "pkcs11:token=vendor-a;object=old" || previous[1].ID() != "pkcs11:token=vendor-a;object=root" {
		t.Errorf("previous roots %v", previous)
	}
	key := bytes.Repeat([]byte{1}, 32)
	w, err := root.Wrap(ctx, key, []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := root.Unwrap(ctx, w, []byte("aad")); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("dual round trip: %v", err)
	}
	if _, err := previous[1].Unwrap(ctx, w, []byte("aad")); !errors.Is(err, hsm.ErrUnwrap) {
		t.Errorf("vendor A's key alone unwrapped a dual blob: %v", err)
	}
	closeAll(closers)

	// A previous root that is not there: the error names the field, and
	// what was opened before it is returned for closing.
	_, _, closers, err = openRoots(ctx, HSMConfig{RootKey: uriA, PreviousRoots: []string{s.RootURI("vendor-b", "gone", pinB)}})
	if !errors.Is(err, hsm.ErrKeyNotFound) || !strings.Contains(err.Error(), "hsm.previous_roots[0]") {
		t.Errorf("missing previous root: %v", err)
	}
	if len(closers) != 1 {
		t.Errorf("%d closers after a failure, want 1", len(closers))
	}
	closeAll(closers)

	// Rotating away from a dual root: the pair becomes a previous dual
	// root, and blobs it wrapped still unwrap, through both keys only.
	_, previous, closers, err = openRoots(ctx, HSMConfig{RootKey: uriOld, PreviousDualRoots: []DualRootConfig{{RootKey: uriA, SecondRoot: uriB}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(previous) != 1 || previous[0].ID() != "dual(pkcs11:token=vendor-a;object=root,pkcs11:token=vendor-b;object=root)" {
		t.Fatalf("previous dual root %v", previous)
	}
	if got, err := previous[0].Unwrap(ctx, w, []byte("aad")); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("previous dual root unwrap: %v", err)
	}
	if uris := previousRootURIs(HSMConfig{PreviousRoots: []string{uriOld}, PreviousDualRoots: []DualRootConfig{{RootKey: uriA, SecondRoot: uriB}}}); len(uris) != 2 || len(uris[1]) != 2 || uris[1][1] != uriB {
		t.Errorf("previousRootURIs = %v", uris)
	}
	closeAll(closers)

	// A missing second root likewise.
	_, _, closers, err = openRoots(ctx, HSMConfig{RootKey: uriA, SecondRoot: s.RootURI("vendor-b", "gone", pinB)})
	if !errors.Is(err, hsm.ErrKeyNotFound) || !strings.Contains(err.Error(), "hsm.second_root") {
		t.Errorf("missing second root: %v", err)
	}
	closeAll(closers)
}

// TestDestroyableRoot: a previous root whose HSM key is also a key of the
// current root, or of another configured previous root, is not destroyed
// (moving from root A to the dual root (A, B) keeps A as a previous root
// that no KEK version names any more).
func TestDestroyableRoot(t *testing.T) {
	const (
		a = "pkcs11:token=vendor-a;object=root?pin-source=file:/etc/coffre/pin-a"
		b = "pkcs11:token=vendor-b;object=root?pin-source=file:/etc/coffre/pin-b"
		c = "pkcs11:token=vendor-c;object=root?pin-source=file:/etc/coffre/pin-c"
		z = "pkcs11:token=vendor-a;object=root-2024?pin-source=file:/etc/coffre/pin-a"
	)
	for _, tc := range []struct {
		name string
		cfg  HSMConfig
		i    int
		want string // "" destroyable, else part of the error
	}{
		{"A to dual (A, B)", HSMConfig{RootKey: a, SecondRoot: b, PreviousRoots: []string{a}}, 0, "also hsm.root_key"},
		{"dual (A, B) to dual (C, B)", HSMConfig{RootKey: c, SecondRoot: b, PreviousDualRoots: []DualRootConfig{{RootKey: a, SecondRoot: b}}}, 0, "also hsm.second_root"},
		{"same key in two previous roots", HSMConfig{RootKey: c, PreviousRoots: []string{a}, PreviousDualRoots: []DualRootConfig{{RootKey: a, SecondRoot: b}}}, 0, "also previous root pkcs11:token=vendor-a;object=root"},
		{"same key, other pin source", HSMConfig{RootKey: "pkcs11:token=vendor-a;object=root?pin-source=file:/other", PreviousRoots: []string{a}}, 0, "also hsm.root_key"},
		{"a root of its own", HSMConfig{RootKey: a, SecondRoot: b, PreviousRoots: []string{z}}, 0, ""},
		{"dual of its own", HSMConfig{RootKey: a, PreviousDualRoots: []DualRootConfig{{RootKey: z, SecondRoot: c}}}, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := destroyable(tc.cfg, tc.i)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !errors.Is(err, kms.ErrFailedPrecondition) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want FailedPrecondition with %q", err, tc.want)
			}
		})
	}
}
