package kms

import (
	"context"
	"encoding/hex"
	"fmt"

	"github.com/coffre-kms/coffre/kms/audit"
)

// AuditLog is the Auditor that appends every release decision to the
// node's tamper-evident audit log. Record returns only once the entry is
// durable; when the log cannot be written it returns an error wrapping
// ErrUnavailable, and the release service then refuses the release: no key
// leaves before its audit entry is on disk (invariant 3).
type AuditLog struct {
	Log *audit.Log
}

// Record implements Auditor.
func (a AuditLog) Record(ctx context.Context, e *AuditEvent) error {
	actor := audit.Actor{Kind: audit.ActorNode, ID: e.Node}
	if actor.ID == "" {
		// Not (yet) an enrolled node: name it by its EK.
		actor.ID = "ek:" + e.EKFingerprint
	}
	entry := &audit.Entry{
		Time:      e.Time,
		Actor:     actor,
		Operation: e.Op,
		Decision:  audit.Deny,
		Reason:    e.Reason,
		RequestID: RequestID(ctx),
	}
	if e.Allowed {
		entry.Decision = audit.Allow
	}
	if !e.Keyring.IsZero() {
		entry.Tenant, entry.Keyring, entry.KeyVersion = e.Keyring.Tenant, e.Keyring.String(), e.KeyVersion
	}
	if e.EvidenceHash != ([32]byte{}) {
		entry.EvidenceHashes = []string{hex.EncodeToString(e.EvidenceHash[:])}
	}
	if _, err := a.Log.Append(ctx, entry); err != nil {
		return fmt.Errorf("%w: audit log: %w", ErrUnavailable, err)
	}
	return nil
}
