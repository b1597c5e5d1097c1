package ceremony

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/seal"
)

const testRoot = "pkcs11:token=coffre;object=root-2026"

func custodians(t testing.TB, n int) ([]*seal.PrivateKey, []*seal.PublicKey) {
	t.Helper()
	sks := make([]*seal.PrivateKey, n)
	pks := make([]*seal.PublicKey, n)
	for i := range sks {
		k, err := seal.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		sks[i], pks[i] = k, k.Public()
	}
	return sks, pks
}

func split(t testing.TB, m int, pks []*seal.PublicKey) (*Secret, []*Share) {
	t.Helper()
	root, shares, err := Split(SplitOptions{RootID: testRoot, Threshold: m, Custodians: pks})
	if err != nil {
		t.Fatalf("Split: %v", err)
	}
	t.Cleanup(root.Destroy)
	return root, shares
}

// reparse writes a share to its file and reads it back, as a custodian's
// removable medium does.
func reparse(t testing.TB, s *Share) *Share {
	t.Helper()
	b, err := s.Marshal()
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	p, err := ParseShare(b)
	if err != nil {
		t.Fatalf("ParseShare of a file Marshal wrote: %v\n%s", err, b)
	}
	return p
}

func open(t testing.TB, s *Share, k *seal.PrivateKey) *OpenedShare {
	t.Helper()
	o, err := reparse(t, s).Open(k)
	if err != nil {
		t.Fatalf("Open share %d: %v", s.Index, err)
	}
	t.Cleanup(o.Destroy)
	return o
}

// subsets returns every subset of {0..n-1} of size k.
func subsets(n, k int) [][]int {
	var out [][]int
	var rec func(start int, cur []int)
	rec = func(start int, cur []int) {
		if len(cur) == k {
			out = append(out, append([]int(nil), cur...))
			return
		}
		for i := start; i < n; i++ {
			rec(i+1, append(cur, i))
		}
	}
	rec(0, nil)
	return out
}

