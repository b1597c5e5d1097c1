package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/server"
	"github.com/coffre-kms/coffre/kms/store"
)

// serve opens the store, the HSM root and the kms services that cfg names,
// serves until ctx ends, then shuts down gracefully. listened is called once
// the listener is bound, with its address (port 0 resolved), before any
// call is served.
// services are what serve builds, handed to its setup step.
type services struct {
	svc    *kms.Service
	rel    *kms.ReleaseService
	quorum *quorum.Engine
}

// setup, when not nil, runs once the services exist and before anything is
// served (the dev environment enrolls its simulated node there).
func serve(ctx context.Context, cfg *Config, log *slog.Logger, setup func(context.Context, *services) error, listened func(addr string) error) (err error) {
	// Resources are released in the reverse order of acquisition, the kms
	// service first so that its KEK cache is zeroized before the root that
	// unwrapped those KEKs goes away.
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			if cerr := closers[i](); cerr != nil {
				log.Error("close failed", "err", cerr)
				err = errors.Join(err, cerr)
			}
		}
		if err == nil {
			log.Info("stopped: KEK cache zeroized, HSM and store closed")
		}
	}()

	st, err := openStore(ctx, cfg.Store)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	closers = append(closers, st.Close)

	root, previousRoots, rootClosers, err := openRoots(ctx, cfg.HSM)
	closers = append(closers, rootClosers...)
	if err != nil {
		return err
	}

	svc, err := kms.New(kms.Config{Store: st, Root: root, PreviousRoots: previousRoots, RootAliases: cfg.HSM.RootAliases, CacheSize: cfg.KEKCache.Size, CacheTTL: cfg.KEKCache.TTL})
	if err != nil {
		return err
	}
	closers = append(closers, svc.Close)

	// The audit log opens before anything that decides: no decision is made
	// that could not be recorded (invariant 3).
	signerKey, err := readLimited(cfg.Audit.SignerKeyFile, 1<<20)
	if err != nil {
		return fmt.Errorf("audit.signer_key_file: %w", err)
	}
	signer, err := audit.ParseSigner(signerKey)
	clear(signerKey)
	if err != nil {
		return fmt.Errorf("audit.signer_key_file %s: %w", cfg.Audit.SignerKeyFile, err)
	}
	var replica audit.Replicator
	if cfg.Store.Engine == "etcd" {
		// Several Coffre nodes: every batch of audit entries is written to
		// etcd before its callers are answered, so an acknowledged entry
		// survives the loss of this node.
		replica = kms.StoreAuditReplica{Store: st}
	}
	auditLog, err := audit.Open(audit.Options{
		Replicator:         replica,
		Dir:                cfg.Audit.Dir,
		Node:               cfg.Audit.NodeID,
		Origin:             cfg.Audit.Origin,
		Signer:             signer,
		CheckpointInterval: cfg.Audit.CheckpointInterval,
		CheckpointEvery:    cfg.Audit.CheckpointEvery,
		Witnesses:          cfg.Audit.Witnesses,
		Logger:             log,
	})
	if err != nil {
		return fmt.Errorf("audit log %s: %w", cfg.Audit.Dir, err)
	}
	closers = append(closers, auditLog.Close)
	m := &metrics{log: auditLog}
	stopSinks, err := startSinks(auditLog, cfg.Audit, m, log)
	if err != nil {
		return err
	}
	closers = append(closers, stopSinks)
	if cfg.Metrics.Listen != "" {
		mctx, stopMetrics := context.WithCancel(ctx)
		defer stopMetrics()
		if err := serveMetrics(mctx, cfg.Metrics.Listen, m, log); err != nil {
			return err
		}
	}

	rel, err := kms.NewReleaseService(svc, kms.ReleaseConfig{
		Auditor:         kms.AuditLog{Log: auditLog},
		SessionTTL:      cfg.Attestation.SessionTTL,
		ChallengeTTL:    cfg.Attestation.ChallengeTTL,
		MaxSessions:     cfg.Attestation.MaxSessions,
		MaxChallenges:   cfg.Attestation.MaxChallenges,
		ChallengesPerEK: cfg.Attestation.ChallengesPerEK,
		Logger:          log,
	})
	if err != nil {
		return err
	}
	closers = append(closers, rel.Close)
	// Sensitive operations run only through M-of-N proposals; every step
	// of one is audited before it takes effect.
	q, err := quorum.New(quorum.Config{Store: st, Audit: server.QuorumAudit(auditLog)})
	if err != nil {
		return err
	}
	if setup != nil {
		if err := setup(ctx, &services{svc: svc, rel: rel, quorum: q}); err != nil {
			return err
		}
	}

	srv := server.New(svc, server.Options{
		MaxCallTimeout:  cfg.Limits.MaxCallTimeout,
		MaxMessageBytes: cfg.Limits.MaxMessageBytes,
		Logger:          log,
		AdminCAs:        cfg.TLS.AdminCAs,
		AuditorCAs:      cfg.TLS.AuditorCAs,
		Audit:           auditLog,
		Release:         rel,
		Quorum:          q,
		DestroyRoot: func(ctx context.Context, id string) error {
			// Only a previous root can go: the current one wraps every
			// new KEK version.
			for i, uris := range previousRootURIs(cfg.HSM) {
				if previousRoots[i].ID() != id {
					continue
				}
				if err := destroyable(cfg.HSM, i); err != nil {
					return err
				}
				for _, uri := range uris { // both keys of a dual root
					if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: uri, Sessions: 1}); err != nil {
						return err
					}
				}
				return nil
			}
			return fmt.Errorf("%w: %s is not one of this server's previous roots", kms.ErrFailedPrecondition, id)
		},
		ExportBackup: func(ctx context.Context, to *seal.PublicKey) ([]byte, error) {
			return kms.ExportBackup(ctx, st, kms.ExportOptions{To: to, Signer: signer, Origin: cfg.Audit.Origin})
		},
	})
	g := grpc.NewServer(append(srv.ServerOptions(), grpcOptions(cfg)...)...)
	srv.Register(g)

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	addr := lis.Addr().String()
	if err := listened(addr); err != nil {
		_ = lis.Close() // the error that matters is err
		return err
	}
	storeDesc := "bbolt:" + cfg.Store.Path
	if cfg.Store.Engine == "etcd" {
		storeDesc = "etcd:" + strings.Join(cfg.Store.Endpoints, ",") + " prefix " + cfg.Store.Prefix
	}
	log.Info("serving", "addr", addr, "root", root.ID(), "store", storeDesc)

	// Scheduled rotations and destructions, each audited before it happens.
	lctx, stopLifecycle := context.WithCancel(ctx)
	lifecycleDone := make(chan struct{})
	go func() {
		defer close(lifecycleDone)
		svc.RunLifecycle(lctx, auditLog, kms.DefaultLifecycleInterval, log)
	}()
	defer func() { stopLifecycle(); <-lifecycleDone }()

	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	select {
	case err := <-served:
		// Serve returns only when the listener fails.
		g.Stop()
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}

	log.Info("shutting down", "grace", cfg.Limits.ShutdownGrace)
	srv.Drain()
	stopped := make(chan struct{})
	go func() {
		g.GracefulStop()
		close(stopped)
	}()
	grace := time.NewTimer(cfg.Limits.ShutdownGrace)
	defer grace.Stop()
	select {
	case <-stopped:
	case <-grace.C:
		log.Warn("shutdown grace over; closing the remaining connections")
		g.Stop()
		<-stopped
	}
	<-served
	return nil
}

