package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/ceremony"
	"github.com/coffre-kms/coffre/kms/seal"
)

const defaultCeremonyAuditDir = "ceremony-audit"

func ceremonyCommands() []*command {
	var (
		root, sharesDir, auditDir string
		recoverable               bool
		threshold                 int
		custodians                listFlag
		shareFiles, custodianKeys listFlag
		passFiles                 listFlag
	)
	auditFlag := func(fs *flag.FlagSet) {
		fs.StringVar(&auditDir, "audit-dir", defaultCeremonyAuditDir, "the ceremony's signed audit log `DIR` (created 0700 with its signer key on first use)")
	}
	rootFlag := func(fs *flag.FlagSet) {
		fs.StringVar(&root, "root", "", "the root key as a pkcs11: `URI` (RFC 7512) with module-path and pin-source=file:…")
	}
	return []*command{
		{
			path: "ceremony init", args: "", nargs: 0,
			summary: "Create the root key inside the HSM named by --root (AES-256, sensitive, never extractable); with --recoverable, split it into custodian shares first.",
			flags: func(fs *flag.FlagSet) {
				rootFlag(fs)
				auditFlag(fs)
				fs.BoolVar(&recoverable, "recoverable", false, "generate the root in locked memory, split it into sealed custodian shares, import it non-extractable and zeroize it (instead of generating it inside the HSM)")
				fs.Var(&custodians, "custodian", "with --recoverable: a custodian's public key (`PUB` text or FILE.pub); repeat once per custodian (N)")
				fs.IntVar(&threshold, "threshold", 0, "with --recoverable: how many custodians (`M`) are needed to restore the root")
				fs.StringVar(&sharesDir, "shares", "", "with --recoverable: `DIR` to write share-<i>-of-<n>.txt into (0600)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if root == "" {
					return fmt.Errorf("%w: --root is required", errUsage)
				}
				if _, err := hsm.ParseURI(root); err != nil {
					return fmt.Errorf("%w: --root: %v", errUsage, err)
				}
				if !recoverable {
					if len(custodians) > 0 || threshold != 0 || sharesDir != "" {
						return fmt.Errorf("%w: --custodian, --threshold and --shares need --recoverable", errUsage)
					}
					return ceremonyInitHSM(ctx, e, root, auditDir)
				}
				return ceremonyInitRecoverable(ctx, e, root, auditDir, custodians, threshold, sharesDir)
			},
		},
		{
			path: "ceremony restore", args: "", nargs: 0,
			summary: "Rebuild a recoverable root key from M custodian shares into a new, empty HSM token (--root), then prove it by a wrap/unwrap self-test.",
			flags: func(fs *flag.FlagSet) {
				rootFlag(fs)
				auditFlag(fs)
				fs.Var(&shareFiles, "share", "a custodian share `FILE`; repeat for each custodian present")
				fs.Var(&custodianKeys, "custodian-key", "a custodian's private key `FILE`; repeat, one per --share (matched to the share sealed to it)")
				fs.Var(&passFiles, "passphrase-file", "the passphrase `FILE` of the custodian key given in the same position; without any, each custodian types theirs on the terminal")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				switch {
				case root == "":
					return fmt.Errorf("%w: --root is required", errUsage)
				case len(shareFiles) == 0:
					return fmt.Errorf("%w: --share is required (one per custodian present)", errUsage)
				case len(custodianKeys) != len(shareFiles):
					return fmt.Errorf("%w: %d --share and %d --custodian-key: give one custodian key per share", errUsage, len(shareFiles), len(custodianKeys))
				case len(passFiles) != 0 && len(passFiles) != len(custodianKeys):
					return fmt.Errorf("%w: %d --passphrase-file for %d --custodian-key: give one per key, or none to type them", errUsage, len(passFiles), len(custodianKeys))
				}
				if _, err := hsm.ParseURI(root); err != nil {
					return fmt.Errorf("%w: --root: %v", errUsage, err)
				}
				return ceremonyRestore(ctx, e, root, auditDir, shareFiles, custodianKeys, passFiles)
			},
		},
	}
}

