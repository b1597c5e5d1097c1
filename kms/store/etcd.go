package store

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Defaults for [EtcdOptions].
const (
	defaultEtcdDialTimeout    = 5 * time.Second
	defaultEtcdRequestTimeout = 5 * time.Second
	defaultEtcdWatchBuffer    = 256
)

// EtcdOptions configures [OpenEtcd].
type EtcdOptions struct {
	// Endpoints are the client URLs of the etcd members, for example
	// "https://etcd-1.site-a:2379".
	Endpoints []string
	// TLS is the mutual-TLS configuration for talking to etcd; every
	// endpoint must then be https://. Nil means plaintext, which OpenEtcd
	// accepts only when every endpoint is on loopback (tests). See
	// [CheckEtcdEndpoint].
	TLS *tls.Config
	// Prefix is prepended to every store key, for example "/coffre/". It is
	// required and must end with "/", so that two deployments sharing one
	// cluster cannot see each other's keys.
	Prefix string
	// DialTimeout bounds connecting to the cluster (default 5s).
	DialTimeout time.Duration
	// RequestTimeout bounds every request whose context has no earlier
	// deadline (default 5s). Without quorum, etcd does not answer writes
	// or linearizable reads; this timeout turns that into an error.
	RequestTimeout time.Duration
}

// etcdClient is the seam to the vendor client: the few calls the engine
// makes, so that clientv3 appears in this file only.
type etcdClient interface {
	clientv3.KV
	clientv3.Watcher
	Close() error
}

// Etcd is the [Store] engine for several Coffre nodes: an etcd cluster
// (Raft, linearizable) holds the data under a key prefix.
//
// Revisions are etcd's ModRevision: positive and increasing, shared by
// every key of the cluster (also keys outside the prefix), so successive
// writes through one Etcd need not have consecutive revisions.
//
// # Availability
//
// When etcd cannot answer (members unreachable, no quorum) an operation
// fails once the request timeout or the caller's deadline passes, with an
// error that reads "store: etcd unavailable: …" and wraps either
// context.DeadlineExceeded or the etcd client's error. A write that fails
// this way may or may not have been applied; callers re-read before
// retrying, as they do after [ErrConflict]. An error that wraps
// context.Canceled or context.DeadlineExceeded of the caller's own context
// says only that the caller gave up.
type Etcd struct {
	cli        etcdClient
	prefix     string
	reqTimeout time.Duration
	watchBuf   int

	mu      sync.Mutex
	closed  bool
	stop    context.CancelFunc // cancels stopCtx, ending every watch
	stopCtx context.Context
	watches sync.WaitGroup
}

var _ Store = (*Etcd)(nil)

// OpenEtcd connects to the etcd cluster described by opts. It fails if no
// endpoint answers within the dial timeout (or before ctx ends).
func OpenEtcd(ctx context.Context, opts EtcdOptions) (*Etcd, error) {
	if len(opts.Endpoints) == 0 {
		return nil, errors.New("store: etcd: no endpoints")
	}
	for _, ep := range opts.Endpoints {
		if err := CheckEtcdEndpoint(ep, opts.TLS != nil); err != nil {
			return nil, fmt.Errorf("store: etcd: endpoint %q: %w", ep, err)
		}
	}
	if opts.Prefix == "" || !strings.HasSuffix(opts.Prefix, "/") {
		return nil, fmt.Errorf("store: etcd: prefix %q must be non-empty and end with \"/\"", opts.Prefix)
	}
	if err := CheckPrefix(opts.Prefix); err != nil {
		return nil, fmt.Errorf("store: etcd prefix: %w", err)
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = defaultEtcdDialTimeout
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = defaultEtcdRequestTimeout
	}
	logCfg := zap.NewProductionConfig()
	logCfg.Level = zap.NewAtomicLevelAt(zap.ErrorLevel)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   opts.Endpoints,
		TLS:         opts.TLS,
		DialTimeout: opts.DialTimeout,
		LogConfig:   &logCfg,
		// Keep the connection alive and notice dead members.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: opts.DialTimeout,
		MaxCallSendMsgSize:   2*MaxValueSize + 2*MaxKeySize,
	})
	if err != nil {
		return nil, fmt.Errorf("store: etcd unavailable: %w", err)
	}
	e := &Etcd{cli: cli, prefix: opts.Prefix, reqTimeout: opts.RequestTimeout, watchBuf: defaultEtcdWatchBuffer}
	e.stopCtx, e.stop = context.WithCancel(context.Background())

	// Probe one member so that a wrong endpoint or TLS setting fails here,
	// not at the first request. A serializable read needs no quorum.
	pctx, cancel := context.WithTimeout(ctx, opts.DialTimeout)
	defer cancel()
	if _, err := cli.Get(pctx, opts.Prefix, clientv3.WithSerializable(), clientv3.WithCountOnly()); err != nil {
		e.stop()
		_ = cli.Close()
		return nil, e.wrap(ctx, "open", err)
	}
	return e, nil
}

