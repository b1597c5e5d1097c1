package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// testFiles makes, in a temp dir, everything a valid configuration names:
// a CA, a server and an admin certificate, a PIN file and the store's
// directory.
type testFiles struct {
	dir                             string
	ca, serverCert, serverKey       string
	adminCert, adminKey, pin, store string
	auditDir, signerKey             string
}

func newTestFiles(t *testing.T) *testFiles {
	t.Helper()
	dir := t.TempDir()
	f := &testFiles{
		dir:        dir,
		ca:         filepath.Join(dir, "ca.pem"),
		serverCert: filepath.Join(dir, "server.pem"),
		serverKey:  filepath.Join(dir, "server-key.pem"),
		adminCert:  filepath.Join(dir, "admin.pem"),
		adminKey:   filepath.Join(dir, "admin-key.pem"),
		pin:        filepath.Join(dir, "pin"),
		store:      filepath.Join(dir, "coffre.db"),
		auditDir:   filepath.Join(dir, "audit"),
		signerKey:  filepath.Join(dir, "audit-signer.key"),
	}
	if err := os.WriteFile(f.signerKey, []byte("not parsed by the config checks\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca, _, err := ensureCA(f.ca, filepath.Join(dir, "ca-key.pem"), now)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ensureLeaf(leafSpec{certFile: f.serverCert, keyFile: f.serverKey, commonName: "s",
		usage: x509.ExtKeyUsageServerAuth, ips: []net.IP{net.IPv4(127, 0, 0, 1).To4()}}, now); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ensureLeaf(leafSpec{certFile: f.adminCert, keyFile: f.adminKey, commonName: "a",
		usage: x509.ExtKeyUsageClientAuth}, now); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.pin, []byte("1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *testFiles) rootKey() string {
	return "pkcs11:token=t;object=root?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:" + f.pin
}

// keyURI is the pkcs11: URI of key object on token, with the test PIN file.
func (f *testFiles) keyURI(token, object string) string {
	return "pkcs11:token=" + token + ";object=" + object + "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:" + f.pin
}

// valid returns a minimal valid configuration as a JSON-ready map.
func (f *testFiles) valid() map[string]any {
	return map[string]any{
		"listen": "127.0.0.1:0",
		"tls": map[string]any{
			"cert_file":            f.serverCert,
			"key_file":             f.serverKey,
			"admin_client_ca_file": f.ca,
		},
		"hsm":   map[string]any{"root_key": f.rootKey()},
		"store": map[string]any{"engine": "bbolt", "path": f.store},
		"audit": map[string]any{"dir": f.auditDir, "signer_key_file": f.signerKey},
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// set sets a dotted path in a config map.
func set(m map[string]any, path string, v any) {
	parts := strings.Split(path, ".")
	for _, p := range parts[:len(parts)-1] {
		next, ok := m[p].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[p] = next
		}
		m = next
	}
	m[parts[len(parts)-1]] = v
}

func TestConfigValidDefaults(t *testing.T) {
	f := newTestFiles(t)
	cfg, err := parseConfig(mustJSON(t, f.valid()), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:0" || cfg.Store.Path != f.store || cfg.HSM.Sessions != 4 {
		t.Fatalf("cfg = %+v", cfg)
	}
	if cfg.Limits.MaxMessageBytes != 1<<20 || cfg.Limits.MaxCallTimeout != 30*time.Second ||
		cfg.Limits.ShutdownGrace != 10*time.Second || cfg.Limits.MaxConcurrentStreams != 100 ||
		cfg.Limits.HandshakeTimeout != 10*time.Second {
		t.Fatalf("limits = %+v", cfg.Limits)
	}
	if cfg.KEKCache.Size != 1024 || cfg.KEKCache.TTL != 10*time.Minute {
		t.Fatalf("kek_cache = %+v", cfg.KEKCache)
	}
	if cfg.Keepalive.MinPingInterval != 30*time.Second || cfg.Keepalive.MaxConnectionAge != 0 {
		t.Fatalf("keepalive = %+v", cfg.Keepalive)
	}
	if cfg.TLS.AdminCAs == nil || len(cfg.TLS.Certificate.Certificate) == 0 {
		t.Fatal("TLS material not loaded")
	}
}

func TestConfigExplicitValues(t *testing.T) {
	f := newTestFiles(t)
	m := f.valid()
	set(m, "limits.max_message_bytes", 4096)
	set(m, "limits.shutdown_grace", "0s")
	set(m, "limits.max_call_timeout", "1m30s")
	set(m, "keepalive.max_connection_age", "2h")
	set(m, "log.level", "debug")
	cfg, err := parseConfig(mustJSON(t, m), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// An explicit zero is kept, not replaced by the default.
	if cfg.Limits.ShutdownGrace != 0 || cfg.Limits.MaxMessageBytes != 4096 ||
		cfg.Limits.MaxCallTimeout != 90*time.Second || cfg.Keepalive.MaxConnectionAge != 2*time.Hour {
		t.Fatalf("limits = %+v, keepalive = %+v", cfg.Limits, cfg.Keepalive)
	}
}

// TestConfigDualAndPreviousRoots: hsm.second_root and hsm.previous_roots
// are optional and kept as written.
func TestConfigDualAndPreviousRoots(t *testing.T) {
	f := newTestFiles(t)
	cfg, err := parseConfig(mustJSON(t, f.valid()), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HSM.SecondRoot != "" || cfg.HSM.PreviousRoots != nil {
		t.Fatalf("defaults: %+v", cfg.HSM)
	}
	m := f.valid()
	second, old := f.keyURI("vendor-b", "root"), f.keyURI("old", "root-2024")
	set(m, "hsm.second_root", second)
	// Moving from the single root to the pair: the first key alone is a
	// previous root, distinct from the dual root it is part of.
	set(m, "hsm.previous_roots", []string{old, f.rootKey()})
	cfg, err = parseConfig(mustJSON(t, m), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HSM.SecondRoot != second || len(cfg.HSM.PreviousRoots) != 2 || cfg.HSM.PreviousRoots[0] != old || cfg.HSM.PreviousRoots[1] != f.rootKey() {
		t.Fatalf("hsm = %+v", cfg.HSM)
	}
	set(m, "hsm.previous_roots", []string{})
	if cfg, err = parseConfig(mustJSON(t, m), f.dir, time.Now()); err != nil || len(cfg.HSM.PreviousRoots) != 0 {
		t.Fatalf("empty previous_roots: %+v, %v", cfg, err)
	}
}

func TestConfigRelativePaths(t *testing.T) {
	f := newTestFiles(t)
	m := f.valid()
	set(m, "tls.cert_file", "server.pem")
	set(m, "tls.key_file", "./server-key.pem")
	set(m, "tls.admin_client_ca_file", "ca.pem")
	set(m, "store.path", "coffre.db")
	path := filepath.Join(f.dir, "coffred.json")
	if err := os.WriteFile(path, mustJSON(t, m), 0o600); err != nil {
		t.Fatal(err)
	}
	// From another working directory, the paths still mean the files
	// beside the configuration.
	t.Chdir(t.TempDir())
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TLS.CertFile != f.serverCert || cfg.Store.Path != f.store {
		t.Fatalf("paths not resolved against the config's directory: %+v %+v", cfg.TLS, cfg.Store)
	}
}

func TestConfigErrors(t *testing.T) {
	f := newTestFiles(t)
	worldReadable := filepath.Join(f.dir, "world-key.pem")
	key, err := os.ReadFile(f.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(worldReadable, key, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(worldReadable, 0o644); err != nil {
		t.Fatal(err)
	}
	groupReadable := filepath.Join(f.dir, "group-key.pem")
	if err := os.WriteFile(groupReadable, key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(groupReadable, 0o640); err != nil {
		t.Fatal(err)
	}
	etcdTLS := func(endpoint, keyFile string) map[string]any {
		return map[string]any{"engine": "etcd", "endpoints": []string{"https://etcd-qc1.example:2379", endpoint},
			"ca_file": f.ca, "cert_file": f.adminCert, "key_file": keyFile}
	}
	syslogTLS := func(keyFile string) map[string]any {
		return map[string]any{"addr": "siem.example:6514", "ca_file": f.ca, "cert_file": f.adminCert, "key_file": keyFile}
	}
	witnessPub := func(name string) string {
		w, err := audit.GenerateSigner(name)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(f.dir, name+".pub")
		if err := os.WriteFile(p, w.Verifier().Marshal(), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	witnessA, witnessB := witnessPub("witness.a"), witnessPub("witness.b")
	manyWitnesses := make([]string, 17)
	for i := range manyWitnesses {
		manyWitnesses[i] = witnessA
	}
	valid := string(mustJSON(t, f.valid()))
	with := func(path string, v any) string {
		m := f.valid()
		set(m, path, v)
		return string(mustJSON(t, m))
	}
	without := func(section, field string) string {
		m := f.valid()
		delete(m[section].(map[string]any), field)
		return string(mustJSON(t, m))
	}

	for _, tc := range []struct {
		name string
		data string
		want []string // each must appear in the error
	}{
		{"empty file", "", []string{"empty"}},
		{"not an object", "[]", []string{"one JSON object"}},
		{"syntax", "{\n  \"listen\": \"x\",,\n}", []string{"line 2"}},
		{"truncated", valid[:len(valid)/2], []string{"ends in the middle"}},
		{"trailing object", valid + "{}", []string{"unexpected data after the configuration object"}},
		{"trailing garbage", valid + "x", []string{"unexpected data after the configuration object"}},
		{"all required missing", "{}", []string{
			"config: listen: is required", "config: tls.cert_file: is required", "config: tls.key_file: is required",
			"config: tls.admin_client_ca_file: is required", "config: hsm.root_key: is required", "config: store.engine: is required",
		}},
		{"unknown top-level field", `{"lisen": "x"}`, []string{"config: lisen: unknown field"}},
		{"unknown nested field", with("tls.certfile", "x"), []string{"config: tls.certfile: unknown field"}},
		{"field in wrong case", `{"Listen": "127.0.0.1:1"}`, []string{"config: Listen: unknown field"}},
		{"duplicate field", `{"listen": "127.0.0.1:1", "listen": "127.0.0.1:2"}`, []string{"config: listen: given twice"}},
		{"null", `{"listen": null}`, []string{"config: listen: null is not allowed"}},
		{"string for integer", with("hsm.sessions", "4"), []string{"config: hsm.sessions: must be an integer"}},
		{"fraction for integer", with("hsm.sessions", 1.5), []string{"config: hsm.sessions: must be an integer"}},
		{"number for string", with("listen", 8443), []string{"config: listen: must be a string"}},
		{"string for section", with("tls", "server.pem"), []string{"config: tls: must be an object"}},
		{"number for duration", with("limits.max_call_timeout", 30), []string{`config: limits.max_call_timeout: must be a duration string such as "30s"`}},
		{"listen without port", with("listen", "localhost"), []string{"config: listen:", "host:port"}},
		{"listen bad port", with("listen", "127.0.0.1:99999"), []string{"config: listen:", "port"}},
		{"empty string", with("listen", ""), []string{"config: listen: must not be empty"}},
		{"cert file missing", with("tls.cert_file", "/nonexistent/server.pem"), []string{`config: tls.cert_file: file "/nonexistent/server.pem" not readable`}},
		{"cert file is a directory", with("tls.cert_file", f.dir), []string{"config: tls.cert_file:", "not a regular file"}},
		{"cert file is a device", with("tls.cert_file", "/dev/zero"), []string{"config: tls.cert_file:", "not a regular file"}},
		{"cert file holds a key", with("tls.cert_file", f.serverKey), []string{"config: tls.cert_file:", "not a CERTIFICATE"}},
		{"key does not match", with("tls.key_file", f.adminKey), []string{"config: tls.key_file:", "not the private key of tls.cert_file"}},
		{"key world-readable", with("tls.key_file", worldReadable), []string{"config: tls.key_file:", "readable by every user"}},
		{"server cert not for servers", with("tls.cert_file", f.adminCert), []string{"config: tls.cert_file:", "not for server authentication"}},
		{"admin CA not a CA", with("tls.admin_client_ca_file", f.adminCert), []string{"config: tls.admin_client_ca_file:", "not a CA certificate"}},
		{"root key not a URI", with("hsm.root_key", "file:/etc/key"), []string{"config: hsm.root_key:", "not a pkcs11 URI"}},
		{"root key with PIN value", with("hsm.root_key", "pkcs11:token=t;object=root?module-path=/m.so&pin-value=1234"), []string{"config: hsm.root_key:", "pin-value"}},
		{"root key without object", with("hsm.root_key", "pkcs11:token=t?module-path=/m.so&pin-source=file:"+f.pin), []string{"config: hsm.root_key:", "must name its key"}},
		{"root key without module", with("hsm.root_key", "pkcs11:token=t;object=root?pin-source=file:"+f.pin), []string{"config: hsm.root_key:", "module-path"}},
		{"root key without PIN source", with("hsm.root_key", "pkcs11:token=t;object=root?module-path=/m.so"), []string{"config: hsm.root_key:", "pin-source"}},
		{"root key PIN file missing", with("hsm.root_key", "pkcs11:token=t;object=root?module-path=/m.so&pin-source=file:/nonexistent/pin"), []string{"config: hsm.root_key: pin-source file \"/nonexistent/pin\""}},
		{"sessions zero", with("hsm.sessions", 0), []string{"config: hsm.sessions: must be between 1 and 64"}},
		{"second root empty", with("hsm.second_root", ""), []string{"config: hsm.second_root: must not be empty"}},
		{"second root not a URI", with("hsm.second_root", "file:/etc/key"), []string{"config: hsm.second_root:", "not a pkcs11 URI"}},
		{"second root without PIN source", with("hsm.second_root", "pkcs11:token=u;object=root?module-path=/m.so"), []string{"config: hsm.second_root:", "pin-source"}},
		{"second root is the root key", with("hsm.second_root", "pkcs11:token=t;object=root?module-path=/other.so&pin-source=file:"+f.pin), []string{"config: hsm.second_root: names the same key as hsm.root_key"}},
		{"previous roots not a list", with("hsm.previous_roots", f.rootKey()), []string{"config: hsm.previous_roots:"}},
		{"previous root empty", with("hsm.previous_roots", []string{""}), []string{"config: hsm.previous_roots[0]: must not be empty"}},
		{"previous root with PIN value", with("hsm.previous_roots", []string{"pkcs11:token=t;object=old?module-path=/m.so&pin-value=1"}), []string{"config: hsm.previous_roots[0]:", "pin-value"}},
		{"previous root is the root key", with("hsm.previous_roots", []string{f.rootKey()}), []string{"config: hsm.previous_roots[0]: names the current root key"}},
		{"previous dual root half", with("hsm.previous_dual_roots", []map[string]string{{"root_key": f.rootKey()}}), []string{"config: hsm.previous_dual_roots[0].second_root:"}},
		{"previous dual root same key twice", with("hsm.previous_dual_roots", []map[string]string{{"root_key": f.rootKey(), "second_root": f.rootKey()}}), []string{"config: hsm.previous_dual_roots[0].second_root: names the same key"}},
		{"previous dual root unknown field", with("hsm.previous_dual_roots", []map[string]string{{"root_key": f.rootKey(), "second": f.rootKey()}}), []string{"config:", "second"}},
		{"root alias with a query", with("hsm.root_aliases", []string{f.rootKey()}), []string{"config: hsm.root_aliases[0]: must be a root key's ID"}},
		{"root alias not a URI", with("hsm.root_aliases", []string{"root-2025"}), []string{"config: hsm.root_aliases[0]:"}},
		{"root alias twice", with("hsm.root_aliases", []string{"pkcs11:token=a;object=r", "pkcs11:token=a;object=r"}), []string{"config: hsm.root_aliases[1]: repeats hsm.root_aliases[0]"}},
		{"previous root twice", with("hsm.previous_roots", []string{f.keyURI("t", "old"), f.keyURI("t", "new"), f.keyURI("t", "old")}), []string{"config: hsm.previous_roots[2]: names the same key as hsm.previous_roots[0]"}},
		{"store engine missing", without("store", "engine"), []string{"config: store.engine: is required"}},
		{"store engine etcd without endpoints", with("store.engine", "etcd"), []string{"config: store.endpoints: required"}},
		{"store etcd bad prefix", with("store", map[string]any{"engine": "etcd", "endpoints": []string{"http://127.0.0.1:2379"}, "prefix": "coffre"}), []string{"config: store.prefix:"}},
		{"store etcd half TLS", with("store", map[string]any{"engine": "etcd", "endpoints": []string{"https://e:2379"}, "ca_file": "/nope"}), []string{"config: store.ca_file:", "config: store.cert_file:", "config: store.key_file:"}},
		{"store etcd http with TLS", with("store", etcdTLS("http://etcd-qc2.example:2379", f.adminKey)), []string{"config: store.endpoints[1]: \"http://etcd-qc2.example:2379\": http:// is plaintext"}},
		{"store etcd loopback http with TLS", with("store", etcdTLS("http://127.0.0.1:2379", f.adminKey)), []string{"config: store.endpoints[1]:", "plaintext"}},
		{"store etcd unix with TLS", with("store", etcdTLS("unix:///run/etcd.sock", f.adminKey)), []string{"config: store.endpoints[1]:", "plaintext"}},
		{"store etcd no scheme with TLS", with("store", etcdTLS("etcd-qc2.example:2379", f.adminKey)), []string{"config: store.endpoints[1]:", "no scheme"}},
		{"store etcd https without TLS", with("store", map[string]any{"engine": "etcd", "endpoints": []string{"https://etcd-qc1.example:2379"}}), []string{"config: store.endpoints[0]:", "no TLS configuration", "store.ca_file"}},
		{"store etcd remote without TLS", with("store", map[string]any{"engine": "etcd", "endpoints": []string{"http://127.0.0.1:2379", "http://10.0.0.1:2379"}}), []string{"config: store.endpoints[1]:", "not on loopback"}},
		{"store etcd key readable by group", with("store", etcdTLS("https://etcd-qc2.example:2379", groupReadable)), []string{"config: store.key_file:", "readable by others (mode 0640)"}},
		{"store etcd key world-readable", with("store", etcdTLS("https://etcd-qc2.example:2379", worldReadable)), []string{"config: store.key_file:", "readable by others (mode 0644)"}},
		{"store etcd with path", with("store", map[string]any{"engine": "etcd", "endpoints": []string{"http://127.0.0.1:2379"}, "path": f.store}), []string{"config: store.path: is not a setting of store.engine \"etcd\""}},
		{"store bbolt with etcd fields", with("store", map[string]any{"engine": "bbolt", "path": f.store, "endpoints": []string{"https://e:2379"}, "prefix": "/x/", "ca_file": f.ca, "cert_file": f.adminCert, "key_file": f.adminKey}), []string{
			"config: store.endpoints: is not a setting of store.engine \"bbolt\"", "config: store.prefix: is not", "config: store.ca_file: is not", "config: store.cert_file: is not", "config: store.key_file: is not",
		}},
		{"store bbolt with prefix", with("store.prefix", "/coffre/"), []string{"config: store.prefix: is not a setting of store.engine \"bbolt\""}},
		{"syslog key readable by group", with("audit.syslog", syslogTLS(groupReadable)), []string{"config: audit.syslog.key_file:", "readable by others (mode 0640)"}},
		{"signer key readable by group", with("audit.signer_key_file", groupReadable), []string{"config: audit.signer_key_file:", "readable by others (mode 0640)"}},
		{"witness file missing", with("audit.witnesses", []string{witnessA, "/nonexistent/w.pub"}), []string{"config: audit.witnesses[1]:", "/nonexistent/w.pub"}},
		{"witness not a key", with("audit.witnesses", []string{f.ca}), []string{"config: audit.witnesses[0]:", "coffrectl audit keygen"}},
		{"witness twice", with("audit.witnesses", []string{witnessA, witnessB, witnessA}), []string{"config: audit.witnesses[2]:", "witness \"witness.a\" is also audit.witnesses[0]"}},
		{"witnesses too many", with("audit.witnesses", manyWitnesses), []string{"config: audit.witnesses: 17 files, more than 16"}},
		{"store engine unknown", with("store.engine", "mysql"), []string{"config: store.engine: unknown engine \"mysql\""}},
		{"store path missing", without("store", "path"), []string{"config: store.path: is required"}},
		{"store directory missing", with("store.path", "/nonexistent/coffre.db"), []string{"config: store.path: directory \"/nonexistent\" does not exist"}},
		{"store path a directory", with("store.path", f.dir), []string{"config: store.path:", "not a regular file"}},
		{"cache size negative", with("kek_cache.size", -1), []string{"config: kek_cache.size: must be between 1 and 1000000"}},
		{"cache ttl not a duration", with("kek_cache.ttl", "10"), []string{"config: kek_cache.ttl: \"10\" is not a duration"}},
		{"session ttl too short", with("attestation.session_ttl", "5s"), []string{"config: attestation.session_ttl:"}},
		{"challenge rate zero", with("attestation.challenges_per_ek_per_minute", 0), []string{"config: attestation.challenges_per_ek_per_minute:"}},
		{"unknown attestation field", with("attestation.sesion_ttl", "10m"), []string{"attestation.sesion_ttl"}},
		{"message size too small", with("limits.max_message_bytes", 100), []string{"config: limits.max_message_bytes: must be between 4096 and 67108864"}},
		{"message size too big", with("limits.max_message_bytes", 1<<30), []string{"config: limits.max_message_bytes: must be between 4096 and 67108864"}},
		{"call timeout zero", with("limits.max_call_timeout", "0s"), []string{"config: limits.max_call_timeout: must be between 1s and 1h0m0s"}},
		{"streams zero", with("limits.max_concurrent_streams", 0), []string{"config: limits.max_concurrent_streams: must be between 1 and 10000"}},
		{"grace negative", with("limits.shutdown_grace", "-1s"), []string{"config: limits.shutdown_grace: must be between"}},
		{"handshake too short", with("limits.handshake_timeout", "1ms"), []string{"config: limits.handshake_timeout: must be between"}},
		{"ping interval garbage", with("keepalive.min_ping_interval", "often"), []string{"config: keepalive.min_ping_interval: \"often\" is not a duration"}},
		{"connection age tiny", with("keepalive.max_connection_age", "10ms"), []string{"config: keepalive.max_connection_age: must be 0s (never) or at least 1s"}},
		{"syslog sync_every zero", with("audit.syslog", map[string]any{"addr": "127.0.0.1:6514", "sync_every": 0}), []string{"config: audit.syslog.sync_every: must be between 1 and 100000"}},
		{"log level unknown", with("log.level", "verbose"), []string{"config: log.level: \"verbose\" is not a level"}},
		{"several at once", `{"listen": "nope", "store": {"engine": "etcd"}}`, []string{"config: listen:", "config: store.endpoints:", "config: hsm.root_key: is required"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parseConfig([]byte(tc.data), f.dir, time.Now())
			if err == nil {
				t.Fatalf("accepted: %+v", cfg)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not contain %q:\n%v", w, err)
				}
			}
			if !strings.HasPrefix(err.Error(), "config: ") {
				t.Errorf("error does not start with \"config: \": %v", err)
			}
		})
	}
}

func TestConfigExpiredCertificate(t *testing.T) {
	f := newTestFiles(t)
	_, err := parseConfig(mustJSON(t, f.valid()), f.dir, time.Now().Add(2*devLeafValidity))
	if err == nil || !strings.Contains(err.Error(), "config: tls.cert_file:") || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("got %v, want tls.cert_file expired", err)
	}
}

// TestConfigExample checks that coffred.example.json uses every field of
// the format, and nothing else: it is the format's reference.
func TestConfigExample(t *testing.T) {
	data, err := os.ReadFile("coffred.example.json")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := decodeRaw(data)
	if err != nil {
		t.Fatal(err)
	}
	// The etcd fields are shown by coffred.etcd.example.json instead: one
	// store engine per file.
	etcdOnly := map[string]bool{"store.endpoints": true, "store.prefix": true, "store.ca_file": true, "store.cert_file": true, "store.key_file": true}
	var walk func(v reflect.Value, path string)
	walk = func(v reflect.Value, path string) {
		if etcdOnly[path] {
			return
		}
		if v.IsNil() {
			t.Errorf("coffred.example.json lacks %s", path)
			return
		}
		e := v.Elem()
		if e.Kind() != reflect.Struct {
			return
		}
		for i := range e.NumField() {
			walk(e.Field(i), joinPath(path, e.Type().Field(i).Tag.Get("json")))
		}
	}
	walk(reflect.ValueOf(raw), "")

	// Its values are valid: the only errors are about files that do not
	// exist on this machine.
	_, err = raw.validate(t.TempDir(), time.Now())
	for _, line := range strings.Split(err.Error(), "\n") {
		if !strings.Contains(line, "not readable") && !strings.Contains(line, "pin-source file") && !strings.Contains(line, "does not exist") {
			t.Errorf("unexpected error for the example: %s", line)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	example, err := os.ReadFile("coffred.example.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"listen": "127.0.0.1:1", "tls": {"cert_file": "x"}, "limits": {"max_call_timeout": "1h"}}`))
	f.Add([]byte(`{"hsm": {"root_key": "pkcs11:token=a;object=b?pin-value=1"}}`))
	f.Add([]byte(`{"hsm": {"second_root": "pkcs11:token=b;object=c", "previous_roots": ["", "pkcs11:object=d", 3]}}`))
	f.Add([]byte(`{"a": [[[[{}]]]], "listen": null}`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig(data, dir, time.Now())
		if err == nil && cfg == nil {
			t.Fatal("nil config without an error")
		}
		if err != nil && !strings.HasPrefix(err.Error(), "config: ") {
			t.Fatalf("error without the config: prefix: %v", err)
		}
	})
}

// TestConfigEtcdExample checks the etcd example: its values are valid, the
// only errors are about files that do not exist on this machine.
func TestConfigEtcdExample(t *testing.T) {
	data, err := os.ReadFile("coffred.etcd.example.json")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := decodeRaw(data)
	if err != nil {
		t.Fatal(err)
	}
	if raw.Store == nil || raw.Store.Endpoints == nil || raw.Store.CAFile == nil {
		t.Fatal("coffred.etcd.example.json does not show the etcd store fields")
	}
	_, err = raw.validate(t.TempDir(), time.Now())
	for _, line := range strings.Split(err.Error(), "\n") {
		if !strings.Contains(line, "not readable") && !strings.Contains(line, "pin-source file") && !strings.Contains(line, "does not exist") {
			t.Errorf("unexpected error for the etcd example: %s", line)
		}
	}
}

// TestConfigTLSVersions: the TLS configurations coffred makes for etcd and
// for syslog ask for TLS 1.3, as everything else Coffre speaks.
func TestConfigTLSVersions(t *testing.T) {
	f := newTestFiles(t)
	m := f.valid()
	m["store"] = map[string]any{"engine": "etcd", "endpoints": []string{"https://etcd-qc1.example:2379"},
		"ca_file": f.ca, "cert_file": f.adminCert, "key_file": f.adminKey}
	set(m, "audit.syslog", map[string]any{"addr": "siem.example:6514", "ca_file": f.ca, "cert_file": f.adminCert, "key_file": f.adminKey})
	cfg, err := parseConfig(mustJSON(t, m), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*tls.Config{"store": cfg.Store.TLS, "audit.syslog": cfg.Audit.Syslog.TLS} {
		if c == nil {
			t.Errorf("%s: no TLS configuration", name)
		} else if c.MinVersion != tls.VersionTLS13 {
			t.Errorf("%s: MinVersion %#x, want TLS 1.3", name, c.MinVersion)
		}
	}
}

// TestConfigEtcdTLS: the store section of a configuration naming the TLS
// files of a real etcd that requires mutual TLS opens it.
func TestConfigEtcdTLS(t *testing.T) {
	f := newTestFiles(t)
	cluster := etcdtest.StartClusterWith(t, 1, etcdtest.Options{TLS: true})
	ca, cert, key := cluster.TLSFiles()
	m := f.valid()
	m["store"] = map[string]any{"engine": "etcd", "endpoints": cluster.Endpoints(), "ca_file": ca, "cert_file": cert, "key_file": key}
	cfg, err := parseConfig(mustJSON(t, m), f.dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: cfg.Store.Endpoints, Prefix: cfg.Store.Prefix, TLS: cfg.Store.TLS})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Put(t.Context(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
}
