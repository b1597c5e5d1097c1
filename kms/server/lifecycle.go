package server

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/seal"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// Quorum-gated lifecycle and custody operations.
const (
	KindScheduleDestruction = "keyring.schedule_destruction"
	KindRotateRoot          = "root.rotate"
	KindDestroyRoot         = "root.destroy"
	KindExportBackup        = "backup.export"
)

type (
	destroyArgs struct {
		Keyring string `json:"keyring"`
		Version uint32 `json:"version"` // 0: every version
		Days    int    `json:"days"`
	}
	rotateRootArgs  struct{}
	destroyRootArgs struct {
		RootID string `json:"root_id"`
	}
	exportArgs struct {
		To string `json:"to"`
	}
)

// registerLifecycle teaches the quorum engine the lifecycle and custody
// operations.
func (s *Server) registerLifecycle(q *quorum.Engine) {
	wrap := func(exec func(ctx context.Context, raw json.RawMessage) (proto.Message, error)) quorum.Executor {
		return s.statusExecutor(exec)
	}
	q.Register(KindScheduleDestruction, validateAs[destroyArgs](func(a destroyArgs) error {
		if _, err := kms.ParseKeyringID(a.Keyring); err != nil {
			return err
		}
		if a.Days < kms.MinDestroyDays || a.Days > kms.MaxDestroyDays {
			return fmt.Errorf("%w: %d days: a destruction is scheduled %d to %d days ahead", kms.ErrInvalidArgument, a.Days, kms.MinDestroyDays, kms.MaxDestroyDays)
		}
		return nil
	}), wrap(func(ctx context.Context, raw json.RawMessage) (proto.Message, error) {
		var a destroyArgs
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
		id, err := kms.ParseKeyringID(a.Keyring)
		if err != nil {
			return nil, err
		}
		k, err := s.svc.ScheduleDestroy(ctx, id, a.Version, a.Days)
		if err != nil {
			return nil, err
		}
		return KeyringToProto(k), nil
	}))
	q.Register(KindRotateRoot, validateAs[rotateRootArgs](nil), wrap(func(ctx context.Context, _ json.RawMessage) (proto.Message, error) {
		r, err := s.svc.RotateRoot(ctx, nil)
		if err != nil {
			return nil, err
		}
		return &coffrev1.RootRotation{RootId: r.Root, Keyrings: uint32(max(r.Keyrings, 0)), VersionsRewrapped: uint32(max(r.Rewrapped, 0))}, nil // #nosec G115 -- counts
	}))
	q.Register(KindDestroyRoot, validateAs[destroyRootArgs](func(a destroyRootArgs) error {
		if a.RootID == "" {
			return fmt.Errorf("%w: no root id", kms.ErrInvalidArgument)
		}
		return nil
	}), wrap(func(ctx context.Context, raw json.RawMessage) (proto.Message, error) {
		var a destroyRootArgs
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
		if s.destroyRoot == nil {
			return nil, fmt.Errorf("%w: this server cannot destroy HSM roots", kms.ErrFailedPrecondition)
		}
		usage, err := s.svc.RootUsage(ctx)
		if err != nil {
			return nil, err
		}
		if n := usage[a.RootID]; n > 0 {
			return nil, fmt.Errorf("%w: %d KEK versions are still wrapped by root %s: run a root rotation first", kms.ErrFailedPrecondition, n, a.RootID)
		}
		if err := s.destroyRoot(ctx, a.RootID); err != nil {
			return nil, err
		}
		return &coffrev1.DestroyRootResponse{RootId: a.RootID}, nil
	}))
	q.Register(KindExportBackup, validateAs[exportArgs](func(a exportArgs) error {
		if _, err := seal.ParsePublicKey(a.To); err != nil {
			return fmt.Errorf("%w: transfer key: %v", kms.ErrInvalidArgument, err)
		}
		return nil
	}), wrap(func(ctx context.Context, raw json.RawMessage) (proto.Message, error) {
		var a exportArgs
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
		to, err := seal.ParsePublicKey(a.To)
		if err != nil {
			return nil, fmt.Errorf("%w: transfer key: %v", kms.ErrInvalidArgument, err)
		}
		if s.exportBackup == nil {
			return nil, fmt.Errorf("%w: this server cannot export backups", kms.ErrFailedPrecondition)
		}
		b, err := s.exportBackup(ctx, to)
		if err != nil {
			return nil, err
		}
		// A backup may be larger than any message or stored value: it is
		// kept in the store, and the result names it (FetchBackup).
		stored, err := s.svc.StoreBackup(ctx, b)
		if err != nil {
			return nil, err
		}
		return &coffrev1.ExportBackupResponse{Stored: StoredBackupToProto(stored)}, nil
	}))
}

// ---- AdminService: lifecycle ----

func (a *adminService) keyVersionCall(ctx context.Context, req *coffrev1.KeyVersionRequest, f func(context.Context, kms.KeyringID, uint32) (*kms.Keyring, error)) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetKeyring())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := f(ctx, id, req.GetVersion())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}

func (a *adminService) DisableKeyVersion(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.DisableVersion)
}

func (a *adminService) EnableKeyVersion(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.EnableVersion)
}

func (a *adminService) CancelKeyDestruction(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.CancelDestroy)
}

func (a *adminService) MarkKeyVersionCompromised(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.MarkCompromised)
}

func (a *adminService) PromoteKeyVersion(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.PromoteVersion)
}

func (a *adminService) AddKeyVersion(ctx context.Context, req *coffrev1.AddKeyVersionRequest) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetKeyring())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := a.s.svc.AddVersion(ctx, id)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}

func (a *adminService) SetMinDecryptionVersion(ctx context.Context, req *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
	return a.keyVersionCall(ctx, req, a.s.svc.SetMinDecryptionVersion)
}

// maxRotationPeriodSeconds keeps the conversion to a Duration in range;
// the service applies its own, tighter bounds.
const maxRotationPeriodSeconds = 100 * 365 * 24 * 3600

func (a *adminService) SetRotationPeriod(ctx context.Context, req *coffrev1.SetRotationPeriodRequest) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetKeyring())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	if req.GetPeriodSeconds() > maxRotationPeriodSeconds {
		return nil, a.s.fail(ctx, fmt.Errorf("%w: rotation period of %d seconds", kms.ErrInvalidArgument, req.GetPeriodSeconds()))
	}
	k, err := a.s.svc.SetRotationPeriod(ctx, id, time.Duration(req.GetPeriodSeconds())*time.Second) // #nosec G115 -- bounded above
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}

func (a *adminService) RewrapEnvelope(ctx context.Context, req *coffrev1.RewrapEnvelopeRequest) (*coffrev1.RewrapEnvelopeResponse, error) {
	info, err := kms.ParseEnvelopeInfo(req.GetEnvelope())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := a.s.svc.GetKeyring(ctx, info.Keyring)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	if info.KeyVersion == k.Primary {
		return &coffrev1.RewrapEnvelopeResponse{Envelope: req.GetEnvelope(), KeyVersion: k.Primary}, nil
	}
	// The destination is the envelope's own keyring: an admin can move an
	// envelope forward in time, never to another keyring with another
	// release policy.
	env, err := a.s.svc.ReEncrypt(ctx, req.GetTenant(), req.GetEnvelope(), req.GetContext(), info.Keyring, nil)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	out, err := kms.ParseEnvelopeInfo(env)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return &coffrev1.RewrapEnvelopeResponse{Envelope: env, KeyVersion: out.KeyVersion, Changed: true}, nil
}
