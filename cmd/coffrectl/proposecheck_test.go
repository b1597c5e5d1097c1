package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coffre-kms/coffre/cmd/internal/devtest"
	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

type answerFunc func(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error)

// lyingServer stands between coffrectl and a real coffred, as a
// compromised or impersonated server would: it forwards decisions (and
// counts them) but answers a Propose with whatever answer returns.
type lyingServer struct {
	coffrev1.UnimplementedAdminServiceServer
	real coffrev1.AdminServiceClient

	mu        sync.Mutex
	answer    answerFunc
	answered  *coffrev1.Proposal
	decisions int
}

func (s *lyingServer) Propose(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error) {
	s.mu.Lock()
	answer := s.answer
	s.mu.Unlock()
	p, err := answer(ctx, req)
	s.mu.Lock()
	s.answered = p
	s.mu.Unlock()
	return p, err
}

func (s *lyingServer) DecideProposal(ctx context.Context, req *coffrev1.DecideProposalRequest) (*coffrev1.Proposal, error) {
	s.mu.Lock()
	s.decisions++
	s.mu.Unlock()
	return s.real.DecideProposal(ctx, req)
}

// next sets the answer to the next Propose and forgets the last exchange.
func (s *lyingServer) next(answer answerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.answer, s.answered, s.decisions = answer, nil, 0
}

func (s *lyingServer) last() (*coffrev1.Proposal, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.answered, s.decisions
}

// startLyingServer serves ls over TLS 1.3 on loopback with a certificate
// of a CA of its own, and returns its address and that CA's file.
func startLyingServer(t *testing.T, ls *lyingServer) (addr, caFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "lying CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "coffred"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile = filepath.Join(t.TempDir(), "lying-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: key}},
		ClientAuth:   tls.RequireAnyClientCert,
	})))
	coffrev1.RegisterAdminServiceServer(srv, ls)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), caFile
}

