package agent

import "errors"

// Sentinels that callers match with errors.Is. Every error this package
// returns wraps at most one of them plus, where a TPM answered, the TPM's
// response code (match those with errors.Is against go-tpm's tpm2.TPMRC
// constants).
var (
	// ErrTPMSpec: OpenTPM was given a TPM location it does not understand.
	ErrTPMSpec = errors.New("agent: unsupported TPM location")
	// ErrSimulatorBusy: a TPM simulator is already open in this process;
	// the reference simulator is a process-wide singleton.
	ErrSimulatorBusy = errors.New("agent: a TPM simulator is already open in this process")
	// ErrTransport: talking to the TPM failed (connection, framing, timeout).
	ErrTransport = errors.New("agent: TPM transport")
	// ErrClosed: the Agent (or the Client) was closed.
	ErrClosed = errors.New("agent: closed")
	// ErrPCRSelection: a PCR list is not a valid SHA-256 bank selection
	// (index outside 0..23, duplicate).
	ErrPCRSelection = errors.New("agent: invalid PCR selection")
	// ErrPCRChanged: the PCRs kept changing between the quote and reading
	// their values, so no consistent set could be produced.
	ErrPCRChanged = errors.New("agent: PCRs changed while quoting")
	// ErrMalformed: input from the server (challenge, credential, sealed
	// key, session) is not well-formed. The error names the field.
	ErrMalformed = errors.New("agent: malformed input")
	// ErrOpen: a released data key could not be opened. Deliberately one
	// error whatever the cryptographic cause (wrong envelope, wrong key,
	// tampered ciphertext), so that it is no oracle.
	ErrOpen = errors.New("agent: cannot open released key")
	// ErrPCRPolicy: the TPM refused to unseal a TPM-bound key because this
	// machine's PCRs are not in the state the key is bound to. It always
	// comes together with ErrOpen.
	ErrPCRPolicy = errors.New("agent: PCR state differs from the one the key is bound to")
	// ErrNoSession: the server did not issue a usable session (no token,
	// no valid expiry, or no session_enc to derive the session key from).
	ErrNoSession = errors.New("agent: no session")
)
