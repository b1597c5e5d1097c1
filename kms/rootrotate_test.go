package kms

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/store"
)

// vendors is one SoftHSM with two tokens, standing for the HSMs of two
// vendors (or an old and a new HSM), each with a root key, and a store.
type vendors struct {
	s          *hsmtest.SoftHSM
	pinA, pinB string
	a, b       *pkcs11.Root
	st         store.Store
}

func newVendors(t *testing.T) *vendors {
	t.Helper()
	v := &vendors{s: hsmtest.NewSoftHSM(t)}
	v.pinA = v.s.NewToken(t, "vendor-a")
	v.pinB = v.s.NewToken(t, "vendor-b")
	v.a = v.root(t, "vendor-a", "root-a", v.pinA)
	v.b = v.root(t, "vendor-b", "root-b", v.pinB)
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "coffre.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	v.st = st
	return v
}

func (v *vendors) root(t *testing.T, token, object, pin string) *pkcs11.Root {
	t.Helper()
	r, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: v.s.RootURI(token, object, pin)})
	if err != nil {
		t.Fatalf("CreateRoot %s/%s: %v", token, object, err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing root: %v", err)
		}
	})
	return r
}

// service opens a Service on v's store with a fresh KEK cache, so that
// what it can decrypt depends only on the roots it is given.
func (v *vendors) service(t *testing.T, root hsm.Root, previous ...hsm.Root) *Service {
	t.Helper()
	svc, err := New(Config{Store: v.st, Root: root, PreviousRoots: previous})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc
}

// sealed is an envelope and the data key it must open to.
type sealed struct {
	tenant string
	env    []byte
	ec     map[string]string
	key    []byte
}

