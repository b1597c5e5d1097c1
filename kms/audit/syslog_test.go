package audit

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coffre-kms/coffre/kms/audit/internal/rsyslogtest"
)

// storedSeq extracts seq from a stored RFC 5424 message.
func storedSeq(t testing.TB, line string) uint64 {
	t.Helper()
	_, rest, ok := strings.Cut(line, "["+SDID+` seq="`)
	if !ok {
		t.Fatalf("no seq in stored line %q", line)
	}
	n, _, _ := strings.Cut(rest, `"`)
	v, err := strconv.ParseUint(n, 10, 64)
	if err != nil {
		t.Fatalf("bad seq in %q", line)
	}
	return v
}

func storedSeqs(t testing.TB, lines []string) []uint64 {
	out := make([]uint64, len(lines))
	for i, l := range lines {
		out[i] = storedSeq(t, l)
	}
	return out
}

// distinct counts the distinct seqs below n.
func distinct(seqs []uint64, n uint64) int {
	seen := make(map[uint64]bool)
	for _, s := range seqs {
		if s < n {
			seen[s] = true
		}
	}
	return len(seen)
}

// checkExactlyOnce: 0..n-1, in order, each once.
func checkExactlyOnce(t testing.TB, seqs []uint64, n int) {
	t.Helper()
	if len(seqs) != n {
		t.Fatalf("stored %d messages, want %d", len(seqs), n)
	}
	for i, s := range seqs {
		if s != uint64(i) {
			t.Fatalf("message %d has seq %d", i, s)
		}
	}
}

// checkResumed: the stored stream is runs of consecutive seqs, each run
// starting no later than where the previous one ended (no gap), every seq
// 0..n-1 present. It returns the number of duplicates (resent entries).
func checkResumed(t testing.TB, seqs []uint64, n int, maxRuns int) (dups int) {
	t.Helper()
	if len(seqs) == 0 || seqs[0] != 0 {
		t.Fatalf("stream does not start at 0: %v", seqs[:min(len(seqs), 5)])
	}
	runs := 1
	var high uint64 // highest seq seen so far
	for i := 1; i < len(seqs); i++ {
		prev, s := seqs[i-1], seqs[i]
		if s == prev+1 {
			if s <= high {
				dups++
			}
			high = max(high, s)
			continue
		}
		runs++
		if s > high+1 {
			t.Fatalf("gap: seq %d follows %d (highest %d)", s, prev, high)
		}
		if s <= high {
			dups++
		}
		high = max(high, s)
	}
	if high != uint64(n-1) {
		t.Fatalf("highest seq %d, want %d", high, n-1)
	}
	if runs > maxRuns {
		t.Fatalf("%d resumptions, want at most %d", runs-1, maxRuns-1)
	}
	return dups
}

func newTestSyslogSink(t testing.TB, l *Log, r *rsyslogtest.Rsyslog, spoolDir string, cfg SyslogConfig) *SyslogSink {
	t.Helper()
	cfg.Addr = r.Addr()
	cfg.TLS = r.ClientTLS()
	cfg.SpoolDir = spoolDir
	cfg.Hostname = "node-1.coffre.test"
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff, cfg.MaxBackoff = 10*time.Millisecond, 200*time.Millisecond
	}
	s, err := NewSyslogSink(l, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSyslogDelivery(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"tcp", false}, {"tls", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n = 1000
			r := rsyslogtest.Start(t, rsyslogtest.Options{TLS: tc.tls})
			l := sinkLog(t)
			appendEntries(t, l, n)
			s := newTestSyslogSink(t, l, r, t.TempDir(), SyslogConfig{})
			stop := runSink(t, s.Run)
			sinkWait(t, 30*time.Second, "1000 messages", func() bool { return len(r.Lines()) >= n })
			sinkWait(t, 10*time.Second, "confirmation", func() bool { return s.Status().Cursor == n })
			if err := stop(); !errors.Is(err, context.Canceled) {
				t.Fatalf("Run = %v, want context.Canceled", err)
			}
			lines := r.Lines()
			checkExactlyOnce(t, storedSeqs(t, lines), n)
			recs, err := l.Read(context.Background(), 0, n)
			if err != nil {
				t.Fatal(err)
			}
			for i, line := range lines {
				if !strings.HasSuffix(line, "] "+string(recs[i].Raw)) {
					t.Fatalf("message %d does not end with the canonical entry: %q", i, line)
				}
			}
			if st := s.Status(); st.Connected || st.Cursor != n || st.Lag != 0 || st.Sent != n {
				t.Errorf("status after stop: %+v", st)
			}
		})
	}
}

