package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/seal"
	"github.com/coffre-kms/coffre/kms/store"
)

// Backups (data embassy).
//
// [ExportBackup] copies the store's key hierarchy and release state —
// wrapped KEK versions, EK roots, node classes, enrollments and their EK
// index, keyring policies — into one file, signed by the exporting site's
// hybrid signer and sealed to a disaster-recovery site's transfer key.
// [ImportBackup] checks it and writes it into the DR site's store; a DR
// server holding the same root (restored from custodian shares) then opens
// every envelope made at the primary. The file holds no plaintext key: the
// store holds none. ENVELOPE.md ("Backup") specifies the format.

// BackupFormat is the version of the backup format this server writes and
// reads.
const BackupFormat = 1

// Limits of backups.
const (
	// MaxBackupSize bounds a backup file. A keyring record is at most
	// about 500 KB (MaxVersions versions), so this holds hundreds of
	// heavily rotated keyrings or tens of thousands of ordinary ones.
	MaxBackupSize = 256 << 20
	// MaxBackupOriginLen bounds the origin (site name) of a backup.
	MaxBackupOriginLen = 128

	maxBackupHeader   = 1024
	maxBackupManifest = 64 << 10
	backupMagic       = "coffre backup v"
	backupSealInfo    = "coffre backup v1"
	backupSignPurpose = "coffre backup v1"
)

// backupPrefixes are the store prefixes a backup carries, in key order.
// They are everything a DR server needs to decrypt the primary's envelopes
// and to release keys under the same policies:
//
//   - classes/      node classes (reference values)
//   - ekroots/      TPM manufacturer CAs
//   - keyrings/     keyrings with their wrapped KEK versions
//   - nodes-by-ek/  the EK → node index (enrollment is unique per EK)
//   - nodes/        enrollments
//   - policies/     keyring release policies
//
// Left out on purpose: audit/NODE/ (the audit logs nodes replicate to a
// shared store): each log belongs to the node that signed it and is
// verified where it lives (`coffrectl audit verify --store`); the DR site
// starts its own. Sessions, challenges and cached KEKs are never in the
// store (they live in memory and die with the process). A prefix added to
// the store later is not exported until it is added here.
var backupPrefixes = []string{classPrefix, ekRootPrefix, keyringPrefix, nodeByEKPrefix, nodePrefix, policyPrefix}

// BackupPrefixes returns the store prefixes a backup carries.
func BackupPrefixes() []string { return slices.Clone(backupPrefixes) }

// Backup errors. Each wraps one of the package's general errors
// (ErrInvalidArgument, ErrPermissionDenied, ErrFailedPrecondition) for
// callers that only need the category.
var (
	// ErrBackupFormat: the data is not a Coffre backup or is malformed.
	ErrBackupFormat = fmt.Errorf("%w: not a well-formed Coffre backup", ErrInvalidArgument)
	// ErrBackupVersion: a backup format version (or a store prefix) this
	// server does not know.
	ErrBackupVersion = fmt.Errorf("%w: unsupported backup format", ErrInvalidArgument)
	// ErrBackupKey: the backup is sealed to another transfer key.
	ErrBackupKey = fmt.Errorf("%w: backup sealed to another transfer key", ErrPermissionDenied)
	// ErrBackupAltered: the backup does not open, or its parts disagree:
	// it was altered (or corrupted) after it was made.
	ErrBackupAltered = fmt.Errorf("%w: backup altered or corrupted", ErrInvalidArgument)
	// ErrBackupUntrusted: no trusted key signed the backup.
	ErrBackupUntrusted = fmt.Errorf("%w: backup not signed by a trusted key", ErrPermissionDenied)
	// ErrBackupRecord: a record this server refuses to store (malformed
	// or outside the exported prefixes).
	ErrBackupRecord = fmt.Errorf("%w: backup holds an unacceptable record", ErrInvalidArgument)
	// ErrBackupConflict: the destination store holds other values under
	// keys of the backup.
	ErrBackupConflict = fmt.Errorf("%w: backup conflicts with the store", ErrFailedPrecondition)
)

// BackupHeader is the cleartext header of a backup: readable without any
// key, authenticated only when the backup is imported (the header is the
// sealed part's associated data and must agree with the signed manifest).
type BackupHeader struct {
	Version int
	// Origin names the exporting site.
	Origin string
	// Created is when the backup was made, by the primary's clock.
	Created time.Time
	// Signer is the note name of the key that claims to have signed it.
	Signer string
	// Recipient is the fingerprint of the transfer key it is sealed to
	// (see [TransferKeyFingerprint]).
	Recipient string
}

