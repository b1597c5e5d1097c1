package kms

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"
)

// keyringPrefix is where keyrings live in the store: keyrings/TENANT/NAME.
const keyringPrefix = "keyrings/"

func keyringKey(id KeyringID) string { return keyringPrefix + id.Tenant + "/" + id.Name }

// recordFormat is the version of the stored keyring encoding that this
// server writes, unless the record needs [recordFormatCompromised]. Format
// 2 added the lifecycle (states disabled, destroy_scheduled and destroyed,
// destroy_time, rotation period, next rotation, minimum decryption
// version). Format 1 records are still read: they are format 2 records
// without any of those. The number was bumped, rather than the fields
// added silently, so that a server of format 1 in a mixed cluster refuses a
// format 2 record instead of ignoring its minimum decryption version and
// decrypting what it must not.
const recordFormat = 2

// recordFormatV1 is the format before the lifecycle, read but not written.
const recordFormatV1 = 1

// recordFormatCompromised is format 2 plus the compromised mark of versions
// that are no longer in state compromised (versionRecord.Compromised). Only
// records that carry the mark are written in it: a format 2 server in a
// mixed cluster keeps serving every other keyring, and refuses these
// instead of dropping the mark and enabling a compromised version again.
const recordFormatCompromised = 3

// keyringRecord is a keyring as stored. One record holds every version, so
// a rotation is one compare-and-swap: a crash leaves the old record or the
// new one, never a keyring with zero or two primaries.
type keyringRecord struct {
	Format     int             `json:"format"`
	Tenant     string          `json:"tenant"`
	Name       string          `json:"name"`
	UID        []byte          `json:"uid"` // random per incarnation of the name
	CreateTime time.Time       `json:"create_time"`
	Primary    uint32          `json:"primary"`
	Versions   []versionRecord `json:"versions"`

	// RotationPeriod (nanoseconds) is how often RotateDue rotates the
	// keyring; 0 means never. NextRotationTime is set exactly when it is.
	RotationPeriod   time.Duration `json:"rotation_period,omitzero"`
	NextRotationTime time.Time     `json:"next_rotation_time,omitzero"`
	// MinDecryptionVersion: versions below it refuse to decrypt. 0 and 1
	// both mean every version may.
	MinDecryptionVersion uint32 `json:"min_decryption_version,omitzero"`
}

type versionRecord struct {
	Version    uint32    `json:"version"`
	State      string    `json:"state"`
	CreateTime time.Time `json:"create_time"`
	RootID     string    `json:"root_id"`
	// Wrapped is the KEK wrapped by the root: never plaintext. It is nil
	// exactly when the version is destroyed.
	Wrapped []byte `json:"wrapped,omitempty"`
	// DestroyTime is when a destroy_scheduled version becomes due, and when
	// a destroyed one was due; zero in every other state.
	DestroyTime time.Time `json:"destroy_time,omitzero"`
	// Compromised marks a version that was marked compromised and is in
	// another state since: disabled (it did not decrypt when marked, or its
	// destruction was cancelled; reported as compromised), destroy_scheduled
	// or destroyed. The mark is never cleared, so that no cancelled
	// destruction or enabling returns the version to service. A version in
	// state compromised is marked by its state alone and does not carry it.
	Compromised bool `json:"compromised,omitempty"`
}

var stateNames = map[KeyState]string{
	StateActive:           "active",
	StateDeactivated:      "deactivated",
	StateDisabled:         "disabled",
	StateDestroyScheduled: "destroy_scheduled",
	StateDestroyed:        "destroyed",
	StateCompromised:      "compromised",
	StatePreActive:        "pre_active",
}

// String returns the state's name as stored and printed.
func (s KeyState) String() string {
	if n, ok := stateNames[s]; ok {
		return n
	}
	return fmt.Sprintf("KeyState(%d)", int(s))
}

func parseState(s string) (KeyState, bool) {
	for k, v := range stateNames {
		if v == s {
			return k, true
		}
	}
	return StateUnspecified, false
}

func (r *keyringRecord) id() KeyringID { return KeyringID{Tenant: r.Tenant, Name: r.Name} }

// state is v's state; decodeRecord has checked that it parses.
func (v *versionRecord) state() KeyState {
	st, _ := parseState(v.State)
	return st
}

// compromised reports whether v was ever marked compromised.
func (v *versionRecord) compromised() bool {
	return v.Compromised || v.state() == StateCompromised
}

// publicState is v's state as the API reports it: a compromised version
// that does not decrypt is disabled as stored, but compromised to callers
// until it is scheduled for destruction.
func (v *versionRecord) publicState() KeyState {
	if st := v.state(); !v.Compromised || st != StateDisabled {
		return st
	}
	return StateCompromised
}

// decrypts reports whether envelopes under version v of r may be opened:
// its state allows it and it is not below the minimum decryption version.
// A version marked compromised decrypts only in state compromised, never
// with the Compromised field (decodeRecord allows that field only in
// states that do not decrypt).
func (r *keyringRecord) decrypts(v *versionRecord) bool {
	st := v.state()
	return (st == StateActive || st == StateDeactivated || st == StateCompromised) && v.Version >= r.MinDecryptionVersion
}

// format is the format that r is written in: the oldest that holds it.
func (r *keyringRecord) format() int {
	for i := range r.Versions {
		if r.Versions[i].Compromised {
			return recordFormatCompromised
		}
	}
	return recordFormat
}

