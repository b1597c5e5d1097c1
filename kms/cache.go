package kms

import (
	"container/list"
	"context"
	"errors"
	"sync"
	"time"
)

// kekRef names one KEK version of one keyring incarnation. The keyring's
// UID (not its name) is part of it, so a keyring destroyed and created again
// under the same name never hits the old one's cache entries.
type kekRef struct {
	uid     string
	version uint32
}

type cacheEntry struct {
	// mu is held for reading while a caller uses kek and for writing while
	// it is zeroized, so a key is never wiped under a running operation.
	mu      sync.RWMutex
	ref     kekRef
	kek     *Secret
	expires time.Time
}

// kekCache is a bounded LRU of unwrapped KEKs with a time to live. Every
// way out of the cache — eviction, expiry, purge, close — zeroizes the key.
type kekCache struct {
	mu      sync.Mutex
	size    int
	ttl     time.Duration
	now     func() time.Time
	order   *list.List // front is most recently used; values are *cacheEntry
	entries map[kekRef]*list.Element
	closed  bool

	// inflight collapses concurrent misses for one KEK into one HSM call.
	inflight map[kekRef]*unwrapCall
}

// unwrapCall is one HSM unwrap in flight; waiters read err once done is
// closed and, on success, take the key from the cache.
type unwrapCall struct {
	done chan struct{}
	err  error
}

func newKEKCache(size int, ttl time.Duration, now func() time.Time) *kekCache {
	return &kekCache{
		size:     size,
		ttl:      ttl,
		now:      now,
		order:    list.New(),
		entries:  make(map[kekRef]*list.Element),
		inflight: make(map[kekRef]*unwrapCall),
	}
}

// use runs f with the cached KEK for ref, unwrapping it with load on a miss.
// f must not keep the key: it may be zeroized as soon as f returns.
func (c *kekCache) use(ref kekRef, load func() (*Secret, error), f func(kek []byte) error) error {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return ErrUnavailable
		}
		if el, ok := c.entries[ref]; ok {
			e := el.Value.(*cacheEntry)
			if c.now().Before(e.expires) {
				c.order.MoveToFront(el)
				e.mu.RLock()
				c.mu.Unlock()
				err := f(e.kek.Expose())
				e.mu.RUnlock()
				return err
			}
			c.removeLocked(el)
		}
		if call, ok := c.inflight[ref]; ok {
			c.mu.Unlock()
			<-call.done
			if errors.Is(call.err, context.Canceled) || errors.Is(call.err, context.DeadlineExceeded) {
				// The loader's caller gave up, not the HSM: load again
				// under this caller's own context.
				continue
			}
			if call.err != nil {
				return call.err
			}
			continue // the loader inserted it; take it from the cache
		}
		call := &unwrapCall{done: make(chan struct{})}
		c.inflight[ref] = call
		c.mu.Unlock()

		kek, err := load()

		c.mu.Lock()
		delete(c.inflight, ref)
		call.err = err
		if err == nil {
			if c.closed {
				kek.Zero()
				call.err = ErrUnavailable
			} else {
				c.insertLocked(ref, kek)
			}
		}
		close(call.done)
		c.mu.Unlock()
		if call.err != nil {
			return call.err
		}
	}
}

func (c *kekCache) insertLocked(ref kekRef, kek *Secret) {
	if el, ok := c.entries[ref]; ok {
		c.removeLocked(el)
	}
	c.entries[ref] = c.order.PushFront(&cacheEntry{ref: ref, kek: kek, expires: c.now().Add(c.ttl)})
	for c.order.Len() > c.size {
		c.removeLocked(c.order.Back())
	}
}

func (c *kekCache) removeLocked(el *list.Element) {
	e := c.order.Remove(el).(*cacheEntry)
	delete(c.entries, e.ref)
	e.mu.Lock()
	e.kek.Zero()
	e.mu.Unlock()
}

// purge drops (and zeroizes) every cached version of keyring uid.
func (c *kekCache) purge(uid string) { c.retain(func(u string) bool { return u != uid }) }

// retain drops (and zeroizes) every cached KEK whose keyring uid keep
// refuses.
func (c *kekCache) retain(keep func(uid string) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for el := c.order.Front(); el != nil; {
		next := el.Next()
		if !keep(el.Value.(*cacheEntry).ref.uid) {
			c.removeLocked(el)
		}
		el = next
	}
}

// purgeAll drops (and zeroizes) every cached KEK; the cache stays open.
func (c *kekCache) purgeAll() { c.retain(func(string) bool { return false }) }

// len reports the number of cached KEKs.
func (c *kekCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}

// close zeroizes every entry; later uses fail with ErrUnavailable.
func (c *kekCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.order.Len() > 0 {
		c.removeLocked(c.order.Back())
	}
	c.closed = true
}
