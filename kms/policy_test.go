package kms

import (
	"errors"
	"testing"
)

func TestAdmit(t *testing.T) {
	id := KeyringID{Tenant: "acme", Name: "disks"}
	p := &KeyringPolicy{
		Keyring:        id,
		AllowedClasses: []string{"edge", "storage"},
		RequiredLabels: map[string]string{"jurisdiction": "ca-qc", "site": "mtl-1"},
		Release:        ReleaseHPKE,
	}
	good := map[string]string{"jurisdiction": "ca-qc", "site": "mtl-1", "extra": "x"}
	if err := admit(id, p, "n", "storage", good); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		p      *KeyringPolicy
		class  string
		labels map[string]string
		want   string
	}{
		{nil, "storage", good, "keyring acme/disks has no release policy"},
		{p, "gpu", good, "keyring acme/disks does not release to class gpu of node n (allowed classes: edge, storage)"},
		{&KeyringPolicy{Keyring: id}, "gpu", good, "(allowed classes: none)"},
		{p, "storage", map[string]string{"site": "mtl-1"}, "requires label jurisdiction=ca-qc; node n has no label jurisdiction"},
		{p, "storage", map[string]string{"jurisdiction": "fr", "site": "mtl-1"}, "requires label jurisdiction=ca-qc; node n has jurisdiction=fr"},
		// Both unmet: the first in key order is named, every time.
		{p, "storage", map[string]string{"jurisdiction": "fr", "site": "x"}, "jurisdiction=ca-qc"},
		{p, "storage", nil, "jurisdiction=ca-qc"},
	} {
		for range 5 {
			err := admit(id, tc.p, "n", tc.class, tc.labels)
			wantErr(t, err, ErrPermissionDenied, tc.want)
		}
	}
}

func TestKeyringPolicies(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	pol := &KeyringPolicy{Keyring: id, AllowedClasses: []string{"storage"}, RequiredLabels: map[string]string{"jurisdiction": "ca-qc"}, Release: ReleaseTPM}
	_, err := f.rel.SetKeyringPolicy(ctx, pol)
	wantErr(t, err, ErrNotFound, "keyring acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	_, err = f.rel.SetKeyringPolicy(ctx, pol)
	wantErr(t, err, ErrFailedPrecondition, "class storage does not exist")
	if _, err := f.rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	got, err := f.rel.SetKeyringPolicy(ctx, pol)
	if err != nil {
		t.Fatal(err)
	}
	if got.Release != ReleaseTPM || got.UpdateTime.IsZero() {
		t.Fatalf("set: %+v", got)
	}
	read, err := f.rel.GetKeyringPolicy(ctx, id)
	if err != nil || read.Release != ReleaseTPM || read.RequiredLabels["jurisdiction"] != "ca-qc" || len(read.AllowedClasses) != 1 {
		t.Fatalf("get: %+v, %v", read, err)
	}
	if _, err := f.rel.GetKeyringPolicy(ctx, mustID(t, "acme/other")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v", err)
	}
	for _, tc := range []struct {
		p    *KeyringPolicy
		want string
	}{
		{nil, "policy is missing"},
		{&KeyringPolicy{Keyring: id, Release: ReleaseUnspecified}, "release must be hpke or tpm"},
		{&KeyringPolicy{Keyring: id, AllowedClasses: []string{"storage", "storage"}, Release: ReleaseHPKE}, "named twice"},
		{&KeyringPolicy{Keyring: id, AllowedClasses: []string{"Storage"}, Release: ReleaseHPKE}, "class name"},
		{&KeyringPolicy{Keyring: id, RequiredLabels: map[string]string{"A": "b"}, Release: ReleaseHPKE}, "label key"},
		{&KeyringPolicy{Keyring: KeyringID{Tenant: "acme"}, Release: ReleaseHPKE}, "keyring name"},
	} {
		_, err := f.rel.SetKeyringPolicy(ctx, tc.p)
		wantErr(t, err, ErrInvalidArgument, tc.want)
	}
	if m, err := ParseReleaseMode("tpm"); err != nil || m != ReleaseTPM || m.String() != "tpm" {
		t.Fatalf("ParseReleaseMode: %v, %v", m, err)
	}
	if _, err := ParseReleaseMode("clear"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("ParseReleaseMode(clear): %v", err)
	}
}
