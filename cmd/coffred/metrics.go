package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
)

// metrics is what coffred exposes in the Prometheus text format on
// metrics.listen: the condition of the audit log (without which nothing is
// released) and of its sinks. Everything here is a count or a state — never
// a key, a token or an entry.
type metrics struct {
	log    *audit.Log
	syslog *audit.SyslogSink
	jsonl  *audit.JSONLSink
}

func (m *metrics) write(w io.Writer) {
	healthy := 1
	if m.log.Healthy() != nil {
		healthy = 0
	}
	st := m.log.Stats()
	fmt.Fprintf(w, "# HELP coffre_audit_log_writable 1 when the audit log can be written; 0 means releases and admin calls are refused.\n# TYPE coffre_audit_log_writable gauge\ncoffre_audit_log_writable %d\n", healthy)
	fmt.Fprintf(w, "# HELP coffre_audit_entries Entries in the audit log.\n# TYPE coffre_audit_entries gauge\ncoffre_audit_entries %d\n", st.Entries)
	fmt.Fprintf(w, "# HELP coffre_audit_commits_total Group commits of the audit log.\n# TYPE coffre_audit_commits_total counter\ncoffre_audit_commits_total %d\n", st.Batches)
	fmt.Fprintf(w, "# HELP coffre_audit_fsyncs_total fsync calls on the audit log, failed ones included.\n# TYPE coffre_audit_fsyncs_total counter\ncoffre_audit_fsyncs_total %d\n", st.Fsyncs)
	fmt.Fprintf(w, "# HELP coffre_audit_commit_flush_seconds How long group commits of the audit log waited for their write and fdatasync.\n# TYPE coffre_audit_commit_flush_seconds histogram\n")
	var cum uint64
	for i, c := range st.Flush.Counts {
		cum += c
		le := "+Inf"
		if i < len(audit.FlushBuckets) {
			le = strconv.FormatFloat(audit.FlushBuckets[i].Seconds(), 'g', -1, 64)
		}
		fmt.Fprintf(w, "coffre_audit_commit_flush_seconds_bucket{le=%q} %d\n", le, cum)
	}
	fmt.Fprintf(w, "coffre_audit_commit_flush_seconds_sum %g\ncoffre_audit_commit_flush_seconds_count %d\n", st.Flush.Sum.Seconds(), cum)
	fmt.Fprintf(w, "# HELP coffre_audit_sink_lag Entries a sink has not yet delivered.\n# TYPE coffre_audit_sink_lag gauge\n")
	if m.syslog != nil {
		s := m.syslog.Status()
		fmt.Fprintf(w, "coffre_audit_sink_lag{sink=\"syslog\"} %d\n", s.Lag)
		connected := 0
		if s.Connected {
			connected = 1
		}
		fmt.Fprintf(w, "# HELP coffre_audit_syslog_connected 1 while the syslog receiver is connected.\n# TYPE coffre_audit_syslog_connected gauge\ncoffre_audit_syslog_connected %d\n", connected)
		fmt.Fprintf(w, "# HELP coffre_audit_syslog_reconnects_total Failed syslog sessions.\n# TYPE coffre_audit_syslog_reconnects_total counter\ncoffre_audit_syslog_reconnects_total %d\n", s.Reconnects)
		fmt.Fprintf(w, "# HELP coffre_audit_syslog_messages_total Messages written to the syslog receiver, resent ones included.\n# TYPE coffre_audit_syslog_messages_total counter\ncoffre_audit_syslog_messages_total %d\n", s.Messages)
	}
	if m.jsonl != nil {
		fmt.Fprintf(w, "coffre_audit_sink_lag{sink=\"jsonl\"} %d\n", m.jsonl.Status().Lag)
	}
}

// serveMetrics serves m on addr (plain HTTP, meant for a loopback or
// management address) until ctx ends.
func serveMetrics(ctx context.Context, addr string, m *metrics, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		m.write(w)
	})
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics.listen: %w", err)
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		MaxHeaderBytes:    8 << 10,
	}
	log.Info("metrics", "addr", "http://"+lis.Addr().String()+"/metrics")
	go func() { // #nosec G118 -- shuts the server down once ctx has ended; a fresh context bounds that
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	return nil
}
