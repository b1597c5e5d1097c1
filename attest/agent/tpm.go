package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// Bounds on the raw TPM framing. No TPM command or response this package
// sends or expects comes near them (TPM 2.0 implementations cap buffers at
// a few KiB); they exist so that a confused or hostile peer cannot make us
// allocate without limit.
const (
	tpmHeaderSize    = 10
	maxTPMCommand    = 1 << 16
	maxTPMResponse   = 1 << 16
	swtpmDialTimeout = 10 * time.Second
	// swtpmCommandTimeout bounds one command when the caller's context has
	// no earlier deadline: RSA primary key generation in swtpm takes
	// hundreds of milliseconds, a minute means the peer is gone.
	swtpmCommandTimeout = time.Minute
)

// simulatorOpen is set while OpenTPM's simulator is open. The reference
// simulator keeps its state in C globals, so a process can have only one;
// go-tpm-tools would block a second Get until the first closes, which in a
// server or a test is a silent deadlock, so we refuse at once instead.
var simulatorOpen atomic.Bool

// OpenTPM opens the TPM named by spec:
//
//   - "simulator": a fresh TPM simulator (the Microsoft reference TPM
//     linked in through go-tpm-tools) with random seeds;
//   - "simulator:SEED": a simulator whose hierarchy seeds derive from the
//     decimal int64 SEED, so that its EK and AK are the same on every run.
//     This is insecure by design and exists for the development loop, where
//     a simulated node must stay enrolled between agent runs;
//   - "swtpm://HOST:PORT": the TCP server socket of swtpm (started with
//     --flags not-need-init,startup-clear so that no control-channel INIT
//     is needed);
//   - "unix:///PATH": swtpm's Unix-socket server;
//   - an absolute device path such as "/dev/tpmrm0" (prefer the kernel's
//     resource manager tpmrm* over the raw tpm* device).
//
// Only one simulator can be open per process: a second OpenTPM of a
// simulator before the first is closed fails with ErrSimulatorBusy.
// Anything else fails with ErrTPMSpec.
func OpenTPM(spec string) (transport.TPMCloser, error) {
	loc, err := parseTPMSpec(spec)
	if err != nil {
		return nil, err
	}
	switch loc.kind {
	case tpmSimulator:
		return openSimulator(loc.seed, loc.fixedSeed)
	case tpmSWTPM:
		return dialSWTPM(loc.addr), nil
	case tpmUnix:
		t, err := linuxudstpm.Open(loc.path)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrTransport, spec, err)
		}
		return t, nil
	default: // tpmDevice
		t, err := linuxtpm.Open(loc.path)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrTransport, spec, err)
		}
		return &deviceTPM{TPMCloser: t, path: loc.path}, nil
	}
}

type tpmKind int

const (
	tpmSimulator tpmKind = iota
	tpmSWTPM
	tpmUnix
	tpmDevice
)

// tpmLocation is a parsed OpenTPM spec.
type tpmLocation struct {
	kind      tpmKind
	seed      int64
	fixedSeed bool
	addr      string // host:port for swtpm
	path      string // socket or device path
}

// parseTPMSpec parses an OpenTPM spec strictly; it is fed command-line
// flags and configuration, so it never panics and names what is wrong.
func parseTPMSpec(spec string) (tpmLocation, error) {
	const hint = `want "simulator", "simulator:SEED", "swtpm://HOST:PORT", "unix:///PATH" or a device path such as /dev/tpmrm0`
	switch {
	case spec == "simulator":
		return tpmLocation{kind: tpmSimulator}, nil
	case strings.HasPrefix(spec, "simulator:"):
		seed, err := strconv.ParseInt(strings.TrimPrefix(spec, "simulator:"), 10, 64)
		if err != nil {
			return tpmLocation{}, fmt.Errorf("%w: %q: the simulator seed must be a decimal 64-bit integer", ErrTPMSpec, spec)
		}
		return tpmLocation{kind: tpmSimulator, seed: seed, fixedSeed: true}, nil
	case strings.HasPrefix(spec, "swtpm://"):
		addr := strings.TrimPrefix(spec, "swtpm://")
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host == "" || strings.ContainsAny(addr, "/?#@") {
			return tpmLocation{}, fmt.Errorf("%w: %q: want swtpm://HOST:PORT", ErrTPMSpec, spec)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			return tpmLocation{}, fmt.Errorf("%w: %q: port must be 1..65535", ErrTPMSpec, spec)
		}
		return tpmLocation{kind: tpmSWTPM, addr: addr}, nil
	case strings.HasPrefix(spec, "unix://"):
		p := strings.TrimPrefix(spec, "unix://")
		if !filepath.IsAbs(p) || strings.ContainsRune(p, 0) {
			return tpmLocation{}, fmt.Errorf("%w: %q: want unix:///ABSOLUTE/PATH", ErrTPMSpec, spec)
		}
		return tpmLocation{kind: tpmUnix, path: filepath.Clean(p)}, nil
	case filepath.IsAbs(spec) && !strings.ContainsRune(spec, 0):
		return tpmLocation{kind: tpmDevice, path: filepath.Clean(spec)}, nil
	default:
		return tpmLocation{}, fmt.Errorf("%w: %q: %s", ErrTPMSpec, spec, hint)
	}
}

