package kms

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
)

// StoreAuditReplica replicates a node's audit log to the shared store (for
// example etcd), so that an acknowledged audit entry survives the permanent
// loss of the node that wrote it. Set it as audit.Options.Replicator.
// [VerifyReplicatedAudits] checks every node's copy offline.
//
// # Layout
//
//   - audit/<node>/entries/<first>: one key per replicated batch, <first>
//     the index of the batch's first entry as 20 decimal digits (so that key
//     order is index order). Written once, create-only.
//   - audit/<node>/checkpoint: the node's latest signed checkpoint note, as
//     audit.ParseCheckpoint reads it, overwritten by each new one.
//   - audit/<node>/checkpoints/<size>: retained past checkpoints, <size> the
//     tree size as 20 decimal digits. Written once, create-only: a second
//     checkpoint of the same size with another origin or root is refused
//     (the node signed two histories). Every published checkpoint is
//     written here, and pruned later unless it is retained (below).
//   - audit/<node>/recent: the bookkeeping of that pruning (see
//     [StoreAuditReplica.PublishCheckpoint]).
//
// # Batch value
//
// A batch's body is, for each entry in index order, the entry's length as
// a 4-byte big-endian unsigned integer and then its canonical bytes (what
// the Merkle tree hashes); the number of entries is implied by the body's
// length. A batch value is the byte 2 followed by the body compressed as
// one Zstandard frame (RFC 8878). Entries of one node repeat their field
// names, node, keyring and evidence, so a release batch shrinks about
// tenfold: the bytes every etcd member writes to its WAL, sends to its
// peers and keeps are what bound replicated throughput. A decoded body may
// not exceed store.MaxValueSize. Values written before compression (the
// byte 1 followed by the body as is) are still read.
//
// # What the checkpoint history costs
//
// A checkpoint note is about 4.6 KB (its ML-DSA-65 signature is 3,309
// bytes, base64-encoded). The log publishes one at most about once a second
// while it grows, plus one every audit.Options.CheckpointEvery entries: at
// one a second, keeping them all would add some 400 MB a day per node to
// etcd. So only these are kept: the first checkpoint published in each
// power-of-two range of sizes [2^k, 2^(k+1)) — at most 65, ever — and the
// [AuditRecentCheckpoints] most recent ones. A node's whole history is then
// at most about 80 notes (under 400 KB), however long it runs, and signed
// checkpoints at about every doubling of the log stay as evidence against
// a later fork. Each publication costs one small read
// and four writes (the history key, the latest key, the bookkeeping key,
// one deletion), about 9 KB in all. etcd's own history of overwritten and
// deleted keys is reclaimed only by etcd compaction, which the operator
// configures (--auto-compaction-retention).
type StoreAuditReplica struct {
	Store store.Store
}

// AuditRecentCheckpoints is how many of a node's most recent checkpoints
// the store keeps besides the power-of-two ones.
const AuditRecentCheckpoints = 8

// Errors of the replicated audit log, matched with errors.Is. Verification
// failures are an [*AuditReplicaError] wrapping one of them.
var (
	// ErrAuditReplicaGap: a node's replicated batches are not contiguous
	// from entry 0 (a batch was deleted, or two overlap), or a key under
	// the node's prefix is not one the replica writes.
	ErrAuditReplicaGap = errors.New("kms: audit replica: entries missing")
	// ErrAuditReplicaEntry: a batch or an entry does not parse, or an
	// entry does not carry its index and node.
	ErrAuditReplicaEntry = errors.New("kms: audit replica: bad entry")
	// ErrAuditReplicaCheckpoint: a checkpoint is missing, does not parse,
	// or its signatures do not verify with any trusted key.
	ErrAuditReplicaCheckpoint = errors.New("kms: audit replica: bad checkpoint")
	// ErrAuditReplicaFork: a validly signed checkpoint disagrees with the
	// replicated entries — its root is not theirs at its size, it covers
	// entries that are not there, or the node signed two histories.
	ErrAuditReplicaFork = errors.New("kms: audit replica: fork")
)

// AuditReplicaError says what is wrong with one node's replicated log.
type AuditReplicaError struct {
	Node string
	// Kind is one of ErrAuditReplicaGap, ErrAuditReplicaEntry,
	// ErrAuditReplicaCheckpoint, ErrAuditReplicaFork.
	Kind error
	// Index is the first bad entry (or where the gap starts), -1 if none
	// is named.
	Index int64
	// Size is the size of the checkpoint at fault, if any.
	Size uint64
	// Detail says what was found, for people.
	Detail string
}

