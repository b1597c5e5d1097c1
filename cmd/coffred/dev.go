package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/audit"
)

// "coffred dev" sets up a development environment in one directory and
// serves from it. Everything it creates is kept, and reused on the next
// start, so that keyrings survive restarts the way they would in
// production. Layout of DIR:
//
//	softhsm/softhsm2.conf   SoftHSM configuration, tokens in softhsm/tokens/
//	pin, so-pin             the token's user and SO PINs (random, 0600)
//	ca.pem, ca-key.pem      the local CA (ECDSA P-256)
//	server.pem, server-key.pem   server certificate: 127.0.0.1, ::1, localhost
//	admin.pem, admin-key.pem     admin client certificate, CN dev-admin
//	coffred.json            the configuration, in the format of --config
//	coffre.db               the bbolt store
//	env                     shell variables for coffrectl: ". DIR/env"

const (
	defaultSoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"
	devToken             = "coffre-dev" // #nosec G101 -- a token label, not a credential
	devRootObject        = "root"
	devTryKeyring        = "acme/disks"
)

// devOptions are the flags of "coffred dev".
type devOptions struct {
	dir    string // as given, for the messages a user copies
	listen string // empty: as in coffred.json
	module string
	// nodeTPM, when set, is the TPM spec of the simulated node whose
	// identity `coffre-agent identity` wrote to DIR/node; it is enrolled
	// and written to DIR/env as COFFRE_TPM.
	nodeTPM string
}

// devEnv is the set of files prepareDev made or found.
type devEnv struct {
	dir                           string // absolute
	shownDir                      string
	softhsmConf                   string
	configPath                    string
	caFile, adminCert, adminKey   string
	serverCert, serverKey, caKey  string
	pinFile, soPINFile, storePath string
	envFile                       string
	auditSigner                   string
	witnessKey                    string
	// The dev admin's quorum signing key, its passphrase and public key.
	adminSignKey, adminSignPass, adminSignPub string
}

