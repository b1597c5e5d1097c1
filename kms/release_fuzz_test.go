package kms

import (
	"encoding/base64"
	"testing"
	"time"
)

// The store is not trusted: every stored release record is outside input
// and its decoder must refuse garbage without panicking.

func FuzzDecodeNode(f *testing.F) {
	f.Add([]byte(`{"format":1,"name":"n","class":"c","labels":{"a":"b"},"state":"enrolled","ek_fingerprint":"00","ek_public":"AAAA","enroll_time":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"format":1,"name":"n","class":"c","state":"revoked","ek_fingerprint":"00","ek_certificate":"MIIB"}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := decodeNode(nodePrefix+"n", b)
		if err == nil && (n.Name != "n" || ValidateLabels(n.Labels) != nil || n.EKFingerprint == "") {
			t.Fatalf("accepted %+v", n)
		}
	})
}

func FuzzDecodeClass(f *testing.F) {
	f.Add([]byte(`{"format":1,"name":"c","pcrs":[{"index":7,"sha256":"` + base64.StdEncoding.EncodeToString(pcr7[:]) + `"}],"require_event_log":true}`))
	f.Add([]byte(`{"format":1,"name":"c","pcrs":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeClass(classPrefix+"c", b)
		if err == nil && (c.Name != "c" || validatePCRs(c.PCRs) != nil) {
			t.Fatalf("accepted %+v", c)
		}
	})
}

func FuzzDecodePolicy(f *testing.F) {
	f.Add([]byte(`{"format":1,"tenant":"acme","name":"disks","allowed_classes":["c"],"required_labels":{"j":"x"},"release":"tpm"}`))
	f.Add([]byte(`{"format":1,"tenant":"acme","name":"disks","release":"hpke"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := decodePolicy(policyPrefix+"acme/disks", b)
		if err == nil && (p.Keyring.String() != "acme/disks" || p.validate() != nil) {
			t.Fatalf("accepted %+v", p)
		}
	})
}

func FuzzDecodeEKRoot(f *testing.F) {
	f.Add([]byte(`{"format":1,"certificate":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeEKRoot(ekRootPrefix+"00", b)
	})
}

func FuzzDecodeNodeIndex(f *testing.F) {
	f.Add([]byte(`{"format":1,"node":"n"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if name, err := decodeNodeIndex(nodeByEKPrefix+"00", b); err == nil && ValidateNodeName(name) != nil {
			t.Fatalf("accepted %q", name)
		}
	})
}

func FuzzValidateLabels(f *testing.F) {
	f.Add("jurisdiction", "ca-qc")
	f.Add("k8s.io/zone", "a\x00b")
	f.Fuzz(func(t *testing.T, k, v string) {
		_ = ValidateLabels(map[string]string{k: v})
	})
}

func FuzzSessionToken(f *testing.F) {
	f.Add("")
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
	r := &ReleaseService{sessions: map[[32]byte]*session{}}
	f.Fuzz(func(t *testing.T, tok string) {
		if _, err := r.lookup(tok, time.Time{}); err == nil {
			t.Fatal("a token was accepted with no session")
		}
	})
}
