package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
)

// Limits on what the configuration may name. They exist so that a typo
// ("max_message_bytes": 1) or a path to a device (/dev/zero) gives an error
// instead of a server that fails at the first call or a hang.
const (
	maxConfigBytes = 1 << 20
	maxPEMBytes    = 1 << 20

	defaultListen = "127.0.0.1:8443"
)

// Config is a validated configuration: every field has been checked, every
// default applied, and the TLS material loaded. It is read from a JSON file
// (see [loadConfig]) whose format follows.
//
// The file is one JSON object; coffred.example.json beside this file is a
// complete example. Parsing is strict: an unknown or misspelt field, a field given
// twice, a null, a value of the wrong type or anything after the object is
// an error, because a setting that is silently ignored is a setting the
// operator believes in and does not have. Every error names the field path
// (for example "limits.max_message_bytes") and says what is wrong, and all
// errors are reported at once.
//
// Relative file paths are resolved against the directory of the
// configuration file, not the working directory, so the file means the same
// thing whoever starts coffred from wherever. Durations are strings in Go
// syntax: "30s", "5m", "1h30m".
//
// coffred reads no environment variable for its configuration: nothing can
// override the file behind the operator's back. (The PKCS#11 module may read
// its own, such as SOFTHSM2_CONF; that is the module's configuration.)
//
// Fields (required unless a default is given):
//
//	listen                       host:port to serve gRPC on; port 0 picks a free port
//	tls.cert_file                server certificate chain (PEM), leaf first
//	tls.key_file                 its private key (PEM); must not be readable by every user
//	tls.admin_client_ca_file     CA certificates (PEM) that issue admin client certificates
//	tls.auditor_client_ca_file   CA certificates (PEM) that issue auditor client certificates
//	                             (AuditService); optional: without it AuditService is closed
//	hsm.root_key                 the root key, an RFC 7512 pkcs11: URI with module-path and
//	                             pin-source=file:/abs/path (a pin-value is refused)
//	hsm.sessions                 PKCS#11 sessions in the pool, 1..64 (default 4)
//	hsm.second_root              optional: a root key in a second vendor's HSM (a pkcs11: URI like
//	                             hsm.root_key); new KEKs are then wrapped by both, and unwrapping needs both
//	hsm.previous_roots           optional: pkcs11: URIs of earlier root keys, which only unwrap KEK versions
//	                             not yet moved to the current root by a root rotation
//	hsm.previous_dual_roots      optional: earlier dual roots, each {"root_key": URI, "second_root": URI},
//	                             kept unwrap-only like hsm.previous_roots (rotating away from a dual root)
//	hsm.root_aliases             optional: other IDs of the current root ("pkcs11:token=…;object=…", no
//	                             query): the same key restored under other labels (a DR site), so KEK
//	                             versions recorded under the primary's root ID unwrap here
//	store.engine                 "bbolt" (one node, one file) or "etcd" (several Coffre nodes); a field
//	                             below that is not for the chosen engine is an error
//	store.path                   bbolt: the file; its directory must exist
//	store.endpoints              etcd: the members' client URLs, https://host:port with the TLS files below;
//	                             without them only plaintext loopback ones (http://127.0.0.1:2379, unix://…)
//	store.prefix                 etcd: key prefix of this Coffre deployment (default "/coffre/")
//	store.ca_file, .cert_file, .key_file
//	                             etcd: mutual TLS 1.3 (all three); the key must not be readable by group or others
//	kek_cache.size               unwrapped KEK versions held in memory, 1..1000000 (default 1024)
//	kek_cache.ttl                how long one stays, 1s..24h (default "10m")
//	limits.max_message_bytes     largest request or response, 4096..67108864 (default 1048576)
//	limits.max_call_timeout      cap on every call's deadline, 1s..1h (default "30s")
//	limits.max_concurrent_streams  concurrent calls per connection, 1..10000 (default 100)
//	limits.handshake_timeout     time allowed for a TLS handshake, 1s..5m (default "10s")
//	limits.shutdown_grace        time calls in flight get on shutdown, 0s..10m (default "10s")
//	keepalive.min_ping_interval  clients pinging more often are disconnected, 1s..24h (default "30s")
//	keepalive.ping_interval      the server pings an idle connection after, 10s..24h (default "5m")
//	keepalive.ping_timeout       and closes it if no answer within, 1s..10m (default "20s")
//	keepalive.max_connection_idle  close connections idle for, 1s..24h (default "15m")
//	keepalive.max_connection_age   close connections older than, "0s" (never) or 1s..720h (default "0s");
//	                             calls still running then get limits.shutdown_grace
//	attestation.session_ttl      how long a session lasts after attestation, 1m..24h (default "10m")
//	attestation.challenge_ttl    how long a challenge waits for its evidence, 5s..10m (default "1m")
//	attestation.max_sessions     sessions held in memory, 1..1000000 (default 10000)
//	attestation.max_challenges   challenges outstanding, 1..1000000 (default 10000)
//	attestation.challenges_per_ek_per_minute  challenge rate per TPM and caller address, 1..6000 (default 30)
//	audit.dir                    the audit log's directory (created if missing; its parent must exist)
//	audit.signer_key_file        the checkpoint signer's private key (Ed25519 + ML-DSA-65), mode 0600
//	audit.node_id                this node's id in every entry (default: the host name)
//	audit.origin                 the checkpoints' origin line (default "coffre/" + node_id)
//	audit.checkpoint_interval    publish a checkpoint at least this often when the log grew, 100ms..1h (default "1s")
//	audit.checkpoint_every       and every this many entries, 1..10000000 (default 10000)
//	audit.witnesses              public key files (FILE.pub of coffrectl audit keygen) of the witnesses whose
//	                             cosignatures the log stores, at most 16; without any, cosignatures are refused
//	audit.syslog.addr            forward every entry to this syslog receiver (RFC 5424, TCP, octet counting);
//	                             optional: without an audit.syslog section there is no syslog sink
//	audit.syslog.ca_file, .cert_file, .key_file
//	                             RFC 5425: mutual TLS 1.3 to the receiver (all three, or none for plain TCP);
//	                             the key must not be readable by group or others
//	audit.syslog.sync_every      confirm delivery (graceful close) after at most this many entries, 1..100000
//	                             (default 512): the most a receiver crash can make the sink resend
//	audit.jsonl.path             append every entry to this JSON-lines file (optional)
//	audit.jsonl.ocsf             write OCSF "API Activity" objects instead of the canonical entries
//	metrics.listen               serve Prometheus metrics (audit log writable, entries, fsyncs, flush latency, sink lag)
//	                             over plain HTTP on this host:port; optional, keep it on a management address
//	log.level                    "debug", "info", "warn" or "error" (default "info")
type Config struct {
	Listen      string
	TLS         TLSConfig
	HSM         HSMConfig
	Store       StoreConfig
	KEKCache    KEKCacheConfig
	Limits      LimitsConfig
	Keepalive   KeepaliveConfig
	Attestation AttestationConfig
	Audit       AuditConfig
	Metrics     MetricsConfig
	Log         LogConfig
}

