package store_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/storetest"
)

func openBolt(t testing.TB, path string, opts store.BoltOptions) *store.Bolt {
	t.Helper()
	s, err := store.OpenBolt(path, opts)
	if err != nil {
		t.Fatalf("OpenBolt(%s): %v", path, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil && !errors.Is(err, store.ErrClosed) {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestBoltConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return openBolt(t, filepath.Join(t.TempDir(), "coffre.db"), store.BoltOptions{})
	})
}

func TestBoltFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "coffre.db")
	openBolt(t, path, store.BoltOptions{})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		t.Fatalf("store file mode %v, want no group or other access (0600)", perm)
	}
}

func TestBoltPersistence(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "coffre.db")
	s := openBolt(t, path, store.BoltOptions{})
	want := map[string]store.KV{}
	for i := range 20 {
		k := fmt.Sprintf("keyrings/%02d", i)
		rev, err := s.Put(ctx, k, []byte("v"+strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		want[k] = store.KV{Key: k, Value: []byte("v" + strconv.Itoa(i)), Revision: rev}
	}
	if err := s.Delete(ctx, "keyrings/07", 0); err != nil {
		t.Fatal(err)
	}
	delete(want, "keyrings/07")
	lastRev, err := s.Revision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if lastRev != 21 {
		t.Fatalf("Revision after 21 writes = %d, want 21", lastRev)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	for round := range 3 {
		s = openBolt(t, path, store.BoltOptions{})
		if rev, err := s.Revision(ctx); err != nil || rev != lastRev {
			t.Fatalf("round %d: Revision after reopen = %d, %v; want %d", round, rev, err, lastRev)
		}
		list, err := s.List(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != len(want) {
			t.Fatalf("round %d: %d keys after reopen, want %d", round, len(list), len(want))
		}
		for _, kv := range list {
			w := want[kv.Key]
			if !bytes.Equal(kv.Value, w.Value) || kv.Revision != w.Revision {
				t.Fatalf("round %d: %q = %q rev %d, want %q rev %d", round, kv.Key, kv.Value, kv.Revision, w.Value, w.Revision)
			}
		}
		k := fmt.Sprintf("round/%d", round)
		rev, err := s.Put(ctx, k, []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		if rev != lastRev+1 {
			t.Fatalf("round %d: first write after reopen has revision %d, want %d", round, rev, lastRev+1)
		}
		want[k] = store.KV{Key: k, Value: []byte("x"), Revision: rev}
		lastRev = rev
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestBoltLockTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "coffre.db")
	first := openBolt(t, path, store.BoltOptions{})

	start := time.Now()
	_, err := store.OpenBolt(path, store.BoltOptions{LockTimeout: 300 * time.Millisecond})
	waited := time.Since(start)
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("second OpenBolt = %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "another process holds the store file") || !strings.Contains(err.Error(), path) {
		t.Errorf("lock error does not name the file and the cause: %v", err)
	}
	if waited < 200*time.Millisecond || waited > 2*time.Second {
		t.Errorf("second OpenBolt gave up after %v, want about 300ms", waited)
	}
	t.Logf("lock error: %v", err)

	if !testing.Short() {
		start = time.Now()
		_, err = store.OpenBolt(path, store.BoltOptions{})
		waited = time.Since(start)
		if !errors.Is(err, store.ErrLocked) || waited < 1500*time.Millisecond || waited > 5*time.Second {
			t.Errorf("with the default timeout: %v after %v, want ErrLocked after about 2s", err, waited)
		}
	}

	// The lock goes with Close.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	openBolt(t, path, store.BoltOptions{LockTimeout: 300 * time.Millisecond})
}

func TestBoltWatchOverflow(t *testing.T) {
	ctx := t.Context()
	s := openBolt(t, filepath.Join(t.TempDir(), "coffre.db"), store.BoltOptions{WatchBuffer: 4})
	slow, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	fast, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var revs []int64
	for i := range 10 {
		rev, err := s.Put(ctx, "k", []byte{byte(i)})
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, rev)
		if ev := <-fast; ev.KV.Revision != rev {
			t.Fatalf("fast watcher got rev %d, want %d", ev.KV.Revision, rev)
		}
	}
	var got []int64
	for ev := range slow {
		got = append(got, ev.KV.Revision)
	}
	if len(got) != 4 || got[0] != revs[0] || got[3] != revs[3] {
		t.Fatalf("slow watcher got revisions %v, want the first 4 of %v and then a closed channel", got, revs)
	}
	// The fast watcher is unaffected.
	rev, err := s.Put(ctx, "k", nil)
	if err != nil {
		t.Fatal(err)
	}
	if ev, ok := <-fast; !ok || ev.KV.Revision != rev {
		t.Fatalf("fast watcher after overflow: %v %v", ev, ok)
	}
}

// rewrite edits a closed store file with bbolt directly.
func rewrite(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func newStoreFile(t *testing.T, keys int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "coffre.db")
	s := openBolt(t, path, store.BoltOptions{})
	for i := range keys {
		if _, err := s.Put(t.Context(), fmt.Sprintf("keyrings/%04d", i), bytes.Repeat([]byte{byte(i)}, 100+i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestBoltFormatChecks(t *testing.T) {
	tests := []struct {
		name string
		edit func(tx *bolt.Tx) error
		want string
	}{
		{"future version", func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("meta")).Put([]byte("format"), binary.BigEndian.AppendUint64(nil, 2))
		}, "format version 2"},
		{"malformed version", func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("meta")).Put([]byte("format"), []byte("1"))
		}, "format version"},
		{"no version", func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("meta")).Delete([]byte("format"))
		}, "format version"},
		{"no data bucket", func(tx *bolt.Tx) error {
			return tx.DeleteBucket([]byte("data"))
		}, "data bucket"},
		{"malformed revision", func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("meta")).Put([]byte("revision"), []byte{1})
		}, "revision"},
		{"foreign bbolt file", func(tx *bolt.Tx) error {
			if err := tx.DeleteBucket([]byte("meta")); err != nil {
				return err
			}
			if err := tx.DeleteBucket([]byte("data")); err != nil {
				return err
			}
			_, err := tx.CreateBucket([]byte("someone-else"))
			return err
		}, "not a Coffre store"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := newStoreFile(t, 3)
			rewrite(t, path, tc.edit)
			_, err := store.OpenBolt(path, store.BoltOptions{})
			if !errors.Is(err, store.ErrFormat) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("OpenBolt = %v, want ErrFormat mentioning %q", err, tc.want)
			}
			t.Logf("%v", err)
		})
	}

	// A damaged entry is reported when read, not returned as data.
	path := newStoreFile(t, 3)
	rewrite(t, path, func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("data")).Put([]byte("keyrings/0001"), []byte{0, 1})
	})
	s := openBolt(t, path, store.BoltOptions{})
	if _, err := s.Get(t.Context(), "keyrings/0001"); !errors.Is(err, store.ErrFormat) {
		t.Fatalf("Get(truncated entry) = %v, want ErrFormat", err)
	}
	if _, err := s.List(t.Context(), ""); !errors.Is(err, store.ErrFormat) {
		t.Fatalf("List(with a truncated entry) = %v, want ErrFormat", err)
	}
}