// ceremonyInitHSM generates the root inside the HSM: it never exists
// anywhere else and can never be restored from outside.
func ceremonyInitHSM(ctx context.Context, e *env, root, auditDir string) (err error) {
	al, err := openCeremonyAudit(auditDir, e.stderr)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, al.close()) }()
	op := "ceremony.init"
	if err := al.step(ctx, op+".generate_in_hsm", audit.Allow, "generating root "+keyIDOf(root)+" inside the HSM", ""); err != nil {
		return err
	}
	r, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: root})
	if errors.Is(err, hsm.ErrKeyExists) {
		err = fmt.Errorf("the HSM already holds this root key; nothing was changed (%w)", err)
	}
	if err != nil {
		return al.fail(ctx, op, "", err)
	}
	defer r.Close()
	attrs, err := r.Attributes(ctx)
	if err != nil {
		return al.fail(ctx, op, "", fmt.Errorf("root created, but reading back its attributes failed: %w", err))
	}
	// Check what the HSM reports, not what was asked for.
	if !attrs.Sensitive || attrs.Extractable || !attrs.NeverExtractable || attrs.Wrap || attrs.Unwrap {
		return al.fail(ctx, op, "", fmt.Errorf("root %s was created but the HSM reports unsafe attributes %+v: destroy it and check the HSM", r.ID(), attrs))
	}
	if err := al.step(ctx, op+".done", audit.Allow, "root "+r.ID()+" created in the HSM: sensitive, never extractable", ""); err != nil {
		return err
	}
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{"root": r.ID(), "attributes": attrs, "audit_dir": auditDir})
	}
	fmt.Fprintf(e.stdout, "created root key %s\n  AES-%d, sensitive, never extractable, encrypt/decrypt only (no wrap/unwrap)\n", r.ID(), attrs.ValueLen*8)
	return nil
}

