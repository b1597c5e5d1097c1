package audit

import (
	"errors"
	"fmt"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
)

const hashSize = 32

// ErrProof marks a proof request that is out of range or a proof that does
// not verify.
var ErrProof = errors.New("audit: bad proof")

var hasher = rfc6962.DefaultHasher

// LeafHash is the RFC 6962 leaf hash of an entry's canonical bytes.
func LeafHash(entryRaw []byte) []byte { return hasher.HashLeaf(entryRaw) }

// tree keeps every perfect-subtree hash of the RFC 6962 tree over the log
// (about 64 bytes a leaf), so roots at any past size and proofs are
// computed without reading the entries file. It is not safe for concurrent
// use; Log guards it.
type tree struct {
	levels [][][hashSize]byte
	rng    *compact.Range
}

var rangeFactory = compact.RangeFactory{Hash: hasher.HashChildren}

func newTree() *tree {
	return &tree{rng: rangeFactory.NewEmptyRange(0)}
}

func (t *tree) size() uint64 { return t.rng.End() }

func (t *tree) visit(id compact.NodeID, h []byte) {
	for uint(len(t.levels)) <= id.Level {
		t.levels = append(t.levels, nil)
	}
	lv := t.levels[id.Level]
	if uint64(len(lv)) != id.Index {
		// compact.Range reports each perfect node once, left to right.
		panic(fmt.Sprintf("audit: tree node %d/%d out of order", id.Level, id.Index))
	}
	t.levels[id.Level] = append(lv, [hashSize]byte(h))
}

func (t *tree) appendLeaf(leafHash []byte) {
	if err := t.rng.Append(leafHash, t.visit); err != nil {
		panic(err) // only on a wrong hash size, which LeafHash never makes
	}
}

func (t *tree) node(id compact.NodeID) []byte {
	h := t.levels[id.Level][id.Index]
	return h[:]
}

// root returns the root hash of the tree of the first size leaves.
func (t *tree) root(size uint64) ([]byte, error) {
	if size > t.size() {
		return nil, fmt.Errorf("%w: size %d beyond the log's %d", ErrProof, size, t.size())
	}
	if size == 0 {
		return hasher.EmptyRoot(), nil
	}
	ids := compact.RangeNodes(0, size, nil)
	hashes := make([][]byte, len(ids))
	for i, id := range ids {
		hashes[i] = t.node(id)
	}
	r, err := rangeFactory.NewRange(0, size, hashes)
	if err != nil {
		return nil, err
	}
	return r.GetRootHash(nil)
}

func (t *tree) proof(n proof.Nodes) ([][]byte, error) {
	hashes := make([][]byte, len(n.IDs))
	for i, id := range n.IDs {
		hashes[i] = t.node(id)
	}
	return n.Rehash(hashes, hasher.HashChildren)
}

func (t *tree) inclusion(index, size uint64) ([][]byte, error) {
	if index >= size || size > t.size() {
		return nil, fmt.Errorf("%w: inclusion of %d in a tree of %d (log size %d)", ErrProof, index, size, t.size())
	}
	n, err := proof.Inclusion(index, size)
	if err != nil {
		return nil, err
	}
	return t.proof(n)
}

func (t *tree) consistency(from, to uint64) ([][]byte, error) {
	if from > to || to > t.size() {
		return nil, fmt.Errorf("%w: consistency from %d to %d (log size %d)", ErrProof, from, to, t.size())
	}
	n, err := proof.Consistency(from, to)
	if err != nil {
		return nil, err
	}
	return t.proof(n)
}

// VerifyInclusion checks that entryRaw (an entry's canonical bytes) is at
// index in the tree of the given size and root.
func VerifyInclusion(entryRaw []byte, index, size uint64, proofHashes [][]byte, root []byte) error {
	if index >= size {
		return fmt.Errorf("%w: index %d not below size %d", ErrProof, index, size)
	}
	if err := proof.VerifyInclusion(hasher, index, size, LeafHash(entryRaw), proofHashes, root); err != nil {
		return fmt.Errorf("%w: %v", ErrProof, err)
	}
	return nil
}

// VerifyConsistency checks that the tree (size2, root2) extends the tree
// (size1, root1).
func VerifyConsistency(size1, size2 uint64, proofHashes [][]byte, root1, root2 []byte) error {
	if size1 > size2 {
		return fmt.Errorf("%w: size %d before size %d", ErrProof, size1, size2)
	}
	if size1 == 0 {
		// Every tree extends the empty tree; the library wants no proof.
		if len(proofHashes) != 0 {
			return fmt.Errorf("%w: non-empty proof from the empty tree", ErrProof)
		}
		return nil
	}
	if err := proof.VerifyConsistency(hasher, size1, size2, proofHashes, root1, root2); err != nil {
		return fmt.Errorf("%w: %v", ErrProof, err)
	}
	return nil
}