// simTPM is the simulator behind a mutex (the simulator is not safe for
// concurrent use) that releases the process-wide slot on Close.
type simTPM struct {
	mu     sync.Mutex
	sim    *simulator.Simulator
	t      transport.TPMCloser
	closed bool
}

func openSimulator(seed int64, fixed bool) (transport.TPMCloser, error) {
	if !simulatorOpen.CompareAndSwap(false, true) {
		return nil, ErrSimulatorBusy
	}
	var (
		sim *simulator.Simulator
		err error
	)
	if fixed {
		sim, err = simulator.GetWithFixedSeedInsecure(seed)
	} else {
		sim, err = simulator.Get()
	}
	if err != nil {
		simulatorOpen.Store(false)
		return nil, fmt.Errorf("%w: simulator: %w", ErrTransport, err)
	}
	return &simTPM{sim: sim, t: transport.FromReadWriteCloser(sim)}, nil
}

// Send implements transport.TPM.
func (s *simTPM) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("%w: simulator: %w", ErrTransport, ErrClosed)
	}
	return s.t.Send(cmd)
}

// Close shuts the simulator down and frees the process-wide slot.
func (s *simTPM) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.sim.Close()
	simulatorOpen.Store(false)
	return err
}

// deviceTPM marks a kernel TPM device so that the Agent knows where the
// firmware event log of that TPM lives.
type deviceTPM struct {
	transport.TPMCloser
	path string
}

// eventLogPath is the securityfs file holding the firmware event log that
// belongs to the TPM device at dev: /dev/tpmrmN and /dev/tpmN both map to
// /sys/kernel/security/tpmN.
func eventLogPath(dev string) string {
	base := filepath.Base(dev)
	n := "0"
	for _, p := range []string{"tpmrm", "tpm"} {
		if rest, ok := strings.CutPrefix(base, p); ok {
			if _, err := strconv.ParseUint(rest, 10, 16); err == nil {
				n = rest
			}
			break
		}
	}
	return "/sys/kernel/security/tpm" + n + "/binary_bios_measurements"
}

// contextSender is implemented by transports that can abandon a command
// when the caller's context ends.
type contextSender interface {
	SendContext(ctx context.Context, cmd []byte) ([]byte, error)
}

// swtpmConn speaks swtpm's raw TCP server protocol: a TPM command is
// written as is and the response is its 10-byte header followed by the
// rest. One persistent connection (swtpm serves one client at a time); it
// is dropped and redialled after any error, since a half-read response
// leaves the stream out of step.
type swtpmConn struct {
	addr string

	mu     sync.Mutex
	conn   net.Conn
	closed bool
}

func dialSWTPM(addr string) *swtpmConn { return &swtpmConn{addr: addr} }

// Send implements transport.TPM.
func (s *swtpmConn) Send(cmd []byte) ([]byte, error) {
	return s.SendContext(context.Background(), cmd)
}

