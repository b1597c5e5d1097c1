package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// On-disk layout of a bbolt store, format version 1.
//
// Bucket "meta":
//
//	"format"   -> 8-byte big-endian format version (1)
//	"revision" -> 8-byte big-endian global revision: the revision of the
//	              last successful write, 0 in a new store
//
// Bucket "data":
//
//	key -> 8-byte big-endian mod revision ‖ value
//
// The revision is a prefix of the value rather than a parallel bucket so
// that a key, its value and its revision are always one bbolt entry and can
// never disagree. The global revision is written in the same transaction as
// the data it counts. No other top-level bucket exists.
const boltFormatVersion = 1

var (
	boltMetaBucket  = []byte("meta")
	boltDataBucket  = []byte("data")
	boltFormatKey   = []byte("format")
	boltRevisionKey = []byte("revision")
)

const (
	defaultLockTimeout = 2 * time.Second
	defaultWatchBuffer = 256
	revSize            = 8
)

// BoltOptions tunes [OpenBolt]. The zero value is the recommended setting.
type BoltOptions struct {
	// LockTimeout bounds the wait for the exclusive lock on the store file,
	// which another process (usually another coffred) may hold. Zero or
	// negative means 2s. When it expires, OpenBolt fails with [ErrLocked].
	LockTimeout time.Duration
	// WatchBuffer is the number of events a watcher may fall behind before
	// its channel is closed (see [Bolt.Watch]). Zero or negative means 256.
	WatchBuffer int
}

// Bolt is the embedded single-file engine, built on bbolt. Every write is
// one bbolt transaction, fsynced before it is acknowledged, so an
// acknowledged write survives kill -9 and power loss, and an unacknowledged
// one is either wholly present or wholly absent. One process at a time may
// open the file.
//
// Bolt implements [Store]; create it with [OpenBolt].
type Bolt struct {
	path        string
	db          *bolt.DB
	watchBuffer int

	// closeMu is held shared by every operation and exclusively by Close,
	// so that Close waits for operations in flight and none starts after.
	closeMu sync.RWMutex
	closed  bool

	// writeMu serialises writes together with the dispatch of their
	// events, so that watchers receive events in revision order, and
	// orders Watch registration against writes.
	writeMu sync.Mutex

	subsMu   sync.Mutex
	watchers map[*boltWatcher]struct{}
}

var _ Store = (*Bolt)(nil)

type boltWatcher struct {
	prefix string
	ch     chan Event
	done   chan struct{} // closed when ch is closed
}

// OpenBolt opens the bbolt store file at path, creating it (mode 0600) if
// it does not exist. It fails with [ErrLocked] if another process holds the
// file for longer than opts.LockTimeout, and with [ErrFormat] if the file is
// corrupt, is not a Coffre store, or has an unknown format version.
func OpenBolt(path string, opts BoltOptions) (b *Bolt, err error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = defaultLockTimeout
	}
	if opts.WatchBuffer <= 0 {
		opts.WatchBuffer = defaultWatchBuffer
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)

	var db *bolt.DB
	defer func() {
		// bbolt trusts its file; a damaged one can make it panic. The file
		// is outside input to us, so turn that into an error.
		if r := recover(); r != nil {
			if db != nil {
				_ = db.Close()
			}
			b, err = nil, fmt.Errorf("%w: %s: corrupt (%v)", ErrFormat, path, r)
		}
	}()
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)

	// bbolt's defaults keep fsync on commit (NoSync false) and on file
	// growth (NoGrowSync false); both are required for durability.
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.LockTimeout})
	switch {
	case err == nil:
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("%w: %s: another process holds the store file, or it is already open in this one (waited %s)", ErrLocked, path, opts.LockTimeout)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum),
		errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrInvalidMapping):
		return nil, fmt.Errorf("%w: %s: not a bbolt file or corrupt: %w", ErrFormat, path, err)
	default:
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	if err := initBolt(db, path); err != nil {
		_ = db.Close()
		return nil, err
	}
	if created {
		// Make the new file's directory entry durable too, or a power
		// loss could forget the whole store after acknowledged writes.
		if err := syncDir(filepath.Dir(path)); err != nil {
			_ = db.Close()
			return nil, fmt.Errorf("store: open %s: sync directory: %w", path, err)
		}
	}
	return &Bolt{
		path:        path,
		db:          db,
		watchBuffer: opts.WatchBuffer,
		watchers:    make(map[*boltWatcher]struct{}),
	}, nil
}