func ceremonyInitRecoverable(ctx context.Context, e *env, root, auditDir string, custodianArgs []string, m int, dir string) (err error) {
	n := len(custodianArgs)
	switch {
	case n < ceremony.MinThreshold:
		return fmt.Errorf("%w: --recoverable needs at least %d --custodian (got %d)", errUsage, ceremony.MinThreshold, n)
	case n > ceremony.MaxShares:
		return fmt.Errorf("%w: at most %d --custodian (got %d)", errUsage, ceremony.MaxShares, n)
	case m < ceremony.MinThreshold || m > n:
		return fmt.Errorf("%w: --threshold %d with %d custodians: want %d ≤ M ≤ %d (one custodian alone must never suffice)", errUsage, m, n, ceremony.MinThreshold, n)
	case dir == "":
		return fmt.Errorf("%w: --shares DIR is required with --recoverable", errUsage)
	}
	pks := make([]*seal.PublicKey, n)
	for i, a := range custodianArgs {
		pk, err := parseCustodianPublic(a)
		if err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		pks[i] = pk
	}
	paths := make([]string, n)
	for i := range paths {
		paths[i] = filepath.Join(dir, fmt.Sprintf("share-%d-of-%d.txt", i+1, n))
		if err := refuseExisting("a custodian share", paths[i]); err != nil {
			return err
		}
	}

	al, err := openCeremonyAudit(auditDir, e.stderr)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, al.close()) }()
	const op = "ceremony.init_recoverable"
	p := progress{w: e.stderr, total: 6}
	rootID := keyIDOf(root)
	cust := make([]string, n)
	for i, pk := range pks {
		cust[i] = fingerprint(pk)
	}

	p.step(1, "checking the HSM token and the %d custodian keys", n)
	if err := al.step(ctx, op+".start", audit.Allow, fmt.Sprintf("recoverable root %s, %d-of-%d custodians %s", rootID, m, n, strings.Join(cust, ",")), ""); err != nil {
		return err
	}
	if err := checkEmpty(ctx, root); err != nil {
		return al.fail(ctx, op, "", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return al.fail(ctx, op, "", err)
	}

	p.step(2, "generating the root key in locked memory")
	if err := al.step(ctx, op+".generate", audit.Allow, "generating root "+rootID+" in locked memory and splitting it", ""); err != nil {
		return err
	}
	rk, shares, err := ceremony.Split(ceremony.SplitOptions{
		RootID: rootID, Threshold: m, Custodians: pks,
		Progress: func(i, n int, to *seal.PublicKey) {
			p.step(3, "sealing share %d of %d to %s", i, n, fingerprint(to))
		},
	})
	if err != nil {
		return al.fail(ctx, op, "", err)
	}
	defer rk.Destroy()
	if !rk.Locked() {
		fmt.Fprintln(e.stderr, "coffrectl: warning: the system refused to lock the root key's memory (RLIMIT_MEMLOCK, see ulimit -l): it may reach swap; run ceremonies on a host without swap")
	}
	cid := shares[0].Ceremony
	for i, s := range shares {
		if err := al.step(ctx, op+".seal_share", audit.Allow, fmt.Sprintf("share %d of %d sealed to custodian %s", s.Index, s.Total, cust[i]), cid); err != nil {
			return err
		}
	}

	p.step(4, "writing %d share files to %s", n, dir)
	written := make([]string, 0, n)
	removeWritten := func() {
		// Shares of a root that no HSM holds must not be carried away.
		for _, w := range written {
			_ = os.Remove(w) // best effort; the error reported is the cause
		}
	}
	for i, s := range shares {
		b, err := s.Marshal()
		if err == nil {
			if _, serr := os.Lstat(paths[i]); serr == nil {
				err = fmt.Errorf("%s appeared meanwhile; refusing to overwrite it", paths[i])
			} else {
				err = atomicfile.WriteFile(paths[i], b, 0o600)
			}
		}
		if err != nil {
			removeWritten()
			return al.fail(ctx, op, cid, err)
		}
		written = append(written, paths[i])
		sum := sha256.Sum256(b)
		if err := al.step(ctx, op+".write_share", audit.Allow, fmt.Sprintf("share %d of %d written to %s", s.Index, s.Total, paths[i]), cid, hex.EncodeToString(sum[:])); err != nil {
			removeWritten()
			return err
		}
	}

	p.step(5, "importing the root key into the HSM (non-extractable) and checking it")
	if err := al.step(ctx, op+".import", audit.Allow, "importing root "+rootID+" into the HSM", cid); err != nil {
		removeWritten()
		return err
	}
	r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: root}, rk.Bytes())
	if err != nil {
		removeWritten()
		if errors.Is(err, hsm.ErrKeyExists) {
			err = fmt.Errorf("the HSM already holds this root key; nothing was changed and the shares were removed (%w)", err)
		}
		return al.fail(ctx, op, cid, err)
	}
	defer r.Close()
	attrs, err := checkImported(ctx, r, rk)
	if err != nil {
		// The key is in the HSM and the shares rebuild it: keep them, and
		// let the operator decide.
		return al.fail(ctx, op, cid, fmt.Errorf("root %s imported, but %w; the shares in %s were kept", r.ID(), err, dir))
	}

	p.step(6, "zeroizing the root key in memory")
	rk.Destroy()
	if err := al.step(ctx, op+".done", audit.Allow, fmt.Sprintf("root %s in the HSM, self-test passed, %d-of-%d shares written, root zeroized in memory", r.ID(), m, n), cid); err != nil {
		return err
	}
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{
			"root": r.ID(), "ceremony": cid, "commitment": hex.EncodeToString(shares[0].Commitment), "threshold": m, "total": n, "shares": paths,
			"custodians": cust, "attributes": attrs, "audit_dir": auditDir,
		})
	}
	fmt.Fprintf(e.stdout, "created recoverable root key %s (ceremony %s)\n", r.ID(), cid)
	fmt.Fprintf(e.stdout, "  root commitment %x: record it with the ceremony; restore prints it back\n", shares[0].Commitment)
	fmt.Fprintf(e.stdout, "  AES-%d in the HSM: sensitive, not extractable, encrypt/decrypt only (no wrap/unwrap); self-test passed\n", attrs.ValueLen*8)
	fmt.Fprintf(e.stdout, "  %d-of-%d custodian shares:\n", m, n)
	for i, pth := range paths {
		fmt.Fprintf(e.stdout, "    %s  sealed to %s\n", pth, cust[i])
	}
	fmt.Fprintln(e.stdout, "  the root key was zeroized in memory; hand each share to its custodian and delete it from this host")
	return nil
}

