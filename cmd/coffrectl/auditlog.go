package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func auditCommands() []*command {
	var (
		follow                        bool
		last                          uint64
		dir, verifierFile, witnessKey string
		verifierFiles                 listFlag
		storeSpec, prefix, node       string
		etcdCA, etcdCert, etcdKey     string
		stateFile, keyName, keyOut    string
		index                         uint64
	)
	return []*command{
		{
			path: "audit tail", args: "", nargs: 0,
			summary: "Print the last entries of the node's audit log, up to its latest signed checkpoint (published at least every second; --follow keeps following it, entry by entry). Needs an auditor certificate.",
			flags: func(fs *flag.FlagSet) {
				fs.BoolVar(&follow, "follow", false, "keep printing new entries until interrupted")
				fs.Uint64Var(&last, "n", 20, "how many of the latest entries to print first")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				conn, err := dial(e.g)
				if err != nil {
					return err
				}
				defer conn.Close()
				c := coffrev1.NewAuditServiceClient(conn)
				cctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				cp, err := c.GetCheckpoint(cctx, &coffrev1.GetCheckpointRequest{})
				cancel()
				if err != nil {
					return rpcError(err)
				}
				if cp.GetSize() == 0 && !follow {
					fmt.Fprintln(e.stdout, "the audit log has no checkpointed entry yet")
					return nil
				}
				from := uint64(0)
				if cp.GetSize() > last {
					from = cp.GetSize() - last
				}
				sctx, cancel := context.WithCancel(ctx)
				defer cancel()
				stream, err := c.Stream(sctx, &coffrev1.StreamRequest{FromIndex: from})
				if err != nil {
					return rpcError(err)
				}
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				if !e.g.json {
					fmt.Fprintln(tw, "INDEX\tTIME\tDECISION\tOPERATION\tACTOR\tKEYRING\tREASON")
				}
				for {
					rec, err := stream.Recv()
					if err != nil {
						if errors.Is(err, io.EOF) || ctx.Err() != nil {
							return tw.Flush()
						}
						return rpcError(err)
					}
					if err := printEntry(tw, rec, e.g.json); err != nil {
						return err
					}
					if !follow && rec.GetIndex()+1 >= cp.GetSize() {
						return tw.Flush()
					}
					if follow {
						if err := tw.Flush(); err != nil {
							return err
						}
					}
				}
			},
		},
		{
			path: "audit verify", args: "", nargs: 0,
			summary: "Verify audit logs offline — a node's directory (--dir), or the copies every node replicated to etcd (--store; --node for one): entries contiguous and canonical, checkpoint signatures, and every retained checkpoint's root against the entries (no fork). With --dir, --store and --node, also that the local log and its replicated copy agree. Exits 1 naming the first bad node or entry.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&storeSpec, "store", "", "verify the copies replicated to `etcd:URL[,URL…]` (every node under audit/, or --node's)")
				fs.StringVar(&prefix, "prefix", "/coffre/", "with --store: the deployment's key `PREFIX` (coffred's store.prefix)")
				fs.StringVar(&node, "node", "", "with --store: only this node's `ID` (its audit.node_id); with --dir too, compare the two copies")
				fs.StringVar(&etcdCA, "etcd-ca", "", "with --store: CA `FILE` of the etcd members")
				fs.StringVar(&etcdCert, "etcd-cert", "", "with --store: client certificate `FILE` for etcd")
				fs.StringVar(&etcdKey, "etcd-key", "", "with --store: client key `FILE` for etcd")
				fs.StringVar(&dir, "dir", os.Getenv("COFFRE_AUDIT_DIR"), "the audit log `DIR` (env COFFRE_AUDIT_DIR)")
				verifierFiles = nil
				fs.Var(&verifierFiles, "verifier", "a trusted checkpoint verifier key `FILE`, or a DIR of *.pub files; repeat for several nodes' keys (env COFFRE_AUDIT_VERIFIER)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if len(verifierFiles) == 0 {
					if env := os.Getenv("COFFRE_AUDIT_VERIFIER"); env != "" {
						verifierFiles = listFlag{env}
					}
				}
				keys, err := loadVerifiers(verifierFiles)
				if err != nil {
					return err
				}
				if storeSpec == "" {
					if dir == "" {
						return fmt.Errorf("%w: --dir or --store is required", errUsage)
					}
					return verifyLocalAudit(e, dir, keys)
				}
				if dir != "" && node == "" {
					return fmt.Errorf("%w: --dir with --store needs --node (the node whose directory it is)", errUsage)
				}
				tlsCfg, err := etcdTLS(etcdCA, etcdCert, etcdKey)
				if err != nil {
					return err
				}
				st, err := openEtcdFlag(ctx, "--store", storeSpec, prefix, tlsCfg)
				if err != nil {
					return err
				}
				defer st.Close()
				var results []kms.AuditReplicaResult
				if node != "" {
					rep, err := kms.VerifyReplicatedAudit(ctx, st, node, keys.verifiers)
					var re *kms.AuditReplicaError
					if err != nil && !errors.As(err, &re) {
						return err
					}
					results = []kms.AuditReplicaResult{{Node: node, Report: rep, Err: err}}
				} else {
					if results, err = kms.VerifyReplicatedAudits(ctx, st, keys.verifiers); err != nil {
						return err
					}
					if len(results) == 0 {
						return fmt.Errorf("no node has replicated an audit log under audit/ in %s (prefix %s)", storeSpec, prefix)
					}
				}
				var firstBad error
				failed := 0
				for _, r := range results {
					if r.Err != nil {
						failed++
						if firstBad == nil {
							firstBad = r.Err
						}
					}
					if err := printReplicaResult(e, r, keys); err != nil {
						return err
					}
				}
				if firstBad != nil {
					return fmt.Errorf("replicated audit log does not verify: %w (%d of %d nodes failed)", firstBad, failed, len(results))
				}
				if dir != "" {
					return compareLocalAudit(e, dir, keys, results[0].Report)
				}
				return nil
			},
		},
		{
			path: "audit prove", args: "", nargs: 0,
			summary: "Prove that entry --index is in the node's log: fetch it, the latest checkpoint (signatures checked) and an inclusion proof, and verify them here.",
			flags: func(fs *flag.FlagSet) {
				fs.Uint64Var(&index, "index", 0, "the entry `INDEX`")
				fs.StringVar(&verifierFile, "verifier", os.Getenv("COFFRE_AUDIT_VERIFIER"), "the log's checkpoint verifier key `FILE` (env COFFRE_AUDIT_VERIFIER)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				v, err := loadVerifier(verifierFile)
				if err != nil {
					return err
				}
				conn, err := dial(e.g)
				if err != nil {
					return err
				}
				defer conn.Close()
				c := coffrev1.NewAuditServiceClient(conn)
				cctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				defer cancel()
				cp, err := verifiedCheckpoint(cctx, c, v)
				if err != nil {
					return err
				}
				if index >= cp.Size {
					return fmt.Errorf("entry %d is not covered by the latest checkpoint (size %d); try again in a second", index, cp.Size)
				}
				stream, err := c.Stream(cctx, &coffrev1.StreamRequest{FromIndex: index})
				if err != nil {
					return rpcError(err)
				}
				rec, err := stream.Recv()
				if err != nil {
					return rpcError(err)
				}
				if rec.GetIndex() != index {
					return fmt.Errorf("the server sent entry %d for %d", rec.GetIndex(), index)
				}
				proof, err := c.GetInclusionProof(cctx, &coffrev1.GetInclusionProofRequest{Index: index, Size: cp.Size})
				if err != nil {
					return rpcError(err)
				}
				if err := audit.VerifyInclusion(rec.GetEntry(), index, cp.Size, proof.GetHashes(), cp.Root); err != nil {
					return fmt.Errorf("entry %d is NOT proven in checkpoint %d: %w", index, cp.Size, err)
				}
				if e.g.json {
					return json.NewEncoder(e.stdout).Encode(map[string]any{"index": index, "checkpoint_size": cp.Size,
						"root": base64.StdEncoding.EncodeToString(cp.Root), "entry": json.RawMessage(rec.GetEntry())})
				}
				fmt.Fprintf(e.stdout, "entry %d is included in checkpoint %s size %d root %s\n%s\n",
					index, cp.Origin, cp.Size, base64.StdEncoding.EncodeToString(cp.Root), rec.GetEntry())
				return nil
			},
		},
		{
			path: "audit witness", args: "", nargs: 0,
			summary: "As a witness: check the latest checkpoint is consistent with the last one you saw, cosign it and store the cosignature on the node.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&verifierFile, "verifier", os.Getenv("COFFRE_AUDIT_VERIFIER"), "the log's checkpoint verifier key `FILE` (env COFFRE_AUDIT_VERIFIER)")
				fs.StringVar(&witnessKey, "witness-key", "", "the witness's signer key `FILE` (audit keygen makes one)")
				fs.StringVar(&stateFile, "state", "", "`FILE` keeping the last checkpoint this witness cosigned")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				v, err := loadVerifier(verifierFile)
				if err != nil {
					return err
				}
				if witnessKey == "" || stateFile == "" {
					return fmt.Errorf("%w: --witness-key and --state are required", errUsage)
				}
				kb, err := os.ReadFile(witnessKey) // #nosec G304 -- the operator names this file
				if err != nil {
					return err
				}
				w, err := audit.ParseSigner(kb)
				clear(kb)
				if err != nil {
					return fmt.Errorf("--witness-key: %w", err)
				}
				var prev *audit.Checkpoint
				if b, err := os.ReadFile(stateFile); err == nil { // #nosec G304 -- the operator names this file
					p, err := audit.ParseCheckpoint(b, v)
					if err != nil {
						return fmt.Errorf("--state %s: %w", stateFile, err)
					}
					prev = &p
				} else if !errors.Is(err, os.ErrNotExist) {
					return err
				}
				conn, err := dial(e.g)
				if err != nil {
					return err
				}
				defer conn.Close()
				c := coffrev1.NewAuditServiceClient(conn)
				cctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				defer cancel()
				next, err := verifiedCheckpoint(cctx, c, v)
				if err != nil {
					return err
				}
				var proof [][]byte
				if prev != nil {
					if next.Size < prev.Size {
						return fmt.Errorf("ROLLBACK: the node's log shrank from %d to %d entries", prev.Size, next.Size)
					}
					p, err := c.GetConsistencyProof(cctx, &coffrev1.GetConsistencyProofRequest{From: prev.Size, To: next.Size})
					if err != nil {
						return rpcError(err)
					}
					proof = p.GetHashes()
				}
				cosig, err := audit.Cosign(w, prev, next, proof, v)
				if err != nil {
					return fmt.Errorf("refusing to cosign: %w", err)
				}
				note := append(append([]byte(nil), next.Note...), cosig...)
				if _, err := c.AddCosignature(cctx, &coffrev1.AddCosignatureRequest{Note: note}); err != nil {
					return rpcError(err)
				}
				if err := atomicfile.WriteFile(stateFile, next.Note, 0o600); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "cosigned checkpoint %s size %d (consistent with %d)\n", next.Origin, next.Size, sizeOf(prev))
				return nil
			},
		},
		{
			path: "audit keygen", args: "", nargs: 0,
			summary: "Make a checkpoint signer key (Ed25519 + ML-DSA-65): for a witness, or a node's audit log. Writes FILE (0600) and FILE.pub.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&keyName, "name", "", "the key's note `NAME`, e.g. witness.cnil.example")
				fs.StringVar(&keyOut, "out", "", "private key `FILE` to write")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if keyName == "" || keyOut == "" {
					return fmt.Errorf("%w: --name and --out are required", errUsage)
				}
				if err := refuseExisting("a key", keyOut); err != nil {
					return err
				}
				s, err := audit.GenerateSigner(keyName)
				if err != nil {
					return err
				}
				b, err := s.MarshalPrivate()
				if err != nil {
					return err
				}
				defer clear(b)
				if err := atomicfile.WriteFile(keyOut, b, 0o600); err != nil {
					return err
				}
				if err := atomicfile.WriteFile(keyOut+".pub", s.Verifier().Marshal(), 0o644); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "wrote %s and %s.pub\n", keyOut, keyOut)
				return nil
			},
		},
	}
}