// TransferKeyFingerprint identifies a transfer (recipient) key: the
// lowercase hex SHA-256 of its text form.
func TransferKeyFingerprint(pub *seal.PublicKey) string {
	sum := sha256.Sum256([]byte(pub.String()))
	return hex.EncodeToString(sum[:])
}

// ExportOptions configures [ExportBackup].
type ExportOptions struct {
	// To is the DR site's transfer key.
	To *seal.PublicKey
	// Signer is the exporting site's hybrid signer; the DR site trusts its
	// public key.
	Signer *audit.Signer
	// Origin names the exporting site: 1 to 128 of [A-Za-z0-9._:/-].
	Origin string
	// Now is the creation time; zero means time.Now().
	Now time.Time
}

// ImportOptions configures [ImportBackup].
type ImportOptions struct {
	// Key is the transfer key the backup is sealed to.
	Key *seal.PrivateKey
	// Trusted are the public keys of the signers whose backups are
	// accepted (the primary's).
	Trusted []*audit.Verifier
	// Now is used to report the backup's age; zero means time.Now().
	Now time.Time
}

// ImportSummary says what an import did.
type ImportSummary struct {
	Header BackupHeader
	// Signer is the name of the trusted key whose signature verified.
	Signer string
	// Records is the number of records in the backup, Written those
	// written, Skipped those already present with the same value.
	Records, Written, Skipped int
	// PerPrefix counts the backup's records by prefix.
	PerPrefix map[string]int
	// Age is how old the backup was at import.
	Age time.Duration
}

type backupRecord struct {
	key   string
	value []byte
}

// backupManifest is the signed description of a backup.
type backupManifest struct {
	Format        int      `json:"format"`
	Origin        string   `json:"origin"`
	Created       string   `json:"created"` // RFC 3339, UTC, as in the header
	Signer        string   `json:"signer"`
	Recipient     string   `json:"recipient"`
	Prefixes      []string `json:"prefixes"`
	Records       int      `json:"records"`
	RecordsSHA256 string   `json:"records_sha256"` // hex
}