func ceremonyRestore(ctx context.Context, e *env, root, auditDir string, shareFiles, keyFiles, passFiles []string) (err error) {
	// Read and check the shares before anything else: fewer than the
	// threshold is refused before the audit log, the HSM or a custodian's
	// passphrase is touched.
	shares := make([]*ceremony.Share, len(shareFiles))
	sums := make([]string, len(shareFiles))
	for i, f := range shareFiles {
		b, err := readInput("--share", f)
		if err != nil {
			return err
		}
		s, err := ceremony.ParseShare(b)
		if err != nil {
			return fmt.Errorf("--share %s: %w", f, err)
		}
		shares[i] = s
		sum := sha256.Sum256(b)
		sums[i] = hex.EncodeToString(sum[:])
	}
	setErr := ceremony.CheckSet(shares)

	al, err := openCeremonyAudit(auditDir, e.stderr)
	if err != nil {
		return errors.Join(setErr, err)
	}
	defer func() { err = errors.Join(err, al.close()) }()
	const op = "ceremony.restore"
	cid := shares[0].Ceremony
	p := progress{w: e.stderr, total: 6}
	p.step(1, "checking %d share file(s)", len(shares))
	if setErr != nil {
		if errors.Is(setErr, ceremony.ErrTooFewShares) {
			setErr = fmt.Errorf("%w; nothing was changed", setErr)
		}
		return al.fail(ctx, op, cid, setErr, sums...)
	}
	first := shares[0]
	rootID := keyIDOf(root)
	if err := al.step(ctx, op+".start", audit.Allow, fmt.Sprintf("restoring root %s of ceremony %s (%d-of-%d) as %s from shares %s",
		first.Root, cid, first.Threshold, first.Total, rootID, shareIndices(shares)), cid, sums...); err != nil {
		return err
	}
	if first.Root != rootID {
		fmt.Fprintf(e.stderr, "coffrectl: note: the shares are of root %s; it is restored as %s\n", first.Root, rootID)
	}

	p.step(2, "checking that the target HSM token holds no such key")
	if err := checkEmpty(ctx, root); err != nil {
		return al.fail(ctx, op, cid, err)
	}

	opened := make([]*ceremony.OpenedShare, 0, len(shares))
	defer func() {
		for _, o := range opened {
			o.Destroy()
		}
	}()
	used := make([]bool, len(shares))
	for i, kf := range keyFiles {
		p.step(3, "custodian %d of %d: unlocking key %s and opening the share sealed to it", i+1, len(keyFiles), kf)
		pf := ""
		if len(passFiles) > 0 {
			pf = passFiles[i]
		}
		k, err := readCustodianKey(kf, pf, e.stderr)
		if err != nil {
			return al.fail(ctx, op, cid, err)
		}
		j := -1
		for idx, s := range shares {
			if !used[idx] && k.Public().Equal(s.Custodian) {
				j = idx
				break
			}
		}
		if j < 0 {
			k.Zero()
			return al.fail(ctx, op, cid, fmt.Errorf("custodian key %s (%s): %w: none of the remaining shares is sealed to it", kf, fingerprint(k.Public()), ceremony.ErrWrongCustodian))
		}
		o, err := shares[j].Open(k)
		k.Zero()
		if err != nil {
			return al.fail(ctx, op, cid, fmt.Errorf("--share %s: %w", shareFiles[j], err))
		}
		used[j] = true
		opened = append(opened, o)
		if err := al.step(ctx, op+".open_share", audit.Allow, fmt.Sprintf("share %d opened by custodian %s", o.Index, fingerprint(o.Custodian)), cid, sums[j]); err != nil {
			return err
		}
	}

	p.step(4, "combining %d shares and checking the root commitment", len(opened))
	rk, err := ceremony.Combine(opened)
	if err != nil {
		return al.fail(ctx, op, cid, err)
	}
	defer rk.Destroy()
	if !rk.Locked() {
		fmt.Fprintln(e.stderr, "coffrectl: warning: the system refused to lock the root key's memory (RLIMIT_MEMLOCK, see ulimit -l): it may reach swap")
	}
	for _, o := range opened {
		o.Destroy()
	}

	p.step(5, "importing the root key into the HSM (non-extractable) and running a wrap/unwrap self-test")
	if err := al.step(ctx, op+".import", audit.Allow, "commitment verified; importing root into "+rootID, cid); err != nil {
		return err
	}
	r, err := pkcs11.ImportRoot(ctx, pkcs11.Config{URI: root}, rk.Bytes())
	if err != nil {
		if errors.Is(err, hsm.ErrKeyExists) {
			err = fmt.Errorf("the target token already holds this root key; restore only into a new, empty token (%w)", err)
		}
		return al.fail(ctx, op, cid, err)
	}
	defer r.Close()
	attrs, err := checkImported(ctx, r, rk)
	if err != nil {
		return al.fail(ctx, op, cid, fmt.Errorf("root %s imported, but %w", r.ID(), err))
	}

	p.step(6, "zeroizing the root key in memory")
	rk.Destroy()
	if err := al.step(ctx, op+".done", audit.Allow, fmt.Sprintf("root %s restored from shares %s, self-test passed, root zeroized in memory", r.ID(), openedIndices(opened)), cid); err != nil {
		return err
	}
	if e.g.json {
		return json.NewEncoder(e.stdout).Encode(map[string]any{
			"root": r.ID(), "ceremony": cid, "commitment": hex.EncodeToString(first.Commitment), "original_root": first.Root, "shares_used": openedIndexList(opened),
			"threshold": first.Threshold, "total": first.Total, "attributes": attrs, "self_test": "passed", "audit_dir": auditDir,
		})
	}
	fmt.Fprintf(e.stdout, "restored root key %s from shares %s of ceremony %s (%d-of-%d)\n", r.ID(), openedIndices(opened), cid, first.Threshold, first.Total)
	fmt.Fprintf(e.stdout, "  root commitment %x: compare it with the record of the ceremony (the shares carry it themselves)\n", first.Commitment)
	fmt.Fprintf(e.stdout, "  AES-%d in the HSM: sensitive, not extractable, encrypt/decrypt only (no wrap/unwrap); self-test passed\n", attrs.ValueLen*8)
	return nil
}

