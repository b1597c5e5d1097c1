package store_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
	"github.com/coffre-kms/coffre/kms/store/storetest"
)

func openEtcd(t testing.TB, endpoints []string, prefix string, reqTimeout time.Duration) *store.Etcd {
	t.Helper()
	s, err := store.OpenEtcd(t.Context(), store.EtcdOptions{
		Endpoints:      endpoints,
		Prefix:         prefix,
		DialTimeout:    2 * time.Second,
		RequestTimeout: reqTimeout,
	})
	if err != nil {
		t.Fatalf("OpenEtcd: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil && !errors.Is(err, store.ErrClosed) {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// TestEtcdConformance runs the store contract against a one-member
// embedded cluster; each subtest gets its own key prefix, so they share
// the cluster (and its revision counter) but not their keys.
func TestEtcdConformance(t *testing.T) {
	c := etcdtest.StartCluster(t, 1)
	var n atomic.Int64
	storetest.Run(t, func(t *testing.T) store.Store {
		return openEtcd(t, c.Endpoints(), fmt.Sprintf("/coffre-test/%d/", n.Add(1)), 5*time.Second)
	})
}

func TestOpenEtcdOptions(t *testing.T) {
	ctx := t.Context()
	for _, prefix := range []string{"", "/coffre", "/co\xffre/"} {
		if _, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: []string{"http://127.0.0.1:1"}, Prefix: prefix}); err == nil {
			t.Errorf("OpenEtcd(prefix %q) succeeded", prefix)
		}
	}
	if _, err := store.OpenEtcd(ctx, store.EtcdOptions{Prefix: "/coffre/"}); err == nil {
		t.Error("OpenEtcd without endpoints succeeded")
	}
	// Plaintext only on loopback.
	for _, ep := range []string{"http://10.0.0.1:2379", "etcd.example:2379", "http://[::2]:2379", "http://localhost.example:2379"} {
		_, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: []string{"http://127.0.0.1:1", ep}, Prefix: "/coffre/", DialTimeout: time.Millisecond})
		if err == nil || !strings.Contains(err.Error(), "not on loopback") {
			t.Errorf("OpenEtcd(%q, no TLS) = %v, want a refusal", ep, err)
		}
	}
	// Nothing listens there: OpenEtcd fails within the dial timeout.
	start := time.Now()
	_, err := store.OpenEtcd(ctx, store.EtcdOptions{
		Endpoints:   []string{"http://127.0.0.1:1"},
		Prefix:      "/coffre/",
		DialTimeout: 300 * time.Millisecond,
	})
	if err == nil {
		t.Fatal("OpenEtcd on a dead endpoint succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("OpenEtcd on a dead endpoint took %v", d)
	}
	t.Logf("dead endpoint: %v", err)
}

