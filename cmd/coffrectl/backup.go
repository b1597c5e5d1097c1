package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
)

// transferKeyPEM is the PEM type of a DR site's transfer key file: the
// 32-byte X-Wing seed, encrypted under a passphrase (cmd/internal/keyfile).
const transferKeyPEM = "COFFRE TRANSFER KEY"

// kdfParams are the Argon2id parameters of new key files (admin, custodian
// and transfer keys): always keyfile.DefaultParams in the binary. Only the
// test binary lowers them, through testKDF, so that golden scripts stay
// fast; no flag or environment variable can weaken them. Every file records
// its own parameters, so opening a file never depends on this.
func kdfParams() keyfile.Params {
	if testKDF != nil {
		return *testKDF
	}
	return keyfile.DefaultParams
}

// testKDF is set by the test binary's TestMain, never by coffrectl itself.
var testKDF *keyfile.Params

// backupCommands are the offline halves of the data-embassy backup: the DR
// site's transfer key, reading a backup's header, and importing it into
// the DR site's store. (`backup export` runs on the primary through the
// quorum-gated server; its client writes the result with
// writeExportedBackup.)
func backupCommands() []*command {
	var (
		out, in, keyFile, passFile string
		storeSpec, prefix          string
		etcdCA, etcdCert, etcdKey  string
		trust                      listFlag
	)
	return []*command{
		{
			path: "backup keygen", args: "", nargs: 0,
			summary: "Make a DR site's transfer key, which backups are sealed to: writes FILE (encrypted under a passphrase, 0600) and FILE.pub, and prints the public key.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&out, "out", "", "private key `FILE` to write")
				fs.StringVar(&passFile, "passphrase-file", "", "read the new passphrase from `FILE` (mode 0600) instead of the terminal")
			},
			run: func(_ context.Context, e *env, _ []string) error {
				if out == "" {
					return fmt.Errorf("%w: --out is required", errUsage)
				}
				if err := refuseExisting("a key", out, out+".pub"); err != nil {
					return err
				}
				pass, err := keyfile.ReadPassphrase(passFile, "passphrase for the new transfer key: ", e.stderr)
				if err != nil {
					return err
				}
				defer clear(pass)
				k, err := seal.GenerateKey()
				if err != nil {
					return err
				}
				defer k.Zero()
				seed := k.Seed()
				defer clear(seed)
				p := kdfParams()
				file, err := keyfile.Encrypt(transferKeyPEM, seed, pass, p)
				if err != nil {
					return err
				}
				pub := k.Public()
				if err := atomicfile.WriteFile(out, file, 0o600); err != nil {
					return err
				}
				if err := atomicfile.WriteFile(out+".pub", []byte(pub.String()+"\n"), 0o644); err != nil {
					return err
				}
				if e.g.json {
					return json.NewEncoder(e.stdout).Encode(map[string]string{
						"public_key": pub.String(), "fingerprint": kms.TransferKeyFingerprint(pub), "file": out, "public_file": out + ".pub",
					})
				}
				fmt.Fprintf(e.stdout, "%s\n", pub)
				fmt.Fprintf(e.stderr, "wrote %s and %s.pub (fingerprint %s)\n", out, out, kms.TransferKeyFingerprint(pub))
				return nil
			},
		},
		{
			path: "backup inspect", args: "", nargs: 0,
			summary: "Print a backup's cleartext header (origin, time, claimed signer, transfer key) without any key. Nothing is authenticated until import.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&in, "in", "", "backup `FILE`")
			},
			run: func(_ context.Context, e *env, _ []string) error {
				if in == "" {
					return fmt.Errorf("%w: --in is required", errUsage)
				}
				data, err := readBackupFile(in)
				if err != nil {
					return err
				}
				h, err := kms.InspectBackup(data)
				if err != nil {
					return fmt.Errorf("%s: %w", in, err)
				}
				if e.g.json {
					return json.NewEncoder(e.stdout).Encode(map[string]any{
						"version": h.Version, "origin": h.Origin, "created": h.Created, "signer": h.Signer,
						"recipient": h.Recipient, "size": len(data), "authenticated": false,
					})
				}
				printBackupHeader(e.stdout, h, len(data))
				fmt.Fprintln(e.stdout, "(unauthenticated: backup import checks the signature and every record)")
				return nil
			},
		},
		{
			path: "backup import", args: "", nargs: 0,
			summary: "Check a backup (transfer key, trusted signer, every record) and write it into this site's store; refuses, writing nothing, if the store holds other values under its keys. Stop coffred first when the store is bbolt.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&in, "in", "", "backup `FILE`")
				fs.StringVar(&keyFile, "transfer-key", "", "this site's transfer key `FILE` (backup keygen)")
				fs.StringVar(&passFile, "passphrase-file", "", "read the key's passphrase from `FILE` (mode 0600) instead of the terminal")
				fs.Var(&trust, "trust", "the primary's signer public key `FILE` (as audit keygen writes FILE.pub); repeatable")
				fs.StringVar(&storeSpec, "store", "", "destination `bbolt:PATH` or etcd:URL[,URL…]")
				fs.StringVar(&prefix, "prefix", "/coffre/", "with an etcd store: the deployment's key `PREFIX` (coffred's store.prefix)")
				fs.StringVar(&etcdCA, "etcd-ca", "", "CA `FILE` of the etcd members (mutual TLS; required off loopback)")
				fs.StringVar(&etcdCert, "etcd-cert", "", "client certificate `FILE` for etcd")
				fs.StringVar(&etcdKey, "etcd-key", "", "client key `FILE` for etcd")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if in == "" || keyFile == "" || storeSpec == "" || len(trust) == 0 {
					return fmt.Errorf("%w: --in, --transfer-key, --trust and --store are required", errUsage)
				}
				if !strings.HasPrefix(storeSpec, "bbolt:") && !strings.HasPrefix(storeSpec, "etcd:") {
					return fmt.Errorf("%w: --store must be bbolt:PATH or etcd:URL[,URL…]", errUsage)
				}
				var trusted []*audit.Verifier
				for _, f := range trust {
					b, err := readInput("--trust", f)
					if err != nil {
						return err
					}
					v, err := audit.ParseVerifier(b)
					if err != nil {
						return fmt.Errorf("--trust %s: %w", f, err)
					}
					trusted = append(trusted, v)
				}
				data, err := readBackupFile(in)
				if err != nil {
					return err
				}
				// Read the header first: a file that is not a backup fails
				// before anyone types a passphrase.
				if _, err := kms.InspectBackup(data); err != nil {
					return fmt.Errorf("%s: %w", in, err)
				}
				key, err := readTransferKey(keyFile, passFile, e.stderr)
				if err != nil {
					return err
				}
				defer key.Zero()
				st, err := openBackupStore(ctx, storeSpec, prefix, etcdCA, etcdCert, etcdKey)
				if err != nil {
					return err
				}
				defer st.Close()
				sum, err := kms.ImportBackup(ctx, st, data, kms.ImportOptions{Key: key, Trusted: trusted, Now: time.Now()})
				if err != nil {
					return fmt.Errorf("%s: %w", in, err)
				}
				if e.g.json {
					return json.NewEncoder(e.stdout).Encode(map[string]any{
						"origin": sum.Header.Origin, "created": sum.Header.Created, "signer": sum.Signer,
						"records": sum.Records, "written": sum.Written, "skipped": sum.Skipped, "per_prefix": sum.PerPrefix,
					})
				}
				fmt.Fprintf(e.stdout, "backup of %s made %s (%s ago), signed by trusted key %s\n",
					sum.Header.Origin, stamp(sum.Header.Created), sum.Age.Round(time.Second), sum.Signer)
				prefixes := make([]string, 0, len(sum.PerPrefix))
				for p := range sum.PerPrefix {
					prefixes = append(prefixes, p)
				}
				sort.Strings(prefixes)
				for _, p := range prefixes {
					fmt.Fprintf(e.stdout, "  %-14s %d\n", p, sum.PerPrefix[p])
				}
				fmt.Fprintf(e.stdout, "imported %d records: %d written, %d already present\n", sum.Records, sum.Written, sum.Skipped)
				return nil
			},
		},
	}
}