// grpcOptions turns the transport part of the configuration into
// grpc.ServerOptions.
// maxHeaderListBytes bounds the headers (metadata) of one call, which are
// read before any interceptor runs and, on health, attestation and key
// calls, from callers without a certificate. Coffre's own are a session
// token, a request id and gRPC's: well under 1 KiB. grpc-go's default is
// 16 MiB per stream, times max_concurrent_streams per connection.
const maxHeaderListBytes = 16 << 10

func grpcOptions(cfg *Config) []grpc.ServerOption {
	tlsCfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cfg.TLS.Certificate},
		// A client certificate is optional at the TLS layer, so that health
		// probes work without one; if one is given it must verify against
		// the admin CAs, and AdminService requires it (kms/server).
		ClientAuth: tls.VerifyClientCertIfGiven,
		ClientCAs:  cfg.TLS.ClientCAs,
	}
	return []grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.MaxHeaderListSize(maxHeaderListBytes),
		grpc.MaxRecvMsgSize(cfg.Limits.MaxMessageBytes),
		grpc.MaxSendMsgSize(cfg.Limits.MaxMessageBytes),
		grpc.MaxConcurrentStreams(cfg.Limits.MaxConcurrentStreams),
		grpc.ConnectionTimeout(cfg.Limits.HandshakeTimeout),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime: cfg.Keepalive.MinPingInterval,
			// Connections with no call in flight get no pings: a client
			// with nothing to do should let the connection go idle and close.
			PermitWithoutStream: false,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: cfg.Keepalive.MaxConnectionIdle,
			MaxConnectionAge:  cfg.Keepalive.MaxConnectionAge,
			// Calls still running when a connection reaches its age (an
			// audit Stream, a health Watch: they carry no deadline) get the
			// shutdown grace, then the connection closes; the client
			// reconnects and resumes.
			MaxConnectionAgeGrace: cfg.Limits.ShutdownGrace,
			Time:                  cfg.Keepalive.PingInterval,
			Timeout:               cfg.Keepalive.PingTimeout,
		}),
	}
}