// TestEtcdPrefixIsolation checks that two stores on one cluster with
// different prefixes see only their own keys, even when one prefix is a
// textual prefix of the other but for the trailing "/".
func TestEtcdPrefixIsolation(t *testing.T) {
	c := etcdtest.StartCluster(t, 1)
	a := openEtcd(t, c.Endpoints(), "/a/", 5*time.Second)
	b := openEtcd(t, c.Endpoints(), "/ab/", 5*time.Second)
	ctx := t.Context()
	if _, err := a.Put(ctx, "x", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Put(ctx, "y", []byte("2")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		s    *store.Etcd
		want string
	}{{a, "x"}, {b, "y"}} {
		list, err := tc.s.List(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != 1 || list[0].Key != tc.want {
			t.Errorf("List = %v, want only %q", list, tc.want)
		}
	}
	if _, err := a.Get(ctx, "y"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a.Get(y) = %v, want ErrNotFound", err)
	}
}

// TestEtcdQuorum runs read-modify-write increments on a three-member
// cluster while members stop and restart: one member down keeps the store
// writable; two down make writes fail within the request timeout; after a
// restart, writes succeed again and no acknowledged increment is lost.
func TestEtcdQuorum(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-member etcd cluster")
	}
	c := etcdtest.StartCluster(t, 3)
	const reqTimeout = time.Second
	s := openEtcd(t, c.Endpoints(), "/coffre/", reqTimeout)
	ctx := t.Context()

	// increment adds one to "counter" by CAS. It returns whether the
	// increment was acknowledged, and whether a failure left the outcome
	// unknown (an unavailable-store error on the CAS itself).
	increment := func() (acked, ambiguous bool, err error) {
		for {
			kv, err := s.Get(ctx, "counter")
			var n int
			switch {
			case errors.Is(err, store.ErrNotFound):
			case err != nil:
				return false, false, err
			default:
				if n, err = strconv.Atoi(string(kv.Value)); err != nil {
					t.Fatalf("counter %q: %v", kv.Value, err)
				}
			}
			_, err = s.CompareAndSwap(ctx, "counter", kv.Revision, []byte(strconv.Itoa(n+1)))
			switch {
			case err == nil:
				return true, false, nil
			case errors.Is(err, store.ErrConflict):
				continue
			default:
				return false, true, err
			}
		}
	}
	var acked, ambiguous atomic.Int64
	count := func(ok, amb bool) {
		if ok {
			acked.Add(1)
		}
		if amb {
			ambiguous.Add(1)
		}
	}

	watch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}

	// Background load across the whole test.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ok, amb, _ := increment()
				count(ok, amb)
				if !ok {
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}

	// One member down: writes keep succeeding.
	time.Sleep(200 * time.Millisecond)
	c.StopMember(2)
	t0 := time.Now()
	for i := range 20 {
		ok, amb, err := increment()
		count(ok, amb)
		if err != nil {
			t.Fatalf("increment %d with one member down: %v", i, err)
		}
	}
	t.Logf("20 increments with 2/3 members up: %v", time.Since(t0))

	// Two members down: no quorum, writes fail promptly.
	c.StopMember(1)
	for i := range 3 {
		t0 := time.Now()
		_, err := s.Put(ctx, "no-quorum", []byte(strconv.Itoa(i)))
		d := time.Since(t0)
		if err == nil {
			t.Fatalf("Put %d without quorum succeeded", i)
		}
		if errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrInvalid) || errors.Is(err, store.ErrClosed) {
			t.Fatalf("Put without quorum = %v, want an unavailable error", err)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Put without quorum = %v, want it to wrap context.DeadlineExceeded", err)
		}
		if d > reqTimeout+2*time.Second {
			t.Errorf("Put without quorum took %v, request timeout %v", d, reqTimeout)
		}
		t.Logf("Put without quorum failed after %v: %v", d.Round(time.Millisecond), err)
	}
	if _, err := s.Get(ctx, "counter"); err == nil {
		t.Error("linearizable Get without quorum succeeded")
	}

	// Restart one member: quorum is back and writes succeed again.
	t0 = time.Now()
	c.RestartMember(t, 1)
	t.Logf("member 1 rejoined in %v", time.Since(t0))
	if err := retry(ctx, 10*time.Second, func() error {
		_, err := s.Put(ctx, "quorum-back", []byte("x"))
		return err
	}); err != nil {
		t.Fatalf("Put after quorum restored: %v", err)
	}
	t.Logf("writes succeed %v after restart began", time.Since(t0))
	c.RestartMember(t, 2)
	for i := range 20 {
		if err := retry(ctx, 10*time.Second, func() error {
			ok, amb, err := increment()
			count(ok, amb)
			return err
		}); err != nil {
			t.Fatalf("increment %d after full restart: %v", i, err)
		}
	}
	close(stop)
	wg.Wait()

	kv, err := s.Get(ctx, "counter")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := strconv.ParseInt(string(kv.Value), 10, 64)
	a, amb := acked.Load(), ambiguous.Load()
	t.Logf("counter %d: %d acknowledged increments, %d with unknown outcome", got, a, amb)
	if got < a || got > a+amb {
		t.Fatalf("counter = %d, want between %d acknowledged and %d (+ unknown outcomes): an acknowledged increment was lost or invented", got, a, a+amb)
	}

	// The watch opened before the failures: the member the client was
	// watching through may have lost its leader, which cancels the watch
	// (WithRequireLeader) and closes the channel. Either it closed, or it
	// still delivers, in revision order, a new write.
	last := int64(0)
	rev, err := s.Put(ctx, "after", []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for done := false; !done; {
		select {
		case ev, ok := <-watch:
			if !ok {
				t.Log("watch closed across the quorum loss; callers re-list and re-watch")
				done = true
				break
			}
			if ev.KV.Revision <= last {
				t.Fatalf("watch event rev %d after %d", ev.KV.Revision, last)
			}
			last = ev.KV.Revision
			if ev.KV.Revision == rev {
				t.Log("watch survived the member restarts and still delivers")
				done = true
			}
		case <-timeout:
			t.Fatal("watch neither delivered the new write nor closed")
		}
	}
}