func (e *AuditReplicaError) Error() string {
	return fmt.Sprintf("node %q: %s", e.Node, e.Detail)
}

// Unwrap returns Kind.
func (e *AuditReplicaError) Unwrap() error { return e.Kind }

var (
	_ audit.Replicator      = StoreAuditReplica{}
	_ audit.ReplicatedSizer = StoreAuditReplica{}
)

// ReplicatedSize implements audit.ReplicatedSizer: the last batch's first
// index plus its length. It reads one key when the store can find the last
// key under a prefix (store.LastKeyer, both Coffre engines), else it lists
// the node's batches.
func (r StoreAuditReplica) ReplicatedSize(ctx context.Context, node string) (uint64, error) {
	prefix, err := auditPrefix(node)
	if err != nil {
		return 0, err
	}
	var last store.KV
	if lk, ok := r.Store.(store.LastKeyer); ok {
		last, err = lk.Last(ctx, prefix+"entries/")
		if errors.Is(err, store.ErrNotFound) {
			return 0, nil
		}
		if err != nil {
			return 0, err
		}
	} else {
		kvs, err := r.Store.List(ctx, prefix+"entries/")
		if err != nil {
			return 0, err
		}
		if len(kvs) == 0 {
			return 0, nil
		}
		last = kvs[len(kvs)-1]
	}
	name := strings.TrimPrefix(last.Key, prefix+"entries/")
	first, err := strconv.ParseUint(name, 10, 64)
	if err != nil || len(name) != 20 {
		return 0, fmt.Errorf("kms: audit replica: unexpected key %q", last.Key)
	}
	entries, err := decodeAuditBatch(last.Value)
	if err != nil {
		return 0, fmt.Errorf("kms: audit replica: %s: %w", last.Key, err)
	}
	return first + uint64(len(entries)), nil
}

// The first byte of a batch value: its format.
const (
	auditBatchRaw  = 1 // the body as is (written before compression)
	auditBatchZstd = 2 // the body as one Zstandard frame
)

// batchEncoder and batchDecoder are shared: EncodeAll and DecodeAll are
// safe for concurrent use. The decoder refuses bodies larger than the
// store's value limit, which no encoder here produces, so a forged value
// cannot make a reader allocate more.
var (
	batchEncoder = mustZstd(zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1)))
	batchDecoder = mustZstd(zstd.NewReader(nil, zstd.WithDecoderMaxMemory(store.MaxValueSize), zstd.WithDecoderConcurrency(1)))
)

func mustZstd[T any](v T, err error) T {
	if err != nil {
		panic("kms: audit replica: zstd: " + err.Error()) // only fixed, valid options are passed
	}
	return v
}

func auditPrefix(node string) (string, error) {
	if node == "" || strings.ContainsAny(node, "/\x00") {
		return "", fmt.Errorf("kms: audit replica: bad node id %q", node)
	}
	return "audit/" + node + "/", nil
}

func auditBatchKey(prefix string, first uint64) string {
	return fmt.Sprintf("%sentries/%020d", prefix, first)
}

// encodeAuditBatch returns the batch value of entries.
func encodeAuditBatch(entries [][]byte) ([]byte, error) {
	n := 0
	for _, e := range entries {
		n += 4 + len(e)
	}
	if n > store.MaxValueSize {
		return nil, fmt.Errorf("kms: audit replica: batch of %d entries is %d bytes, the store's limit is %d", len(entries), n, store.MaxValueSize)
	}
	body := make([]byte, 0, n)
	for _, e := range entries {
		body = binary.BigEndian.AppendUint32(body, uint32(len(e))) // #nosec G115 -- bounded by store.MaxValueSize above
		body = append(body, e...)
	}
	v := batchEncoder.EncodeAll(body, []byte{auditBatchZstd})
	if len(v) > store.MaxValueSize {
		return nil, fmt.Errorf("kms: audit replica: batch of %d entries compresses to %d bytes, the store's limit is %d", len(entries), len(v), store.MaxValueSize)
	}
	return v, nil
}

