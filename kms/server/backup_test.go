package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// backupFixture is a fixture whose server exports real backups of its
// store, audits every admin call into a real log, and keeps FetchBackup's
// messages under testMaxMsg.
type backupFixture struct {
	*fixture
	transfer *seal.PrivateKey
	signer   *audit.Signer
	log      *audit.Log
	admin    coffrev1.AdminServiceClient // receives at most testMaxMsg per message
}

func newBackupFixture(t *testing.T) *backupFixture {
	t.Helper()
	transfer, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	signer, err := audit.GenerateSigner("primary.example")
	if err != nil {
		t.Fatal(err)
	}
	log, err := audit.Open(audit.Options{Dir: filepath.Join(t.TempDir(), "audit"), Node: "n1", Origin: "coffre.test/n1", Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	b := &backupFixture{transfer: transfer, signer: signer, log: log}
	var st store.Store
	b.fixture = newFixtureWith(t, kms.ReleaseConfig{}, func(o *Options) {
		o.Audit = log
		o.MaxMessageBytes = testMaxMsg
		o.ExportBackup = func(ctx context.Context, to *seal.PublicKey) ([]byte, error) {
			return kms.ExportBackup(ctx, st, kms.ExportOptions{To: to, Signer: signer, Origin: "paris-1"})
		}
	})
	st = b.store
	// The client takes no message larger than the server's limit, so that
	// FetchBackup is shown to keep under it.
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: b.serverCA.pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &b.fixture.admin, nil }}
	conn, err := grpc.NewClient(b.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(testMaxMsg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	b.admin = coffrev1.NewAdminServiceClient(conn)
	return b
}

// fetch reads the whole stream of FetchBackup from offset.
func fetch(ctx context.Context, c coffrev1.AdminServiceClient, id string, offset uint64) (*coffrev1.BackupManifest, []byte, error) {
	stream, err := c.FetchBackup(ctx, &coffrev1.FetchBackupRequest{ProposalId: id, Offset: offset})
	if err != nil {
		return nil, nil, err
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, nil, err
	}
	if first.GetManifest() == nil || len(first.GetData()) > 0 {
		return nil, nil, fmt.Errorf("first message %v: want the manifest alone", first)
	}
	var data []byte
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return first.GetManifest(), data, nil
		}
		if err != nil {
			return first.GetManifest(), data, err
		}
		if m.GetManifest() != nil || m.GetOffset() != offset+uint64(len(data)) {
			return nil, nil, fmt.Errorf("message at offset %d after %d bytes from %d", m.GetOffset(), len(data), offset)
		}
		if len(m.GetData()) > backupMessageData(testMaxMsg) {
			return nil, nil, fmt.Errorf("a message of %d bytes of data", len(m.GetData()))
		}
		data = append(data, m.GetData()...)
	}
}