// SendContext sends one command, giving up when ctx ends.
func (s *swtpmConn) SendContext(ctx context.Context, cmd []byte) ([]byte, error) {
	if len(cmd) < tpmHeaderSize || len(cmd) > maxTPMCommand {
		return nil, fmt.Errorf("%w: swtpm %s: command of %d bytes", ErrTransport, s.addr, len(cmd))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("%w: swtpm %s: %w", ErrTransport, s.addr, ErrClosed)
	}
	var rsp []byte
	var err error
	// A TPM answers TPM_RC_RETRY, _YIELDED or _TESTING when it could not
	// start the command yet (libtpms does so for some RSA operations); the
	// command is then resent unchanged, as go-tpm does for its other
	// transports.
	for backoff := time.Millisecond; ; backoff *= 2 {
		rsp, err = s.roundTrip(ctx, cmd)
		if err != nil || !tpmBusy(rsp) || backoff > time.Second {
			break
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		if s.conn != nil {
			_ = s.conn.Close()
			s.conn = nil
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			err = ctxErr
		}
		return nil, fmt.Errorf("%w: swtpm %s: %w", ErrTransport, s.addr, err)
	}
	return rsp, nil
}

func (s *swtpmConn) roundTrip(ctx context.Context, cmd []byte) ([]byte, error) {
	if s.conn == nil {
		d := net.Dialer{Timeout: swtpmDialTimeout}
		c, err := d.DialContext(ctx, "tcp", s.addr)
		if err != nil {
			return nil, err
		}
		s.conn = c
	}
	c := s.conn
	deadline := time.Now().Add(swtpmCommandTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// Cancellation interrupts a blocked read or write by moving the
	// deadline into the past.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, tpmHeaderSize)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return nil, err
	}
	size, err := parseResponseHeader(hdr)
	if err != nil {
		return nil, err
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(c, rsp[tpmHeaderSize:]); err != nil {
		return nil, err
	}
	return rsp, nil
}

// errFraming: a TPM response header that cannot be right.
var errFraming = errors.New("bad TPM response header")

// parseResponseHeader checks a TPM 2.0 response header (tag, size, code)
// and returns the total response size it announces.
func parseResponseHeader(hdr []byte) (int, error) {
	if len(hdr) < tpmHeaderSize {
		return 0, fmt.Errorf("%w: %d bytes", errFraming, len(hdr))
	}
	switch tag := binary.BigEndian.Uint16(hdr[0:2]); tag {
	case 0x8001, 0x8002: // TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS
	default:
		return 0, fmt.Errorf("%w: tag %#04x", errFraming, tag)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < tpmHeaderSize || size > maxTPMResponse {
		return 0, fmt.Errorf("%w: size %d", errFraming, size)
	}
	return int(size), nil
}

// tpmBusy reports whether a response says the TPM did not start the
// command and it should be sent again.
func tpmBusy(rsp []byte) bool {
	if len(rsp) < tpmHeaderSize {
		return false
	}
	switch binary.BigEndian.Uint32(rsp[6:10]) {
	case 0x922, 0x908, 0x90A: // TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING
		return true
	}
	return false
}

// Close closes the connection; swtpm then accepts its next client.
func (s *swtpmConn) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	return err
}

// ctxTPM binds a context to a transport for the duration of one Agent
// operation: go-tpm's Execute takes no context, so the binding happens
// here. Every command checks the context first, and transports that can
// (swtpm) abandon a command in flight when it ends.
type ctxTPM struct {
	ctx context.Context
	t   transport.TPM
}

// Send implements transport.TPM.
func (c ctxTPM) Send(cmd []byte) ([]byte, error) {
	if err := c.ctx.Err(); err != nil {
		return nil, err
	}
	if cs, ok := c.t.(contextSender); ok {
		return cs.SendContext(c.ctx, cmd)
	}
	return c.t.Send(cmd)
}

// readEventLog reads a TCG event log file, bounded so that a wrong path
// (a device, /dev/zero) cannot exhaust memory.
func readEventLog(path string) ([]byte, error) {
	const maxEventLog = 16 << 20
	f, err := os.Open(path) // #nosec G304 -- the path is the operator's configuration or the kernel's fixed securityfs path
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(io.LimitReader(f, maxEventLog+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxEventLog {
		return nil, fmt.Errorf("event log %s is larger than %d bytes", path, maxEventLog)
	}
	return b, nil
}