// decodeAuditBatch parses a batch value.
func decodeAuditBatch(v []byte) ([][]byte, error) {
	if len(v) == 0 {
		return nil, errors.New("empty value")
	}
	body := v[1:]
	switch v[0] {
	case auditBatchRaw:
		body = bytes.Clone(body)
	case auditBatchZstd:
		var err error
		if body, err = batchDecoder.DecodeAll(body, nil); err != nil {
			return nil, fmt.Errorf("compressed body: %w", err)
		}
		if len(body) > store.MaxValueSize {
			return nil, fmt.Errorf("body of %d bytes, more than %d", len(body), store.MaxValueSize)
		}
	default:
		return nil, fmt.Errorf("unknown batch format %d", v[0])
	}
	var out [][]byte
	for len(body) > 0 {
		if len(body) < 4 {
			return nil, errors.New("truncated length")
		}
		n := binary.BigEndian.Uint32(body)
		body = body[4:]
		if uint64(n) > uint64(len(body)) {
			return nil, errors.New("truncated entry")
		}
		out = append(out, body[:n:n])
		body = body[n:]
	}
	if len(out) == 0 {
		return nil, errors.New("empty batch")
	}
	return out, nil
}

// Replicate implements audit.Replicator: it creates the batch's key. If the
// key exists holding exactly these entries (a retry after an unknown
// outcome) that is success; holding others it is an error (two writers
// claim the same node id, or the log forked).
func (r StoreAuditReplica) Replicate(ctx context.Context, node string, first uint64, entries [][]byte) error {
	prefix, err := auditPrefix(node)
	if err != nil {
		return err
	}
	if len(entries) == 0 {
		return nil
	}
	v, err := encodeAuditBatch(entries)
	if err != nil {
		return err
	}
	key := auditBatchKey(prefix, first)
	_, err = r.Store.CompareAndSwap(ctx, key, 0, v)
	if !errors.Is(err, store.ErrConflict) {
		return err
	}
	kv, gerr := r.Store.Get(ctx, key)
	if gerr != nil {
		return fmt.Errorf("kms: audit replica: %s exists and cannot be read: %w", key, gerr)
	}
	if held, derr := decodeAuditBatch(kv.Value); derr == nil && slices.EqualFunc(held, entries, bytes.Equal) {
		return nil
	}
	return fmt.Errorf("kms: audit replica: %s already holds a different batch (node id shared, or the node's log forked): %w", key, err)
}

func auditCheckpointKey(prefix string, size uint64) string {
	return fmt.Sprintf("%scheckpoints/%020d", prefix, size)
}

// checkpointText returns a checkpoint note's signed text (origin, size and
// root lines, and any extension lines) and its size, without checking the
// signatures: it is what makes two notes of the same size the same
// checkpoint, whatever their (randomized ML-DSA, or added witness)
// signature lines.
func checkpointText(note []byte) ([]byte, uint64, error) {
	i := bytes.Index(note, []byte("\n\n"))
	if i < 0 {
		return nil, 0, errors.New("not a signed note")
	}
	text := note[:i+1]
	lines := strings.SplitN(string(text), "\n", 4)
	if len(lines) < 4 || lines[0] == "" {
		return nil, 0, errors.New("not a checkpoint")
	}
	size, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil || strconv.FormatUint(size, 10) != lines[1] {
		return nil, 0, fmt.Errorf("bad size %q", lines[1])
	}
	return text, size, nil
}

// recentCheckpoint is one entry of the audit/<node>/recent bookkeeping: a
// published checkpoint size, and whether it is kept for good (the first of
// its power-of-two range).
type recentCheckpoint struct {
	size uint64
	keep bool
}

// The recent value: the byte 1, then per checkpoint, oldest first, its size
// (8 bytes big-endian) and 1 if it is kept for good, else 0.
const recentVersion = 1

func encodeRecent(rs []recentCheckpoint) []byte {
	v := []byte{recentVersion}
	for _, r := range rs {
		v = binary.BigEndian.AppendUint64(v, r.size)
		k := byte(0)
		if r.keep {
			k = 1
		}
		v = append(v, k)
	}
	return v
}

func decodeRecent(v []byte) ([]recentCheckpoint, error) {
	if len(v) == 0 || v[0] != recentVersion || (len(v)-1)%9 != 0 {
		return nil, errors.New("unknown format")
	}
	var out []recentCheckpoint
	for v = v[1:]; len(v) > 0; v = v[9:] {
		if v[8] > 1 {
			return nil, errors.New("bad flag")
		}
		r := recentCheckpoint{size: binary.BigEndian.Uint64(v), keep: v[8] == 1}
		if len(out) > 0 && r.size <= out[len(out)-1].size {
			return nil, errors.New("sizes out of order")
		}
		out = append(out, r)
	}
	return out, nil
}