// TestStoredBackupOverGRPC exports a backup larger than the server's (and
// coffrectl's) message limits through the quorum, then streams it out,
// resumes a fetch, imports it into a fresh store, refuses what is not an
// executed export, catches a damaged store, deletes it, and finds every
// call in the audit log.
func TestStoredBackupOverGRPC(t *testing.T) {
	f := newBackupFixture(t)
	// Long enough for thousands of synced writes under -race; each call
	// is still bounded by the server's MaxCallTimeout.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Enough keyrings for a backup over 1 MiB: more than one stored chunk
	// and far more than one message.
	var ids []kms.KeyringID
	for i := 0; i < 4000; i++ {
		id, _ := kms.ParseKeyringID(fmt.Sprintf("acme/k%05d", i))
		if _, err := f.svc.CreateKeyring(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	admin := f.gated(t)
	var res coffrev1.ExportBackupResponse
	op := &coffrev1.Operation{Op: &coffrev1.Operation_ExportBackup{ExportBackup: &coffrev1.ExportBackupRequest{To: f.transfer.Public().String()}}}
	if err := admin.Run(ctx, op, &res); err != nil {
		t.Fatal(err)
	}
	m := res.GetStored()
	if len(res.GetBackup()) != 0 || m.GetSize() <= 1<<20 || m.GetChunkSize() != kms.StoredBackupChunkSize ||
		uint64(m.GetChunks()) != (m.GetSize()+kms.StoredBackupChunkSize-1)/kms.StoredBackupChunkSize {
		t.Fatalf("export result: %v", &res)
	}
	ps, err := admin.ListProposals(ctx, &coffrev1.ListProposalsRequest{State: quorum.StateExecuted})
	if err != nil {
		t.Fatal(err)
	}
	var id string
	for _, p := range ps.GetProposals() {
		if p.GetKind() == KindExportBackup {
			id = p.GetId()
		}
	}
	// The proposal record keeps the (small) result.
	p, err := admin.GetProposal(ctx, &coffrev1.GetProposalRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	var kept coffrev1.ExportBackupResponse
	if err := protojson.Unmarshal(p.GetResult(), &kept); err != nil || kept.GetStored().GetSha256() != m.GetSha256() {
		t.Fatalf("stored result %s: %v", p.GetResult(), err)
	}

	got, data, err := fetch(ctx, f.admin, id[:12], 0)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if got.GetSha256() != m.GetSha256() || uint64(len(data)) != m.GetSize() || hex.EncodeToString(sum[:]) != m.GetSha256() {
		t.Fatalf("fetched %d bytes hashing to %x; manifest %v", len(data), sum, got)
	}
	// A fetch resumed part way, across a chunk boundary, and at the end.
	for _, off := range []uint64{kms.StoredBackupChunkSize - 3, m.GetSize() - 1, m.GetSize()} {
		_, tail, err := fetch(ctx, f.admin, id, off)
		if err != nil || !bytes.Equal(tail, data[off:]) {
			t.Fatalf("from %d: %d bytes, %v", off, len(tail), err)
		}
	}

	// The DR site imports it into a fresh store: every keyring arrives.
	dr, err := store.OpenBolt(filepath.Join(t.TempDir(), "dr.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close()
	sumImp, err := kms.ImportBackup(ctx, dr, data, kms.ImportOptions{Key: f.transfer, Trusted: []*audit.Verifier{f.signer.Verifier()}})
	if err != nil {
		t.Fatal(err)
	}
	if sumImp.PerPrefix["keyrings/"] != len(ids) || sumImp.Signer != "primary.example" {
		t.Fatalf("import: %+v", sumImp)
	}
	for _, id := range []kms.KeyringID{ids[0], ids[len(ids)-1]} {
		want, _ := f.store.Get(ctx, "keyrings/"+id.String())
		have, err := dr.Get(ctx, "keyrings/"+id.String())
		if err != nil || !bytes.Equal(have.Value, want.Value) {
			t.Fatalf("DR keyring %s: %v", id, err)
		}
	}

	// Only an executed backup export has a backup.
	var sched coffrev1.Keyring
	if err := admin.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_ScheduleKeyDestruction{ScheduleKeyDestruction: &coffrev1.ScheduleKeyDestructionRequest{Keyring: "acme/k00000", Version: 0, Days: 7}}}, &sched); err != nil {
		t.Fatal(err)
	}
	pending, err := admin.Propose(ctx, &coffrev1.ProposeRequest{Operation: op})
	if err != nil {
		t.Fatal(err)
	}
	ps, err = admin.ListProposals(ctx, &coffrev1.ListProposalsRequest{State: quorum.StateExecuted})
	if err != nil {
		t.Fatal(err)
	}
	var other string
	for _, p := range ps.GetProposals() {
		if p.GetKind() == KindScheduleDestruction {
			other = p.GetId()
		}
	}
	for _, tc := range []struct {
		name string
		id   string
		off  uint64
		code codes.Code
		msg  string
	}{
		{"unknown proposal", "0123456789abcdef", 0, codes.NotFound, "no such proposal"},
		{"not an id", "backups/", 0, codes.InvalidArgument, "hex digits"},
		{"another kind", other, 0, codes.InvalidArgument, "not a backup.export"},
		{"pending export", pending.GetId(), 0, codes.FailedPrecondition, "is pending"},
		{"offset past the end", id, m.GetSize() + 1, codes.InvalidArgument, "past the backup"},
	} {
		_, _, err := fetch(ctx, f.admin, tc.id, tc.off)
		if st := status.Convert(err); st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("%s: %v %q, want %v %q", tc.name, st.Code(), st.Message(), tc.code, tc.msg)
		}
		if tc.off == 0 {
			_, err = f.admin.DeleteBackup(ctx, &coffrev1.DeleteBackupRequest{ProposalId: tc.id})
			if st := status.Convert(err); st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
				t.Errorf("delete, %s: %v %q", tc.name, st.Code(), st.Message())
			}
		}
	}

	// The store is not trusted: a chunk changed (same length) breaks the
	// hash, a chunk missing or a manifest that disagrees is refused; the
	// stream never ends cleanly.
	chunk1 := "backups/" + m.GetSha256() + "/000001"
	orig, err := f.store.Get(ctx, chunk1)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(orig.Value)
	flipped[100] ^= 1
	manifestKey := "backups/" + m.GetSha256() + "/manifest"
	origManifest, err := f.store.Get(ctx, manifestKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		damage func() error
		msg    string
	}{
		{"chunk altered", func() error { _, err := f.store.Put(ctx, chunk1, flipped); return err }, "does not hash to its name"},
		{"chunk truncated", func() error { _, err := f.store.Put(ctx, chunk1, orig.Value[:10]); return err }, "chunk 1 is 10 bytes"},
		{"chunk missing", func() error { return f.store.Delete(ctx, chunk1, 0) }, fmt.Sprintf("chunk 1 of %d is missing", m.GetChunks())},
		{"manifest size", func() error {
			_, err := f.store.Put(ctx, manifestKey, bytes.Replace(origManifest.Value, []byte(`"size":`), []byte(`"size":1`), 1))
			return err
		}, "manifest"},
	} {
		if err := tc.damage(); err != nil {
			t.Fatal(err)
		}
		_, _, err := fetch(ctx, f.admin, id, 0)
		if st := status.Convert(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("%s: %v %q", tc.name, st.Code(), st.Message())
		}
		if _, err := f.store.Put(ctx, chunk1, orig.Value); err != nil {
			t.Fatal(err)
		}
		if _, err := f.store.Put(ctx, manifestKey, origManifest.Value); err != nil {
			t.Fatal(err)
		}
	}
	if _, again, err := fetch(ctx, f.admin, id, 0); err != nil || !bytes.Equal(again, data) {
		t.Fatalf("after repair: %v", err)
	}

	// Deletion removes every chunk and the manifest, once; also after an
	// interrupted deletion (the last chunk gone) and with the manifest
	// damaged.
	if err := f.store.Delete(ctx, fmt.Sprintf("backups/%s/%06d", m.GetSha256(), m.GetChunks()-1), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.Put(ctx, manifestKey, []byte("{not a manifest")); err != nil {
		t.Fatal(err)
	}
	_, _, err = fetch(ctx, f.admin, id, 0)
	wantCode(t, err, codes.FailedPrecondition, "manifest")
	if del, err := f.admin.DeleteBackup(ctx, &coffrev1.DeleteBackupRequest{ProposalId: id}); err != nil || del.GetSha256() != m.GetSha256() {
		t.Fatalf("delete: %v %v", del, err)
	}
	if left, err := f.store.List(ctx, "backups/"); err != nil || len(left) != 0 {
		t.Fatalf("after delete the store holds %d backup keys (%v)", len(left), err)
	}
	_, err = f.admin.DeleteBackup(ctx, &coffrev1.DeleteBackupRequest{ProposalId: id})
	wantCode(t, err, codes.NotFound, "deleted already")
	_, _, err = fetch(ctx, f.admin, id, 0)
	wantCode(t, err, codes.NotFound, "deleted?")

	// Every call is in the audit log with its proposal, refusals as such.
	recs, err := f.log.Read(ctx, 0, 10000)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	for _, r := range recs {
		e := r.Entry
		if strings.HasPrefix(e.Operation, "admin.FetchBackup") || strings.HasPrefix(e.Operation, "admin.DeleteBackup") {
			if !strings.Contains(e.Reason, "proposal=") || !strings.HasPrefix(e.Actor.ID, "CN=test-admin") {
				t.Errorf("entry %+v", e)
			}
			counts[e.Operation+" "+e.Decision]++
		}
	}
	// Fetches: 1 + 3 resumed + 5 refused + 5 damaged + 1 after repair + 1
	// after deletion; deletions: 4 refused + 1 + 1 again. A refusal is an
	// allow (before the call) and a deny (after it).
	if counts["admin.FetchBackup allow"] != 16 || counts["admin.FetchBackup deny"] != 11 ||
		counts["admin.DeleteBackup allow"] != 6 || counts["admin.DeleteBackup deny"] != 5 {
		t.Errorf("audit entries: %v", counts)
	}

	// A proposal executed by a server from before stored backups holds a
	// small backup in its result: it is served the same way, and there is
	// nothing stored to delete.
	rec, err := f.store.Get(ctx, "quorum/proposals/"+id)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(rec.Value, &fields); err != nil {
		t.Fatal(err)
	}
	small := data[:5000]
	fields["result"], _ = json.Marshal(map[string][]byte{"backup": small})
	legacy, _ := json.Marshal(fields)
	if _, err := f.store.Put(ctx, "quorum/proposals/"+id, legacy); err != nil {
		t.Fatal(err)
	}
	lm, inline, err := fetch(ctx, f.admin, id, 0)
	if sum := sha256.Sum256(small); err != nil || !bytes.Equal(inline, small) || lm.GetSha256() != hex.EncodeToString(sum[:]) {
		t.Fatalf("legacy result: %v %v", lm, err)
	}
	_, err = f.admin.DeleteBackup(ctx, &coffrev1.DeleteBackupRequest{ProposalId: id})
	wantCode(t, err, codes.FailedPrecondition, "nothing stored to delete")

	// No entry, no call: with the log closed, a fetch gets nothing.
	if err := f.log.Close(); err != nil {
		t.Fatal(err)
	}
	_, _, err = fetch(ctx, f.admin, other, 0)
	wantCode(t, err, codes.Unavailable, "audit log")
}

// TestStoredBackupOnEtcd keeps a backup of several chunks in a real etcd
// (whose default request limit is 1.5 MiB), reads it back chunk by chunk
// and deletes it.
func TestStoredBackupOnEtcd(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	ctx := callCtx(t)
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-test/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	svc, err := kms.New(kms.Config{Store: st, Root: hsmtest.NewRoot(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	data := make([]byte, 2*kms.StoredBackupChunkSize+12345)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	b, err := svc.StoreBackup(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	if b.Chunks != 3 || b.Size != int64(len(data)) || b.SHA256 != sha256.Sum256(data) {
		t.Fatalf("stored %+v", b)
	}
	if _, err := svc.StoreBackup(ctx, data); !errors.Is(err, kms.ErrExists) {
		t.Fatalf("the same bytes twice: %v", err)
	}
	got, err := svc.GetStoredBackup(ctx, b.ID())
	if err != nil || got != b {
		t.Fatalf("manifest %+v, %v; want %+v", got, err, b)
	}
	var back []byte
	for i := range got.Chunks {
		c, err := svc.ReadStoredBackupChunk(ctx, got, i)
		if err != nil {
			t.Fatal(err)
		}
		back = append(back, c...)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("the chunks do not make the backup")
	}
	if err := svc.DeleteStoredBackup(ctx, b.ID()); err != nil {
		t.Fatal(err)
	}
	if left, err := st.List(ctx, "backups/"); err != nil || len(left) != 0 {
		t.Fatalf("%d keys left (%v)", len(left), err)
	}
	if _, err := svc.GetStoredBackup(ctx, b.ID()); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if _, err := svc.StoreBackup(ctx, make([]byte, kms.MaxBackupSize+1)); !errors.Is(err, kms.ErrInvalidArgument) {
		t.Fatalf("too big: %v", err)
	}
}
