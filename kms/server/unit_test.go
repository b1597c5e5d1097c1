package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func TestToStatus(t *testing.T) {
	const secretish = "KEY=00112233445566778899"
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
		msg  string // exact message
	}{
		{"invalid", fmt.Errorf("%w: tenant %q is empty", kms.ErrInvalidArgument, ""), codes.InvalidArgument, `invalid argument: tenant "" is empty`},
		{"not found", fmt.Errorf("%w: keyring acme/x", kms.ErrNotFound), codes.NotFound, "not found: keyring acme/x"},
		{"exists", fmt.Errorf("%w: keyring acme/x", kms.ErrExists), codes.AlreadyExists, "already exists: keyring acme/x"},
		{"precondition", fmt.Errorf("%w: no active version", kms.ErrFailedPrecondition), codes.FailedPrecondition, "failed precondition: no active version"},
		{"unavailable hides cause", fmt.Errorf("%w: %w: slot 3 /usr/lib/x.so", kms.ErrUnavailable, hsm.ErrUnavailable), codes.Unavailable, msgUnavailable},
		{"decrypt is generic", fmt.Errorf("%w: %s", kms.ErrDecrypt, secretish), codes.InvalidArgument, "decryption failed"},
		// ErrDecrypt wins over anything else in the chain.
		{"decrypt wins", errors.Join(fmt.Errorf("%w: tenant mismatch", kms.ErrInvalidArgument), kms.ErrDecrypt), codes.InvalidArgument, "decryption failed"},
		{"deadline", fmt.Errorf("store: %w", context.DeadlineExceeded), codes.DeadlineExceeded, "the call's deadline passed"},
		{"canceled", fmt.Errorf("hsm: %w", context.Canceled), codes.Canceled, "the call was canceled"},
		// Coffre's own bound on the audit replica or the store ran out: the
		// dependency is unavailable, whatever deadline is in the chain.
		{"unavailable before deadline", fmt.Errorf("%w: audit log: replication: %w", kms.ErrUnavailable, context.DeadlineExceeded), codes.Unavailable, msgUnavailable},
		{"unknown is internal", errors.New("bolt: page 7 corrupt " + secretish), codes.Internal, msgInternal},
		{"nil", nil, codes.OK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := toStatus(tc.err)
			if st.Code() != tc.code || st.Message() != tc.msg {
				t.Fatalf("toStatus(%v) = %v %q, want %v %q", tc.err, st.Code(), st.Message(), tc.code, tc.msg)
			}
			if strings.Contains(st.Message(), "0011223344") {
				t.Fatalf("status leaks: %q", st.Message())
			}
		})
	}
}