// populate creates n keyrings, rotating keyring i i times, with one
// envelope under every version; it returns the envelopes and the number of
// KEK versions made.
func populate(t *testing.T, svc *Service, n int) ([]sealed, int) {
	t.Helper()
	ctx := ctxT(t)
	var out []sealed
	versions := 0
	for i := range n {
		id := mustID(t, fmt.Sprintf("tenant-%d/ring", i))
		if _, err := svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
		for j := 0; ; j++ {
			versions++
			ec := map[string]string{"volume": fmt.Sprintf("vol-%d-%d", i, j)}
			dk, err := svc.GenerateDataKey(ctx, id, ec)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, sealed{tenant: id.Tenant, env: dk.Envelope, ec: ec, key: bytes.Clone(dk.Plaintext.Expose())})
			dk.Plaintext.Zero()
			if j == i%3 {
				break
			}
			if _, err := svc.RotateKeyring(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out, versions
}

// opens reports how many envelopes svc opens to the right key; any other
// outcome than the right key or an error fails the test.
func opens(t *testing.T, svc *Service, envs []sealed) (ok int, errs []error) {
	t.Helper()
	ctx := ctxT(t)
	for _, e := range envs {
		got, err := svc.Decrypt(ctx, e.tenant, e.env, e.ec)
		if err != nil {
			if got != nil {
				t.Fatalf("Decrypt returned a key with error %v", err)
			}
			errs = append(errs, err)
			continue
		}
		same := bytes.Equal(got.Expose(), e.key)
		got.Zero()
		if !same {
			t.Fatal("Decrypt returned the wrong key")
		}
		ok++
	}
	return ok, errs
}

func revisions(t *testing.T, st store.Store) map[string]int64 {
	t.Helper()
	kvs, err := st.List(ctxT(t), keyringPrefix)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int64{}
	for _, kv := range kvs {
		m[kv.Key] = kv.Revision
	}
	return m
}

// TestDualRootService: a Service whose root is hsm.NewDual(A, B) works as
// with one root, and a Service holding only one of the two vendors' roots
// releases nothing.
func TestDualRootService(t *testing.T) {
	v := newVendors(t)
	ab := hsm.NewDual(v.a, v.b)
	svc := v.service(t, ab)
	envs, _ := populate(t, svc, 3)
	if ok, errs := opens(t, svc, envs); ok != len(envs) {
		t.Fatalf("dual-root service opens %d of %d: %v", ok, len(envs), errs)
	}
	k, err := svc.GetKeyring(ctxT(t), mustID(t, "tenant-2/ring"))
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range k.Versions {
		if kv.RootID != ab.ID() {
			t.Errorf("version %d recorded root %q, want %q", kv.Version, kv.RootID, ab.ID())
		}
	}

	// One vendor alone, or both in the wrong order: the recorded root is
	// not theirs, and nothing is unwrapped.
	for name, r := range map[string]hsm.Root{"A": v.a, "B": v.b, "Dual(B,A)": hsm.NewDual(v.b, v.a)} {
		ok, errs := opens(t, v.service(t, r), envs)
		if ok != 0 {
			t.Errorf("a service with only %s opened %d envelopes", name, ok)
		}
		for _, err := range errs {
			if !errors.Is(err, ErrFailedPrecondition) && !errors.Is(err, ErrDecrypt) {
				t.Errorf("service with only %s: %v; want ErrFailedPrecondition or ErrDecrypt", name, err)
			}
		}
	}
	// Nor as a previous root next to an unrelated current one.
	c := v.root(t, "vendor-b", "root-c", v.pinB)
	if ok, _ := opens(t, v.service(t, c, v.a, v.b), envs); ok != 0 {
		t.Errorf("a service with A and B as separate previous roots opened %d envelopes", ok)
	}

	// Both, in a fresh service (empty KEK cache): everything opens.
	if ok, errs := opens(t, v.service(t, hsm.NewDual(v.a, v.b)), envs); ok != len(envs) {
		t.Fatalf("fresh Dual(A,B) service opens %d of %d: %v", ok, len(envs), errs)
	}

	// Vendor B's key replaced by another under the same name (same ID):
	// the dual root's ID matches, but B's layer no longer authenticates.
	svc.Close()
	if err := pkcs11.DestroyRoot(ctxT(t), pkcs11.Config{URI: v.s.RootURI("vendor-b", "root-b", v.pinB)}); err != nil {
		t.Fatal(err)
	}
	b2 := v.root(t, "vendor-b", "root-b", v.pinB)
	forged := hsm.NewDual(v.a, b2)
	if forged.ID() != ab.ID() {
		t.Fatalf("IDs differ: %q, %q", forged.ID(), ab.ID())
	}
	ok, errs := opens(t, v.service(t, forged), envs)
	if ok != 0 || len(errs) != len(envs) {
		t.Fatalf("a replaced vendor-B key opened %d envelopes", ok)
	}
	t.Logf("with B's key replaced: %v", errs[0])
}

func TestRotateRoot(t *testing.T) {
	v := newVendors(t)
	ctx := ctxT(t)
	envs, versions := populate(t, v.service(t, v.a), 5)
	if ok, errs := opens(t, v.service(t, v.b), envs); ok != 0 {
		t.Fatalf("B alone opened %d envelopes before the rotation (%v)", ok, errs)
	}

	svc := v.service(t, v.b, v.a)
	// During the rotation, with A as a previous root, everything opens.
	if ok, errs := opens(t, svc, envs); ok != len(envs) {
		t.Fatalf("B with previous A opens %d of %d: %v", ok, len(envs), errs)
	}
	if u, err := svc.RootUsage(ctx); err != nil || len(u) != 1 || u[v.a.ID()] != versions {
		t.Fatalf("RootUsage before: %v, %v; want %d under A", u, err, versions)
	}

	var calls [][2]int
	res, err := svc.RotateRoot(ctx, func(done, total int) { calls = append(calls, [2]int{done, total}) })
	if err != nil {
		t.Fatal(err)
	}
	want := RootRotation{Root: v.b.ID(), Keyrings: 5, KeyringsUpdated: 5, Rewrapped: versions}
	if res != want {
		t.Errorf("RotateRoot = %+v, want %+v", res, want)
	}
	if len(calls) != 5 || calls[0] != [2]int{1, 5} || calls[4] != [2]int{5, 5} {
		t.Errorf("progress calls %v", calls)
	}
	if u, err := svc.RootUsage(ctx); err != nil || len(u) != 1 || u[v.b.ID()] != versions {
		t.Fatalf("RootUsage after: %v, %v; want %d under B", u, err, versions)
	}

	// Only B now: every envelope opens, and A alone opens none.
	if ok, errs := opens(t, v.service(t, v.b), envs); ok != len(envs) {
		t.Fatalf("B alone opens %d of %d after the rotation: %v", ok, len(envs), errs)
	}
	if ok, _ := opens(t, v.service(t, v.a), envs); ok != 0 {
		t.Errorf("A alone opened %d envelopes after the rotation", ok)
	}

	// A rerun changes nothing in the store.
	before := revisions(t, v.st)
	res, err = svc.RotateRoot(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := (RootRotation{Root: v.b.ID(), Keyrings: 5, Current: versions}); res != want {
		t.Errorf("rerun = %+v, want %+v", res, want)
	}
	if after := revisions(t, v.st); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("rerun rewrote records: %v -> %v", before, after)
	}

	// The old root can now go: its key destroyed, B alone still opens
	// everything.
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: v.s.RootURI("vendor-a", "root-a", v.pinA)}); err != nil {
		t.Fatal(err)
	}
	if ok, errs := opens(t, v.service(t, v.b), envs); ok != len(envs) {
		t.Fatalf("B alone opens %d of %d after A's key was destroyed: %v", ok, len(envs), errs)
	}
}

