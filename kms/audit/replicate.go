package audit

import (
	"context"
	"fmt"
	"time"
)

// Replicator copies a node's audit entries and checkpoints off the node, so
// that an acknowledged entry survives the permanent loss of the node that
// wrote it (see [Options.Replicator]).
type Replicator interface {
	// Replicate durably stores entries, the canonical bytes of this node's
	// entries first..first+len(entries)-1, and returns nil only once they
	// are stored. The log calls it with contiguous ranges, in order: first
	// is always the index after the last range it stored. A call that
	// failed (its outcome unknown) is retried with the same range, so a
	// Replicator that finds that range already stored, with the same
	// bytes, reports success.
	Replicate(ctx context.Context, node string, first uint64, entries [][]byte) error
	// PublishCheckpoint stores note, the node's latest signed checkpoint
	// (as [ParseCheckpoint] reads it), replacing the previous one. It is
	// only called with checkpoints whose entries were all replicated.
	PublishCheckpoint(ctx context.Context, node string, note []byte) error
}

// ReplicatedSizer is implemented by Replicators that can tell how many of a
// node's entries they hold (contiguous from index 0). With one, [Open]
// catches up: entries the node wrote before it stopped but had not
// replicated (their callers were never answered) are replicated before any
// new append is acknowledged; without it, entries already in the log when
// it is opened count as replicated.
type ReplicatedSizer interface {
	ReplicatedSize(ctx context.Context, node string) (uint64, error)
}

// ErrReplicaAhead means the replica holds more of this node's entries than
// its local log: the local log lost acknowledged entries (restored from an
// old copy, say). Appending would fork the node's history, so the log
// refuses appends until an operator decides (see docs/deployment.md).
// Meanwhile Append and Healthy return an error that wraps both
// [ErrUnavailable], like every refusal to append, and ErrReplicaAhead
// (itself wrapping [ErrTampered]).
var ErrReplicaAhead = fmt.Errorf("%w: the replica holds more of this node's entries than its local log", ErrTampered)

// catchUp learns how much of the local log the replica holds and makes the
// rest pending. The caller holds l.rmu; l.needCatchUp says it is still to
// do.
func (l *Log) catchUp() error {
	rs := l.opts.Replicator.(ReplicatedSizer)
	ctx, cancel := context.WithTimeout(context.Background(), replicationTimeout)
	n, err := rs.ReplicatedSize(ctx, l.opts.Node)
	cancel()
	if err != nil {
		return fmt.Errorf("%w: replication: how much of the log the replica holds: %w", ErrUnavailable, err)
	}
	size := l.Size()
	switch {
	case n > size:
		return fmt.Errorf("%w: %w (%d entries there, %d here)", ErrUnavailable, ErrReplicaAhead, n, size)
	case n < size:
		recs, err := l.Read(context.Background(), n, int(size-n)) // #nosec G115 -- bounded by the log's size
		if err != nil {
			return fmt.Errorf("%w: replication: catching up: %w", ErrUnavailable, err)
		}
		l.pending = make([][]byte, 0, len(recs))
		for _, r := range recs {
			l.pending = append(l.pending, r.Raw)
		}
		l.log.Warn("audit log: entries written but not replicated before the last stop: replicating them first",
			"from", n, "to", size-1)
	}
	l.replicated = n
	l.needCatchUp = false
	return nil
}

// replicationTimeout bounds one Replicate or PublishCheckpoint call.
var replicationTimeout = 5 * time.Second

// maxReplicateBytes bounds the canonical bytes passed to one Replicate
// call (a single larger entry is passed alone), so that one call fits in
// one store value.
const maxReplicateBytes = 512 << 10

// replicatePending replicates every pending entry, in chunks, and drops
// each chunk from l.pending once stored. It returns the first error (the
// entries not yet stored stay pending). The caller holds l.rmu.
func (l *Log) replicatePending() error {
	for len(l.pending) > 0 {
		n, size := 0, 0
		for n < len(l.pending) && (n == 0 || size+len(l.pending[n]) <= maxReplicateBytes) {
			size += len(l.pending[n])
			n++
		}
		ctx, cancel := context.WithTimeout(context.Background(), replicationTimeout)
		err := l.opts.Replicator.Replicate(ctx, l.opts.Node, l.replicated, l.pending[:n])
		cancel()
		if err != nil {
			return fmt.Errorf("%w: replication: entries %d..%d: %w", ErrUnavailable, l.replicated, l.replicated+uint64(n)-1, err)
		}
		clear(l.pending[:n])
		l.pending = l.pending[n:]
		l.replicated += uint64(n)
	}
	l.pending = nil
	return nil
}

// failReplication puts the log in the replication-failed state and starts
// the replication probe unless one runs. As with fail and probe, the flag
// is set and cleared together with replFailed, under l.mu, so that a
// failure right after a recovery starts a new probe.
func (l *Log) failReplication(err error) {
	l.mu.Lock()
	l.replFailed = err
	l.noteHealthLocked()
	start := !l.replProbing
	l.replProbing = true
	if start {
		l.wg.Add(1)
	}
	l.mu.Unlock()
	l.log.Error("audit log: replication failed: refusing appends until it recovers", "err", err)
	if start {
		go l.replProbe()
	}
}

// replProbe retries replicating the pending entries every probeInterval;
// once they are all stored the log accepts appends again.
func (l *Log) replProbe() {
	defer l.wg.Done()
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		l.rmu.Lock()
		var err error
		if l.needCatchUp {
			err = l.catchUp()
		}
		if err == nil {
			err = l.replicatePending()
		}
		if err == nil {
			l.mu.Lock()
			l.replFailed = nil
			l.replProbing = false // from here a new failure needs a new probe
			l.noteHealthLocked()
			l.mu.Unlock()
		}
		replicated := l.replicated
		l.rmu.Unlock()
		if err != nil {
			l.log.Debug("audit log: replication still failing", "err", err)
			continue
		}
		l.log.Info("audit log: replication works again; appends resume", "replicated", replicated)
		select { // publish the checkpoint that may have waited for these entries
		case l.cpTrigger <- struct{}{}:
		default:
		}
		return
	}
}

// publishRemote publishes the latest checkpoint through the Replicator if
// it was not yet and all its entries are replicated. A failure is logged:
// the next checkpoint (or the next tick) publishes again. The caller holds
// l.cpMu.
func (l *Log) publishRemote() {
	if l.opts.Replicator == nil {
		return
	}
	l.mu.RLock()
	cp := l.latest
	l.mu.RUnlock()
	if cp.Note == nil || (l.cpRemoteSet && l.cpRemote == cp.Size) {
		return
	}
	l.rmu.Lock()
	replicated := l.replicated
	l.rmu.Unlock()
	if cp.Size > replicated {
		return // its entries are not all off the node yet
	}
	ctx, cancel := context.WithTimeout(context.Background(), replicationTimeout)
	defer cancel()
	if err := l.opts.Replicator.PublishCheckpoint(ctx, l.opts.Node, cp.Note); err != nil {
		l.log.Warn("audit log: cannot publish checkpoint to the replica", "size", cp.Size, "err", err)
		return
	}
	l.cpRemote, l.cpRemoteSet = cp.Size, true
}