func (r *keyringRecord) version(v uint32) *versionRecord {
	for i := range r.Versions {
		if r.Versions[i].Version == v {
			return &r.Versions[i]
		}
	}
	return nil
}

// decodeRecord parses and checks a stored keyring. The store is not
// trusted, so a record that breaks an invariant is refused, not repaired.
func decodeRecord(key string, b []byte) (*keyringRecord, error) {
	var r keyringRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("kms: stored keyring %s: %v", key, err)
	}
	if r.Format < recordFormatV1 || r.Format > recordFormatCompromised {
		return nil, fmt.Errorf("kms: stored keyring %s: format %d, this server reads %d to %d", key, r.Format, recordFormatV1, recordFormatCompromised)
	}
	if err := r.id().Validate(); err != nil || keyringKey(r.id()) != key {
		return nil, fmt.Errorf("kms: stored keyring %s names %s", key, r.id())
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("kms: stored keyring %s: %s", key, fmt.Sprintf(format, args...))
	}
	if len(r.UID) != 16 {
		return nil, bad("uid of %d bytes", len(r.UID))
	}
	if len(r.Versions) == 0 || r.Primary < 1 || int(r.Primary) > len(r.Versions) {
		return nil, bad("primary %d of %d versions", r.Primary, len(r.Versions))
	}
	if r.MinDecryptionVersion > r.Primary {
		return nil, bad("minimum decryption version %d above the primary %d", r.MinDecryptionVersion, r.Primary)
	}
	if r.RotationPeriod != 0 {
		if err := checkRotationPeriod(r.RotationPeriod); err != nil {
			return nil, bad("%v", err)
		}
	}
	if (r.RotationPeriod == 0) != r.NextRotationTime.IsZero() {
		return nil, bad("rotation period %v with next rotation %v", r.RotationPeriod, r.NextRotationTime)
	}
	lifecycle := r.RotationPeriod != 0 || r.MinDecryptionVersion != 0
	active, marked := 0, false
	for i, v := range r.Versions {
		st, ok := parseState(v.State)
		if !ok {
			return nil, bad("version %d has unknown state %q", v.Version, v.State)
		}
		if v.Version != uint32(i+1) { // #nosec G115 -- i < len(Versions), bounded by the value size
			return nil, bad("versions not numbered 1..n")
		}
		if st == StateActive {
			active++
			if v.Version != r.Primary {
				return nil, bad("active version %d is not the primary %d", v.Version, r.Primary)
			}
		}
		if st == StatePreActive && (i != len(r.Versions)-1 || v.Version == r.Primary) {
			return nil, bad("pre-active version %d is not the newest version, or is the primary", v.Version)
		}
		// Crypto-shred: a destroyed version keeps no wrapped bytes, and a
		// version that lost them without being destroyed is damage, not a
		// state.
		if (st == StateDestroyed) != (len(v.Wrapped) == 0) {
			return nil, bad("version %d is %s with %d wrapped bytes", v.Version, st, len(v.Wrapped))
		}
		scheduled := st == StateDestroyScheduled || st == StateDestroyed
		if scheduled == v.DestroyTime.IsZero() {
			return nil, bad("version %d is %s with destroy time %v", v.Version, st, v.DestroyTime)
		}
		if st != StateActive && st != StateDeactivated {
			lifecycle = true
		}
		// The mark goes only with states that neither encrypt nor decrypt:
		// a compromised version that does either is in state compromised.
		if v.Compromised {
			marked = true
			if st != StateDisabled && st != StateDestroyScheduled && st != StateDestroyed {
				return nil, bad("version %d is %s and marked compromised", v.Version, st)
			}
		}
	}
	if active > 1 {
		return nil, bad("%d active versions, want at most 1", active)
	}
	if marked && r.Format < recordFormatCompromised {
		return nil, bad("format %d record marks versions compromised, which takes format %d", r.Format, recordFormatCompromised)
	}
	if r.Format == recordFormatV1 && (lifecycle || active != 1) {
		return nil, bad("format %d record uses lifecycle states or fields of format %d", recordFormatV1, recordFormat)
	}
	return &r, nil
}

func (r *keyringRecord) encode() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err) // only plain types: cannot fail
	}
	return b
}

// public describes r without key material.
func (r *keyringRecord) public() *Keyring {
	k := &Keyring{
		ID: r.id(), CreateTime: r.CreateTime, Primary: r.Primary,
		RotationPeriod: r.RotationPeriod, NextRotationTime: r.NextRotationTime,
		MinDecryptionVersion: r.MinDecryptionVersion,
	}
	for _, v := range r.Versions {
		k.Versions = append(k.Versions, KeyVersion{
			Version: v.Version, State: v.publicState(), CreateTime: v.CreateTime, RootID: v.RootID, DestroyTime: v.DestroyTime,
		})
	}
	return k
}

// kekAAD is what the HSM root authenticates with a wrapped KEK: the keyring
// incarnation and the version number. A wrapped KEK copied to another
// keyring, incarnation or version by someone who can write the store no
// longer unwraps.
func kekAAD(r *keyringRecord, version uint32) []byte {
	aad := []byte("coffre kek v1")
	aad = appendLP(aad, []byte(r.id().String()))
	aad = appendLP(aad, r.UID)
	return binary.BigEndian.AppendUint32(aad, version)
}