// TestFailInnerDeadline: a bare deadline error while the caller's own
// context is still live came from a bound inside Coffre (the etcd engine's
// request timeout): Unavailable, not DeadlineExceeded.
func TestFailInnerDeadline(t *testing.T) {
	s := unitServer(&syncBuffer{})
	if got := status.Code(s.fail(context.Background(), fmt.Errorf("store: %w", context.DeadlineExceeded))); got != codes.Unavailable {
		t.Errorf("inner deadline: %v, want Unavailable", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	if got := status.Code(s.fail(ctx, fmt.Errorf("store: %w", context.DeadlineExceeded))); got != codes.DeadlineExceeded {
		t.Errorf("the caller's deadline: %v, want DeadlineExceeded", got)
	}
}

func unitServer(log *syncBuffer) *Server {
	return New(nil, Options{
		MaxCallTimeout: time.Second,
		Logger:         slog.New(slog.NewTextHandler(log, nil)),
	})
}

func TestPanicBecomesInternal(t *testing.T) {
	log := &syncBuffer{}
	s := unitServer(log)
	info := &grpc.UnaryServerInfo{FullMethod: coffrev1.AdminService_GetKeyring_FullMethodName}
	_, err := s.observeUnary(context.Background(), nil, info, func(context.Context, any) (any, error) {
		panic("boom: secret detail")
	})
	st := status.Convert(err)
	if st.Code() != codes.Internal || st.Message() != msgInternal {
		t.Fatalf("got %v %q, want Internal %q", st.Code(), st.Message(), msgInternal)
	}
	out := log.String()
	if !strings.Contains(out, "boom: secret detail") || !strings.Contains(out, "unit_test.go") {
		t.Fatalf("the panic and its stack are not in the server log:\n%s", out)
	}

	// Streams too.
	sinfo := &grpc.StreamServerInfo{FullMethod: "/grpc.health.v1.Health/Watch"}
	err = s.observeStream(nil, fakeStream{ctx: context.Background()}, sinfo, func(any, grpc.ServerStream) error {
		panic("stream boom")
	})
	if status.Code(err) != codes.Internal {
		t.Fatalf("stream panic: got %v", err)
	}
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }

func TestDeadlineRule(t *testing.T) {
	s := unitServer(&syncBuffer{})
	method := coffrev1.AdminService_ListKeyrings_FullMethodName
	info := &grpc.UnaryServerInfo{FullMethod: method}
	var seen time.Time
	var had bool
	handler := func(ctx context.Context, _ any) (any, error) {
		seen, had = ctx.Deadline()
		return nil, nil
	}

	// No deadline: refused before the handler.
	had = false
	_, err := s.deadlineUnary(context.Background(), nil, info, handler)
	wantCode(t, err, codes.InvalidArgument, "a deadline is required")
	if had {
		t.Fatal("handler ran without a deadline")
	}

	// A far deadline is capped at MaxCallTimeout.
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	start := time.Now()
	if _, err := s.deadlineUnary(ctx, nil, info, handler); err != nil {
		t.Fatal(err)
	}
	if !had || seen.Sub(start) > time.Second+100*time.Millisecond {
		t.Fatalf("deadline %v after start, want at most the 1s cap", seen.Sub(start))
	}

	// A near deadline is kept.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	want, _ := ctx2.Deadline()
	if _, err := s.deadlineUnary(ctx2, nil, info, handler); err != nil {
		t.Fatal(err)
	}
	if !seen.Equal(want) {
		t.Fatalf("deadline changed from %v to %v", want, seen)
	}

	// Health is exempt.
	hinfo := &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"}
	if _, err := s.deadlineUnary(context.Background(), nil, hinfo, handler); err != nil {
		t.Fatalf("health without deadline: %v", err)
	}
}

func TestAdminGateWithoutPeer(t *testing.T) {
	s := unitServer(&syncBuffer{})
	info := &grpc.UnaryServerInfo{FullMethod: coffrev1.AdminService_CreateKeyring_FullMethodName}
	_, err := s.adminGateUnary(context.Background(), nil, info, func(context.Context, any) (any, error) {
		t.Fatal("handler ran")
		return nil, nil
	})
	wantCode(t, err, codes.Unauthenticated, "mutual TLS")
}

func TestKeyringConversion(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	k := &kms.Keyring{
		ID:         kms.KeyringID{Tenant: "acme", Name: "disks"},
		CreateTime: now,
		Primary:    2,
		Versions: []kms.KeyVersion{
			{Version: 1, State: kms.StateDeactivated, CreateTime: now, RootID: "pkcs11:token=t;object=root"},
			{Version: 2, State: kms.StateActive, CreateTime: now.Add(time.Hour), RootID: "pkcs11:token=t;object=root"},
		},
	}
	p := KeyringToProto(k)
	want := &coffrev1.Keyring{
		Id: "acme/disks", Tenant: "acme", Name: "disks", CreateTime: timestamppb.New(now), PrimaryVersion: 2,
		Versions: []*coffrev1.KeyVersion{
			{Version: 1, State: coffrev1.KeyState_KEY_STATE_DEACTIVATED, CreateTime: timestamppb.New(now), RootId: "pkcs11:token=t;object=root"},
			{Version: 2, State: coffrev1.KeyState_KEY_STATE_ACTIVE, CreateTime: timestamppb.New(now.Add(time.Hour)), RootId: "pkcs11:token=t;object=root"},
		},
	}
	if !proto.Equal(p, want) {
		t.Fatalf("KeyringToProto = %v\nwant %v", p, want)
	}
	back, err := KeyringFromProto(p)
	if err != nil {
		t.Fatal(err)
	}
	if back.ID != k.ID || !back.CreateTime.Equal(k.CreateTime) || back.Primary != 2 || len(back.Versions) != 2 ||
		back.Versions[0] != k.Versions[0] || !back.Versions[1].CreateTime.Equal(k.Versions[1].CreateTime) {
		t.Fatalf("round trip: %+v", back)
	}

	for _, bad := range []*coffrev1.Keyring{
		nil,
		{Id: "Acme/disks", Tenant: "Acme", Name: "disks"},
		{Id: "acme/disks", Tenant: "other", Name: "disks"},
		{Id: "acme/disks", Tenant: "acme", Name: "disks", Versions: []*coffrev1.KeyVersion{{Version: 1, State: 99}}},
	} {
		if _, err := KeyringFromProto(bad); err == nil {
			t.Errorf("KeyringFromProto(%v) accepted", bad)
		}
	}
}

// TestAuditTarget: admin calls name their keyring (and version) in the
// audit entry's own fields.
func TestAuditTarget(t *testing.T) {
	for _, tc := range []struct {
		req             any
		tenant, keyring string
		version         uint32
	}{
		{&coffrev1.RotateKeyringRequest{Id: "acme/disks"}, "acme", "acme/disks", 0},
		{&coffrev1.KeyVersionRequest{Keyring: "acme/disks", Version: 3}, "acme", "acme/disks", 3},
		{&coffrev1.SetRotationPeriodRequest{Keyring: "acme/disks", PeriodSeconds: 86400}, "acme", "acme/disks", 0},
		{&coffrev1.RewrapEnvelopeRequest{Tenant: "acme"}, "acme", "", 0},
		{&coffrev1.AddKeyVersionRequest{Keyring: "acme/disks"}, "acme", "acme/disks", 0},
		{&coffrev1.GetProposalRequest{Id: "0123456789abcdef"}, "", "", 0},
	} {
		e := &audit.Entry{}
		target(tc.req, e)
		if e.Tenant != tc.tenant || e.Keyring != tc.keyring || e.KeyVersion != tc.version {
			t.Errorf("%T: tenant %q keyring %q version %d", tc.req, e.Tenant, e.Keyring, e.KeyVersion)
		}
	}
}
