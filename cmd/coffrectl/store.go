package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"strings"

	"github.com/coffre-kms/coffre/kms/store"
)

func storeCommands() []*command {
	var from, to, prefix, caFile, certFile, keyFile string
	return []*command{{
		path: "store migrate", args: "", nargs: 0,
		summary: "Copy a single node's bbolt store into etcd (for a multi-node deployment) and verify the copy. Stop coffred first.",
		flags: func(fs *flag.FlagSet) {
			fs.StringVar(&from, "from", "", "source `bbolt:PATH`")
			fs.StringVar(&to, "to", "", "destination `etcd:URL[,URL…]`")
			fs.StringVar(&prefix, "prefix", "/coffre/", "the destination's key `PREFIX` (coffred's store.prefix)")
			fs.StringVar(&caFile, "etcd-ca", "", "CA `FILE` of the etcd members (mutual TLS; required off loopback)")
			fs.StringVar(&certFile, "etcd-cert", "", "client certificate `FILE` for etcd")
			fs.StringVar(&keyFile, "etcd-key", "", "client key `FILE` for etcd")
		},
		run: func(ctx context.Context, e *env, _ []string) error {
			path, ok := strings.CutPrefix(from, "bbolt:")
			if !ok || path == "" {
				return fmt.Errorf("%w: --from must be bbolt:PATH", errUsage)
			}
			tlsCfg, err := etcdTLS(caFile, certFile, keyFile)
			if err != nil {
				return err
			}
			src, err := store.OpenBolt(path, store.BoltOptions{})
			if err != nil {
				return fmt.Errorf("--from: %w (is coffred still running on it?)", err)
			}
			defer src.Close()
			dst, err := openEtcdFlag(ctx, "--to", to, prefix, tlsCfg)
			if err != nil {
				return err
			}
			defer dst.Close()
			n, err := migrate(ctx, src, dst)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "migrated and verified %d keys from %s to etcd prefix %s\n", n, path, prefix)
			return nil
		},
	}}
}

// migrate copies every key of src into dst, refusing to overwrite anything
// (each write is a create-only compare-and-swap), then reads every key back
// from dst and compares it byte for byte.
func migrate(ctx context.Context, src, dst store.Store) (int, error) {
	existing, err := dst.List(ctx, "")
	if err != nil {
		return 0, fmt.Errorf("destination: %w", err)
	}
	if len(existing) > 0 {
		return 0, fmt.Errorf("the destination prefix already holds %d keys (first: %s): refusing to merge stores", len(existing), existing[0].Key)
	}
	kvs, err := src.List(ctx, "")
	if err != nil {
		return 0, fmt.Errorf("source: %w", err)
	}
	for _, kv := range kvs {
		if _, err := dst.CompareAndSwap(ctx, kv.Key, 0, kv.Value); err != nil {
			if errors.Is(err, store.ErrConflict) {
				return 0, fmt.Errorf("key %s appeared in the destination during the migration: is a coffred node already using it?", kv.Key)
			}
			return 0, fmt.Errorf("copy %s: %w", kv.Key, err)
		}
	}
	for _, kv := range kvs {
		got, err := dst.Get(ctx, kv.Key)
		if err != nil {
			return 0, fmt.Errorf("verify %s: %w", kv.Key, err)
		}
		if !bytes.Equal(got.Value, kv.Value) {
			return 0, fmt.Errorf("verify %s: the destination holds other bytes", kv.Key)
		}
	}
	after, err := dst.List(ctx, "")
	if err != nil {
		return 0, fmt.Errorf("verify: %w", err)
	}
	if len(after) != len(kvs) {
		return 0, fmt.Errorf("verify: the destination holds %d keys, the source %d", len(after), len(kvs))
	}
	return len(kvs), nil
}

// etcdTLS loads the mutual-TLS material for etcd: all three files, or none
// (then only loopback endpoints are accepted by the store).
func etcdTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, fmt.Errorf("%w: --etcd-ca, --etcd-cert and --etcd-key go together", errUsage)
	}
	ca, err := readInput("--etcd-ca", caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("--etcd-ca %s holds no PEM certificate", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: []tls.Certificate{cert}}, nil
}

// openEtcdFlag opens the store an "etcd:URL[,URL…]" flag names.
func openEtcdFlag(ctx context.Context, flagName, spec, prefix string, tlsCfg *tls.Config) (*store.Etcd, error) {
	eps, ok := strings.CutPrefix(spec, "etcd:")
	if !ok || eps == "" {
		return nil, fmt.Errorf("%w: %s must be etcd:URL[,URL…]", errUsage, flagName)
	}
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: strings.Split(eps, ","), Prefix: prefix, TLS: tlsCfg})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	return st, nil
}