func sizeOf(c *audit.Checkpoint) uint64 {
	if c == nil {
		return 0
	}
	return c.Size
}

func loadVerifier(path string) (*audit.Verifier, error) {
	if path == "" {
		return nil, fmt.Errorf("%w: --verifier is required (the log's public checkpoint key; dev: var/dev/audit-verifier.pub)", errUsage)
	}
	b, err := readInput("--verifier", path)
	if err != nil {
		return nil, err
	}
	v, err := audit.ParseVerifier(b)
	if err != nil {
		return nil, fmt.Errorf("--verifier %s: %w", path, err)
	}
	return v, nil
}

func printEntry(w io.Writer, rec *coffrev1.AuditRecord, asJSON bool) error {
	if asJSON {
		_, err := fmt.Fprintf(w, "%s\n", rec.GetEntry())
		return err
	}
	var en audit.Entry
	if err := json.Unmarshal(rec.GetEntry(), &en); err != nil {
		return fmt.Errorf("entry %d: %w", rec.GetIndex(), err)
	}
	_, err := fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s:%s\t%s\t%s\n", rec.GetIndex(), stamp(en.Time), en.Decision, en.Operation,
		en.Actor.Kind, en.Actor.ID, en.Keyring, en.Reason)
	return err
}

// verifyErr words a verification failure, naming the first bad entry.
func verifyErr(where string, err error) error {
	var ve *audit.VerifyError
	if errors.As(err, &ve) {
		if ve.Index >= 0 {
			return fmt.Errorf("audit log %s does not verify: entry %d: %s", where, ve.Index, ve.Reason)
		}
		return fmt.Errorf("audit log %s does not verify: checkpoint: %s", where, ve.Reason)
	}
	return err
}

