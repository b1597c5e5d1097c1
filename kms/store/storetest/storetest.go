// Package storetest is the conformance suite for [store.Store] engines.
//
// Every engine's tests call [Run]; an engine passes when it keeps the whole
// contract written in the store package, not just the parts its own tests
// think of. The suite uses only the Store interface and assumes nothing
// about revision numbering beyond what the contract promises (revisions of
// successive writes grow), so that engines with a shared revision space
// (etcd) pass as well as the single-file one.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
)

// eventTimeout bounds every wait for a watch event, so that a broken engine
// fails the suite instead of hanging it.
const eventTimeout = 10 * time.Second

// Run runs the conformance suite as subtests of t.
//
// open must return a new, empty store that no one else writes to, and
// arrange through t.Cleanup for its resources (files, servers) to be
// released. The suite closes each store itself; a second Close then returns
// store.ErrClosed, which cleanups must tolerate.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"GetMissing", testGetMissing},
		{"PutGet", testPutGet},
		{"ValuesAreCopied", testValuesAreCopied},
		{"RevisionsIncrease", testRevisionsIncrease},
		{"CompareAndSwap", testCompareAndSwap},
		{"Delete", testDelete},
		{"List", testList},
		{"Last", testLast},
		{"WatchPutDelete", testWatchPutDelete},
		{"WatchOnlyLaterChanges", testWatchOnlyLaterChanges},
		{"WatchOrder", testWatchOrder},
		{"WatchCancel", testWatchCancel},
		{"WatchSlowReader", testWatchSlowReader},
		{"ConcurrentCAS", testConcurrentCAS},
		{"Invalid", testInvalid},
		{"Context", testContext},
		{"Closed", testClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil && !errors.Is(err, store.ErrClosed) {
					t.Errorf("Close: %v", err)
				}
			})
			tc.fn(t, s)
		})
	}
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func mustPut(t *testing.T, s store.Store, key, value string) int64 {
	t.Helper()
	rev, err := s.Put(ctxFor(t), key, []byte(value))
	if err != nil {
		t.Fatalf("Put(%q): %v", key, err)
	}
	if rev <= 0 {
		t.Fatalf("Put(%q) = revision %d, want > 0", key, rev)
	}
	return rev
}

func mustGet(t *testing.T, s store.Store, key string) store.KV {
	t.Helper()
	kv, err := s.Get(ctxFor(t), key)
	if err != nil {
		t.Fatalf("Get(%q): %v", key, err)
	}
	return kv
}

func wantKV(t *testing.T, got store.KV, key, value string, rev int64) {
	t.Helper()
	if got.Key != key || string(got.Value) != value || got.Revision != rev {
		t.Fatalf("got {%q %q rev %d}, want {%q %q rev %d}", got.Key, got.Value, got.Revision, key, value, rev)
	}
}

// next receives one event, failing the test on timeout or a closed channel.
func next(t *testing.T, ch <-chan store.Event) store.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed, want an event")
		}
		return ev
	case <-time.After(eventTimeout):
		t.Fatal("no watch event within", eventTimeout)
	}
	panic("unreachable")
}

// waitClosed drains ch until it is closed and returns what it drained.
func waitClosed(t *testing.T, ch <-chan store.Event) []store.Event {
	t.Helper()
	var got []store.Event
	deadline := time.After(eventTimeout)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return got
			}
			got = append(got, ev)
		case <-deadline:
			t.Fatal("watch channel not closed within", eventTimeout)
		}
	}
}

// noEvent checks that nothing arrives on ch for a short while.
func noEvent(t *testing.T, ch <-chan store.Event) {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if ok {
			t.Fatalf("unexpected event %v %q rev %d", ev.Type, ev.KV.Key, ev.KV.Revision)
		}
		t.Fatal("watch channel closed unexpectedly")
	case <-time.After(50 * time.Millisecond):
	}
}

func wantEvent(t *testing.T, ev store.Event, typ store.EventType, key, value string, rev int64) {
	t.Helper()
	if ev.Type != typ || ev.KV.Key != key || ev.KV.Revision != rev {
		t.Fatalf("event %v %q rev %d, want %v %q rev %d", ev.Type, ev.KV.Key, ev.KV.Revision, typ, key, rev)
	}
	if typ == store.EventDelete {
		if ev.KV.Value != nil {
			t.Fatalf("delete event for %q has value %q, want nil", key, ev.KV.Value)
		}
	} else if string(ev.KV.Value) != value {
		t.Fatalf("event %q value %q, want %q", key, ev.KV.Value, value)
	}
}