// PublishCheckpoint implements audit.Replicator. It refuses a checkpoint
// smaller than the last one it published for the node (the node's log was
// rolled back) and one whose size is already retained with another text
// (a fork); both errors wrap ErrAuditReplicaFork and store.ErrConflict.
// Publishing again a checkpoint of the same text is a success.
//
// Then it writes the note as the node's latest, and prunes the history:
// the checkpoint is kept for good if it is the first in a new power-of-two
// range of sizes, and otherwise deleted once AuditRecentCheckpoints newer
// ones are published. The bookkeeping is the small audit/<node>/recent
// value, so that no call lists the history. If that value is lost or
// damaged it starts afresh: the checkpoints it listed stay in the store
// (never deleted), which costs space, not safety.
func (r StoreAuditReplica) PublishCheckpoint(ctx context.Context, node string, note []byte) error {
	prefix, err := auditPrefix(node)
	if err != nil {
		return err
	}
	text, size, err := checkpointText(note)
	if err != nil {
		return fmt.Errorf("kms: audit replica: node %q: checkpoint: %w", node, err)
	}
	var (
		recent []recentCheckpoint
		recRev int64
	)
	switch kv, err := r.Store.Get(ctx, prefix+"recent"); {
	case err == nil:
		recRev = kv.Revision
		if recent, err = decodeRecent(kv.Value); err != nil {
			recent = nil // start the bookkeeping afresh (see above)
		}
	case !errors.Is(err, store.ErrNotFound):
		return err
	}
	var last *recentCheckpoint
	if len(recent) > 0 {
		last = &recent[len(recent)-1]
	}
	if last != nil && size < last.size {
		return fmt.Errorf("kms: audit replica: node %q: checkpoint of size %d after one of size %d (the node's log was rolled back): %w (%w)",
			node, size, last.size, ErrAuditReplicaFork, store.ErrConflict)
	}

	key := auditCheckpointKey(prefix, size)
	if _, err := r.Store.CompareAndSwap(ctx, key, 0, note); err != nil {
		if !errors.Is(err, store.ErrConflict) {
			return err
		}
		kv, gerr := r.Store.Get(ctx, key)
		if gerr != nil {
			return fmt.Errorf("kms: audit replica: %s exists and cannot be read: %w", key, gerr)
		}
		if old, _, perr := checkpointText(kv.Value); perr != nil || !bytes.Equal(old, text) {
			return fmt.Errorf("kms: audit replica: %s already holds another checkpoint of size %d (the node signed two histories, or two nodes share its id): %w (%w)",
				key, size, ErrAuditReplicaFork, err)
		}
	}
	if _, err := r.Store.Put(ctx, prefix+"checkpoint", note); err != nil {
		return err
	}
	if last != nil && last.size == size {
		return nil // the same checkpoint again: the bookkeeping has it
	}

	keep := last == nil || bits.Len64(size) > bits.Len64(last.size)
	recent = append(recent, recentCheckpoint{size: size, keep: keep})
	var drop []recentCheckpoint
	if n := len(recent) - AuditRecentCheckpoints; n > 0 {
		drop, recent = recent[:n], recent[n:]
	}
	// Delete before the bookkeeping forgets them: a crash in between
	// leaves them listed, and the next call deletes again (not found is
	// fine then).
	for _, d := range drop {
		if d.keep {
			continue
		}
		if err := r.Store.Delete(ctx, auditCheckpointKey(prefix, d.size), 0); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
	}
	if _, err := r.Store.CompareAndSwap(ctx, prefix+"recent", recRev, encodeRecent(recent)); err != nil {
		return fmt.Errorf("kms: audit replica: node %q: checkpoint bookkeeping: %w", node, err)
	}
	return nil
}

// ReplicatedAuditCheckpoint returns the node's latest replicated checkpoint
// note (store.ErrNotFound if none), to be read with audit.ParseCheckpoint.
func ReplicatedAuditCheckpoint(ctx context.Context, st store.Store, node string) ([]byte, error) {
	prefix, err := auditPrefix(node)
	if err != nil {
		return nil, err
	}
	kv, err := st.Get(ctx, prefix+"checkpoint")
	if err != nil {
		return nil, err
	}
	return kv.Value, nil
}

