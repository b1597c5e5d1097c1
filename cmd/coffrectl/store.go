package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
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
			if _, err := etcdEndpoints("--to", to, tlsCfg != nil); err != nil {
				return err
			}
			// OpenBolt creates a missing file: a mistyped path would
			// migrate an empty store and leave a new file behind.
			fi, err := os.Stat(path) // #nosec G703 -- the operator names the store file on purpose
			switch {
			case errors.Is(err, fs.ErrNotExist):
				return fmt.Errorf("--from: %s does not exist: name coffred's store.path", path)
			case err != nil:
				return fmt.Errorf("--from: %w", err)
			case !fi.Mode().IsRegular():
				return fmt.Errorf("--from: %s is not a regular file: name coffred's store.path", path)
			case fi.Size() == 0:
				return fmt.Errorf("--from: %s is an empty file, not a store: name coffred's store.path", path)
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
	if len(kvs) == 0 {
		return 0, errors.New("the source store holds no keys: is it the store coffred uses (its store.path)?")
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
	// The key opens etcd, and so the whole store, to whoever reads it.
	if fi, err := os.Stat(keyFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("--etcd-key %s is readable or writable by group or others (mode %04o): chmod 600 it", keyFile, fi.Mode().Perm())
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}, nil
}

// etcdEndpoints returns the endpoints of an "etcd:URL[,URL…]" flag, each
// one checked as the store checks it: https:// with the TLS flags, only
// plaintext loopback without them.
func etcdEndpoints(flagName, spec string, withTLS bool) ([]string, error) {
	list, ok := strings.CutPrefix(spec, "etcd:")
	if !ok || list == "" {
		return nil, fmt.Errorf("%w: %s must be etcd:URL[,URL…]", errUsage, flagName)
	}
	eps := strings.Split(list, ",")
	for _, ep := range eps {
		if err := store.CheckEtcdEndpoint(ep, withTLS); err != nil {
			hint := ""
			if !withTLS {
				hint = " (--etcd-ca, --etcd-cert and --etcd-key give TLS)"
			}
			return nil, fmt.Errorf("%w: %s: endpoint %q: %v%s", errUsage, flagName, ep, err, hint)
		}
	}
	return eps, nil
}

// openEtcdFlag opens the store an "etcd:URL[,URL…]" flag names.
func openEtcdFlag(ctx context.Context, flagName, spec, prefix string, tlsCfg *tls.Config) (*store.Etcd, error) {
	eps, err := etcdEndpoints(flagName, spec, tlsCfg != nil)
	if err != nil {
		return nil, err
	}
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: eps, Prefix: prefix, TLS: tlsCfg})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	return st, nil
}