func testGetMissing(t *testing.T, s store.Store) {
	_, err := s.Get(ctxFor(t), "keyrings/none")
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get(missing) = %v, want ErrNotFound", err)
	}
}

func testPutGet(t *testing.T, s store.Store) {
	rev := mustPut(t, s, "keyrings/acme/disks", "v1")
	wantKV(t, mustGet(t, s, "keyrings/acme/disks"), "keyrings/acme/disks", "v1", rev)

	rev2 := mustPut(t, s, "keyrings/acme/disks", "v2")
	wantKV(t, mustGet(t, s, "keyrings/acme/disks"), "keyrings/acme/disks", "v2", rev2)

	// Empty values are values, not absence.
	rev3 := mustPut(t, s, "empty", "")
	kv := mustGet(t, s, "empty")
	wantKV(t, kv, "empty", "", rev3)
	if _, err := s.Put(ctxFor(t), "nil", nil); err != nil {
		t.Fatalf("Put(nil value): %v", err)
	}
	if kv := mustGet(t, s, "nil"); len(kv.Value) != 0 {
		t.Fatalf("nil value read back as %q", kv.Value)
	}

	// Keys at the limits, and binary values, round-trip.
	long := strings.Repeat("k", store.MaxKeySize)
	bin := make([]byte, store.MaxValueSize)
	for i := range bin {
		bin[i] = byte(i * 7)
	}
	if _, err := s.Put(ctxFor(t), long, bin); err != nil {
		t.Fatalf("Put(max key, max value): %v", err)
	}
	if kv := mustGet(t, s, long); !bytes.Equal(kv.Value, bin) {
		t.Fatal("max-size value did not round-trip")
	}
	uni := "tenants/é/日本/\u00a0"
	rev4 := mustPut(t, s, uni, "x")
	wantKV(t, mustGet(t, s, uni), uni, "x", rev4)
}

func testValuesAreCopied(t *testing.T, s store.Store) {
	buf := []byte("original")
	if _, err := s.Put(ctxFor(t), "k", buf); err != nil {
		t.Fatal(err)
	}
	copy(buf, "MUTATED!")
	kv := mustGet(t, s, "k")
	if string(kv.Value) != "original" {
		t.Fatalf("store kept the caller's buffer: read %q", kv.Value)
	}
	copy(kv.Value, "MUTATED!")
	if kv := mustGet(t, s, "k"); string(kv.Value) != "original" {
		t.Fatalf("store handed out its own buffer: read %q", kv.Value)
	}
	list, err := s.List(ctxFor(t), "")
	if err != nil || len(list) != 1 {
		t.Fatalf("List = %v, %v", list, err)
	}
	copy(list[0].Value, "MUTATED!")
	if kv := mustGet(t, s, "k"); string(kv.Value) != "original" {
		t.Fatalf("List handed out the store's buffer: read %q", kv.Value)
	}
}

func testRevisionsIncrease(t *testing.T, s store.Store) {
	var last int64
	for i, key := range []string{"a", "b", "a", "c", "b", "a"} {
		rev := mustPut(t, s, key, strconv.Itoa(i))
		if rev <= last {
			t.Fatalf("write %d to %q: revision %d after %d; want strictly increasing", i, key, rev, last)
		}
		last = rev
	}
	// A deletion is a write and takes a revision too.
	if err := s.Delete(ctxFor(t), "c", 0); err != nil {
		t.Fatal(err)
	}
	if rev := mustPut(t, s, "d", "x"); rev <= last+1 {
		t.Fatalf("revision after a delete = %d, want > %d", rev, last+1)
	}
	// Failed writes do not consume a revision visible to keys.
	kv := mustGet(t, s, "a")
	if _, err := s.CompareAndSwap(ctxFor(t), "a", kv.Revision+100, []byte("no")); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("CAS with a wrong revision = %v, want ErrConflict", err)
	}
	if got := mustGet(t, s, "a"); got.Revision != kv.Revision || string(got.Value) != string(kv.Value) {
		t.Fatal("failed CAS changed the key")
	}
}

