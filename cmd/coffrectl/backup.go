package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
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

// backupCommands are the halves of the data-embassy backup that are not
// proposals: the DR site's transfer key, reading a backup's header and
// importing it into the DR site's store (offline), and fetching or
// deleting the backup an executed export keeps on the primary's server.
// (`backup export` is a quorum proposal; the approval that executes it
// fetches the backup with fetchBackup.)
func backupCommands() []*command {
	var (
		out, in, keyFile, passFile string
		storeSpec, prefix          string
		etcdCA, etcdCert, etcdKey  string
		trust                      listFlag
		proposal                   string
	)
	return []*command{
		{
			path: "backup fetch", args: "", nargs: 0,
			summary: "Fetch the backup an executed backup export keeps on the server (--proposal ID or a unique prefix) into --out, checking its size and SHA-256; it can be fetched again until backup delete.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&proposal, "proposal", "", "the executed backup export's proposal `ID`")
				fs.StringVar(&out, "out", "", "`FILE` to write the backup to (must not exist)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if proposal == "" || out == "" {
					return fmt.Errorf("%w: --proposal and --out are required", errUsage)
				}
				if err := refuseExisting("it", out); err != nil {
					return fmt.Errorf("--out: %w", err)
				}
				c, closeConn, err := adminClient(e.g)
				if err != nil {
					return err
				}
				defer closeConn()
				return fetchBackup(ctx, e, c, proposal, out, nil)
			},
		},
		{
			path: "backup delete", args: "", nargs: 0,
			summary: "Delete the backup an executed backup export keeps on the server (--proposal ID), once the DR site has it; the proposal stays in the history.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&proposal, "proposal", "", "the executed backup export's proposal `ID`")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if proposal == "" {
					return fmt.Errorf("%w: --proposal is required", errUsage)
				}
				c, closeConn, err := adminClient(e.g)
				if err != nil {
					return err
				}
				defer closeConn()
				ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				defer cancel()
				m, err := c.DeleteBackup(ctx, &coffrev1.DeleteBackupRequest{ProposalId: proposal})
				if err != nil {
					return rpcError(err)
				}
				if e.g.json {
					return printMessage(e.stdout, m, true)
				}
				fmt.Fprintf(e.stdout, "deleted the stored backup of proposal %s\n", proposal)
				printBackupManifest(e.stdout, m)
				return nil
			},
		},
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

// finishExport fetches the backup of export proposal p, which has just
// executed with result r, into backupOut. The backup is stored on the
// server whatever happens here, so every failure says how to fetch it.
func finishExport(ctx context.Context, e *env, c coffrev1.AdminServiceClient, p *coffrev1.Proposal, r *coffrev1.ExportBackupResponse) error {
	if inline := r.GetBackup(); r.GetStored() == nil && len(inline) > 0 {
		// A server from before stored backups: the result is the backup.
		return writeExportedBackup(e, backupOut, inline)
	}
	again := fmt.Sprintf("coffrectl backup fetch --proposal %s --out FILE", short(p.GetId()))
	if backupOut == "" {
		fmt.Fprintf(e.stderr, "the backup is stored on the server; fetch it with: %s\n", again)
		return printProposal(e.stdout, p, e.g.json)
	}
	if err := fetchBackup(ctx, e, c, p.GetId(), backupOut, r.GetStored()); err != nil {
		return fmt.Errorf("the backup is stored on the server, but fetching it failed: %w (fetch it again with: %s)", err, again)
	}
	return nil
}

// fetchBackup streams the backup that executed export proposal id keeps on
// the server into out: written atomically (mode 0600: it is sealed, but it
// is still the key hierarchy), never over an existing file, and only once
// its size and SHA-256 match the server's manifest — and want, the
// manifest of the proposal's result, when the caller has it — and it reads
// as a backup. Each call has its own --timeout; a call cut short after
// some progress (deadline, lost connection) is resumed where it stopped.
func fetchBackup(ctx context.Context, e *env, c coffrev1.AdminServiceClient, id, out string, want *coffrev1.BackupManifest) error {
	if err := refuseExisting("it", out); err != nil {
		return err
	}
	f := &backupFetch{id: id, want: want, hash: sha256.New()}
	err := atomicfile.Write(out, 0o600, func(w io.Writer) error {
		for {
			before := f.off
			done, err := f.call(ctx, e, c, w)
			if done {
				// Size and hash match what the server stored; that it
				// reads as a backup is checked before the file appears.
				if _, err := kms.InspectBackup(f.head); err != nil {
					return fmt.Errorf("the server's backup is not a backup: %w", err)
				}
				return nil
			}
			if st, ok := status.FromError(err); ok && f.off > before && f.manifest != nil &&
				(st.Code() == codes.DeadlineExceeded || st.Code() == codes.Unavailable) && ctx.Err() == nil {
				continue
			}
			return err
		}
	})
	if err != nil {
		return err
	}
	h, err := kms.InspectBackup(f.head)
	if err != nil {
		return err // checked above
	}
	m := f.manifest
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{
			"file": out, "proposal": id, "origin": h.Origin, "created": h.Created, "signer": h.Signer,
			"recipient": h.Recipient, "size": m.GetSize(), "sha256": m.GetSha256(),
		})
	}
	fmt.Fprintf(e.stdout, "wrote %s\n", out)
	printBackupHeader(e.stdout, h, int(min(m.GetSize(), kms.MaxBackupSize))) // #nosec G115 -- bounded
	fmt.Fprintf(e.stdout, "  sha256     %s (checked)\n", m.GetSha256())
	return nil
}