// initBolt checks the format of an existing store, or lays out a new one.
func initBolt(db *bolt.DB, path string) error {
	fresh := false
	err := db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(boltMetaBucket) != nil {
			return checkBoltFormat(tx, path)
		}
		empty := true
		if err := tx.ForEach(func([]byte, *bolt.Bucket) error { empty = false; return nil }); err != nil {
			return err
		}
		if !empty {
			return fmt.Errorf("%w: %s: a bbolt file but not a Coffre store", ErrFormat, path)
		}
		fresh = true
		return nil
	})
	if err != nil || !fresh {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket(boltMetaBucket)
		if err != nil {
			return fmt.Errorf("store: initialise %s: %w", path, err)
		}
		if _, err := tx.CreateBucket(boltDataBucket); err != nil {
			return fmt.Errorf("store: initialise %s: %w", path, err)
		}
		if err := meta.Put(boltFormatKey, be64(boltFormatVersion)); err != nil {
			return fmt.Errorf("store: initialise %s: %w", path, err)
		}
		if err := meta.Put(boltRevisionKey, be64(0)); err != nil {
			return fmt.Errorf("store: initialise %s: %w", path, err)
		}
		return nil
	})
}

func checkBoltFormat(tx *bolt.Tx, path string) error {
	v := tx.Bucket(boltMetaBucket).Get(boltFormatKey)
	if len(v) != revSize {
		return fmt.Errorf("%w: %s: missing or malformed format version", ErrFormat, path)
	}
	if ver := binary.BigEndian.Uint64(v); ver != boltFormatVersion {
		return fmt.Errorf("%w: %s: format version %d, this binary reads only version %d", ErrFormat, path, ver, boltFormatVersion)
	}
	if tx.Bucket(boltDataBucket) == nil {
		return fmt.Errorf("%w: %s: data bucket missing", ErrFormat, path)
	}
	if _, err := readRevision(tx); err != nil {
		return fmt.Errorf("%w (%s)", err, path)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir) // #nosec G304 -- the directory of the configured store path
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func be64(v uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return b[:]
}

func readRevision(tx *bolt.Tx) (int64, error) {
	v := tx.Bucket(boltMetaBucket).Get(boltRevisionKey)
	if len(v) != revSize {
		return 0, fmt.Errorf("%w: malformed global revision", ErrFormat)
	}
	r := binary.BigEndian.Uint64(v)
	if r > 1<<62 {
		return 0, fmt.Errorf("%w: global revision %d out of range", ErrFormat, r)
	}
	return int64(r), nil
}

// decodeEntry splits a stored entry into its revision and a copy of its
// value (bbolt memory is only valid inside the transaction).
func decodeEntry(key, raw []byte) (KV, error) {
	if len(raw) < revSize {
		return KV{}, fmt.Errorf("%w: entry %s is truncated", ErrFormat, quoteKey(key))
	}
	r := binary.BigEndian.Uint64(raw[:revSize])
	if r == 0 || r > 1<<62 {
		return KV{}, fmt.Errorf("%w: entry %s has revision %d", ErrFormat, quoteKey(key), r)
	}
	return KV{Key: string(key), Value: bytes.Clone(raw[revSize:]), Revision: int64(r)}, nil
}

// quoteKey quotes a key read from the file for an error message, cut short:
// a damaged file can hold keys of any length and content.
func quoteKey(k []byte) string {
	const limit = 64
	if len(k) > limit {
		return fmt.Sprintf("%q…", k[:limit])
	}
	return fmt.Sprintf("%q", k)
}

func encodeEntry(rev int64, value []byte) []byte {
	buf := make([]byte, revSize+len(value))
	binary.BigEndian.PutUint64(buf, uint64(rev)) // #nosec G115 -- revisions are positive: they start at 1 and only grow
	copy(buf[revSize:], value)
	return buf
}

// enter starts an operation: it fails if the store is closed or ctx is
// done; otherwise the caller must call the returned release.
func (b *Bolt) enter(ctx context.Context) (release func(), err error) {
	b.closeMu.RLock()
	if b.closed {
		b.closeMu.RUnlock()
		return nil, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		b.closeMu.RUnlock()
		return nil, err
	}
	return b.closeMu.RUnlock, nil
}

// guard turns a panic inside bbolt (a damaged file) into an error. bbolt
// rolls the transaction back before the panic reaches us.
func (b *Bolt) guard(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %s: corrupt (%v)", ErrFormat, b.path, r)
		}
	}()
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	return fn()
}

func (b *Bolt) view(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	release, err := b.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	return b.guard(func() error { return b.db.View(fn) })
}