// ReadReplicatedAudit returns the canonical bytes of every entry of node
// replicated to st, in index order from 0. It checks that the batches are
// contiguous (the error names the first gap or overlap) and that each entry
// parses and carries its index and node. Errors are an *AuditReplicaError.
func ReadReplicatedAudit(ctx context.Context, st store.Store, node string) ([][]byte, error) {
	prefix, err := auditPrefix(node)
	if err != nil {
		return nil, err
	}
	kvs, err := st.List(ctx, prefix+"entries/")
	if err != nil {
		return nil, err
	}
	return readAuditBatches(node, prefix+"entries/", kvs)
}

// readAuditBatches decodes a node's batch keys (in key order, under
// entriesPrefix) into its entries from 0, checking them.
func readAuditBatches(node, entriesPrefix string, kvs []store.KV) ([][]byte, error) {
	var out [][]byte
	for _, kv := range kvs {
		next := uint64(len(out))
		name := strings.TrimPrefix(kv.Key, entriesPrefix)
		first, err := strconv.ParseUint(name, 10, 64)
		if err != nil || len(name) != 20 {
			return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaGap, Index: -1, Detail: fmt.Sprintf("unexpected key %q", kv.Key)}
		}
		switch {
		case first > next:
			return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaGap, Index: int64(next), // #nosec G115 -- an entry count
				Detail: fmt.Sprintf("gap: entries %d..%d missing (next batch starts at %d)", next, first-1, first)}
		case first < next:
			return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaGap, Index: int64(first), // #nosec G115 -- below an entry count
				Detail: fmt.Sprintf("batch %q overlaps entries already read (up to %d)", kv.Key, next-1)}
		}
		entries, err := decodeAuditBatch(kv.Value)
		if err != nil {
			return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaEntry, Index: int64(first), // #nosec G115 -- checked against the entry count
				Detail: fmt.Sprintf("batch %q: %v", kv.Key, err)}
		}
		for k, raw := range entries {
			i := first + uint64(k) // #nosec G115 -- k ≥ 0
			e, err := audit.ParseEntry(raw)
			if err != nil {
				return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaEntry, Index: int64(i), // #nosec G115 -- an entry count
					Detail: fmt.Sprintf("entry %d does not parse: %v", i, err)}
			}
			if e.Index != i || e.Node != node {
				return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaEntry, Index: int64(i), // #nosec G115 -- an entry count
					Detail: fmt.Sprintf("entry at index %d says index %d, node %q", i, e.Index, e.Node)}
			}
		}
		out = append(out, entries...)
	}
	return out, nil
}

// AuditReplicaReport is what [VerifyReplicatedAudit] found for a node whose
// replicated log verified.
type AuditReplicaReport struct {
	Node        string
	Origin      string // the checkpoints' origin line
	Entries     uint64 // replicated entries, contiguous from 0
	Checkpoints int    // distinct checkpoint sizes verified: the latest and the retained ones
	LatestSize  uint64 // the latest checkpoint's size (≤ Entries)
	LatestRoot  []byte
	Root        []byte // the Merkle root of all Entries
	// Verifier is the index, in the verifiers passed in, of the key that
	// verified the node's checkpoints.
	Verifier int

	leaves [][]byte // leaf hashes, for RootAt
}

// RootAt returns the Merkle root of the node's first size replicated
// entries (size ≤ Entries), to compare with another copy of its log.
func (r *AuditReplicaReport) RootAt(size uint64) ([]byte, error) {
	if size > uint64(len(r.leaves)) {
		return nil, fmt.Errorf("kms: audit replica: node %q: root at %d of %d entries", r.Node, size, len(r.leaves))
	}
	rng := auditRangeFactory.NewEmptyRange(0)
	for _, h := range r.leaves[:size] {
		if err := rng.Append(h, nil); err != nil {
			return nil, err
		}
	}
	return auditRangeRoot(rng)
}

var auditRangeFactory = compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}

func auditRangeRoot(r *compact.Range) ([]byte, error) {
	if r.End() == 0 {
		return rfc6962.DefaultHasher.EmptyRoot(), nil
	}
	return r.GetRootHash(nil)
}

// AuditReplicaResult is one node's outcome in [VerifyReplicatedAudits]:
// Report if it verified, else Err (an *AuditReplicaError).
type AuditReplicaResult struct {
	Node   string
	Report *AuditReplicaReport
	Err    error
}