func testCompareAndSwap(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	// Create-only with rev 0.
	rev1, err := s.CompareAndSwap(ctx, "p", 0, []byte("one"))
	if err != nil {
		t.Fatalf("CAS create: %v", err)
	}
	wantKV(t, mustGet(t, s, "p"), "p", "one", rev1)
	if _, err := s.CompareAndSwap(ctx, "p", 0, []byte("again")); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("CAS create on an existing key = %v, want ErrConflict", err)
	}
	// Success on the current revision.
	rev2, err := s.CompareAndSwap(ctx, "p", rev1, []byte("two"))
	if err != nil {
		t.Fatalf("CAS: %v", err)
	}
	if rev2 <= rev1 {
		t.Fatalf("CAS revision %d after %d", rev2, rev1)
	}
	wantKV(t, mustGet(t, s, "p"), "p", "two", rev2)
	// Conflict on a stale revision leaves the value alone.
	if _, err := s.CompareAndSwap(ctx, "p", rev1, []byte("stale")); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("CAS on a stale revision = %v, want ErrConflict", err)
	}
	wantKV(t, mustGet(t, s, "p"), "p", "two", rev2)
	// A missing key is not at any non-zero revision.
	if _, err := s.CompareAndSwap(ctx, "missing", rev2, []byte("x")); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("CAS with a revision on a missing key = %v, want ErrConflict", err)
	}
	if _, err := s.Get(ctx, "missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("failed CAS created the key: %v", err)
	}
	// After a delete, create-only works again.
	if err := s.Delete(ctx, "p", rev2); err != nil {
		t.Fatal(err)
	}
	rev3, err := s.CompareAndSwap(ctx, "p", 0, []byte("three"))
	if err != nil {
		t.Fatalf("CAS create after delete: %v", err)
	}
	if rev3 <= rev2 {
		t.Fatalf("revision %d after %d", rev3, rev2)
	}
}

func testDelete(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	if err := s.Delete(ctx, "nope", 0); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Delete(missing, 0) = %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "nope", 5); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Delete(missing, 5) = %v, want ErrNotFound", err)
	}

	rev := mustPut(t, s, "d1", "x")
	if err := s.Delete(ctx, "d1", rev+1); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Delete with a wrong revision = %v, want ErrConflict", err)
	}
	wantKV(t, mustGet(t, s, "d1"), "d1", "x", rev)
	if err := s.Delete(ctx, "d1", rev); err != nil {
		t.Fatalf("Delete with the current revision: %v", err)
	}
	if _, err := s.Get(ctx, "d1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete = %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "d1", rev); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second Delete = %v, want ErrNotFound", err)
	}

	mustPut(t, s, "d2", "x")
	mustPut(t, s, "d2", "y")
	if err := s.Delete(ctx, "d2", 0); err != nil {
		t.Fatalf("Delete with rev 0: %v", err)
	}
	if _, err := s.Get(ctx, "d2"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete = %v, want ErrNotFound", err)
	}
}

func testList(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	// Written out of order, with neighbours that share a textual prefix
	// but not a path prefix.
	keys := []string{"a/2", "ab", "a/1", "a", "a/10", "b/1", "a0", "a/", "a/1/x", "`", "a.b"}
	revs := map[string]int64{}
	for _, k := range keys {
		revs[k] = mustPut(t, s, k, "v:"+k)
	}
	check := func(prefix string, want []string) {
		t.Helper()
		got, err := s.List(ctx, prefix)
		if err != nil {
			t.Fatalf("List(%q): %v", prefix, err)
		}
		var gotKeys []string
		for _, kv := range got {
			gotKeys = append(gotKeys, kv.Key)
			if string(kv.Value) != "v:"+kv.Key || kv.Revision != revs[kv.Key] {
				t.Fatalf("List(%q) entry {%q %q rev %d}, want value %q rev %d",
					prefix, kv.Key, kv.Value, kv.Revision, "v:"+kv.Key, revs[kv.Key])
			}
		}
		if !slices.Equal(gotKeys, want) {
			t.Fatalf("List(%q) = %q, want %q", prefix, gotKeys, want)
		}
	}
	check("a/", []string{"a/", "a/1", "a/1/x", "a/10", "a/2"})
	check("a/1", []string{"a/1", "a/1/x", "a/10"})
	check("a/1/", []string{"a/1/x"})
	check("ab", []string{"ab"})
	check("a", []string{"a", "a.b", "a/", "a/1", "a/1/x", "a/10", "a/2", "a0", "ab"})
	check("b/", []string{"b/1"})
	check("c", nil)
	check("a/2/", nil)
	all := slices.Clone(keys)
	slices.Sort(all)
	check("", all)

	// Deleted keys leave the listing.
	if err := s.Delete(ctx, "a/1", 0); err != nil {
		t.Fatal(err)
	}
	check("a/1", []string{"a/1/x", "a/10"})
}