// TestEtcdWatchMemberRestart checks what a watcher sees when one member
// of three restarts while quorum holds: every write made after Watch
// returned is delivered once, in order, or the channel closes (then the
// caller re-lists). It logs which happened.
func TestEtcdWatchMemberRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-member etcd cluster")
	}
	t0 := time.Now()
	c := etcdtest.StartCluster(t, 3)
	t.Logf("three-member cluster ready in %v", time.Since(t0).Round(time.Millisecond))
	// The store talks to member 0 only, so restarting it is the hard case.
	s := openEtcd(t, []string{c.Endpoint(0)}, "/coffre/", 2*time.Second)
	other := openEtcd(t, []string{c.Endpoint(1)}, "/coffre/", 2*time.Second)
	ctx := t.Context()
	ch, err := s.Watch(ctx, "w/")
	if err != nil {
		t.Fatal(err)
	}
	var revs []int64
	for i := range 5 {
		rev, err := other.Put(ctx, "w/k", []byte(strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, rev)
	}
	t0 = time.Now()
	c.StopMember(0)
	t.Logf("member 0 stopped in %v", time.Since(t0).Round(time.Millisecond))
	for i := 5; i < 10; i++ {
		rev, err := other.Put(ctx, "w/k", []byte(strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, rev)
	}
	t0 = time.Now()
	c.RestartMember(t, 0)
	t.Logf("member 0 rejoined in %v", time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	for i := 10; i < 15; i++ {
		rev, err := other.Put(ctx, "w/k", []byte(strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, rev)
	}
	var got []int64
	timeout := time.After(15 * time.Second)
recv:
	for len(got) < len(revs) {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Errorf("watch closed after %d of %d events; Watch documents that it survives a member restart", len(got), len(revs))
				break recv
			}
			got = append(got, ev.KV.Revision)
		case <-timeout:
			t.Fatalf("watch holds %d of %d events and is still open", len(got), len(revs))
		}
	}
	for i, r := range got {
		if r != revs[i] {
			t.Fatalf("event %d rev %d, want %d (got %v, want prefix of %v)", i, r, revs[i], got, revs)
		}
	}
	if len(got) == len(revs) {
		t.Logf("watch delivered all %d events (the last %v after the restart) across the restart of its member", len(got), time.Since(t0).Round(time.Millisecond))
	} else {
		t.Logf("watch closed after %d of %d events across the restart of its member", len(got), len(revs))
	}
	// Whichever happened, the store itself works again through member 0.
	if err := retry(ctx, 10*time.Second, func() error {
		_, err := s.Put(ctx, "w/after", []byte("x"))
		return err
	}); err != nil {
		t.Fatalf("Put through the restarted member: %v", err)
	}
}

// retry calls f until it succeeds or d passes, returning the last error.
func retry(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCheckEtcdEndpoint: with TLS only https:// (and unixs://) endpoints are
// accepted, since the etcd client speaks plaintext to http:// and unix://
// ones whatever TLS it is given; without TLS only loopback plaintext ones,
// and https:// is refused rather than half-configured.
func TestCheckEtcdEndpoint(t *testing.T) {
	for _, tc := range []struct {
		ep      string
		withTLS bool
		ok      bool
	}{
		{"https://etcd-qc1.kms.internal:2379", true, true},
		{"HTTPS://10.0.0.1:2379", true, true},
		{"unixs:///run/etcd.sock", true, true},
		{"http://etcd-qc1.kms.internal:2379", true, false},
		{"http://127.0.0.1:2379", true, false},
		{"HTTP://10.0.0.1:2379", true, false},
		{"unix:///run/etcd.sock", true, false},
		{"unix:etcd.sock", true, false},
		{"etcd-qc1.kms.internal:2379", true, false},
		{"ftp://etcd:2379", true, false},
		{"https://", true, false},

		{"http://127.0.0.1:2379", false, true},
		{"http://[::1]:2379", false, true},
		{"localhost:2379", false, true},
		{"unix:///run/etcd.sock", false, true},
		{"https://127.0.0.1:2379", false, false},
		{"https://etcd-qc1.kms.internal:2379", false, false},
		{"unixs:///run/etcd.sock", false, false},
		{"http://10.0.0.1:2379", false, false},
	} {
		err := store.CheckEtcdEndpoint(tc.ep, tc.withTLS)
		if (err == nil) != tc.ok {
			t.Errorf("CheckEtcdEndpoint(%q, TLS %v) = %v, want ok %v", tc.ep, tc.withTLS, err, tc.ok)
		}
	}
	if err := store.CheckEtcdEndpoint("https://127.0.0.1:2379", false); err == nil || !strings.Contains(err.Error(), "no TLS configuration") {
		t.Errorf("https without TLS: %v", err)
	}
}

// TestOpenEtcdTLSNeverPlaintext: with a TLS configuration, an http://
// endpoint is refused before anything is sent. The etcd client would
// otherwise drop the credentials for it and speak plaintext HTTP/2.
func TestOpenEtcdTLSNeverPlaintext(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var clear [][]byte // first bytes of connections that did not start a TLS handshake
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
				buf := make([]byte, 24)
				n, _ := c.Read(buf)
				if n > 0 && buf[0] != 0x16 { // 0x16: a TLS handshake record
					mu.Lock()
					clear = append(clear, buf[:n])
					mu.Unlock()
				}
			}()
		}
	}()
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: x509.NewCertPool()}
	for _, eps := range [][]string{
		{"http://" + ln.Addr().String()},
		// The client takes the credentials of every connection from the
		// first endpoint.
		{"http://" + ln.Addr().String(), "https://" + ln.Addr().String()},
		{"unix:///nonexistent/etcd.sock", "https://" + ln.Addr().String()},
	} {
		_, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: eps, Prefix: "/coffre/", TLS: tlsCfg, DialTimeout: time.Second})
		if err == nil || !strings.Contains(err.Error(), "plaintext") {
			t.Errorf("OpenEtcd(%q, TLS) = %v, want a refusal", eps, err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	for _, b := range clear {
		t.Errorf("TLS configured, but the client sent plaintext: %q", b)
	}
}

// TestEtcdOverTLS: a cluster that requires mutual TLS is reached over
// https:// with a TLS 1.3 client configuration, and refuses a client
// without a certificate.
func TestEtcdOverTLS(t *testing.T) {
	c := etcdtest.StartClusterWith(t, 1, etcdtest.Options{TLS: true})
	s, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: c.Endpoints(), Prefix: "/coffre-tls/", TLS: c.ClientTLS(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Put(t.Context(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if kv, err := s.Get(t.Context(), "k"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("Get = %+v, %v", kv, err)
	}
	noCert := c.ClientTLS()
	noCert.Certificates = nil
	if s2, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: c.Endpoints(), Prefix: "/coffre-tls/", TLS: noCert, DialTimeout: time.Second}); err == nil {
		s2.Close()
		t.Fatal("OpenEtcd without a client certificate succeeded")
	}
}