// MetricsConfig says where to serve metrics (empty: nowhere).
type MetricsConfig struct {
	Listen string
}

// AuditConfig locates the node's audit log and its checkpoint signer.
type AuditConfig struct {
	Dir                string
	SignerKeyFile      string
	NodeID             string
	Origin             string
	CheckpointInterval time.Duration
	CheckpointEvery    uint64
	// Witnesses are the parties whose cosignatures the log stores.
	Witnesses []*audit.Verifier
	// Syslog, when Addr is set, forwards every entry to a syslog receiver
	// (RFC 5424 over TCP, or RFC 5425 over mutual TLS when TLS is set).
	Syslog SyslogSinkConfig
	// JSONL, when Path is set, appends every entry to a JSON-lines file.
	JSONL JSONLSinkConfig
}

// SyslogSinkConfig configures the syslog sink.
type SyslogSinkConfig struct {
	Addr      string
	TLS       *tls.Config
	SyncEvery int
}

// JSONLSinkConfig configures the JSON-lines sink.
type JSONLSinkConfig struct {
	Path string
	OCSF bool
}

// AttestationConfig bounds attestation and the sessions it yields.
type AttestationConfig struct {
	SessionTTL      time.Duration
	ChallengeTTL    time.Duration
	MaxSessions     int
	MaxChallenges   int
	ChallengesPerEK int
}

// TLSConfig holds the loaded TLS material and the files it came from.
type TLSConfig struct {
	CertFile, KeyFile, AdminClientCAFile string
	// AuditorClientCAFile is optional: without it AuditService is closed.
	AuditorClientCAFile string
	// Certificate is the server certificate chain and its key.
	Certificate tls.Certificate
	// AdminCAs issue admin client certificates.
	AdminCAs *x509.CertPool
	// AuditorCAs issue auditor client certificates (nil: no auditors).
	AuditorCAs *x509.CertPool
	// ClientCAs holds every CA above: the TLS layer accepts a client
	// certificate from any of them; kms/server decides the role per service
	// against that role's own pool.
	ClientCAs *x509.CertPool
}

// HSMConfig names the root key.
type HSMConfig struct {
	// RootKey is the pkcs11: URI of the root key, as written.
	RootKey  string
	Sessions int
	// SecondRoot, when set, is the pkcs11: URI of a root key in a second
	// vendor's HSM: the server's root is then hsm.NewDual(RootKey,
	// SecondRoot), so that neither HSM alone can unwrap a KEK.
	SecondRoot string
	// PreviousRoots are the pkcs11: URIs of earlier root keys, opened so
	// that KEK versions they wrap still unwrap during a root rotation.
	PreviousRoots []string
	// PreviousDualRoots are earlier dual roots (a pair of URIs each),
	// kept unwrap-only like PreviousRoots.
	PreviousDualRoots []DualRootConfig
	// RootAliases are other IDs of the current root (kms.Config.RootAliases).
	RootAliases []string
}

// DualRootConfig names the two keys of a dual root.
type DualRootConfig struct {
	RootKey, SecondRoot string
}

// StoreConfig selects the storage engine.
type StoreConfig struct {
	Engine string
	Path   string // bbolt
	// etcd
	Endpoints []string
	Prefix    string
	TLS       *tls.Config
}

// KEKCacheConfig bounds the in-memory cache of unwrapped KEKs.
type KEKCacheConfig struct {
	Size int
	TTL  time.Duration
}

// LimitsConfig bounds what one caller can make the server do.
type LimitsConfig struct {
	MaxMessageBytes      int
	MaxCallTimeout       time.Duration
	MaxConcurrentStreams uint32
	HandshakeTimeout     time.Duration
	ShutdownGrace        time.Duration
}

// KeepaliveConfig holds the HTTP/2 keepalive settings.
type KeepaliveConfig struct {
	MinPingInterval   time.Duration
	PingInterval      time.Duration
	PingTimeout       time.Duration
	MaxConnectionIdle time.Duration
	MaxConnectionAge  time.Duration // 0: never
}

// LogConfig configures the server log.
type LogConfig struct {
	Level slog.Level
}

