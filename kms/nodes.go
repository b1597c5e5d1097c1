package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"sort"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/kms/store"
)

// Where attested-release state lives in the store. Every value is a JSON
// record with a format version, checked on every read: the store is not
// trusted, so a record that breaks a rule is refused (treated as absent),
// never repaired or half-used.
const (
	ekRootPrefix   = "ekroots/"     // ekroots/<sha256 of the certificate DER>
	classPrefix    = "classes/"     // classes/<name>
	nodePrefix     = "nodes/"       // nodes/<name>
	nodeByEKPrefix = "nodes-by-ek/" // nodes-by-ek/<EK fingerprint> → node name
	policyPrefix   = "policies/"    // policies/<tenant>/<name>

	releaseRecordFormat = 1
)

// Limits of enrollment data.
const (
	// MaxLabels bounds the labels of a node and the required labels of a
	// policy.
	MaxLabels = 64
	// MaxLabelKeyLen and MaxLabelValueLen bound a label's key (bytes) and
	// value (characters).
	MaxLabelKeyLen   = 63
	MaxLabelValueLen = 256
	// maxEKCertSize and maxEKPublicSize bound what a caller may send as an
	// EK certificate or EK public key; real ones are a few hundred bytes.
	maxEKCertSize   = 16 << 10
	maxEKPublicSize = 4 << 10
	// maxPCRIndex is the highest PCR of a PC-client TPM.
	maxPCRIndex = 23
)

// EKRoot is one TPM manufacturer CA that EK certificates may chain to.
type EKRoot struct {
	// Fingerprint is the lowercase hex SHA-256 of the certificate's DER.
	Fingerprint string
	Subject     string
	NotAfter    time.Time
	Certificate *x509.Certificate
	AddTime     time.Time
}

// NodeClass names the reference values its nodes must match.
type NodeClass struct {
	Name string
	// PCRs are the SHA-256 bank reference values, by PCR index. A class has
	// at least one: a class without reference values would admit any boot
	// state.
	PCRs map[uint32][]byte
	// RequireEventLog demands a TCG event log that replays to the quoted
	// PCRs.
	RequireEventLog bool
	UpdateTime      time.Time
}

// PCRIndices returns the class's PCR indices in increasing order.
func (c *NodeClass) PCRIndices() []uint32 {
	out := make([]uint32, 0, len(c.PCRs))
	for i := range c.PCRs {
		out = append(out, i)
	}
	sort.Slice(out, func(a, b int) bool { return out[a] < out[b] })
	return out
}

// NodeState is an enrolled machine's state.
type NodeState int

// Node states.
const (
	NodeStateUnspecified NodeState = iota
	// NodeEnrolled nodes may attest.
	NodeEnrolled
	// NodeRevoked nodes are refused for good; their sessions ended when
	// they were revoked.
	NodeRevoked
)

var nodeStateNames = map[NodeState]string{NodeEnrolled: "enrolled", NodeRevoked: "revoked"}

// String returns the state's name as stored and printed.
func (s NodeState) String() string {
	if n, ok := nodeStateNames[s]; ok {
		return n
	}
	return fmt.Sprintf("NodeState(%d)", int(s))
}

func parseNodeState(s string) (NodeState, bool) {
	for k, v := range nodeStateNames {
		if v == s {
			return k, true
		}
	}
	return NodeStateUnspecified, false
}

// Node is an enrolled machine, identified by its TPM's endorsement key.
type Node struct {
	Name   string
	Class  string
	Labels map[string]string
	State  NodeState
	// EKFingerprint is the lowercase hex SHA-256 of the PKIX DER of the EK
	// public key: the node's identity.
	EKFingerprint string
	// EKCertificate (DER) is set when the node was enrolled by
	// certificate: every challenge then checks a certificate chain to the
	// EK roots again. EKPublic is set instead when the EK was pinned.
	EKCertificate []byte
	EKPublic      []byte
	EnrollTime    time.Time
	RevokeTime    time.Time
}