// TestSyslogReceiverKilledMidStream kills rsyslogd (SIGKILL) twice while
// entries are appended and streamed, and restarts it. Configured as
// docs/siem tells (coffre-dedupe.rsyslog, seeded by coffre-last-seq), the
// receiver stores every sequence number once, in order: none missing, none
// twice. Without that configuration delivery is at-least-once: none
// missing, in order, and what is stored twice is at most SyncEvery entries
// per kill, each a resent run right after a reconnect.
func TestSyslogReceiverKilledMidStream(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tls    bool
		dedupe bool
	}{{"tcp", false, true}, {"tls", true, true}, {"tcp-at-least-once", false, false}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n, kills, syncEvery = 3000, 2, 100
			r := rsyslogtest.Start(t, rsyslogtest.Options{TLS: tc.tls, Dedupe: tc.dedupe})
			l := sinkLog(t)
			s := newTestSyslogSink(t, l, r, t.TempDir(), SyslogConfig{SyncEvery: syncEvery})
			stop := runSink(t, s.Run)

			// Entries keep being appended while the receiver dies.
			appended := make(chan struct{})
			go func() {
				defer close(appended)
				for i := 0; i < n; i += 10 {
					for j := i; j < i+10; j++ {
						if _, err := l.Append(context.Background(), sinkEntry(j)); err != nil {
							t.Errorf("Append: %v", err)
							return
						}
					}
					time.Sleep(time.Millisecond)
				}
			}()
			for k := 1; k <= kills; k++ {
				target := uint64(k * n / (kills + 1))
				sinkWait(t, 30*time.Second, "progress before kill", func() bool {
					return distinct(storedSeqs(t, r.Lines()), n) >= int(target)
				})
				r.Kill()
				time.Sleep(150 * time.Millisecond) // the sink fails and backs off
				if s.Status().Connected {
					t.Log("sink still thinks it is connected (ok: not yet written)")
				}
				r.Restart(t)
			}
			<-appended
			sinkWait(t, 60*time.Second, "every seq after restarts", func() bool {
				return distinct(storedSeqs(t, r.Lines()), n) == n
			})
			sinkWait(t, 10*time.Second, "confirmation", func() bool { return s.Status().Cursor == n })
			if err := stop(); !errors.Is(err, context.Canceled) {
				t.Fatalf("Run = %v", err)
			}
			seqs := storedSeqs(t, r.Lines())
			// Each kill may cost a few failed reconnects; all of them
			// resume at the confirmed cursor.
			if tc.dedupe {
				checkExactlyOnce(t, seqs, n)
				t.Logf("stored %d messages for %d entries after %d kills (reconnects %d); the sink wrote %d messages, resends included",
					len(seqs), n, kills, s.Status().Reconnects, s.Status().Messages)
				return
			}
			runs := 1 + int(s.Status().Reconnects)
			dups := checkResumed(t, seqs, n, runs)
			if dups > kills*syncEvery {
				t.Errorf("%d duplicates, more than %d kills × SyncEvery %d", dups, kills, syncEvery)
			}
			t.Logf("stored %d messages for %d entries: %d resent after %d kills (reconnects %d)",
				len(seqs), n, dups, kills, s.Status().Reconnects)
		})
	}
}

func TestSyslogSpoolSurvivesSinkRestart(t *testing.T) {
	t.Parallel()
	r := rsyslogtest.Start(t, rsyslogtest.Options{})
	l := sinkLog(t)
	spool := t.TempDir()
	appendEntries(t, l, 300)
	s1 := newTestSyslogSink(t, l, r, spool, SyslogConfig{})
	stop := runSink(t, s1.Run)
	sinkWait(t, 20*time.Second, "first 300", func() bool { return s1.Status().Cursor == 300 })
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	appendEntries(t, l, 200)
	s2 := newTestSyslogSink(t, l, r, spool, SyslogConfig{})
	if st := s2.Status(); st.Cursor != 300 || st.Lag != 200 {
		t.Fatalf("new sink status %+v, want cursor 300, lag 200", st)
	}
	stop = runSink(t, s2.Run)
	sinkWait(t, 20*time.Second, "all 500", func() bool { return s2.Status().Cursor == 500 })
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	checkExactlyOnce(t, storedSeqs(t, r.Lines()), 500)
}

// TestSyslogSinkDownNeverBlocksAppend: no receiver at all; appends go on,
// the lag grows, nothing is lost once a receiver appears.
func TestSyslogSinkDownNeverBlocksAppend(t *testing.T) {
	t.Parallel()
	r := rsyslogtest.Start(t, rsyslogtest.Options{})
	r.Kill()
	l := sinkLog(t)
	s := newTestSyslogSink(t, l, r, t.TempDir(), SyslogConfig{})
	stop := runSink(t, s.Run)
	start := time.Now()
	appendEntries(t, l, 200)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("appends took %v with the receiver down", d)
	}
	sinkWait(t, 5*time.Second, "a failed attempt", func() bool { return s.Status().Reconnects > 0 })
	if st := s.Status(); st.Connected || st.Lag != 200 || st.LastError == nil {
		t.Errorf("status with receiver down: %+v", st)
	}
	r.Restart(t)
	sinkWait(t, 20*time.Second, "delivery", func() bool { return s.Status().Cursor == 200 })
	_ = stop()
	checkExactlyOnce(t, storedSeqs(t, r.Lines()), 200)
}

