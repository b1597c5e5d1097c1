package audit

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Syslog sink
//
// [SyslogSink] streams the log to a syslog receiver as RFC 5424 messages,
// framed by octet counting (RFC 6587 §3.4.1) over plain TCP, or over mutual
// TLS as RFC 5425 specifies. Each message carries the entry's index as
// seq in the coffre@32473 structured-data element, and the canonical entry
// JSON as MSG.
//
// # Delivery guarantee
//
// Syslog over TCP or TLS has no application acknowledgement: a successful
// write only means the bytes reached a kernel buffer, and a receiver that
// dies loses whatever it had read but not yet stored. The sink therefore
// confirms delivery by a graceful close: it half-closes the connection
// (FIN, or TLS close_notify) and waits for the receiver to close its side,
// which a receiver such as rsyslog does only after it has read, and
// processed, everything sent before. Only then is the cursor in the spool
// advanced. This happens every SyncEvery entries, when the log has been
// quiet for SyncIdle, and when Run stops; the sink then reconnects at once.
//
// After any failure (refused connection, reset, timeout, receiver closing
// on its own) the sink reconnects with exponential backoff and jitter and
// resends from the spool cursor. Delivery is thus at-least-once: no entry
// is skipped, entries arrive in index order on each connection, and the
// entries a receiver may see twice are only those sent after the last
// confirmation and before a failure — at most SyncEvery of them, all right
// after a reconnect. A graceful stop of the sink never causes a resend.
//
// Only the receiver knows what it has stored, so only the receiver can
// store each entry once: it drops a message whose seq (the entry's index
// in this node's log, gap-free per node) is not above the last it stored.
// docs/siem ships that rule for rsyslog (coffre-dedupe.rsyslog, seeded at
// each start by coffre-last-seq), and the tests run a real rsyslogd with
// it through SIGKILLs: every seq stored once, in order.
//
// The receiver must store what it has processed before it closes the
// connection: for rsyslog, a Direct (or disk-assisted) queue on the
// ruleset that writes the messages; with an in-memory queue, a killed
// rsyslogd loses messages that no sender can know about.
//
// A sink reads the log and never writes it: a receiver that is down never
// blocks an append and never loses an entry, it only grows the lag.

// SDID is the structured-data element carrying the Coffre fields. 32473 is
// the private enterprise number that RFC 5612 reserves for documentation.
const SDID = "coffre@32473"

// FacilityLogAudit is the syslog facility "log audit" (13), the default.
const FacilityLogAudit = 13

// Syslog severities used by the sink.
const (
	severityNotice = 5 // deny
	severityInfo   = 6 // allow
)

// SyslogConfig configures a [SyslogSink].
type SyslogConfig struct {
	// Addr is the receiver's host:port.
	Addr string
	// TLS, if not nil, selects RFC 5425 (syslog over TLS); it should hold
	// the client certificate and the CA that issued the receiver's. nil
	// selects plain TCP.
	TLS *tls.Config
	// SpoolDir holds the sink's cursor file (usually the audit dir).
	SpoolDir string
	// Name names the cursor file: SpoolDir/Name.spool. Default "syslog".
	// Two sinks on one SpoolDir need different names.
	Name string
	// Hostname and AppName fill the RFC 5424 header. Defaults: the
	// machine's host name and "coffre".
	Hostname, AppName string
	// Facility is the syslog facility, 1..23; 0 selects FacilityLogAudit.
	Facility int
	// MinBackoff and MaxBackoff bound the reconnect delay. Defaults 100ms
	// and 30s.
	MinBackoff, MaxBackoff time.Duration
	// SyncEvery is how many entries may be sent before the sink confirms
	// delivery (see "Delivery guarantee"); it bounds what a receiver crash
	// can make the sink resend. Default 512.
	SyncEvery int
	// SyncIdle is how long the log must be quiet before unconfirmed
	// entries are confirmed. Default 200ms.
	SyncIdle time.Duration
	// Timeout bounds dialing, each write and each confirmation. Default 10s.
	Timeout time.Duration
}

