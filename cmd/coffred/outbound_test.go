package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/store/etcdtest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// procSocket is one of a process's sockets as /proc/PID/net/* shows it.
type procSocket struct {
	proto         string // "tcp", "tcp6", "udp", "udp6"
	local, remote sockAddr
	listening     bool
	inode         string
}

type sockAddr struct {
	ip   net.IP
	port int
}

func (a sockAddr) String() string { return net.JoinHostPort(a.ip.String(), strconv.Itoa(a.port)) }

// processSockets returns the TCP and UDP sockets that process pid holds:
// the rows of its network namespace's tables whose inode is one of its
// open file descriptors.
func processSockets(pid int) ([]procSocket, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if ino, ok := strings.CutPrefix(link, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	var out []procSocket
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || !inodes[fields[9]] {
				continue
			}
			local, err1 := parseProcAddr(fields[1])
			remote, err2 := parseProcAddr(fields[2])
			if err1 != nil || err2 != nil {
				f.Close()
				return nil, fmt.Errorf("/proc/%d/net/%s: %q: %v %v", pid, proto, sc.Text(), err1, err2)
			}
			out = append(out, procSocket{proto: proto, local: local, remote: remote, listening: fields[3] == "0A", inode: fields[9]})
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// parseProcAddr parses "0100007F:1F90" (IPv4) or its 32-hex-digit IPv6
// form: the address as 32-bit words in host (little-endian) order.
func parseProcAddr(s string) (sockAddr, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return sockAddr{}, fmt.Errorf("no port in %q", s)
	}
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return sockAddr{}, fmt.Errorf("bad address %q", h)
	}
	for i := 0; i < len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return sockAddr{}, fmt.Errorf("bad port %q", p)
	}
	ip := net.IP(b)
	if v4 := ip.To4(); v4 != nil {
		ip = v4
	}
	return sockAddr{ip: ip, port: int(port)}, nil
}

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0000":                         "0.0.0.0:0",
		"00000000000000000000000001000000:01BB": "[::1]:443",
		"0000000000000000FFFF00000100007F:0050": "127.0.0.1:80", // v4-mapped
	} {
		got, err := parseProcAddr(in)
		if err != nil || got.String() != want {
			t.Errorf("parseProcAddr(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0100007F", "0100007F:", "01007F:0050", "zz00007F:0050", "0100007F:10000"} {
		if _, err := parseProcAddr(bad); err == nil {
			t.Errorf("parseProcAddr(%q) accepted", bad)
		}
	}
}

// TestOutboundConnections is SECURITY.md invariant 6: coffred connects to
// nothing but the endpoints in its configuration. A coffred process on an
// etcd store, with a syslog receiver and a metrics listener, serves admin
// calls (each audited, so streamed to syslog) while the test reads the
// process's own sockets from /proc every 20 ms for 3 seconds: every
// listening socket is listen or metrics.listen, every other TCP socket
// either was accepted on one of them or goes to the etcd member or the
// syslog receiver, and there is no UDP socket (no name lookup: the
// configuration names addresses). The test also checks that it saw the
// connections to etcd and to syslog, so that an empty observation cannot
// pass.
func TestOutboundConnections(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads the process's sockets from Linux's /proc")
	}
	requireSoftHSM(t)
	cluster := etcdtest.StartCluster(t, 1)
	etcdURL, err := url.Parse(cluster.Endpoint(0))
	if err != nil {
		t.Fatal(err)
	}
	// A syslog receiver that reads and discards: what it stores is not
	// the question here.
	recv, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { recv.Close() })
	go func() {
		for {
			c, err := recv.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	metricsAddr := haFreeAddr(t)
	pki := newHAPKI(t)
	n := newHANode(t, "out-a", pki, cluster.Endpoints(), "/outbound/", haRandomKey(t, 32), func(cfg map[string]any) {
		a := cfg["audit"].(map[string]any)
		a["syslog"] = map[string]any{"addr": recv.Addr().String(), "sync_every": 16}
		cfg["metrics"] = map[string]any{"listen": metricsAddr}
	})
	n.start(t)
	n.mu.Lock()
	pid := n.cmd.Process.Pid
	n.mu.Unlock()

	admin := coffrev1.NewAdminServiceClient(pki.conn(t, n.addr, true))
	allowedListen := map[string]bool{n.addr: true, metricsAddr: true}
	allowedRemote := map[string]string{etcdURL.Host: "etcd", recv.Addr().String(): "syslog"}
	seen := map[string]int{}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	deadline := time.Now().Add(3 * time.Second)
	for samples := 0; time.Now().Before(deadline); samples++ {
		if samples%5 == 0 {
			if _, err := admin.ListKeyrings(ctx, &coffrev1.ListKeyringsRequest{}); err != nil {
				t.Fatal(err)
			}
		}
		socks, err := processSockets(pid)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range socks {
			switch {
			case strings.HasPrefix(s.proto, "udp"):
				t.Errorf("coffred holds a UDP socket: %s %s -> %s", s.proto, s.local, s.remote)
			case s.listening:
				if !allowedListen[s.local.String()] {
					t.Errorf("coffred listens on %s, not a configured address", s.local)
				}
			case allowedListen[s.local.String()]:
				seen["accepted"]++ // a client of listen or metrics.listen
			case allowedRemote[s.remote.String()] != "":
				seen[allowedRemote[s.remote.String()]]++
			default:
				t.Errorf("coffred has a connection %s -> %s to an address not in its configuration", s.local, s.remote)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, want := range []string{"etcd", "syslog", "accepted"} {
		if seen[want] == 0 {
			t.Errorf("no connection %s seen in 3 s: the observation does not work", want)
		}
	}
	t.Logf("socket observations: %v", seen)
	if err := n.stop(); err != nil {
		t.Fatalf("coffred exit: %v", err)
	}
}
