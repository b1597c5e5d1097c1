package kms

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms/store"
)

// countingRoot counts the calls that reach the real SoftHSM root, so a test
// can see when the HSM is touched. It changes nothing about them.
type countingRoot struct {
	hsm.Root
	wraps, unwraps atomic.Int64
}

func (c *countingRoot) Wrap(ctx context.Context, key, aad []byte) ([]byte, error) {
	c.wraps.Add(1)
	return c.Root.Wrap(ctx, key, aad)
}

func (c *countingRoot) Unwrap(ctx context.Context, wrapped, aad []byte) ([]byte, error) {
	c.unwraps.Add(1)
	return c.Root.Unwrap(ctx, wrapped, aad)
}

type fixture struct {
	svc   *Service
	root  *countingRoot
	store store.Store
	path  string
}

func newFixture(t testing.TB, cfg Config) *fixture {
	t.Helper()
	path := filepath.Join(t.TempDir(), "coffre.db")
	st, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := newFixtureOn(t, cfg, st)
	f.path = path
	return f
}

// newFixtureOn is newFixture over a store the caller opened (etcd, say).
func newFixtureOn(t testing.TB, cfg Config, st store.Store) *fixture {
	t.Helper()
	root := &countingRoot{Root: hsmtest.NewRoot(t)}
	cfg.Store, cfg.Root = st, root
	svc, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return &fixture{svc: svc, root: root, store: st}
}