func testWatchPutDelete(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	ch, err := s.Watch(ctx, "a/")
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	r1 := mustPut(t, s, "a/x", "1")
	mustPut(t, s, "ab", "outside the prefix")
	mustPut(t, s, "b/x", "outside the prefix")
	r2, err := s.CompareAndSwap(ctx, "a/x", r1, []byte("2"))
	if err != nil {
		t.Fatal(err)
	}
	r3, err := s.CompareAndSwap(ctx, "a/y", 0, []byte("3"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "a/x", r2); err != nil {
		t.Fatal(err)
	}
	// The delete's own revision is not returned; it is after r3.
	wantEvent(t, next(t, ch), store.EventPut, "a/x", "1", r1)
	wantEvent(t, next(t, ch), store.EventPut, "a/x", "2", r2)
	wantEvent(t, next(t, ch), store.EventPut, "a/y", "3", r3)
	del := next(t, ch)
	if del.Type != store.EventDelete || del.KV.Key != "a/x" || del.KV.Value != nil || del.KV.Revision <= r3 {
		t.Fatalf("delete event %v %q %q rev %d, want delete \"a/x\" nil rev > %d",
			del.Type, del.KV.Key, del.KV.Value, del.KV.Revision, r3)
	}
	// Failed writes make no events.
	if _, err := s.CompareAndSwap(ctx, "a/y", r1, []byte("no")); !errors.Is(err, store.ErrConflict) {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "a/x", 0); !errors.Is(err, store.ErrNotFound) {
		t.Fatal(err)
	}
	noEvent(t, ch)

	// An empty prefix watches everything; a watcher owns its values.
	all, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	ch2, err := s.Watch(ctx, "z")
	if err != nil {
		t.Fatal(err)
	}
	buf := []byte("zz")
	rz, err := s.Put(ctx, "z", buf)
	if err != nil {
		t.Fatal(err)
	}
	copy(buf, "XX")
	e1, e2 := next(t, all), next(t, ch2)
	wantEvent(t, e1, store.EventPut, "z", "zz", rz)
	wantEvent(t, e2, store.EventPut, "z", "zz", rz)
	e1.KV.Value[0] = 'Q'
	if string(e2.KV.Value) != "zz" {
		t.Fatalf("watchers share value buffers: %q", e2.KV.Value)
	}
	noEvent(t, ch)
}

func testWatchOnlyLaterChanges(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	mustPut(t, s, "k/before", "old")
	ch, err := s.Watch(ctx, "k/")
	if err != nil {
		t.Fatal(err)
	}
	r := mustPut(t, s, "k/after", "new")
	wantEvent(t, next(t, ch), store.EventPut, "k/after", "new", r)
	noEvent(t, ch)
}

// testWatchOrder writes from several goroutines and checks that a watcher
// sees every write exactly once, in revision order.
func testWatchOrder(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	ch, err := s.Watch(ctx, "o/")
	if err != nil {
		t.Fatal(err)
	}
	const writers, each = 4, 25
	var (
		mu   sync.Mutex
		revs []int64
		wg   sync.WaitGroup
	)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				rev, err := s.Put(ctx, fmt.Sprintf("o/%d", w), []byte(strconv.Itoa(i)))
				if err != nil {
					t.Errorf("Put: %v", err)
					return
				}
				mu.Lock()
				revs = append(revs, rev)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.Sort(revs)
	var last int64
	for i := range writers * each {
		ev := next(t, ch)
		if ev.Type != store.EventPut || ev.KV.Revision != revs[i] {
			t.Fatalf("event %d: %v rev %d, want put rev %d (after %d)", i, ev.Type, ev.KV.Revision, revs[i], last)
		}
		last = ev.KV.Revision
	}
	noEvent(t, ch)
}

func testWatchCancel(t *testing.T, s store.Store) {
	ctx, cancel := context.WithCancel(ctxFor(t))
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.Watch(ctxFor(t), "")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	waitClosed(t, ch)
	// Other watchers and writers carry on.
	r := mustPut(t, s, "after-cancel", "x")
	wantEvent(t, next(t, other), store.EventPut, "after-cancel", "x", r)

	// A context that is already done gives no watch.
	if ch, err := s.Watch(ctx, ""); err == nil {
		waitClosed(t, ch)
	}
}

// testWatchSlowReader checks that a watcher that never reads cannot block
// writers, and that what it does get is a gap-free prefix of the writes,
// with the channel closed if anything was dropped.
func testWatchSlowReader(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	const n = 1000
	revs := make([]int64, 0, n)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			rev, err := s.Put(ctx, "slow", []byte(strconv.Itoa(i)))
			if err != nil {
				t.Errorf("Put %d: %v", i, err)
				return
			}
			revs = append(revs, rev)
		}
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("writers blocked by a watcher that does not read")
	}
	var got []store.Event