// checkEmpty makes sure the token named by uri is reachable and holds no
// key under that name, before a ceremony makes one: a recoverable ceremony
// must not write shares for a root it cannot then import.
func checkEmpty(ctx context.Context, uri string) error {
	r, err := pkcs11.Open(ctx, pkcs11.Config{URI: uri})
	switch {
	case err == nil:
		_ = r.Close() // only a probe
		return fmt.Errorf("the HSM token already holds the key %s; nothing was changed (%w)", keyIDOf(uri), hsm.ErrKeyExists)
	case errors.Is(err, hsm.ErrKeyNotFound):
		return nil
	default:
		return fmt.Errorf("checking the HSM token: %w", err)
	}
}

// checkImported checks what the HSM reports for an imported root, and
// proves that the HSM holds exactly rk: the HSM wraps a random test key,
// the copy of the root in memory opens the result (pkcs11's documented
// format: 0x01 ‖ IV ‖ AES-GCM ciphertext ‖ tag), and the HSM unwraps it.
func checkImported(ctx context.Context, r *pkcs11.Root, rk *ceremony.Secret) (hsm.Attributes, error) {
	a, err := r.Attributes(ctx)
	if err != nil {
		return a, fmt.Errorf("reading back its attributes failed: %w", err)
	}
	// An imported key has ALWAYS_SENSITIVE and NEVER_EXTRACTABLE false by
	// definition; everything else must be as for a generated root.
	if !a.Token || !a.Sensitive || a.Extractable || a.Wrap || a.Unwrap || a.Derive || !a.Encrypt || !a.Decrypt || a.ValueLen != ceremony.RootKeySize {
		return a, fmt.Errorf("the HSM reports unsafe attributes %+v: destroy it and check the HSM", a)
	}
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return a, err
	}
	aad := []byte("coffre ceremony self-test v1")
	w, err := r.Wrap(ctx, probe, aad)
	if err != nil {
		return a, fmt.Errorf("self-test wrap failed: %w", err)
	}
	const ivSize = 12
	if len(w) < 1+ivSize || w[0] != 0x01 {
		return a, errors.New("self-test: unexpected wrapped format")
	}
	block, err := aes.NewCipher(rk.Bytes())
	if err != nil {
		return a, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return a, err
	}
	soft, err := gcm.Open(nil, w[1:1+ivSize], w[1+ivSize:], aad)
	if err != nil || !bytes.Equal(soft, probe) {
		return a, errors.New("self-test failed: the key in the HSM is not the root key rebuilt in memory")
	}
	back, err := r.Unwrap(ctx, w, aad)
	if err != nil || !bytes.Equal(back, probe) {
		return a, fmt.Errorf("self-test unwrap failed: %v", err)
	}
	return a, nil
}

// keyIDOf returns the key id (URI without query) of a URI already parsed
// once by the caller.
func keyIDOf(uri string) string {
	u, err := hsm.ParseURI(uri)
	if err != nil {
		return "(bad URI)"
	}
	return u.KeyID()
}

func shareIndices(ss []*ceremony.Share) string {
	parts := make([]string, len(ss))
	for i, s := range ss {
		parts[i] = fmt.Sprint(s.Index)
	}
	return strings.Join(parts, ", ")
}