// Enrollment is a request to enroll a node: exactly one of EKCertificate
// (PEM or DER; must chain to an EK root now) and EKPublic (TPM2B_PUBLIC,
// TPMT_PUBLIC or PEM PKIX; pinned as is).
type Enrollment struct {
	Name          string
	Class         string
	Labels        map[string]string
	EKCertificate []byte
	EKPublic      []byte
}

// ValidateNodeName checks a node name: the rules of a keyring name.
func ValidateNodeName(name string) error { return validateName("node name", name) }

// ValidateClassName checks a node class name: the rules of a keyring name.
func ValidateClassName(name string) error { return validateName("class name", name) }

// ValidateLabels checks a set of labels: at most MaxLabels; keys of 1 to 63
// bytes of [a-z0-9_.-/]; values of at most 256 printable characters.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%w: %d labels, at most %d are allowed", ErrInvalidArgument, len(labels), MaxLabels)
	}
	for k, v := range labels {
		if err := validateLabel(k, v); err != nil {
			return err
		}
	}
	return nil
}

func validateLabel(k, v string) error {
	if k == "" || len(k) > MaxLabelKeyLen {
		return fmt.Errorf("%w: label key %.80q must be 1 to %d bytes", ErrInvalidArgument, k, MaxLabelKeyLen)
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '_', c == '.', c == '-', c == '/':
		default:
			return fmt.Errorf("%w: label key %q: character %q at %d is not allowed (lowercase letters, digits, '_', '.', '-' and '/')",
				ErrInvalidArgument, k, c, i)
		}
	}
	if !utf8.ValidString(v) {
		return fmt.Errorf("%w: label %s: value is not valid UTF-8", ErrInvalidArgument, k)
	}
	if n := utf8.RuneCountInString(v); n > MaxLabelValueLen {
		return fmt.Errorf("%w: label %s: value of %d characters, at most %d are allowed", ErrInvalidArgument, k, n, MaxLabelValueLen)
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("%w: label %s: value holds the unprintable character %U", ErrInvalidArgument, k, r)
		}
	}
	return nil
}

// validatePCRs checks a class's reference values.
func validatePCRs(pcrs map[uint32][]byte) error {
	if len(pcrs) == 0 {
		return fmt.Errorf("%w: a class needs at least one PCR reference value (without one it would admit any boot state)", ErrInvalidArgument)
	}
	for i, v := range pcrs {
		if i > maxPCRIndex {
			return fmt.Errorf("%w: PCR %d does not exist (0 to %d)", ErrInvalidArgument, i, maxPCRIndex)
		}
		if len(v) != sha256.Size {
			return fmt.Errorf("%w: PCR %d reference value is %d bytes, a SHA-256 value is %d", ErrInvalidArgument, i, len(v), sha256.Size)
		}
	}
	return nil
}

