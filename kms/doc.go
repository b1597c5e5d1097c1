// Package kms owns Coffre's key hierarchy: keyrings per tenant, their KEK
// versions wrapped by the HSM root, and the data-key envelopes made under
// them. It holds no transport code; kms/server puts it on the wire.
//
// # Hierarchy
//
// The root key lives in an HSM ([hsm.Root]) and never leaves it. Each
// keyring ("tenant/name") has numbered KEK versions: random AES-256 keys,
// stored only wrapped by the root, with associated data binding the wrap to
// the keyring's identity and the version number so that a store attacker
// cannot move a wrapped KEK to another keyring or version. The newest
// version is the primary and encrypts; older versions are deactivated and
// only decrypt. Unwrapped KEKs are cached in memory ([Config.CacheSize],
// [Config.CacheTTL]) and zeroized on eviction and on [Service.Close]; the
// HSM is touched only on a cache miss.
//
// # Envelopes
//
// A data key is a random AES-256 key returned with its envelope: the data
// key encrypted under the primary KEK, naming its keyring and KEK version.
// The format is specified in ENVELOPE.md beside this file. Decryption
// failures of any kind return the single error [ErrDecrypt].
//
// # Secrets
//
// Key material is held in [Secret], which zeroizes and never prints.
package kms
