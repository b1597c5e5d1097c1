package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// ---- AdminService: stored backups ----
//
// An executed backup.export keeps its backup in the store
// (kms.Service.StoreBackup) and its result names it; FetchBackup streams it
// to an admin and DeleteBackup deletes it. Both take the proposal, never a
// store key: only what a quorum approved can be read out this way.

// Bounds of FetchBackup's messages: half the transport's message limit,
// between these. Without Options.MaxMessageBytes, 64 KiB is assumed, well
// under any limit a deployment is likely to set.
const (
	defaultMaxMessageBytes = 64 << 10
	minBackupMessageData   = 1 << 10
	maxBackupMessageData   = 256 << 10
)

// backupMessageData is how many backup bytes one FetchBackup message
// carries.
func backupMessageData(maxMessageBytes int) int {
	if maxMessageBytes <= 0 {
		maxMessageBytes = defaultMaxMessageBytes
	}
	return min(max(maxMessageBytes/2, minBackupMessageData), maxBackupMessageData)
}

// StoredBackupToProto converts a stored backup's description for the wire.
func StoredBackupToProto(b kms.StoredBackup) *coffrev1.BackupManifest {
	return &coffrev1.BackupManifest{
		Size:       uint64(max(b.Size, 0)), // #nosec G115 -- at most kms.MaxBackupSize
		Sha256:     b.ID(),
		Chunks:     uint32(max(b.Chunks, 0)),    // #nosec G115 -- at most kms.MaxBackupSize / chunk size
		ChunkSize:  uint32(max(b.ChunkSize, 0)), // #nosec G115 -- at most the store's value limit
		CreateTime: timeToProto(b.Created),
	}
}

// storedBackup is a backup that FetchBackup can stream: its description
// and a reader of its chunks.
type storedBackup struct {
	kms.StoredBackup
	chunk func(ctx context.Context, i int) ([]byte, error)
}