// ExportBackup reads every record under the backup prefixes from st,
// checks each the way this server reads it (a store this server refuses
// to use is not exported), and returns the backup: signed by opts.Signer,
// sealed to opts.To. The prefixes are read one after another: a record
// written during the export is in it or not, but every record is whole.
func ExportBackup(ctx context.Context, st store.Store, opts ExportOptions) ([]byte, error) {
	if st == nil || opts.To == nil || opts.Signer == nil {
		return nil, fmt.Errorf("%w: ExportBackup needs a store, a recipient key and a signer", ErrInvalidArgument)
	}
	if err := validateOrigin(opts.Origin); err != nil {
		return nil, err
	}
	if !validSignerName(opts.Signer.Name()) {
		return nil, fmt.Errorf("%w: signer name %.80q cannot go in a backup header", ErrInvalidArgument, opts.Signer.Name())
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	h := BackupHeader{
		Version:   BackupFormat,
		Origin:    opts.Origin,
		Created:   now.UTC().Round(0),
		Signer:    opts.Signer.Name(),
		Recipient: TransferKeyFingerprint(opts.To),
	}
	header := h.encode()

	var recs []backupRecord
	size := 0
	for _, p := range backupPrefixes {
		kvs, err := st.List(ctx, p)
		if err != nil {
			return nil, storeErr(err)
		}
		for _, kv := range kvs {
			if err := checkBackupRecord(kv.Key, kv.Value); err != nil {
				return nil, fmt.Errorf("kms: refusing to export: %w", err)
			}
			size += 8 + len(kv.Key) + len(kv.Value)
			if size > MaxBackupSize {
				return nil, fmt.Errorf("%w: the store holds more than a backup may (%d bytes)", ErrFailedPrecondition, MaxBackupSize)
			}
			recs = append(recs, backupRecord{key: kv.Key, value: kv.Value})
		}
	}
	slices.SortFunc(recs, func(a, b backupRecord) int { return strings.Compare(a.key, b.key) })

	records := make([]byte, 0, size)
	for _, r := range recs {
		records = appendLP(records, []byte(r.key))
		records = appendLP(records, r.value)
	}
	sum := sha256.Sum256(records)
	manifest := mustJSON(backupManifest{
		Format:        BackupFormat,
		Origin:        h.Origin,
		Created:       formatBackupTime(h.Created),
		Signer:        h.Signer,
		Recipient:     h.Recipient,
		Prefixes:      backupPrefixes,
		Records:       len(recs),
		RecordsSHA256: hex.EncodeToString(sum[:]),
	})
	out, err := sealBackup(header, manifest, records, opts.Signer, opts.To)
	if err != nil {
		return nil, err
	}
	if len(out) > MaxBackupSize {
		return nil, fmt.Errorf("%w: the store holds more than a backup may (%d bytes)", ErrFailedPrecondition, MaxBackupSize)
	}
	return out, nil
}

// sealBackup signs manifest and seals LP(manifest) ‖ LP(signature) ‖
// records to to, with header as the associated data, and returns header
// followed by the sealed bytes.
func sealBackup(header, manifest, records []byte, signer *audit.Signer, to *seal.PublicKey) ([]byte, error) {
	sig, err := signer.SignMessage(backupSignPurpose, manifest)
	if err != nil {
		return nil, fmt.Errorf("kms: sign backup: %w", err)
	}
	pt := make([]byte, 0, 8+len(manifest)+len(sig)+len(records))
	pt = appendLP(pt, manifest)
	pt = appendLP(pt, sig)
	pt = append(pt, records...)
	sealed, err := seal.Seal(to, []byte(backupSealInfo), header, pt)
	if err != nil {
		return nil, fmt.Errorf("kms: seal backup: %w", err)
	}
	return append(bytes.Clone(header), sealed...), nil
}

// InspectBackup reads the cleartext header of a backup. It authenticates
// nothing: what it returns is a claim until [ImportBackup] checks it.
func InspectBackup(data []byte) (BackupHeader, error) {
	h, _, err := splitBackup(data)
	return h, err
}

// openedBackup is a backup that opened, verified and parsed.
type openedBackup struct {
	header  BackupHeader
	signer  string
	records []backupRecord
}

// openBackup does every check of an import that needs no store: header,
// recipient, decryption, signature (before anything signed is parsed),
// manifest, hash, count, order and each record's content.
func openBackup(data []byte, key *seal.PrivateKey, trusted []*audit.Verifier) (*openedBackup, error) {
	if key == nil {
		return nil, fmt.Errorf("%w: a transfer key is required", ErrInvalidArgument)
	}
	if len(trusted) == 0 {
		return nil, fmt.Errorf("%w: at least one trusted signer key is required", ErrInvalidArgument)
	}
	h, headerLen, err := splitBackup(data)
	if err != nil {
		return nil, err
	}
	if fp := TransferKeyFingerprint(key.Public()); h.Recipient != fp {
		return nil, fmt.Errorf("%w: it names transfer key %s, this key is %s", ErrBackupKey, h.Recipient, fp)
	}
	pt, err := seal.Open(key, []byte(backupSealInfo), data[:headerLen], data[headerLen:])
	if err != nil {
		return nil, fmt.Errorf("%w: it does not open under this transfer key (the header or the sealed part was changed)", ErrBackupAltered)
	}
	manifestB, sig, records, err := splitBackupPayload(pt)
	if err != nil {
		return nil, err
	}
	var signer *audit.Verifier
	for _, v := range trusted {
		if v != nil && v.VerifyMessage(backupSignPurpose, manifestB, sig) == nil {
			signer = v
			break
		}
	}
	if signer == nil {
		return nil, fmt.Errorf("%w: it claims signer %q; the signature verifies under none of the %d trusted key(s)", ErrBackupUntrusted, h.Signer, len(trusted))
	}
	m, err := parseBackupManifest(manifestB)
	if err != nil {
		return nil, err
	}
	if m.Origin != h.Origin || m.Created != formatBackupTime(h.Created) || m.Signer != h.Signer || m.Recipient != h.Recipient {
		return nil, fmt.Errorf("%w: the cleartext header disagrees with the signed manifest", ErrBackupAltered)
	}
	if m.Signer != signer.Name() {
		return nil, fmt.Errorf("%w: the manifest names signer %q but key %q signed it", ErrBackupAltered, m.Signer, signer.Name())
	}
	sum := sha256.Sum256(records)
	want, err := hex.DecodeString(m.RecordsSHA256)
	if err != nil || subtle.ConstantTimeCompare(sum[:], want) != 1 {
		return nil, fmt.Errorf("%w: the records do not match the manifest's SHA-256", ErrBackupAltered)
	}
	recs, err := parseBackupRecords(records, m.Prefixes)
	if err != nil {
		return nil, err
	}
	if len(recs) != m.Records {
		return nil, fmt.Errorf("%w: %d records, the manifest says %d", ErrBackupAltered, len(recs), m.Records)
	}
	return &openedBackup{header: h, signer: signer.Name(), records: recs}, nil
}

// ImportBackup opens a backup made by [ExportBackup] and writes its records
// into st. Before writing anything it checks, in this order: the header
// and format version, that the backup is sealed to opts.Key, that it
// opens, that a trusted key signed its manifest (before the records are
// parsed), the manifest against the header, the records' hash and count,
// and every record (under an exported prefix, in key order, readable by
// this server). Then a preflight pass reads every key from st: if any
// holds another value, nothing is written and the error wraps
// ErrBackupConflict. Records already present with the same value are
// skipped, so importing the same backup again changes nothing; the others
// are created with compare-and-swap from revision 0.
//
// The destination should not be written by anyone else during the import:
// a write racing the import that makes a conflict after the preflight
// stops the import part way, with an error saying how many records were
// written.
func ImportBackup(ctx context.Context, st store.Store, data []byte, opts ImportOptions) (ImportSummary, error) {
	if st == nil {
		return ImportSummary{}, fmt.Errorf("%w: ImportBackup needs a store", ErrInvalidArgument)
	}
	ob, err := openBackup(data, opts.Key, opts.Trusted)
	if err != nil {
		return ImportSummary{}, err
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	sum := ImportSummary{
		Header:    ob.header,
		Signer:    ob.signer,
		Records:   len(ob.records),
		PerPrefix: make(map[string]int),
		Age:       now.Sub(ob.header.Created),
	}
	for _, r := range ob.records {
		sum.PerPrefix[backupPrefixOf(r.key)]++
	}

	// Preflight: refuse before the first write.
	present := make([]bool, len(ob.records))
	var conflicts []string
	for i, r := range ob.records {
		kv, err := st.Get(ctx, r.key)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return sum, storeErr(err)
		}
		if !bytes.Equal(kv.Value, r.value) {
			conflicts = append(conflicts, r.key)
			continue
		}
		present[i] = true
	}
	if len(conflicts) > 0 {
		shown := conflicts[:min(len(conflicts), 5)]
		return sum, fmt.Errorf("%w: %d key(s) hold other values (%s); nothing was written", ErrBackupConflict, len(conflicts), strings.Join(shown, ", "))
	}

	for i, r := range ob.records {
		if present[i] {
			sum.Skipped++
			continue
		}
		_, err := st.CompareAndSwap(ctx, r.key, 0, r.value)
		if errors.Is(err, store.ErrConflict) {
			kv, gerr := st.Get(ctx, r.key)
			if gerr == nil && bytes.Equal(kv.Value, r.value) {
				sum.Skipped++
				continue
			}
			return sum, fmt.Errorf("%w: %s was written by someone else during the import; %d record(s) were written before it", ErrBackupConflict, r.key, sum.Written)
		}
		if err != nil {
			return sum, fmt.Errorf("kms: import %s after writing %d record(s): %w", r.key, sum.Written, storeErr(err))
		}
		sum.Written++
	}
	return sum, nil
}

// ---- encoding ----

func formatBackupTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// encode returns the cleartext header: five "name value" lines and a blank
// line.
func (h BackupHeader) encode() []byte {
	return fmt.Appendf(nil, "%s%d\norigin %s\ncreated %s\nsigner %s\nrecipient %s\n\n",
		backupMagic, h.Version, h.Origin, formatBackupTime(h.Created), h.Signer, h.Recipient)
}

// splitBackup parses the cleartext header of data and returns it with its
// length (the sealed part follows it).
func splitBackup(data []byte) (BackupHeader, int, error) {
	var h BackupHeader
	if len(data) > MaxBackupSize {
		return h, 0, fmt.Errorf("%w: %d bytes, at most %d", ErrBackupFormat, len(data), MaxBackupSize)
	}
	if !bytes.HasPrefix(data, []byte(backupMagic)) {
		return h, 0, fmt.Errorf("%w: it does not start with %q", ErrBackupFormat, backupMagic)
	}
	end := bytes.Index(data[:min(len(data), maxBackupHeader)], []byte("\n\n"))
	if end < 0 {
		// Name the version problem first: a later format may lay out its
		// header differently.
		if v, ok := headerVersion(data); ok && v != BackupFormat {
			return h, 0, fmt.Errorf("%w: version %d, this server reads %d", ErrBackupVersion, v, BackupFormat)
		}
		return h, 0, fmt.Errorf("%w: no end of header in the first %d bytes", ErrBackupFormat, maxBackupHeader)
	}
	headerLen := end + 2
	lines := strings.Split(string(data[:end]), "\n")
	v, ok := headerVersion(data)
	if !ok {
		return h, 0, fmt.Errorf("%w: bad first line %.40q", ErrBackupFormat, lines[0])
	}
	if v != BackupFormat {
		return h, 0, fmt.Errorf("%w: version %d, this server reads %d", ErrBackupVersion, v, BackupFormat)
	}
	h.Version = v
	names := []string{"origin", "created", "signer", "recipient"}
	if len(lines) != 1+len(names) {
		return h, 0, fmt.Errorf("%w: header of %d lines, want %d", ErrBackupFormat, len(lines), 1+len(names))
	}
	vals := make([]string, len(names))
	for i, n := range names {
		val, ok := strings.CutPrefix(lines[1+i], n+" ")
		if !ok {
			return h, 0, fmt.Errorf("%w: header line %d: want %q", ErrBackupFormat, i+2, n)
		}
		vals[i] = val
	}
	h.Origin, h.Signer, h.Recipient = vals[0], vals[2], vals[3]
	if err := validateOrigin(h.Origin); err != nil {
		return h, 0, fmt.Errorf("%w: %v", ErrBackupFormat, err)
	}
	t, err := time.Parse(time.RFC3339Nano, vals[1])
	if err != nil {
		return h, 0, fmt.Errorf("%w: created: %v", ErrBackupFormat, err)
	}
	h.Created = t.UTC()
	if !validSignerName(h.Signer) {
		return h, 0, fmt.Errorf("%w: bad signer name %.80q", ErrBackupFormat, h.Signer)
	}
	if b, err := hex.DecodeString(h.Recipient); err != nil || len(b) != sha256.Size || strings.ToLower(h.Recipient) != h.Recipient {
		return h, 0, fmt.Errorf("%w: bad recipient fingerprint", ErrBackupFormat)
	}
	// One encoding only: what was parsed must write back byte for byte.
	if !bytes.Equal(h.encode(), data[:headerLen]) {
		return h, 0, fmt.Errorf("%w: header is not in canonical form", ErrBackupFormat)
	}
	return h, headerLen, nil
}

// headerVersion reads N from a first line "coffre backup vN".
func headerVersion(data []byte) (int, bool) {
	rest := data[len(backupMagic):]
	i := bytes.IndexByte(rest, '\n')
	if i < 1 || i > 9 {
		return 0, false
	}
	s := string(rest[:i])
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 || strconv.Itoa(v) != s {
		return 0, false
	}
	return v, true
}

func validateOrigin(o string) error {
	if o == "" || len(o) > MaxBackupOriginLen {
		return fmt.Errorf("%w: backup origin must be 1 to %d characters", ErrInvalidArgument, MaxBackupOriginLen)
	}
	for i := 0; i < len(o); i++ {
		c := o[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '.', c == '_', c == ':', c == '/', c == '-':
		default:
			return fmt.Errorf("%w: backup origin %q: character %q is not allowed (letters, digits, . _ : / -)", ErrInvalidArgument, o, c)
		}
	}
	return nil
}

// validSignerName accepts what audit accepts as a note key name, bounded.
func validSignerName(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == '+' || c == 0x7f {
			return false
		}
	}
	return true
}