// openRoots opens the root keys cfg names: the current root (a dual root,
// hsm.NewDual, when hsm.second_root is set) and the previous roots, which
// only unwrap during a root rotation. It returns the Close of every key it
// opened, also when it fails part-way, for the caller to run.
func openRoots(ctx context.Context, cfg HSMConfig) (root hsm.Root, previous []hsm.Root, closers []func() error, err error) {
	open := func(field, uri string) (*pkcs11.Root, error) {
		r, err := pkcs11.Open(ctx, pkcs11.Config{URI: uri, Sessions: cfg.Sessions})
		if errors.Is(err, hsm.ErrKeyNotFound) && field == "hsm.root_key" {
			return nil, fmt.Errorf("hsm: no root key at %s: run the root-key ceremony first: %w", redactedKeyID(uri), err)
		}
		if errors.Is(err, hsm.ErrKeyNotFound) {
			return nil, fmt.Errorf("hsm: %s: no root key at %s: %w", field, redactedKeyID(uri), err)
		}
		if err != nil {
			return nil, fmt.Errorf("hsm: %s: %w", field, err)
		}
		closers = append(closers, r.Close)
		return r, nil
	}
	first, err := open("hsm.root_key", cfg.RootKey)
	if err != nil {
		return nil, nil, closers, err
	}
	root = first
	if cfg.SecondRoot != "" {
		second, err := open("hsm.second_root", cfg.SecondRoot)
		if err != nil {
			return nil, nil, closers, err
		}
		// Not closed through the dual root: each key is in closers once.
		root = hsm.NewDual(first, second)
	}
	for i, uri := range cfg.PreviousRoots {
		r, err := open(fmt.Sprintf("hsm.previous_roots[%d]", i), uri)
		if err != nil {
			return nil, nil, closers, err
		}
		previous = append(previous, r)
	}
	for i, d := range cfg.PreviousDualRoots {
		a, err := open(fmt.Sprintf("hsm.previous_dual_roots[%d].root_key", i), d.RootKey)
		if err != nil {
			return nil, nil, closers, err
		}
		b, err := open(fmt.Sprintf("hsm.previous_dual_roots[%d].second_root", i), d.SecondRoot)
		if err != nil {
			return nil, nil, closers, err
		}
		previous = append(previous, hsm.NewDual(a, b))
	}
	return root, previous, closers, nil
}