// exportResult checks that id names an executed backup.export proposal and
// returns it with its result.
func (s *Server) exportResult(ctx context.Context, id string) (*quorum.Proposal, *coffrev1.ExportBackupResponse, error) {
	q, err := s.quorum()
	if err != nil {
		return nil, nil, err
	}
	p, err := q.Get(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	if p.Parsed.Kind != KindExportBackup {
		return nil, nil, fmt.Errorf("%w: proposal %s is a %s, not a %s", kms.ErrInvalidArgument, p.ID[:16], p.Parsed.Kind, KindExportBackup)
	}
	if p.State != quorum.StateExecuted {
		return nil, nil, fmt.Errorf("%w: proposal %s is %s; only an executed export has a backup", kms.ErrFailedPrecondition, p.ID[:16], p.State)
	}
	var r coffrev1.ExportBackupResponse
	if err := protojson.Unmarshal(p.Result, &r); err != nil || len(p.Result) == 0 {
		// The result of a server from before stored backups that was too
		// big to keep (it held the backup itself), or a store edited.
		return nil, nil, fmt.Errorf("%w: proposal %s executed, but its result names no backup: propose a new export", kms.ErrFailedPrecondition, p.ID[:16])
	}
	return p, &r, nil
}

// backupOf returns the backup that executed backup.export proposal id
// stored, checked against the description in the proposal's result.
func (s *Server) backupOf(ctx context.Context, id string) (*storedBackup, error) {
	p, r, err := s.exportResult(ctx, id)
	if err != nil {
		return nil, err
	}
	if inline := r.GetBackup(); r.GetStored() == nil && len(inline) > 0 {
		// Servers from before stored backups put a small backup in the
		// result itself: it is served the same way.
		b := kms.StoredBackup{
			SHA256: sha256.Sum256(inline), Size: int64(len(inline)), ChunkSize: kms.StoredBackupChunkSize,
			Chunks: (len(inline) + kms.StoredBackupChunkSize - 1) / kms.StoredBackupChunkSize, Created: p.DoneTime,
		}
		return &storedBackup{StoredBackup: b, chunk: func(_ context.Context, i int) ([]byte, error) {
			off := i * b.ChunkSize
			return inline[off:min(off+b.ChunkSize, len(inline))], nil
		}}, nil
	}
	want := r.GetStored()
	if want == nil {
		return nil, fmt.Errorf("%w: proposal %s executed, but its result names no backup: propose a new export", kms.ErrFailedPrecondition, p.ID[:16])
	}
	b, err := s.svc.GetStoredBackup(ctx, want.GetSha256())
	if err != nil {
		return nil, err
	}
	if uint64(b.Size) != want.GetSize() || uint64(b.ChunkSize) != uint64(want.GetChunkSize()) { // #nosec G115 -- both checked positive by kms
		return nil, fmt.Errorf("%w: backup %s: the stored manifest disagrees with proposal %s", kms.ErrStoredBackupDamaged, b.ID(), p.ID[:16])
	}
	return &storedBackup{StoredBackup: b, chunk: func(ctx context.Context, i int) ([]byte, error) {
		return s.svc.ReadStoredBackupChunk(ctx, b, i)
	}}, nil
}

func (a *adminService) FetchBackup(req *coffrev1.FetchBackupRequest, ss grpc.ServerStreamingServer[coffrev1.BackupChunk]) error {
	ctx := ss.Context()
	b, err := a.s.backupOf(ctx, req.GetProposalId())
	if err != nil {
		return a.s.fail(ctx, err)
	}
	if req.GetOffset() > uint64(b.Size) { // #nosec G115 -- positive, at most kms.MaxBackupSize
		return a.s.fail(ctx, fmt.Errorf("%w: offset %d is past the backup's %d bytes", kms.ErrInvalidArgument, req.GetOffset(), b.Size))
	}
	off := int64(req.GetOffset()) // #nosec G115 -- at most b.Size
	if err := ss.Send(&coffrev1.BackupChunk{Manifest: StoredBackupToProto(b.StoredBackup)}); err != nil {
		return err
	}
	// From the start, the whole is checked here too: a store that lost or
	// altered a chunk ends the stream with an error, not a clean end.
	h := sha256.New()
	whole := off == 0
	step := a.s.backupMessageData
	for i := int(off / int64(b.ChunkSize)); i < b.Chunks; i++ {
		chunk, err := b.chunk(ctx, i)
		if err != nil {
			return a.s.fail(ctx, err)
		}
		if whole {
			h.Write(chunk)
		}
		base := int64(i) * int64(b.ChunkSize)
		for start := int(max(off-base, 0)); start < len(chunk); start += step {
			data := chunk[start:min(start+step, len(chunk))]
			if err := ss.Send(&coffrev1.BackupChunk{Offset: uint64(base) + uint64(start), Data: data}); err != nil { // #nosec G115 -- offsets within the backup
				return err
			}
		}
	}
	if whole && !bytes.Equal(h.Sum(nil), b.SHA256[:]) {
		return a.s.fail(ctx, fmt.Errorf("%w: backup %s does not hash to its name", kms.ErrStoredBackupDamaged, b.ID()))
	}
	return nil
}

func (a *adminService) DeleteBackup(ctx context.Context, req *coffrev1.DeleteBackupRequest) (*coffrev1.BackupManifest, error) {
	p, r, err := a.s.exportResult(ctx, req.GetProposalId())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	want := r.GetStored()
	if want == nil {
		return nil, a.s.fail(ctx, fmt.Errorf("%w: proposal %s keeps its backup in its own result (a server from before stored backups): there is nothing stored to delete", kms.ErrFailedPrecondition, p.ID[:16]))
	}
	// A damaged backup is deleted too: its manifest need not parse.
	if err := a.s.svc.DeleteStoredBackup(ctx, want.GetSha256()); err != nil {
		return nil, a.s.fail(ctx, err)
	}
	a.s.log.InfoContext(ctx, "stored backup deleted", "proposal", p.ID, "sha256", want.GetSha256(), "size", want.GetSize())
	return want, nil
}