// splitBackupPayload splits the decrypted payload: LP(manifest) ‖
// LP(signature) ‖ records.
func splitBackupPayload(pt []byte) (manifest, sig, records []byte, err error) {
	manifest, rest, ok := cutLP(pt, maxBackupManifest)
	if !ok {
		return nil, nil, nil, fmt.Errorf("%w: bad manifest framing", ErrBackupFormat)
	}
	sig, records, ok = cutLP(rest, audit.MessageSignatureSize)
	if !ok {
		return nil, nil, nil, fmt.Errorf("%w: bad signature framing", ErrBackupFormat)
	}
	return manifest, sig, records, nil
}

// cutLP cuts a 4-byte big-endian length and that many bytes (at most limit)
// from the front of b.
func cutLP(b []byte, limit int) (field, rest []byte, ok bool) {
	if len(b) < 4 {
		return nil, nil, false
	}
	n := binary.BigEndian.Uint32(b)
	if int64(n) > int64(limit) || int64(n) > int64(len(b)-4) {
		return nil, nil, false
	}
	return b[4 : 4+n], b[4+n:], true
}

func parseBackupManifest(b []byte) (*backupManifest, error) {
	var m backupManifest
	if err := strictJSON(b, &m); err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrBackupFormat, err)
	}
	if m.Format != BackupFormat {
		return nil, fmt.Errorf("%w: manifest format %d, this server reads %d", ErrBackupVersion, m.Format, BackupFormat)
	}
	if m.Records < 0 {
		return nil, fmt.Errorf("%w: manifest: negative record count", ErrBackupFormat)
	}
	for i, p := range m.Prefixes {
		if !slices.Contains(backupPrefixes, p) {
			return nil, fmt.Errorf("%w: the backup carries prefix %q, which this server does not know", ErrBackupVersion, p)
		}
		if i > 0 && m.Prefixes[i-1] >= p {
			return nil, fmt.Errorf("%w: manifest prefixes out of order", ErrBackupFormat)
		}
	}
	return &m, nil
}

