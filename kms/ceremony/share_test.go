package ceremony

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/seal"
)

var (
	sampleOnce sync.Once
	sampleFile []byte
)

// sample returns a valid share file (shared by the tests and the fuzzer's
// seed corpus).
func sample(t testing.TB) []byte {
	t.Helper()
	sampleOnce.Do(func() {
		_, pks := custodians(t, 2)
		root, shares, err := Split(SplitOptions{RootID: testRoot, Threshold: 2, Custodians: pks,
			Now: time.Date(2026, 5, 1, 12, 0, 0, 500, time.UTC)})
		if err != nil {
			t.Fatal(err)
		}
		root.Destroy()
		if sampleFile, err = shares[1].Marshal(); err != nil {
			t.Fatal(err)
		}
	})
	return bytes.Clone(sampleFile)
}

func TestShareFileRoundTrip(t *testing.T) {
	b := sample(t)
	s, err := ParseShare(b)
	if err != nil {
		t.Fatalf("ParseShare: %v\n%s", err, b)
	}
	if s.Index != 2 || s.Total != 2 || s.Threshold != 2 || s.Root != testRoot ||
		!s.Created.Equal(time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)) || len(s.Commitment) != 32 {
		t.Errorf("parsed %+v", s)
	}
	// What a custodian sees when they look at the file.
	text := string(b)
	for _, want := range []string{
		"-----BEGIN COFFRE CUSTODIAN SHARE-----\n",
		"\nIndex: 2\n", "\nThreshold: 2\n", "\nTotal: 2\n", "\nRoot: " + testRoot + "\n",
		"\nCreated: 2026-05-01T12:00:00Z\n", "\nCustodian: coffre-xwing1:", "\nVersion: 1\n",
		"-----END COFFRE CUSTODIAN SHARE-----\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("share file lacks %q:\n%s", want, text)
		}
	}
	again, err := s.Marshal()
	if err != nil || !bytes.Equal(again, b) {
		t.Errorf("re-Marshal differs (%v)", err)
	}
}

func TestParseShareRejects(t *testing.T) {
	good := string(sample(t))
	s, err := ParseShare([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	other, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	hdr := func(k, v string) string {
		h := s.headers()
		old := k + ": " + h[k] + "\n"
		if !strings.Contains(good, old) {
			t.Fatalf("header line %q not in the sample", old)
		}
		if v == "" {
			return strings.Replace(good, old, "", 1)
		}
		return strings.Replace(good, old, k+": "+v+"\n", 1)
	}
	cases := map[string]string{
		"empty":              "",
		"not PEM":            "hello\n",
		"other PEM type":     strings.ReplaceAll(good, SharePEMType, "COFFRE CUSTODIAN KEY"),
		"text before":        "share for Alice\n" + good,
		"text after":         good + "keep safe\n",
		"second block":       good + good,
		"CRLF":               strings.ReplaceAll(good, "\n", "\r\n"),
		"no final newline":   strings.TrimSuffix(good, "\n"),
		"missing Index":      hdr(hIndex, ""),
		"missing Version":    hdr(hVersion, ""),
		"version 2":          hdr(hVersion, "2"),
		"extra header":       strings.Replace(good, "Version: 1\n", "Version: 1\nNote: hi\n", 1),
		"index 0":            hdr(hIndex, "0"),
		"index above total":  hdr(hIndex, "3"),
		"index leading zero": hdr(hIndex, "02"),
		"index plus":         hdr(hIndex, "+2"),
		"index huge":         hdr(hIndex, "99999999999999999999"),
		"threshold 1":        hdr(hThreshold, "1"),
		"threshold above":    hdr(hThreshold, "3"),
		"total 256":          hdr(hTotal, "256"),
		"bad ceremony":       hdr(hCeremony, "XYZ"),
		"upper ceremony":     hdr(hCeremony, strings.ToUpper(s.Ceremony)),
		"short commitment":   hdr(hCommitment, "abcd"),
		"upper commitment":   hdr(hCommitment, strings.ToUpper(s.headers()[hCommitment])),
		"bad time":           hdr(hCreated, "yesterday"),
		"time with offset":   hdr(hCreated, "2026-05-01T14:00:00+02:00"),
		"time fraction":      hdr(hCreated, "2026-05-01T12:00:00.5Z"),
		"bad custodian":      hdr(hCustodian, "coffre-xwing1:AAAA"),
		"root with space":    hdr(hRoot, "pkcs11:token=a b"),
		"body cut":           strings.Replace(good, "\n-----END", "A\n-----END", 1),
		"header space":       strings.Replace(good, "Index: 2", "Index:  2", 1),
		"oversized":          good + strings.Repeat("A", maxShareFileSize),
	}
	// Body shortened by a line: a sealed share has one exact size.
	lines := strings.Split(good, "\n")
	cases["body short"] = strings.Join(append(append([]string{}, lines[:len(lines)-4]...), lines[len(lines)-3:]...), "\n")
	cases["other custodian key, valid"] = hdr(hCustodian, other.Public().String()) // parses; fails to open
	for name, in := range cases {
		got, err := ParseShare([]byte(in))
		if name == "other custodian key, valid" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted: %+v", name, got)
			continue
		}
		if !errors.Is(err, ErrShareFormat) {
			t.Errorf("%s: error %v does not wrap ErrShareFormat", name, err)
		}
	}
}

func TestSealedShareSize(t *testing.T) {
	// sealedShareSize is a constant; check it against what seal produces.
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	out, err := seal.Seal(k.Public(), []byte(shareInfo), nil, make([]byte, scalarSize))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != sealedShareSize {
		t.Fatalf("seal output is %d bytes, sealedShareSize is %d", len(out), sealedShareSize)
	}
}

func FuzzParseShare(f *testing.F) {
	good := sample(f)
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte("-----BEGIN COFFRE CUSTODIAN SHARE-----\nIndex: 1\n\n-----END COFFRE CUSTODIAN SHARE-----\n"))
	f.Add(bytes.Replace(good, []byte("Index: 2"), []byte("Index: 1"), 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseShare(b)
		if err != nil {
			if s != nil || !errors.Is(err, ErrShareFormat) {
				t.Fatalf("ParseShare = %v, %v", s, err)
			}
			return
		}
		again, err := s.Marshal()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("accepted a file that does not re-encode to itself (%v)", err)
		}
	})
}
