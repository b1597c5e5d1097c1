// Package etcdtest runs real etcd clusters, embedded in the test process,
// for tests of the etcd store engine and of the services above it.
//
// Members listen on 127.0.0.1 only, in plaintext unless Options.TLS asks
// for mutual TLS to clients, with their data in t.TempDir(). The Raft timeouts are short (50ms heartbeat, 500ms
// election) so that a cluster starts, and elects a new leader, in well
// under a second. Members run with fsync off unless Options.Fsync says
// otherwise: the tests stop members gracefully and are about quorum, not
// disk durability; benchmarks that compare with a store that does fsync
// turn it on.
package etcdtest

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
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
	pki     *testPKI // nil without Options.TLS
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
	clientURL  url.URL
	peerURL    url.URL
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
		pki, err := newTestPKI(filepath.Join(base, "pki"))
		if err != nil {
			t.Fatalf("etcdtest: %v", err)
		}
		c.pki, clientScheme = pki, "https"
	}
	var initial []string
	for i := range members {
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			dir:       filepath.Join(base, fmt.Sprintf("m%d", i)),
			clientURL: url.URL{Scheme: clientScheme, Host: freeAddr(t)},
			peerURL:   url.URL{Scheme: "http", Host: freeAddr(t)},
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	c.initial = strings.Join(initial, ",")
	t.Cleanup(c.stopAll)

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

// freeAddr returns a 127.0.0.1 address with a port that was free a moment
// ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	return addr
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
	cfg.ListenClientUrls = []url.URL{m.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.ListenPeerUrls = []url.URL{m.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
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
		cfg.ClientTLSInfo.CertFile = c.pki.serverCert
		cfg.ClientTLSInfo.KeyFile = c.pki.serverKey
		cfg.ClientTLSInfo.TrustedCAFile = c.pki.ca
		cfg.ClientTLSInfo.ClientCertAuth = true
	}
	m.everLaunch = true
	c.mu.Unlock()

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("etcd failed: %w", err)
	case <-time.After(readyTimeout):
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
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: c.pki.pool, Certificates: []tls.Certificate{c.pki.client}}
}

// TLSFiles returns the PEM files of a cluster started with Options.TLS:
// the CA certificate, and a client certificate and its key (mode 0600).
// They are empty for a plaintext cluster.
func (c *Cluster) TLSFiles() (caFile, certFile, keyFile string) {
	if c.pki == nil {
		return "", "", ""
	}
	return c.pki.ca, c.pki.clientCert, c.pki.clientKey
}

// Endpoint returns the client URL of member i.
func (c *Cluster) Endpoint(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].clientURL.String()
}

// StopMember stops member i gracefully; its data stays for RestartMember.
// Stopping a stopped member does nothing. Like etcd itself, it waits for
// open client streams (watches) to end, for up to etcd's request timeout
// (about 6s with these Raft settings), before cutting them.
func (c *Cluster) StopMember(i int) {
	c.mu.Lock()
	e := c.members[i].etcd
	c.members[i].etcd = nil
	c.mu.Unlock()
	if e != nil {
		e.Close()
	}
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
}