// parseBackupRecords parses LP(key) ‖ LP(value) pairs: keys strictly
// increasing, each under one of prefixes, each record acceptable to this
// server.
func parseBackupRecords(b []byte, prefixes []string) ([]backupRecord, error) {
	var recs []backupRecord
	for len(b) > 0 {
		k, rest, ok := cutLP(b, store.MaxKeySize)
		if !ok {
			return nil, fmt.Errorf("%w: bad key framing after %d records", ErrBackupFormat, len(recs))
		}
		v, rest, ok := cutLP(rest, store.MaxValueSize)
		if !ok {
			return nil, fmt.Errorf("%w: bad value framing after %d records", ErrBackupFormat, len(recs))
		}
		b = rest
		key := string(k)
		if err := store.CheckKey(key); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBackupRecord, err)
		}
		if n := len(recs); n > 0 && recs[n-1].key >= key {
			return nil, fmt.Errorf("%w: keys out of order at %q", ErrBackupRecord, key)
		}
		p := backupPrefixOf(key)
		if p == "" || !slices.Contains(prefixes, p) {
			return nil, fmt.Errorf("%w: %q is outside the exported prefixes", ErrBackupRecord, key)
		}
		if err := checkBackupRecord(key, v); err != nil {
			return nil, err
		}
		recs = append(recs, backupRecord{key: key, value: v})
	}
	return recs, nil
}