recv:
	for len(got) < n {
		select {
		case ev, ok := <-ch:
			if !ok {
				break recv
			}
			got = append(got, ev)
		case <-time.After(eventTimeout):
			t.Fatalf("watcher holds %d of %d events and its channel is still open: it missed events without being told", len(got), n)
		}
	}
	for i, ev := range got {
		if ev.KV.Revision != revs[i] || string(ev.KV.Value) != strconv.Itoa(i) {
			t.Fatalf("event %d: rev %d value %q, want rev %d value %q", i, ev.KV.Revision, ev.KV.Value, revs[i], strconv.Itoa(i))
		}
	}
	t.Logf("slow watcher received %d of %d events before its channel closed", len(got), n)
}

// testConcurrentCAS runs read-modify-write increments from 8 goroutines
// and checks that no update is lost.
func testConcurrentCAS(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				for {
					var n int
					var rev int64
					kv, err := s.Get(ctx, "counter")
					switch {
					case errors.Is(err, store.ErrNotFound):
					case err != nil:
						t.Errorf("Get: %v", err)
						return
					default:
						if n, err = strconv.Atoi(string(kv.Value)); err != nil {
							t.Errorf("counter %q: %v", kv.Value, err)
							return
						}
						rev = kv.Revision
					}
					_, err = s.CompareAndSwap(ctx, "counter", rev, []byte(strconv.Itoa(n+1)))
					if err == nil {
						break
					}
					if !errors.Is(err, store.ErrConflict) {
						t.Errorf("CAS: %v", err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if got := string(mustGet(t, s, "counter").Value); got != strconv.Itoa(workers*each) {
		t.Fatalf("counter = %s, want %d: updates were lost", got, workers*each)
	}
}

func testInvalid(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	badKeys := map[string]string{
		"empty":        "",
		"too long":     strings.Repeat("k", store.MaxKeySize+1),
		"invalid utf8": "keys/\xff\xfe",
		"truncated":    "keys/\xe6\x97",
		"NUL":          "keys/a\x00b",
	}
	for name, k := range badKeys {
		if _, err := s.Get(ctx, k); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Get(%s key) = %v, want ErrInvalid", name, err)
		}
		if _, err := s.Put(ctx, k, []byte("v")); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Put(%s key) = %v, want ErrInvalid", name, err)
		}
		if _, err := s.CompareAndSwap(ctx, k, 0, []byte("v")); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("CompareAndSwap(%s key) = %v, want ErrInvalid", name, err)
		}
		if err := s.Delete(ctx, k, 0); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Delete(%s key) = %v, want ErrInvalid", name, err)
		}
		if name == "empty" {
			continue // the empty prefix means everything
		}
		if _, err := s.List(ctx, k); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("List(%s prefix) = %v, want ErrInvalid", name, err)
		}
		if _, err := s.Watch(ctx, k); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Watch(%s prefix) = %v, want ErrInvalid", name, err)
		}
	}
	big := make([]byte, store.MaxValueSize+1)
	if _, err := s.Put(ctx, "big", big); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("Put(oversized value) = %v, want ErrInvalid", err)
	}
	if _, err := s.CompareAndSwap(ctx, "big", 0, big); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("CompareAndSwap(oversized value) = %v, want ErrInvalid", err)
	}
	if _, err := s.CompareAndSwap(ctx, "neg", -1, []byte("v")); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("CompareAndSwap(rev -1) = %v, want ErrInvalid", err)
	}
	if err := s.Delete(ctx, "neg", -1); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("Delete(rev -1) = %v, want ErrInvalid", err)
	}
	// Nothing was written.
	if list, err := s.List(ctx, ""); err != nil || len(list) != 0 {
		t.Fatalf("after rejected writes, List = %d entries, %v; want none", len(list), err)
	}
}