// CheckEtcdEndpoint reports whether [OpenEtcd] accepts the endpoint ep,
// given whether a TLS configuration goes with it. The error says what is
// wrong without naming ep, so that the caller says where ep came from.
//
// With TLS, every endpoint must be https:// (or etcd's unixs://, TLS over a
// Unix socket). The etcd client sends http:// and unix:// endpoints in
// clear whatever TLS it is given, and it picks the credentials of every
// connection from the first endpoint, so a single http:// endpoint would
// put all traffic in clear. A bare host:port is refused too: whether it
// gets TLS is the client's guess.
//
// Without TLS, only endpoints that stay on this host are accepted (tests):
// http:// or a bare host:port on 127.0.0.0/8, ::1 or localhost, and
// unix://. An https:// endpoint without TLS is refused: it needs the CA and
// the client certificate of mutual TLS.
func CheckEtcdEndpoint(ep string, withTLS bool) error {
	scheme := etcdScheme(ep)
	if withTLS {
		switch scheme {
		case "https":
			if u, err := url.Parse(ep); err != nil || u.Host == "" {
				return errors.New("not a URL of the form https://host:port")
			}
			return nil
		case "unixs":
			return nil
		case "http", "unix":
			return fmt.Errorf("%s:// is plaintext, and TLS is configured: write https://", scheme)
		case "":
			return errors.New("no scheme, and TLS is configured: write https://host:port")
		default:
			return fmt.Errorf("unknown scheme %q: write https://host:port", scheme)
		}
	}
	switch {
	case scheme == "https" || scheme == "unixs":
		return fmt.Errorf("%s:// needs TLS, and no TLS configuration was given (CA, client certificate and key)", scheme)
	case !isLoopbackEndpoint(ep):
		return errors.New("not on loopback, and no TLS configuration was given")
	}
	return nil
}

// etcdScheme returns the scheme of ep as the etcd client reads it: "unix"
// or "unixs" for anything that starts so, the URL scheme when ep has
// "://", and "" for a bare host:port.
func etcdScheme(ep string) string {
	for _, s := range []string{"unixs", "unix"} {
		if strings.HasPrefix(ep, s+":") {
			return s
		}
	}
	if i := strings.Index(ep, "://"); i >= 0 {
		return strings.ToLower(ep[:i]) // as url.Parse, which the client uses
	}
	return ""
}