// previousRootURIs returns, for each previous root openRoots opened (in its
// order), the URIs of its keys: one, or two for a dual root.
func previousRootURIs(cfg HSMConfig) [][]string {
	var out [][]string
	for _, uri := range cfg.PreviousRoots {
		out = append(out, []string{uri})
	}
	for _, d := range cfg.PreviousDualRoots {
		out = append(out, []string{d.RootKey, d.SecondRoot})
	}
	return out
}

// destroyable refuses to destroy previous root i (in previousRootURIs
// order) if one of its HSM keys is also a key of the current root or of
// another configured previous root. A move from root A to the dual root
// (A, B) keeps A as a previous root; every KEK version then names (A, B),
// none names A, and destroying A would destroy half of the current root:
// every KEK lost. Keys are compared by their URI's key id (token and
// object), the only name the configuration gives them.
func destroyable(cfg HSMConfig, i int) error {
	keyID := func(uri string) string {
		u, err := hsm.ParseURI(uri)
		if err != nil {
			return uri
		}
		return u.KeyID()
	}
	others := map[string]string{keyID(cfg.RootKey): "hsm.root_key"}
	if cfg.SecondRoot != "" {
		others[keyID(cfg.SecondRoot)] = "hsm.second_root"
	}
	all := previousRootURIs(cfg)
	for j, uris := range all {
		if j == i {
			continue
		}
		for _, uri := range uris {
			if _, ok := others[keyID(uri)]; !ok {
				others[keyID(uri)] = fmt.Sprintf("previous root %s", redactedKeyID(uris[0]))
			}
		}
	}
	for _, uri := range all[i] {
		if where, ok := others[keyID(uri)]; ok {
			return fmt.Errorf("%w: key %s is also %s: destroying it would destroy a root still configured; take that root out of the configuration first", kms.ErrFailedPrecondition, keyID(uri), where)
		}
	}
	return nil
}

// redactedKeyID names a root key in a message without its query, which
// holds file paths the log reader does not need.
func redactedKeyID(uri string) string {
	u, err := hsm.ParseURI(uri)
	if err != nil {
		return "the configured root key"
	}
	return u.KeyID()
}

// startSinks runs the configured audit sinks until the returned function is
// called. A sink reads the log after the fact: one being down never holds
// up a release, and it catches up from its spool when it is back.
func startSinks(l *audit.Log, c AuditConfig, m *metrics, log *slog.Logger) (func() error, error) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	run := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && ctx.Err() == nil {
				log.Error("audit sink stopped", "sink", name, "err", err)
			}
		}()
	}
	if c.Syslog.Addr != "" {
		s, err := audit.NewSyslogSink(l, audit.SyslogConfig{Addr: c.Syslog.Addr, TLS: c.Syslog.TLS, SyncEvery: c.Syslog.SyncEvery, SpoolDir: c.Dir, Hostname: c.NodeID})
		if err != nil {
			cancel()
			return nil, fmt.Errorf("audit.syslog: %w", err)
		}
		m.syslog = s
		run("syslog", s.Run)
	}
	if c.JSONL.Path != "" {
		s, err := audit.NewJSONLSink(l, audit.JSONLConfig{Path: c.JSONL.Path, SpoolDir: c.Dir, OCSF: c.JSONL.OCSF})
		if err != nil {
			cancel()
			return nil, fmt.Errorf("audit.jsonl: %w", err)
		}
		m.jsonl = s
		run("jsonl", s.Run)
	}
	return func() error {
		cancel()
		wg.Wait()
		return nil
	}, nil
}

// openStore opens the configured storage engine.
func openStore(ctx context.Context, c StoreConfig) (store.Store, error) {
	if c.Engine == "etcd" {
		return store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: c.Endpoints, Prefix: c.Prefix, TLS: c.TLS})
	}
	return store.OpenBolt(c.Path, store.BoltOptions{})
}