// update runs one write. fn sees the data bucket and the revision this write
// will have if it succeeds, and returns the event describing it; the global
// revision is bumped in the same transaction, and the event is dispatched
// only after the commit is durable.
func (b *Bolt) update(ctx context.Context, fn func(data *bolt.Bucket, rev int64) (Event, error)) (int64, error) {
	release, err := b.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	// The wait for writeMu can be long; do not start a write for a caller
	// that has gone.
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	var ev Event
	err = b.guard(func() error {
		return b.db.Update(func(tx *bolt.Tx) error {
			cur, err := readRevision(tx)
			if err != nil {
				return err
			}
			next := cur + 1
			if ev, err = fn(tx.Bucket(boltDataBucket), next); err != nil {
				return err
			}
			return tx.Bucket(boltMetaBucket).Put(boltRevisionKey, be64(uint64(next))) // #nosec G115 -- next > 0, see above
		})
	})
	if err != nil {
		return 0, err
	}
	b.dispatch(ev)
	return ev.KV.Revision, nil
}

// Get returns the value under key, or [ErrNotFound].
func (b *Bolt) Get(ctx context.Context, key string) (KV, error) {
	if err := CheckKey(key); err != nil {
		return KV{}, err
	}
	var kv KV
	err := b.view(ctx, func(tx *bolt.Tx) error {
		raw := tx.Bucket(boltDataBucket).Get([]byte(key))
		if raw == nil {
			return ErrNotFound
		}
		var err error
		kv, err = decodeEntry([]byte(key), raw)
		return err
	})
	if err != nil {
		return KV{}, err
	}
	return kv, nil
}

// Put writes value under key unconditionally and returns its revision.
func (b *Bolt) Put(ctx context.Context, key string, value []byte) (int64, error) {
	return b.write(ctx, key, -1, value)
}

// CompareAndSwap writes value under key only if the key's current revision
// is rev (rev 0: only if the key does not exist), and returns the new
// revision, or [ErrConflict].
func (b *Bolt) CompareAndSwap(ctx context.Context, key string, rev int64, value []byte) (int64, error) {
	if err := CheckRevision(rev); err != nil {
		return 0, err
	}
	return b.write(ctx, key, rev, value)
}

// write is Put (rev -1) and CompareAndSwap.
func (b *Bolt) write(ctx context.Context, key string, rev int64, value []byte) (int64, error) {
	if err := CheckKey(key); err != nil {
		return 0, err
	}
	if err := CheckValue(value); err != nil {
		return 0, err
	}
	k := []byte(key)
	return b.update(ctx, func(data *bolt.Bucket, next int64) (Event, error) {
		if rev >= 0 {
			var cur int64
			if raw := data.Get(k); raw != nil {
				kv, err := decodeEntry(k, raw)
				if err != nil {
					return Event{}, err
				}
				cur = kv.Revision
			}
			if cur != rev {
				return Event{}, fmt.Errorf("%w: key %q is at revision %d, not %d", ErrConflict, key, cur, rev)
			}
		}
		if err := data.Put(k, encodeEntry(next, value)); err != nil {
			return Event{}, err
		}
		return Event{Type: EventPut, KV: KV{Key: key, Value: value, Revision: next}}, nil
	})
}

// Delete removes key only if its current revision is rev (rev 0: any
// revision). Deleting a missing key returns [ErrNotFound]; a revision
// mismatch returns [ErrConflict]. A deletion is a write: it takes a revision
// of its own, which watchers see in the [EventDelete].
func (b *Bolt) Delete(ctx context.Context, key string, rev int64) error {
	if err := CheckKey(key); err != nil {
		return err
	}
	if err := CheckRevision(rev); err != nil {
		return err
	}
	k := []byte(key)
	_, err := b.update(ctx, func(data *bolt.Bucket, next int64) (Event, error) {
		raw := data.Get(k)
		if raw == nil {
			return Event{}, ErrNotFound
		}
		kv, err := decodeEntry(k, raw)
		if err != nil {
			return Event{}, err
		}
		if rev != 0 && kv.Revision != rev {
			return Event{}, fmt.Errorf("%w: key %q is at revision %d, not %d", ErrConflict, key, kv.Revision, rev)
		}
		if err := data.Delete(k); err != nil {
			return Event{}, err
		}
		return Event{Type: EventDelete, KV: KV{Key: key, Revision: next}}, nil
	})
	return err
}

