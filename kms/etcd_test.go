package kms

import (
	"bytes"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// TestTwoNodesOnEtcd: two Coffre services (two nodes) on one etcd cluster
// and one HSM root. An envelope made on one decrypts on the other, and a
// rotation on one is what the other encrypts with within a second.
func TestTwoNodesOnEtcd(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	root := hsmtest.NewRoot(t)
	ctx := ctxT(t)
	open := func() *Service {
		st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-test/"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		svc, err := New(Config{Store: st, Root: root})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { svc.Close() })
		return svc
	}
	a, b := open(), open()
	id := mustID(t, "acme/disks")
	if _, err := a.CreateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	dk, err := a.GenerateDataKey(ctx, id, map[string]string{"v": "1"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := b.Decrypt(ctx, "acme", dk.Envelope, map[string]string{"v": "1"})
	if err != nil || !bytes.Equal(got.Expose(), dk.Plaintext.Expose()) {
		t.Fatalf("node B decrypting node A's envelope: %v", err)
	}
	if _, err := b.GenerateDataKey(ctx, id, nil); err != nil { // B caches version 1
		t.Fatal(err)
	}
	if _, err := a.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	for {
		dk, err := b.GenerateDataKey(ctx, id, nil)
		if err != nil {
			t.Fatal(err)
		}
		if dk.KeyVersion == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("node B still encrypts with version 1 a second after node A rotated")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Both nodes see one keyring with exactly one active version.
	for _, s := range []*Service{a, b} {
		k, err := s.GetKeyring(ctx, id)
		if err != nil || k.Primary != 2 || len(k.Versions) != 2 {
			t.Fatalf("keyring as seen by a node: %+v, %v", k, err)
		}
	}
}

// TestRevocationAcrossNodesOnEtcd: a node revoked through one Coffre node
// is refused by another, on the same etcd, within a second.
func TestRevocationAcrossNodesOnEtcd(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	ctx := ctxT(t)
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-rel/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	testRevocationOnAnotherNode(t, st)
}