// SyslogStatus is a snapshot of a sink for health checks and metrics.
type SyslogStatus struct {
	Connected  bool   // a connection to the receiver is open
	Cursor     uint64 // next entry whose delivery is not yet confirmed (persisted)
	Sent       uint64 // next entry not yet written on the current connection
	Lag        uint64 // entries in the log not yet confirmed: Size() - Cursor
	Reconnects uint64 // failed sessions so far
	Messages   uint64 // messages written so far, resent ones included
	LastError  error  // the last session failure, nil if none yet
}

// SyslogSink delivers the log to a syslog receiver. See "Delivery
// guarantee" above.
type SyslogSink struct {
	src   Source
	cfg   SyslogConfig
	spool *Spool
	host  string
	app   string
	fac   int

	runner     sinkRunner
	connected  atomic.Bool
	sent       atomic.Uint64
	reconnects atomic.Uint64
	messages   atomic.Uint64
}

// Sentinel errors of a syslog session.
var (
	// ErrPeerClosed reports that the receiver closed the connection while
	// entries were unconfirmed (they are resent).
	ErrPeerClosed = errors.New("audit: syslog receiver closed the connection")
	// ErrSinkRunning is returned by Run when the sink is already running.
	ErrSinkRunning = errors.New("audit: sink already running")
)

const syslogBatch = 256

// NewSyslogSink validates cfg and opens the sink's spool.
func NewSyslogSink(src Source, cfg SyslogConfig) (*SyslogSink, error) {
	if src == nil {
		return nil, errors.New("audit: syslog: nil source")
	}
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("audit: syslog: Addr %q: %w", cfg.Addr, err)
	}
	if cfg.Facility < 0 || cfg.Facility > 23 {
		return nil, fmt.Errorf("audit: syslog: Facility %d: want 0..23", cfg.Facility)
	}
	if cfg.MinBackoff < 0 || cfg.MaxBackoff < 0 || cfg.SyncEvery < 0 || cfg.SyncIdle < 0 || cfg.Timeout < 0 {
		return nil, errors.New("audit: syslog: negative duration or count")
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		return nil, fmt.Errorf("audit: syslog: MaxBackoff %v below MinBackoff %v", cfg.MaxBackoff, cfg.MinBackoff)
	}
	if cfg.SyncEvery == 0 {
		cfg.SyncEvery = 512
	}
	if cfg.SyncIdle == 0 {
		cfg.SyncIdle = 200 * time.Millisecond
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Name == "" {
		cfg.Name = "syslog"
	}
	if cfg.TLS != nil {
		c := cfg.TLS.Clone()
		if c.MinVersion < tls.VersionTLS12 {
			c.MinVersion = tls.VersionTLS12
		}
		if c.ServerName == "" {
			host, _, _ := net.SplitHostPort(cfg.Addr)
			c.ServerName = host
		}
		cfg.TLS = c
	}
	sp, err := OpenSpool(cfg.SpoolDir, cfg.Name)
	if err != nil {
		return nil, err
	}
	s := &SyslogSink{src: src, cfg: cfg, spool: sp, fac: cfg.Facility}
	if s.fac == 0 {
		s.fac = FacilityLogAudit
	}
	s.host = cfg.Hostname
	if s.host == "" {
		s.host, _ = os.Hostname()
	}
	s.host = headerField(s.host, 255)
	s.app = cfg.AppName
	if s.app == "" {
		s.app = "coffre"
	}
	s.app = headerField(s.app, 48)
	s.sent.Store(sp.Next())
	return s, nil
}

// Status returns a snapshot of the sink.
func (s *SyslogSink) Status() SyslogStatus {
	cur := s.spool.Next()
	st := SyslogStatus{
		Connected:  s.connected.Load(),
		Cursor:     cur,
		Sent:       s.sent.Load(),
		Reconnects: s.reconnects.Load(),
		Messages:   s.messages.Load(),
	}
	if size := s.src.Size(); size > cur {
		st.Lag = size - cur
	}
	st.LastError = s.runner.lastError()
	return st
}