func testContext(t *testing.T, s store.Store) {
	mustPut(t, s, "k", "v")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.Get(ctx, "k"); !errors.Is(err, context.Canceled) {
		t.Errorf("Get(cancelled) = %v, want context.Canceled", err)
	}
	if _, err := s.Put(ctx, "k", []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("Put(cancelled) = %v, want context.Canceled", err)
	}
	if _, err := s.CompareAndSwap(ctx, "k", 0, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("CompareAndSwap(cancelled) = %v, want context.Canceled", err)
	}
	if err := s.Delete(ctx, "k", 0); !errors.Is(err, context.Canceled) {
		t.Errorf("Delete(cancelled) = %v, want context.Canceled", err)
	}
	if _, err := s.List(ctx, ""); !errors.Is(err, context.Canceled) {
		t.Errorf("List(cancelled) = %v, want context.Canceled", err)
	}
	if _, err := s.Watch(ctx, ""); !errors.Is(err, context.Canceled) {
		t.Errorf("Watch(cancelled) = %v, want context.Canceled", err)
	}
	kv := mustGet(t, s, "k")
	if string(kv.Value) != "v" {
		t.Fatalf("a cancelled write changed the value to %q", kv.Value)
	}
}

func testClosed(t *testing.T, s store.Store) {
	ctx := ctxFor(t)
	rev := mustPut(t, s, "k", "v")
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitClosed(t, ch)
	if err := s.Close(); !errors.Is(err, store.ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed", err)
	}
	if _, err := s.Get(ctx, "k"); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Get after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Put(ctx, "k", []byte("x")); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Put after Close = %v, want ErrClosed", err)
	}
	if _, err := s.CompareAndSwap(ctx, "k", rev, []byte("x")); !errors.Is(err, store.ErrClosed) {
		t.Errorf("CompareAndSwap after Close = %v, want ErrClosed", err)
	}
	if err := s.Delete(ctx, "k", 0); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Delete after Close = %v, want ErrClosed", err)
	}
	if _, err := s.List(ctx, ""); !errors.Is(err, store.ErrClosed) {
		t.Errorf("List after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Watch(ctx, ""); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Watch after Close = %v, want ErrClosed", err)
	}
}

// testLast checks the optional LastKeyer capability; every Coffre engine
// has it.
func testLast(t *testing.T, s store.Store) {
	lk, ok := s.(store.LastKeyer)
	if !ok {
		t.Fatalf("%T does not implement store.LastKeyer", s)
	}
	ctx := context.Background()
	if _, err := lk.Last(ctx, "a/"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Last on an empty store: %v, want ErrNotFound", err)
	}
	for _, k := range []string{"a/1", "a/3", "a/2", "a0", "b/9", "a/3/x", "ab"} {
		if _, err := s.Put(ctx, k, []byte("v-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	for prefix, want := range map[string]string{"a/": "a/3/x", "a/3": "a/3/x", "a/2": "a/2", "a": "ab", "b/": "b/9", "": "b/9"} {
		kv, err := lk.Last(ctx, prefix)
		if err != nil || kv.Key != want || string(kv.Value) != "v-"+want || kv.Revision == 0 {
			t.Errorf("Last(%q) = %q %q rev %d, %v; want %q", prefix, kv.Key, kv.Value, kv.Revision, err, want)
		}
	}
	for _, prefix := range []string{"c", "a/4", "b/90"} {
		if _, err := lk.Last(ctx, prefix); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Last(%q): %v, want ErrNotFound", prefix, err)
		}
	}
}