// List returns every value whose key starts with prefix, in key order (byte
// order of the UTF-8 keys), from one consistent snapshot.
func (b *Bolt) List(ctx context.Context, prefix string) ([]KV, error) {
	if err := CheckPrefix(prefix); err != nil {
		return nil, err
	}
	out := []KV{}
	err := b.view(ctx, func(tx *bolt.Tx) error {
		p := []byte(prefix)
		c := tx.Bucket(boltDataBucket).Cursor()
		for k, raw := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, raw = c.Next() {
			if len(out)%1024 == 1023 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			kv, err := decodeEntry(k, raw)
			if err != nil {
				return err
			}
			out = append(out, kv)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Last implements LastKeyer.
func (b *Bolt) Last(ctx context.Context, prefix string) (KV, error) {
	if err := CheckPrefix(prefix); err != nil {
		return KV{}, err
	}
	var out KV
	err := b.view(ctx, func(tx *bolt.Tx) error {
		p := []byte(prefix)
		c := tx.Bucket(boltDataBucket).Cursor()
		// The first key after every key with the prefix: the prefix with
		// its last byte incremented (prefixes are printable, never 0xff).
		var k, raw []byte
		if len(p) == 0 {
			k, raw = c.Last()
		} else {
			upper := append(bytes.Clone(p[:len(p)-1]), p[len(p)-1]+1)
			if k, _ = c.Seek(upper); k == nil {
				k, raw = c.Last()
			} else {
				k, raw = c.Prev()
			}
		}
		if k == nil || !bytes.HasPrefix(k, p) {
			return ErrNotFound
		}
		var err error
		out, err = decodeEntry(k, raw)
		return err
	})
	return out, err
}

// Revision returns the store's global revision: the revision of its last
// successful write, 0 for a new store.
func (b *Bolt) Revision(ctx context.Context) (int64, error) {
	var rev int64
	err := b.view(ctx, func(tx *bolt.Tx) error {
		var err error
		rev, err = readRevision(tx)
		return err
	})
	return rev, err
}

// Watch reports changes under prefix made after it returns, in revision
// order, until ctx ends; the channel is then closed. Events are sent only
// after their write is durable. Receivers own the values they receive.
//
// Writers never wait for watchers: if a watcher lets more than
// BoltOptions.WatchBuffer events pile up, its channel is closed early. A
// watcher whose channel closes while ctx is still live has missed events
// and must List and Watch again. Closing the store closes every channel.
func (b *Bolt) Watch(ctx context.Context, prefix string) (<-chan Event, error) {
	if err := CheckPrefix(prefix); err != nil {
		return nil, err
	}
	release, err := b.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	w := &boltWatcher{
		prefix: prefix,
		ch:     make(chan Event, b.watchBuffer),
		done:   make(chan struct{}),
	}
	// Holding writeMu, no write is between commit and dispatch: w sees
	// exactly the writes that commit after this point.
	b.writeMu.Lock()
	b.subsMu.Lock()
	b.watchers[w] = struct{}{}
	b.subsMu.Unlock()
	b.writeMu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
			b.subsMu.Lock()
			b.dropLocked(w)
			b.subsMu.Unlock()
		case <-w.done:
		}
	}()
	return w.ch, nil
}

// dispatch hands ev to every interested watcher without blocking. Called
// with writeMu held, so events go out in commit order.
func (b *Bolt) dispatch(ev Event) {
	b.subsMu.Lock()
	defer b.subsMu.Unlock()
	for w := range b.watchers {
		if !strings.HasPrefix(ev.KV.Key, w.prefix) {
			continue
		}
		e := ev
		if e.Type == EventPut {
			// Each watcher gets its own copy: the caller may reuse its
			// buffer, and watchers must not see each other's changes.
			e.KV.Value = bytes.Clone(ev.KV.Value)
			if e.KV.Value == nil {
				e.KV.Value = []byte{}
			}
		}
		select {
		case w.ch <- e:
		default:
			b.dropLocked(w)
		}
	}
}

// dropLocked removes w and closes its channel; idempotent. Called with
// subsMu held.
func (b *Bolt) dropLocked(w *boltWatcher) {
	if _, ok := b.watchers[w]; !ok {
		return
	}
	delete(b.watchers, w)
	close(w.ch)
	close(w.done)
}

// Close closes every watch channel and the file, after waiting for
// operations in flight. Later calls, and calls to any other method, return
// [ErrClosed].
func (b *Bolt) Close() error {
	b.closeMu.Lock()
	defer b.closeMu.Unlock()
	if b.closed {
		return ErrClosed
	}
	b.closed = true
	b.subsMu.Lock()
	for w := range b.watchers {
		b.dropLocked(w)
	}
	b.subsMu.Unlock()
	if err := b.db.Close(); err != nil {
		return fmt.Errorf("store: close %s: %w", b.path, err)
	}
	return nil
}