func copyLabels(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func copyPCRs(m map[uint32][]byte) map[uint32][]byte {
	out := make(map[uint32][]byte, len(m))
	for k, v := range m {
		out[k] = bytes.Clone(v)
	}
	return out
}

// pemOrDER returns the DER of a PEM block of type want, or b itself when b
// is not PEM.
func pemOrDER(b []byte, want string) ([]byte, error) {
	trimmed := bytes.TrimSpace(b)
	if !bytes.HasPrefix(trimmed, []byte("-----BEGIN")) {
		return b, nil
	}
	blk, rest := pem.Decode(trimmed)
	if blk == nil {
		return nil, fmt.Errorf("%w: malformed PEM", ErrInvalidArgument)
	}
	if blk.Type != want {
		return nil, fmt.Errorf("%w: PEM block %q, want %q", ErrInvalidArgument, blk.Type, want)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: more than one PEM block", ErrInvalidArgument)
	}
	return blk.Bytes, nil
}

// ekFingerprint returns the project-wide EK fingerprint of pub: lowercase
// hex SHA-256 of its PKIX DER (the same as attest.EK.Fingerprint).
func ekFingerprint(pub any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("%w: EK public key: %v", ErrInvalidArgument, err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// parsePinnedEK parses a pinned EK public key: TPM2B_PUBLIC, TPMT_PUBLIC
// or PKIX (DER or PEM), with attest's EK key rules.
func parsePinnedEK(b []byte) (*attest.EK, error) {
	if len(b) == 0 || len(b) > maxEKPublicSize {
		return nil, fmt.Errorf("%w: EK public key of %d bytes", ErrInvalidArgument, len(b))
	}
	ek, err := attest.ParseEKPublic(b)
	if err != nil {
		return nil, fmt.Errorf("%w: EK public key: %w", ErrInvalidArgument, err)
	}
	return ek, nil
}

// ---- stored records ----

type ekRootRecord struct {
	Format      int       `json:"format"`
	Certificate string    `json:"certificate"` // PEM
	AddTime     time.Time `json:"add_time"`
}

func decodeEKRoot(key string, b []byte) (*EKRoot, error) {
	var r ekRootRecord
	if err := strictJSON(b, &r); err != nil {
		return nil, fmt.Errorf("kms: stored EK root %s: %v", key, err)
	}
	if r.Format != releaseRecordFormat {
		return nil, fmt.Errorf("kms: stored EK root %s: format %d, this server reads %d", key, r.Format, releaseRecordFormat)
	}
	blk, rest := pem.Decode([]byte(r.Certificate))
	if blk == nil || blk.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("kms: stored EK root %s: not one PEM certificate", key)
	}
	root, err := newEKRoot(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("kms: stored EK root %s: %v", key, err)
	}
	if ekRootPrefix+root.Fingerprint != key {
		return nil, fmt.Errorf("kms: stored EK root %s holds certificate %s", key, root.Fingerprint)
	}
	root.AddTime = r.AddTime
	return root, nil
}

func newEKRoot(der []byte) (*EKRoot, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: EK root certificate: %v", ErrInvalidArgument, err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("%w: EK root certificate %q is not a CA certificate", ErrInvalidArgument, cert.Subject)
	}
	sum := sha256.Sum256(cert.Raw)
	return &EKRoot{
		Fingerprint: hex.EncodeToString(sum[:]),
		Subject:     cert.Subject.String(),
		NotAfter:    cert.NotAfter,
		Certificate: cert,
	}, nil
}

type pcrRecord struct {
	Index  uint32 `json:"index"`
	SHA256 []byte `json:"sha256"`
}

type classRecord struct {
	Format          int         `json:"format"`
	Name            string      `json:"name"`
	PCRs            []pcrRecord `json:"pcrs"`
	RequireEventLog bool        `json:"require_event_log"`
	UpdateTime      time.Time   `json:"update_time"`
}

func encodeClass(c *NodeClass) []byte {
	r := classRecord{Format: releaseRecordFormat, Name: c.Name, RequireEventLog: c.RequireEventLog, UpdateTime: c.UpdateTime}
	for _, i := range c.PCRIndices() {
		r.PCRs = append(r.PCRs, pcrRecord{Index: i, SHA256: c.PCRs[i]})
	}
	return mustJSON(r)
}

func decodeClass(key string, b []byte) (*NodeClass, error) {
	var r classRecord
	if err := strictJSON(b, &r); err != nil {
		return nil, fmt.Errorf("kms: stored class %s: %v", key, err)
	}
	if r.Format != releaseRecordFormat {
		return nil, fmt.Errorf("kms: stored class %s: format %d, this server reads %d", key, r.Format, releaseRecordFormat)
	}
	if err := ValidateClassName(r.Name); err != nil || classPrefix+r.Name != key {
		return nil, fmt.Errorf("kms: stored class %s names %q", key, r.Name)
	}
	c := &NodeClass{Name: r.Name, PCRs: make(map[uint32][]byte, len(r.PCRs)), RequireEventLog: r.RequireEventLog, UpdateTime: r.UpdateTime}
	for _, p := range r.PCRs {
		if _, dup := c.PCRs[p.Index]; dup {
			return nil, fmt.Errorf("kms: stored class %s: PCR %d twice", key, p.Index)
		}
		c.PCRs[p.Index] = p.SHA256
	}
	if err := validatePCRs(c.PCRs); err != nil {
		return nil, fmt.Errorf("kms: stored class %s: %v", key, err)
	}
	return c, nil
}

func sameClass(a, b *NodeClass) bool {
	if a.Name != b.Name || a.RequireEventLog != b.RequireEventLog || len(a.PCRs) != len(b.PCRs) {
		return false
	}
	for i, v := range a.PCRs {
		if w, ok := b.PCRs[i]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

type nodeRecord struct {
	Format        int               `json:"format"`
	Name          string            `json:"name"`
	Class         string            `json:"class"`
	Labels        map[string]string `json:"labels"`
	State         string            `json:"state"`
	EKFingerprint string            `json:"ek_fingerprint"`
	EKCertificate []byte            `json:"ek_certificate,omitempty"` // DER
	EKPublic      []byte            `json:"ek_public,omitempty"`
	EnrollTime    time.Time         `json:"enroll_time"`
	RevokeTime    time.Time         `json:"revoke_time,omitzero"`
}

func encodeNode(n *Node) []byte {
	return mustJSON(nodeRecord{
		Format:        releaseRecordFormat,
		Name:          n.Name,
		Class:         n.Class,
		Labels:        n.Labels,
		State:         n.State.String(),
		EKFingerprint: n.EKFingerprint,
		EKCertificate: n.EKCertificate,
		EKPublic:      n.EKPublic,
		EnrollTime:    n.EnrollTime,
		RevokeTime:    n.RevokeTime,
	})
}

// decodeNode parses a stored node and checks it: the EK it holds must parse
// and have the fingerprint it claims, so that a store attacker cannot pair
// an enrolled name with another TPM.
func decodeNode(key string, b []byte) (*Node, error) {
	var r nodeRecord
	if err := strictJSON(b, &r); err != nil {
		return nil, fmt.Errorf("kms: stored node %s: %v", key, err)
	}
	if r.Format != releaseRecordFormat {
		return nil, fmt.Errorf("kms: stored node %s: format %d, this server reads %d", key, r.Format, releaseRecordFormat)
	}
	if err := ValidateNodeName(r.Name); err != nil || nodePrefix+r.Name != key {
		return nil, fmt.Errorf("kms: stored node %s names %q", key, r.Name)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("kms: stored node %s: %s", key, fmt.Sprintf(format, args...))
	}
	if err := ValidateClassName(r.Class); err != nil {
		return nil, bad("%v", err)
	}
	if err := ValidateLabels(r.Labels); err != nil {
		return nil, bad("%v", err)
	}
	st, ok := parseNodeState(r.State)
	if !ok {
		return nil, bad("unknown state %q", r.State)
	}
	if (len(r.EKCertificate) == 0) == (len(r.EKPublic) == 0) {
		return nil, bad("holds %s", map[bool]string{true: "no EK", false: "both an EK certificate and a pinned EK"}[len(r.EKCertificate) == 0])
	}
	var fp string
	if len(r.EKCertificate) > 0 {
		cert, err := attest.ParseEKCertificate(r.EKCertificate)
		if err != nil {
			return nil, bad("EK certificate: %v", err)
		}
		if fp, err = ekFingerprint(cert.PublicKey); err != nil {
			return nil, bad("%v", err)
		}
	} else {
		ek, err := parsePinnedEK(r.EKPublic)
		if err != nil {
			return nil, bad("%v", err)
		}
		fp = ek.Fingerprint
	}
	if fp != r.EKFingerprint {
		return nil, bad("claims EK %s but holds EK %s", r.EKFingerprint, fp)
	}
	if r.Labels == nil {
		r.Labels = map[string]string{}
	}
	return &Node{
		Name:          r.Name,
		Class:         r.Class,
		Labels:        r.Labels,
		State:         st,
		EKFingerprint: r.EKFingerprint,
		EKCertificate: r.EKCertificate,
		EKPublic:      r.EKPublic,
		EnrollTime:    r.EnrollTime,
		RevokeTime:    r.RevokeTime,
	}, nil
}

type nodeIndexRecord struct {
	Format int    `json:"format"`
	Node   string `json:"node"`
}

func decodeNodeIndex(key string, b []byte) (string, error) {
	var r nodeIndexRecord
	if err := strictJSON(b, &r); err != nil {
		return "", fmt.Errorf("kms: stored EK index %s: %v", key, err)
	}
	if r.Format != releaseRecordFormat || ValidateNodeName(r.Node) != nil {
		return "", fmt.Errorf("kms: stored EK index %s is malformed", key)
	}
	return r.Node, nil
}

// strictJSON decodes one JSON value, refusing unknown fields and trailing
// data: a record this server does not fully understand is not used.
func strictJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the record")
	}
	return nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only plain types: cannot fail
	}
	return b
}