// The raw file form. Every field is a pointer so that "absent" (take the
// default) differs from a zero written on purpose.
type rawConfig struct {
	Listen      *string         `json:"listen"`
	TLS         *rawTLS         `json:"tls"`
	HSM         *rawHSM         `json:"hsm"`
	Store       *rawStore       `json:"store"`
	KEKCache    *rawKEKCache    `json:"kek_cache"`
	Limits      *rawLimits      `json:"limits"`
	Keepalive   *rawKeepalive   `json:"keepalive"`
	Attestation *rawAttestation `json:"attestation"`
	Audit       *rawAudit       `json:"audit"`
	Metrics     *rawMetrics     `json:"metrics"`
	Log         *rawLog         `json:"log"`
}

type rawMetrics struct {
	Listen *string `json:"listen"`
}

type rawAudit struct {
	Dir                *string      `json:"dir"`
	SignerKeyFile      *string      `json:"signer_key_file"`
	NodeID             *string      `json:"node_id"`
	Origin             *string      `json:"origin"`
	CheckpointInterval *rawDuration `json:"checkpoint_interval"`
	CheckpointEvery    *int64       `json:"checkpoint_every"`
	Witnesses          *[]string    `json:"witnesses"`
	Syslog             *rawSyslog   `json:"syslog"`
	JSONL              *rawJSONL    `json:"jsonl"`
}

type rawSyslog struct {
	Addr      *string `json:"addr"`
	CAFile    *string `json:"ca_file"`
	CertFile  *string `json:"cert_file"`
	KeyFile   *string `json:"key_file"`
	SyncEvery *int64  `json:"sync_every"`
}

type rawJSONL struct {
	Path *string `json:"path"`
	OCSF *bool   `json:"ocsf"`
}

type rawAttestation struct {
	SessionTTL      *rawDuration `json:"session_ttl"`
	ChallengeTTL    *rawDuration `json:"challenge_ttl"`
	MaxSessions     *int64       `json:"max_sessions"`
	MaxChallenges   *int64       `json:"max_challenges"`
	ChallengesPerEK *int64       `json:"challenges_per_ek_per_minute"`
}

type rawTLS struct {
	CertFile            *string `json:"cert_file"`
	KeyFile             *string `json:"key_file"`
	AdminClientCAFile   *string `json:"admin_client_ca_file"`
	AuditorClientCAFile *string `json:"auditor_client_ca_file"`
}

type rawHSM struct {
	RootKey       *string   `json:"root_key"`
	Sessions      *int64    `json:"sessions"`
	SecondRoot    *string   `json:"second_root"`
	PreviousRoots *[]string `json:"previous_roots"`
	RootAliases   *[]string `json:"root_aliases"`

	PreviousDualRoots *[]rawDualRoot `json:"previous_dual_roots"`
}

type rawDualRoot struct {
	RootKey    *string `json:"root_key"`
	SecondRoot *string `json:"second_root"`
}

type rawStore struct {
	Engine    *string   `json:"engine"`
	Path      *string   `json:"path"`
	Endpoints *[]string `json:"endpoints"`
	Prefix    *string   `json:"prefix"`
	CAFile    *string   `json:"ca_file"`
	CertFile  *string   `json:"cert_file"`
	KeyFile   *string   `json:"key_file"`
}

type rawKEKCache struct {
	Size *int64       `json:"size"`
	TTL  *rawDuration `json:"ttl"`
}

type rawLimits struct {
	MaxMessageBytes      *int64       `json:"max_message_bytes"`
	MaxCallTimeout       *rawDuration `json:"max_call_timeout"`
	MaxConcurrentStreams *int64       `json:"max_concurrent_streams"`
	HandshakeTimeout     *rawDuration `json:"handshake_timeout"`
	ShutdownGrace        *rawDuration `json:"shutdown_grace"`
}

type rawKeepalive struct {
	MinPingInterval   *rawDuration `json:"min_ping_interval"`
	PingInterval      *rawDuration `json:"ping_interval"`
	PingTimeout       *rawDuration `json:"ping_timeout"`
	MaxConnectionIdle *rawDuration `json:"max_connection_idle"`
	MaxConnectionAge  *rawDuration `json:"max_connection_age"`
}

// rawDuration is a duration as written: a string in Go syntax ("30s").
// Numbers are refused, since a bare 30 could mean seconds or nanoseconds.
type rawDuration string

type rawLog struct {
	Level *string `json:"level"`
}

// loadConfig reads and validates the configuration file at path.
func loadConfig(path string) (*Config, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	data, err := readLimited(abs, maxConfigBytes)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return parseConfig(data, filepath.Dir(abs), time.Now())
}

// parseConfig parses data strictly and validates it; relative paths are
// resolved against baseDir and certificates checked at time now.
func parseConfig(data []byte, baseDir string, now time.Time) (*Config, error) {
	raw, err := decodeRaw(data)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return raw.validate(baseDir, now)
}

