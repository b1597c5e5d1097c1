// Package agent is the node side of Coffre's attested release: it owns the
// node's TPM identity (EK, AK), the attestation handshake, the opening of
// released data keys, and the Go client that storage software embeds.
//
// The verifier is the separate package attest; the two meet only in the
// wire messages of proto/coffre/v1.
//
// # Embedding the client
//
//	tpm, err := agent.OpenTPM("/dev/tpmrm0") // or "simulator:42", "swtpm://127.0.0.1:2321"
//	if err != nil { ... }
//	defer tpm.Close()
//	a, err := agent.New(ctx, tpm, agent.Options{})
//	if err != nil { ... }
//	defer a.Close()
//
//	pool := x509.NewCertPool() // the Coffre server's CA
//	pool.AppendCertsFromPEM(caPEM)
//	conn, err := grpc.NewClient("coffre.example:8443", grpc.WithTransportCredentials(
//		credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13})))
//	if err != nil { ... }
//	defer conn.Close()
//
//	c := agent.NewClient(conn, a, agent.ClientOptions{})
//	defer c.Close()
//	key, envelope, err := c.GenerateDataKey(ctx, "tenant/volumes", map[string]string{"volume": "v-17"})
//	// encrypt with key (AES-256), store envelope next to the ciphertext,
//	// forget key; later: key, err = c.Decrypt(ctx, envelope, sameContext)
//
// # What it guarantees
//
//   - A data key reaches this process only sealed: under the session
//     release key, which the server shared with this Agent once per
//     session by HPKE to the binding key — an X-Wing (ML-KEM-768 + X25519)
//     key that exists only in this Agent's memory and was bound to the
//     TPM quote of the session; or as a TPM duplicate that only this TPM,
//     in the PCR state of the node's class, will unseal. A session-sealed
//     key is bound to its envelope and its session, so a key released for
//     one envelope or session does not open as another's (kms/ENVELOPE.md,
//     "Release sealing", specifies the sealing). The session key is wiped
//     when the session is replaced (once the calls in flight on it are
//     done), on Client.Close and on Agent.Close.
//   - Attestation happens per session, never per request: the Client
//     attests on first use and again when the session is within
//     ClientOptions.ReattestBefore of expiry, and once more (retrying the
//     call once) when the server says the session is unknown or expired
//     (codes.Unauthenticated, which includes a session that reached its
//     2^32 releases). A refusal (codes.PermissionDenied: keyring
//     policy, revoked node) is returned as is and never retried.
//   - Every gRPC call has a deadline (ClientOptions.CallTimeout).
//   - On swtpm or a raw TPM device, which have no resource manager, every
//     transient handle the Agent creates is flushed on every path; the EK
//     and AK stay loaded until Agent.Close.
//
// # TPMs
//
// OpenTPM opens a hardware TPM, swtpm (TCP or Unix socket) or the
// reference TPM simulator; the simulator is a process-wide singleton, so
// only one can be open at a time. The fixed-seed simulator
// ("simulator:SEED") has the same EK and AK on every run, which lets a
// development node stay enrolled; it is insecure by design. Package
// attest/agent/swtpmtest starts a real swtpm with an EK certificate for
// tests.
//
// # Errors
//
// Callers match sentinels with errors.Is: ErrOpen (a released key did not
// open, whatever the cause), ErrPCRPolicy (the TPM refused because of the
// PCR state), ErrMalformed (bad input from the server), ErrPCRSelection,
// ErrPCRChanged, ErrNoSession, ErrTPMSpec, ErrSimulatorBusy, ErrTransport,
// ErrClosed (the Agent or the Client was closed). Errors from the server keep their gRPC status (status.Code
// works on them); TPM response codes match go-tpm's tpm2.TPMRC constants.
package agent
