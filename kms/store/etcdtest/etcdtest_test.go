package etcdtest_test

import (
	"context"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

func open(t *testing.T, endpoints []string) store.Store {
	t.Helper()
	s, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: endpoints, Prefix: "/t/", DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestKillLeader kills the leader of three members: the other two elect
// another and go on writing; the killed member, restarted on its data,
// rejoins behind its bridge at the same address and serves what was
// written while it was gone.
func TestKillLeader(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	ctx := t.Context()
	all := open(t, c.Endpoints())
	if _, err := all.Put(ctx, "k", []byte("before")); err != nil {
		t.Fatal(err)
	}
	lead := c.Leader(t)
	onLead := open(t, []string{c.Endpoint(lead)})
	if _, err := onLead.Get(ctx, "k"); err != nil {
		t.Fatalf("read through the leader: %v", err)
	}
	t0 := time.Now()
	c.KillMember(lead)
	t.Logf("leader (member %d) killed in %v", lead, time.Since(t0).Round(time.Millisecond))
	if next := c.Leader(t); next == lead {
		t.Fatalf("member %d still leads after it was killed", lead)
	} else {
		t.Logf("member %d leads %v after the kill", next, time.Since(t0).Round(time.Millisecond))
	}
	if _, err := all.Put(ctx, "k", []byte("after")); err != nil {
		t.Fatalf("write with the leader killed: %v", err)
	}
	t.Logf("written through the others %v after the kill", time.Since(t0).Round(time.Millisecond))
	// The client retries a read on another connection until its deadline:
	// a short one will do.
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if _, err := onLead.Get(short, "k"); err == nil {
		t.Fatal("a read through the killed member succeeded")
	}
	c.RestartMember(t, lead)
	kv, err := onLead.Get(ctx, "k")
	if err != nil || string(kv.Value) != "after" {
		t.Fatalf("read through the restarted member: %q, %v; want %q", kv.Value, err, "after")
	}
}