// trustedKeys are the checkpoint verifier keys given to audit verify, with
// the file each came from (to say which one verified a node).
type trustedKeys struct {
	verifiers []*audit.Verifier
	files     []string
}

// loadVerifiers reads each --verifier: a key file, or a directory whose
// *.pub files are keys.
func loadVerifiers(paths []string) (trustedKeys, error) {
	var k trustedKeys
	if len(paths) == 0 {
		return k, fmt.Errorf("%w: --verifier is required (a log's public checkpoint key, or a directory of them; dev: var/dev/audit-verifier.pub)", errUsage)
	}
	for _, p := range paths {
		files := []string{p}
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			des, err := os.ReadDir(p)
			if err != nil {
				return k, fmt.Errorf("--verifier: %w", err)
			}
			files = files[:0]
			for _, de := range des {
				if !de.IsDir() && strings.HasSuffix(de.Name(), ".pub") {
					files = append(files, filepath.Join(p, de.Name()))
				}
			}
			if len(files) == 0 {
				return k, fmt.Errorf("--verifier %s: the directory holds no *.pub key", p)
			}
		}
		for _, f := range files {
			v, err := loadVerifier(f)
			if err != nil {
				return k, err
			}
			k.verifiers = append(k.verifiers, v)
			k.files = append(k.files, f)
		}
	}
	return k, nil
}

