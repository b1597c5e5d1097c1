package etcdtest

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// bridge stands for one member at an address that outlives it: clients
// (or peers) reach the member through it. The member itself listens on a
// new port each time it starts, so that no start has to reuse a port that
// something else may have taken; and killing the member cuts every
// connection to it at once, as its host's death would, instead of letting
// etcd drain them.
type bridge struct {
	l net.Listener

	mu     sync.Mutex
	target string                // the member's own address; "" while it is down
	gen    uint64                // bumped by every cut
	conns  map[net.Conn]struct{} // both ends of every forwarded connection
	wg     sync.WaitGroup
}

func newBridge() (*bridge, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &bridge{l: l, conns: map[net.Conn]struct{}{}}
	b.wg.Go(b.accept)
	return b, nil
}

func (b *bridge) addr() string { return b.l.Addr().String() }

// setTarget forwards new connections to addr.
func (b *bridge) setTarget(addr string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.target = addr
}

// cut refuses new connections (they are accepted and closed at once, like
// a reset) and closes every open one.
func (b *bridge) cut() {
	b.mu.Lock()
	b.target = ""
	b.gen++
	conns := make([]net.Conn, 0, len(b.conns))
	for c := range b.conns {
		conns = append(conns, c)
	}
	clear(b.conns)
	b.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

// close cuts and stops listening, and waits for its goroutines.
func (b *bridge) close() {
	_ = b.l.Close()
	b.cut()
	b.wg.Wait()
}

func (b *bridge) accept() {
	for {
		in, err := b.l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond) // EMFILE and the like: try again
			continue
		}
		b.mu.Lock()
		target, gen := b.target, b.gen
		if target == "" {
			b.mu.Unlock()
			_ = in.Close()
			continue
		}
		b.conns[in] = struct{}{}
		b.mu.Unlock()
		b.wg.Go(func() { b.forward(in, target, gen) })
	}
}

func (b *bridge) forward(in net.Conn, target string, gen uint64) {
	defer b.drop(in)
	out, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	defer b.drop(out)
	b.mu.Lock()
	if b.gen != gen { // cut while dialling
		b.mu.Unlock()
		return
	}
	b.conns[out] = struct{}{}
	b.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	// Neither etcd nor its clients half-close: when one direction ends,
	// the connection is over, and closing both ends stops the other copy.
	<-done
	_ = in.Close()
	_ = out.Close()
	<-done
}

// drop closes c and forgets it.
func (b *bridge) drop(c net.Conn) {
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
	_ = c.Close()
}