// ---- admin operations ----

// AddEKRoot adds a TPM manufacturer CA certificate (PEM or DER) to the
// pool EK certificates must chain to. Adding a certificate that is there
// already returns it unchanged.
func (r *ReleaseService) AddEKRoot(ctx context.Context, cert []byte) (*EKRoot, error) {
	if len(cert) == 0 || len(cert) > maxEKCertSize {
		return nil, fmt.Errorf("%w: EK root certificate of %d bytes", ErrInvalidArgument, len(cert))
	}
	der, err := pemOrDER(cert, "CERTIFICATE")
	if err != nil {
		return nil, fmt.Errorf("EK root certificate: %w", err)
	}
	root, err := newEKRoot(der)
	if err != nil {
		return nil, err
	}
	now := r.now()
	if now.After(root.NotAfter) {
		return nil, fmt.Errorf("%w: EK root certificate %q expired on %s", ErrInvalidArgument, root.Subject, root.NotAfter.UTC().Format(time.RFC3339))
	}
	root.AddTime = now.UTC()
	key := ekRootPrefix + root.Fingerprint
	val := mustJSON(ekRootRecord{
		Format:      releaseRecordFormat,
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Certificate.Raw})),
		AddTime:     root.AddTime,
	})
	rev, err := r.store.CompareAndSwap(ctx, key, 0, val)
	if errors.Is(err, store.ErrConflict) {
		kv, gerr := r.store.Get(ctx, key)
		if gerr != nil {
			return nil, storeErr(gerr)
		}
		return decodeEKRoot(key, kv.Value)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	r.observeLocal(key, val, rev)
	return root, nil
}