// TestRotateRootResumes: a rotation cancelled half-way leaves a store in
// which every envelope still opens with both roots, and a rerun finishes.
func TestRotateRootResumes(t *testing.T) {
	v := newVendors(t)
	envs, versions := populate(t, v.service(t, v.a), 6)
	svc := v.service(t, v.b, v.a)

	ctx, cancel := context.WithCancel(ctxT(t))
	res, err := svc.RotateRoot(ctx, func(done, total int) {
		if done == 3 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted RotateRoot: %+v, %v; want context.Canceled", res, err)
	}
	if res.Keyrings != 3 || res.KeyringsUpdated != 3 || res.Rewrapped == 0 || res.Rewrapped >= versions {
		t.Fatalf("interrupted RotateRoot counted %+v", res)
	}
	first := res.Rewrapped
	u, err := svc.RootUsage(ctxT(t))
	if err != nil || u[v.a.ID()]+u[v.b.ID()] != versions || u[v.a.ID()] == 0 || u[v.b.ID()] != first {
		t.Fatalf("RootUsage half-way: %v, %v", u, err)
	}
	// Half-way: both roots together open everything; B alone only part.
	if ok, errs := opens(t, v.service(t, v.b, v.a), envs); ok != len(envs) {
		t.Fatalf("half-way, B with previous A opens %d of %d: %v", ok, len(envs), errs)
	}
	ok, errs := opens(t, v.service(t, v.b), envs)
	if ok == 0 || ok == len(envs) {
		t.Fatalf("half-way, B alone opens %d of %d", ok, len(envs))
	}
	for _, err := range errs {
		if !errors.Is(err, ErrFailedPrecondition) {
			t.Errorf("half-way, B alone: %v; want ErrFailedPrecondition", err)
		}
	}

	res, err = svc.RotateRoot(ctxT(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Rewrapped != versions-first || res.Current != first || res.KeyringsUpdated != 3 || res.Keyrings != 6 {
		t.Errorf("resumed RotateRoot = %+v; want %d rewrapped, %d current", res, versions-first, first)
	}
	if ok, errs := opens(t, v.service(t, v.b), envs); ok != len(envs) {
		t.Fatalf("after the resumed rotation, B alone opens %d of %d: %v", ok, len(envs), errs)
	}
}

// TestRotateRootSkipsDestroyed: a destroyed version holds no wrapped KEK;
// the rotation leaves it as it is and does not count it as in use.
func TestRotateRootSkipsDestroyed(t *testing.T) {
	v := newVendors(t)
	ctx := ctxT(t)
	svcA := v.service(t, v.a)
	id := mustID(t, "acme/ring")
	if _, err := svcA.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := svcA.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	// Crypto-shred version 1 the way the lifecycle stores it.
	kv, err := v.st.Get(ctx, keyringKey(id))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := decodeRecord(kv.Key, kv.Value)
	if err != nil {
		t.Fatal(err)
	}
	rec.Format = recordFormat
	rec.Versions[0].State = StateDestroyed.String()
	rec.Versions[0].Wrapped = nil
	rec.Versions[0].DestroyTime = rec.CreateTime
	if _, err := v.st.CompareAndSwap(ctx, kv.Key, kv.Revision, rec.encode()); err != nil {
		t.Fatal(err)
	}

	svc := v.service(t, v.b, v.a)
	if u, err := svc.RootUsage(ctx); err != nil || len(u) != 1 || u[v.a.ID()] != 1 {
		t.Fatalf("RootUsage: %v, %v; want the one live version under A", u, err)
	}
	res, err := svc.RotateRoot(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := (RootRotation{Root: v.b.ID(), Keyrings: 1, KeyringsUpdated: 1, Rewrapped: 1, Destroyed: 1}); res != want {
		t.Errorf("RotateRoot = %+v, want %+v", res, want)
	}
	k, err := svc.GetKeyring(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if k.Versions[0].State != StateDestroyed || k.Versions[0].RootID != v.a.ID() || k.Versions[1].RootID != v.b.ID() {
		t.Errorf("after rotation: %+v", k.Versions)
	}
	if u, err := svc.RootUsage(ctx); err != nil || len(u) != 1 || u[v.b.ID()] != 1 {
		t.Errorf("RootUsage after: %v, %v", u, err)
	}
}

// TestRotateRootRefusals: a KEK under a root the service does not hold, or
// one that fails authentication in the old root, stops the rotation
// without writing anything for that keyring.
func TestRotateRootRefusals(t *testing.T) {
	v := newVendors(t)
	ctx := ctxT(t)
	c := v.root(t, "vendor-b", "root-c", v.pinB)
	envs, _ := populate(t, v.service(t, c), 1)

	svc := v.service(t, v.b, v.a) // C is not configured
	before := revisions(t, v.st)
	res, err := svc.RotateRoot(ctx, nil)
	if !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("KEK under an unconfigured root: %+v, %v; want ErrFailedPrecondition", res, err)
	}
	if fmt.Sprint(revisions(t, v.st)) != fmt.Sprint(before) {
		t.Error("a refused rotation wrote to the store")
	}

	// Tampered wrapped bytes: the old root refuses them and nothing is
	// written under the new one.
	kv, err := v.st.Get(ctx, keyringKey(mustID(t, "tenant-0/ring")))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := decodeRecord(kv.Key, kv.Value)
	if err != nil {
		t.Fatal(err)
	}
	rec.Versions[0].Wrapped[len(rec.Versions[0].Wrapped)-1] ^= 1
	if _, err := v.st.CompareAndSwap(ctx, kv.Key, kv.Revision, rec.encode()); err != nil {
		t.Fatal(err)
	}
	before = revisions(t, v.st)
	if _, err := v.service(t, v.b, c).RotateRoot(ctx, nil); err == nil || errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("tampered KEK: %v; want an authentication failure", err)
	}
	if fmt.Sprint(revisions(t, v.st)) != fmt.Sprint(before) {
		t.Error("a failed rotation wrote to the store")
	}
	if ok, _ := opens(t, v.service(t, v.b, c), envs); ok != 0 {
		t.Error("tampered KEK opened")
	}
}

func TestPreviousRootsConfig(t *testing.T) {
	v := newVendors(t)
	for name, prev := range map[string][]hsm.Root{
		"the current root":   {v.a},
		"a root twice":       {v.b, v.b},
		"nil":                {nil},
		"same ID, other obj": {hsm.NewDual(v.a, v.b), hsm.NewDual(v.a, v.b)},
	} {
		if svc, err := New(Config{Store: v.st, Root: v.a, PreviousRoots: prev}); err == nil {
			svc.Close()
			t.Errorf("PreviousRoots with %s accepted", name)
		}
	}
}
