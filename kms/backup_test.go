package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
)

func openBoltT(t testing.TB) store.Store {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "coffre.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// dumpStore returns every key of st with its value and revision.
func dumpStore(t testing.TB, st store.Store) []store.KV {
	t.Helper()
	kvs, err := st.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	return kvs
}

func sameKVs(a, b []store.KV) bool {
	return slices.EqualFunc(a, b, func(x, y store.KV) bool {
		return x.Key == y.Key && x.Revision == y.Revision && bytes.Equal(x.Value, y.Value)
	})
}

func sameHeader(a, b BackupHeader) bool {
	return a.Version == b.Version && a.Origin == b.Origin && a.Created.Equal(b.Created) && a.Signer == b.Signer && a.Recipient == b.Recipient
}

func newSignerT(t testing.TB, name string) *audit.Signer {
	t.Helper()
	s, err := audit.GenerateSigner(name)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newTransferKeyT(t testing.TB) *seal.PrivateKey {
	t.Helper()
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type madeEnvelope struct {
	tenant string
	ec     map[string]string
	env    []byte
	dk     []byte
}

// populateForBackup gives a primary everything a backup carries: keyrings (one
// rotated twice, with envelopes under each version), an EK root, a class,
// an enrolled node (and its EK index) and a keyring policy. It also puts a
// replicated audit record, which a backup must leave out.
func populateForBackup(t *testing.T, ctx context.Context, svc *Service, rel *ReleaseService, st store.Store) []madeEnvelope {
	t.Helper()
	var envs []madeEnvelope
	mk := func(id KeyringID, ec map[string]string) {
		dk, err := svc.GenerateDataKey(ctx, id, ec)
		if err != nil {
			t.Fatal(err)
		}
		envs = append(envs, madeEnvelope{tenant: id.Tenant, ec: ec, env: dk.Envelope, dk: bytes.Clone(dk.Plaintext.Expose())})
	}
	disks, db, other := mustID(t, "acme/disks"), mustID(t, "acme/db"), mustID(t, "other/x")
	for _, id := range []KeyringID{disks, db, other} {
		if _, err := svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
		mk(id, map[string]string{"volume": id.Name})
	}
	for range 2 {
		if _, err := svc.RotateKeyring(ctx, disks); err != nil {
			t.Fatal(err)
		}
		mk(disks, map[string]string{"volume": "v"})
	}
	if _, err := rel.AddEKRoot(ctx, newTestEKCA(t, "Backup EK CA", time.Now().Add(24*time.Hour)).pem()); err != nil {
		t.Fatal(err)
	}
	if _, err := rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	ek, _ := pinnedEK(t)
	if _, err := rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", Labels: map[string]string{"jurisdiction": "fr"}, EKPublic: ek}); err != nil {
		t.Fatal(err)
	}
	if _, err := rel.SetKeyringPolicy(ctx, &KeyringPolicy{Keyring: disks, AllowedClasses: []string{"storage"},
		RequiredLabels: map[string]string{"jurisdiction": "fr"}, Release: ReleaseHPKE}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Put(ctx, "audit/node-a/checkpoint", []byte("a checkpoint note")); err != nil {
		t.Fatal(err)
	}
	return envs
}

// TestBackupToDataEmbassy is the data-embassy story: a primary exports, a
// DR site imports into its own store; with the primary's root (the same
// token, standing for the root restored from custodian shares) the DR site
// opens every envelope made at the primary; with another root under the
// same name it opens none.
func TestBackupToDataEmbassy(t *testing.T) {
	ctx := ctxT(t)

	// The primary, on its own SoftHSM.
	hsA := hsmtest.NewSoftHSM(t)
	uriA := hsA.RootURI("coffre-test", "root", hsA.NewToken(t, "coffre-test"))
	rootA, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: uriA})
	if err != nil {
		t.Fatal(err)
	}
	defer rootA.Close()
	stA := openBoltT(t)
	svcA, err := New(Config{Store: stA, Root: rootA})
	if err != nil {
		t.Fatal(err)
	}
	relA, err := NewReleaseService(svcA, ReleaseConfig{})
	if err != nil {
		t.Fatal(err)
	}
	envs := populateForBackup(t, ctx, svcA, relA, stA)

	signer := newSignerT(t, "primary.example")
	transfer := newTransferKeyT(t)
	created := time.Date(2026, 3, 1, 12, 30, 0, 123456789, time.UTC)
	data, err := ExportBackup(ctx, stA, ExportOptions{To: transfer.Public(), Signer: signer, Origin: "coffre/paris-1", Now: created})
	if err != nil {
		t.Fatal(err)
	}

	h, err := InspectBackup(data)
	if err != nil {
		t.Fatal(err)
	}
	want := BackupHeader{Version: 1, Origin: "coffre/paris-1", Created: created, Signer: "primary.example", Recipient: TransferKeyFingerprint(transfer.Public())}
	if !sameHeader(h, want) {
		t.Fatalf("header %+v, want %+v", h, want)
	}
	// Nothing of the store is readable without the transfer key, and no
	// data key is in the backup even once opened.
	pt, err := seal.Open(transfer, []byte(backupSealInfo), data[:len(h.encode())], data[len(h.encode()):])
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range envs {
		if bytes.Contains(pt, e.dk) {
			t.Fatal("the backup holds a data key")
		}
	}
	if !bytes.Contains(pt, []byte("keyrings/acme/disks")) || bytes.Contains(data, []byte("keyrings/acme/disks")) {
		t.Fatal("the keyring is not in the sealed part, or shows in the clear")
	}

	// What the primary exports: every record under the backup prefixes.
	var exported []store.KV
	for _, kv := range dumpStore(t, stA) {
		if backupPrefixOf(kv.Key) != "" {
			exported = append(exported, kv)
		}
	}
	if len(exported) != 3+1+1+1+1+1 {
		t.Fatalf("primary holds %d exportable records, want 8", len(exported))
	}
	relA.Close()
	svcA.Close()
	if err := rootA.Close(); err != nil {
		t.Fatal(err)
	}

	// The DR site imports into its own, empty store.
	stB := openBoltT(t)
	sum, err := ImportBackup(ctx, stB, data, ImportOptions{Key: transfer, Trusted: []*audit.Verifier{newSignerT(t, "other").Verifier(), signer.Verifier()}, Now: created.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Records != len(exported) || sum.Written != len(exported) || sum.Skipped != 0 || sum.Signer != "primary.example" ||
		sum.Age != time.Hour || sum.PerPrefix[keyringPrefix] != 3 || sum.PerPrefix[nodeByEKPrefix] != 1 || !sameHeader(sum.Header, want) {
		t.Fatalf("summary %+v", sum)
	}
	got := dumpStore(t, stB)
	if len(got) != len(exported) {
		t.Fatalf("DR store holds %d keys, want %d (the audit record must stay out)", len(got), len(exported))
	}
	for i := range got {
		if got[i].Key != exported[i].Key || !bytes.Equal(got[i].Value, exported[i].Value) {
			t.Fatalf("DR record %d: %s, want %s with the same value", i, got[i].Key, exported[i].Key)
		}
	}

	// Importing the same backup again changes nothing, not even a revision.
	sum, err = ImportBackup(ctx, stB, data, ImportOptions{Key: transfer, Trusted: []*audit.Verifier{signer.Verifier()}})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Written != 0 || sum.Skipped != len(exported) {
		t.Fatalf("re-import: %+v", sum)
	}
	if !sameKVs(dumpStore(t, stB), got) {
		t.Fatal("re-import changed the store")
	}

	// Another root under the same name (token coffre-test, key root) on
	// another HSM: the wrapped KEKs do not unwrap under it.
	hsB := hsmtest.NewSoftHSM(t)
	rootB, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: hsB.RootURI("coffre-test", "root", hsB.NewToken(t, "coffre-test"))})
	if err != nil {
		t.Fatal(err)
	}
	if rootB.ID() != rootA.ID() {
		t.Fatalf("impostor root %s, want the name %s", rootB.ID(), rootA.ID())
	}
	svcB, err := New(Config{Store: stB, Root: rootB})
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range envs {
		if dk, err := svcB.Decrypt(ctx, e.tenant, e.env, e.ec); err == nil {
			t.Fatalf("envelope %d opened under another root: %v", i, dk)
		} else if !strings.Contains(err.Error(), "does not unwrap") {
			t.Fatalf("envelope %d under another root: %v", i, err)
		}
	}
	svcB.Close()
	if err := rootB.Close(); err != nil {
		t.Fatal(err)
	}

	// The primary's root, opened again from its token: every envelope opens.
	t.Setenv("SOFTHSM2_CONF", hsA.ConfPath)
	rootDR, err := pkcs11.Open(ctx, pkcs11.Config{URI: uriA})
	if err != nil {
		t.Fatal(err)
	}
	defer rootDR.Close()
	svcDR, err := New(Config{Store: stB, Root: rootDR})
	if err != nil {
		t.Fatal(err)
	}
	defer svcDR.Close()
	for i, e := range envs {
		dk, err := svcDR.Decrypt(ctx, e.tenant, e.env, e.ec)
		if err != nil {
			t.Fatalf("envelope %d at the DR site: %v", i, err)
		}
		if !bytes.Equal(dk.Expose(), e.dk) {
			t.Fatalf("envelope %d opened to another key", i)
		}
	}
	// The release state came along: the DR site releases under the same
	// policy to the same nodes.
	relDR, err := NewReleaseService(svcDR, ReleaseConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer relDR.Close()
	if n, err := relDR.GetNode(ctx, "node-1"); err != nil || n.Labels["jurisdiction"] != "fr" || n.State != NodeEnrolled {
		t.Fatalf("DR node: %+v, %v", n, err)
	}
	if p, err := relDR.GetKeyringPolicy(ctx, mustID(t, "acme/disks")); err != nil || !slices.Equal(p.AllowedClasses, []string{"storage"}) {
		t.Fatalf("DR policy: %+v, %v", p, err)
	}
	if roots, err := relDR.ListEKRoots(ctx); err != nil || len(roots) != 1 {
		t.Fatalf("DR EK roots: %d, %v", len(roots), err)
	}
	// And it keeps working as a keyring service: a new envelope under the
	// imported primary version.
	if _, err := svcDR.GenerateDataKey(ctx, mustID(t, "acme/disks"), nil); err != nil {
		t.Fatal(err)
	}
}

// backupFixture is a primary with some state and its backup.
type backupFixture struct {
	f        *relFixture
	signer   *audit.Signer
	transfer *seal.PrivateKey
	data     []byte
}

func newBackupFixture(t *testing.T) *backupFixture {
	t.Helper()
	f := newRelFixture(t, ReleaseConfig{})
	populateForBackup(t, ctxT(t), f.svc, f.rel, f.store)
	b := &backupFixture{f: f, signer: newSignerT(t, "primary.example"), transfer: newTransferKeyT(t)}
	var err error
	b.data, err = ExportBackup(ctxT(t), f.store, ExportOptions{To: b.transfer.Public(), Signer: b.signer, Origin: "paris-1"})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (b *backupFixture) opts() ImportOptions {
	return ImportOptions{Key: b.transfer, Trusted: []*audit.Verifier{b.signer.Verifier()}}
}

// craft seals a backup with the given parts, signed by the fixture's
// signer: a well-signed backup whose content is wrong, to reach the checks
// behind the signature.
func (b *backupFixture) craft(t *testing.T, edit func(h *BackupHeader, m *backupManifest, records *[]byte)) []byte {
	t.Helper()
	h, n, err := splitBackup(b.data)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := seal.Open(b.transfer, []byte(backupSealInfo), b.data[:n], b.data[n:])
	if err != nil {
		t.Fatal(err)
	}
	mb, _, records, err := splitBackupPayload(pt)
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseBackupManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	records = bytes.Clone(records)
	edit(&h, m, &records)
	out, err := sealBackup(h.encode(), mustJSON(m), records, b.signer, b.transfer.Public())
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func rehash(m *backupManifest, records []byte) {
	sum := sha256.Sum256(records)
	m.RecordsSHA256 = hex.EncodeToString(sum[:])
}

func TestBackupRefusals(t *testing.T) {
	b := newBackupFixture(t)
	ctx := ctxT(t)
	dst := openBoltT(t)
	// Something already in the destination, outside the backup.
	if _, err := dst.Put(ctx, "audit/dr-1/checkpoint", []byte("note")); err != nil {
		t.Fatal(err)
	}
	before := dumpStore(t, dst)

	otherKey := newTransferKeyT(t)
	flip := func(i int) []byte {
		d := bytes.Clone(b.data)
		d[i] ^= 0x01
		return d
	}
	headerLen := bytes.Index(b.data, []byte("\n\n")) + 2
	rehead := func(old, new string) []byte {
		return append([]byte(strings.Replace(string(b.data[:headerLen]), old, new, 1)), b.data[headerLen:]...)
	}
	garbageRecord := func(key, value string) func(h *BackupHeader, m *backupManifest, r *[]byte) {
		return func(h *BackupHeader, m *backupManifest, r *[]byte) {
			// Prepend: "audit/" and "classes/" sort first.
			*r = append(appendLP(appendLP(nil, []byte(key)), []byte(value)), *r...)
			m.Records++
			rehash(m, *r)
		}
	}

	for _, tc := range []struct {
		name    string
		data    []byte
		opts    ImportOptions
		want    error
		msgPart string
	}{
		{"wrong transfer key", b.data, ImportOptions{Key: otherKey, Trusted: b.opts().Trusted}, ErrBackupKey, "names transfer key"},
		{"recipient rewritten to the wrong key", rehead(TransferKeyFingerprint(b.transfer.Public()), TransferKeyFingerprint(otherKey.Public())),
			ImportOptions{Key: otherKey, Trusted: b.opts().Trusted}, ErrBackupAltered, "does not open"},
		{"untrusted signer", b.data, ImportOptions{Key: b.transfer, Trusted: []*audit.Verifier{newSignerT(t, "primary.example").Verifier()}}, ErrBackupUntrusted, `claims signer "primary.example"`},
		{"no trusted key", b.data, ImportOptions{Key: b.transfer}, ErrInvalidArgument, "trusted signer"},
		{"no key", b.data, ImportOptions{Trusted: b.opts().Trusted}, ErrInvalidArgument, "transfer key is required"},
		{"flipped bit in the encapsulation", flip(headerLen + 10), b.opts(), ErrBackupAltered, "does not open"},
		{"flipped bit in the ciphertext", flip(len(b.data) / 2), b.opts(), ErrBackupAltered, "does not open"},
		{"flipped bit in the tag", flip(len(b.data) - 1), b.opts(), ErrBackupAltered, "does not open"},
		{"origin changed", rehead("origin paris-1", "origin paris-2"), b.opts(), ErrBackupAltered, "does not open"},
		{"truncated", b.data[:len(b.data)-1], b.opts(), ErrBackupAltered, "does not open"},
		{"header only", b.data[:headerLen], b.opts(), ErrBackupAltered, "does not open"},
		{"cut in the header", b.data[:20], b.opts(), ErrBackupFormat, "no end of header"},
		{"not a backup", []byte("-----BEGIN PGP MESSAGE-----\n\n"), b.opts(), ErrBackupFormat, "does not start with"},
		{"empty", nil, b.opts(), ErrBackupFormat, "does not start with"},
		{"future version", rehead("coffre backup v1\n", "coffre backup v2\n"), b.opts(), ErrBackupVersion, "version 2"},
		{"future version, other header", []byte("coffre backup v7\n" + strings.Repeat("x", 2000)), b.opts(), ErrBackupVersion, "version 7"},
		{"non-canonical time", rehead("Z\nsigner", "+00:00\nsigner"), b.opts(), ErrBackupFormat, "canonical"},
		{"extra header line", rehead("signer ", "extra x\nsigner "), b.opts(), ErrBackupFormat, "lines"},

		// Signed and sealed properly, but the content is wrong.
		{"records do not match the hash", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { (*r)[len(*r)-2] ^= 1 }), b.opts(), ErrBackupAltered, "SHA-256"},
		{"record count", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { m.Records-- }), b.opts(), ErrBackupAltered, "the manifest says"},
		{"header disagrees with the manifest", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { h.Origin = "elsewhere" }), b.opts(), ErrBackupAltered, "disagrees"},
		{"manifest format", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { m.Format = 2 }), b.opts(), ErrBackupVersion, "manifest format 2"},
		{"unknown prefix", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { m.Prefixes = append(m.Prefixes, "proposals/") }), b.opts(), ErrBackupVersion, `"proposals/"`},
		{"prefix not listed", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { m.Prefixes = m.Prefixes[1:] }), b.opts(), ErrBackupRecord, "outside the exported prefixes"},
		{"record outside the prefixes", b.craft(t, garbageRecord("audit/x", "y")), b.opts(), ErrBackupRecord, "outside the exported prefixes"},
		{"unreadable class", b.craft(t, garbageRecord("classes/aaa", `{"format":1}`)), b.opts(), ErrBackupRecord, "stored class classes/aaa"},
		{"duplicate key", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) {
			k, rest, _ := cutLP(*r, store.MaxKeySize)
			v, _, _ := cutLP(rest, store.MaxValueSize)
			*r = append(appendLP(appendLP(nil, k), v), *r...)
			m.Records++
			rehash(m, *r)
		}), b.opts(), ErrBackupRecord, "out of order"},
		{"trailing bytes", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) { *r = append(*r, 0, 0); rehash(m, *r) }), b.opts(), ErrBackupFormat, "framing"},
		{"keyring record altered", b.craft(t, func(h *BackupHeader, m *backupManifest, r *[]byte) {
			*r = bytes.Replace(*r, []byte(`"state":"active"`), []byte(`"state":"sleepy"`), 1)
			rehash(m, *r)
		}), b.opts(), ErrBackupRecord, "unknown state"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ImportBackup(ctx, dst, tc.data, tc.opts)
			wantErr(t, err, tc.want, tc.msgPart)
			if !sameKVs(dumpStore(t, dst), before) {
				t.Fatal("a refused import changed the store")
			}
		})
	}
	// Inspect reads the header of anything that has one, and only that.
	if _, err := InspectBackup(b.data[:headerLen]); err != nil {
		t.Errorf("inspect header only: %v", err)
	}
	if _, err := InspectBackup(rehead("coffre backup v1\n", "coffre backup v2\n")); !errors.Is(err, ErrBackupVersion) {
		t.Errorf("inspect v2: %v", err)
	}
}

