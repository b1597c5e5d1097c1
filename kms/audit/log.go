package audit

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Sentinel errors. Callers match them with errors.Is.
var (
	// ErrUnavailable: the log cannot be written (disk full, read-only,
	// I/O error). The entry was not acknowledged; the operation that needed
	// it must be refused. The log retries by itself and resumes when
	// writing works again; Healthy reports the condition meanwhile.
	ErrUnavailable = errors.New("audit: log unavailable")
	// ErrClosed: the log has been closed.
	ErrClosed = errors.New("audit: log closed")
	// ErrTampered: Open found a log that does not match its own latest
	// checkpoint (rolled back, edited, entries deleted or reordered, or the
	// checkpoint forged). Open changes nothing in that case; run VerifyDir
	// to locate the damage.
	ErrTampered = errors.New("audit: log fails its checkpoint")
)

// File names inside Options.Dir.
const (
	entriesFile      = "entries"
	checkpointsFile  = "checkpoints"
	cosignaturesFile = "cosignatures"
	lockFile         = "lock"
)

// Options configure [Open].
type Options struct {
	Dir    string // the log's directory, created 0700 if absent
	Node   string // this Coffre node's id, written into every entry
	Origin string // the checkpoint origin line, e.g. "coffre.example/node-1"
	Signer *Signer
	// CheckpointInterval: a checkpoint is published at least this often
	// while the log grows (default 1s).
	CheckpointInterval time.Duration
	// CheckpointEvery: a checkpoint is also published every this many
	// entries (default 10000).
	CheckpointEvery uint64
	Logger          *slog.Logger // default slog.Default()
	Now             func() time.Time
	// Replicator, if set, receives every entry before its Append returns:
	// a batch is acknowledged only once it is written and fsynced locally
	// AND replicated, so that it survives the loss of this node. If
	// replication fails the batch's callers get an error wrapping
	// ErrUnavailable (their entries are durable locally but must be
	// treated as not logged), later appends fail fast until a background
	// retry replicates the pending entries, and Healthy reports the
	// condition meanwhile. Each checkpoint is also published through it,
	// once its entries are replicated; a publishing failure is only
	// logged. Entries already in the log when it is opened count as
	// replicated. Nil: no replication.
	Replicator Replicator
	// Preallocate is how far ahead of its records the entries file is
	// extended with zeros, and synced, in the background (default 4 MiB;
	// negative: never). Appends that land in that space need only
	// fdatasync, not a metadata commit: this is what keeps the fsync of
	// group commit, and so the latency of every audited call, short. The
	// space counts as used on disk: a full disk is noticed that much
	// later, and the log stays writable until it is used.
	Preallocate int64
	// Witnesses are the second parties whose cosignatures AddCosignature
	// stores (at most maxWitnesses, distinct names). A line by anyone
	// else, or one that does not verify, is refused: a certificate of the
	// auditor role must not be able to fill the log's disk or a
	// checkpoint's cosignature slots. None: AddCosignature is refused.
	Witnesses []*Verifier
}

// maxWitnesses bounds Options.Witnesses.
const maxWitnesses = 16

// defaultPreallocate is Options.Preallocate's default; extendStep is the
// most the extender adds at once.
const (
	defaultPreallocate = 4 << 20
	extendStep         = 1 << 20
)

// Record is one entry as stored: its index, canonical bytes and parsed form.
type Record struct {
	Index uint64
	Raw   []byte // canonical bytes, what the Merkle tree hashes
	Entry *Entry
}

// Stats are counters for metrics and tests.
type Stats struct {
	Entries uint64 // entries in the log
	Batches uint64 // group commits that succeeded
	Fsyncs  uint64 // fsync calls on the entries file, including failed ones
	// Flush is how long group commits waited for their write and
	// fdatasync: the disk's share of every audited call's latency.
	Flush FlushHistogram
}

// FlushBuckets are the upper bounds of [FlushHistogram]'s buckets.
var FlushBuckets = [...]time.Duration{
	50 * time.Microsecond, 100 * time.Microsecond, 150 * time.Microsecond, 200 * time.Microsecond,
	300 * time.Microsecond, 500 * time.Microsecond, 750 * time.Microsecond, time.Millisecond,
	1500 * time.Microsecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 100 * time.Millisecond, time.Second,
}

// FlushHistogram counts group-commit flushes by duration: Counts[i] those
// that took at most FlushBuckets[i] (and more than the bound before it),
// the last count those slower than every bound.
type FlushHistogram struct {
	Counts [len(FlushBuckets) + 1]uint64
	Sum    time.Duration
}

// Quantile returns the upper bound of the bucket holding quantile q (0 <
// q ≤ 1) of the flushes, 0 if there were none and -1 if it is past the
// last bound.
func (h FlushHistogram) Quantile(q float64) time.Duration {
	var total uint64
	for _, c := range h.Counts {
		total += c
	}
	if total == 0 {
		return 0
	}
	need := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i, c := range h.Counts {
		if seen += c; seen >= need {
			if i < len(FlushBuckets) {
				return FlushBuckets[i]
			}
			break
		}
	}
	return -1
}

// flushHist is FlushHistogram's concurrent form, kept by the committer.
type flushHist struct {
	counts [len(FlushBuckets) + 1]atomic.Uint64
	sum    atomic.Int64
}

