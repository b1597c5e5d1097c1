// Package pkcs11 implements [hsm.Root] on a PKCS#11 token: it owns Coffre's
// connection to the HSM (loading the module, finding the token, logging in,
// a pool of sessions, reconnecting), the creation of root keys and the
// wrapping of KEKs under them. It is the only package in Coffre that talks
// to a PKCS#11 library.
//
// A root is named by an RFC 7512 URI (see [hsm.ParseURI]), for example
//
//	pkcs11:token=coffre;object=root-2026?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/coffre/hsm-pin
//
// # Wrapping
//
// [Root.Wrap] encrypts with CKM_AES_GCM inside the token under a 12-byte IV
// from crypto/rand and a 128-bit tag, with the caller's associated data as
// GCM AAD. The output is one format byte (0x01), the IV, then ciphertext and
// tag. Random 96-bit IVs keep the collision probability negligible for the
// number of KEKs a root ever wraps (far below the 2^32 NIST SP 800-38D limit).
// [Root.Unwrap] reports every failure that depends on the wrapped bytes or
// the associated data as [hsm.ErrUnwrap] and nothing more.
//
// # Root keys
//
// [CreateRoot] generates an AES-256 key on the token with every security
// attribute set explicitly (token, private, not modifiable, sensitive, never
// extractable, encrypt and decrypt only). [Open] and every reconnect read the
// attributes back and refuse a key that is a session object, public (usable
// without logging in), modifiable, extractable, not sensitive, not AES-256,
// or able to wrap, unwrap or derive.
//
// # Availability
//
// When the library, the token, a session or the login goes away, calls fail
// with an error wrapping [hsm.ErrUnavailable] and the [Root] recovers by
// itself when the HSM is back: it drops its sessions, initialises the
// library again if it was finalised (or if the token is missing, since some
// libraries only rediscover tokens in C_Initialize), finds the token by its
// label (or serial or slot id), logs in, finds the key again and retries the
// call once. Reconnect attempts are at least [Config.RetryInterval] apart. A
// login refused for the PIN itself is not retried, so that the token's
// retry counter is not run down; that Root must be reopened.
//
// # Process-global state
//
// A PKCS#11 library is initialised once per process, whatever the number of
// callers. This package keeps one reference-counted handle per module path:
// C_Initialize (with CKF_OS_LOCKING_OK) on first use, C_Finalize when the
// last [Root] or [InitToken] call is done. The library itself stays loaded.
// SoftHSM reads SOFTHSM2_CONF in C_Initialize, so once every Root on a
// module is closed, the next Open sees a changed SOFTHSM2_CONF; tests rely
// on that (see package hsmtest).
//
// Someone else in the process calling C_Finalize or C_CloseAllSessions on
// the same library is survived as described above. Handles from before a
// re-initialisation done by this package are never passed to the library
// again, since the numbers may since have been given to other sessions.
//
// # Secrets
//
// The user PIN is read from the pin-source file once, at Open, and kept for
// re-login. Login state belongs to the process and the token, not to a
// Root: a second Root on a token this process is already logged in to gets
// "already logged in" from the token, which does not look at its PIN. Unwrapped plaintext is returned in a slice the caller owns and
// zeroizes; miekg/pkcs11 copies it out of a C buffer that it frees without
// clearing, which this package cannot change.
package pkcs11