// VerifyReplicatedAudit verifies one node's replicated log, read in one
// List (one consistent snapshot on etcd). See [VerifyReplicatedAudits] for
// what is checked. It returns an *AuditReplicaError if the log does not
// verify, with Kind ErrAuditReplicaGap if nothing at all was replicated
// for the node.
func VerifyReplicatedAudit(ctx context.Context, st store.Store, node string, verifiers []*audit.Verifier) (*AuditReplicaReport, error) {
	prefix, err := auditPrefix(node)
	if err != nil {
		return nil, err
	}
	kvs, err := st.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	if len(kvs) == 0 {
		return nil, &AuditReplicaError{Node: node, Kind: ErrAuditReplicaGap, Index: -1, Detail: "nothing replicated for this node"}
	}
	return verifyAuditNode(node, prefix, kvs, verifiers)
}

// VerifyReplicatedAudits verifies the replicated log of every node found
// under audit/ in st, read in one List (one consistent snapshot on etcd;
// it holds every node's log in memory). For each node, in node order:
//
//   - its batches are contiguous from entry 0 and each entry parses,
//     canonically, with its index and the node's id;
//   - its latest checkpoint verifies with one of verifiers (the report
//     names which), and every retained checkpoint with that same key and
//     the same origin;
//   - the Merkle root of the entries at each checkpoint's size is that
//     checkpoint's root, so the node never signed a history other than the
//     replicated one (no fork), and no checkpoint covers more entries than
//     are replicated.
//
// A node that fails does not stop the others: its result carries the
// error. The error returned is only for the store.
func VerifyReplicatedAudits(ctx context.Context, st store.Store, verifiers []*audit.Verifier) ([]AuditReplicaResult, error) {
	kvs, err := st.List(ctx, "audit/")
	if err != nil {
		return nil, err
	}
	var out []AuditReplicaResult
	for len(kvs) > 0 {
		node, _, _ := strings.Cut(strings.TrimPrefix(kvs[0].Key, "audit/"), "/")
		prefix := "audit/" + node + "/"
		n := 1
		for n < len(kvs) && strings.HasPrefix(kvs[n].Key, prefix) {
			n++
		}
		res := AuditReplicaResult{Node: node}
		if _, err := auditPrefix(node); err != nil || !strings.HasPrefix(kvs[0].Key, prefix) {
			res.Err = &AuditReplicaError{Node: node, Kind: ErrAuditReplicaGap, Index: -1, Detail: fmt.Sprintf("unexpected key %q", kvs[0].Key)}
		} else {
			res.Report, res.Err = verifyAuditNode(node, prefix, kvs[:n], verifiers)
		}
		out = append(out, res)
		kvs = kvs[n:]
	}
	return out, nil
}

