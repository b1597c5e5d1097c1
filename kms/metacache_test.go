package kms

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
)

// The keyring record cache of a node sharing its store with others: a
// record read before a change made elsewhere must never be cached after
// the watch reported that change, and nothing is cached while no watch
// runs. The store is the fixture's real bbolt store; the wrappers below
// only control when a call returns or when the watch ends.

// heldGetStore holds the reply of the next Get after arm is closed until
// release is closed, as a reply from one etcd member can arrive after a
// watch event from another.
type heldGetStore struct {
	store.Store
	arm, read, release chan struct{}
	once               sync.Once
}

func (s *heldGetStore) Get(ctx context.Context, key string) (store.KV, error) {
	kv, err := s.Store.Get(ctx, key)
	select {
	case <-s.arm:
		s.once.Do(func() {
			close(s.read)
			<-s.release
		})
	default:
	}
	return kv, err
}

// breakableStore ends the running watch when asked, as etcd does on
// compaction or the loss of its leader (the channel closes while the
// caller's context is live), and refuses new watches while broken.
type breakableStore struct {
	store.Store
	mu     sync.Mutex
	cancel context.CancelFunc
	broken bool
}

func (s *breakableStore) Watch(ctx context.Context, prefix string) (<-chan store.Event, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken {
		return nil, store.ErrClosed
	}
	wctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	return s.Store.Watch(wctx, prefix)
}

func (s *breakableStore) breakWatch(broken bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.broken = broken
	if broken && s.cancel != nil {
		s.cancel()
	}
}

// metaState returns the node's cache generation and whether its watch runs.
func metaState(s *Service) (gen uint64, live bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen, s.live
}

// waitMeta waits until cond holds for the node's cache state.
func waitMeta(t *testing.T, s *Service, what string, cond func(gen uint64, live bool) bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond(metaState(s)) {
			return
		}
	}
	t.Fatalf("node B: %s did not happen within 10 s", what)
}

func TestStaleReadNotCachedAfterEvent(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	held := &heldGetStore{Store: f.store, arm: make(chan struct{}), read: make(chan struct{}), release: make(chan struct{})}
	nodeB, err := New(Config{Store: held, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nodeB.Close() })
	waitMeta(t, nodeB, "watch start", func(_ uint64, live bool) bool { return live })

	// B misses its cache and reads the record with v1 usable; the reply
	// is held while node A destroys v1.
	close(held.arm)
	res := make(chan error, 1)
	go func() {
		_, err := nodeB.Decrypt(ctx, f.id.Tenant, f.envs[0], f.ec)
		res <- err
	}()
	<-held.read
	gen0, _ := metaState(nodeB)
	if _, err := f.svc.ScheduleDestroy(ctx, f.id, 1, 7); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(7 * 24 * time.Hour)
	if done, err := f.svc.DestroyDue(ctx, noEvent); err != nil || len(done) != 1 {
		t.Fatalf("DestroyDue = %v, %v", done, err)
	}
	waitMeta(t, nodeB, "the two events", func(gen uint64, _ bool) bool { return gen >= gen0+2 })
	close(held.release)
	// The call in flight read the record from before: it may still
	// answer, like any call that began before a change. What it read must
	// not outlive it.
	<-res
	if f.decrypts(t, nodeB, 1) {
		t.Error("node B decrypts version 1 after the watch reported its destruction: a stale read was cached")
	}
	if !f.decrypts(t, nodeB, 2) {
		t.Error("node B no longer decrypts version 2")
	}
}

func TestNoCacheWhileWatchDown(t *testing.T) {
	f := newLifecycle(t, 2)
	ctx := ctxT(t)
	bs := &breakableStore{Store: f.store}
	nodeB, err := New(Config{Store: bs, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nodeB.Close() })
	waitMeta(t, nodeB, "watch start", func(_ uint64, live bool) bool { return live })
	if !f.decrypts(t, nodeB, 1) || !nodeB.keksHold(f, 1) {
		t.Fatal("node B did not cache version 1's KEK on use")
	}

	// The watch ends and cannot start again: B must read the store on
	// every use, so A's change shows at once.
	bs.breakWatch(true)
	waitMeta(t, nodeB, "watch loss", func(_ uint64, live bool) bool { return !live })
	if _, err := f.svc.DisableVersion(ctx, f.id, 1); err != nil {
		t.Fatal(err)
	}
	if f.decrypts(t, nodeB, 1) {
		t.Error("node B decrypts version 1, disabled on node A, while its watch is down")
	}
	if !f.decrypts(t, nodeB, 2) {
		t.Error("node B does not decrypt version 2 while its watch is down")
	}
	nodeB.mu.RLock()
	cached := len(nodeB.meta)
	nodeB.mu.RUnlock()
	if cached != 0 {
		t.Errorf("node B cached %d records with no watch running", cached)
	}

	// Version 1, disabled during the gap, was not used, but its KEK stayed
	// in B's memory: once the watch is back, it is gone.
	if !nodeB.keksHold(f, 2) {
		t.Fatal("node B did not cache version 2's KEK")
	}
	bs.breakWatch(false)
	waitMeta(t, nodeB, "watch restart", func(_ uint64, live bool) bool { return live })
	waitKEKGone := func(v uint32) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); nodeB.keksHold(f, v); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("node B still holds version %d's KEK 10 s after its watch restarted", v)
			}
		}
	}
	waitKEKGone(1)
	if !nodeB.keksHold(f, 2) {
		t.Error("node B dropped version 2's KEK, still in use")
	}
}

// keksHold reports whether s's KEK cache holds version v of f's keyring.
func (s *Service) keksHold(f *lifecycleFixture, v uint32) bool {
	rec, err := s.store.Get(context.Background(), keyringKey(f.id))
	if err != nil {
		return false
	}
	r, err := decodeRecord(rec.Key, rec.Value)
	if err != nil {
		return false
	}
	s.keks.mu.Lock()
	defer s.keks.mu.Unlock()
	_, ok := s.keks.entries[kekRef{uid: string(r.UID), version: v}]
	return ok
}
