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

// recordFormat is the version of the stored keyring encoding.
const recordFormat = 1

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
}

type versionRecord struct {
	Version    uint32    `json:"version"`
	State      string    `json:"state"`
	CreateTime time.Time `json:"create_time"`
	RootID     string    `json:"root_id"`
	Wrapped    []byte    `json:"wrapped"` // the KEK wrapped by the root: never plaintext
}

var stateNames = map[KeyState]string{StateActive: "active", StateDeactivated: "deactivated"}

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
	if r.Format != recordFormat {
		return nil, fmt.Errorf("kms: stored keyring %s: format %d, this server reads %d", key, r.Format, recordFormat)
	}
	if err := r.id().Validate(); err != nil || keyringKey(r.id()) != key {
		return nil, fmt.Errorf("kms: stored keyring %s names %s", key, r.id())
	}
	if len(r.UID) != 16 {
		return nil, fmt.Errorf("kms: stored keyring %s: uid of %d bytes", key, len(r.UID))
	}
	active := 0
	for i, v := range r.Versions {
		st, ok := parseState(v.State)
		if !ok {
			return nil, fmt.Errorf("kms: stored keyring %s: version %d has unknown state %q", key, v.Version, v.State)
		}
		if v.Version != uint32(i+1) {
			return nil, fmt.Errorf("kms: stored keyring %s: versions not numbered 1..n", key)
		}
		if st == StateActive {
			active++
			if v.Version != r.Primary {
				return nil, fmt.Errorf("kms: stored keyring %s: active version %d is not the primary %d", key, v.Version, r.Primary)
			}
		}
	}
	if active != 1 {
		return nil, fmt.Errorf("kms: stored keyring %s: %d active versions, want exactly 1", key, active)
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
	k := &Keyring{ID: r.id(), CreateTime: r.CreateTime, Primary: r.Primary}
	for _, v := range r.Versions {
		st, _ := parseState(v.State)
		k.Versions = append(k.Versions, KeyVersion{Version: v.Version, State: st, CreateTime: v.CreateTime, RootID: v.RootID})
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
