package audit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// JSONLConfig configures a [JSONLSink].
type JSONLConfig struct {
	// Path is the output file; it is created with mode 0600.
	Path string
	// SpoolDir holds the cursor file. Default: the directory of Path.
	SpoolDir string
	// Name names the cursor file: SpoolDir/Name.spool. Default "jsonl".
	Name string
	// OCSF writes the OCSF "API Activity" view of each entry (see
	// MarshalOCSF) instead of the canonical entry.
	OCSF bool
	// MinBackoff and MaxBackoff bound the retry delay after an I/O error.
	// Defaults 100ms and 30s.
	MinBackoff, MaxBackoff time.Duration
}

// JSONLStatus is a snapshot of a [JSONLSink].
type JSONLStatus struct {
	Cursor    uint64 // next entry not yet durably written
	Lag       uint64 // Size() - Cursor
	LastError error  // last I/O failure, nil if none yet
}

// JSONLSink appends each entry of the log as one line to a file.
//
// Lines are written a batch at a time, the file is fsynced, and only then
// is the cursor committed with the file's length. On start, anything past
// that length (a batch whose commit did not happen) is cut off and written
// again, so the file holds every entry exactly once, in index order. If the
// file is shorter than the recorded length (rotated or truncated by an
// operator), the sink first commits the cursor with the file's actual
// length, then appends to it as it is: a batch written after that and not
// committed is cut at the next start like any other.
type JSONLSink struct {
	src   Source
	cfg   JSONLConfig
	spool *Spool

	runner sinkRunner
}

// NewJSONLSink validates cfg and opens the sink's spool.
func NewJSONLSink(src Source, cfg JSONLConfig) (*JSONLSink, error) {
	if src == nil {
		return nil, errors.New("audit: jsonl: nil source")
	}
	if cfg.Path == "" {
		return nil, errors.New("audit: jsonl: Path is empty")
	}
	if cfg.SpoolDir == "" {
		cfg.SpoolDir = filepath.Dir(cfg.Path)
	}
	if cfg.Name == "" {
		cfg.Name = "jsonl"
	}
	if cfg.MinBackoff < 0 || cfg.MaxBackoff < 0 {
		return nil, errors.New("audit: jsonl: negative backoff")
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		return nil, fmt.Errorf("audit: jsonl: MaxBackoff %v below MinBackoff %v", cfg.MaxBackoff, cfg.MinBackoff)
	}
	sp, err := OpenSpool(cfg.SpoolDir, cfg.Name)
	if err != nil {
		return nil, err
	}
	return &JSONLSink{src: src, cfg: cfg, spool: sp}, nil
}

// Status returns a snapshot of the sink.
func (s *JSONLSink) Status() JSONLStatus {
	st := JSONLStatus{Cursor: s.spool.Next()}
	if size := s.src.Size(); size > st.Cursor {
		st.Lag = size - st.Cursor
	}
	st.LastError = s.runner.lastError()
	return st
}

// Run writes entries from the cursor onward until ctx ends, retrying with
// backoff after I/O errors. It returns ctx.Err() when ctx ends, or an error
// retrying cannot fix (the source serving a bad record).
func (s *JSONLSink) Run(ctx context.Context) error {
	return s.runner.run(ctx, s.spool, backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}, s.session, nil)
}

func (s *JSONLSink) session(ctx context.Context) error {
	f, err := os.OpenFile(s.cfg.Path, os.O_WRONLY|os.O_CREATE, 0o600) // #nosec G304 -- configured output path
	if err != nil {
		return fmt.Errorf("audit: jsonl: %w", err)
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("audit: jsonl: %w", err)
	}
	off := fi.Size()
	next := s.spool.Next()
	switch committed := s.spool.Offset(); {
	case off > committed:
		// A batch written after the last commit: cut it, it is rewritten.
		if err := f.Truncate(committed); err != nil {
			return fmt.Errorf("audit: jsonl: %w", err)
		}
		off = committed
	case off < committed:
		// Rotated or truncated: record where this file ends before writing
		// to it, or a batch written and not committed would lie below the
		// old length, out of reach of the cut above, and be written twice.
		if err := s.spool.Commit(next, off); err != nil {
			return fmt.Errorf("audit: jsonl: %w", err)
		}
	}
	var buf []byte
	for {
		if next >= s.src.Size() {
			if err := s.src.Wait(ctx, next); err != nil {
				if errors.Is(err, ErrClosed) {
					return &permanentError{err}
				}
				return err
			}
			continue
		}
		recs, err := s.src.Read(ctx, next, 1024)
		if err != nil {
			return fmt.Errorf("audit: jsonl: reading the log: %w", err)
		}
		buf = buf[:0]
		for _, r := range recs {
			if r.Index != next {
				return &permanentError{fmt.Errorf("audit: jsonl: log returned index %d, want %d", r.Index, next)}
			}
			e, raw, err := recordEntry(r)
			if err != nil {
				return &permanentError{err}
			}
			if s.cfg.OCSF {
				if raw, err = MarshalOCSF(e, r.Index); err != nil {
					return &permanentError{err}
				}
			}
			buf = append(buf, raw...)
			buf = append(buf, '\n')
			next++
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			return fmt.Errorf("audit: jsonl: %w", err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("audit: jsonl: %w", err)
		}
		off += int64(len(buf))
		if err := s.spool.Commit(next, off); err != nil {
			return fmt.Errorf("audit: jsonl: %w", err)
		}
	}
}
