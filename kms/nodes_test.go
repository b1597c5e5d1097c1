package kms

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/attesttest"
)

func TestValidateLabels(t *testing.T) {
	ok := []map[string]string{
		nil,
		{"jurisdiction": "ca-qc", "site": "Montréal 1", "k8s.io/zone": "a_b-c"},
		{strings.Repeat("a", 63): strings.Repeat("é", 256)},
		{"empty": ""},
	}
	for _, l := range ok {
		if err := ValidateLabels(l); err != nil {
			t.Errorf("ValidateLabels(%v): %v", l, err)
		}
	}
	many := map[string]string{}
	for i := range MaxLabels + 1 {
		many[strings.Repeat("k", 1+i%60)+string(rune('a'+i%26))+string(rune('a'+i/26))] = "v"
	}
	for _, tc := range []struct {
		labels map[string]string
		want   string
	}{
		{map[string]string{"": "v"}, "must be 1 to 63 bytes"},
		{map[string]string{strings.Repeat("a", 64): "v"}, "must be 1 to 63 bytes"},
		{map[string]string{"Site": "v"}, `character 'S' at 0`},
		{map[string]string{"si te": "v"}, `character ' ' at 2`},
		{map[string]string{"site": strings.Repeat("x", 257)}, "257 characters"},
		{map[string]string{"site": "a\nb"}, "unprintable"},
		{map[string]string{"site": "\xff"}, "UTF-8"},
		{many, "at most 64"},
	} {
		err := ValidateLabels(tc.labels)
		if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ValidateLabels(%.60v) = %v, want %q", tc.labels, err, tc.want)
		}
	}
}

