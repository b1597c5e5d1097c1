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
// rest the backlog (l.unread), read from the entries file in chunks as it
// is replicated: a node switched to a shared store with a long log must
// not hold all of it in memory. The caller holds l.rmu; l.needCatchUp says
// it is still to do. No entry is pending then: appends are refused until
// the catch-up is done.
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
		l.log.Warn("audit log: entries written but not replicated before the last stop: replicating them first",
			"from", n, "to", size-1)
	}
	l.replicated, l.unread, l.pending = n, size-n, nil
	l.needCatchUp = false
	return nil
}

// replicationTimeout bounds one Replicate or PublishCheckpoint call;
// a Replicate call is made of attempts of at most replicateAttempt.
var (
	replicationTimeout = 5 * time.Second
	replicateAttempt   = time.Second
)

// replicateRange replicates entries from index first, trying again while
// an attempt runs out of its time and replicationTimeout has not passed. A
// write in flight to an etcd leader that dies waits for its own timeout,
// although the remaining members elect a new leader within about a second:
// a fresh attempt then succeeds, where one long wait would refuse every
// append meanwhile. Retrying the same range is safe: a Replicator reports
// success for a range it already holds (see [Replicator]).
func (l *Log) replicateRange(first uint64, entries [][]byte) error {
	deadline := time.Now().Add(replicationTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), min(time.Until(deadline), replicateAttempt))
		err := l.opts.Replicator.Replicate(ctx, l.opts.Node, first, entries)
		timedOut := ctx.Err() != nil
		cancel()
		if err == nil || !timedOut || !time.Now().Before(deadline) {
			return err
		}
	}
}

// maxReplicateBytes bounds the canonical bytes passed to one Replicate
// call (a single larger entry is passed alone), so that one call fits in
// one store value.
const maxReplicateBytes = 512 << 10

// catchUpChunk is how many backlog entries are read from the entries file
// at a time; tests lower it.
var catchUpChunk uint64 = 1024

// replicatePending replicates the backlog (read from the entries file a
// chunk at a time) and then every pending entry, in calls of at most
// maxReplicateBytes, and drops what is stored. It returns the first error
// (what is not yet stored stays to do). The caller holds l.rmu.
func (l *Log) replicatePending() error {
	for l.unread > 0 {
		recs, err := l.Read(context.Background(), l.replicated, int(min(l.unread, catchUpChunk))) // #nosec G115 -- at most catchUpChunk
		if err == nil && len(recs) == 0 {
			err = fmt.Errorf("entry %d is not in the local log", l.replicated)
		}
		if err != nil {
			return fmt.Errorf("%w: replication: catching up: %w", ErrUnavailable, err)
		}
		chunk := make([][]byte, len(recs))
		for i, r := range recs {
			chunk[i] = r.Raw
		}
		done, err := l.replicateEntries(chunk)
		l.unread -= uint64(done) // #nosec G115 -- done ≤ len(chunk)
		if err != nil {
			return err
		}
	}
	done, err := l.replicateEntries(l.pending)
	clear(l.pending[:done])
	l.pending = l.pending[done:]
	if err != nil {
		return err
	}
	l.pending = nil
	return nil
}

// replicateEntries replicates entries, which start at index l.replicated,
// in calls of at most maxReplicateBytes, advancing l.replicated past each
// stored call. It returns how many entries were stored and the first
// error.
func (l *Log) replicateEntries(entries [][]byte) (int, error) {
	done := 0
	for done < len(entries) {
		n, size := 0, 0
		for done+n < len(entries) && (n == 0 || size+len(entries[done+n]) <= maxReplicateBytes) {
			size += len(entries[done+n])
			n++
		}
		err := l.replicateRange(l.replicated, entries[done:done+n])
		if err != nil {
			return done, fmt.Errorf("%w: replication: entries %d..%d: %w", ErrUnavailable, l.replicated, l.replicated+uint64(n)-1, err)
		}
		done += n
		l.replicated += uint64(n)
	}
	return done, nil
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
