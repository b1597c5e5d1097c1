// Package store defines the storage seam of Coffre and its engines.
//
// The store is not trusted with secrets: it holds keyrings, wrapped KEK
// versions, policies and enrollments, never a plaintext key. Every engine
// offers the same small interface, [Store]: get, put, compare-and-swap,
// delete, list by prefix and watch. Values carry a revision, assigned by the
// store and increasing with every write, so that read-modify-write cycles are
// compare-and-swap on the revision that was read.
//
// The bbolt engine ([OpenBolt]) is the single-node default: one file,
// transactional, safe against kill -9 at any point.
//
// # Keys, values and revisions
//
// A key is a non-empty, valid UTF-8 string of at most [MaxKeySize] bytes
// with no NUL byte; a value is at most [MaxValueSize] bytes. Every engine
// rejects anything else with an error wrapping [ErrInvalid], before touching
// storage, so that data written through one engine can be read through any
// other. A revision passed in (to CompareAndSwap or Delete) is never
// negative.
//
// The store keeps one global revision counter. Every successful write (put,
// compare-and-swap or delete) increments it by one and the written key takes
// the new value as its revision; failed writes change nothing. Revisions
// therefore start at 1, are unique across keys and only grow, also across
// restarts.
//
// # Watching
//
// A watch delivers events after their write is durable, in revision order.
// An engine never lets a slow watcher hold up writers: when a watcher falls
// too far behind, the engine closes its channel. A watcher whose channel is
// closed while its context is still live has missed events; it must List
// again and start a new Watch. Closing the store closes every watch channel.
//
// # Errors
//
//   - [ErrNotFound]: no value under that key.
//   - [ErrConflict]: a compare-and-swap (or a delete with a revision) found
//     another revision.
//   - [ErrInvalid]: a key, prefix, value or revision argument breaks the
//     rules above; nothing was read or written.
//   - [ErrClosed]: the store was closed.
//   - [ErrLocked]: the store file is held by another process.
//   - [ErrFormat]: the store file is corrupt, not a Coffre store, or has a
//     format version this binary does not know.
//
// Other errors (I/O, context) are wrapped with %w and carry no contract
// beyond errors.Is against their own sentinels.
package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Sentinel errors; see the package documentation.
var (
	ErrNotFound = errors.New("store: not found")
	ErrConflict = errors.New("store: revision conflict")
	ErrClosed   = errors.New("store: closed")
	ErrInvalid  = errors.New("store: invalid key or value")
	ErrLocked   = errors.New("store: file locked by another process")
	ErrFormat   = errors.New("store: unreadable store file")
)

// Limits on keys and values, shared by every engine.
const (
	// MaxKeySize is the largest key, in bytes.
	MaxKeySize = 1024
	// MaxValueSize is the largest value, in bytes (1 MiB).
	MaxValueSize = 1 << 20
)

// CheckKey reports whether key is a valid store key; the error wraps
// [ErrInvalid]. Engines call it on every key they are given.
func CheckKey(key string) error {
	if key == "" {
		return fmt.Errorf("%w: empty key", ErrInvalid)
	}
	return checkPath("key", key)
}

// CheckPrefix reports whether prefix may be used to List or Watch. The empty
// prefix (everything) is valid; otherwise the rules for keys apply. The error
// wraps [ErrInvalid].
func CheckPrefix(prefix string) error {
	return checkPath("prefix", prefix)
}

// CheckValue reports whether value may be stored; the error wraps
// [ErrInvalid]. A nil or empty value is valid.
func CheckValue(value []byte) error {
	if len(value) > MaxValueSize {
		return fmt.Errorf("%w: value is %d bytes, the limit is %d", ErrInvalid, len(value), MaxValueSize)
	}
	return nil
}

// CheckRevision reports whether rev may be passed to CompareAndSwap or
// Delete; the error wraps [ErrInvalid].
func CheckRevision(rev int64) error {
	if rev < 0 {
		return fmt.Errorf("%w: negative revision %d", ErrInvalid, rev)
	}
	return nil
}

func checkPath(what, s string) error {
	if len(s) > MaxKeySize {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", ErrInvalid, what, len(s), MaxKeySize)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, what)
	}
	if i := strings.IndexByte(s, 0); i >= 0 {
		return fmt.Errorf("%w: %s has a NUL byte at offset %d", ErrInvalid, what, i)
	}
	return nil
}

// KV is one stored value with the revision of its last write.
type KV struct {
	Key      string
	Value    []byte
	Revision int64
}

// EventType says what happened to a key.
type EventType int

// Event types.
const (
	// EventPut: the key was created or overwritten (by Put or
	// CompareAndSwap).
	EventPut EventType = iota + 1
	// EventDelete: the key was deleted.
	EventDelete
)

// String returns "put" or "delete".
func (t EventType) String() string {
	switch t {
	case EventPut:
		return "put"
	case EventDelete:
		return "delete"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is one change seen by a watch. Value is nil for deletions, and
// KV.Revision is then the revision of the deletion itself.
type Event struct {
	Type EventType
	KV   KV
}

// Store is the storage interface every engine implements. Keys are
// slash-separated paths such as "keyrings/acme/disks". All methods are safe
// for concurrent use.
type Store interface {
	// Get returns the value under key, or ErrNotFound.
	Get(ctx context.Context, key string) (KV, error)
	// Put writes value under key unconditionally and returns its revision.
	Put(ctx context.Context, key string, value []byte) (int64, error)
	// CompareAndSwap writes value under key only if the key's current
	// revision is rev (rev 0: only if the key does not exist). It returns
	// the new revision, or ErrConflict.
	CompareAndSwap(ctx context.Context, key string, rev int64, value []byte) (int64, error)
	// Delete removes key only if its current revision is rev (rev 0: any
	// revision). Deleting a missing key returns ErrNotFound.
	Delete(ctx context.Context, key string, rev int64) error
	// List returns every value whose key starts with prefix, in key order.
	List(ctx context.Context, prefix string) ([]KV, error)
	// Watch reports changes under prefix made after it returns, in revision
	// order, until ctx ends; the channel is then closed.
	Watch(ctx context.Context, prefix string) (<-chan Event, error)
	// Close releases the engine; later calls return ErrClosed.
	Close() error
}

// LastKeyer is implemented by stores that can return the last key under a
// prefix (in byte order) without reading the others: the audit replica
// uses it at start to learn how much of a node's log it holds.
type LastKeyer interface {
	// Last returns the last key-value under prefix, ErrNotFound if none.
	Last(ctx context.Context, prefix string) (KV, error)
}
