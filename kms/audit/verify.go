package audit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// VerifyError names the first bad entry or checkpoint found by [VerifyDir].
type VerifyError struct {
	// Index is the first bad entry, or -1 if a checkpoint is bad. When an
	// entry was altered without breaking its encoding, only the range
	// between two checkpoints can be named: Index is its first entry and
	// Reason gives the range.
	Index  int64
	Reason string
}

func (e *VerifyError) Error() string {
	if e.Index < 0 {
		return "audit: verify: checkpoint: " + e.Reason
	}
	return fmt.Sprintf("audit: verify: entry %d: %s", e.Index, e.Reason)
}

// Report summarises a log that verified.
type Report struct {
	Origin      string // the checkpoints' origin line
	Entries     uint64
	Checkpoints int
	LastSize    uint64 // size of the latest checkpoint
	LastRoot    []byte // its root
	Root        []byte // root of all the entries (may be ahead of LastSize)

	t *tree // for RootAt
}

// RootAt returns the Merkle root of the log's first size entries (size ≤
// Entries), to compare with another copy of the log, such as the one its
// node replicated.
func (r *Report) RootAt(size uint64) ([]byte, error) {
	if r.t == nil || size > r.Entries {
		return nil, fmt.Errorf("audit: verify: root at %d of %d entries", size, r.Entries)
	}
	return r.t.root(size)
}

// VerifyDir checks a log directory offline, without opening it for
// writing: every entry parses canonically and has index 0, 1, …; every
// stored checkpoint carries valid signatures from v, its root equals the
// root recomputed from the entries at its size, and each is consistent
// with the one before. A torn tail is an error here (Open would repair it).
// The first problem is returned as a *VerifyError.
func VerifyDir(dir string, v *Verifier) (*Report, error) {
	if v == nil {
		return nil, errors.New("audit: verify: no verifier")
	}
	f, err := os.Open(filepath.Join(dir, entriesFile)) // #nosec G304 -- operator-supplied directory
	if err != nil {
		return nil, fmt.Errorf("audit: verify: %w", err)
	}
	defer f.Close()
	t := newTree()
	n, _, err := scanEntries(f, func(_ uint64, _ int64, raw []byte, _ *Entry) error {
		t.appendLeaf(LeafHash(raw))
		return nil
	})
	if err != nil {
		var ie *indexError
		switch te, torn := isTorn(err); {
		case torn:
			return nil, &VerifyError{Index: int64(n), Reason: fmt.Sprintf("bad record at offset %d: %s", te.Offset, te.Reason)} // #nosec G115
		case errors.As(err, &ie):
			return nil, &VerifyError{Index: int64(n), Reason: fmt.Sprintf("has index %d (entries deleted, inserted or reordered)", ie.Index)} // #nosec G115
		default:
			return nil, fmt.Errorf("audit: verify: %w", err)
		}
	}
	cf, err := os.Open(filepath.Join(dir, checkpointsFile)) // #nosec G304 -- operator-supplied directory
	if err != nil {
		return nil, fmt.Errorf("audit: verify: %w", err)
	}
	defer cf.Close()
	rep := &Report{Entries: n, t: t}
	var prev *Checkpoint
	_, err = scanRecords(cf, maxNoteSize, func(off int64, rec []byte) error {
		k := rep.Checkpoints
		bad := func(format string, a ...any) error {
			return &VerifyError{Index: -1, Reason: fmt.Sprintf("#%d (offset %d): ", k, off) + fmt.Sprintf(format, a...)}
		}
		cp, err := ParseCheckpoint(rec, v)
		if err != nil {
			return bad("%v", err)
		}
		if prev != nil && cp.Origin != prev.Origin {
			return bad("origin %q, previously %q", cp.Origin, prev.Origin)
		}
		if cp.Size > n {
			return bad("covers %d entries but the log has %d (rolled back or truncated)", cp.Size, n)
		}
		root, err := t.root(cp.Size)
		if err != nil {
			return bad("%v", err)
		}
		if !bytes.Equal(root, cp.Root) {
			from := uint64(0)
			if prev != nil {
				from = prev.Size
			}
			if from == cp.Size || cp.Size == 0 {
				// Same size as a checkpoint that matched: the root itself is forged.
				return bad("root does not match the entries at size %d", cp.Size)
			}
			return &VerifyError{Index: int64(from), Reason: fmt.Sprintf( // #nosec G115
				"an entry in [%d, %d) was altered: the entries do not match checkpoint #%d (root at size %d)", from, cp.Size, k, cp.Size)}
		}
		if prev != nil {
			if cp.Size < prev.Size {
				return bad("size %d is smaller than the previous checkpoint's %d", cp.Size, prev.Size)
			}
			p, err := t.consistency(prev.Size, cp.Size)
			if err == nil {
				err = VerifyConsistency(prev.Size, cp.Size, p, prev.Root, cp.Root)
			}
			if err != nil {
				return bad("not consistent with the previous checkpoint: %v", err)
			}
		}
		prev = &cp
		rep.Checkpoints++
		return nil
	})
	if err != nil {
		if te, torn := isTorn(err); torn {
			return nil, &VerifyError{Index: -1, Reason: fmt.Sprintf("#%d: %s", rep.Checkpoints, te.Error())}
		}
		return nil, err
	}
	if prev == nil && n > 0 {
		return nil, &VerifyError{Index: -1, Reason: fmt.Sprintf("no checkpoint for a log of %d entries", n)}
	}
	if prev != nil {
		rep.Origin, rep.LastSize, rep.LastRoot = prev.Origin, prev.Size, prev.Root
	}
	rep.Root, _ = t.root(n)
	return rep, nil
}

// VerifyEntries checks a log held somewhere other than its directory — the
// copy a node replicated to the shared store — against a checkpoint note:
// every entry parses canonically, has index 0, 1, … and names node; the
// note carries valid signatures from v; and the entries' Merkle root at the
// checkpoint's size is the checkpoint's root. The first problem is a
// *VerifyError.
func VerifyEntries(entries [][]byte, node string, note []byte, v *Verifier) (*Report, error) {
	t := newTree()
	for i, raw := range entries {
		e, err := ParseEntry(raw)
		if err != nil {
			return nil, &VerifyError{Index: int64(i), Reason: err.Error()} // #nosec G115 -- i < len(entries)
		}
		if e.Index != uint64(i) || e.Node != node { // #nosec G115 -- i ≥ 0
			return nil, &VerifyError{Index: int64(i), Reason: fmt.Sprintf("entry says index %d of node %q", e.Index, e.Node)} // #nosec G115
		}
		t.appendLeaf(LeafHash(raw))
	}
	cp, err := ParseCheckpoint(note, v)
	if err != nil {
		return nil, &VerifyError{Index: -1, Reason: err.Error()}
	}
	if cp.Size > t.size() {
		return nil, &VerifyError{Index: -1, Reason: fmt.Sprintf("the checkpoint covers %d entries, only %d are present: entries were removed", cp.Size, t.size())}
	}
	root, err := t.root(cp.Size)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(root, cp.Root) {
		return nil, &VerifyError{Index: 0, Reason: fmt.Sprintf("entries 0..%d do not hash to the signed checkpoint's root: an entry was altered, removed or reordered", cp.Size)}
	}
	all, err := t.root(t.size())
	if err != nil {
		return nil, err
	}
	return &Report{Origin: cp.Origin, Entries: t.size(), Checkpoints: 1, LastSize: cp.Size, LastRoot: cp.Root, Root: all}, nil
}