func TestNodeClasses(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	c, err := f.rel.SetNodeClass(ctx, &NodeClass{Name: "storage", PCRs: map[uint32][]byte{7: pcr7[:], 0: pcr7[:]}, RequireEventLog: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.PCRIndices(); len(got) != 2 || got[0] != 0 || got[1] != 7 {
		t.Fatalf("PCRIndices %v", got)
	}
	got, err := f.rel.GetNodeClass(ctx, "storage")
	if err != nil || !sameClass(got, c) || !got.RequireEventLog {
		t.Fatalf("get: %+v, %v", got, err)
	}
	if _, err := f.rel.GetNodeClass(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v", err)
	}
	for _, tc := range []struct {
		c    *NodeClass
		want string
	}{
		{nil, "class is missing"},
		{&NodeClass{Name: "Bad", PCRs: map[uint32][]byte{7: pcr7[:]}}, "class name"},
		{&NodeClass{Name: "c"}, "at least one PCR"},
		{&NodeClass{Name: "c", PCRs: map[uint32][]byte{24: pcr7[:]}}, "PCR 24 does not exist"},
		{&NodeClass{Name: "c", PCRs: map[uint32][]byte{7: pcr7[:20]}}, "20 bytes"},
	} {
		_, err := f.rel.SetNodeClass(ctx, tc.c)
		wantErr(t, err, ErrInvalidArgument, tc.want)
	}
	all, err := f.rel.ListNodeClasses(ctx)
	if err != nil || len(all) != 1 {
		t.Fatalf("list: %v, %v", all, err)
	}
}

func TestEnrollPinned(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	ek, fp := pinnedEK(t)
	labels := map[string]string{"jurisdiction": "ca-qc"}
	_, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", Labels: labels, EKPublic: ek})
	wantErr(t, err, ErrFailedPrecondition, "class storage does not exist")
	if _, err := f.rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	n, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", Labels: labels, EKPublic: ek})
	if err != nil {
		t.Fatal(err)
	}
	if n.EKFingerprint != fp || n.State != NodeEnrolled || n.Labels["jurisdiction"] != "ca-qc" || n.EnrollTime.IsZero() {
		t.Fatalf("enrolled %+v", n)
	}
	_, err = f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", EKPublic: func() []byte { b, _ := pinnedEK(t); return b }()})
	wantErr(t, err, ErrExists, "node node-1")
	_, err = f.rel.EnrollNode(ctx, &Enrollment{Name: "node-2", Class: "storage", EKPublic: ek})
	wantErr(t, err, ErrExists, "is enrolled already, as node node-1")
	// Refused requests.
	for _, tc := range []struct {
		e    *Enrollment
		want string
	}{
		{nil, "enrollment is missing"},
		{&Enrollment{Name: "Node", Class: "storage", EKPublic: ek}, "node name"},
		{&Enrollment{Name: "n", Class: "storage", Labels: map[string]string{"A": "b"}, EKPublic: ek}, "label key"},
		{&Enrollment{Name: "n", Class: "storage"}, "an EK certificate or a pinned EK public key is required"},
		{&Enrollment{Name: "n", Class: "storage", EKPublic: ek, EKCertificate: []byte("x")}, "not both"},
		{&Enrollment{Name: "n", Class: "storage", EKPublic: []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")}, "EK public key"},
	} {
		_, err := f.rel.EnrollNode(ctx, tc.e)
		wantErr(t, err, ErrInvalidArgument, tc.want)
	}
	// A P-224 key is no EK.
	k, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	_, err = f.rel.EnrollNode(ctx, &Enrollment{Name: "n", Class: "storage", EKPublic: pemPKIX(t, k.Public())})
	wantErr(t, err, ErrInvalidArgument, "EK")

	nodes, err := f.rel.ListNodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].Name != "node-1" {
		t.Fatalf("list: %v, %v", nodes, err)
	}
	got, err := f.rel.GetNode(ctx, "node-1")
	if err != nil || got.EKFingerprint != fp {
		t.Fatalf("get: %+v, %v", got, err)
	}
	// The cache knows the node by its EK.
	f.rel.mu.RLock()
	names := f.rel.byEK[fp]
	f.rel.mu.RUnlock()
	if len(names) != 1 || names[0] != "node-1" {
		t.Fatalf("byEK %v", names)
	}
}

func pemPKIX(t testing.TB, pub any) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func TestEKRootsAndEnrollByCertificate(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	ca := attesttest.NewEKCA(t)
	root, err := f.rel.AddEKRoot(ctx, ca.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(ca.Certificate().Raw)
	if root.Subject != ca.Certificate().Subject.String() || root.Fingerprint != hex.EncodeToString(sum[:]) || root.NotAfter.IsZero() {
		t.Fatalf("root %+v", root)
	}
	// DER of the same certificate: the same root, once.
	if again, err := f.rel.AddEKRoot(ctx, ca.Certificate().Raw); err != nil || again.Fingerprint != root.Fingerprint {
		t.Fatalf("re-add: %+v, %v", again, err)
	}
	roots, err := f.rel.ListEKRoots(ctx)
	if err != nil || len(roots) != 1 {
		t.Fatalf("list: %v, %v", roots, err)
	}
	// Refused roots.
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := ca.IssueEKCert(t, leafKey.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	_, err = f.rel.AddEKRoot(ctx, leaf)
	wantErr(t, err, ErrInvalidArgument, "not a CA certificate")
	old := newTestEKCA(t, "Old CA", time.Now().Add(-time.Minute))
	_, err = f.rel.AddEKRoot(ctx, old.pem())
	wantErr(t, err, ErrInvalidArgument, "expired")
	_, err = f.rel.AddEKRoot(ctx, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	wantErr(t, err, ErrInvalidArgument, "EK root certificate")

	if _, err := f.rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert := ca.IssueEKCert(t, ekKey.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	n, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", EKCertificate: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert})})
	if err != nil {
		t.Fatal(err)
	}
	fp, _ := ekFingerprint(ekKey.Public())
	if n.EKFingerprint != fp || len(n.EKCertificate) == 0 || len(n.EKPublic) != 0 {
		t.Fatalf("enrolled %+v", n)
	}
	// A certificate from another CA does not chain.
	rogue := attesttest.NewEKCA(t)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, err = f.rel.EnrollNode(ctx, &Enrollment{Name: "node-2", Class: "storage", EKCertificate: rogue.IssueEKCert(t, other.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))})
	wantErr(t, err, attest.ErrEK, "does not chain")
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("rogue certificate: %v, want ErrInvalidArgument", err)
	}
}

func TestEKIndexRepair(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	if _, err := f.rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	ek, fp := pinnedEK(t)
	// A crash between the index write and the node write left this.
	if _, err := f.store.Put(ctx, nodeByEKPrefix+fp, mustJSON(nodeIndexRecord{Format: releaseRecordFormat, Node: "ghost"})); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", EKPublic: ek}); err != nil {
		t.Fatalf("enroll over a dangling index: %v", err)
	}
	kv, err := f.store.Get(ctx, nodeByEKPrefix+fp)
	if err != nil {
		t.Fatal(err)
	}
	if name, err := decodeNodeIndex(kv.Key, kv.Value); err != nil || name != "node-1" {
		t.Fatalf("index now %q, %v", name, err)
	}
	// A failed node write gives the index back.
	ek2, fp2 := pinnedEK(t)
	_, err = f.rel.EnrollNode(ctx, &Enrollment{Name: "node-1", Class: "storage", EKPublic: ek2})
	wantErr(t, err, ErrExists, "node node-1")
	if _, err := f.store.Get(ctx, nodeByEKPrefix+fp2); err == nil {
		t.Fatal("the index of a refused enrollment stayed")
	}
}

// TestTamperedReleaseRecords: the store is not trusted. Records that break
// a rule are refused on read and count as absent in the cache.
func TestTamperedReleaseRecords(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	n := f.enroll(t, "node-1", "storage", nil)
	kv, err := f.store.Get(ctx, nodePrefix+"node-1")
	if err != nil {
		t.Fatal(err)
	}
	// Another EK fingerprint for the same pinned key: a store attacker
	// pairing the name with their own TPM.
	_, otherFP := pinnedEK(t)
	tampered := strings.Replace(string(kv.Value), n.EKFingerprint, otherFP, 1)
	if _, err := f.store.Put(ctx, nodePrefix+"node-1", []byte(tampered)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		f.rel.mu.RLock()
		defer f.rel.mu.RUnlock()
		_, ok := f.rel.nodes["node-1"]
		return !ok
	})
	if _, err := f.rel.GetNode(ctx, "node-1"); err == nil || !strings.Contains(err.Error(), "claims EK") {
		t.Fatalf("get tampered: %v", err)
	}
	for _, tc := range []struct{ key, val string }{
		{classPrefix + "x", `{"format":1,"name":"y","pcrs":[{"index":7,"sha256":"` + b64(pcr7[:]) + `"}]}`},
		{classPrefix + "x", `{"format":2,"name":"x","pcrs":[{"index":7,"sha256":"` + b64(pcr7[:]) + `"}]}`},
		{classPrefix + "x", `{"format":1,"name":"x","pcrs":[]}`},
		{classPrefix + "x", `{"format":1,"name":"x","pcrs":[{"index":7,"sha256":"` + b64(pcr7[:]) + `"},{"index":7,"sha256":"` + b64(pcr7[:]) + `"}]}`},
		{classPrefix + "x", `{"format":1,"name":"x","extra":1,"pcrs":[{"index":7,"sha256":"` + b64(pcr7[:]) + `"}]}`},
		{policyPrefix + "acme/disks", `{"format":1,"tenant":"acme","name":"disks","allowed_classes":["x"],"release":"clear"}`},
		{policyPrefix + "acme/disks", `{"format":1,"tenant":"other","name":"disks","allowed_classes":["x"],"release":"hpke"}`},
		{ekRootPrefix + "00", `{"format":1,"certificate":"junk"}`},
	} {
		var err error
		switch {
		case strings.HasPrefix(tc.key, classPrefix):
			_, err = decodeClass(tc.key, []byte(tc.val))
		case strings.HasPrefix(tc.key, policyPrefix):
			_, err = decodePolicy(tc.key, []byte(tc.val))
		default:
			_, err = decodeEKRoot(tc.key, []byte(tc.val))
		}
		if err == nil {
			t.Errorf("decode %s %s: accepted", tc.key, tc.val)
		}
	}
	// And a refused class is absent from the cache.
	if _, err := f.store.Put(ctx, classPrefix+"storage", []byte(`{"format":1,"name":"storage","pcrs":[]}`)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		f.rel.mu.RLock()
		defer f.rel.mu.RUnlock()
		_, ok := f.rel.classes["storage"]
		return !ok
	})
}

func TestUnsyncedStateRefuses(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, _ := f.injectSession(t, f.rel, "node-1")
	// As when a watch broke: no decision on state that may be stale.
	f.rel.setLive(nodePrefix, false)
	_, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	wantErr(t, err, ErrUnavailable, "not in sync")
	if err := f.rel.load(ctx, nodePrefix); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.GenerateDataKey(ctx, token, id, nil); err != nil {
		t.Fatalf("after reload: %v", err)
	}
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 2s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