func backupPrefixOf(key string) string {
	for _, p := range backupPrefixes {
		if strings.HasPrefix(key, p) {
			return p
		}
	}
	return ""
}

// checkBackupRecord decodes a record the way this server reads it from its
// store. The error wraps ErrBackupRecord.
func checkBackupRecord(key string, value []byte) error {
	var err error
	switch backupPrefixOf(key) {
	case keyringPrefix:
		_, err = decodeRecord(key, value)
	case ekRootPrefix:
		_, err = decodeEKRoot(key, value)
	case classPrefix:
		_, err = decodeClass(key, value)
	case nodePrefix:
		_, err = decodeNode(key, value)
	case nodeByEKPrefix:
		fp := strings.TrimPrefix(key, nodeByEKPrefix)
		if b, herr := hex.DecodeString(fp); herr != nil || len(b) != sha256.Size || strings.ToLower(fp) != fp {
			err = fmt.Errorf("kms: stored EK index %s: not an EK fingerprint", key)
		} else {
			_, err = decodeNodeIndex(key, value)
		}
	case policyPrefix:
		_, err = decodePolicy(key, value)
	default:
		err = fmt.Errorf("kms: %s is outside the exported prefixes", key)
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBackupRecord, err)
	}
	return nil
}

// ---- stored backups ----

// Stored backups.
//
// A backup may be far larger than a gRPC message or a stored value (see
// [MaxBackupSize]), so the server that runs an approved export does not
// hand it back in the proposal's result: [Service.StoreBackup] keeps it in
// the store, in chunks, and the result carries only its [StoredBackup]
// description, from which admins stream it out. The layout, named by the
// backup's SHA-256 so that the name alone checks the bytes:
//
//	backups/<sha256>/000000 … 000511  the backup, StoredBackupChunkSize bytes each (the last shorter)
//	backups/<sha256>/manifest         JSON: size, SHA-256, chunk count and size, creation time
//
// The manifest is written last: a backup whose manifest is missing is not
// there. Deletion goes the other way (chunks from the last, then the
// manifest), so that an interrupted deletion can be run again. The store is
// not trusted: what is read back is checked against the manifest, and
// readers check the whole against its SHA-256. A stored backup is sealed to
// the DR site's transfer key and signed; it is no more secret than the
// store it was made from, but it takes room, so it stays until deleted.
// Backups are not under [BackupPrefixes]: a backup never carries another.

// StoredBackupChunkSize is the size of a stored backup's chunks: well
// under the store's value limit and etcd's default request limit (1.5 MiB).
const StoredBackupChunkSize = 512 << 10

const (
	storedBackupPrefix  = "backups/"
	storedBackupFormat  = 1
	maxStoredBackupMeta = 4 << 10
)

