// Package audit is Coffre's tamper-evident audit log: every decision —
// each release and refusal, each admin call — is appended as a canonical
// entry to a per-node log, an RFC 6962 Merkle tree is kept over the entries,
// and signed checkpoints (C2SP signed-note: Ed25519 and ML-DSA-65) let
// auditors and a witness prove inclusion and consistency.
//
// A call that needs an audit entry is answered only once its entry is
// durable (group commit: concurrent appends share one fsync); if the log
// cannot be written, the service refuses to release keys. Sinks (gRPC
// stream, syslog, JSON lines) read the log after the fact and never hold up
// or lose an entry.
//
// # On disk
//
// [Open] keeps a log in one directory (mode 0700, files 0600):
//
//   - entries: the only authoritative file. Records of a 4-byte big-endian
//     length and one entry in its canonical encoding, index 0, 1, … in
//     order. Everything else (the tree, the record offsets) is rebuilt from
//     it at Open and kept in memory, about 72 bytes an entry.
//   - checkpoints: the signed checkpoints, same framing, oldest first.
//   - cosignatures: witness cosignature lines, same framing, each record
//     "size\n" followed by the lines.
//   - lock: an advisory lock so that one process at a time appends.
//   - entries.torn-<offset>-<unix nanoseconds>: the bytes of a torn tail
//     that Open cut (a write interrupted by a crash), kept for inspection.
//
// # Checkpoints and keys
//
// A checkpoint is a C2SP signed note ("origin\nsize\nbase64(root)\n") with
// two signature lines under the same key name: Ed25519 (signed-note type
// 0x01) and ML-DSA-65 (type 0x06, Coffre-specific). Both must verify; see
// [Signer], [Verifier] and [ParseCheckpoint]. The Merkle tree is RFC 6962
// over the canonical entry bytes, computed with
// github.com/transparency-dev/merkle.
//
// # Errors
//
// [ErrUnavailable] means the log cannot be written and the operation that
// needed the entry must be refused; [ErrTampered] means Open found a log
// that does not match its own checkpoint; [VerifyError] names the first bad
// entry or checkpoint found offline by [VerifyDir].
package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// EntryVersion is the version of the canonical entry encoding.
const EntryVersion = 1

// Decisions.
const (
	Allow = "allow"
	Deny  = "deny"
)

// Actor kinds.
const (
	ActorAdmin  = "admin"
	ActorNode   = "node"
	ActorSystem = "system"
)

// Actor is who asked: an admin (certificate subject), a node (enrolled
// name) or Coffre itself.
type Actor struct {
	Kind string `json:"kind"`
	ID   string `json:"id"`
}

// Entry is one audit record. It never holds key material, plaintext or a
// session token: only who, what, which key and version, the decision and
// hashes of the evidence it was based on.
//
// Its canonical encoding (MarshalCanonical) is JSON with the fields in the
// order below, no insignificant white space, no HTML escaping, times in
// RFC 3339 UTC with nanoseconds; it is what the Merkle tree hashes.
type Entry struct {
	Version    int       `json:"v"`
	Index      uint64    `json:"index"` // position in this node's log, from 0
	Time       time.Time `json:"time"`
	Node       string    `json:"node"` // the Coffre node that decided
	Actor      Actor     `json:"actor"`
	Operation  string    `json:"op"` // e.g. "key.generate_data_key", "admin.create_keyring"
	Tenant     string    `json:"tenant,omitempty"`
	Keyring    string    `json:"keyring,omitempty"` // "tenant/name"
	KeyVersion uint32    `json:"key_version,omitempty"`
	Decision   string    `json:"decision"` // Allow or Deny
	Reason     string    `json:"reason,omitempty"`
	// EvidenceHashes are hex SHA-256 hashes of attestation evidence or of
	// the request, never the material itself.
	EvidenceHashes []string `json:"evidence,omitempty"`
	RequestID      string   `json:"request_id,omitempty"`
}

// ErrEntry marks an entry that does not parse or breaks a rule.
var ErrEntry = errors.New("audit: bad entry")

// MarshalCanonical returns the canonical encoding of e.
func (e *Entry) MarshalCanonical() ([]byte, error) {
	if err := e.validate(); err != nil {
		return nil, err
	}
	c := *e
	c.Time = c.Time.UTC()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&c); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// ParseEntry parses a canonical entry and checks that it is canonical: the
// same bytes must come back from MarshalCanonical.
func ParseEntry(b []byte) (*Entry, error) {
	var e Entry
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEntry, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data", ErrEntry)
	}
	again, err := e.MarshalCanonical()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(again, b) {
		return nil, fmt.Errorf("%w: not in canonical form", ErrEntry)
	}
	return &e, nil
}

func (e *Entry) validate() error {
	switch {
	case e.Version != EntryVersion:
		return fmt.Errorf("%w: version %d, want %d", ErrEntry, e.Version, EntryVersion)
	case e.Time.IsZero():
		return fmt.Errorf("%w: no time", ErrEntry)
	case e.Operation == "":
		return fmt.Errorf("%w: no operation", ErrEntry)
	case e.Decision != Allow && e.Decision != Deny:
		return fmt.Errorf("%w: decision %q", ErrEntry, e.Decision)
	case e.Actor.Kind != ActorAdmin && e.Actor.Kind != ActorNode && e.Actor.Kind != ActorSystem:
		return fmt.Errorf("%w: actor kind %q", ErrEntry, e.Actor.Kind)
	}
	return nil
}