// Run delivers entries from the spool cursor onward until ctx ends,
// reconnecting after failures. It returns ctx.Err() when ctx ends (after a
// last confirmation, so a restarted sink resends nothing), or an error
// that retrying cannot fix (the source serving a bad record, the spool
// unwritable).
func (s *SyslogSink) Run(ctx context.Context) error {
	// A session that returns nil was confirmed and closed on purpose:
	// the runner reconnects at once.
	return s.runner.run(ctx, s.spool, backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}, s.session,
		func() { s.reconnects.Add(1) })
}

// permanentError is a failure that reconnecting cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func (s *SyslogSink) dial(ctx context.Context) (net.Conn, error) {
	d := &net.Dialer{Timeout: s.cfg.Timeout, KeepAlive: 30 * time.Second}
	if s.cfg.TLS == nil {
		return d.DialContext(ctx, "tcp", s.cfg.Addr)
	}
	td := &tls.Dialer{NetDialer: d, Config: s.cfg.TLS}
	return td.DialContext(ctx, "tcp", s.cfg.Addr)
}

// session runs one connection. It returns nil after a confirmed,
// deliberate close.
func (s *SyslogSink) session(ctx context.Context) error {
	conn, err := s.dial(ctx)
	if err != nil {
		return fmt.Errorf("audit: syslog dial: %w", err)
	}
	defer func() { _ = conn.Close() }()

	// The only reader: receivers send nothing, so any return is the peer
	// closing (EOF) or the connection failing.
	peerDone := make(chan struct{})
	var peerErr error
	go func() {
		_, peerErr = io.Copy(io.Discard, conn)
		close(peerDone)
	}()

	s.connected.Store(true)
	defer s.connected.Store(false)

	next := s.spool.Next()
	s.sent.Store(next)
	unconfirmed := 0
	bw := bufio.NewWriterSize(conn, 64<<10)
	var frame []byte

	confirm := func() error {
		if err := s.confirm(conn, bw, peerDone, &peerErr); err != nil {
			return err
		}
		if err := s.spool.Commit(next, 0); err != nil {
			return &permanentError{err}
		}
		return nil
	}

	for {
		select {
		case <-peerDone:
			if unconfirmed == 0 && peerErr == nil {
				return fmt.Errorf("%w (idle)", ErrPeerClosed)
			}
			if peerErr != nil {
				return fmt.Errorf("audit: syslog: %w", peerErr)
			}
			return ErrPeerClosed
		default:
		}
		if ctx.Err() != nil {
			if unconfirmed > 0 {
				return confirm()
			}
			return nil
		}
		if unconfirmed >= s.cfg.SyncEvery {
			return confirm()
		}
		if next >= s.src.Size() {
			if unconfirmed > 0 {
				grew, err := s.waitFor(ctx, next, s.cfg.SyncIdle, peerDone)
				if err != nil {
					return err
				}
				if grew {
					continue
				}
				if ctx.Err() != nil {
					continue // confirmed at the top of the loop
				}
				select {
				case <-peerDone:
					continue
				default:
				}
				return confirm()
			}
			if _, err := s.waitFor(ctx, next, 0, peerDone); err != nil {
				return err
			}
			continue
		}
		recs, err := s.src.Read(ctx, next, min(syslogBatch, s.cfg.SyncEvery-unconfirmed))
		if err != nil {
			if ctx.Err() != nil {
				continue
			}
			return fmt.Errorf("audit: syslog: reading the log: %w", err)
		}
		for _, r := range recs {
			if r.Index != next {
				return &permanentError{fmt.Errorf("audit: syslog: log returned index %d, want %d", r.Index, next)}
			}
			frame, err = s.appendFrame(frame[:0], r)
			if err != nil {
				return &permanentError{err}
			}
			if _, err := bw.Write(frame); err != nil {
				return fmt.Errorf("audit: syslog write: %w", err)
			}
			next++
		}
		if err := conn.SetWriteDeadline(time.Now().Add(s.cfg.Timeout)); err != nil {
			return fmt.Errorf("audit: syslog: %w", err)
		}
		if err := bw.Flush(); err != nil {
			return fmt.Errorf("audit: syslog write: %w", err)
		}
		unconfirmed += len(recs)
		s.sent.Store(next)
		s.messages.Add(uint64(len(recs)))
	}
}

