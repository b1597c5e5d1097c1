package kms

import (
	"errors"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms/store"
)

// Sentinel errors. Callers match them with errors.Is; the server layer maps
// each to one gRPC status code.
var (
	// ErrInvalidArgument: the request is malformed (a name, a context, an
	// envelope that does not parse). The wrapping error says what and why.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotFound: no such keyring.
	ErrNotFound = errors.New("not found")
	// ErrExists: a keyring by that name exists already.
	ErrExists = errors.New("already exists")
	// ErrFailedPrecondition: the keyring's state does not allow the
	// operation (for example, no version may encrypt).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrUnavailable: the HSM or the store cannot be reached; retry later.
	ErrUnavailable = errors.New("unavailable")
	// ErrDecrypt is the one error of every decryption failure, whatever the
	// cause: wrong tenant, keyring or context, tampering, truncation, an
	// unknown or destroyed version. It carries no detail on purpose.
	ErrDecrypt = errors.New("decryption failed")
)

// KeyState is the NIST SP 800-57 state of a KEK version.
type KeyState int

const (
	StateUnspecified KeyState = iota
	// StateActive versions encrypt (the primary) and decrypt.
	StateActive
	// StateDeactivated versions decrypt only.
	StateDeactivated
	// StateDisabled versions neither encrypt nor decrypt, reversibly
	// ([Service.EnableVersion]).
	StateDisabled
	// StateDestroyScheduled versions neither encrypt nor decrypt and are
	// destroyed at their DestroyTime unless [Service.CancelDestroy] returns
	// them to StateDisabled first (to StateCompromised, if they were).
	StateDestroyScheduled
	// StateDestroyed versions have had their KEK erased (crypto-shred): no
	// envelope under them opens again. DestroyTime says when it was due.
	StateDestroyed
	// StateCompromised versions are believed known to someone else
	// ([Service.MarkCompromised]): they never encrypt again and are never
	// the primary. One that decrypted when marked (active or deactivated)
	// decrypts only so that its envelopes can be rewrapped before the
	// version is destroyed (NIST SP 800-57: "process" only); one that did
	// not (disabled or pre-active) never decrypts. A compromised version
	// cannot be enabled or disabled, only scheduled for destruction, and
	// cancelling that returns it to StateCompromised but it never decrypts
	// again: what a compromised version may do only shrinks.
	StateCompromised
	// StatePreActive versions exist (their KEK is made and wrapped) but
	// neither encrypt nor decrypt until promoted to primary
	// ([Service.AddVersion], [Service.PromoteVersion]): a version can be
	// staged — backed up to a DR site, say — before anything depends on it.
	// A keyring has at most one, its newest version.
	StatePreActive
)

// KeyVersion describes one KEK version of a keyring; it never holds key
// material.
type KeyVersion struct {
	Version    uint32
	State      KeyState
	CreateTime time.Time
	RootID     string // the HSM root that wrapped it
	// DestroyTime is when a StateDestroyScheduled version will be
	// destroyed, or when a StateDestroyed one was due; zero otherwise.
	DestroyTime time.Time
}

// Keyring is the public description of a keyring.
type Keyring struct {
	ID         KeyringID
	CreateTime time.Time
	Primary    uint32 // the version that encrypts, when it is StateActive
	Versions   []KeyVersion
	// RotationPeriod is how often [Service.RotateDue] rotates the keyring
	// (0: never); NextRotationTime is when it next will (zero: never).
	RotationPeriod   time.Duration
	NextRotationTime time.Time
	// MinDecryptionVersion: envelopes under a lower version do not open
	// (0 or 1: no limit).
	MinDecryptionVersion uint32
}

// DataKey is a freshly generated data key: its plaintext, which the caller
// must seal or zeroize, and its envelope, which may be stored anywhere.
type DataKey struct {
	Plaintext  *Secret
	Envelope   []byte
	KeyringID  KeyringID
	KeyVersion uint32
}

// Config configures a [Service].
type Config struct {
	Store store.Store
	// Root wraps every new KEK version (hsm.NewDual for two vendors).
	Root hsm.Root
	// PreviousRoots are roots that KEK versions may still be wrapped by
	// during a root rotation ([Service.RotateRoot]): they only unwrap.
	// Their IDs must differ from each other and from Root's.
	PreviousRoots []hsm.Root
	// RootAliases are other IDs of Root itself: the same key restored
	// under other labels (a DR site's HSM, after `coffrectl ceremony
	// restore`), so that KEK versions recorded under the primary's root ID
	// unwrap here. Naming a different key here releases nothing: its
	// unwrap fails authentication. A root rotation rewrites such versions
	// under Root's own ID.
	RootAliases []string
	// CacheSize bounds the number of unwrapped KEK versions held in memory
	// (default 1024); CacheTTL bounds how long one stays (default 10m).
	CacheSize int
	CacheTTL  time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}