// writeExportedBackup is the client half of `backup export`: it checks
// that data (what the server returned) is a backup, writes it to out
// atomically (mode 0600; it is sealed, but it is still the key hierarchy)
// without overwriting anything, and prints its header.
func writeExportedBackup(e *env, out string, data []byte) error {
	if out == "" {
		return fmt.Errorf("%w: --out is required", errUsage)
	}
	h, err := kms.InspectBackup(data)
	if err != nil {
		return fmt.Errorf("the server returned something that is not a backup: %w", err)
	}
	if err := refuseExisting("it", out); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(out, data, 0o600); err != nil {
		return err
	}
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{
			"file": out, "origin": h.Origin, "created": h.Created, "signer": h.Signer, "recipient": h.Recipient, "size": len(data),
		})
	}
	fmt.Fprintf(e.stdout, "wrote %s\n", out)
	printBackupHeader(e.stdout, h, len(data))
	return nil
}

func printBackupHeader(w io.Writer, h kms.BackupHeader, size int) {
	fmt.Fprintf(w, "coffre backup v%d, %d bytes\n", h.Version, size)
	fmt.Fprintf(w, "  origin     %s\n", h.Origin)
	fmt.Fprintf(w, "  created    %s\n", h.Created.Format(time.RFC3339))
	fmt.Fprintf(w, "  signer     %s\n", h.Signer)
	fmt.Fprintf(w, "  sealed to  %s\n", h.Recipient)
}