func TestSplitCombineEverySubset(t *testing.T) {
	sks, pks := custodians(t, 5)
	var progress []string
	root, shares, err := Split(SplitOptions{
		RootID: testRoot, Threshold: 3, Custodians: pks,
		Progress: func(i, n int, to *seal.PublicKey) {
			if !to.Equal(pks[i-1]) {
				t.Errorf("progress for share %d names the wrong custodian", i)
			}
			progress = append(progress, fmt.Sprintf("%d/%d", i, n))
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Destroy()
	if got := strings.Join(progress, " "); got != "1/5 2/5 3/5 4/5 5/5" {
		t.Errorf("progress calls %q", got)
	}
	if root.Len() != RootKeySize || bytes.Equal(root.Bytes(), make([]byte, RootKeySize)) {
		t.Fatalf("root is %d bytes, all zero: %v", root.Len(), bytes.Equal(root.Bytes(), make([]byte, RootKeySize)))
	}
	if len(shares) != 5 {
		t.Fatalf("%d shares, want 5", len(shares))
	}
	for i, s := range shares {
		if s.Index != i+1 || s.Threshold != 3 || s.Total != 5 || s.Root != testRoot || s.Ceremony != shares[0].Ceremony || !s.Custodian.Equal(pks[i]) {
			t.Errorf("share %d headers: %+v", i+1, s)
		}
	}
	opened := make([]*OpenedShare, 5)
	for i, s := range shares {
		opened[i] = open(t, s, sks[i])
	}
	for k := 3; k <= 5; k++ {
		for _, sub := range subsets(5, k) {
			// Order must not matter: try the subset forwards and backwards.
			for _, rev := range []bool{false, true} {
				var in []*OpenedShare
				for _, i := range sub {
					in = append(in, opened[i])
				}
				if rev {
					for a, b := 0, len(in)-1; a < b; a, b = a+1, b-1 {
						in[a], in[b] = in[b], in[a]
					}
				}
				got, err := Combine(in)
				if err != nil {
					t.Fatalf("Combine(%v): %v", sub, err)
				}
				if !got.Equal(root) {
					t.Errorf("Combine(%v) rebuilt another key", sub)
				}
				got.Destroy()
			}
		}
	}
	// Two splits of new roots give different roots and ceremonies.
	root2, shares2 := split(t, 3, pks)
	if root2.Equal(root) || shares2[0].Ceremony == shares[0].Ceremony {
		t.Error("a second Split repeated the root or the ceremony id")
	}
}

func TestTooFewSharesRefused(t *testing.T) {
	sks, pks := custodians(t, 5)
	_, shares := split(t, 3, pks)
	for _, sub := range subsets(5, 2) {
		in := []*OpenedShare{open(t, shares[sub[0]], sks[sub[0]]), open(t, shares[sub[1]], sks[sub[1]])}
		if r, err := Combine(in); !errors.Is(err, ErrTooFewShares) {
			if r != nil {
				r.Destroy()
			}
			t.Fatalf("Combine of 2 shares of a 3-of-5: %v; want ErrTooFewShares", err)
		}
		if err := CheckSet([]*Share{shares[sub[0]], shares[sub[1]]}); !errors.Is(err, ErrTooFewShares) {
			t.Fatalf("CheckSet of 2 shares of a 3-of-5: %v", err)
		}
	}
	if _, err := Combine(nil); !errors.Is(err, ErrTooFewShares) {
		t.Fatalf("Combine(nil): %v", err)
	}
	err := CheckSet(shares[:2])
	if err == nil || !strings.Contains(err.Error(), "2 share(s) given") || !strings.Contains(err.Error(), "needs 3 of 5") {
		t.Errorf("message does not say how many are needed: %v", err)
	}
}

func TestMixedAndDuplicateRefused(t *testing.T) {
	sks, pks := custodians(t, 3)
	_, a := split(t, 2, pks)
	_, b := split(t, 2, pks)
	if err := CheckSet([]*Share{a[0], b[1]}); !errors.Is(err, ErrMixedShares) {
		t.Errorf("shares of two ceremonies: %v; want ErrMixedShares", err)
	}
	if _, err := Combine([]*OpenedShare{open(t, a[0], sks[0]), open(t, b[1], sks[1])}); !errors.Is(err, ErrMixedShares) {
		t.Errorf("Combine of two ceremonies: %v; want ErrMixedShares", err)
	}
	o := open(t, a[0], sks[0])
	if _, err := Combine([]*OpenedShare{o, open(t, a[0], sks[0])}); !errors.Is(err, ErrDuplicateShare) {
		t.Errorf("the same share twice: %v; want ErrDuplicateShare", err)
	}
}

func TestWrongCustodianRefused(t *testing.T) {
	sks, pks := custodians(t, 3)
	_, shares := split(t, 2, pks)
	if _, err := shares[0].Open(sks[1]); !errors.Is(err, ErrWrongCustodian) {
		t.Errorf("share 1 with custodian 2's key: %v; want ErrWrongCustodian", err)
	}
	// A header rewritten to name the key at hand does not help: the
	// headers are the associated data of the sealed value.
	forged := *shares[0]
	forged.Custodian = pks[1]
	if _, err := reparse(t, &forged).Open(sks[1]); !errors.Is(err, ErrShareOpen) {
		t.Errorf("share 1 relabelled to custodian 2: %v; want ErrShareOpen", err)
	}
}

func TestTamperedShareRefused(t *testing.T) {
	sks, pks := custodians(t, 3)
	_, shares := split(t, 2, pks)
	s := shares[1]
	for name, change := range map[string]func(*Share){
		"index":      func(c *Share) { c.Index = 3 },
		"threshold":  func(c *Share) { c.Threshold = 3 },
		"total":      func(c *Share) { c.Total = 4 },
		"root":       func(c *Share) { c.Root = "pkcs11:token=coffre;object=other" },
		"ceremony":   func(c *Share) { c.Ceremony = strings.Repeat("0", 32) },
		"created":    func(c *Share) { c.Created = c.Created.Add(time.Second) },
		"commitment": func(c *Share) { c.Commitment = bytes.Repeat([]byte{1}, 32) },
		"body": func(c *Share) {
			c.Sealed = bytes.Clone(c.Sealed)
			c.Sealed[len(c.Sealed)-1] ^= 1
		},
		"encapsulation": func(c *Share) {
			c.Sealed = bytes.Clone(c.Sealed)
			c.Sealed[5] ^= 0x80
		},
	} {
		c := *s
		change(&c)
		if _, err := reparse(t, &c).Open(sks[1]); !errors.Is(err, ErrShareOpen) {
			t.Errorf("share with a changed %s: %v; want ErrShareOpen", name, err)
		}
	}
}

// TestCommitmentMismatchRefused: a custodian (or anyone: HPKE base mode is
// not authenticated) can seal any value to a custodian's public key under
// the right headers. The commitment catches it.
func TestCommitmentMismatchRefused(t *testing.T) {
	sks, pks := custodians(t, 4)
	root, shares := split(t, 2, pks)
	forge := func(s *Share, value byte) *Share {
		f := *s
		v := make([]byte, scalarSize)
		v[0] = value // a small canonical scalar
		sealed, err := seal.Seal(s.Custodian, []byte(shareInfo), f.AAD(), v)
		if err != nil {
			t.Fatal(err)
		}
		f.Sealed = sealed
		return &f
	}
	bad := open(t, forge(shares[1], 7), sks[1])
	good0, good2 := open(t, shares[0], sks[0]), open(t, shares[2], sks[2])

	if r, err := Combine([]*OpenedShare{good0, bad}); !errors.Is(err, ErrCommitment) {
		if r != nil {
			r.Destroy()
		}
		t.Fatalf("Combine with a forged share: %v; want ErrCommitment", err)
	}
	// Beyond the threshold, a forged extra share is named.
	_, err := Combine([]*OpenedShare{good0, good2, bad})
	if !errors.Is(err, ErrCommitment) || !strings.Contains(err.Error(), "share 2 disagrees") {
		t.Fatalf("Combine with a forged extra share: %v; want ErrCommitment naming share 2", err)
	}
	// A forged commitment in every header (a forger who rewrote all the
	// files) with genuine values: it does not open, so it never reaches
	// Combine; and a commitment not matching the rebuilt root is refused.
	o0, o2 := open(t, shares[0], sks[0]), open(t, shares[2], sks[2])
	o0.Share = &Share{}
	*o0.Share = *shares[0]
	o2.Share = &Share{}
	*o2.Share = *shares[2]
	o0.Commitment = bytes.Repeat([]byte{9}, 32)
	o2.Commitment = o0.Commitment
	if r, err := Combine([]*OpenedShare{o0, o2}); !errors.Is(err, ErrCommitment) {
		if r != nil {
			r.Destroy()
		}
		t.Fatalf("Combine against a wrong commitment: %v; want ErrCommitment", err)
	}
	// The genuine pair still works.
	r, err := Combine([]*OpenedShare{good0, good2})
	if err != nil || !r.Equal(root) {
		t.Fatalf("genuine shares: %v", err)
	}
	r.Destroy()
}

func TestSplitOptionsValidated(t *testing.T) {
	_, pks := custodians(t, 3)
	for _, tc := range []struct {
		name string
		m    int
		pks  []*seal.PublicKey
		want string
	}{
		{"threshold 1", 1, pks, "threshold 1"},
		{"threshold 0", 0, pks, "threshold 0"},
		{"threshold above N", 4, pks, "threshold 4 with 3"},
		{"one custodian", 1, pks[:1], "1 custodians"},
		{"no custodian", 2, nil, "0 custodians"},
		{"duplicate custodian", 2, []*seal.PublicKey{pks[0], pks[1], pks[0]}, "custodians 1 and 3 have the same key"},
		{"nil custodian", 2, []*seal.PublicKey{pks[0], nil}, "custodian 2 has no key"},
	} {
		r, s, err := Split(SplitOptions{RootID: testRoot, Threshold: tc.m, Custodians: tc.pks})
		if err == nil || !strings.Contains(err.Error(), tc.want) || r != nil || s != nil {
			t.Errorf("%s: %v; want an error saying %q", tc.name, err, tc.want)
		}
	}
	if _, _, err := Split(SplitOptions{RootID: "has space", Threshold: 2, Custodians: pks}); !errors.Is(err, ErrShareFormat) {
		t.Errorf("root id with a space: %v", err)
	}
}

func TestSecretRedactedAndZeroized(t *testing.T) {
	src := []byte("0123456789abcdef0123456789abcdef")
	s := secretFrom(src)
	if !bytes.Equal(src, make([]byte, 32)) {
		t.Error("secretFrom did not clear its source")
	}
	for _, f := range []string{"%v", "%s", "%x", "%#v", "%q", "%+v"} {
		if out := fmt.Sprintf(f, s); strings.Contains(out, "0123") || strings.Contains(out, "3031") || !strings.Contains(out, "redacted") {
			t.Errorf("Sprintf(%q) = %q", f, out)
		}
	}
	if !s.Locked() {
		// Not a failure: RLIMIT_MEMLOCK may be 0 in a container. The
		// ceremony command warns in that case; say so here too.
		t.Log("memory lock refused (RLIMIT_MEMLOCK); secrets are unlocked in this environment")
	}
	b := s.Bytes()
	if string(b) != "0123456789abcdef0123456789abcdef" {
		t.Fatalf("Bytes = %q", b)
	}
	s.Destroy()
	s.Destroy()
	if s.Len() != 0 || s.Bytes() != nil {
		t.Error("Destroy left the bytes reachable")
	}
}