func TestBackupConflict(t *testing.T) {
	b := newBackupFixture(t)
	ctx := ctxT(t)
	// The DR store already has its own keyring under a name the backup
	// also holds (another incarnation: another uid and KEK), and a record
	// identical to one in the backup.
	dst := openBoltT(t)
	other, err := New(Config{Store: dst, Root: b.f.root})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.CreateKeyring(ctx, mustID(t, "acme/db")); err != nil {
		t.Fatal(err)
	}
	same, err := b.f.store.Get(ctx, classPrefix+"storage")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.Put(ctx, same.Key, same.Value); err != nil {
		t.Fatal(err)
	}
	before := dumpStore(t, dst)
	_, err = ImportBackup(ctx, dst, b.data, b.opts())
	wantErr(t, err, ErrBackupConflict, "keyrings/acme/db")
	if !strings.Contains(err.Error(), "nothing was written") {
		t.Fatalf("conflict error %q does not say nothing was written", err)
	}
	if !sameKVs(dumpStore(t, dst), before) {
		t.Fatal("a conflicting import changed the store")
	}

	// Without the conflicting keyring, the import goes through and skips
	// the identical record.
	if err := dst.Delete(ctx, keyringPrefix+"acme/db", 0); err != nil {
		t.Fatal(err)
	}
	sum, err := ImportBackup(ctx, dst, b.data, b.opts())
	if err != nil {
		t.Fatal(err)
	}
	if sum.Skipped != 1 || sum.Written != sum.Records-1 {
		t.Fatalf("summary %+v", sum)
	}
}