// TestProposalIsTheOperationAsked: coffrectl signs a proposal the server
// answers a Propose with only if its content is the operation the officer
// asked for (SECURITY.md: approvers recompute the hash from the content
// they are shown and never sign an id the server chose). Against a real
// coffred (`coffred dev`, a quorum of one: the proposer's approval runs
// the operation), through a server in between that lies.
func TestProposalIsTheOperationAsked(t *testing.T) {
	env := devtest.Start(t).Env
	// coffred wants a deadline on every call, of at most 30s.
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	real, closeReal, err := adminClient(globals{server: env["COFFRE_ADDR"], ca: env["COFFRE_CA"], cert: env["COFFRE_CERT"], key: env["COFFRE_KEY"]})
	if err != nil {
		t.Fatal(err)
	}
	defer closeReal()

	t.Run("every kind as coffred writes it", func(t *testing.T) { everyKindAsCoffredWritesIt(ctx, t, real, env["COFFRE_CERT"]) })

	ls := &lyingServer{real: real}
	addr, caFile := startLyingServer(t, ls)
	cli := func(args ...string) (int, string) {
		code, _, stderr := runCLI(t, append(args, "--server", addr, "--ca", caFile, "--cert", env["COFFRE_CERT"], "--key", env["COFFRE_KEY"],
			"--admin-key", env["COFFRE_ADMIN_KEY"], "--admin-passphrase-file", env["COFFRE_ADMIN_PASSPHRASE_FILE"])...)
		return code, stderr
	}
	// What the officer asks for: a routine class change.
	p7 := strings.Repeat("ab", 32)
	classSet := []string{"class", "set", "storage", "--pcr", "7=" + p7}
	// Answers from the real server to another request than the one sent.
	instead := func(op *coffrev1.Operation, ttlSeconds uint32) answerFunc {
		return func(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error) {
			if ttlSeconds == 0 {
				ttlSeconds = req.GetTtlSeconds()
			}
			return real.Propose(ctx, &coffrev1.ProposeRequest{Operation: op, TtlSeconds: ttlSeconds})
		}
	}
	dr, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	export := &coffrev1.Operation{Op: &coffrev1.Operation_ExportBackup{ExportBackup: &coffrev1.ExportBackupRequest{To: dr.Public().String()}}}
	class := func(name, pcr7 string) *coffrev1.Operation {
		v, _ := hex.DecodeString(pcr7)
		return &coffrev1.Operation{Op: &coffrev1.Operation_SetNodeClass{SetNodeClass: &coffrev1.SetNodeClassRequest{
			Class: &coffrev1.NodeClass{Name: name, Pcrs: []*coffrev1.PCRReference{{Index: 7, Sha256: v}}},
		}}}
	}
	// The operation asked for, but as someone else's proposal: content the
	// real server never saw, made by a quorum engine of the liar's own.
	local := localEngine(t, "class.set")
	someoneElse := func(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error) {
		p, err := real.Propose(ctx, req)
		if err != nil {
			return nil, err
		}
		c, err := quorum.ParseContent(p.GetContent())
		if err != nil {
			return nil, err
		}
		q, err := local.Propose(ctx, c.Kind, c.Args, "CN=someone-else", c.ExpireTime.Sub(c.CreateTime))
		if err != nil {
			return nil, err
		}
		return &coffrev1.Proposal{Id: q.ID, Content: q.Content, Kind: q.Parsed.Kind, State: q.State, Threshold: 1, Proposer: q.Parsed.Proposer,
			CreateTime: timestamppb.New(q.Parsed.CreateTime), ExpireTime: timestamppb.New(q.Parsed.ExpireTime)}, nil
	}

	for _, tc := range []struct {
		name, why string
		answer    answerFunc
		real      bool // the answer is a proposal on the real server
	}{
		{"a backup export instead", "it is a backup.export, you asked for a class.set", instead(export, 0), true},
		{"other reference values", `its arguments are {"name":"storage","pcrs":[{"index":7,"sha256":"` + strings.Repeat("cd", 32), instead(class("storage", strings.Repeat("cd", 32)), 0), true},
		{"another class", `"name":"storage-2"`, instead(class("storage-2", p7), 0), true},
		{"a week to wait", "it waits 168h0m0s for approvals, you asked for 24h0m0s", instead(class("storage", p7), 7*24*3600), true},
		{"someone else's", `it is proposed by "CN=someone-else"`, someoneElse, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ls.next(tc.answer)
			code, stderr := cli(classSet...)
			if code == exitOK || !strings.Contains(stderr, "not the operation you asked for") || !strings.Contains(stderr, tc.why) ||
				!strings.Contains(stderr, "nothing was signed") {
				t.Errorf("exit %d, stderr:\n%s", code, stderr)
			}
			answered, decisions := ls.last()
			if decisions != 0 {
				t.Errorf("coffrectl sent %d signed decisions on a proposal it did not ask for", decisions)
			}
			if !tc.real || answered == nil {
				return
			}
			p, err := real.GetProposal(ctx, &coffrev1.GetProposalRequest{Id: answered.GetId()})
			if err != nil || p.GetState() != quorum.StatePending || len(p.GetDecisions()) != 0 {
				t.Errorf("on the server, the proposal answered: %v, state %s, %d decisions", err, p.GetState(), len(p.GetDecisions()))
			}
		})
	}

	t.Run("as asked", func(t *testing.T) {
		ls.next(func(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error) {
			return real.Propose(ctx, req)
		})
		if code, stderr := cli(classSet...); code != exitOK || !strings.Contains(stderr, "executed (1 of 1 approvals)") {
			t.Fatalf("exit %d, stderr:\n%s", code, stderr)
		}
		if _, decisions := ls.last(); decisions != 1 {
			t.Errorf("%d decisions sent, want 1", decisions)
		}
	})
}

// localEngine is a quorum engine of its own (not the server's) that can
// propose kinds.
func localEngine(t *testing.T, kinds ...string) *quorum.Engine {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "liar.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e, err := quorum.New(quorum.Config{Store: st, Audit: func(context.Context, quorum.Event) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range kinds {
		e.Register(k, nil, nil)
	}
	admin, err := identity.GenerateKey() // any: Propose needs a quorum
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Init(context.Background(), quorum.SetQuorumArgs{Threshold: 1, Admins: []quorum.AdminSpec{{Name: "liar", PublicKey: admin.Public().String()}}}, "liar"); err != nil {
		t.Fatal(err)
	}
	return e
}

