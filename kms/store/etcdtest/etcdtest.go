// Package etcdtest runs real etcd clusters, embedded in the test process,
// for tests of the etcd store engine and of the services above it.
//
// Members listen on 127.0.0.1 only, in plaintext unless Options.TLS asks
// for mutual TLS to clients, with their data in t.TempDir(). The Raft
// timeouts are short (50ms heartbeat, 500ms election) so that a cluster
// starts, and elects a new leader, in well under a second.
//
// Clients and peers reach each member through a forwarder in the test
// process whose address stays the member's for the cluster's life, while
// the member itself listens on a fresh port each time it starts: no
// restart has to rebind a port that something else took meanwhile, and
// [Cluster.KillMember] can cut every connection to a member at once.
//
// Members run with fsync off unless Options.Fsync says otherwise: a
// stopped or killed member's process (the test's) lives on, so what it
// wrote is still in the page cache; the tests are about quorum and
// failover, not disk durability. Benchmarks that compare with a store
// that does fsync turn it on.
package etcdtest

import (
	"crypto/tls"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"github.com/coffre-kms/coffre/kms/internal/testpki"
)

// readyTimeout bounds the wait for a member to join its cluster.
const readyTimeout = 30 * time.Second

// Cluster is a running embedded etcd cluster.
type Cluster struct {
	mu      sync.Mutex
	opts    Options
	token   string
	initial string
	members []*member
	pki     *testpki.PKI // nil without Options.TLS
}

// Options tunes a cluster.
type Options struct {
	// Fsync makes members fsync their write-ahead log and backend as a
	// production etcd does.
	Fsync bool
	// TLS makes members serve clients over mutual TLS (https:// client
	// URLs) with certificates from a CA made for the cluster; see
	// [Cluster.ClientTLS] and [Cluster.TLSFiles]. Peers stay plaintext.
	TLS bool
}

type member struct {
	name       string
	dir        string
	clientURL  url.URL // client's bridge, advertised
	peerURL    url.URL // peer's bridge, advertised
	client     *bridge
	peer       *bridge
	etcd       *embed.Etcd // nil while stopped
	everLaunch bool
}

// StartCluster starts a cluster of members members (1, 3, 5…) with fsync
// off, waits until every member is ready and stops them all when the test
// ends.
func StartCluster(t testing.TB, members int) *Cluster {
	t.Helper()
	return StartClusterWith(t, members, Options{})
}

// StartClusterWith is StartCluster with opts.
func StartClusterWith(t testing.TB, members int, opts Options) *Cluster {
	t.Helper()
	if members < 1 {
		t.Fatalf("etcdtest: %d members", members)
	}
	c := &Cluster{opts: opts, token: fmt.Sprintf("coffre-test-%d", time.Now().UnixNano())}
	base := t.TempDir()
	clientScheme := "http"
	if opts.TLS {
		pki, err := testpki.New(filepath.Join(base, "pki"), "etcdtest")
		if err != nil {
			t.Fatalf("etcdtest: %v", err)
		}
		c.pki, clientScheme = pki, "https"
	}
	t.Cleanup(c.stopAll)
	var initial []string
	for i := range members {
		m := &member{
			name: fmt.Sprintf("m%d", i),
			dir:  filepath.Join(base, fmt.Sprintf("m%d", i)),
		}
		var err error
		if m.client, err = newBridge(); err != nil {
			t.Fatalf("etcdtest: %v", err)
		}
		c.members = append(c.members, m)
		if m.peer, err = newBridge(); err != nil {
			t.Fatalf("etcdtest: %v", err)
		}
		m.clientURL = url.URL{Scheme: clientScheme, Host: m.client.addr()}
		m.peerURL = url.URL{Scheme: "http", Host: m.peer.addr()}
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	c.initial = strings.Join(initial, ",")

	// Members of a new cluster wait for each other: start them together.
	errs := make([]error, members)
	var wg sync.WaitGroup
	for i := range c.members {
		wg.Go(func() { errs[i] = c.start(i) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("etcdtest: member %d: %v", i, err)
		}
	}
	return c
}

// start launches member i and waits until it is ready.
func (c *Cluster) start(i int) error {
	c.mu.Lock()
	m := c.members[i]
	if m.etcd != nil {
		c.mu.Unlock()
		return fmt.Errorf("member %d is running", i)
	}
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	// The member listens on ports the kernel picks and is reached through
	// its bridges. (Without the gRPC gateway, which would dial the listen
	// address as written, port 0 included.)
	cfg.ListenClientUrls = []url.URL{{Scheme: m.clientURL.Scheme, Host: "127.0.0.1:0"}}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.ListenPeerUrls = []url.URL{{Scheme: "http", Host: "127.0.0.1:0"}}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
	cfg.EnableGRPCGateway = false
	cfg.InitialCluster = c.initial
	cfg.InitialClusterToken = c.token
	cfg.ClusterState = embed.ClusterStateFlagNew
	if m.everLaunch {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	cfg.UnsafeNoFsync = !c.opts.Fsync
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}
	cfg.Metrics = "basic"
	if c.pki != nil {
		cfg.ClientTLSInfo.CertFile = c.pki.ServerCert
		cfg.ClientTLSInfo.KeyFile = c.pki.ServerKey
		cfg.ClientTLSInfo.TrustedCAFile = c.pki.CA
		cfg.ClientTLSInfo.ClientCertAuth = true
	}
	m.everLaunch = true
	c.mu.Unlock()

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	if len(e.Clients) != 1 || len(e.Peers) != 1 {
		e.Close()
		return fmt.Errorf("etcd listens on %d client and %d peer addresses, want 1 and 1", len(e.Clients), len(e.Peers))
	}
	// Before waiting: the members of a new cluster reach each other through
	// their peer bridges before any is ready.
	m.peer.setTarget(e.Peers[0].Addr().String())
	m.client.setTarget(e.Clients[0].Addr().String())
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		m.client.cut()
		m.peer.cut()
		e.Close()
		return fmt.Errorf("etcd failed: %w", err)
	case <-time.After(readyTimeout):
		m.client.cut()
		m.peer.cut()
		e.Server.Stop()
		e.Close()
		return fmt.Errorf("not ready within %v", readyTimeout)
	}
	c.mu.Lock()
	m.etcd = e
	c.mu.Unlock()
	return nil
}

// Endpoints returns the client URLs of every member, running or not.
func (c *Cluster) Endpoints() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.clientURL.String()
	}
	return out
}