func TestExportRefusals(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	signer, transfer := newSignerT(t, "p"), newTransferKeyT(t)
	good := ExportOptions{To: transfer.Public(), Signer: signer, Origin: "paris-1"}

	// An empty store exports an empty backup, which imports.
	data, err := ExportBackup(ctx, f.store, good)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := ImportBackup(ctx, openBoltT(t), data, ImportOptions{Key: transfer, Trusted: []*audit.Verifier{signer.Verifier()}})
	if err != nil || sum.Records != 0 {
		t.Fatalf("empty backup: %+v, %v", sum, err)
	}

	for _, tc := range []struct {
		name string
		opts ExportOptions
		part string
	}{
		{"no recipient", ExportOptions{Signer: signer, Origin: "x"}, "recipient"},
		{"no signer", ExportOptions{To: transfer.Public(), Origin: "x"}, "signer"},
		{"no origin", ExportOptions{To: transfer.Public(), Signer: signer}, "origin"},
		{"origin with a space", ExportOptions{To: transfer.Public(), Signer: signer, Origin: "paris 1"}, "not allowed"},
		{"origin with a newline", ExportOptions{To: transfer.Public(), Signer: signer, Origin: "a\nrecipient x"}, "not allowed"},
	} {
		if _, err := ExportBackup(ctx, f.store, tc.opts); !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.part) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}

	// A store this server would refuse to read is not exported.
	if _, err := f.store.Put(ctx, keyringPrefix+"acme/broken", []byte(`{"format":1}`)); err != nil {
		t.Fatal(err)
	}
	_, err = ExportBackup(ctx, f.store, good)
	wantErr(t, err, ErrBackupRecord, "keyrings/acme/broken")
}