func mustID(t testing.TB, s string) KeyringID {
	t.Helper()
	id, err := ParseKeyringID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestKeyringLifecycle(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	k, err := f.svc.CreateKeyring(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if k.Primary != 1 || len(k.Versions) != 1 || k.Versions[0].State != StateActive || k.Versions[0].RootID != f.root.ID() {
		t.Fatalf("new keyring %+v", k)
	}
	if _, err := f.svc.CreateKeyring(ctx, id); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	if _, err := f.svc.GetKeyring(ctx, mustID(t, "acme/nope")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v", err)
	}
	if _, err := f.svc.CreateKeyring(ctx, mustID(t, "other/disks")); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if k, err = f.svc.RotateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if k.Primary != 4 || len(k.Versions) != 4 {
		t.Fatalf("after 3 rotations: %+v", k)
	}
	for _, v := range k.Versions {
		want := StateDeactivated
		if v.Version == 4 {
			want = StateActive
		}
		if v.State != want {
			t.Errorf("version %d state %v, want %v", v.Version, v.State, want)
		}
	}
	got, err := f.svc.GetKeyring(ctx, id)
	if err != nil || got.Primary != 4 {
		t.Fatalf("get after rotate: %+v, %v", got, err)
	}
	all, err := f.svc.ListKeyrings(ctx, "")
	if err != nil || len(all) != 2 || all[0].ID.String() != "acme/disks" || all[1].ID.String() != "other/disks" {
		t.Fatalf("list all: %v, %v", all, err)
	}
	acme, err := f.svc.ListKeyrings(ctx, "acme")
	if err != nil || len(acme) != 1 {
		t.Fatalf("list acme: %v, %v", acme, err)
	}
	if _, err := f.svc.ListKeyrings(ctx, "ACME"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("list bad tenant: %v", err)
	}
}

func TestEnvelopeRoundTripAndRotation(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	ec := map[string]string{"volume": "vol-1", "site": "qc-1"}
	dk, err := f.svc.GenerateDataKey(ctx, id, ec)
	if err != nil {
		t.Fatal(err)
	}
	if dk.Plaintext.Len() != 32 || dk.KeyVersion != 1 {
		t.Fatalf("data key %v v%d", dk.Plaintext, dk.KeyVersion)
	}
	want := bytes.Clone(dk.Plaintext.Expose())
	if _, err := f.svc.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	// An envelope of the deactivated version still decrypts.
	got, err := f.svc.Decrypt(ctx, "acme", dk.Envelope, ec)
	if err != nil || !bytes.Equal(got.Expose(), want) {
		t.Fatalf("decrypt old version: %v", err)
	}
	// New keys use the new primary.
	dk2, err := f.svc.GenerateDataKey(ctx, id, ec)
	if err != nil || dk2.KeyVersion != 2 {
		t.Fatalf("after rotate: v%d, %v", dk2.KeyVersion, err)
	}
	// ReEncrypt moves the old envelope to version 2 without changing the key.
	re, err := f.svc.ReEncrypt(ctx, "acme", dk.Envelope, ec, KeyringID{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ParseEnvelopeInfo(re)
	if err != nil || info.KeyVersion != 2 || info.Keyring != id {
		t.Fatalf("re-encrypted envelope: %+v, %v", info, err)
	}
	got, err = f.svc.Decrypt(ctx, "acme", re, ec)
	if err != nil || !bytes.Equal(got.Expose(), want) {
		t.Fatalf("decrypt re-encrypted: %v", err)
	}
	// ReEncrypt to another keyring of the same tenant and a new context.
	other := mustID(t, "acme/backups")
	if _, err := f.svc.CreateKeyring(ctx, other); err != nil {
		t.Fatal(err)
	}
	moved, err := f.svc.ReEncrypt(ctx, "acme", dk.Envelope, ec, other, map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err = f.svc.Decrypt(ctx, "acme", moved, map[string]string{"k": "v"}); err != nil || !bytes.Equal(got.Expose(), want) {
		t.Fatalf("decrypt moved: %v", err)
	}
	if _, err := f.svc.ReEncrypt(ctx, "acme", dk.Envelope, ec, mustID(t, "other/x"), nil); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("re-encrypt to another tenant: %v", err)
	}
}

// TestDecryptRefusals covers the bad envelopes of the issue: each is refused
// with the one generic error (or, for what does not parse, a clear
// ErrInvalidArgument), never a partial plaintext, and nothing stored changes.
func TestDecryptRefusals(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	acme := mustID(t, "acme/disks")
	for _, id := range []KeyringID{acme, mustID(t, "acme/other"), mustID(t, "evil/disks")} {
		if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	ec := map[string]string{"volume": "vol-1"}
	dk, err := f.svc.GenerateDataKey(ctx, acme, ec)
	if err != nil {
		t.Fatal(err)
	}
	before, err := f.store.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	env := dk.Envelope
	// An envelope renamed to another keyring of the same tenant.
	renamed := append(appendHeader(nil, mustID(t, "acme/other"), 1, env[19:19+nonceSize]), env[19+nonceSize:]...)
	// Tenant evil's keyring of the same name: present the envelope there.
	evilHeader := append(appendHeader(nil, mustID(t, "evil/disks"), 1, env[19:19+nonceSize]), env[19+nonceSize:]...)
	for _, tc := range []struct {
		name   string
		tenant string
		env    []byte
		ec     map[string]string
	}{
		{"another tenant", "evil", env, ec},
		{"another tenant, rewritten header", "evil", evilHeader, ec},
		{"another keyring", "acme", renamed, ec},
		{"another context", "acme", env, map[string]string{"volume": "vol-2"}},
		{"extra context", "acme", env, map[string]string{"volume": "vol-1", "x": "y"}},
		{"no context", "acme", env, nil},
		{"unknown version", "acme", func() []byte { b := bytes.Clone(env); b[18] = 9; return b }(), ec},
		{"unknown keyring", "acme", append(appendHeader(nil, mustID(t, "acme/gone"), 1, env[19:19+nonceSize]), env[19+nonceSize:]...), ec},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := f.svc.Decrypt(ctx, tc.tenant, tc.env, tc.ec)
			if got != nil || err != ErrDecrypt {
				t.Fatalf("Decrypt = %v, %v; want exactly ErrDecrypt", got, err)
			}
		})
	}
	// Every single bit flipped, header included, is refused.
	for i := range len(env) * 8 {
		b := bytes.Clone(env)
		b[i/8] ^= 1 << (i % 8)
		got, err := f.svc.Decrypt(ctx, "acme", b, ec)
		if got != nil || (err != ErrDecrypt && !errors.Is(err, ErrInvalidArgument)) {
			t.Fatalf("bit %d flipped: %v, %v", i, got, err)
		}
	}
	for _, n := range []int{0, 3, 10, len(env) - 1} {
		if got, err := f.svc.Decrypt(ctx, "acme", env[:n], ec); got != nil || !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("truncated to %d: %v, %v", n, got, err)
		}
	}
	wrongVersion := bytes.Clone(env)
	wrongVersion[3] = 2
	if _, err := f.svc.Decrypt(ctx, "acme", wrongVersion, ec); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("format v2: %v", err)
	}
	after, err := f.store.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Fatalf("store changed: %d keys, was %d", len(after), len(before))
	}
	for i := range before {
		if before[i].Key != after[i].Key || before[i].Revision != after[i].Revision || !bytes.Equal(before[i].Value, after[i].Value) {
			t.Fatalf("store key %s changed by failed requests", before[i].Key)
		}
	}
	// The right request still works afterwards.
	if got, err := f.svc.Decrypt(ctx, "acme", env, ec); err != nil || !bytes.Equal(got.Expose(), dk.Plaintext.Expose()) {
		t.Fatalf("good decrypt after refusals: %v", err)
	}
}