// ListEKRoots lists the EK root pool, ordered by subject.
func (r *ReleaseService) ListEKRoots(ctx context.Context) ([]*EKRoot, error) {
	kvs, err := r.store.List(ctx, ekRootPrefix)
	if err != nil {
		return nil, storeErr(err)
	}
	out := make([]*EKRoot, 0, len(kvs))
	for _, kv := range kvs {
		root, err := decodeEKRoot(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, root)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Subject != out[j].Subject {
			return out[i].Subject < out[j].Subject
		}
		return out[i].Fingerprint < out[j].Fingerprint
	})
	return out, nil
}

// ekRootPool reads the EK roots from the store, for enrollment: an admin
// operation sees the store as it is, not the cache.
func (r *ReleaseService) ekRootPool(ctx context.Context) (*x509.CertPool, error) {
	roots, err := r.ListEKRoots(ctx)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, root := range roots {
		pool.AddCert(root.Certificate)
	}
	return pool, nil
}

// SetNodeClass creates or replaces a node class. Replacing a class's
// reference values ends the sessions of its nodes at once: they attested
// against values that are no longer known-good.
func (r *ReleaseService) SetNodeClass(ctx context.Context, c *NodeClass) (*NodeClass, error) {
	if c == nil {
		return nil, fmt.Errorf("%w: class is missing", ErrInvalidArgument)
	}
	if err := ValidateClassName(c.Name); err != nil {
		return nil, err
	}
	if err := validatePCRs(c.PCRs); err != nil {
		return nil, fmt.Errorf("class %s: %w", c.Name, err)
	}
	nc := &NodeClass{Name: c.Name, PCRs: copyPCRs(c.PCRs), RequireEventLog: c.RequireEventLog, UpdateTime: r.now().UTC()}
	key := classPrefix + nc.Name
	val := encodeClass(nc)
	rev, err := r.store.Put(ctx, key, val)
	if err != nil {
		return nil, storeErr(err)
	}
	r.observeLocal(key, val, rev)
	return nc, nil
}