// fuzzBackup is a valid backup of a small store, with the key and signer
// that open it.
func fuzzBackup(f *testing.F) ([]byte, *seal.PrivateKey, *audit.Signer) {
	key, err := seal.NewPrivateKey(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		f.Fatal(err)
	}
	signer, err := audit.GenerateSigner("fuzz")
	if err != nil {
		f.Fatal(err)
	}
	var records []byte
	records = appendLP(records, []byte(classPrefix+"storage"))
	records = appendLP(records, encodeClass(testClass("storage")))
	h := BackupHeader{Version: 1, Origin: "fuzz", Created: time.Unix(1, 0).UTC(), Signer: "fuzz", Recipient: TransferKeyFingerprint(key.Public())}
	sum := sha256.Sum256(records)
	m := mustJSON(backupManifest{Format: 1, Origin: h.Origin, Created: formatBackupTime(h.Created), Signer: "fuzz", Recipient: h.Recipient,
		Prefixes: backupPrefixes, Records: 1, RecordsSHA256: hex.EncodeToString(sum[:])})
	data, err := sealBackup(h.encode(), m, records, signer, key.Public())
	if err != nil {
		f.Fatal(err)
	}
	return data, key, signer
}

func FuzzInspectBackup(f *testing.F) {
	data, _, _ := fuzzBackup(f)
	f.Add(data)
	f.Add([]byte("coffre backup v1\norigin a\ncreated 2026-01-01T00:00:00Z\nsigner s\nrecipient 00\n\n"))
	f.Add([]byte("coffre backup v99999\n\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := InspectBackup(b)
		if err == nil && !bytes.HasPrefix(b, h.encode()) {
			t.Fatalf("accepted a header that does not re-encode: %+v", h)
		}
	})
}