// isLoopbackEndpoint reports whether ep ("http://127.0.0.1:2379",
// "[::1]:2379", "localhost:2379", "unix:///path") stays on this host, where
// plaintext is acceptable.
func isLoopbackEndpoint(ep string) bool {
	hostport := ep
	if i := strings.Index(ep, "://"); i >= 0 {
		u, err := url.Parse(ep)
		if err != nil {
			return false
		}
		switch u.Scheme {
		case "unix":
			return true
		case "http":
		default:
			return false
		}
		hostport = u.Host
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(strings.Trim(host, "[]"))
	return err == nil && ip.IsLoopback()
}

// begin checks that the store is open and derives the request context.
func (e *Etcd) begin(ctx context.Context) (context.Context, context.CancelFunc, error) {
	e.mu.Lock()
	closed := e.closed
	e.mu.Unlock()
	if closed {
		return nil, nil, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, fmt.Errorf("store: etcd: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, e.reqTimeout)
	return rctx, cancel, nil
}

// wrap turns a client error into the engine's error contract.
func (e *Etcd) wrap(ctx context.Context, op string, err error) error {
	e.mu.Lock()
	closed := e.closed
	e.mu.Unlock()
	switch {
	case closed:
		return fmt.Errorf("store: etcd %s: %w", op, ErrClosed)
	case ctx.Err() != nil:
		// The caller's own context ended; say so with its error.
		return fmt.Errorf("store: etcd %s: %w (%w)", op, ctx.Err(), err)
	}
	return fmt.Errorf("store: etcd unavailable: %s: %w", op, err)
}

func (e *Etcd) key(k string) string { return e.prefix + k }

func (e *Etcd) kv(k []byte, v []byte, rev int64) KV {
	val := bytes.Clone(v)
	if val == nil {
		val = []byte{}
	}
	return KV{Key: strings.TrimPrefix(string(k), e.prefix), Value: val, Revision: rev}
}

// Get returns the value under key, or [ErrNotFound]. The read is
// linearizable: it needs a quorum.
func (e *Etcd) Get(ctx context.Context, key string) (KV, error) {
	if err := CheckKey(key); err != nil {
		return KV{}, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return KV{}, err
	}
	defer cancel()
	resp, err := e.cli.Get(rctx, e.key(key))
	if err != nil {
		return KV{}, e.wrap(ctx, "get", err)
	}
	if len(resp.Kvs) == 0 {
		return KV{}, fmt.Errorf("%w: %q", ErrNotFound, key)
	}
	kv := resp.Kvs[0]
	return e.kv(kv.Key, kv.Value, kv.ModRevision), nil
}

// Put writes value under key unconditionally and returns its revision.
func (e *Etcd) Put(ctx context.Context, key string, value []byte) (int64, error) {
	if err := CheckKey(key); err != nil {
		return 0, err
	}
	if err := CheckValue(value); err != nil {
		return 0, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer cancel()
	resp, err := e.cli.Put(rctx, e.key(key), string(value))
	if err != nil {
		return 0, e.wrap(ctx, "put", err)
	}
	return resp.Header.Revision, nil
}

// CompareAndSwap writes value under key only if the key's ModRevision is
// rev (rev 0: only if the key does not exist), in one etcd transaction.
func (e *Etcd) CompareAndSwap(ctx context.Context, key string, rev int64, value []byte) (int64, error) {
	if err := CheckKey(key); err != nil {
		return 0, err
	}
	if err := CheckValue(value); err != nil {
		return 0, err
	}
	if err := CheckRevision(rev); err != nil {
		return 0, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer cancel()
	k := e.key(key)
	cmp := clientv3.Compare(clientv3.ModRevision(k), "=", rev)
	if rev == 0 {
		cmp = clientv3.Compare(clientv3.CreateRevision(k), "=", 0)
	}
	resp, err := e.cli.Txn(rctx).If(cmp).Then(clientv3.OpPut(k, string(value))).Commit()
	if err != nil {
		return 0, e.wrap(ctx, "compare-and-swap", err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%w: %q is not at revision %d", ErrConflict, key, rev)
	}
	return resp.Header.Revision, nil
}

// Delete removes key only if its ModRevision is rev (rev 0: any revision).
func (e *Etcd) Delete(ctx context.Context, key string, rev int64) error {
	if err := CheckKey(key); err != nil {
		return err
	}
	if err := CheckRevision(rev); err != nil {
		return err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	k := e.key(key)
	if rev == 0 {
		resp, err := e.cli.Delete(rctx, k)
		if err != nil {
			return e.wrap(ctx, "delete", err)
		}
		if resp.Deleted == 0 {
			return fmt.Errorf("%w: %q", ErrNotFound, key)
		}
		return nil
	}
	resp, err := e.cli.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
		Then(clientv3.OpDelete(k)).
		Else(clientv3.OpGet(k, clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		return e.wrap(ctx, "delete", err)
	}
	if resp.Succeeded {
		return nil
	}
	// Failed: the key is missing or at another revision.
	if len(resp.Responses) == 1 {
		if r := resp.Responses[0].GetResponseRange(); r != nil && r.Count == 0 {
			return fmt.Errorf("%w: %q", ErrNotFound, key)
		}
	}
	return fmt.Errorf("%w: %q is not at revision %d", ErrConflict, key, rev)
}

// List returns every value whose key starts with prefix, in key order,
// from one linearizable etcd range read.
func (e *Etcd) List(ctx context.Context, prefix string) ([]KV, error) {
	if err := CheckPrefix(prefix); err != nil {
		return nil, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	resp, err := e.cli.Get(rctx, e.key(prefix), clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, e.wrap(ctx, "list", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	out := make([]KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, e.kv(kv.Key, kv.Value, kv.ModRevision))
	}
	return out, nil
}

// Last implements LastKeyer: one range read, sorted descending, limit 1.
func (e *Etcd) Last(ctx context.Context, prefix string) (KV, error) {
	if err := CheckPrefix(prefix); err != nil {
		return KV{}, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return KV{}, err
	}
	defer cancel()
	resp, err := e.cli.Get(rctx, e.key(prefix), clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(1))
	if err != nil {
		return KV{}, e.wrap(ctx, "last", err)
	}
	if len(resp.Kvs) == 0 {
		return KV{}, ErrNotFound
	}
	kv := resp.Kvs[0]
	return e.kv(kv.Key, kv.Value, kv.ModRevision), nil
}

// Watch reports changes under prefix made after it returns, in revision
// order, until ctx ends; the channel is then closed.
//
// Watch first reads the cluster's current revision (a linearizable read,
// so it fails without quorum) and watches from the next one. The channel
// is also closed, with ctx still live, when the watcher falls more than
// 256 events behind, when etcd cancels the watch (the revision was
// compacted, or the member lost its leader), or when the store is closed.
// The caller has then missed events: it must List and Watch again.
//
// A watch survives the restart of the member it is connected to while the
// cluster keeps its quorum: the client reconnects and resumes at the next
// revision, so no event is lost or repeated. When the quorum is lost, the
// watch closes (the connected member has no leader).
func (e *Etcd) Watch(ctx context.Context, prefix string) (<-chan Event, error) {
	if err := CheckPrefix(prefix); err != nil {
		return nil, err
	}
	rctx, cancel, err := e.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	p := e.key(prefix)
	resp, err := e.cli.Get(rctx, p, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return nil, e.wrap(ctx, "watch", err)
	}
	start := resp.Header.Revision + 1

	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, ErrClosed
	}
	e.watches.Add(1) // under mu, so that Close waits for this watch
	e.mu.Unlock()
	wctx, wcancel := context.WithCancel(ctx)
	stopAfter := context.AfterFunc(e.stopCtx, wcancel)
	// WithRequireLeader: a member cut off from the quorum cancels the
	// watch instead of going silent.
	wch := e.cli.Watch(clientv3.WithRequireLeader(wctx), p, clientv3.WithPrefix(), clientv3.WithRev(start))
	out := make(chan Event, e.watchBuf)
	go func() {
		defer e.watches.Done()
		defer close(out)
		defer stopAfter()
		defer wcancel()
		for wr := range wch {
			if wr.Canceled || wr.Err() != nil {
				return
			}
			for _, ev := range wr.Events {
				var out1 Event
				switch ev.Type {
				case clientv3.EventTypePut:
					out1 = Event{Type: EventPut, KV: e.kv(ev.Kv.Key, ev.Kv.Value, ev.Kv.ModRevision)}
				case clientv3.EventTypeDelete:
					out1 = Event{Type: EventDelete, KV: KV{
						Key:      strings.TrimPrefix(string(ev.Kv.Key), e.prefix),
						Revision: ev.Kv.ModRevision,
					}}
				default:
					continue
				}
				select {
				case out <- out1:
				case <-wctx.Done():
					return
				default:
					// Too far behind: close rather than hold up anything.
					return
				}
			}
		}
	}()
	return out, nil
}

// Close ends every watch and closes the connection to etcd; later calls
// return [ErrClosed].
func (e *Etcd) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	e.closed = true
	e.mu.Unlock()
	e.stop()
	e.watches.Wait()
	if err := e.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("store: etcd close: %w", err)
	}
	return nil
}