func (h *flushHist) observe(d time.Duration) {
	i := 0
	for i < len(FlushBuckets) && d > FlushBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

func (h *flushHist) snapshot() FlushHistogram {
	var out FlushHistogram
	for i := range h.counts {
		out.Counts[i] = h.counts[i].Load()
	}
	out.Sum = time.Duration(h.sum.Load())
	return out
}

type appendReq struct {
	e   Entry
	raw []byte // canonical encoding with Index 0, made by the caller
}

// appendBatch is the appends that one commit writes and syncs together.
// The committer sets err and then closes done, which releases every
// caller at once.
type appendBatch struct {
	reqs []*appendReq
	err  error
	done chan struct{}
}

// indexPrefix is how every canonical entry with Index 0 begins; the
// committer splices the real index in (see appendEntryRecord), so that the
// JSON encoding runs in the callers' goroutines, in parallel.
var indexPrefix = fmt.Appendf(nil, `{"v":%d,"index":0`, EntryVersion)

// appendEntryRecord appends the record of raw (a canonical entry with
// Index 0) re-encoded with the given index, and returns the new buffer and
// the record's payload.
func appendEntryRecord(buf, raw []byte, index uint64) ([]byte, []byte) {
	digits := strconv.AppendUint(make([]byte, 0, 20), index, 10)
	rest := raw[len(indexPrefix):]
	n := len(indexPrefix) - 1 + len(digits) + len(rest)
	buf = binary.BigEndian.AppendUint32(buf, uint32(n)) // #nosec G115 -- bounded by MaxEntrySize
	start := len(buf)
	buf = append(buf, indexPrefix[:len(indexPrefix)-1]...)
	buf = append(buf, digits...)
	buf = append(buf, rest...)
	return buf, buf[start:]
}

// Log is one node's append-only audit log. Its methods are safe for
// concurrent use.
type Log struct {
	opts     Options
	log      *slog.Logger
	verifier *Verifier
	lock     *os.File
	rf       *os.File // read handle on the entries file
	cpf      *os.File // checkpoints file (cpMu)
	cof      *os.File // cosignatures file (coMu)

	// openEntries opens the entries file for writing. Tests replace it to
	// simulate an unwritable log (see failWritesForTest).
	openEntries func() (*os.File, error)

	mu      sync.RWMutex
	wf      *os.File // write handle, used by the committer and the probe
	tree    *tree
	offsets []int64 // offsets[i]: where record i starts
	end     int64   // end of the durable records
	// alloc is how much of the entries file is allocated and durable
	// (its synced size): writes below it need only fdatasync. extMu
	// orders the extender's zero-filling with writes beyond alloc.
	alloc     int64
	extMu     sync.Mutex
	extendSig chan struct{}
	grown     chan struct{}
	failed    error // non-nil: ErrUnavailable wrapping the cause
	// probing: a probe runs. It is set and cleared together with failed,
	// under mu, so that a failure is never left without a probe.
	probing bool
	// unhealthy mirrors failed, or else replFailed, for reading without
	// mu (noteHealthLocked); nil when both are nil.
	unhealthy atomic.Pointer[error]
	latest    Checkpoint
	cpErr     error
	recovered int64
	torn      *tornError // found by Open

	qmu    sync.Mutex
	queue  *appendBatch // the next batch, nil if empty
	closed bool
	qsig   chan struct{}

	cpMu      sync.Mutex
	cpEnd     int64
	coMu      sync.Mutex
	coEnd     int64               // end of the last whole cosignatures record (coMu)
	cosigs    map[uint64][][]byte // cosignature lines by checkpoint size (coMu)
	cpTrigger chan struct{}

	batches, fsyncs atomic.Uint64
	flush           flushHist

	// Replication (Options.Replicator). rmu guards pending, unread and replicated
	// and is held across Replicate calls; replFailed and replProbing are
	// guarded by mu.
	rmu         sync.Mutex
	pending     [][]byte // canonical bytes of the entries from replicated+unread on
	unread      uint64   // the catch-up's backlog: entries from replicated on, read from the file as they are replicated
	replicated  uint64   // entries below this index are replicated
	needCatchUp bool     // a ReplicatedSizer's answer is still awaited (rmu)
	replFailed  error    // non-nil: ErrUnavailable wrapping the replication error
	replProbing bool     // a replication probe runs (mu, like replFailed)
	cpRemote    uint64   // size of the latest checkpoint published remotely (cpMu)
	cpRemoteSet bool

	stopCommit chan struct{}
	stop       chan struct{}
	commitDone chan struct{}
	wg         sync.WaitGroup
	closeOnce  sync.Once
	closeErr   error
}

// Open creates or opens the log in opts.Dir. It scans the entries file,
// reports and truncates a torn tail (see [Log.Recovered]), rebuilds the
// Merkle tree, and checks that the latest stored checkpoint verifies and
// matches the rebuilt tree at its size; if not, the log was rolled back or
// edited and Open fails.
func Open(opts Options) (*Log, error) {
	switch {
	case opts.Dir == "":
		return nil, errors.New("audit: Options.Dir is empty")
	case opts.Node == "":
		return nil, errors.New("audit: Options.Node is empty")
	case !validOrigin(opts.Origin):
		return nil, fmt.Errorf("audit: Options.Origin %q is empty or has a newline", opts.Origin)
	case opts.Signer == nil:
		return nil, errors.New("audit: Options.Signer is nil")
	case len(opts.Witnesses) > maxWitnesses:
		return nil, fmt.Errorf("audit: %d witnesses, more than %d", len(opts.Witnesses), maxWitnesses)
	}
	for i, w := range opts.Witnesses {
		switch {
		case w == nil:
			return nil, fmt.Errorf("audit: Options.Witnesses[%d] is nil", i)
		case w.name == opts.Signer.Name():
			return nil, fmt.Errorf("audit: witness %q has the log's own key name", w.name)
		case slices.ContainsFunc(opts.Witnesses[:i], func(o *Verifier) bool { return o.name == w.name }):
			return nil, fmt.Errorf("audit: two witnesses named %q", w.name)
		}
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = time.Second
	}
	if opts.CheckpointEvery == 0 {
		opts.CheckpointEvery = 10000
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Preallocate == 0 {
		opts.Preallocate = defaultPreallocate
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := &Log{
		opts:       opts,
		log:        opts.Logger.With("component", "audit", "dir", opts.Dir),
		verifier:   opts.Signer.Verifier(),
		tree:       newTree(),
		grown:      make(chan struct{}),
		qsig:       make(chan struct{}, 1),
		cpTrigger:  make(chan struct{}, 1),
		extendSig:  make(chan struct{}, 1),
		stopCommit: make(chan struct{}),
		stop:       make(chan struct{}),
		commitDone: make(chan struct{}),
	}
	path := filepath.Join(opts.Dir, entriesFile)
	l.openEntries = func() (*os.File, error) { return os.OpenFile(path, os.O_RDWR, 0) } // #nosec G304 -- path from configuration
	ok := false
	defer func() {
		if !ok {
			_ = l.closeFiles()
		}
	}()
	var err error
	if l.lock, err = lockDir(filepath.Join(opts.Dir, lockFile)); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(opts.Dir); err == nil && fi.Mode().Perm()&0o022 != 0 {
		l.log.Warn("audit log directory is writable by group or others", "mode", fi.Mode().Perm().String())
	}
	if l.wf, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600); err != nil { // #nosec G304 -- path from configuration
		return nil, fmt.Errorf("audit: %w", err)
	}
	if l.rf, err = os.Open(path); err != nil { // #nosec G304 -- path from configuration
		return nil, fmt.Errorf("audit: %w", err)
	}
	if err := l.loadEntries(); err != nil {
		return nil, err
	}
	l.replicated = l.tree.size()
	if _, sizer := opts.Replicator.(ReplicatedSizer); sizer {
		// Unknown until the replica says (catchUp, below): nothing counts
		// as replicated, so no checkpoint is published ahead of it.
		l.replicated, l.needCatchUp = 0, true
	}
	cpPath := filepath.Join(opts.Dir, checkpointsFile)
	if l.cpf, err = os.OpenFile(cpPath, os.O_RDWR|os.O_CREATE, 0o600); err != nil { // #nosec G304 -- path from configuration
		return nil, fmt.Errorf("audit: %w", err)
	}
	if l.cof, err = os.OpenFile(filepath.Join(opts.Dir, cosignaturesFile), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if err := syncLogDir(opts.Dir); err != nil { // the files just created, if any
		return nil, fmt.Errorf("audit: %w", err)
	}
	if err := l.loadCheckpoints(); err != nil {
		return nil, err
	}
	if err := l.cutTornTail(); err != nil {
		return nil, err
	}
	// Whatever size the file has now is durable once synced: the records
	// and any zeros allocated before.
	if err := l.wf.Sync(); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if fi, err := l.wf.Stat(); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	} else {
		l.alloc = fi.Size()
	}
	if l.cpEnd, err = l.repairRecords(l.cpf, checkpointsFile); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if l.coEnd, err = l.repairRecords(l.cof, cosignaturesFile); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if err := l.loadCosignatures(); err != nil {
		return nil, err
	}
	if l.latest.Note == nil {
		if err := l.publish(); err != nil {
			return nil, fmt.Errorf("audit: first checkpoint: %w", err)
		}
	}
	if l.needCatchUp {
		l.rmu.Lock()
		err := l.catchUp()
		if err == nil {
			err = l.replicatePending()
		}
		l.rmu.Unlock()
		if err != nil {
			// Appends fail fast until the probe has caught up.
			l.failReplication(err)
		}
	}
	ok = true
	l.wg.Add(2)
	go l.checkpointer()
	go l.extender()
	go l.committer()
	l.wantExtent()
	return l, nil
}

// loadEntries scans the entries file and rebuilds the tree from the whole
// entries. A torn tail is only noted (l.torn): it is cut once the stored
// checkpoint has been checked, so that a log that fails the check is left
// as it was found.
func (l *Log) loadEntries() error {
	if _, err := l.rf.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	_, end, err := scanEntries(l.rf, func(i uint64, off int64, raw []byte, _ *Entry) error {
		l.offsets = append(l.offsets, off)
		l.tree.appendLeaf(LeafHash(raw))
		return nil
	})
	if te, torn := isTorn(err); torn {
		l.torn = te
		end = te.Offset
	} else if err != nil {
		var ie *indexError
		if errors.As(err, &ie) {
			return fmt.Errorf("%w: entries file edited: %v (deleted or reordered entries)", ErrTampered, ie)
		}
		return fmt.Errorf("audit: reading entries: %w", err)
	}
	l.end = end
	return nil
}

// cutTornTail reports a torn tail, keeps its bytes in a side file and
// truncates the entries file to the last whole entry.
func (l *Log) cutTornTail() error {
	te := l.torn
	if te == nil {
		return nil
	}
	fi, err := l.wf.Stat()
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	saved, dropped, err := l.saveTorn(te.Offset, fi.Size()-te.Offset)
	if err != nil {
		return fmt.Errorf("audit: saving torn tail: %w", err)
	}
	l.log.Warn("audit log: torn tail truncated",
		"offset", te.Offset, "bytes_dropped", dropped, "entries_kept", l.tree.size(), "reason", te.Reason, "saved_to", saved)
	if err := l.wf.Truncate(te.Offset); err != nil {
		return fmt.Errorf("audit: truncating torn tail: %w", err)
	}
	if err := l.wf.Sync(); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	l.recovered = dropped
	return nil
}

// repairRecords truncates a torn record at the end of a checkpoints or
// cosignatures file (written when the node stopped, never acknowledged).
func (l *Log) repairRecords(f *os.File, what string) (int64, error) {
	end, err := scanRecords(io.NewSectionReader(f, 0, 1<<62), maxNoteSize, func(int64, []byte) error { return nil })
	te, torn := isTorn(err)
	if !torn {
		return end, err
	}
	l.log.Warn("audit log: torn record truncated", "file", what, "offset", te.Offset, "reason", te.Reason)
	if err := f.Truncate(te.Offset); err != nil {
		return 0, err
	}
	return end, f.Sync()
}

// saveTorn copies the bytes about to be truncated to a side file, so that
// recovery destroys nothing.
// It returns the side file and how many bytes it kept: zeros after the
// torn record are space allocated ahead, not data, and are not counted.
func (l *Log) saveTorn(off, n int64) (string, int64, error) {
	b := make([]byte, n)
	if _, err := l.rf.ReadAt(b, off); err != nil && err != io.EOF {
		return "", 0, err
	}
	b = bytes.TrimRight(b, "\x00")
	name := filepath.Join(l.opts.Dir, fmt.Sprintf("entries.torn-%d-%d", off, l.opts.Now().UnixNano()))
	if err := os.WriteFile(name, b, 0o600); err != nil {
		return "", 0, err
	}
	return name, int64(len(b)), syncLogDir(l.opts.Dir)
}

// loadCheckpoints finds the latest stored checkpoint and checks it against
// the rebuilt tree.
func (l *Log) loadCheckpoints() error {
	var last []byte
	count := 0
	_, err := scanRecords(io.NewSectionReader(l.cpf, 0, 1<<62), maxNoteSize, func(_ int64, rec []byte) error {
		last = append(last[:0], rec...)
		count++
		return nil
	})
	if _, torn := isTorn(err); err != nil && !torn {
		return fmt.Errorf("audit: reading checkpoints: %w", err)
	}
	if count == 0 {
		if l.tree.size() > 0 {
			return fmt.Errorf("%w: the log has %d entries but no checkpoint (checkpoints file removed?)", ErrTampered, l.tree.size())
		}
		return nil
	}
	cp, err := ParseCheckpoint(last, l.verifier)
	if err != nil {
		return fmt.Errorf("%w: latest checkpoint: %w", ErrTampered, err)
	}
	if cp.Origin != l.opts.Origin {
		return fmt.Errorf("audit: latest checkpoint has origin %q, configured %q", cp.Origin, l.opts.Origin)
	}
	if cp.Size > l.tree.size() {
		if l.torn != nil {
			return fmt.Errorf("%w: latest checkpoint covers %d entries but only %d whole entries precede a bad record at offset %d (%s): the log was damaged or edited; nothing was changed",
				ErrTampered, cp.Size, l.tree.size(), l.torn.Offset, l.torn.Reason)
		}
		return fmt.Errorf("%w: latest checkpoint covers %d entries but the log has %d: the log was rolled back or truncated", ErrTampered, cp.Size, l.tree.size())
	}
	root, err := l.tree.root(cp.Size)
	if err != nil {
		return err
	}
	if !bytes.Equal(root, cp.Root) {
		return fmt.Errorf("%w: the first %d entries do not match the latest checkpoint's root: the log was edited", ErrTampered, cp.Size)
	}
	l.latest = cp
	return nil
}

// Append adds e to the log and returns its index once it is durable
// (written and fsynced). It sets e.Version, e.Index and e.Node (and e.Time
// if zero). Concurrent calls share one write and one fsync.
//
// If the log cannot be written the error wraps [ErrUnavailable]. If ctx
// ends first Append returns ctx.Err() and the entry may or may not be
// written later: the caller must treat it as not logged.
func (l *Log) Append(ctx context.Context, e *Entry) (uint64, error) {
	if e == nil {
		return 0, fmt.Errorf("%w: nil entry", ErrEntry)
	}
	req := &appendReq{e: *e}
	if req.e.Time.IsZero() {
		req.e.Time = l.opts.Now()
	}
	req.e.Version, req.e.Index, req.e.Node = EntryVersion, 0, l.opts.Node
	raw, err := req.e.MarshalCanonical()
	if err != nil {
		return 0, err
	}
	if len(raw)+20 > MaxEntrySize {
		return 0, fmt.Errorf("%w: %d bytes, more than %d", ErrEntry, len(raw), MaxEntrySize)
	}
	if !bytes.HasPrefix(raw, indexPrefix) {
		return 0, fmt.Errorf("%w: unexpected canonical encoding", ErrEntry) // EntryVersion changed without this code
	}
	req.raw = raw
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if h := l.unhealthy.Load(); h != nil {
		return 0, *h // refused before queueing; a closed log answers below
	}
	l.qmu.Lock()
	if l.closed {
		l.qmu.Unlock()
		return 0, ErrClosed
	}
	b := l.queue
	if b == nil {
		b = &appendBatch{done: make(chan struct{})}
		l.queue = b
	}
	b.reqs = append(b.reqs, req)
	l.qmu.Unlock()
	select {
	case l.qsig <- struct{}{}:
	default:
	}
	select {
	case <-b.done:
		if b.err != nil {
			return 0, b.err
		}
		e.Version, e.Index, e.Node, e.Time = req.e.Version, req.e.Index, req.e.Node, req.e.Time
		return req.e.Index, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (l *Log) committer() {
	defer close(l.commitDone)
	var buf []byte
	for {
		stopping := false
		select {
		case <-l.qsig:
		case <-l.stopCommit:
			stopping = true
		}
		for {
			l.qmu.Lock()
			batch := l.queue
			l.queue = nil
			l.qmu.Unlock()
			if batch == nil {
				break
			}
			buf, batch.err = l.commit(batch.reqs, buf[:0])
			close(batch.done)
			if !stopping {
				break
			}
		}
		if stopping {
			return
		}
	}
}

// commit writes and fsyncs one batch (and replicates it, with a
// Replicator) and returns the buffer for reuse and the error to give its
// callers.
func (l *Log) commit(batch []*appendReq, buf []byte) ([]byte, error) {
	if h := l.unhealthy.Load(); h != nil {
		return buf, *h
	}
	l.mu.RLock()
	base, off, wf := l.tree.size(), l.end, l.wf
	l.mu.RUnlock()
	leaves := make([][]byte, len(batch))
	starts := make([]int64, len(batch))
	var payloads [][]byte
	if l.opts.Replicator != nil {
		payloads = make([][]byte, len(batch))
	}
	for k, r := range batch {
		r.e.Index = base + uint64(k)
		starts[k] = off + int64(len(buf))
		var payload []byte
		buf, payload = appendEntryRecord(buf, r.raw, r.e.Index)
		leaves[k] = LeafHash(payload)
		if payloads != nil {
			payloads[k] = payload // a slice of buf: cloned below once buf stops growing
		}
	}
	t0 := time.Now()
	err := l.write(wf, buf, off)
	if err != nil {
		return buf, l.fail(err)
	}
	l.flush.observe(time.Since(t0))
	l.batches.Add(1)
	l.mu.Lock()
	before := l.tree.size()
	for _, h := range leaves {
		l.tree.appendLeaf(h)
	}
	l.offsets = append(l.offsets, starts...)
	l.end = off + int64(len(buf))
	after := l.tree.size()
	close(l.grown)
	l.grown = make(chan struct{})
	l.mu.Unlock()
	var rerr error
	if payloads != nil {
		// Never acknowledge an entry that is not replicated: the batch's
		// entries join the pending ones (contiguous, in order) and all of
		// them are replicated before the callers are released.
		l.rmu.Lock()
		for _, p := range payloads {
			l.pending = append(l.pending, bytes.Clone(p))
		}
		rerr = l.replicatePending()
		l.rmu.Unlock()
		if rerr != nil {
			l.failReplication(rerr)
		}
	}
	if before/l.opts.CheckpointEvery != after/l.opts.CheckpointEvery {
		select {
		case l.cpTrigger <- struct{}{}:
		default:
		}
	}
	return buf, rerr
}

// write writes one batch at off and makes it durable. Inside the space
// allocated ahead only the data needs flushing (fdatasync); beyond it the
// file grows, and a full fsync commits its new size too.
func (l *Log) write(wf *os.File, buf []byte, off int64) error {
	need := off + int64(len(buf))
	l.mu.RLock()
	alloc := l.alloc
	l.mu.RUnlock()
	if need <= alloc {
		if _, err := wf.WriteAt(buf, off); err != nil {
			return err
		}
		l.fsyncs.Add(1)
		if err := datasync(wf); err != nil {
			return err
		}
		if need+l.opts.Preallocate/2 > alloc {
			l.wantExtent()
		}
		return nil
	}
	l.extMu.Lock()
	defer l.extMu.Unlock()
	if _, err := wf.WriteAt(buf, off); err != nil {
		return err
	}
	l.fsyncs.Add(1)
	// fdatasync also commits the new size, which reading the data back
	// needs (fdatasync(2)); only the times are left to the journal.
	if err := datasync(wf); err != nil {
		return err
	}
	l.mu.Lock()
	if l.wf == wf && need > l.alloc {
		l.alloc = need
	}
	l.mu.Unlock()
	l.wantExtent()
	return nil
}

func (l *Log) wantExtent() {
	if l.opts.Preallocate <= 0 {
		return
	}
	select {
	case l.extendSig <- struct{}{}:
	default:
	}
}

// extender keeps Options.Preallocate bytes of zeros, synced, ahead of the
// records, off the append path. It writes only at or beyond alloc, holding
// extMu, and appends write beyond alloc only holding extMu, so zeros never
// land on a record.
func (l *Log) extender() {
	defer l.wg.Done()
	zeros := make([]byte, 256<<10)
	var failedAt time.Time
	for {
		select {
		case <-l.stop:
			return
		case <-l.extendSig:
		}
		if !failedAt.IsZero() && time.Since(failedAt) < time.Second {
			continue // a full disk: do not write and give back on every append
		}
		l.extMu.Lock()
		l.mu.RLock()
		wf, end, alloc, failed := l.wf, l.end, l.alloc, l.failed
		l.mu.RUnlock()
		if failed != nil || end+l.opts.Preallocate/2 <= alloc {
			l.extMu.Unlock()
			continue
		}
		// Grow in steps of at most 1 MiB: each step's sync is short, so
		// it delays the appends' own flushes little.
		target := min(end+l.opts.Preallocate, alloc+extendStep)
		var err error
		for off := alloc; off < target && err == nil; off += int64(len(zeros)) {
			_, err = wf.WriteAt(zeros[:min(int64(len(zeros)), target-off)], off)
		}
		if err == nil {
			err = wf.Sync()
		}
		if err == nil {
			l.mu.Lock()
			if l.wf == wf && target > l.alloc {
				l.alloc = target
			}
			l.mu.Unlock()
			l.wantExtent() // until Preallocate is ahead
			failedAt = time.Time{}
		} else {
			failedAt = time.Now()
			// No room, or an I/O error: give back what was written (no
			// record lies beyond alloc: extMu is held), so that a full
			// disk shows at the next append, which then grows the file
			// itself and fails closed if it cannot.
			if terr := wf.Truncate(alloc); terr != nil {
				err = errors.Join(err, terr)
			}
			l.log.Debug("audit log: allocating ahead failed", "err", err)
		}
		l.extMu.Unlock()
	}
}

// fail puts the log in the failed state and starts the probe unless one
// runs. The probe clears probing in the same locked section that clears
// failed: a failure that follows the recovery, even before the probe has
// returned, finds probing false and starts a new probe.
func (l *Log) fail(cause error) error {
	err := fmt.Errorf("%w: %w", ErrUnavailable, cause)
	l.mu.Lock()
	l.failed = err
	l.noteHealthLocked()
	start := !l.probing
	l.probing = true
	if start {
		l.wg.Add(1)
	}
	l.mu.Unlock()
	l.log.Error("audit log unwritable: refusing appends until it recovers", "err", cause)
	if start {
		go l.probe()
	}
	return err
}

// probeInterval is how often a failed log retries writing.
var probeInterval = 500 * time.Millisecond

// probe retries until the entries file can be reopened, truncated to the
// last durable record (dropping any partial batch) and synced; the log
// then resumes.
func (l *Log) probe() {
	defer l.wg.Done()
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		l.extMu.Lock()
		l.mu.RLock()
		end := l.end
		l.mu.RUnlock()
		f, err := l.openEntries()
		if err == nil {
			err = f.Truncate(end)
			if err == nil {
				l.fsyncs.Add(1)
				err = f.Sync()
			}
			if err != nil {
				_ = f.Close()
			}
		}
		if err != nil {
			l.extMu.Unlock()
			l.log.Debug("audit log still unwritable", "err", err)
			continue
		}
		l.mu.Lock()
		old := l.wf
		l.wf = f
		l.alloc = end
		l.failed = nil
		l.probing = false // from here a new failure needs a new probe
		l.noteHealthLocked()
		l.mu.Unlock()
		l.extMu.Unlock()
		l.wantExtent()
		_ = old.Close()
		l.log.Info("audit log writable again; appends resume", "size", l.Size())
		return
	}
}

// Healthy returns nil if the log accepts appends, else an error wrapping
// [ErrUnavailable] (with the cause, e.g. an *os.PathError), or [ErrClosed].
func (l *Log) Healthy() error {
	if h := l.unhealthy.Load(); h != nil {
		return *h
	}
	l.qmu.Lock()
	defer l.qmu.Unlock()
	if l.closed {
		return ErrClosed
	}
	return nil
}

// noteHealthLocked publishes failed (or else replFailed) for the lock-free
// checks of Append and Healthy: 64 callers taking l.mu's read lock on
// every append queued behind each commit's write lock. The caller holds
// l.mu for writing.
func (l *Log) noteHealthLocked() {
	err := l.failed
	if err == nil {
		err = l.replFailed
	}
	if err == nil {
		l.unhealthy.Store(nil)
		return
	}
	l.unhealthy.Store(&err)
}

// CheckpointHealth returns the last error writing a checkpoint, nil once a
// checkpoint is written again. Appends do not depend on it.
func (l *Log) CheckpointHealth() error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.cpErr
}

// Recovered returns how many bytes of torn tail Open truncated (0 if none), not
// counting the zeros of space allocated ahead after them.
// The bytes are kept in a file "entries.torn-<offset>-<time>" beside the log.
func (l *Log) Recovered() (truncatedBytes int64) { return l.recovered }

// Stats returns counters for metrics.
func (l *Log) Stats() Stats {
	return Stats{Entries: l.Size(), Batches: l.batches.Load(), Fsyncs: l.fsyncs.Load(), Flush: l.flush.snapshot()}
}

// Size returns the number of durable entries.
func (l *Log) Size() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.tree.size()
}

// Wait returns nil once Size() > size, or ctx's error, or ErrClosed.
func (l *Log) Wait(ctx context.Context, size uint64) error {
	for {
		l.mu.RLock()
		n, ch := l.tree.size(), l.grown
		l.mu.RUnlock()
		if n > size {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-l.stop:
			return ErrClosed
		}
	}
}

// Read returns up to max durable records from index from (none if from ≥
// Size()).
func (l *Log) Read(ctx context.Context, from uint64, max int) ([]Record, error) {
	if max <= 0 {
		return nil, fmt.Errorf("audit: Read: max %d", max)
	}
	l.mu.RLock()
	size := l.tree.size()
	if from >= size {
		l.mu.RUnlock()
		return nil, ctx.Err()
	}
	n := min(uint64(max), size-from)
	start, end := l.offsets[from], l.end
	if from+n < size {
		end = l.offsets[from+n]
	}
	l.mu.RUnlock()
	buf := make([]byte, end-start)
	if _, err := l.rf.ReadAt(buf, start); err != nil {
		return nil, fmt.Errorf("audit: read: %w", err)
	}
	out := make([]Record, 0, n)
	_, err := scanRecords(bytes.NewReader(buf), MaxEntrySize, func(_ int64, raw []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		raw = bytes.Clone(raw)
		e, err := ParseEntry(raw)
		if err != nil {
			return err
		}
		idx := from + uint64(len(out))
		if e.Index != idx {
			return fmt.Errorf("%w: record %d has index %d", ErrEntry, idx, e.Index)
		}
		out = append(out, Record{Index: idx, Raw: raw, Entry: e})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("audit: read: entries file changed under the log: %w", err)
	}
	return out, nil
}

// InclusionProof returns the proof that entry index is in the tree of the
// given size.
func (l *Log) InclusionProof(index, size uint64) ([][]byte, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.tree.inclusion(index, size)
}

// ConsistencyProof returns the proof that the tree of size to extends the
// tree of size from.
func (l *Log) ConsistencyProof(from, to uint64) ([][]byte, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.tree.consistency(from, to)
}

// Root returns the root hash of the tree of the given size.
func (l *Log) Root(size uint64) ([]byte, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.tree.root(size)
}

// Checkpoint returns the latest published checkpoint. It is at most
// CheckpointInterval behind the log.
func (l *Log) Checkpoint() (Checkpoint, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.latest.Note == nil {
		return Checkpoint{}, errors.New("audit: no checkpoint yet")
	}
	c := l.latest
	c.Root, c.Note = bytes.Clone(c.Root), bytes.Clone(c.Note)
	return c, nil
}

// PublishCheckpoint publishes a checkpoint of the current size now (if the
// log grew since the latest) and returns the latest checkpoint.
func (l *Log) PublishCheckpoint() (Checkpoint, error) {
	if err := l.publish(); err != nil {
		return Checkpoint{}, err
	}
	return l.Checkpoint()
}

// Verifier returns the verifier of the log's checkpoints.
func (l *Log) Verifier() *Verifier { return l.verifier }

func (l *Log) checkpointer() {
	defer l.wg.Done()
	t := time.NewTicker(l.opts.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		case <-l.cpTrigger:
		}
		if err := l.publish(); err != nil {
			l.log.Error("audit log: cannot publish checkpoint", "err", err)
		}
	}
}

// publish signs and stores a checkpoint of the current size if it differs
// from the latest one.
func (l *Log) publish() error {
	l.cpMu.Lock()
	defer l.cpMu.Unlock()
	l.mu.RLock()
	size := l.tree.size()
	if l.latest.Note != nil && l.latest.Size == size {
		l.mu.RUnlock()
		l.publishRemote()
		return nil
	}
	root, err := l.tree.root(size)
	l.mu.RUnlock()
	if err != nil {
		return err
	}
	cp, err := signCheckpoint(l.opts.Signer, l.opts.Origin, size, root)
	if err != nil {
		return err
	}
	rec := appendRecord(nil, cp.Note)
	_, err = l.cpf.WriteAt(rec, l.cpEnd)
	if err == nil {
		err = l.cpf.Sync()
	}
	l.mu.Lock()
	if err != nil {
		l.cpErr = fmt.Errorf("%w: checkpoint: %w", ErrUnavailable, err)
		err = l.cpErr
		l.mu.Unlock()
		return err
	}
	l.cpEnd += int64(len(rec))
	l.cpErr = nil
	l.latest = cp
	l.mu.Unlock()
	l.publishRemote() // after the checkpoint is stored locally
	return nil
}

// AddCosignature stores a witness's cosignature of one of this log's
// checkpoints. note is the checkpoint note with the witness's signature
// lines appended (next.Note followed by the output of [Cosign]). It must
// carry this log's valid signatures and match the log at its size, and
// every other signature line must be one of a witness in
// Options.Witnesses that verifies over the checkpoint's text, with each
// witness's Ed25519 and ML-DSA-65 halves together; anything else is
// refused (ErrCheckpoint) and nothing is stored.
func (l *Log) AddCosignature(note []byte) error {
	if len(l.opts.Witnesses) == 0 {
		return fmt.Errorf("%w: this log has no witness configured (audit.witnesses): cosignatures are not taken", ErrCheckpoint)
	}
	cp, err := ParseCheckpoint(note, l.verifier)
	if err != nil {
		return err
	}
	if cp.Origin != l.opts.Origin {
		return fmt.Errorf("%w: origin %q is not this log's", ErrCheckpoint, cp.Origin)
	}
	root, err := l.Root(cp.Size)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	if !bytes.Equal(root, cp.Root) {
		return fmt.Errorf("%w: root does not match this log at size %d", ErrCheckpoint, cp.Size)
	}
	text, sigs, err := splitNote(note)
	if err != nil {
		return err
	}
	var cosigs []noteSig
	for _, s := range sigs {
		if s.name == l.verifier.name && (s.id == l.verifier.edID || s.id == l.verifier.mlID) {
			continue
		}
		cosigs = append(cosigs, s)
	}
	if len(cosigs) == 0 {
		return fmt.Errorf("%w: no cosignature in the note", ErrCheckpoint)
	}
	if err := verifyCosignatures(text, cosigs, l.opts.Witnesses); err != nil {
		return err
	}
	l.coMu.Lock()
	defer l.coMu.Unlock()
	have := l.cosigs[cp.Size]
	var lines []byte
	var added [][]byte
	for _, s := range cosigs {
		line := []byte(s.line)
		if slices.ContainsFunc(have, func(h []byte) bool { return bytes.Equal(h, line) }) ||
			slices.ContainsFunc(added, func(h []byte) bool { return bytes.Equal(h, line) }) {
			continue // already stored: a witness cosigning the same checkpoint again
		}
		lines = append(lines, line...)
		added = append(added, line)
	}
	if len(lines) == 0 {
		return nil
	}
	if len(have)+len(added) > maxCosignatures {
		return fmt.Errorf("%w: more than %d cosignature lines for size %d", ErrCheckpoint, maxCosignatures, cp.Size)
	}
	rec := appendRecord(nil, append(strconv.AppendUint(nil, cp.Size, 10), append([]byte{'\n'}, lines...)...))
	// Written at the end of the last whole record, which moves only once
	// the record is synced: what a short write (a full disk) leaves is cut,
	// or else overwritten by the next record, never left in front of it.
	_, err = l.cof.WriteAt(rec, l.coEnd)
	if err == nil {
		err = l.cof.Sync()
	}
	if err != nil {
		if terr := l.cof.Truncate(l.coEnd); terr != nil {
			err = errors.Join(err, terr)
		}
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	l.coEnd += int64(len(rec))
	l.cosigs[cp.Size] = append(have, added...)
	return nil
}

// maxCosignatures bounds the stored cosignature lines of one checkpoint.
const maxCosignatures = 64

func (l *Log) loadCosignatures() error {
	l.cosigs = map[uint64][][]byte{}
	_, err := scanRecords(io.NewSectionReader(l.cof, 0, 1<<62), maxNoteSize, func(off int64, rec []byte) error {
		sz, lines, ok := bytes.Cut(rec, []byte("\n"))
		size, err := strconv.ParseUint(string(sz), 10, 64)
		if !ok || err != nil {
			return fmt.Errorf("audit: cosignatures: bad record at offset %d", off)
		}
		for line := range bytes.Lines(lines) {
			l.cosigs[size] = append(l.cosigs[size], bytes.Clone(line))
		}
		return nil
	})
	return err
}

// Cosignatures returns the stored cosignature lines (each "— name sig\n")
// for the checkpoint of the given size, in the order they were added.
func (l *Log) Cosignatures(size uint64) ([][]byte, error) {
	l.coMu.Lock()
	defer l.coMu.Unlock()
	out := make([][]byte, 0, len(l.cosigs[size]))
	for _, line := range l.cosigs[size] {
		out = append(out, bytes.Clone(line))
	}
	return out, nil
}

// Close commits the queued appends, publishes a final checkpoint and stops
// the log's goroutines. Appends after Close fail with [ErrClosed].
func (l *Log) Close() error {
	l.closeOnce.Do(func() {
		l.qmu.Lock()
		l.closed = true
		l.qmu.Unlock()
		close(l.stopCommit)
		<-l.commitDone
		close(l.stop)
		l.wg.Wait()
		l.mu.RLock()
		failed := l.failed
		l.mu.RUnlock()
		if failed == nil {
			l.closeErr = l.publish()
			// A closed log holds its records only: the space allocated
			// ahead is given back (a crash leaves it, and Open reads it
			// as padding).
			l.mu.RLock()
			wf, end := l.wf, l.end
			l.mu.RUnlock()
			if err := wf.Truncate(end); err == nil {
				l.closeErr = errors.Join(l.closeErr, wf.Sync())
			} else {
				l.closeErr = errors.Join(l.closeErr, err)
			}
		}
		l.closeErr = errors.Join(l.closeErr, l.closeFiles())
	})
	return l.closeErr
}

func (l *Log) closeFiles() error {
	var errs []error
	for _, f := range []*os.File{l.wf, l.rf, l.cpf, l.cof, l.lock} {
		if f != nil {
			if err := f.Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func syncLogDir(dir string) error {
	d, err := os.Open(dir) // #nosec G304 -- the log's own directory
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
