package adminkey

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms/identity"
)

var pass = []byte("correct horse battery")

func passFunc(p []byte) func() ([]byte, error) {
	return func() ([]byte, error) { return bytes.Clone(p), nil }
}

func TestGenerateParseFile(t *testing.T) {
	file, pub, err := Generate("alice@ops", pass, keyfile.MinParams)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(file, []byte("-----BEGIN COFFRE ADMIN KEY-----\n")) {
		t.Fatalf("file starts %q", file[:40])
	}
	name, k, err := ParseFile(file, pass)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Zero()
	if name != "alice@ops" || !k.Public().Equal(pub) {
		t.Fatalf("ParseFile gave %q and another key", name)
	}
	if _, _, err := ParseFile(file, []byte("wrong passphrase")); !errors.Is(err, keyfile.ErrPassphrase) {
		t.Errorf("wrong passphrase: %v", err)
	}
	other := bytes.Replace(file, []byte("COFFRE ADMIN KEY"), []byte("COFFRE CUSTODIAN KEY"), 2)
	if _, _, err := ParseFile(other, pass); err == nil {
		t.Error("a file of another PEM type opened")
	}
	// The file never holds the seeds in clear.
	seeds := k.MarshalSeeds()
	defer clear(seeds)
	if bytes.Contains(file, seeds[:16]) || bytes.Contains(file, seeds[32:48]) {
		t.Error("the key file holds seed bytes in clear")
	}
	// Two keys generated are two identities.
	_, pub2, err := Generate("alice@ops", pass, keyfile.MinParams)
	if err != nil {
		t.Fatal(err)
	}
	if pub2.Equal(pub) {
		t.Error("Generate made the same key twice")
	}

	for _, bad := range []string{"", "alice smith", "alice\n", "ünïcode", strings.Repeat("a", 65), "a/b"} {
		if _, _, err := Generate(bad, pass, keyfile.MinParams); err == nil {
			t.Errorf("Generate(name %q) succeeded", bad)
		}
	}
	if _, _, err := Generate("alice", []byte("short"), keyfile.MinParams); err == nil {
		t.Error("Generate with a 5-character passphrase succeeded")
	}
}

func TestLoadFile(t *testing.T) {
	ctx := context.Background()
	file, pub, err := Generate("alice", pass, keyfile.MinParams)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "alice.key")
	if err := os.WriteFile(path, file, 0o600); err != nil {
		t.Fatal(err)
	}
	s, closeKey, err := Load(ctx, path, passFunc(pass))
	if err != nil {
		t.Fatal(err)
	}
	if !s.Public().Equal(pub) {
		t.Fatal("Load gave another key")
	}
	msg := []byte("approve sha256:ab")
	sig, err := s.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Verify(msg, sig); err != nil {
		t.Fatal(err)
	}
	if err := closeKey(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(ctx, msg); !errors.Is(err, identity.ErrZeroed) {
		t.Errorf("Sign after close: %v", err)
	}

	if _, _, err := Load(ctx, path, passFunc([]byte("wrong passphrase"))); !errors.Is(err, keyfile.ErrPassphrase) {
		t.Errorf("wrong passphrase: %v", err)
	}
	noPass := errors.New("no terminal")
	if _, _, err := Load(ctx, path, func() ([]byte, error) { return nil, noPass }); !errors.Is(err, noPass) {
		t.Errorf("passphrase error not passed on: %v", err)
	}
	if _, _, err := Load(ctx, filepath.Join(t.TempDir(), "missing"), passFunc(pass)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, _, err := Load(ctx, t.TempDir(), passFunc(pass)); err == nil {
		t.Error("a directory loaded as a key file")
	}
}

func TestParseRefuses(t *testing.T) {
	k, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	good := marshal("alice", k)
	if _, _, err := parse(good); err != nil {
		t.Fatalf("parse(good): %v", err)
	}
	lines := strings.Split(string(good), "\n")
	cases := map[string]string{
		"empty":            "",
		"no final newline": strings.TrimSuffix(string(good), "\n"),
		"other header":     strings.Replace(string(good), "v1", "v2", 1),
		"extra line":       string(good) + "x\n",
		"bad name":         strings.Replace(string(good), "name alice", "name al ice", 1),
		"missing name":     strings.Replace(string(good), "name alice", "nom alice", 1),
		"swapped seeds":    lines[0] + "\n" + lines[1] + "\n" + lines[3] + "\n" + lines[2] + "\n",
		"short seed":       strings.Replace(string(good), lines[2], lines[2][:len(lines[2])-4], 1),
		"unpadded seed":    strings.Replace(string(good), lines[2], strings.TrimRight(lines[2], "="), 1),
		"CRLF":             strings.ReplaceAll(string(good), "\n", "\r\n"),
	}
	for name, in := range cases {
		if _, _, err := parse([]byte(in)); !errors.Is(err, ErrBadKeyFile) {
			t.Errorf("%s: parse = %v, want ErrBadKeyFile", name, err)
		}
	}
}

// TestToken generates an admin key on SoftHSM and loads it by its URI.
func TestToken(t *testing.T) {
	ctx := context.Background()
	s := hsmtest.NewSoftHSM(t)
	pin := s.NewToken(t, "card")
	uri := s.RootURI("card", "alice", pin)

	pub, err := GenerateToken(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := GenerateToken(ctx, uri); !errors.Is(err, hsm.ErrKeyExists) {
		t.Errorf("second GenerateToken: %v", err)
	}
	asked := false
	signer, closeKey, err := Load(ctx, uri, func() ([]byte, error) { asked = true; return nil, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := closeKey(); err != nil {
			t.Error(err)
		}
	}()
	if asked {
		t.Error("a passphrase was asked for a token key")
	}
	if !signer.Public().Equal(pub) {
		t.Fatal("Load gave another public key than GenerateToken")
	}
	msg := []byte("approve sha256:cd")
	sig, err := signer.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Verify(msg, sig); err != nil {
		t.Fatal(err)
	}
	if !IsTokenRef("PKCS11:token=x") || IsTokenRef("pkcs11") || IsTokenRef("./pkcs11:x") {
		t.Error("IsTokenRef")
	}
}

func FuzzParse(f *testing.F) {
	k, err := identity.ParsePrivateKey(bytes.Repeat([]byte{7}, identity.PrivateKeySize))
	if err != nil {
		f.Fatal(err)
	}
	good := marshal("alice", k)
	f.Add(good)
	f.Add(good[:len(good)-2])
	f.Add([]byte(header + "\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		name, key, err := parse(in)
		if err != nil {
			if !errors.Is(err, ErrBadKeyFile) {
				t.Fatalf("error %v does not wrap ErrBadKeyFile", err)
			}
			return
		}
		// What parses, marshals back to the same bytes.
		if got := marshal(name, key); !bytes.Equal(got, in) {
			t.Fatalf("parse then marshal: %q, want %q", got, in)
		}
	})
}