// decodeRaw decodes one JSON object into a rawConfig, walking the token
// stream itself: encoding/json matches keys case-insensitively, keeps the
// last of duplicate keys and does not say where an unknown field was, all
// of which a configuration parser must not do.
func decodeRaw(data []byte) (*rawConfig, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var cfg *rawConfig
	if err := decodeValue(dec, reflect.ValueOf(&cfg).Elem(), ""); err != nil {
		return nil, jsonErr(data, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("unexpected data after the configuration object")
	}
	return cfg, nil
}

// decodeValue decodes the next JSON value into v, a pointer-typed field of
// a raw struct, naming path in errors.
func decodeValue(dec *json.Decoder, v reflect.Value, path string) error {
	elem := v.Type().Elem()
	if elem.Kind() != reflect.Struct {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		if string(raw) == "null" {
			return fmt.Errorf("%s: null is not allowed; leave the field out to take its default", path)
		}
		if err := json.Unmarshal(raw, v.Addr().Interface()); err != nil {
			return fmt.Errorf("%s: must be %s", path, describe(elem))
		}
		return nil
	}

	tok, err := dec.Token()
	if err != nil {
		if err == io.EOF {
			return errors.New("the file is empty; it must hold one JSON object")
		}
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		if path == "" {
			return errors.New("the file must hold one JSON object")
		}
		return fmt.Errorf("%s: must be an object", path)
	}
	v.Set(reflect.New(elem))
	s := v.Elem()
	fields := make(map[string]int, elem.NumField())
	names := make([]string, 0, elem.NumField())
	for i := range elem.NumField() {
		name := elem.Field(i).Tag.Get("json")
		fields[name] = i
		names = append(names, name)
	}
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, ok := tok.(string)
		if !ok {
			return fmt.Errorf("%s: expected a field name", orTop(path))
		}
		p := joinPath(path, key)
		i, ok := fields[key]
		if !ok {
			return fmt.Errorf("%s: unknown field (known in %s: %s)", p, orTop(path), strings.Join(names, ", "))
		}
		if seen[key] {
			return fmt.Errorf("%s: given twice", p)
		}
		seen[key] = true
		if err := decodeValue(dec, s.Field(i), p); err != nil {
			return err
		}
	}
	// The closing brace: More stops at it, or at the end of the input.
	tok, err = dec.Token()
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '}' {
		return fmt.Errorf("%s: malformed object", orTop(path))
	}
	return nil
}

func describe(t reflect.Type) string {
	if t == reflect.TypeFor[rawDuration]() {
		return `a duration string such as "30s"`
	}
	switch k := t.Kind(); k {
	case reflect.String:
		return "a string"
	case reflect.Int64:
		return "an integer"
	default:
		return "a " + k.String()
	}
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func orTop(path string) string {
	if path == "" {
		return "the top level"
	}
	return path
}

// jsonErr turns encoding/json syntax errors into a line and column.
func jsonErr(data []byte, err error) error {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		line, col := lineCol(data, syn.Offset)
		return fmt.Errorf("line %d, column %d: %v", line, col, syn)
	}
	// The token reader says io.EOF when the cut falls between tokens and
	// io.ErrUnexpectedEOF when it falls inside one: the same mistake.
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return errors.New("the file ends in the middle of the JSON object")
	}
	return err
}

func lineCol(data []byte, off int64) (line, col int) {
	off = min(max(off, 0), int64(len(data)))
	before := data[:off]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(off) - (bytes.LastIndexByte(before, '\n') + 1)
	return line, col
}

// validator gathers every problem with a configuration, each under its field
// path, so that an operator fixes the file in one go.
type validator struct {
	baseDir string
	now     time.Time
	errs    []error
}

func (v *validator) fail(path, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("config: %s: %s", path, fmt.Sprintf(format, args...)))
}

func (v *validator) str(path string, p *string, def string, required bool) string {
	switch {
	case p != nil && *p == "":
		v.fail(path, "must not be empty")
		return ""
	case p != nil:
		return *p
	case required:
		v.fail(path, "is required")
		return ""
	default:
		return def
	}
}

func (v *validator) intRange(path string, p *int64, def, lo, hi int64) int64 {
	if p == nil {
		return def
	}
	if *p < lo || *p > hi {
		v.fail(path, "must be between %d and %d, not %d", lo, hi, *p)
		return def
	}
	return *p
}

func (v *validator) duration(path string, p *rawDuration, def, lo, hi time.Duration) time.Duration {
	if p == nil {
		return def
	}
	d, err := time.ParseDuration(string(*p))
	if err != nil {
		v.fail(path, "%q is not a duration (write it like \"30s\", \"5m\" or \"1h\")", *p)
		return def
	}
	if d < lo || d > hi {
		v.fail(path, "must be between %s and %s, not %s", lo, hi, d)
		return def
	}
	return d
}

// file resolves a required file path and reads it.
func (v *validator) file(path string, p *string) (string, []byte) {
	name := v.str(path, p, "", true)
	if name == "" {
		return "", nil
	}
	name = v.abs(name)
	data, err := readLimited(name, maxPEMBytes)
	if err != nil {
		v.fail(path, "%v", err)
		return name, nil
	}
	return name, data
}

func (v *validator) abs(name string) string {
	if filepath.IsAbs(name) {
		return filepath.Clean(name)
	}
	return filepath.Join(v.baseDir, name)
}