// TestBoltGarbage feeds OpenBolt files that are not stores, or damaged
// ones: it must return an error or a working store, never panic or crash.
func TestBoltGarbage(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	mustFormat := []struct {
		name string
		data []byte
	}{
		{"random 64KiB", random(64 << 10)},
		{"random 10 bytes", random(10)},
		{"text", []byte("[coffre]\nstore = \"bolt\"\n")},
		{"zeros 64KiB", make([]byte, 64<<10)},
		{"ones 16KiB", bytes.Repeat([]byte{0xff}, 16<<10)},
	}
	for _, tc := range mustFormat {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "coffre.db")
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := store.OpenBolt(path, store.BoltOptions{})
			if err == nil {
				s.Close()
				t.Fatal("OpenBolt accepted garbage")
			}
			if !errors.Is(err, store.ErrFormat) {
				t.Fatalf("OpenBolt(garbage) = %v, want ErrFormat", err)
			}
			t.Logf("%v", err)
		})
	}

	// Both meta pages destroyed: nothing says where the data is.
	t.Run("meta pages destroyed", func(t *testing.T) {
		path := newStoreFile(t, 50)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		page := os.Getpagesize()
		copy(data[:2*page], random(2*page))
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := store.OpenBolt(path, store.BoltOptions{}); !errors.Is(err, store.ErrFormat) {
			t.Fatalf("OpenBolt = %v, want ErrFormat", err)
		}
	})

	// Damage past the meta pages can only be found when read. Whatever
	// the damage, the store must answer with values or errors.
	for i := range 20 {
		t.Run(fmt.Sprintf("damaged pages %d", i), func(t *testing.T) {
			path := newStoreFile(t, 200)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			page := os.Getpagesize()
			switch i % 4 {
			case 0: // a whole random page
				p := 2 + rng.IntN(len(data)/page-2)
				copy(data[p*page:(p+1)*page], random(page))
			case 1: // scattered bytes
				for range 64 {
					data[2*page+rng.IntN(len(data)-2*page)] = byte(rng.Uint32())
				}
			case 2: // truncated
				data = data[:2*page+rng.IntN(len(data)-2*page)]
			case 3: // page headers damaged
				for p := 2; p < len(data)/page; p++ {
					if rng.IntN(3) == 0 {
						copy(data[p*page:p*page+16], random(16))
					}
				}
			}
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := store.OpenBolt(path, store.BoltOptions{LockTimeout: 200 * time.Millisecond})
			if err != nil {
				t.Logf("OpenBolt: %v", err)
				return
			}
			defer s.Close()
			ctx := t.Context()
			var errs []string
			note := func(err error) {
				if err != nil {
					errs = append(errs, err.Error())
				}
			}
			_, err = s.List(ctx, "")
			note(err)
			for k := range 200 {
				_, err = s.Get(ctx, fmt.Sprintf("keyrings/%04d", k))
				if !errors.Is(err, store.ErrNotFound) {
					note(err)
				}
			}
			_, err = s.Put(ctx, "keyrings/new", []byte("x"))
			note(err)
			t.Logf("opened; %d operations failed (first: %.200q)", len(errs), strings.Join(errs, "; "))
		})
	}
}