// readBackupFile reads a backup, at most kms.MaxBackupSize bytes.
func readBackupFile(path string) ([]byte, error) {
	f, err := os.Open(path) // #nosec G304 -- the operator names this file
	if err != nil {
		return nil, fmt.Errorf("--in: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("--in: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("--in: %s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, kms.MaxBackupSize+1))
	if err != nil {
		return nil, fmt.Errorf("--in: %w", err)
	}
	if len(b) > kms.MaxBackupSize {
		return nil, fmt.Errorf("--in: %s is larger than a backup may be (%d bytes)", path, kms.MaxBackupSize)
	}
	return b, nil
}

// readTransferKey opens a transfer key file written by backup keygen.
func readTransferKey(path, passFile string, stderr io.Writer) (*seal.PrivateKey, error) {
	file, err := readInput("--transfer-key", path)
	if err != nil {
		return nil, err
	}
	pass, err := keyfile.ReadPassphrase(passFile, "passphrase for "+path+": ", stderr)
	if err != nil {
		return nil, err
	}
	defer clear(pass)
	seed, err := keyfile.Decrypt(transferKeyPEM, file, pass)
	if err != nil {
		return nil, fmt.Errorf("--transfer-key %s: %w", path, err)
	}
	defer clear(seed)
	k, err := seal.NewPrivateKey(seed)
	if err != nil {
		return nil, fmt.Errorf("--transfer-key %s: %w", path, err)
	}
	return k, nil
}

// openBackupStore opens the store a --store flag names: bbolt:PATH or
// etcd:URL[,URL…] (with the etcd TLS flags, as store migrate takes them).
func openBackupStore(ctx context.Context, spec, prefix, caFile, certFile, keyFile string) (store.Store, error) {
	if path, ok := strings.CutPrefix(spec, "bbolt:"); ok {
		if path == "" {
			return nil, fmt.Errorf("%w: --store must be bbolt:PATH or etcd:URL[,URL…]", errUsage)
		}
		st, err := store.OpenBolt(path, store.BoltOptions{})
		if err != nil {
			return nil, fmt.Errorf("--store: %w (is coffred running on it?)", err)
		}
		return st, nil
	}
	tlsCfg, err := etcdTLS(caFile, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	st, err := openEtcdFlag(ctx, "--store", spec, prefix, tlsCfg)
	if err != nil {
		return nil, err
	}
	return st, nil
}