// ErrStoredBackupDamaged: a stored backup's manifest or chunks are missing,
// malformed or disagree (a deletion interrupted, or the store altered). It
// wraps ErrFailedPrecondition: the remedy is a new export.
var ErrStoredBackupDamaged = fmt.Errorf("%w: stored backup incomplete or damaged", ErrFailedPrecondition)

// StoredBackup describes a backup kept in the store.
type StoredBackup struct {
	// SHA256 is the hash of the whole backup, and its name in the store.
	SHA256 [32]byte
	// Size is the backup's length in bytes.
	Size int64
	// Chunks of ChunkSize bytes hold it, the last shorter.
	Chunks    int
	ChunkSize int
	// Created is when it was stored.
	Created time.Time
}

// ID returns the backup's name: the lowercase hex of its SHA-256.
func (b StoredBackup) ID() string { return hex.EncodeToString(b.SHA256[:]) }

// chunkLen is the length chunk i must have.
func (b StoredBackup) chunkLen(i int) int {
	return int(min(int64(b.ChunkSize), b.Size-int64(i)*int64(b.ChunkSize)))
}

type storedBackupManifest struct {
	Format    int    `json:"format"`
	Size      int64  `json:"size"`
	SHA256    string `json:"sha256"`
	Chunks    int    `json:"chunks"`
	ChunkSize int    `json:"chunk_size"`
	Created   string `json:"created"` // RFC 3339, UTC
}

func storedBackupManifestKey(id string) string { return storedBackupPrefix + id + "/manifest" }

func storedBackupChunkKey(id string, i int) string {
	return fmt.Sprintf("%s%s/%06d", storedBackupPrefix, id, i)
}

// checkStoredBackupID accepts a lowercase hex SHA-256.
func checkStoredBackupID(id string) error {
	if b, err := hex.DecodeString(id); err != nil || len(b) != sha256.Size || strings.ToLower(id) != id {
		return fmt.Errorf("%w: stored backup id %.80q: want 64 lowercase hex digits", ErrInvalidArgument, id)
	}
	return nil
}

// StoreBackup keeps data (a backup made by [ExportBackup]) in the store
// and returns its description. Chunks already written are removed, best
// effort, if a later write fails.
func (s *Service) StoreBackup(ctx context.Context, data []byte) (StoredBackup, error) {
	if len(data) == 0 || len(data) > MaxBackupSize {
		return StoredBackup{}, fmt.Errorf("%w: a backup of %d bytes (1 to %d)", ErrInvalidArgument, len(data), MaxBackupSize)
	}
	b := StoredBackup{
		SHA256:    sha256.Sum256(data),
		Size:      int64(len(data)),
		Chunks:    (len(data) + StoredBackupChunkSize - 1) / StoredBackupChunkSize,
		ChunkSize: StoredBackupChunkSize,
		Created:   s.now().UTC().Round(0),
	}
	id := b.ID()
	written := 0
	undo := func(err error) (StoredBackup, error) {
		// Chunks without a manifest are never read; they only take room.
		for i := written - 1; i >= 0; i-- {
			_ = s.store.Delete(context.WithoutCancel(ctx), storedBackupChunkKey(id, i), 0) // best effort: err says what failed
		}
		return StoredBackup{}, err
	}
	for i := range b.Chunks {
		off := i * StoredBackupChunkSize
		_, err := s.store.CompareAndSwap(ctx, storedBackupChunkKey(id, i), 0, data[off:off+b.chunkLen(i)])
		if errors.Is(err, store.ErrConflict) {
			// The same bytes stored already: an export is sealed with fresh
			// randomness, so this is not another export of the same store.
			return undo(fmt.Errorf("%w: a backup with SHA-256 %s is stored already", ErrExists, id))
		}
		if err != nil {
			return undo(storeErr(err))
		}
		written++
	}
	m := mustJSON(storedBackupManifest{
		Format: storedBackupFormat, Size: b.Size, SHA256: id, Chunks: b.Chunks, ChunkSize: b.ChunkSize,
		Created: b.Created.Format(time.RFC3339Nano),
	})
	if _, err := s.store.CompareAndSwap(ctx, storedBackupManifestKey(id), 0, m); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return undo(fmt.Errorf("%w: a backup with SHA-256 %s is stored already", ErrExists, id))
		}
		return undo(storeErr(err))
	}
	return b, nil
}

