package kms

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
)

// DefaultLifecycleInterval is how often RunLifecycle looks for due
// rotations and destructions: a minute late is nothing against periods of
// days.
const DefaultLifecycleInterval = time.Minute

// RunLifecycle rotates keyrings whose rotation period has come due and
// destroys KEK versions whose destruction date has passed, every interval,
// until ctx ends. Each rotation and destruction is first appended to log
// (actor "system/lifecycle"): if the log cannot be written, nothing happens
// and the next round tries again (invariant 3). Every Coffre node runs it;
// the compare-and-swap in the service makes each change happen once.
func (s *Service) RunLifecycle(ctx context.Context, log *audit.Log, interval time.Duration, logger *slog.Logger) {
	if interval <= 0 {
		interval = DefaultLifecycleInterval
	}
	if logger == nil {
		logger = slog.Default()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		s.LifecycleRound(ctx, log, logger)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// LifecycleRound is one round of RunLifecycle.
func (s *Service) LifecycleRound(ctx context.Context, log *audit.Log, logger *slog.Logger) {
	record := func(op string, id KeyringID, v uint32, reason string) error {
		_, err := log.Append(ctx, &audit.Entry{
			Time:      s.now(),
			Actor:     audit.Actor{Kind: audit.ActorSystem, ID: "lifecycle"},
			Operation: op,
			Tenant:    id.Tenant, Keyring: id.String(), KeyVersion: v,
			Decision: audit.Allow,
			Reason:   reason,
		})
		return err
	}
	rotated, err := s.RotateDue(ctx, func(ev RotateEvent) error {
		return record("lifecycle.rotate", ev.Keyring, ev.Version,
			fmt.Sprintf("rotation period came due at %s; v%d replaces v%d as primary", ev.Due.UTC().Format(time.RFC3339), ev.Version, ev.Previous))
	})
	for _, ev := range rotated {
		logger.Info("rotated keyring on schedule", "keyring", ev.Keyring.String(), "version", ev.Version)
	}
	if err != nil && ctx.Err() == nil {
		logger.Error("scheduled rotations", "err", err)
	}
	destroyed, err := s.DestroyDue(ctx, func(ev DestroyEvent) error {
		return record("lifecycle.destroy", ev.Keyring, ev.Version,
			fmt.Sprintf("destruction scheduled for %s: KEK erased (crypto-shred)", ev.DestroyTime.UTC().Format(time.RFC3339)))
	})
	for _, ev := range destroyed {
		logger.Warn("destroyed KEK version on schedule", "keyring", ev.Keyring.String(), "version", ev.Version)
	}
	if err != nil && ctx.Err() == nil {
		logger.Error("scheduled destructions", "err", err)
	}
}