// The crash test: a child process increments a counter with
// compare-and-swap and reports each acknowledged value; the parent kills it
// with SIGKILL at a random moment and checks what survived.

const crashEnv = "COFFRE_STORE_CRASH_DB"

// TestHelperProcess is the child of TestBoltKill9; on its own it does
// nothing.
func TestHelperProcess(t *testing.T) {
	path := os.Getenv(crashEnv)
	if path == "" {
		t.Skip("helper process for TestBoltKill9")
	}
	ctx := context.Background()
	s, err := store.OpenBolt(path, store.BoltOptions{LockTimeout: 10 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	deadline := time.Now().Add(time.Minute) // in case the parent is gone
	for time.Now().Before(deadline) {
		var n int
		var rev int64
		kv, err := s.Get(ctx, "counter")
		switch {
		case errors.Is(err, store.ErrNotFound):
		case err != nil:
			fmt.Fprintln(os.Stderr, "helper: get:", err)
			os.Exit(2)
		default:
			if n, err = strconv.Atoi(string(kv.Value)); err != nil {
				fmt.Fprintln(os.Stderr, "helper: counter:", err)
				os.Exit(2)
			}
			rev = kv.Revision
		}
		if _, err := s.CompareAndSwap(ctx, "counter", rev, []byte(strconv.Itoa(n+1))); err != nil {
			fmt.Fprintln(os.Stderr, "helper: cas:", err)
			os.Exit(2)
		}
		// One write(2) per line: the parent sees whole lines or nothing.
		if _, err := fmt.Fprintf(os.Stdout, "ack %d\n", n+1); err != nil {
			os.Exit(2)
		}
	}
	os.Exit(0)
}

func TestBoltKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	const rounds = 10
	path := filepath.Join(t.TempDir(), "coffre.db")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
	deadline := time.Now().Add(2 * time.Minute)
	prev := 0
	for round := range rounds {
		if time.Now().After(deadline) {
			t.Fatalf("only %d rounds in the time allowed", round)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), crashEnv+"="+path)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var last atomic.Int64
		firstAck := make(chan struct{})
		readDone := make(chan struct{})
		go func() {
			defer close(readDone)
			br := bufio.NewReader(stdout)
			first := true
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					return // a partial last line is not an acknowledgement
				}
				var n int64
				if _, err := fmt.Sscanf(line, "ack %d\n", &n); err != nil {
					continue
				}
				last.Store(n)
				if first {
					close(firstAck)
					first = false
				}
			}
		}()
		// Half the rounds die at any moment from start-up on (while
		// opening or creating the file too); half once writes flow.
		var delay time.Duration
		if round%2 == 0 {
			delay = time.Duration(rng.IntN(300)) * time.Millisecond
		} else {
			select {
			case <-firstAck:
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatalf("round %d: child made no write in 30s; stderr: %s", round, stderr.String())
			}
			delay = time.Duration(rng.IntN(100)) * time.Millisecond
		}
		time.Sleep(delay)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatalf("round %d: kill: %v", round, err)
		}
		<-readDone
		err = cmd.Wait()
		ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child ended by itself (%v); stderr: %s", round, err, stderr.String())
		}
		acked := int(last.Load())

		got, rev, globalRev := inspectAfterCrash(t, path)
		t.Logf("round %d: killed after %v; last acknowledged %d, stored %d", round, delay, acked, got)
		if acked > 0 && got < acked {
			t.Fatalf("round %d: acknowledged %d but the store holds %d: an acknowledged write was lost", round, acked, got)
		}
		floor := max(acked, prev)
		if got < prev {
			t.Fatalf("round %d: counter went back from %d to %d", round, prev, got)
		}
		if got > floor+1 {
			t.Fatalf("round %d: store holds %d, more than one past %d", round, got, floor)
		}
		// The counter is the only key and every write adds one, so value,
		// key revision and global revision all agree.
		if int64(got) != rev || rev != globalRev {
			t.Fatalf("round %d: value %d, key revision %d, global revision %d; want all equal", round, got, rev, globalRev)
		}
		prev = got
	}
	if prev == 0 {
		t.Fatal("no write ever reached the store")
	}
}