// waitFor waits until the log grows past size, for at most d (0: no
// limit), ctx ends, or the peer goes away. It reports whether the log
// grew, and an error only if the log itself failed (closed).
func (s *SyslogSink) waitFor(ctx context.Context, size uint64, d time.Duration, peerDone <-chan struct{}) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	if d > 0 {
		wctx, cancel = context.WithTimeout(ctx, d)
	}
	defer cancel()
	go func() {
		select {
		case <-peerDone:
			cancel()
		case <-wctx.Done():
		}
	}()
	err := s.src.Wait(wctx, size)
	if err != nil && wctx.Err() == nil {
		if errors.Is(err, ErrClosed) {
			return false, &permanentError{err}
		}
		return false, fmt.Errorf("audit: syslog: waiting for the log: %w", err)
	}
	return err == nil && s.src.Size() > size, nil
}

// confirm flushes, half-closes and waits for the receiver to close its
// side: the receiver has then read everything sent.
func (s *SyslogSink) confirm(conn net.Conn, bw *bufio.Writer, peerDone <-chan struct{}, peerErr *error) error {
	if err := conn.SetWriteDeadline(time.Now().Add(s.cfg.Timeout)); err != nil {
		return fmt.Errorf("audit: syslog: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("audit: syslog write: %w", err)
	}
	var err error
	switch c := conn.(type) {
	case *tls.Conn:
		err = c.CloseWrite()
	case *net.TCPConn:
		err = c.CloseWrite()
	default:
		err = fmt.Errorf("audit: syslog: cannot half-close a %T", conn)
	}
	if err != nil {
		return fmt.Errorf("audit: syslog close: %w", err)
	}
	t := time.NewTimer(s.cfg.Timeout)
	defer t.Stop()
	select {
	case <-peerDone:
		if *peerErr != nil {
			return fmt.Errorf("audit: syslog: unconfirmed: %w", *peerErr)
		}
		return nil
	case <-t.C:
		return errors.New("audit: syslog: receiver did not confirm in time")
	}
}

// appendFrame appends the octet-counted RFC 5424 message for r.
func (s *SyslogSink) appendFrame(dst []byte, r Record) ([]byte, error) {
	e, raw, err := recordEntry(r)
	if err != nil {
		return nil, err
	}
	sev := severityInfo
	if e.Decision == Deny {
		sev = severityNotice
	}
	var m []byte
	m = append(m, '<')
	m = strconv.AppendInt(m, int64(s.fac*8+sev), 10)
	m = append(m, ">1 "...)
	m = e.Time.UTC().AppendFormat(m, "2006-01-02T15:04:05.000000Z07:00")
	m = append(m, ' ')
	m = append(m, s.host...)
	m = append(m, ' ')
	m = append(m, s.app...)
	m = append(m, " - audit ["...)
	m = append(m, SDID...)
	m = append(m, ` seq="`...)
	m = strconv.AppendUint(m, r.Index, 10)
	m = append(m, `" node="`...)
	m = AppendSDParamValue(m, e.Node)
	m = append(m, `" op="`...)
	m = AppendSDParamValue(m, e.Operation)
	m = append(m, `" decision="`...)
	m = AppendSDParamValue(m, e.Decision)
	m = append(m, `"] `...)
	m = append(m, raw...)
	dst = strconv.AppendInt(dst, int64(len(m)), 10)
	dst = append(dst, ' ')
	return append(dst, m...), nil
}

// AppendSDParamValue appends v escaped as an RFC 5424 PARAM-VALUE: '"',
// '\' and ']' are preceded by a backslash, invalid UTF-8 becomes U+FFFD.
func AppendSDParamValue(dst []byte, v string) []byte {
	for _, r := range v {
		switch r {
		case '"', '\\', ']':
			dst = append(dst, '\\', byte(r))
		default:
			dst = utf8.AppendRune(dst, r) // utf8.RuneError for bad bytes
		}
	}
	return dst
}

// headerField makes s a valid RFC 5424 header field: PRINTUSASCII, at
// most max bytes, "-" when empty.
func headerField(s string, max int) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s) && len(b) < max; i++ {
		if c := s[i]; c >= 33 && c <= 126 {
			b = append(b, c)
		}
	}
	if len(b) == 0 {
		return "-"
	}
	return string(b)
}
