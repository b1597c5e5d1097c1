package audit

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Source is what a sink reads: the local log, or anything that serves its
// records in index order. *Log satisfies it. Sinks only ever read, so a
// slow or unreachable receiver never holds up an append.
type Source interface {
	// Size is the number of entries in the log.
	Size() uint64
	// Read returns up to max records starting at index from.
	Read(ctx context.Context, from uint64, max int) ([]Record, error)
	// Wait returns when Size() > size or ctx ends.
	Wait(ctx context.Context, size uint64) error
}

// ErrSpool marks a spool (sink cursor) file that does not parse.
var ErrSpool = errors.New("audit: bad spool file")

// spoolMagic starts every spool file; the version follows it.
const spoolMagic = "coffre-audit-spool v1"

// Spool is a sink's durable cursor: the index of the next entry to deliver
// and, for file sinks, the size of the output file once that entry's
// predecessors were written. It is persisted in one small file (written to
// a temporary file, fsynced, renamed over the old one, directory fsynced,
// mode 0600) only once delivery up to that point is known to be complete,
// so a restarted sink resumes exactly there.
//
// A Spool is safe for concurrent use.
type Spool struct {
	path string

	mu     sync.Mutex
	next   uint64
	offset int64
}

// OpenSpool opens (or starts at zero) the spool called name in dir. name is
// a plain file name (no separators); ".spool" is appended.
func OpenSpool(dir, name string) (*Spool, error) {
	if name == "" || strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return nil, fmt.Errorf("audit: spool name %q: must be a plain file name", name)
	}
	if dir == "" {
		return nil, errors.New("audit: spool dir is empty")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: spool dir: %w", err)
	}
	s := &Spool{path: filepath.Join(dir, name+".spool")}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("audit: spool: %w", err)
	}
	s.next, s.offset, err = parseSpool(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, s.path)
	}
	return s, nil
}

// Path is the spool file's path.
func (s *Spool) Path() string { return s.path }

// Next is the index of the next entry to deliver.
func (s *Spool) Next() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next
}

// Offset is the output size recorded with Next (file sinks; 0 otherwise).
func (s *Spool) Offset() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.offset
}

// Commit durably records that every entry before next was delivered and,
// for file sinks, that the output was offset bytes long at that point. A
// cursor never moves backwards.
func (s *Spool) Commit(next uint64, offset int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if next < s.next {
		return fmt.Errorf("audit: spool cursor moving back from %d to %d", s.next, next)
	}
	if next == s.next && offset == s.offset {
		return nil
	}
	if err := writeFileSync(s.path, formatSpool(next, offset)); err != nil {
		return fmt.Errorf("audit: spool: %w", err)
	}
	s.next, s.offset = next, offset
	return nil
}

func formatSpool(next uint64, offset int64) []byte {
	return fmt.Appendf(nil, "%s next=%d offset=%d\n", spoolMagic, next, offset)
}

// parseSpool parses exactly what formatSpool writes.
func parseSpool(b []byte) (next uint64, offset int64, err error) {
	line, ok := strings.CutSuffix(string(b), "\n")
	if !ok || strings.Contains(line, "\n") {
		return 0, 0, fmt.Errorf("%w: not one line", ErrSpool)
	}
	rest, ok := strings.CutPrefix(line, spoolMagic+" ")
	if !ok {
		return 0, 0, fmt.Errorf("%w: unknown header", ErrSpool)
	}
	f := strings.Split(rest, " ")
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("%w: want 2 fields, got %d", ErrSpool, len(f))
	}
	n, ok := strings.CutPrefix(f[0], "next=")
	if !ok || !canonicalDecimal(n) {
		return 0, 0, fmt.Errorf("%w: bad next", ErrSpool)
	}
	o, ok := strings.CutPrefix(f[1], "offset=")
	if !ok || !canonicalDecimal(o) {
		return 0, 0, fmt.Errorf("%w: bad offset", ErrSpool)
	}
	if next, err = strconv.ParseUint(n, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%w: next: %v", ErrSpool, err)
	}
	if offset, err = strconv.ParseInt(o, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%w: offset: %v", ErrSpool, err)
	}
	return next, offset, nil
}

// canonicalDecimal accepts 0 or digits without a leading zero.
func canonicalDecimal(s string) bool {
	if s == "" || len(s) > 20 || (len(s) > 1 && s[0] == '0') {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// writeFileSync replaces path with data: temporary file, fsync, rename,
// fsync of the directory, mode 0600.
func writeFileSync(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if err = f.Chmod(0o600); err != nil {
		_ = f.Close()
		return err
	}
	if _, err = f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err = f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir) // #nosec G304 -- the sink's own configured directory
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }()
	return d.Sync()
}

// backoff is capped exponential backoff with full jitter.
type backoff struct {
	min, max time.Duration
	cur      time.Duration
}

func (b *backoff) next() time.Duration {
	if b.cur < b.min {
		b.cur = b.min
	} else {
		b.cur *= 2
		if b.cur > b.max || b.cur <= 0 {
			b.cur = b.max
		}
	}
	// Half fixed, half random: never a thundering herd, never zero.
	half := b.cur / 2
	return half + rand.N(half+1) // #nosec G404 -- jitter, not a secret
}

func (b *backoff) reset() { b.cur = 0 }

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// recordEntry returns the parsed entry and canonical bytes of r, whichever
// of them the source filled in.
func recordEntry(r Record) (*Entry, []byte, error) {
	e, raw := r.Entry, r.Raw
	var err error
	switch {
	case e == nil && len(raw) == 0:
		return nil, nil, fmt.Errorf("%w: record %d is empty", ErrEntry, r.Index)
	case e == nil:
		if e, err = ParseEntry(raw); err != nil {
			return nil, nil, fmt.Errorf("record %d: %w", r.Index, err)
		}
	case len(raw) == 0:
		if raw, err = e.MarshalCanonical(); err != nil {
			return nil, nil, fmt.Errorf("record %d: %w", r.Index, err)
		}
	}
	return e, raw, nil
}

// sinkRunner is the delivery loop every sink shares: one Run at a time;
// sessions one after another until ctx ends; after a failed session, a
// backoff (reset when the session moved the cursor), the error kept for
// Status; a session that returns nil ended on purpose and the next starts
// at once; a permanentError ends Run.
type sinkRunner struct {
	running atomic.Bool
	errMu   sync.Mutex
	lastErr error
}

func (r *sinkRunner) run(ctx context.Context, spool *Spool, bo backoff, session func(context.Context) error, failed func()) error {
	if !r.running.CompareAndSwap(false, true) {
		return ErrSinkRunning
	}
	defer r.running.Store(false)
	for {
		before := spool.Next()
		err := session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var perm *permanentError
		if errors.As(err, &perm) {
			return perm.err
		}
		if err == nil {
			bo.reset()
			continue
		}
		if failed != nil {
			failed()
		}
		r.errMu.Lock()
		r.lastErr = err
		r.errMu.Unlock()
		if spool.Next() > before {
			bo.reset()
		}
		if sleepCtx(ctx, bo.next()) != nil {
			return ctx.Err()
		}
	}
}

// lastError is the last session failure, nil if none yet.
func (r *sinkRunner) lastError() error {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	return r.lastErr
}