// readLimited reads a regular file of at most limit bytes. Refusing other
// kinds of file keeps a path such as /dev/zero or a FIFO from hanging the
// server at start.
func readLimited(name string, limit int64) ([]byte, error) {
	f, err := os.Open(name) // #nosec G304 -- the operator's configuration names the file
	if err != nil {
		return nil, fmt.Errorf("file %q not readable: %w", name, statReason(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("file %q not readable: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%q is not a regular file", name)
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("file %q is larger than %d bytes", name, limit)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("file %q not readable: %w", name, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("file %q is larger than %d bytes", name, limit)
	}
	return data, nil
}

func (r *rawConfig) validate(baseDir string, now time.Time) (*Config, error) {
	v := &validator{baseDir: baseDir, now: now}
	c := &Config{}

	c.Listen = v.str("listen", r.Listen, "", true)
	if c.Listen != "" {
		if err := checkHostPort(c.Listen); err != nil {
			v.fail("listen", "%q: %v", c.Listen, err)
		}
	}

	c.TLS = v.tls(orZero(r.TLS))
	c.HSM = v.hsm(orZero(r.HSM))
	c.Store = v.store(orZero(r.Store))

	kc := orZero(r.KEKCache)
	c.KEKCache.Size = int(v.intRange("kek_cache.size", kc.Size, 1024, 1, 1_000_000))
	c.KEKCache.TTL = v.duration("kek_cache.ttl", kc.TTL, 10*time.Minute, time.Second, 24*time.Hour)

	l := orZero(r.Limits)
	c.Limits = LimitsConfig{
		MaxMessageBytes: int(v.intRange("limits.max_message_bytes", l.MaxMessageBytes, 1<<20, 4096, 64<<20)),
		MaxCallTimeout:  v.duration("limits.max_call_timeout", l.MaxCallTimeout, 30*time.Second, time.Second, time.Hour),
		MaxConcurrentStreams: uint32(v.intRange( // #nosec G115 -- intRange bounds it to 1..10000
			"limits.max_concurrent_streams", l.MaxConcurrentStreams, 100, 1, 10_000)),
		HandshakeTimeout: v.duration("limits.handshake_timeout", l.HandshakeTimeout, 10*time.Second, time.Second, 5*time.Minute),
		ShutdownGrace:    v.duration("limits.shutdown_grace", l.ShutdownGrace, 10*time.Second, 0, 10*time.Minute),
	}

	k := orZero(r.Keepalive)
	c.Keepalive = KeepaliveConfig{
		MinPingInterval:   v.duration("keepalive.min_ping_interval", k.MinPingInterval, 30*time.Second, time.Second, 24*time.Hour),
		PingInterval:      v.duration("keepalive.ping_interval", k.PingInterval, 5*time.Minute, 10*time.Second, 24*time.Hour),
		PingTimeout:       v.duration("keepalive.ping_timeout", k.PingTimeout, 20*time.Second, time.Second, 10*time.Minute),
		MaxConnectionIdle: v.duration("keepalive.max_connection_idle", k.MaxConnectionIdle, 15*time.Minute, time.Second, 24*time.Hour),
		MaxConnectionAge:  v.duration("keepalive.max_connection_age", k.MaxConnectionAge, 0, 0, 720*time.Hour),
	}
	if age := c.Keepalive.MaxConnectionAge; age > 0 && age < time.Second {
		v.fail("keepalive.max_connection_age", "must be 0s (never) or at least 1s, not %s", age)
	}

	at := orZero(r.Attestation)
	c.Attestation = AttestationConfig{
		SessionTTL:      v.duration("attestation.session_ttl", at.SessionTTL, 10*time.Minute, time.Minute, 24*time.Hour),
		ChallengeTTL:    v.duration("attestation.challenge_ttl", at.ChallengeTTL, time.Minute, 5*time.Second, 10*time.Minute),
		MaxSessions:     int(v.intRange("attestation.max_sessions", at.MaxSessions, 10_000, 1, 1_000_000)),
		MaxChallenges:   int(v.intRange("attestation.max_challenges", at.MaxChallenges, 10_000, 1, 1_000_000)),
		ChallengesPerEK: int(v.intRange("attestation.challenges_per_ek_per_minute", at.ChallengesPerEK, 30, 1, 6000)),
	}

	c.Audit = v.audit(orZero(r.Audit))
	if r.Metrics != nil {
		if c.Metrics.Listen = v.str("metrics.listen", r.Metrics.Listen, "", true); c.Metrics.Listen != "" {
			if err := checkHostPort(c.Metrics.Listen); err != nil {
				v.fail("metrics.listen", "%q: %v", c.Metrics.Listen, err)
			}
		}
	}

	lg := orZero(r.Log)
	switch lvl := v.str("log.level", lg.Level, "info", false); lvl {
	case "debug":
		c.Log.Level = slog.LevelDebug
	case "info":
		c.Log.Level = slog.LevelInfo
	case "warn":
		c.Log.Level = slog.LevelWarn
	case "error":
		c.Log.Level = slog.LevelError
	case "":
	default:
		v.fail("log.level", "%q is not a level (want \"debug\", \"info\", \"warn\" or \"error\")", lvl)
	}

	if len(v.errs) > 0 {
		return nil, errors.Join(v.errs...)
	}
	return c, nil
}

// statReason drops the path from an os error, which the message already
// names.
func statReason(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func orZero[T any](p *T) *T {
	if p == nil {
		return new(T)
	}
	return p
}

func checkHostPort(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("must be host:port, such as \"127.0.0.1:8443\" or \"[::1]:8443\"")
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || (port != "0" && n == 0) {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	}
	return nil
}

func (v *validator) tls(r *rawTLS) TLSConfig {
	var c TLSConfig
	var certPEM, keyPEM, caPEM []byte
	c.CertFile, certPEM = v.file("tls.cert_file", r.CertFile)
	c.KeyFile, keyPEM = v.file("tls.key_file", r.KeyFile)
	c.AdminClientCAFile, caPEM = v.file("tls.admin_client_ca_file", r.AdminClientCAFile)

	var leaf *x509.Certificate
	if certPEM != nil {
		chain, err := parseCertsPEM(certPEM)
		if err != nil {
			v.fail("tls.cert_file", "%q: %v", c.CertFile, err)
		} else {
			leaf = chain[0]
			switch {
			case v.now.After(leaf.NotAfter):
				v.fail("tls.cert_file", "%q: the certificate expired on %s", c.CertFile, leaf.NotAfter.UTC().Format(time.RFC3339))
			case v.now.Before(leaf.NotBefore):
				v.fail("tls.cert_file", "%q: the certificate is not valid before %s", c.CertFile, leaf.NotBefore.UTC().Format(time.RFC3339))
			}
			if len(leaf.ExtKeyUsage) > 0 && !hasEKU(leaf, x509.ExtKeyUsageServerAuth) {
				v.fail("tls.cert_file", "%q: the certificate is not for server authentication (no serverAuth extended key usage)", c.CertFile)
			}
		}
	}
	if keyPEM != nil {
		if fi, err := os.Stat(c.KeyFile); err == nil && fi.Mode().Perm()&0o004 != 0 {
			v.fail("tls.key_file", "%q is readable by every user (mode %04o); make it 0600 or 0640", c.KeyFile, fi.Mode().Perm())
		}
	}
	if leaf != nil && keyPEM != nil {
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			v.fail("tls.key_file", "%q: not the private key of tls.cert_file: %v", c.KeyFile, err)
		} else {
			c.Certificate = cert
		}
	}
	c.ClientCAs = x509.NewCertPool()
	c.AdminCAs = v.caPool("tls.admin_client_ca_file", c.AdminClientCAFile, caPEM, c.ClientCAs)
	if r.AuditorClientCAFile != nil {
		var auditorPEM []byte
		c.AuditorClientCAFile, auditorPEM = v.file("tls.auditor_client_ca_file", r.AuditorClientCAFile)
		c.AuditorCAs = v.caPool("tls.auditor_client_ca_file", c.AuditorClientCAFile, auditorPEM, c.ClientCAs)
	}
	return c
}

// caPool parses a file of CA certificates for a client-certificate role,
// adding them also to all, the pool the TLS layer accepts.
func (v *validator) caPool(field, name string, data []byte, all *x509.CertPool) *x509.CertPool {
	if data == nil {
		return nil
	}
	cas, err := parseCertsPEM(data)
	if err != nil {
		v.fail(field, "%q: %v", name, err)
		return nil
	}
	pool := x509.NewCertPool()
	for _, ca := range cas {
		if !ca.BasicConstraintsValid || !ca.IsCA {
			v.fail(field, "%q: certificate %q is not a CA certificate", name, ca.Subject.String())
		}
		pool.AddCert(ca)
		all.AddCert(ca)
	}
	return pool
}

// parseCertsPEM parses every CERTIFICATE block; anything else in the file
// (a private key pasted in by mistake, say) is an error.
func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for n := 1; ; n++ {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is a %q, not a CERTIFICATE", n, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", n, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	if len(bytes.TrimSpace(data)) > 0 {
		return nil, errors.New("data after the last PEM certificate")
	}
	return certs, nil
}

func hasEKU(c *x509.Certificate, want x509.ExtKeyUsage) bool {
	for _, u := range c.ExtKeyUsage {
		if u == want {
			return true
		}
	}
	return false
}

func (v *validator) hsm(r *rawHSM) HSMConfig {
	var c HSMConfig
	c.RootKey = v.str("hsm.root_key", r.RootKey, "", true)
	rootID := v.keyURI("hsm.root_key", c.RootKey)
	c.Sessions = int(v.intRange("hsm.sessions", r.Sessions, 4, 1, 64))
	c.SecondRoot = v.str("hsm.second_root", r.SecondRoot, "", false)
	secondID := v.keyURI("hsm.second_root", c.SecondRoot)
	if secondID != "" && secondID == rootID {
		v.fail("hsm.second_root", "names the same key as hsm.root_key; a dual root needs a key in a second HSM")
	}
	if r.PreviousRoots != nil {
		seen := map[string]int{}
		for i, uri := range *r.PreviousRoots {
			path := fmt.Sprintf("hsm.previous_roots[%d]", i)
			if uri == "" {
				v.fail(path, "must not be empty")
				continue
			}
			id := v.keyURI(path, uri)
			switch j, dup := seen[id]; {
			case id == "":
			case dup:
				v.fail(path, "names the same key as hsm.previous_roots[%d]", j)
			case c.SecondRoot == "" && id == rootID:
				// With a second root the current root is the pair, and
				// its first key alone may well be the previous root.
				v.fail(path, "names the current root key, hsm.root_key")
			default:
				seen[id] = i
			}
			c.PreviousRoots = append(c.PreviousRoots, uri)
		}
	}
	if r.PreviousDualRoots != nil {
		for i, d := range *r.PreviousDualRoots {
			path := fmt.Sprintf("hsm.previous_dual_roots[%d]", i)
			dc := DualRootConfig{
				RootKey:    v.str(path+".root_key", d.RootKey, "", true),
				SecondRoot: v.str(path+".second_root", d.SecondRoot, "", true),
			}
			a, b := v.keyURI(path+".root_key", dc.RootKey), v.keyURI(path+".second_root", dc.SecondRoot)
			if a != "" && a == b {
				v.fail(path+".second_root", "names the same key as its root_key; a dual root needs a key in a second HSM")
			}
			c.PreviousDualRoots = append(c.PreviousDualRoots, dc)
		}
	}
	if r.RootAliases != nil {
		seen := map[string]int{}
		for i, id := range *r.RootAliases {
			path := fmt.Sprintf("hsm.root_aliases[%d]", i)
			u, err := hsm.ParseURI(id)
			switch j, dup := seen[id]; {
			case err != nil:
				v.fail(path, "%v", err)
			case u.KeyID() != id:
				v.fail(path, "must be a root key's ID: a pkcs11: URI with token and object and no query, like %q", u.KeyID())
			case dup:
				v.fail(path, "repeats hsm.root_aliases[%d]", j)
			case id == rootID:
				v.fail(path, "is hsm.root_key's own ID")
			default:
				seen[id] = i
				c.RootAliases = append(c.RootAliases, id)
			}
		}
	}
	return c
}

// keyURI checks a pkcs11: URI naming a root key and returns the key's ID
// (the URI without its query), or "" if uri is empty or invalid.
func (v *validator) keyURI(path, uri string) string {
	if uri == "" {
		return ""
	}
	u, err := hsm.ParseURI(uri)
	switch {
	case err != nil:
		v.fail(path, "%v", err)
	case u.ValidateKey() != nil:
		v.fail(path, "%v", u.ValidateKey())
	case u.ModulePath == "":
		v.fail(path, "the URI must name its PKCS#11 module with module-path=/abs/path/to/module.so")
	case u.PINSource == "":
		v.fail(path, "the URI must say where the user PIN is with pin-source=file:/abs/path")
	default:
		// Checked here so that a missing PIN file is a configuration
		// error naming its field, not an HSM login failure later. The
		// PIN itself is read only by the HSM package.
		pinFile := strings.TrimPrefix(strings.TrimPrefix(u.PINSource, "file://"), "file:")
		if fi, err := os.Stat(pinFile); err != nil {
			v.fail(path, "pin-source file %q: %v", pinFile, statReason(err))
		} else if !fi.Mode().IsRegular() {
			v.fail(path, "pin-source %q is not a regular file", pinFile)
		} else {
			return u.KeyID()
		}
	}
	return ""
}

func (v *validator) store(r *rawStore) StoreConfig {
	var c StoreConfig
	c.Engine = v.str("store.engine", r.Engine, "", true)
	switch c.Engine {
	case "bbolt":
		v.notFor(c.Engine, map[string]bool{
			"store.endpoints": r.Endpoints != nil, "store.prefix": r.Prefix != nil,
			"store.ca_file": r.CAFile != nil, "store.cert_file": r.CertFile != nil, "store.key_file": r.KeyFile != nil,
		})
		p := v.str("store.path", r.Path, "", true)
		if p == "" {
			break
		}
		c.Path = v.abs(p)
		if fi, err := os.Stat(filepath.Dir(c.Path)); err != nil || !fi.IsDir() {
			v.fail("store.path", "directory %q does not exist", filepath.Dir(c.Path))
		} else if fi, err := os.Stat(c.Path); err == nil && !fi.Mode().IsRegular() {
			v.fail("store.path", "%q is not a regular file", c.Path)
		}
	case "etcd":
		v.notFor(c.Engine, map[string]bool{"store.path": r.Path != nil})
		// With any TLS file the endpoints must be https://: the etcd client
		// would speak plaintext to an http:// one despite the TLS files.
		withTLS := r.CAFile != nil || r.CertFile != nil || r.KeyFile != nil
		if r.Endpoints == nil || len(*r.Endpoints) == 0 {
			v.fail("store.endpoints", "required with engine \"etcd\": the etcd members' client URLs, such as [\"https://etcd-1.qc:2379\"]")
		} else {
			for i, e := range *r.Endpoints {
				path := fmt.Sprintf("store.endpoints[%d]", i)
				if e == "" {
					v.fail(path, "empty")
					continue
				}
				if err := store.CheckEtcdEndpoint(e, withTLS); err != nil {
					hint := ""
					if !withTLS {
						hint = " (store.ca_file, .cert_file and .key_file give TLS)"
					}
					v.fail(path, "%q: %v%s", e, err, hint)
				}
			}
			c.Endpoints = *r.Endpoints
		}
		c.Prefix = v.str("store.prefix", r.Prefix, "/coffre/", false)
		if !strings.HasPrefix(c.Prefix, "/") || !strings.HasSuffix(c.Prefix, "/") {
			v.fail("store.prefix", "%q: must start and end with \"/\"", c.Prefix)
		}
		// Mutual TLS to etcd: all three files, or none (then only loopback
		// endpoints are accepted, for tests).
		if withTLS {
			caName, caPEM := v.file("store.ca_file", r.CAFile)
			certName, certPEM := v.file("store.cert_file", r.CertFile)
			keyName, keyPEM := v.file("store.key_file", r.KeyFile)
			if keyPEM != nil {
				v.privateKeyMode("store.key_file", keyName)
			}
			if caPEM != nil && certPEM != nil && keyPEM != nil {
				pool := x509.NewCertPool()
				if !pool.AppendCertsFromPEM(caPEM) {
					v.fail("store.ca_file", "%q holds no PEM certificate", caName)
				}
				cert, err := tls.X509KeyPair(certPEM, keyPEM)
				if err != nil {
					v.fail("store.key_file", "%q and %q: %v", certName, keyName, err)
				}
				c.TLS = &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}
			}
		}
	case "":
	default:
		v.fail("store.engine", "unknown engine %q (want \"bbolt\" or \"etcd\")", c.Engine)
	}
	return c
}

// notFor fails each field of the store section that was given (set[field])
// but belongs to the other engine: the operator believes in a setting that
// engine does not have.
func (v *validator) notFor(engine string, set map[string]bool) {
	for _, field := range slices.Sorted(maps.Keys(set)) {
		if set[field] {
			v.fail(field, "is not a setting of store.engine %q; remove it", engine)
		}
	}
}

// privateKeyMode fails field if the private key file name is open to its
// group or to others (any of the mode bits 0o077): a key for this process
// alone.
func (v *validator) privateKeyMode(field, name string) {
	fi, err := os.Stat(name)
	if err == nil && fi.Mode().Perm()&0o077 != 0 {
		v.fail(field, "%q is readable by others (mode %04o); make it 0600", name, fi.Mode().Perm())
	}
}

// maxWitnesses is the most audit.witnesses may name (audit.Options takes
// as many).
const maxWitnesses = 16

// witnesses reads the public keys of audit.witnesses.
func (v *validator) witnesses(files []string) []*audit.Verifier {
	if len(files) > maxWitnesses {
		v.fail("audit.witnesses", "%d files, more than %d", len(files), maxWitnesses)
		return nil
	}
	var out []*audit.Verifier
	byName := map[string]string{}
	for i, f := range files {
		path := fmt.Sprintf("audit.witnesses[%d]", i)
		name, data := v.file(path, &f)
		if name == "" {
			v.fail(path, "empty")
			continue
		}
		if data == nil {
			continue
		}
		w, err := audit.ParseVerifier(data)
		if err != nil {
			v.fail(path, "%q: %v (want the FILE.pub that coffrectl audit keygen writes)", name, err)
			continue
		}
		if other, dup := byName[w.Name()]; dup {
			v.fail(path, "%q: witness %q is also %s", name, w.Name(), other)
			continue
		}
		byName[w.Name()] = path
		out = append(out, w)
	}
	return out
}

func (v *validator) audit(r *rawAudit) AuditConfig {
	var c AuditConfig
	if c.Dir = v.str("audit.dir", r.Dir, "", true); c.Dir != "" {
		c.Dir = v.abs(c.Dir)
	}
	if c.Dir != "" {
		if fi, err := os.Stat(filepath.Dir(c.Dir)); err != nil || !fi.IsDir() {
			v.fail("audit.dir", "%q: its parent directory does not exist", c.Dir)
		}
	}
	if c.SignerKeyFile = v.str("audit.signer_key_file", r.SignerKeyFile, "", true); c.SignerKeyFile != "" {
		c.SignerKeyFile = v.abs(c.SignerKeyFile)
	}
	if c.SignerKeyFile != "" {
		if _, err := os.Stat(c.SignerKeyFile); err != nil {
			v.fail("audit.signer_key_file", "%q: not readable: %v (coffred dev makes one; in production the key ceremony does)", c.SignerKeyFile, statReason(err))
		} else {
			v.privateKeyMode("audit.signer_key_file", c.SignerKeyFile)
		}
	}
	host, _ := os.Hostname()
	c.NodeID = v.str("audit.node_id", r.NodeID, host, false)
	if c.NodeID == "" || len(c.NodeID) > 128 || strings.ContainsAny(c.NodeID, " \t\n/") {
		v.fail("audit.node_id", "%q: want 1 to 128 characters without spaces or slashes", c.NodeID)
	}
	c.Origin = v.str("audit.origin", r.Origin, "coffre/"+c.NodeID, false)
	if c.Origin == "" || strings.ContainsAny(c.Origin, "\n") {
		v.fail("audit.origin", "%q: want one non-empty line", c.Origin)
	}
	c.CheckpointInterval = v.duration("audit.checkpoint_interval", r.CheckpointInterval, time.Second, 100*time.Millisecond, time.Hour)
	c.CheckpointEvery = uint64(v.intRange("audit.checkpoint_every", r.CheckpointEvery, 10000, 1, 10_000_000)) // #nosec G115 -- bounded to 1..1e7
	if r.Witnesses != nil {
		c.Witnesses = v.witnesses(*r.Witnesses)
	}

	if r.Syslog != nil {
		sl := r.Syslog
		c.Syslog.Addr = v.str("audit.syslog.addr", sl.Addr, "", true)
		if c.Syslog.Addr != "" {
			if err := checkHostPort(c.Syslog.Addr); err != nil {
				v.fail("audit.syslog.addr", "%q: %v", c.Syslog.Addr, err)
			}
		}
		c.Syslog.SyncEvery = int(v.intRange("audit.syslog.sync_every", sl.SyncEvery, 512, 1, 100_000))
		if sl.CAFile != nil || sl.CertFile != nil || sl.KeyFile != nil {
			// RFC 5425: mutual TLS, all three files or none.
			caName, caPEM := v.file("audit.syslog.ca_file", sl.CAFile)
			certName, certPEM := v.file("audit.syslog.cert_file", sl.CertFile)
			keyName, keyPEM := v.file("audit.syslog.key_file", sl.KeyFile)
			if keyPEM != nil {
				v.privateKeyMode("audit.syslog.key_file", keyName)
			}
			if caPEM != nil && certPEM != nil && keyPEM != nil {
				pool := x509.NewCertPool()
				if !pool.AppendCertsFromPEM(caPEM) {
					v.fail("audit.syslog.ca_file", "%q holds no PEM certificate", caName)
				}
				cert, err := tls.X509KeyPair(certPEM, keyPEM)
				if err != nil {
					v.fail("audit.syslog.key_file", "%q and %q: %v", certName, keyName, err)
				}
				host, _, _ := net.SplitHostPort(c.Syslog.Addr)
				c.Syslog.TLS = &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: host}
			}
		}
	}
	if r.JSONL != nil {
		if c.JSONL.Path = v.str("audit.jsonl.path", r.JSONL.Path, "", true); c.JSONL.Path != "" {
			c.JSONL.Path = v.abs(c.JSONL.Path)
		}
		if r.JSONL.OCSF != nil {
			c.JSONL.OCSF = *r.JSONL.OCSF
		}
	}
	return c
}