// verifyLocalAudit verifies a log directory with the first trusted key
// that verifies its checkpoints; if none does, the error is the first
// key's.
func verifyLocalAudit(e *env, dir string, keys trustedKeys) error {
	var firstErr error
	for i, v := range keys.verifiers {
		rep, err := audit.VerifyDir(dir, v)
		if err != nil {
			if firstErr == nil {
				firstErr = verifyErr(dir, err)
			}
			continue
		}
		if e.g.json {
			return json.NewEncoder(e.stdout).Encode(map[string]any{
				"entries": rep.Entries, "checkpoints": rep.Checkpoints, "checkpoint_size": rep.LastSize,
				"checkpoint_root": base64.StdEncoding.EncodeToString(rep.LastRoot), "root": base64.StdEncoding.EncodeToString(rep.Root),
				"key": v.Name(), "key_file": keys.files[i],
			})
		}
		fmt.Fprintf(e.stdout, "audit log of %s verified: %d entries, %d checkpoints, latest checkpoint at size %d, root %s, key %s (%s)\n",
			dir, rep.Entries, rep.Checkpoints, rep.LastSize, base64.StdEncoding.EncodeToString(rep.Root), v.Name(), keys.files[i])
		return nil
	}
	return firstErr
}

// printReplicaResult prints one node's line (or JSON object).
func printReplicaResult(e *env, r kms.AuditReplicaResult, keys trustedKeys) error {
	b64 := base64.StdEncoding.EncodeToString
	if e.g.json {
		m := map[string]any{"node": r.Node, "ok": r.Err == nil}
		if r.Err != nil {
			m["error"] = r.Err.Error()
		} else {
			rep := r.Report
			m["origin"], m["entries"], m["checkpoints"] = rep.Origin, rep.Entries, rep.Checkpoints
			m["checkpoint_size"], m["checkpoint_root"], m["root"] = rep.LatestSize, b64(rep.LatestRoot), b64(rep.Root)
			m["key"], m["key_file"] = keys.verifiers[rep.Verifier].Name(), keys.files[rep.Verifier]
			m["unsigned_entries"] = rep.Entries - rep.LatestSize
		}
		return json.NewEncoder(e.stdout).Encode(m)
	}
	if r.Err != nil {
		why := r.Err.Error()
		var re *kms.AuditReplicaError
		if errors.As(r.Err, &re) {
			why = re.Detail
		}
		_, err := fmt.Fprintf(e.stdout, "audit log of node %s (replicated) FAILED: %s\n", r.Node, why)
		return err
	}
	rep := r.Report
	if _, err := fmt.Fprintf(e.stdout, "audit log of node %s (replicated) verified: %d entries, %d checkpoints, latest checkpoint at size %d, root %s, key %s (%s)\n",
		rep.Node, rep.Entries, rep.Checkpoints, rep.LatestSize, b64(rep.Root), keys.verifiers[rep.Verifier].Name(), keys.files[rep.Verifier]); err != nil {
		return err
	}
	if rep.Entries > rep.LatestSize {
		// Written after the node's last checkpoint (it stopped, or was
		// lost, before the next): well formed and in order, but whoever can
		// write to the store could have changed or cut them.
		_, err := fmt.Fprintf(e.stdout, "  warning: entries %d..%d come after the latest checkpoint and are not covered by a signature\n",
			rep.LatestSize, rep.Entries-1)
		return err
	}
	return nil
}