// TestTamperedStore: someone who can write the store moves a wrapped KEK
// from one keyring to another; the HSM refuses to unwrap it there.
func TestTamperedStore(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	a, b := mustID(t, "acme/a"), mustID(t, "acme/b")
	for _, id := range []KeyringID{a, b} {
		if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	ka, _ := f.store.Get(ctx, keyringKey(a))
	kb, _ := f.store.Get(ctx, keyringKey(b))
	ra, _ := decodeRecord(keyringKey(a), ka.Value)
	rb, _ := decodeRecord(keyringKey(b), kb.Value)
	rb.Versions[0].Wrapped = ra.Versions[0].Wrapped
	if _, err := f.store.Put(ctx, keyringKey(b), rb.encode()); err != nil {
		t.Fatal(err)
	}
	// A fresh service so nothing is cached.
	svc, err := New(Config{Store: f.store, Root: f.root})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	dk, err := svc.GenerateDataKey(ctx, b, nil)
	if err == nil || dk != nil || errors.Is(err, ErrDecrypt) {
		t.Fatalf("GenerateDataKey under a swapped KEK = %v, %v", dk, err)
	}
	t.Logf("refused: %v", err)

	// A record breaking an invariant (two active versions) is refused too.
	ra.Versions = append(ra.Versions, ra.Versions[0])
	ra.Versions[1].Version = 2
	if _, err := f.store.Put(ctx, keyringKey(a), ra.encode()); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.GetKeyring(ctx, a); err == nil {
		t.Fatal("record with two active versions accepted")
	}
}

// TestHSMOnlyOnCacheMiss: with the KEK cached, data keys are made and opened
// without a single call to the HSM.
func TestHSMOnlyOnCacheMiss(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	if n := f.root.unwraps.Load(); n != 0 {
		t.Fatalf("create unwrapped %d times", n)
	}
	var wg sync.WaitGroup
	envs := make([][]byte, 32)
	for i := range envs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dk, err := f.svc.GenerateDataKey(ctx, id, nil)
			if err != nil {
				t.Error(err)
				return
			}
			envs[i] = dk.Envelope
		}()
	}
	wg.Wait()
	if n := f.root.unwraps.Load(); n != 1 {
		t.Fatalf("32 concurrent first uses unwrapped %d times, want 1", n)
	}
	for _, env := range envs {
		if _, err := f.svc.Decrypt(ctx, "acme", env, nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.root.unwraps.Load(); n != 1 {
		t.Fatalf("decrypts with a warm cache unwrapped: %d", n)
	}
}

func TestKEKCacheZeroizes(t *testing.T) {
	now := time.Unix(1e9, 0)
	clock := func() time.Time { return now }
	f := newFixture(t, Config{CacheSize: 2, CacheTTL: time.Minute, Now: clock})
	ctx := ctxT(t)
	ids := []KeyringID{mustID(t, "acme/a"), mustID(t, "acme/b"), mustID(t, "acme/c")}
	for _, id := range ids {
		if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	// Grab the cached key buffers as they are used.
	var seen [][]byte
	spy := func(id KeyringID) {
		rec, _, err := f.svc.load(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.svc.withKEK(ctx, rec, rec.version(1), func(kek []byte) error {
			seen = append(seen, kek)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	spy(ids[0])
	spy(ids[1])
	spy(ids[2]) // evicts ids[0], the least recently used
	if f.svc.keks.len() != 2 {
		t.Fatalf("cache holds %d, want 2", f.svc.keks.len())
	}
	isZero := func(b []byte) bool { return bytes.Equal(b, make([]byte, len(b))) }
	if !isZero(seen[0]) {
		t.Fatal("evicted KEK not zeroized")
	}
	if isZero(seen[1]) || isZero(seen[2]) {
		t.Fatal("live KEKs zeroized")
	}
	// Expiry: after the TTL, the next use unwraps again and wipes the old.
	now = now.Add(2 * time.Minute)
	before := f.root.unwraps.Load()
	spy(ids[1])
	if !isZero(seen[1]) || f.root.unwraps.Load() != before+1 {
		t.Fatal("expired KEK neither zeroized nor reloaded")
	}
	f.svc.Close()
	for i, b := range seen {
		if !isZero(b) {
			t.Fatalf("KEK %d survives Close", i)
		}
	}
	if _, err := f.svc.GenerateDataKey(ctx, ids[0], nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("use after Close: %v", err)
	}
}

// TestWatchSeesOtherWriters: a second service on the same store (another
// node, or a restarted one) rotates; the first learns of it by the watch.
func TestWatchSeesOtherWriters(t *testing.T) {
	f := newFixture(t, Config{})
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.GenerateDataKey(ctx, id, nil); err != nil {
		t.Fatal(err)
	}
	other, err := New(Config{Store: f.store, Root: f.root})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		dk, err := f.svc.GenerateDataKey(ctx, id, nil)
		if err != nil {
			t.Fatal(err)
		}
		if dk.KeyVersion == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("rotation on another service not seen within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRotationLimit: a keyring at MaxVersions refuses to rotate, clearly,
// and its record is untouched.
func TestRotationLimit(t *testing.T) {
	f := newFixture(t, Config{})
	f.svc.maxVersions = 3
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := f.svc.RotateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := f.store.Get(ctx, keyringKey(id))
	_, err := f.svc.RotateKeyring(ctx, id)
	if !errors.Is(err, ErrFailedPrecondition) || !strings.Contains(err.Error(), "3 versions") {
		t.Fatalf("rotation past the limit: %v", err)
	}
	after, _ := f.store.Get(ctx, keyringKey(id))
	if after.Revision != before.Revision {
		t.Fatal("refused rotation changed the record")
	}
}

// TestMaxVersionsFitsTheStore: a record at MaxVersions, with long root ids,
// stays under the store's value limit.
func TestMaxVersionsFitsTheStore(t *testing.T) {
	rec := &keyringRecord{Format: recordFormat, Tenant: strings.Repeat("t", 63), Name: strings.Repeat("n", 63), UID: make([]byte, 16), Primary: MaxVersions}
	for v := range MaxVersions {
		rec.Versions = append(rec.Versions, versionRecord{
			Version: uint32(v + 1), State: StateDeactivated.String(), CreateTime: time.Now(),
			RootID: "pkcs11:token=" + strings.Repeat("x", 32) + ";object=" + strings.Repeat("y", 32), Wrapped: make([]byte, 61),
		})
	}
	if n := len(rec.encode()); n > store.MaxValueSize {
		t.Fatalf("a keyring at MaxVersions encodes to %d bytes, over the store's %d", n, store.MaxValueSize)
	}
}