// ClientTLS returns a mutual-TLS client configuration for a cluster
// started with Options.TLS (TLS 1.3, the cluster's CA as root, a client
// certificate from it), or nil for a plaintext cluster.
func (c *Cluster) ClientTLS() *tls.Config {
	if c.pki == nil {
		return nil
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: c.pki.Pool, Certificates: []tls.Certificate{c.pki.Client}}
}

// TLSFiles returns the PEM files of a cluster started with Options.TLS:
// the CA certificate, and a client certificate and its key (mode 0600).
// They are empty for a plaintext cluster.
func (c *Cluster) TLSFiles() (caFile, certFile, keyFile string) {
	if c.pki == nil {
		return "", "", ""
	}
	return c.pki.CA, c.pki.ClientCert, c.pki.ClientKey
}

// Endpoint returns the client URL of member i.
func (c *Cluster) Endpoint(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].clientURL.String()
}

// StopMember stops member i gracefully, as etcd does on SIGTERM; its data
// stays for RestartMember. Stopping a stopped member does nothing. Like
// etcd itself, it waits for open client streams (watches) to end, for up
// to etcd's request timeout (about 6s with these Raft settings), before
// cutting them, and a leader hands its leadership to a follower first.
func (c *Cluster) StopMember(i int) {
	c.mu.Lock()
	m := c.members[i]
	e := m.etcd
	m.etcd = nil
	c.mu.Unlock()
	if e != nil {
		e.Close()
		m.client.cut()
		m.peer.cut()
	}
}

// KillMember stops member i abruptly, as if its process had been
// SIGKILLed: every client and peer connection to it is cut at once and its
// Raft loop stops where it is, without handing over leadership or draining
// client streams; the rest of the cluster learns of it only by no longer
// hearing from it. Its data stays for RestartMember. Killing a stopped
// member does nothing.
func (c *Cluster) KillMember(i int) {
	c.mu.Lock()
	m := c.members[i]
	e := m.etcd
	m.etcd = nil
	c.mu.Unlock()
	if e == nil {
		return
	}
	m.client.cut()
	m.peer.cut()
	e.Server.HardStop()
	// Only releases what is left: with the Raft loop stopped there is no
	// leadership to transfer, and with the connections cut no stream to
	// drain.
	e.Close()
}

// Leader waits until the running members agree on a leader among them
// and returns its index. It fails the test if they have not within etcd's
// election timeout many times over.
func (c *Cluster) Leader(t testing.TB) int {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		if i, ok := c.leader(); ok {
			return i
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcdtest: the running members have not agreed on a leader within %v", readyTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leader returns the index of the running member that every running
// member sees as the leader, if there is one.
func (c *Cluster) leader() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	lead, running := -1, 0
	for i, m := range c.members {
		if m.etcd == nil {
			continue
		}
		running++
		if m.etcd.Server.Leader() == m.etcd.Server.MemberID() {
			if lead >= 0 {
				return 0, false // two members of different terms both think so
			}
			lead = i
		}
	}
	if lead < 0 {
		return 0, false
	}
	id := c.members[lead].etcd.Server.MemberID()
	for _, m := range c.members {
		if m.etcd != nil && m.etcd.Server.Leader() != id {
			return 0, false
		}
	}
	return lead, running > 0
}

// RestartMember starts stopped member i again on the same addresses and
// data, and waits until it has rejoined the cluster. Without a quorum of
// running members it cannot become ready: restart enough members
// concurrently in that case.
func (c *Cluster) RestartMember(t testing.TB, i int) {
	t.Helper()
	if err := c.start(i); err != nil {
		t.Fatalf("etcdtest: restart member %d: %v", i, err)
	}
}

func (c *Cluster) stopAll() {
	for i := range c.members {
		c.StopMember(i)
	}
	for _, m := range c.members {
		for _, b := range []*bridge{m.client, m.peer} {
			if b != nil {
				b.close()
			}
		}
	}
}