// backupFetch is the state of one fetchBackup across its calls.
type backupFetch struct {
	id       string
	want     *coffrev1.BackupManifest
	manifest *coffrev1.BackupManifest
	off      uint64
	hash     hash.Hash
	head     []byte // the first bytes, for the header
}

// call makes one FetchBackup call from f.off, writing what it receives to
// w; done means the whole backup arrived and checked out.
func (f *backupFetch) call(ctx context.Context, e *env, c coffrev1.AdminServiceClient, w io.Writer) (done bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
	defer cancel()
	stream, err := c.FetchBackup(ctx, &coffrev1.FetchBackupRequest{ProposalId: f.id, Offset: f.off})
	if err != nil {
		return false, rpcErrorKeep(err)
	}
	first, err := stream.Recv()
	if err != nil {
		return false, rpcErrorKeep(err)
	}
	m := first.GetManifest()
	if m == nil || len(first.GetData()) > 0 {
		return false, errors.New("the server's stream does not start with the backup's manifest")
	}
	if err := f.setManifest(m); err != nil {
		return false, err
	}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return false, rpcErrorKeep(err)
		}
		data := msg.GetData()
		if msg.GetManifest() != nil || msg.GetOffset() != f.off || len(data) == 0 || uint64(len(data)) > f.manifest.GetSize()-f.off {
			return false, fmt.Errorf("the server sent bytes %d..%d of a %d-byte backup, expected them from %d",
				msg.GetOffset(), msg.GetOffset()+uint64(len(data)), f.manifest.GetSize(), f.off)
		}
		if _, err := w.Write(data); err != nil {
			return false, err
		}
		f.hash.Write(data)
		if n := maxBackupHead - len(f.head); n > 0 {
			f.head = append(f.head, data[:min(n, len(data))]...)
		}
		f.off += uint64(len(data))
	}
	if f.off != f.manifest.GetSize() {
		return false, fmt.Errorf("the server's stream ended after %d of %d bytes", f.off, f.manifest.GetSize())
	}
	if got := hex.EncodeToString(f.hash.Sum(nil)); got != f.manifest.GetSha256() {
		return false, fmt.Errorf("the backup received hashes to %s, its manifest says %s: nothing written", got, f.manifest.GetSha256())
	}
	return true, nil
}

// maxBackupHead is how much of the start of a backup is kept to read its
// header (which is at most 1 KiB).
const maxBackupHead = 4 << 10

// setManifest checks the manifest a call starts with: well formed, the one
// the proposal's result names, and the same on every call of one fetch.
func (f *backupFetch) setManifest(m *coffrev1.BackupManifest) error {
	if sum, err := hex.DecodeString(m.GetSha256()); err != nil || len(sum) != sha256.Size || m.GetSize() == 0 || m.GetSize() > kms.MaxBackupSize {
		return fmt.Errorf("the server's backup manifest is malformed (size %d, sha256 %.80q)", m.GetSize(), m.GetSha256())
	}
	if f.want != nil && (m.GetSize() != f.want.GetSize() || m.GetSha256() != f.want.GetSha256()) {
		return fmt.Errorf("the server streams a backup of %d bytes with SHA-256 %s, but the proposal's result names one of %d bytes with SHA-256 %s",
			m.GetSize(), m.GetSha256(), f.want.GetSize(), f.want.GetSha256())
	}
	if f.manifest != nil && (m.GetSize() != f.manifest.GetSize() || m.GetSha256() != f.manifest.GetSha256()) {
		return errors.New("the server's backup changed between two calls of one fetch")
	}
	f.manifest = m
	return nil
}

// rpcErrorKeep is rpcError that keeps the status for errors.As and
// status.FromError (a fetch resumes on some codes).
func rpcErrorKeep(err error) error {
	if s, ok := status.FromError(err); ok {
		return &statusError{s: s}
	}
	return err
}

type statusError struct{ s *status.Status }

func (e *statusError) Error() string { return e.s.Code().String() + ": " + e.s.Message() }

// GRPCStatus lets status.FromError see through to the status.
func (e *statusError) GRPCStatus() *status.Status { return e.s }

func printBackupManifest(w io.Writer, m *coffrev1.BackupManifest) {
	fmt.Fprintf(w, "  size       %d bytes\n", m.GetSize())
	fmt.Fprintf(w, "  sha256     %s\n", m.GetSha256())
	fmt.Fprintf(w, "  stored     %s\n", stamp(m.GetCreateTime().AsTime()))
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
