package kms

import (
	"testing"
)

// BenchmarkGenerateDataKey: in process, KEK cached — the per-request cost.
func BenchmarkGenerateDataKey(b *testing.B) {
	f := newFixture(b, Config{})
	ctx := ctxT(b)
	id := mustID(b, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		b.Fatal(err)
	}
	ec := map[string]string{"volume": "vol-1"}
	if _, err := f.svc.GenerateDataKey(ctx, id, ec); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		dk, err := f.svc.GenerateDataKey(ctx, id, ec)
		if err != nil {
			b.Fatal(err)
		}
		dk.Plaintext.Zero()
	}
	b.StopTimer()
	if n := f.root.unwraps.Load(); n != 1 {
		b.Fatalf("HSM unwrapped %d times on the cached path", n)
	}
}

// BenchmarkDecrypt: in process, KEK cached.
func BenchmarkDecrypt(b *testing.B) {
	f := newFixture(b, Config{})
	ctx := ctxT(b)
	id := mustID(b, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		b.Fatal(err)
	}
	ec := map[string]string{"volume": "vol-1"}
	dk, err := f.svc.GenerateDataKey(ctx, id, ec)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		k, err := f.svc.Decrypt(ctx, "acme", dk.Envelope, ec)
		if err != nil {
			b.Fatal(err)
		}
		k.Zero()
	}
}

// BenchmarkGenerateDataKeyCacheMiss: every call unwraps the KEK in SoftHSM.
func BenchmarkGenerateDataKeyCacheMiss(b *testing.B) {
	f := newFixture(b, Config{})
	ctx := ctxT(b)
	id := mustID(b, "acme/disks")
	if _, err := f.svc.CreateKeyring(ctx, id); err != nil {
		b.Fatal(err)
	}
	rec, _, err := f.svc.load(ctx, id)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		f.svc.keks.purge(string(rec.UID))
		dk, err := f.svc.GenerateDataKey(ctx, id, nil)
		if err != nil {
			b.Fatal(err)
		}
		dk.Plaintext.Zero()
	}
	b.StopTimer()
	if n := f.root.unwraps.Load(); n < int64(b.N) {
		b.Fatalf("HSM unwrapped %d times for %d misses", n, b.N)
	}
}