func newDevEnv(dir, shown string) *devEnv {
	j := func(name string) string { return filepath.Join(dir, name) }
	return &devEnv{
		dir:         dir,
		shownDir:    shown,
		softhsmConf: j("softhsm/softhsm2.conf"),
		configPath:  j("coffred.json"),
		caFile:      j("ca.pem"),
		caKey:       j("ca-key.pem"),
		serverCert:  j("server.pem"),
		serverKey:   j("server-key.pem"),
		adminCert:   j("admin.pem"),
		adminKey:    j("admin-key.pem"),
		pinFile:     j("pin"),
		soPINFile:   j("so-pin"),
		storePath:   j("coffre.db"),
		envFile:     j("env"),
		auditSigner: j("audit-signer.key"),
		witnessKey:  j("witness.key"),

		adminSignKey:  j("admin-sign.key"),
		adminSignPass: j("admin-sign.pass"),
		adminSignPub:  j("admin-sign.pub"),
	}
}

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("coffred dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, `usage: coffred dev --dir DIR [--listen HOST:PORT] [--module PATH]

Creates, or reuses, a development environment in DIR (a SoftHSM token and
its root key, a local CA with server and admin certificates, a bbolt store,
DIR/coffred.json) and serves from it as "coffred --config DIR/coffred.json"
would. DIR/env holds what coffrectl needs: ". DIR/env".

flags:
`)
		fs.PrintDefaults()
	}
	var o devOptions
	fs.StringVar(&o.dir, "dir", "", "the dev environment `directory` (created if missing, reused if not)")
	fs.StringVar(&o.listen, "listen", "", "`host:port` to serve on; port 0 picks a free port (default: listen in DIR/coffred.json, written as "+defaultListen+")")
	fs.StringVar(&o.module, "module", defaultSoftHSMModule, "the SoftHSM2 PKCS#11 module `path`")
	fs.StringVar(&o.nodeTPM, "node-tpm", "", "`SPEC` of a simulated node TPM (e.g. simulator:SEED) whose identity is in DIR/node: enroll it and export COFFRE_TPM")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "coffred dev: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return exitUsage
	}
	if o.dir == "" {
		fmt.Fprintln(stderr, "coffred dev: --dir is required")
		fs.Usage()
		return exitUsage
	}
	if o.listen != "" {
		if err := checkHostPort(o.listen); err != nil {
			fmt.Fprintf(stderr, "coffred dev: --listen %q: %v\n", o.listen, err)
			return exitUsage
		}
	}

	log := newLogger(stderr, slog.LevelInfo)
	env, cfg, err := prepareDev(ctx, o, stdout, log)
	if err != nil {
		fmt.Fprintf(stderr, "coffred dev: %v\n", err)
		return exitError
	}
	if o.listen != "" && o.listen != cfg.Listen {
		// Said aloud: the flag was typed just now, the file may be old.
		log.Info("--listen overrides listen of coffred.json", "file", cfg.Listen, "flag", o.listen)
		cfg.Listen = o.listen
	}
	log = newLogger(stderr, cfg.Log.Level)
	quorumSetup := devQuorumSetup(env, stdout)
	setup := quorumSetup
	if o.nodeTPM != "" {
		nodeSetup := devNodeSetup(filepath.Join(env.dir, "node"), stdout)
		setup = func(ctx context.Context, sv *services) error {
			if err := quorumSetup(ctx, sv); err != nil {
				return err
			}
			return nodeSetup(ctx, sv)
		}
	}
	err = serve(ctx, cfg, log, setup, func(addr string) error {
		if err := env.writeShellEnv(addr, o.nodeTPM); err != nil {
			return err
		}
		if err := announce(stdout)(addr); err != nil {
			return err
		}
		envFile := shellQuote(filepath.Join(env.shownDir, "env"))
		if _, err := fmt.Fprintf(stdout, "coffred dev: try: . %s && %s keyring create %s\n",
			envFile, binCommand("coffrectl"), devTryKeyring); err != nil {
			return err
		}
		if o.nodeTPM == "" {
			return nil
		}
		_, err := fmt.Fprintf(stdout, "coffred dev: try: . %s && %s datakey --keyring %s --context volume=v1 --out-wrapped %s\n",
			envFile, binCommand("coffre-agent"), devNodeKeyring, shellQuote(filepath.Join(env.shownDir, "demo-key.json")))
		return err
	})
	if err != nil {
		log.Error("coffred stopped", "err", err)
		return exitError
	}
	return exitOK
}

// prepareDev makes every missing part of the dev environment, keeps every
// part that exists, and returns the validated configuration to serve.
func prepareDev(ctx context.Context, o devOptions, stdout io.Writer, log *slog.Logger) (*devEnv, *Config, error) {
	abs, err := filepath.Abs(o.dir)
	if err != nil {
		return nil, nil, err
	}
	shown := filepath.Clean(o.dir)
	e := newDevEnv(abs, shown)
	say := func(format string, args ...any) {
		fmt.Fprintf(stdout, "coffred dev: "+format+"\n", args...)
	}
	if err := os.MkdirAll(filepath.Join(abs, "softhsm", "tokens"), 0o700); err != nil {
		return nil, nil, err
	}

	// SoftHSM reads SOFTHSM2_CONF when the module initialises; the dev
	// token lives in this directory, so this process must use its file.
	if !fileExists(e.softhsmConf) {
		conf := fmt.Sprintf("# Written by coffred dev.\ndirectories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
			filepath.Join(abs, "softhsm", "tokens"))
		if err := atomicfile.WriteFile(e.softhsmConf, []byte(conf), 0o600); err != nil {
			return nil, nil, err
		}
	}
	if prev, ok := os.LookupEnv("SOFTHSM2_CONF"); ok && prev != e.softhsmConf {
		log.Warn("SOFTHSM2_CONF names another file; coffred dev uses the one of its directory", "was", prev, "now", e.softhsmConf)
	}
	if err := os.Setenv("SOFTHSM2_CONF", e.softhsmConf); err != nil {
		return nil, nil, err
	}

	userPIN, newUser, err := ensurePIN(e.pinFile)
	if err != nil {
		return nil, nil, err
	}
	soPIN, newSO, err := ensurePIN(e.soPINFile)
	if err != nil {
		return nil, nil, err
	}
	tokens, err := os.ReadDir(filepath.Join(abs, "softhsm", "tokens"))
	if err != nil {
		return nil, nil, err
	}
	switch {
	case len(tokens) == 0:
		if err := pkcs11.InitToken(ctx, o.module, devToken, soPIN, userPIN); err != nil {
			return nil, nil, fmt.Errorf("initialise SoftHSM token %q: %w", devToken, err)
		}
		say("created SoftHSM token %q in %s", devToken, filepath.Join(abs, "softhsm", "tokens"))
	case newUser || newSO:
		// A new PIN for an existing token can never log in.
		return nil, nil, fmt.Errorf("%s holds a token but its PIN files were missing; remove %s to start over", filepath.Join(abs, "softhsm"), abs)
	}

	now := time.Now()
	ca, created, err := ensureCA(e.caFile, e.caKey, now)
	if err != nil {
		return nil, nil, err
	}
	if created {
		say("created a local CA in %s", e.caFile)
	}
	leaves := []leafSpec{
		{certFile: e.serverCert, keyFile: e.serverKey, commonName: "coffred dev server", usage: x509.ExtKeyUsageServerAuth,
			dnsNames: []string{"localhost"}, ips: []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}},
		{certFile: e.adminCert, keyFile: e.adminKey, commonName: "dev-admin", usage: x509.ExtKeyUsageClientAuth},
	}
	for _, l := range leaves {
		issued, err := ca.ensureLeaf(l, now)
		if err != nil {
			return nil, nil, err
		}
		if issued {
			say("issued %s (CN %s)", l.certFile, l.commonName)
		}
	}

	if err := ensureSignerKey(e.auditSigner, filepath.Join(e.dir, "audit-verifier.pub"), "coffre-dev", "the audit checkpoint signer", say); err != nil {
		return nil, nil, err
	}
	if err := ensureSignerKey(e.witnessKey, e.witnessKey+".pub", "witness.dev", "the dev witness's key (for coffrectl audit witness --witness-key)", say); err != nil {
		return nil, nil, err
	}
	if err := e.ensureAdminKey(say); err != nil {
		return nil, nil, err
	}
	if fileExists(e.configPath) && !hasSection(e.configPath, "audit") {
		// A dev directory from before the audit log: rewrite its
		// configuration, keeping its listen address.
		if old, err := loadRawListen(e.configPath); err == nil && o.listen == "" {
			o.listen = old
		}
		if err := os.Remove(e.configPath); err != nil {
			return nil, nil, err
		}
		say("upgrading %s: adding the audit section", e.configPath)
	}
	if !fileExists(e.configPath) {
		listen := o.listen
		if listen == "" {
			listen = defaultListen
		}
		data, err := e.config(listen, o.module)
		if err != nil {
			return nil, nil, err
		}
		if err := atomicfile.WriteFile(e.configPath, data, 0o600); err != nil {
			return nil, nil, err
		}
		say("wrote %s", e.configPath)
	}
	cfg, err := loadConfig(e.configPath)
	if err != nil {
		return nil, nil, err
	}
	if err := ensureRoot(ctx, cfg.HSM, say); err != nil {
		return nil, nil, err
	}
	return e, cfg, nil
}

// ensureRoot runs the root-key ceremony of the dev token if it has no root
// key yet. In production the ceremony is coffrectl's and needs a quorum; a
// dev token has one developer.
func ensureRoot(ctx context.Context, c HSMConfig, say func(string, ...any)) error {
	cfg := pkcs11.Config{URI: c.RootKey, Sessions: 1}
	root, err := pkcs11.Open(ctx, cfg)
	if errors.Is(err, hsm.ErrKeyNotFound) {
		root, err = pkcs11.CreateRoot(ctx, cfg)
		if err != nil {
			return fmt.Errorf("root-key ceremony: %w", err)
		}
		say("no root key in token %q: ran the root-key ceremony, created %s", devToken, root.ID())
	}
	if err != nil {
		return fmt.Errorf("open the root key: %w", err)
	}
	return root.Close()
}

// config returns the dev configuration file, in the documented format with
// absolute paths, so that it can be used by hand with --config.
func (e *devEnv) config(listen, module string) ([]byte, error) {
	rootKey := (&hsm.URI{
		Token:      devToken,
		Object:     devRootObject,
		ModulePath: module,
		PINSource:  "file:" + e.pinFile,
	}).String()
	// Structs rather than a map, so the file reads in the documented order.
	type tlsSection struct {
		CertFile            string `json:"cert_file"`
		KeyFile             string `json:"key_file"`
		AdminClientCAFile   string `json:"admin_client_ca_file"`
		AuditorClientCAFile string `json:"auditor_client_ca_file"`
	}
	type jsonlSection struct {
		Path string `json:"path"`
	}
	type auditSection struct {
		Dir           string       `json:"dir"`
		SignerKeyFile string       `json:"signer_key_file"`
		NodeID        string       `json:"node_id"`
		Origin        string       `json:"origin"`
		Witnesses     []string     `json:"witnesses"`
		JSONL         jsonlSection `json:"jsonl"`
	}
	type hsmSection struct {
		RootKey  string `json:"root_key"`
		Sessions int    `json:"sessions"`
	}
	type storeSection struct {
		Engine string `json:"engine"`
		Path   string `json:"path"`
	}
	type limitsSection struct {
		MaxMessageBytes int    `json:"max_message_bytes"`
		MaxCallTimeout  string `json:"max_call_timeout"`
		ShutdownGrace   string `json:"shutdown_grace"`
	}
	type logSection struct {
		Level string `json:"level"`
	}
	cfg := struct {
		Listen string        `json:"listen"`
		TLS    tlsSection    `json:"tls"`
		HSM    hsmSection    `json:"hsm"`
		Store  storeSection  `json:"store"`
		Limits limitsSection `json:"limits"`
		Audit  auditSection  `json:"audit"`
		Log    logSection    `json:"log"`
	}{
		Listen: listen,
		// One dev CA issues admin and auditor certificates alike; in
		// production each role has its own CA.
		TLS: tlsSection{CertFile: e.serverCert, KeyFile: e.serverKey, AdminClientCAFile: e.caFile, AuditorClientCAFile: e.caFile},
		Audit: auditSection{Dir: filepath.Join(e.dir, "audit"), SignerKeyFile: e.auditSigner, NodeID: "dev", Origin: "coffre-dev/dev",
			Witnesses: []string{e.witnessKey + ".pub"},
			JSONL:     jsonlSection{Path: filepath.Join(e.dir, "audit.jsonl")}},
		HSM:   hsmSection{RootKey: rootKey, Sessions: 4},
		Store: storeSection{Engine: "bbolt", Path: e.storePath},
		// A short grace: a developer's Ctrl-C should not wait long.
		Limits: limitsSection{MaxMessageBytes: 1 << 20, MaxCallTimeout: "30s", ShutdownGrace: "5s"},
		Log:    logSection{Level: "info"},
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false) // the URI's "&" stays readable
	enc.SetIndent("", "  ")
	if err := enc.Encode(cfg); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// writeShellEnv writes DIR/env, the variables coffrectl and coffre-agent
// read, with the address actually bound.
func (e *devEnv) writeShellEnv(addr, nodeTPM string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by coffred dev; load it with: . %s\n", shellQuote(e.envFile))
	fmt.Fprintf(&b, "export COFFRE_ADDR=%s COFFRE_CA=%s COFFRE_CERT=%s COFFRE_KEY=%s SOFTHSM2_CONF=%s\n",
		shellQuote(addr), shellQuote(e.caFile), shellQuote(e.adminCert), shellQuote(e.adminKey), shellQuote(e.softhsmConf))
	fmt.Fprintf(&b, "export COFFRE_AUDIT_DIR=%s COFFRE_AUDIT_VERIFIER=%s COFFRE_DEV_WITNESS_KEY=%s\n",
		shellQuote(filepath.Join(e.dir, "audit")), shellQuote(filepath.Join(e.dir, "audit-verifier.pub")), shellQuote(e.witnessKey))
	fmt.Fprintf(&b, "export COFFRE_ADMIN_KEY=%s COFFRE_ADMIN_PASSPHRASE_FILE=%s\n",
		shellQuote(e.adminSignKey), shellQuote(e.adminSignPass))
	if nodeTPM != "" {
		fmt.Fprintf(&b, "export COFFRE_TPM=%s\n", shellQuote(nodeTPM))
	}
	return atomicfile.WriteFile(e.envFile, []byte(b.String()), 0o644)
}

// ensurePIN returns the PIN stored in name, or makes a random one. It
// reports whether it made one.
func ensurePIN(name string) (string, bool, error) {
	if fileExists(name) {
		data, err := readLimited(name, 4096)
		if err != nil {
			return "", false, err
		}
		pin := strings.TrimSuffix(string(data), "\n")
		if pin == "" {
			return "", false, fmt.Errorf("%s is empty; remove the dev directory to start over", name)
		}
		return pin, false, nil
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", false, err
	}
	pin := hex.EncodeToString(b[:])
	if err := atomicfile.WriteFile(name, []byte(pin+"\n"), 0o600); err != nil {
		return "", false, err
	}
	return pin, true, nil
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	safe := s != ""
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("/._-:+,@%", c)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// binCommand is how the user should call one of Coffre's commands: the
// binary "make" builds if it is there, else whatever is on PATH.
func binCommand(name string) string {
	if fi, err := os.Stat(filepath.Join("bin", name)); err == nil && fi.Mode().IsRegular() {
		return "bin/" + name
	}
	return name
}

// ensureSignerKey makes a checkpoint signer key (Ed25519 + ML-DSA-65)
// named name at path, with its public key at pub, if there is none: the
// dev environment's audit signer, and a witness key that its log accepts
// cosignatures from. In production the node's key is made in a ceremony
// and held by its node alone, and each witness makes its own.
func ensureSignerKey(path, pub, name, what string, say func(string, ...any)) error {
	if fileExists(path) {
		if fileExists(pub) {
			return nil
		}
		data, err := readLimited(path, 1<<20)
		if err != nil {
			return err
		}
		s, err := audit.ParseSigner(data)
		clear(data)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return atomicfile.WriteFile(pub, s.Verifier().Marshal(), 0o644)
	}
	s, err := audit.GenerateSigner(name)
	if err != nil {
		return err
	}
	b, err := s.MarshalPrivate()
	if err != nil {
		return err
	}
	defer clear(b)
	if err := atomicfile.WriteFile(path, b, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(pub, s.Verifier().Marshal(), 0o644); err != nil {
		return err
	}
	say("made %s %s (public key %s)", what, path, pub)
	return nil
}

// hasSection reports whether the JSON object in path has a top-level key.
func hasSection(path, key string) bool {
	data, err := readLimited(path, maxConfigBytes)
	if err != nil {
		return true // let loadConfig report it
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(data, &m) != nil {
		return true
	}
	_, ok := m[key]
	return ok
}

func loadRawListen(path string) (string, error) {
	data, err := readLimited(path, maxConfigBytes)
	if err != nil {
		return "", err
	}
	var m struct {
		Listen string `json:"listen"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return "", err
	}
	return m.Listen, nil
}
