package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/audit/audittest"
)

// TestMetrics serves the metrics of a real audit log over HTTP and reads
// them back as a Prometheus scraper would.
func TestMetrics(t *testing.T) {
	l := audittest.NewLog(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for range 3 {
		if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "t"}, Operation: "test.op", Decision: audit.Allow}); err != nil {
			t.Fatal(err)
		}
	}
	var logs bytes.Buffer
	lg := newLogger(&logs, 0)
	if err := serveMetrics(ctx, "127.0.0.1:0", &metrics{log: l}, lg); err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(strings.Split(strings.Split(logs.String(), "addr=")[1], "\n")[0], "http://")
	resp, err := http.Get("http://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"coffre_audit_log_writable 1\n", "coffre_audit_entries 3\n", "# TYPE coffre_audit_fsyncs_total counter\n",
		"# TYPE coffre_audit_commit_flush_seconds histogram\n", "coffre_audit_commit_flush_seconds_bucket{le=\"5e-05\"} ",
		"coffre_audit_commit_flush_seconds_bucket{le=\"+Inf\"} 3\n", "coffre_audit_commit_flush_seconds_count 3\n"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	if resp, err := http.Post("http://"+addr, "text/plain", nil); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST /metrics: %s", resp.Status)
		}
	}
}