func FuzzOpenBackup(f *testing.F) {
	data, key, signer := fuzzBackup(f)
	trusted := []*audit.Verifier{signer.Verifier()}
	if _, err := openBackup(data, key, trusted); err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Add(data[:200])
	f.Fuzz(func(t *testing.T, b []byte) {
		ob, err := openBackup(b, key, trusted)
		if err == nil && (len(ob.records) != 1 || ob.signer != "fuzz") {
			t.Fatalf("accepted %+v", ob)
		}
	})
}

// FuzzBackupPayload reaches the parsers behind the seal and the signature,
// which FuzzOpenBackup's mutations rarely get through to.
func FuzzBackupPayload(f *testing.F) {
	var records []byte
	records = appendLP(records, []byte(classPrefix+"storage"))
	records = appendLP(records, encodeClass(testClass("storage")))
	m := mustJSON(backupManifest{Format: 1, Origin: "o", Created: "2026-01-01T00:00:00Z", Signer: "s", Recipient: "r", Prefixes: backupPrefixes, Records: 1})
	pt := appendLP(appendLP(nil, m), make([]byte, audit.MessageSignatureSize))
	f.Add(append(pt, records...))
	f.Fuzz(func(t *testing.T, b []byte) {
		mb, _, recs, err := splitBackupPayload(b)
		if err != nil {
			return
		}
		if m, err := parseBackupManifest(mb); err == nil && m.Format != BackupFormat {
			t.Fatalf("accepted manifest format %d", m.Format)
		}
		rs, err := parseBackupRecords(recs, backupPrefixes)
		if err != nil {
			return
		}
		for i, r := range rs {
			if backupPrefixOf(r.key) == "" || (i > 0 && rs[i-1].key >= r.key) {
				t.Fatalf("accepted record %q", r.key)
			}
		}
	})
}