// verifyAuditNode verifies the keys under one node's prefix (key order).
func verifyAuditNode(node, prefix string, kvs []store.KV, verifiers []*audit.Verifier) (*AuditReplicaReport, error) {
	bad := func(kind error, index int64, size uint64, format string, a ...any) error {
		return &AuditReplicaError{Node: node, Kind: kind, Index: index, Size: size, Detail: fmt.Sprintf(format, a...)}
	}
	var (
		batches []store.KV
		latest  []byte
		history []store.KV
	)
	for _, kv := range kvs {
		rest := strings.TrimPrefix(kv.Key, prefix)
		switch {
		case strings.HasPrefix(rest, "entries/"):
			batches = append(batches, kv)
		case strings.HasPrefix(rest, "checkpoints/"):
			history = append(history, kv)
		case rest == "checkpoint":
			latest = kv.Value
		case rest == "recent":
		default:
			return nil, bad(ErrAuditReplicaGap, -1, 0, "unexpected key %q", kv.Key)
		}
	}
	entries, err := readAuditBatches(node, prefix+"entries/", batches)
	if err != nil {
		return nil, err
	}
	n := uint64(len(entries))
	if latest == nil {
		return nil, bad(ErrAuditReplicaCheckpoint, -1, 0, "no checkpoint published for its %d replicated entries", n)
	}

	// The latest checkpoint picks the node's key.
	vi, cp := -1, audit.Checkpoint{}
	var errs []string
	for i, v := range verifiers {
		c, err := audit.ParseCheckpoint(latest, v)
		if err == nil {
			vi, cp = i, c
			break
		}
		errs = append(errs, fmt.Sprintf("key %s: %v", v.Name(), err))
	}
	if vi < 0 {
		return nil, bad(ErrAuditReplicaCheckpoint, -1, 0, "signature: the latest checkpoint verifies with none of the %d trusted keys (%s)", len(verifiers), strings.Join(errs, "; "))
	}
	v := verifiers[vi]
	if cp.Size > n {
		return nil, bad(ErrAuditReplicaFork, int64(n), cp.Size, // #nosec G115 -- an entry count
			"the latest checkpoint covers %d entries but only %d are replicated: entries were removed", cp.Size, n)
	}
	cps := []audit.Checkpoint{cp}
	for _, kv := range history {
		name := strings.TrimPrefix(kv.Key, prefix+"checkpoints/")
		size, err := strconv.ParseUint(name, 10, 64)
		if err != nil || len(name) != 20 {
			return nil, bad(ErrAuditReplicaGap, -1, 0, "unexpected key %q", kv.Key)
		}
		c, err := audit.ParseCheckpoint(kv.Value, v)
		switch {
		case err != nil:
			return nil, bad(ErrAuditReplicaCheckpoint, -1, size, "signature: retained checkpoint of size %d: %v", size, err)
		case c.Size != size:
			return nil, bad(ErrAuditReplicaCheckpoint, -1, size, "retained checkpoint under size %d says size %d", size, c.Size)
		case c.Origin != cp.Origin:
			return nil, bad(ErrAuditReplicaFork, -1, size, "retained checkpoint of size %d has origin %q, the latest %q", size, c.Origin, cp.Origin)
		case size > n:
			// A retained checkpoint may be newer than the latest: the
			// replica writes it first, and the node may stop in between.
			return nil, bad(ErrAuditReplicaFork, int64(n), size, // #nosec G115 -- an entry count
				"retained checkpoint covers %d entries but only %d are replicated: entries were removed", size, n)
		}
		cps = append(cps, c)
	}
	slices.SortStableFunc(cps, func(a, b audit.Checkpoint) int { return cmp.Compare(a.Size, b.Size) })

	// One pass over the entries, comparing roots at each checkpoint size.
	rng := auditRangeFactory.NewEmptyRange(0)
	leaves := make([][]byte, 0, n)
	type mismatch struct {
		cp   audit.Checkpoint
		got  []byte
		from uint64 // the size of the last checkpoint that matched
	}
	var (
		first     *mismatch
		lastMatch uint64
		laterOK   uint64 // a checkpoint after the first mismatch that matches
	)
	k := 0
	for i := uint64(0); ; i++ {
		for ; k < len(cps) && cps[k].Size == i; k++ {
			root, err := auditRangeRoot(rng)
			if err != nil {
				return nil, err
			}
			switch {
			case !bytes.Equal(root, cps[k].Root) && first == nil:
				first = &mismatch{cp: cps[k], got: root, from: lastMatch}
			case bytes.Equal(root, cps[k].Root) && first == nil:
				lastMatch = i
			case bytes.Equal(root, cps[k].Root) && laterOK == 0:
				laterOK = i
			}
		}
		if i == n {
			break
		}
		h := audit.LeafHash(entries[i])
		leaves = append(leaves, h)
		if err := rng.Append(h, nil); err != nil {
			return nil, err
		}
	}
	if first != nil {
		b64 := base64.StdEncoding.EncodeToString
		why := fmt.Sprintf("an entry in [%d, %d) was altered, or the node signed another history", first.from, first.cp.Size)
		if laterOK > 0 {
			why = fmt.Sprintf("the checkpoint at size %d matches the entries: the node signed two histories", laterOK)
		}
		return nil, bad(ErrAuditReplicaFork, int64(first.from), first.cp.Size, // #nosec G115 -- a checkpoint size ≤ entry count
			"fork at size %d: root %s in the checkpoint, %s recomputed from the replicated entries (%s)",
			first.cp.Size, b64(first.cp.Root), b64(first.got), why)
	}
	root, err := auditRangeRoot(rng)
	if err != nil {
		return nil, err
	}
	distinct := 0
	for i := range cps {
		if i == 0 || cps[i].Size != cps[i-1].Size {
			distinct++
		}
	}
	return &AuditReplicaReport{Node: node, Origin: cp.Origin, Entries: n, Checkpoints: distinct, LatestSize: cp.Size,
		LatestRoot: cp.Root, Root: root, Verifier: vi, leaves: leaves}, nil
}
