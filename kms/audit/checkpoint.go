package audit

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
)

// Checkpoint is a signed statement of the log's size and Merkle root, in
// the C2SP tlog-checkpoint / signed-note shape:
//
//	<origin>
//	<size, decimal>
//	<base64 root hash>
//
//	— <name> <base64(key ID ‖ Ed25519 signature)>
//	— <name> <base64(key ID ‖ ML-DSA-65 signature)>
//
// Only [ParseCheckpoint] (or the log itself) produces one whose Note has
// been verified.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   []byte
	Note   []byte // the signed note text
}

func checkpointBody(origin string, size uint64, root []byte) []byte {
	return fmt.Appendf(nil, "%s\n%d\n%s\n", origin, size, base64.StdEncoding.EncodeToString(root))
}

func validOrigin(o string) bool {
	return o != "" && !strings.ContainsAny(o, "\n\r") && !strings.HasPrefix(o, sigPrefix)
}

// signCheckpoint builds and signs the note for (origin, size, root).
func signCheckpoint(s *Signer, origin string, size uint64, root []byte) (Checkpoint, error) {
	body := checkpointBody(origin, size, root)
	sigs, err := s.sign(body)
	if err != nil {
		return Checkpoint{}, err
	}
	note := make([]byte, 0, len(body)+1+len(sigs))
	note = append(append(append(note, body...), '\n'), sigs...)
	return Checkpoint{Origin: origin, Size: size, Root: bytes.Clone(root), Note: note}, nil
}

// ParseCheckpoint parses a signed checkpoint note and checks that it
// carries valid Ed25519 and ML-DSA-65 signatures from v. Other signature
// lines (witness cosignatures) are allowed and ignored.
func ParseCheckpoint(note []byte, v *Verifier) (Checkpoint, error) {
	if v == nil {
		return Checkpoint{}, fmt.Errorf("%w: no verifier", ErrCheckpoint)
	}
	text, err := v.verifyNote(note)
	if err != nil {
		return Checkpoint{}, err
	}
	origin, size, root, err := parseCheckpointBody(text)
	if err != nil {
		return Checkpoint{}, err
	}
	return Checkpoint{Origin: origin, Size: size, Root: root, Note: bytes.Clone(note)}, nil
}

// parseCheckpointBody parses "origin\nsize\nbase64(root)\n" followed by
// optional non-empty extension lines.
func parseCheckpointBody(text []byte) (string, uint64, []byte, error) {
	lines := strings.Split(string(text), "\n")
	// text ends in "\n", so the last element is empty.
	if len(lines) < 4 || lines[len(lines)-1] != "" {
		return "", 0, nil, fmt.Errorf("%w: body has fewer than three lines", ErrCheckpoint)
	}
	origin, sizeS, rootS := lines[0], lines[1], lines[2]
	if !validOrigin(origin) {
		return "", 0, nil, fmt.Errorf("%w: bad origin", ErrCheckpoint)
	}
	size, err := strconv.ParseUint(sizeS, 10, 64)
	if err != nil || strconv.FormatUint(size, 10) != sizeS {
		return "", 0, nil, fmt.Errorf("%w: bad size %q", ErrCheckpoint, sizeS)
	}
	root, err := base64.StdEncoding.DecodeString(rootS)
	if err != nil || len(root) != hashSize {
		return "", 0, nil, fmt.Errorf("%w: bad root hash", ErrCheckpoint)
	}
	for _, ext := range lines[3 : len(lines)-1] {
		if ext == "" {
			return "", 0, nil, fmt.Errorf("%w: empty extension line", ErrCheckpoint)
		}
	}
	return origin, size, root, nil
}

// Cosign is the witness's step: it checks that next is signed by the log
// (logVerifier), that it is consistent with prev — the last checkpoint the
// witness cosigned for this log, nil the first time — by the consistency
// proof, and then signs next's body with the witness's keys. It returns the
// cosignature lines, to be appended to next.Note (see [Log.AddCosignature]).
//
// A witness cosignature here is the same hybrid signature a log makes
// (Ed25519 and ML-DSA-65 over the checkpoint text), not C2SP cosignature/v1.
func Cosign(witness *Signer, prev *Checkpoint, next Checkpoint, consistency [][]byte, logVerifier *Verifier) ([]byte, error) {
	if witness == nil {
		return nil, fmt.Errorf("audit: cosign: no witness signer")
	}
	got, err := ParseCheckpoint(next.Note, logVerifier)
	if err != nil {
		return nil, fmt.Errorf("audit: cosign: %w", err)
	}
	if got.Origin != next.Origin || got.Size != next.Size || !bytes.Equal(got.Root, next.Root) {
		return nil, fmt.Errorf("%w: cosign: fields do not match the signed note", ErrCheckpoint)
	}
	if prev != nil {
		if prev.Origin != got.Origin {
			return nil, fmt.Errorf("%w: cosign: origin %q, previously %q", ErrCheckpoint, got.Origin, prev.Origin)
		}
		if got.Size < prev.Size {
			return nil, fmt.Errorf("%w: cosign: size %d is smaller than the %d already cosigned (rollback)", ErrCheckpoint, got.Size, prev.Size)
		}
		if err := VerifyConsistency(prev.Size, got.Size, consistency, prev.Root, got.Root); err != nil {
			return nil, fmt.Errorf("audit: cosign: not consistent with the previous checkpoint (fork?): %w", err)
		}
	}
	text, _, err := splitNote(got.Note)
	if err != nil {
		return nil, err
	}
	return witness.sign(text)
}
