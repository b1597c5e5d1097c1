package keyfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRoundTripAndRefusals(t *testing.T) {
	pt := []byte("the private key bytes")
	f, err := Encrypt("COFFRE TEST KEY", pt, []byte("correct horse"), MinParams)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decrypt("COFFRE TEST KEY", f, []byte("correct horse"))
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Decrypt = %q, %v", got, err)
	}
	if _, err := Decrypt("COFFRE TEST KEY", f, []byte("wrong horse")); !errors.Is(err, ErrPassphrase) {
		t.Errorf("wrong passphrase: %v, want ErrPassphrase", err)
	}
	if _, err := Decrypt("COFFRE OTHER KEY", f, []byte("correct horse")); err == nil {
		t.Error("another PEM type opened")
	}
	// Relabelling the file as another kind of key breaks the AAD.
	relabelled := bytes.ReplaceAll(f, []byte("COFFRE TEST KEY"), []byte("COFFRE XXXX KEY"))
	if _, err := Decrypt("COFFRE XXXX KEY", relabelled, []byte("correct horse")); !errors.Is(err, ErrPassphrase) {
		t.Errorf("relabelled file: %v, want ErrPassphrase", err)
	}
	// Weakening the parameters below the minimum is refused before any work.
	weak := bytes.Replace(f, []byte("m=8192"), []byte("m=8"), 1)
	if _, err := Decrypt("COFFRE TEST KEY", weak, []byte("correct horse")); err == nil || errors.Is(err, ErrPassphrase) {
		t.Errorf("weakened params: %v, want a parameter error", err)
	}
	if _, err := Encrypt("COFFRE TEST KEY", pt, []byte("short"), MinParams); err == nil {
		t.Error("a 5-character passphrase was accepted")
	}
}

func TestReadPassphraseFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "pass")
	if err := os.WriteFile(p, []byte("s3cret passphrase\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReadPassphrase(p, "", nil)
	if err != nil || string(got) != "s3cret passphrase" {
		t.Fatalf("ReadPassphrase = %q, %v", got, err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadPassphrase(p, "", nil); err == nil || !strings.Contains(err.Error(), "readable by others") {
		t.Errorf("world-readable passphrase file: %v", err)
	}
}