// inspectAfterCrash reopens the store, reads the counter and the global
// revision, and runs bbolt's own consistency check on the file.
func inspectAfterCrash(t *testing.T, path string) (value int, rev, globalRev int64) {
	t.Helper()
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return 0, 0, 0 // killed before it created the file
	}
	s, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatalf("reopen after kill -9: %v", err)
	}
	ctx := t.Context()
	kv, err := s.Get(ctx, "counter")
	switch {
	case errors.Is(err, store.ErrNotFound):
	case err != nil:
		t.Fatalf("Get after kill -9: %v", err)
	default:
		if value, err = strconv.Atoi(string(kv.Value)); err != nil {
			t.Fatalf("counter after kill -9 is %q", kv.Value)
		}
		rev = kv.Revision
	}
	if globalRev, err = s.Revision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bolt.Tx) error {
		var errs []error
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	}); err != nil {
		t.Fatalf("bbolt check after kill -9: %v", err)
	}
	return value, rev, globalRev
}

func BenchmarkBoltGet(b *testing.B) {
	s := openBolt(b, filepath.Join(b.TempDir(), "coffre.db"), store.BoltOptions{})
	ctx := context.Background()
	const keys = 1000
	value := bytes.Repeat([]byte{0xa5}, 256) // about a wrapped KEK with metadata
	for i := range keys {
		if _, err := s.Put(ctx, fmt.Sprintf("keyrings/tenant/%04d", i), value); err != nil {
			b.Fatal(err)
		}
	}
	i := 0
	for b.Loop() {
		if _, err := s.Get(ctx, fmt.Sprintf("keyrings/tenant/%04d", i%keys)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkBoltCAS measures one durable write: each iteration is a
// compare-and-swap, committed and fsynced.
func BenchmarkBoltCAS(b *testing.B) {
	s := openBolt(b, filepath.Join(b.TempDir(), "coffre.db"), store.BoltOptions{})
	ctx := context.Background()
	value := bytes.Repeat([]byte{0xa5}, 256)
	var rev int64
	for b.Loop() {
		var err error
		if rev, err = s.CompareAndSwap(ctx, "keyrings/tenant/counter", rev, value); err != nil {
			b.Fatal(err)
		}
	}
}