// GetStoredBackup returns the description of the stored backup whose
// SHA-256 is id (lowercase hex). A missing backup is ErrNotFound; a
// manifest that does not parse or disagrees with its name is
// ErrStoredBackupDamaged.
func (s *Service) GetStoredBackup(ctx context.Context, id string) (StoredBackup, error) {
	if err := checkStoredBackupID(id); err != nil {
		return StoredBackup{}, err
	}
	kv, err := s.store.Get(ctx, storedBackupManifestKey(id))
	if errors.Is(err, store.ErrNotFound) {
		return StoredBackup{}, fmt.Errorf("%w: no stored backup %s (deleted?)", ErrNotFound, id)
	}
	if err != nil {
		return StoredBackup{}, storeErr(err)
	}
	return parseStoredBackupManifest(id, kv.Value)
}

// parseStoredBackupManifest decodes and checks a stored manifest named id.
func parseStoredBackupManifest(id string, value []byte) (StoredBackup, error) {
	bad := func(why string) (StoredBackup, error) {
		return StoredBackup{}, fmt.Errorf("%w: backup %s: manifest: %s", ErrStoredBackupDamaged, id, why)
	}
	if len(value) > maxStoredBackupMeta {
		return bad("too long")
	}
	var m storedBackupManifest
	if err := strictJSON(value, &m); err != nil {
		return bad(err.Error())
	}
	if m.Format != storedBackupFormat {
		return bad(fmt.Sprintf("format %d, this server reads %d", m.Format, storedBackupFormat))
	}
	if m.SHA256 != id {
		return bad("it names another backup")
	}
	if m.Size < 1 || m.Size > MaxBackupSize || m.ChunkSize < 1 || m.ChunkSize > store.MaxValueSize {
		return bad("size or chunk size out of range")
	}
	if int64(m.Chunks) != (m.Size+int64(m.ChunkSize)-1)/int64(m.ChunkSize) {
		return bad("chunk count does not match the size")
	}
	created, err := time.Parse(time.RFC3339Nano, m.Created)
	if err != nil {
		return bad("created: " + err.Error())
	}
	b := StoredBackup{Size: m.Size, Chunks: m.Chunks, ChunkSize: m.ChunkSize, Created: created.UTC()}
	if n, err := hex.Decode(b.SHA256[:], []byte(id)); err != nil || n != sha256.Size {
		return bad("bad name")
	}
	return b, nil
}

// ReadStoredBackupChunk returns chunk i of stored backup b, checking its
// length; a missing chunk or one of another length is
// ErrStoredBackupDamaged. The caller checks the whole against b.SHA256.
func (s *Service) ReadStoredBackupChunk(ctx context.Context, b StoredBackup, i int) ([]byte, error) {
	if i < 0 || i >= b.Chunks {
		return nil, fmt.Errorf("%w: chunk %d of a backup of %d chunks", ErrInvalidArgument, i, b.Chunks)
	}
	kv, err := s.store.Get(ctx, storedBackupChunkKey(b.ID(), i))
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: backup %s: chunk %d of %d is missing", ErrStoredBackupDamaged, b.ID(), i, b.Chunks)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	if len(kv.Value) != b.chunkLen(i) {
		return nil, fmt.Errorf("%w: backup %s: chunk %d is %d bytes, want %d", ErrStoredBackupDamaged, b.ID(), i, len(kv.Value), b.chunkLen(i))
	}
	return kv.Value, nil
}

// DeleteStoredBackup deletes the stored backup whose SHA-256 is id: its
// chunks from the last, then its manifest. Run again after an
// interruption, it finishes the job; with nothing left it is ErrNotFound.
func (s *Service) DeleteStoredBackup(ctx context.Context, id string) error {
	if err := checkStoredBackupID(id); err != nil {
		return err
	}
	kv, err := s.store.Get(ctx, storedBackupManifestKey(id))
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("%w: no stored backup %s (deleted already?)", ErrNotFound, id)
	}
	if err != nil {
		return storeErr(err)
	}
	del := func(key string) (bool, error) {
		err := s.store.Delete(ctx, key, 0)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, storeErr(err)
		}
		return true, nil
	}
	if b, err := parseStoredBackupManifest(id, kv.Value); err == nil {
		for i := b.Chunks - 1; i >= 0; i-- {
			if _, err := del(storedBackupChunkKey(id, i)); err != nil {
				return err
			}
		}
	} else {
		// A damaged manifest does not say how many chunks there are; they
		// were written from 0 and are deleted from the last, so what is
		// left runs from 0 without a gap.
		for i := 0; ; i++ {
			ok, err := del(storedBackupChunkKey(id, i))
			if err != nil {
				return err
			}
			if !ok {
				break
			}
		}
	}
	if _, err := del(storedBackupManifestKey(id)); err != nil {
		return err
	}
	return nil
}
