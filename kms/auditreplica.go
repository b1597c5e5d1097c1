package kms

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
)

// StoreAuditReplica replicates a node's audit log to the shared store (for
// example etcd), so that an acknowledged audit entry survives the permanent
// loss of the node that wrote it. Set it as audit.Options.Replicator.
//
// # Layout
//
//   - audit/<node>/entries/<first>: one key per replicated batch, <first>
//     the index of the batch's first entry as 20 decimal digits (so that key
//     order is index order). Written once, create-only.
//   - audit/<node>/checkpoint: the node's latest signed checkpoint note, as
//     audit.ParseCheckpoint reads it, overwritten by each new one.
//
// # Batch value
//
// A batch value is the byte 1 (the format version) followed, for each
// entry in index order, by the entry's length as a 4-byte big-endian
// unsigned integer and then its canonical bytes (what the Merkle tree
// hashes). The number of entries is implied by the value's length.
type StoreAuditReplica struct {
	Store store.Store
}

var _ audit.Replicator = StoreAuditReplica{}

// auditBatchVersion is the first byte of a batch value.
const auditBatchVersion = 1

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
	n := 1
	for _, e := range entries {
		n += 4 + len(e)
	}
	if n > store.MaxValueSize {
		return nil, fmt.Errorf("kms: audit replica: batch of %d entries is %d bytes, the store's limit is %d", len(entries), n, store.MaxValueSize)
	}
	v := make([]byte, 0, n)
	v = append(v, auditBatchVersion)
	for _, e := range entries {
		v = binary.BigEndian.AppendUint32(v, uint32(len(e))) // #nosec G115 -- bounded by store.MaxValueSize above
		v = append(v, e...)
	}
	return v, nil
}

// decodeAuditBatch parses a batch value.
func decodeAuditBatch(v []byte) ([][]byte, error) {
	if len(v) == 0 || v[0] != auditBatchVersion {
		return nil, errors.New("unknown batch format")
	}
	v = v[1:]
	var out [][]byte
	for len(v) > 0 {
		if len(v) < 4 {
			return nil, errors.New("truncated length")
		}
		n := binary.BigEndian.Uint32(v)
		v = v[4:]
		if uint64(n) > uint64(len(v)) {
			return nil, errors.New("truncated entry")
		}
		out = append(out, bytes.Clone(v[:n]))
		v = v[n:]
	}
	if len(out) == 0 {
		return nil, errors.New("empty batch")
	}
	return out, nil
}

// Replicate implements audit.Replicator: it creates the batch's key. If the
// key exists with exactly the bytes it would write (a retry after an
// unknown outcome) that is success; with other bytes it is an error (two
// writers claim the same node id, or the log forked).
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
	if bytes.Equal(kv.Value, v) {
		return nil
	}
	return fmt.Errorf("kms: audit replica: %s already holds a different batch (node id shared, or the node's log forked): %w", key, err)
}

// PublishCheckpoint implements audit.Replicator.
func (r StoreAuditReplica) PublishCheckpoint(ctx context.Context, node string, note []byte) error {
	prefix, err := auditPrefix(node)
	if err != nil {
		return err
	}
	_, err = r.Store.Put(ctx, prefix+"checkpoint", note)
	return err
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
// parses and carries its index and node.
func ReadReplicatedAudit(ctx context.Context, st store.Store, node string) ([][]byte, error) {
	prefix, err := auditPrefix(node)
	if err != nil {
		return nil, err
	}
	kvs, err := st.List(ctx, prefix+"entries/")
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for _, kv := range kvs {
		name := strings.TrimPrefix(kv.Key, prefix+"entries/")
		first, err := strconv.ParseUint(name, 10, 64)
		if err != nil || len(name) != 20 {
			return nil, fmt.Errorf("kms: audit replica: unexpected key %q", kv.Key)
		}
		next := uint64(len(out))
		switch {
		case first > next:
			return nil, fmt.Errorf("kms: audit replica: node %q: gap: entries %d..%d missing (next batch starts at %d)", node, next, first-1, first)
		case first < next:
			return nil, fmt.Errorf("kms: audit replica: node %q: batch %q overlaps entries already read (up to %d)", node, kv.Key, next-1)
		}
		entries, err := decodeAuditBatch(kv.Value)
		if err != nil {
			return nil, fmt.Errorf("kms: audit replica: %s: %w", kv.Key, err)
		}
		for k, raw := range entries {
			e, err := audit.ParseEntry(raw)
			if err != nil {
				return nil, fmt.Errorf("kms: audit replica: %s: entry %d: %w", kv.Key, first+uint64(k), err)
			}
			if e.Index != first+uint64(k) || e.Node != node {
				return nil, fmt.Errorf("kms: audit replica: %s: entry at index %d says index %d, node %q", kv.Key, first+uint64(k), e.Index, e.Node)
			}
		}
		out = append(out, entries...)
	}
	return out, nil
}