// everyKindAsCoffredWritesIt proposes every gated operation to the real
// server directly and checks that coffrectl's reading of the operation
// (requestFor) accepts what the server wrote, byte for byte, for every
// kind the wire knows.
func everyKindAsCoffredWritesIt(ctx context.Context, t *testing.T, c coffrev1.AdminServiceClient, certFile string) {
	q, err := c.GetQuorum(ctx, &coffrev1.GetQuorumRequest{})
	if err != nil {
		t.Fatal(err)
	}
	dr, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pcr := func(i uint32, b byte) *coffrev1.PCRReference {
		return &coffrev1.PCRReference{Index: i, Sha256: bytes.Repeat([]byte{b}, 32)}
	}
	op := func(o any) *coffrev1.Operation {
		switch o := o.(type) {
		case *coffrev1.SetKeyringPolicyRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_SetKeyringPolicy{SetKeyringPolicy: o}}
		case *coffrev1.AddEKRootRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_AddEkRoot{AddEkRoot: o}}
		case *coffrev1.SetNodeClassRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_SetNodeClass{SetNodeClass: o}}
		case *coffrev1.EnrollNodeRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_EnrollNode{EnrollNode: o}}
		case *coffrev1.RevokeNodeRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_RevokeNode{RevokeNode: o}}
		case *coffrev1.SetQuorumRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_SetQuorum{SetQuorum: o}}
		case *coffrev1.ScheduleKeyDestructionRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_ScheduleKeyDestruction{ScheduleKeyDestruction: o}}
		case *coffrev1.RotateRootRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_RotateRoot{RotateRoot: o}}
		case *coffrev1.DestroyRootRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_DestroyRoot{DestroyRoot: o}}
		case *coffrev1.ExportBackupRequest:
			return &coffrev1.Operation{Op: &coffrev1.Operation_ExportBackup{ExportBackup: o}}
		}
		t.Fatalf("no operation for %T", o)
		return nil
	}
	ops := []*coffrev1.Operation{
		op(&coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{Keyring: "acme/disks", AllowedClasses: []string{"storage", "backup"},
			RequiredLabels: map[string]string{"jurisdiction": "ca-qc", "site": "qc-1"}, Release: coffrev1.Release_RELEASE_TPM}}),
		op(&coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{Keyring: "acme/disks", Release: coffrev1.Release_RELEASE_HPKE}}),
		op(&coffrev1.AddEKRootRequest{Certificate: []byte("checked when it runs, not when proposed")}),
		op(&coffrev1.SetNodeClassRequest{Class: &coffrev1.NodeClass{Name: "storage", RequireEventLog: true, Pcrs: []*coffrev1.PCRReference{pcr(16, 'b'), pcr(7, 'a')}}}),
		op(&coffrev1.EnrollNodeRequest{Name: "qc-store-1", Class: "storage", Labels: map[string]string{"site": "qc-1"},
			Ek: &coffrev1.EnrollNodeRequest_EkPublic{EkPublic: []byte("ek public <&>")}}),
		op(&coffrev1.EnrollNodeRequest{Name: "qc-store-2", Class: "storage", Ek: &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: []byte("ek certificate")}}),
		op(&coffrev1.RevokeNodeRequest{Name: "qc-store-1"}),
		op(&coffrev1.SetQuorumRequest{Threshold: 1, Admins: []*coffrev1.QuorumAdmin{{Name: q.GetAdmins()[0].GetName(), PublicKey: q.GetAdmins()[0].GetPublicKey()}}}),
		op(&coffrev1.ScheduleKeyDestructionRequest{Keyring: "acme/disks", Version: 2, Days: 7}),
		op(&coffrev1.ScheduleKeyDestructionRequest{Keyring: "acme/disks", Days: 30}),
		op(&coffrev1.RotateRootRequest{}),
		op(&coffrev1.DestroyRootRequest{RootId: "pkcs11:token=coffre;object=root-2025"}),
		op(&coffrev1.ExportBackupRequest{To: dr.Public().String()}),
	}
	seen := map[string]bool{}
	for _, o := range ops {
		name := string(o.ProtoReflect().WhichOneof(o.ProtoReflect().Descriptor().Oneofs().ByName("op")).Name())
		seen[name] = true
		p, err := c.Propose(ctx, &coffrev1.ProposeRequest{Operation: o, TtlSeconds: 600})
		if err != nil {
			t.Errorf("%s: the server refused it: %v", name, err)
			continue
		}
		want, err := requestFor(o, certFile, 600)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if err := checkProposed(p, want); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	fields := (&coffrev1.Operation{}).ProtoReflect().Descriptor().Oneofs().ByName("op").Fields()
	for i := range fields.Len() {
		if name := string(fields.Get(i).Name()); !seen[name] {
			t.Errorf("operation %s is not covered here: add it here", name)
		}
	}
	// And the refusal of an operation coffrectl does not know.
	if _, err := requestFor(&coffrev1.Operation{}, certFile, 600); err == nil || errors.Is(err, errNotRequested) {
		t.Errorf("an empty operation: %v", err)
	}
}