func openedIndexList(opened []*ceremony.OpenedShare) []int {
	out := make([]int, len(opened))
	for i, o := range opened {
		out[i] = o.Index
	}
	return out
}

func openedIndices(opened []*ceremony.OpenedShare) string {
	parts := make([]string, len(opened))
	for i, o := range opened {
		parts[i] = fmt.Sprint(o.Index)
	}
	return strings.Join(parts, ", ")
}

// progress prints "step 3/6: …" lines on stderr.
type progress struct {
	w     io.Writer
	total int
}

func (p progress) step(n int, format string, a ...any) {
	fmt.Fprintf(p.w, "step %d/%d: %s\n", n, p.total, fmt.Sprintf(format, a...))
}

// ceremonyAudit is the ceremony's own signed audit log (package audit), in
// a directory that travels with the ceremony's records. Entries say who
// did which step, on which root and ceremony, with hashes of the share
// files (sealed ciphertext) — never key material, share values or
// passphrases.
type ceremonyAudit struct {
	log   *audit.Log
	actor audit.Actor
}

const (
	ceremonySignerFile = "ceremony-signer.key"
	ceremonyNode       = "coffrectl-ceremony"
	ceremonyOrigin     = "coffre.ceremony"
)

// openCeremonyAudit opens (or creates) the log in dir, with its signer key
// dir/ceremony-signer.key (0600, created on first use; its public half in
// dir/ceremony-signer.pub, for `coffrectl audit verify --dir DIR --verifier
// DIR/ceremony-signer.pub`).
func openCeremonyAudit(dir string, stderr io.Writer) (*ceremonyAudit, error) {
	if dir == "" {
		return nil, fmt.Errorf("%w: --audit-dir is empty", errUsage)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ceremony audit log: %w", err)
	}
	keyPath := filepath.Join(dir, ceremonySignerFile)
	signer, err := audit.ReadSignerFile(keyPath)
	if errors.Is(err, os.ErrNotExist) {
		if signer, err = audit.GenerateSigner(ceremonyOrigin); err != nil {
			return nil, err
		}
		if err = audit.WriteSignerFile(keyPath, signer); err != nil {
			return nil, err
		}
		pub := strings.TrimSuffix(keyPath, ".key") + ".pub"
		if err = atomicfile.WriteFile(pub, signer.Verifier().Marshal(), 0o644); err != nil {
			return nil, err
		}
		fmt.Fprintf(stderr, "coffrectl: created the ceremony audit signer key %s (verifier %s)\n", keyPath, pub)
	}
	if err != nil {
		return nil, fmt.Errorf("ceremony audit log: %w", err)
	}
	l, err := audit.Open(audit.Options{
		Dir: dir, Node: ceremonyNode, Origin: ceremonyOrigin, Signer: signer,
		CheckpointInterval: time.Hour, // a final checkpoint is published at Close
		Logger:             slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return nil, fmt.Errorf("ceremony audit log %s: %w", dir, err)
	}
	who := "unknown"
	if u, err := user.Current(); err == nil {
		who = u.Username
	}
	if h, err := os.Hostname(); err == nil {
		who += "@" + h
	}
	return &ceremonyAudit{log: l, actor: audit.Actor{Kind: audit.ActorAdmin, ID: who}}, nil
}

// step appends one entry and waits until it is durable: a step that
// cannot be audited is not taken.
func (a *ceremonyAudit) step(ctx context.Context, op, decision, reason, ceremonyID string, evidence ...string) error {
	_, err := a.log.Append(ctx, &audit.Entry{
		Version: audit.EntryVersion, Time: time.Now(), Actor: a.actor, Operation: op,
		Decision: decision, Reason: reason, RequestID: ceremonyID, EvidenceHashes: evidence,
	})
	if err != nil {
		return fmt.Errorf("the ceremony audit log refused the entry, so the ceremony stops here: %w", err)
	}
	return nil
}

// fail records a refused or failed ceremony and returns cause. Error texts
// in Coffre never carry key material, so the reason can be logged.
func (a *ceremonyAudit) fail(ctx context.Context, op, ceremonyID string, cause error, evidence ...string) error {
	if err := a.step(ctx, op+".failed", audit.Deny, cause.Error(), ceremonyID, evidence...); err != nil {
		return errors.Join(cause, err)
	}
	return cause
}

func (a *ceremonyAudit) close() error { return a.log.Close() }