// GetNodeClass returns class name, read from the store.
func (r *ReleaseService) GetNodeClass(ctx context.Context, name string) (*NodeClass, error) {
	if err := ValidateClassName(name); err != nil {
		return nil, err
	}
	key := classPrefix + name
	kv, err := r.store.Get(ctx, key)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: class %s", ErrNotFound, name)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	return decodeClass(key, kv.Value)
}

// ListNodeClasses lists every class, ordered by name.
func (r *ReleaseService) ListNodeClasses(ctx context.Context) ([]*NodeClass, error) {
	kvs, err := r.store.List(ctx, classPrefix)
	if err != nil {
		return nil, storeErr(err)
	}
	out := make([]*NodeClass, 0, len(kvs))
	for _, kv := range kvs {
		c, err := decodeClass(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// EnrollNode enrolls a machine by its EK certificate, which must chain to
// the EK roots now, or by a pinned EK public key. The node's name and its
// EK must both be new: an EK enrolled once (even if later revoked) cannot
// be enrolled again under another name.
//
// The store has no multi-key transaction, so enrollment writes the EK index
// (nodes-by-ek/FINGERPRINT) first, with compare-and-swap, then the node. A
// crash in between leaves an index entry without its node; every reader
// checks the node it points to, and the next enrollment of that EK repairs
// it.
func (r *ReleaseService) EnrollNode(ctx context.Context, e *Enrollment) (*Node, error) {
	if e == nil {
		return nil, fmt.Errorf("%w: enrollment is missing", ErrInvalidArgument)
	}
	if err := ValidateNodeName(e.Name); err != nil {
		return nil, err
	}
	if err := ValidateClassName(e.Class); err != nil {
		return nil, err
	}
	if err := ValidateLabels(e.Labels); err != nil {
		return nil, err
	}
	if _, err := r.GetNodeClass(ctx, e.Class); errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: class %s does not exist; set it first", ErrFailedPrecondition, e.Class)
	} else if err != nil {
		return nil, err
	}
	now := r.now()
	n := &Node{Name: e.Name, Class: e.Class, Labels: copyLabels(e.Labels), State: NodeEnrolled, EnrollTime: now.UTC()}
	switch {
	case len(e.EKCertificate) > 0 && len(e.EKPublic) > 0:
		return nil, fmt.Errorf("%w: give an EK certificate or a pinned EK public key, not both", ErrInvalidArgument)
	case len(e.EKCertificate) > 0:
		if len(e.EKCertificate) > maxEKCertSize {
			return nil, fmt.Errorf("%w: EK certificate of %d bytes", ErrInvalidArgument, len(e.EKCertificate))
		}
		der, err := pemOrDER(e.EKCertificate, "CERTIFICATE")
		if err != nil {
			return nil, fmt.Errorf("EK certificate: %w", err)
		}
		pool, err := r.ekRootPool(ctx)
		if err != nil {
			return nil, err
		}
		ek, err := attest.VerifyEKCertificate(der, pool, nil, now)
		if err != nil {
			return nil, fmt.Errorf("%w: EK certificate: %w", ErrInvalidArgument, err)
		}
		n.EKFingerprint, n.EKCertificate = ek.Fingerprint, bytes.Clone(der)
	case len(e.EKPublic) > 0:
		ek, err := parsePinnedEK(e.EKPublic)
		if err != nil {
			return nil, err
		}
		n.EKFingerprint, n.EKPublic = ek.Fingerprint, bytes.Clone(e.EKPublic)
	default:
		return nil, fmt.Errorf("%w: an EK certificate or a pinned EK public key is required", ErrInvalidArgument)
	}

	nodeKey := nodePrefix + n.Name
	if _, err := r.store.Get(ctx, nodeKey); err == nil {
		return nil, fmt.Errorf("%w: node %s", ErrExists, n.Name)
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, storeErr(err)
	}
	idxKey := nodeByEKPrefix + n.EKFingerprint
	idxRev, err := r.claimEKIndex(ctx, idxKey, n)
	if err != nil {
		return nil, err
	}
	val := encodeNode(n)
	rev, err := r.store.CompareAndSwap(ctx, nodeKey, 0, val)
	if err != nil {
		// Give the EK back; if that fails too, the dangling index is
		// harmless and repaired by the next enrollment.
		_ = r.store.Delete(ctx, idxKey, idxRev) // #nosec G104 -- best effort, see above
		if errors.Is(err, store.ErrConflict) {
			return nil, fmt.Errorf("%w: node %s", ErrExists, n.Name)
		}
		return nil, storeErr(err)
	}
	r.observeLocal(nodeKey, val, rev)
	return n, nil
}

// claimEKIndex points the EK index of n at n, unless it already points at
// an existing node with that EK.
func (r *ReleaseService) claimEKIndex(ctx context.Context, idxKey string, n *Node) (int64, error) {
	val := mustJSON(nodeIndexRecord{Format: releaseRecordFormat, Node: n.Name})
	for range maxCASAttempts {
		rev, err := r.store.CompareAndSwap(ctx, idxKey, 0, val)
		if err == nil {
			return rev, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return 0, storeErr(err)
		}
		kv, err := r.store.Get(ctx, idxKey)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return 0, storeErr(err)
		}
		if owner, derr := decodeNodeIndex(idxKey, kv.Value); derr == nil {
			nkv, err := r.store.Get(ctx, nodePrefix+owner)
			switch {
			case err == nil:
				if other, derr := decodeNode(nodePrefix+owner, nkv.Value); derr == nil && other.EKFingerprint == n.EKFingerprint {
					return 0, fmt.Errorf("%w: EK %s is enrolled already, as node %s (%s)", ErrExists, n.EKFingerprint, owner, other.State)
				}
			case !errors.Is(err, store.ErrNotFound):
				return 0, storeErr(err)
			}
		}
		// A dangling or unreadable index entry: take it over.
		rev, err = r.store.CompareAndSwap(ctx, idxKey, kv.Revision, val)
		if err == nil {
			return rev, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return 0, storeErr(err)
		}
	}
	return 0, fmt.Errorf("%w: EK index %s changed %d times during enrollment; try again", ErrUnavailable, idxKey, maxCASAttempts)
}

// RevokeNode revokes node name for good: its sessions end at once, here
// and (through the store watch) on every other Coffre node within about a
// second, and its EK is refused from then on. Revoking a revoked node
// returns it unchanged.
func (r *ReleaseService) RevokeNode(ctx context.Context, name string) (*Node, error) {
	if err := ValidateNodeName(name); err != nil {
		return nil, err
	}
	key := nodePrefix + name
	for range maxCASAttempts {
		kv, err := r.store.Get(ctx, key)
		if errors.Is(err, store.ErrNotFound) {
			return nil, fmt.Errorf("%w: node %s", ErrNotFound, name)
		}
		if err != nil {
			return nil, storeErr(err)
		}
		n, err := decodeNode(key, kv.Value)
		if err != nil {
			return nil, err
		}
		if n.State == NodeRevoked {
			r.endNodeSessions(name, "node "+name+" was revoked")
			return n, nil
		}
		n.State, n.RevokeTime = NodeRevoked, r.now().UTC()
		val := encodeNode(n)
		rev, err := r.store.CompareAndSwap(ctx, key, kv.Revision, val)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, storeErr(err)
		}
		r.observeLocal(key, val, rev)
		return n, nil
	}
	return nil, fmt.Errorf("%w: node %s changed %d times during revocation; try again", ErrUnavailable, name, maxCASAttempts)
}

// GetNode returns node name, read from the store.
func (r *ReleaseService) GetNode(ctx context.Context, name string) (*Node, error) {
	if err := ValidateNodeName(name); err != nil {
		return nil, err
	}
	key := nodePrefix + name
	kv, err := r.store.Get(ctx, key)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: node %s", ErrNotFound, name)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	return decodeNode(key, kv.Value)
}

// ListNodes lists every node, enrolled and revoked, ordered by name.
func (r *ReleaseService) ListNodes(ctx context.Context) ([]*Node, error) {
	kvs, err := r.store.List(ctx, nodePrefix)
	if err != nil {
		return nil, storeErr(err)
	}
	out := make([]*Node, 0, len(kvs))
	for _, kv := range kvs {
		n, err := decodeNode(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}