// compareLocalAudit verifies the node's local log directory with the key
// that verified its replicated copy, then checks that the two agree on
// every entry both hold (their roots at the smaller size). Entries the
// local log holds beyond the replica were written but never replicated:
// with replication on, their calls were refused, not acknowledged.
func compareLocalAudit(e *env, dir string, keys trustedKeys, rr *kms.AuditReplicaReport) error {
	v := keys.verifiers[rr.Verifier]
	rep, err := audit.VerifyDir(dir, v)
	if err != nil {
		return verifyErr(dir, err)
	}
	b64 := base64.StdEncoding.EncodeToString
	size := min(rep.Entries, rr.Entries)
	want, err := rep.RootAt(size)
	if err != nil {
		return err
	}
	got, err := rr.RootAt(size)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("audit log of %s and the copy node %s replicated FORK: at size %d the local root is %s, the replicated %s",
			dir, rr.Node, size, b64(want), b64(got))
	}
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{"node": rr.Node, "dir": dir, "local_entries": rep.Entries,
			"replicated_entries": rr.Entries, "compared_size": size, "root": b64(want)})
	}
	fmt.Fprintf(e.stdout, "audit log of %s (%d entries) agrees with the copy node %s replicated (%d entries) on the first %d entries, root %s\n",
		dir, rep.Entries, rr.Node, rr.Entries, size, b64(want))
	switch {
	case rep.Entries > rr.Entries:
		fmt.Fprintf(e.stdout, "  entries %d..%d are only in the local log: written, never replicated, so their calls were refused (not acknowledged)\n",
			rr.Entries, rep.Entries-1)
	case rr.Entries > rep.Entries:
		fmt.Fprintf(e.stdout, "  entries %d..%d are only in the replica: the local log has lost them (restored from an older copy?)\n",
			rep.Entries, rr.Entries-1)
	}
	return nil
}

// verifiedCheckpoint fetches the node's latest checkpoint and verifies its
// signature with v.
func verifiedCheckpoint(ctx context.Context, c coffrev1.AuditServiceClient, v *audit.Verifier) (audit.Checkpoint, error) {
	m, err := c.GetCheckpoint(ctx, &coffrev1.GetCheckpointRequest{})
	if err != nil {
		return audit.Checkpoint{}, rpcError(err)
	}
	cp, err := audit.ParseCheckpoint(m.GetNote(), v)
	if err != nil {
		return audit.Checkpoint{}, fmt.Errorf("the node's checkpoint does not verify: %w", err)
	}
	return cp, nil
}