func TestSyslogFrame(t *testing.T) {
	s, err := NewSyslogSink(sourceFunc{}, SyslogConfig{Addr: "127.0.0.1:1", SpoolDir: t.TempDir(), Hostname: "node 1", AppName: "coffre"})
	if err != nil {
		t.Fatal(err)
	}
	e := sinkEntry(3) // a deny
	e.Version, e.Index, e.Node = EntryVersion, 42, `n"1]`
	raw, err := e.MarshalCanonical()
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.appendFrame(nil, Record{Index: 42, Raw: raw, Entry: e})
	if err != nil {
		t.Fatal(err)
	}
	msg := `<109>1 2026-11-22T10:00:00.000003Z node1 coffre - audit [coffre@32473 seq="42" node="n\"1\]" op="key.generate_data_key" decision="deny"] ` + string(raw)
	want := strconv.Itoa(len(msg)) + " " + msg
	if string(got) != want {
		t.Fatalf("frame\n got %s\nwant %s", got, want)
	}
	// Allow → info; the Entry alone is enough.
	e.Decision, e.Reason = Allow, ""
	got, err = s.appendFrame(nil, Record{Index: 42, Entry: e})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(got), " <110>1 ") {
		t.Fatalf("allow frame %s", got)
	}
}

type sourceFunc struct{}

func (sourceFunc) Size() uint64                                        { return 0 }
func (sourceFunc) Read(context.Context, uint64, int) ([]Record, error) { return nil, nil }
func (sourceFunc) Wait(ctx context.Context, _ uint64) error {
	<-ctx.Done()
	return ctx.Err()
}

func TestSyslogConfigErrors(t *testing.T) {
	dir := t.TempDir()
	for _, cfg := range []SyslogConfig{
		{Addr: "nohostport", SpoolDir: dir},
		{Addr: "127.0.0.1:1", SpoolDir: dir, Facility: 24},
		{Addr: "127.0.0.1:1", SpoolDir: dir, MinBackoff: time.Second, MaxBackoff: time.Millisecond},
		{Addr: "127.0.0.1:1", SpoolDir: ""},
		{Addr: "127.0.0.1:1", SpoolDir: dir, SyncEvery: -1},
	} {
		if _, err := NewSyslogSink(sourceFunc{}, cfg); err == nil {
			t.Errorf("NewSyslogSink(%+v) accepted", cfg)
		}
	}
}

func TestSDParamValueEscaping(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"plain", "plain"},
		{`a"b`, `a\"b`},
		{`a\b`, `a\\b`},
		{`a]b`, `a\]b`},
		{`[x]`, `[x\]`},
		{`\"]`, `\\\"\]`},
		{"école ünïcode", "école ünïcode"},
		{"bad\xffutf8", "bad\uFFFDutf8"},
		{"=", "="},
	} {
		if got := string(AppendSDParamValue(nil, tc.in)); got != tc.want {
			t.Errorf("AppendSDParamValue(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// unescapeSDParamValue is the receiver's side of RFC 5424 §6.3.3.
func unescapeSDParamValue(s string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '"', ']':
			return "", false // must have been escaped
		case '\\':
			if i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\\' || s[i+1] == ']') {
				b.WriteByte(s[i+1])
				i++
				continue
			}
			return "", false
		}
		b.WriteByte(c)
	}
	return b.String(), true
}

func FuzzSDEscape(f *testing.F) {
	for _, s := range []string{"", `"`, `\`, `]`, `a\"]b`, "\xff", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out := string(AppendSDParamValue(nil, in))
		if !utf8.ValidString(out) {
			t.Fatalf("escaped %q is not UTF-8: %q", in, out)
		}
		back, ok := unescapeSDParamValue(out)
		if !ok {
			t.Fatalf("escaped %q = %q does not parse", in, out)
		}
		if utf8.ValidString(in) && back != in {
			t.Fatalf("round trip %q → %q → %q", in, out, back)
		}
	})
}

func TestHeaderField(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"", 10, "-"},
		{"host name", 10, "hostname"},
		{"ééé", 10, "-"},
		{"abcdefghijkl", 5, "abcde"},
	} {
		if got := headerField(tc.in, tc.max); got != tc.want {
			t.Errorf("headerField(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}
