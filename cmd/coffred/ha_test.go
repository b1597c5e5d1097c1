package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/server/admintest"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// haKeyring is the keyring the HA test releases from and rotates.
const haKeyring = "ha/disks"

// haPhaseAcks is how many releases a node must acknowledge in a phase of
// TestHA to count as serving in it.
const haPhaseAcks = 20

// haAck is one acknowledged release: what the client got back, which
// node answered, and the request id it answered with.
type haAck struct {
	node    string
	id      string
	ec      map[string]string
	env     []byte
	key     []byte
	version uint32
}

// TestHA runs Coffre highly available with real parts only: two coffred
// processes (each with its own SoftHSM token holding the same imported root
// key, its own audit log and node id) on a three-member embedded etcd
// cluster, a simulated TPM attesting to both. Under release load through
// both nodes, with rotations through both, it kills the etcd leader (no
// leadership handover, every connection to it cut), then SIGKILLs node B,
// then restores both. Then:
//   - both nodes kept releasing, and rotating, with the leader dead, and
//     node A with node B dead too;
//   - every acknowledged release decrypts, through the other node, to the
//     key the client got;
//   - the keyring's versions are exactly 1..n, one active, n-1 the number
//     of rotations that took effect, no version handed out twice;
//   - every acknowledged release, decryption and rotation has its own
//     audit entry (by the request id the client was answered with: its
//     operation, decision allow and key version) in the copy its node
//     replicated to etcd — node B's read while B is dead — and the
//     replicated logs verify against their signed checkpoints;
//   - with two etcd members of three killed, admin writes, releases and
//     decryptions fail closed with Unavailable within the call deadline,
//     change nothing, and work again soon after the members return.
func TestHA(t *testing.T) {
	requireSoftHSM(t)
	began := time.Now()
	phase := func(format string, args ...any) {
		t.Logf("[%6.2fs] %s", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
	}

	cluster := etcdtest.StartCluster(t, 3)
	phase("three-member etcd cluster ready")
	const prefix = "/coffre-ha/"
	pki := newHAPKI(t)
	rootKey := haRandomKey(t, 32)
	a := newHANode(t, "ha-a", pki, cluster.Endpoints(), prefix, rootKey)
	b := newHANode(t, "ha-b", pki, cluster.Endpoints(), prefix, rootKey)
	clear(rootKey)
	verifiers := []*audit.Verifier{a.verifier, b.verifier}
	a.start(t)
	b.start(t)
	phase("coffred nodes %s (%s) and %s (%s) serving", a.name, a.addr, b.name, b.addr)

	ctx := t.Context()
	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 20*time.Second) }
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: prefix, DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("open the etcd store from the test: %v", err)
	}
	haCloseAtEnd(t, "the test's etcd store", st)

	// Set up through node A: quorum, class, enrollment, keyring, policy.
	adminA := coffrev1.NewAdminServiceClient(pki.conn(t, a.addr, true))
	adminB := coffrev1.NewAdminServiceClient(pki.conn(t, b.addr, true))
	c, cancel := call()
	gated, err := admintest.New(c, adminA)
	cancel()
	if err != nil {
		t.Fatalf("InitQuorum through node A: %v", err)
	}
	tpm, err := agent.OpenTPM("simulator")
	if err != nil {
		t.Fatal(err)
	}
	haCloseAtEnd(t, "the TPM simulator", tpm)
	ag, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	haCloseAtEnd(t, "the agent", ag)
	_, _, pcrs, err := ag.Quote(ctx, make([]byte, 32), []uint32{0, 7, 16})
	if err != nil {
		t.Fatal(err)
	}
	class := &coffrev1.NodeClass{Name: "ha"}
	for _, i := range []uint32{0, 7, 16} {
		class.Pcrs = append(class.Pcrs, &coffrev1.PCRReference{Index: i, Sha256: pcrs[i]})
	}
	c, cancel = call()
	defer cancel()
	if _, err := gated.SetNodeClass(c, &coffrev1.SetNodeClassRequest{Class: class}); err != nil {
		t.Fatalf("SetNodeClass: %v", err)
	}
	if _, err := gated.EnrollNode(c, &coffrev1.EnrollNodeRequest{Name: "ha-storage-1", Class: "ha",
		Labels: map[string]string{"jurisdiction": "ca-qc"}, Ek: &coffrev1.EnrollNodeRequest_EkPublic{EkPublic: ag.EKPublic()}}); err != nil {
		t.Fatalf("EnrollNode: %v", err)
	}
	if _, err := adminA.CreateKeyring(c, &coffrev1.CreateKeyringRequest{Id: haKeyring}); err != nil {
		t.Fatalf("CreateKeyring: %v", err)
	}
	if _, err := gated.SetKeyringPolicy(c, &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{
		Keyring: haKeyring, AllowedClasses: []string{"ha"}, RequiredLabels: map[string]string{"jurisdiction": "ca-qc"},
		Release: coffrev1.Release_RELEASE_HPKE}}); err != nil {
		t.Fatalf("SetKeyringPolicy: %v", err)
	}
	cancel()

	// One simulated TPM, one Agent, a Client per node: each attests to its
	// node once, and again by itself after Unauthenticated (a restart).
	clients := map[string]*agent.Client{
		a.name: agent.NewClient(pki.conn(t, a.addr, false), ag, agent.ClientOptions{CallTimeout: 10 * time.Second}),
		b.name: agent.NewClient(pki.conn(t, b.addr, false), ag, agent.ClientOptions{CallTimeout: 10 * time.Second}),
	}
	for name, cl := range clients {
		haCloseAtEnd(t, "the client of "+name, cl)
	}
	other := map[string]string{a.name: b.name, b.name: a.name}
	// Node B learns the policy written through A by its watch: wait for
	// the first release through each node before the load starts.
	for name, cl := range clients {
		haWaitFor(t, 10*time.Second, "the first release through "+name, func() error {
			c, cancel := call()
			defer cancel()
			_, _, err := cl.GenerateDataKey(c, haKeyring, nil)
			return err
		})
	}
	phase("quorum, class, enrollment, keyring and policy set through node A; both nodes release")

	// The load: two workers per node releasing, one rotator per node.
	// inflight counts each node's calls from before they are sent until
	// their outcome is recorded.
	var (
		mu       sync.Mutex
		acks     []haAck
		ackCount = map[string]*atomic.Int64{a.name: {}, b.name: {}}
		inflight = map[string]*atomic.Int64{a.name: {}, b.name: {}}
		fails    = map[string]*haCodeCounts{a.name: {}, b.name: {}}
		bad      []string // successes that are not one
		rotAcks  = map[string][]uint32{}
		rotIDs   = map[string][]string{}
		rotCount atomic.Int64
		rotFails haCodeCounts
	)
	stopLoad := make(chan struct{})
	sleep := func(d time.Duration) bool {
		select {
		case <-stopLoad:
			return false
		case <-time.After(d):
			return true
		}
	}
	var wg sync.WaitGroup
	for _, name := range []string{a.name, b.name} {
		cl := clients[name]
		for w := range 2 {
			wg.Go(func() {
				for i := 0; ; i++ {
					ec := map[string]string{"worker": name + "/" + strconv.Itoa(w), "i": strconv.Itoa(i)}
					inflight[name].Add(1)
					c, cancel := context.WithTimeout(ctx, 20*time.Second)
					c, id := haWithRequestID(c)
					key, env, err := cl.GenerateDataKey(c, haKeyring, ec)
					cancel()
					pause := 25 * time.Millisecond
					if err != nil {
						fails[name].add(status.Code(err).String())
						pause = 100 * time.Millisecond
					} else {
						kr, v, perr := haEnvelopeVersion(env)
						mu.Lock()
						if perr != nil || kr != haKeyring || len(key) != 32 {
							bad = append(bad, fmt.Sprintf("%s: release acknowledged with a %d-byte key and envelope %x (%v)", name, len(key), env, perr))
						}
						acks = append(acks, haAck{node: name, id: *id, ec: ec, env: env, key: key, version: v})
						mu.Unlock()
						ackCount[name].Add(1)
					}
					inflight[name].Add(-1)
					if !sleep(pause) {
						return
					}
				}
			})
		}
	}
	for name, adm := range map[string]coffrev1.AdminServiceClient{a.name: adminA, b.name: adminB} {
		wg.Go(func() {
			for sleep(700 * time.Millisecond) {
				inflight[name].Add(1)
				c, cancel := context.WithTimeout(ctx, 10*time.Second)
				var md metadata.MD
				k, err := adm.RotateKeyring(c, &coffrev1.RotateKeyringRequest{Id: haKeyring}, grpc.Header(&md))
				cancel()
				if err != nil {
					rotFails.add(status.Code(err).String())
				} else {
					mu.Lock()
					rotAcks[name] = append(rotAcks[name], k.GetPrimaryVersion())
					rotIDs[name] = append(rotIDs[name], haRequestID(md))
					mu.Unlock()
					rotCount.Add(1)
				}
				inflight[name].Add(-1)
			}
		})
	}
	loadStopped := false
	endLoad := func() {
		if !loadStopped {
			loadStopped = true
			close(stopLoad)
			wg.Wait()
		}
	}
	t.Cleanup(endLoad)
	progress := func(what string) {
		phase("%s: acknowledged releases %s=%d %s=%d, rotations %d; failed %s=%s %s=%s; rotations failed %s",
			what, a.name, ackCount[a.name].Load(), b.name, ackCount[b.name].Load(), rotCount.Load(),
			a.name, fails[a.name], b.name, fails[b.name], &rotFails)
	}
	// serving waits until, since the counts in from, each of nodes has
	// acknowledged haPhaseAcks releases and the two nodes together at least
	// the given number of rotations; it fails the test if they have not
	// within 30s. It is how a phase asserts that service went on.
	type counts struct {
		acks map[string]int64
		rots int64
	}
	snapshot := func() counts {
		return counts{map[string]int64{a.name: ackCount[a.name].Load(), b.name: ackCount[b.name].Load()}, rotCount.Load()}
	}
	serving := func(what string, from counts, rotations int64, nodes ...string) {
		t.Helper()
		haWaitFor(t, 30*time.Second, what, func() error {
			for _, n := range nodes {
				if got := ackCount[n].Load() - from.acks[n]; got < haPhaseAcks {
					return fmt.Errorf("node %s acknowledged %d releases, want %d", n, got, haPhaseAcks)
				}
			}
			if got := rotCount.Load() - from.rots; got < rotations {
				return fmt.Errorf("%d rotations acknowledged, want %d", got, rotations)
			}
			return nil
		})
		progress(what)
	}

	serving("load on a healthy cluster", snapshot(), 1, a.name, b.name)

	// The etcd leader dies: no handover, its connections cut at once.
	lead := cluster.Leader(t)
	t0 := time.Now()
	cluster.KillMember(lead)
	phase("etcd member %d, the leader, killed (took %v)", lead, time.Since(t0).Round(time.Millisecond))
	serving(fmt.Sprintf("both nodes release and rotate with etcd member %d killed", lead), snapshot(), 1, a.name, b.name)
	phase("etcd member %d leads now", cluster.Leader(t))

	b.kill(t)
	phase("node %s SIGKILLed", b.name)
	alone := snapshot()
	// Whatever node B acknowledged was answered before it died, so it must
	// already be in etcd: check that now, while B is dead. Its calls under
	// way at the kill end (failed) before inflight reaches zero, and
	// later ones cannot succeed.
	haWaitFor(t, 30*time.Second, "node "+b.name+"'s calls under way at its death to end", func() error {
		if n := inflight[b.name].Load(); n > 0 {
			return fmt.Errorf("%d still under way", n)
		}
		return nil
	})
	mu.Lock()
	var bWants []haWant
	for _, k := range acks {
		if k.node == b.name {
			bWants = append(bWants, haWant{"release", k.id, kms.AuditGenerateDataKey, k.version})
		}
	}
	for _, id := range rotIDs[b.name] {
		bWants = append(bWants, haWant{"rotation", id, "admin.RotateKeyring", 0})
	}
	mu.Unlock()
	var raws [][]byte
	haWaitFor(t, 10*time.Second, "reading node "+b.name+"'s replica", func() error {
		var err error
		raws, _, err = haReadReplica(t, st, b, verifiers)
		return err
	})
	haCheckAudited(t, b.name, ", read while it is dead,", raws, bWants)
	phase("node %s's replica, read while it is dead: %d entries hold its %d acknowledged releases and rotations, each by request id",
		b.name, len(raws), len(bWants))
	serving(fmt.Sprintf("node %s releases alone, with etcd member %d killed", a.name, lead), alone, 0, a.name)

	t0 = time.Now()
	cluster.RestartMember(t, lead)
	phase("etcd member %d back (took %v)", lead, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	b.start(t)
	phase("node %s restarted (took %v)", b.name, time.Since(t0).Round(time.Millisecond))
	serving("both nodes release after the restores", snapshot(), 0, a.name, b.name)
	endLoad()
	progress("load stopped")
	for _, s := range bad {
		t.Error(s)
	}

	// The keyring: versions 1..n, exactly one active, nothing lost or
	// handed out twice.
	n := haCheckKeyring(t, adminA, adminB, rotAcks, rotFails.total())
	phase("keyring %s has versions 1..%d, one active; rotations acknowledged %s=%d %s=%d, failed %s",
		haKeyring, n, a.name, len(rotAcks[a.name]), b.name, len(rotAcks[b.name]), &rotFails)

	// Every acknowledged release decrypts through the other node to the key
	// its client got.
	wants := map[string][]haWant{}
	seen := map[string]bool{}
	for _, k := range acks {
		if k.version < 1 || k.version > n {
			t.Errorf("a release acknowledged by %s carries KEK version %d; the keyring has 1..%d", k.node, k.version, n)
		}
		if seen[string(k.key)] || seen[string(k.env)] {
			t.Errorf("a data key or envelope was handed out twice (%s)", k.node)
		}
		seen[string(k.key)], seen[string(k.env)] = true, true
		wants[k.node] = append(wants[k.node], haWant{"release", k.id, kms.AuditGenerateDataKey, k.version})
	}
	for node, ids := range rotIDs {
		for _, id := range ids {
			wants[node] = append(wants[node], haWant{"rotation", id, "admin.RotateKeyring", 0})
		}
	}
	t0 = time.Now()
	jobs := make(chan haAck)
	var dmu sync.Mutex
	var dwg sync.WaitGroup
	for range 4 {
		dwg.Go(func() {
			for k := range jobs {
				via := other[k.node]
				var got []byte
				var err error
				var id *string
				for try := 0; try < 3; try++ {
					c, cancel := context.WithTimeout(ctx, 20*time.Second)
					c, id = haWithRequestID(c)
					got, err = clients[via].Decrypt(c, k.env, k.ec)
					cancel()
					if status.Code(err) != codes.Unavailable {
						break
					}
					time.Sleep(200 * time.Millisecond)
				}
				dmu.Lock()
				switch {
				case err != nil:
					t.Errorf("envelope acknowledged by %s (version %d) does not decrypt through %s: %v", k.node, k.version, via, err)
				case !bytes.Equal(got, k.key):
					t.Errorf("envelope acknowledged by %s (version %d) decrypts through %s to another key", k.node, k.version, via)
				default:
					wants[via] = append(wants[via], haWant{"decryption", *id, kms.AuditDecrypt, k.version})
				}
				dmu.Unlock()
			}
		})
	}
	for _, k := range acks {
		jobs <- k
	}
	close(jobs)
	dwg.Wait()
	phase("all %d acknowledged envelopes decrypted through the other node in %v", len(acks), time.Since(t0).Round(time.Millisecond))

	// Every acknowledged release, decryption and rotation is in its node's
	// replicated audit log, and that log verifies against its checkpoint.
	for _, node := range []*haNode{a, b} {
		raws, _ := haWaitReplicaCheckpoint(t, st, node, verifiers)
		haCheckAudited(t, node.name, "", raws, wants[node.name])
		phase("node %s: replicated log of %d entries verifies and holds its %d acknowledged releases, decryptions and rotations, each by request id",
			node.name, len(raws), len(wants[node.name]))
	}
	if t.Failed() {
		return
	}

	// Quorum loss: two members of three killed, the leader among them.
	lead = cluster.Leader(t)
	lost := []int{lead, (lead + 1) % 3}
	t0 = time.Now()
	for _, i := range lost {
		cluster.KillMember(i)
	}
	phase("etcd members %d (the leader) and %d killed (took %v): no quorum", lost[0], lost[1], time.Since(t0).Round(time.Millisecond))
	const deadline = 10 * time.Second
	type attempt struct {
		what string
		err  error
		took time.Duration
	}
	results := make(chan attempt, 8)
	var qwg sync.WaitGroup
	try := func(what string, f func(context.Context) error) {
		qwg.Go(func() {
			c, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			t0 := time.Now()
			err := f(c)
			results <- attempt{what, err, time.Since(t0)}
		})
	}
	// An envelope each node released, to decrypt through the other.
	envOf := map[string]haAck{}
	for _, k := range acks {
		envOf[k.node] = k
	}
	for name, adm := range map[string]coffrev1.AdminServiceClient{a.name: adminA, b.name: adminB} {
		try("RotateKeyring through "+name, func(c context.Context) error {
			_, err := adm.RotateKeyring(c, &coffrev1.RotateKeyringRequest{Id: haKeyring})
			return err
		})
		try("CreateKeyring through "+name, func(c context.Context) error {
			_, err := adm.CreateKeyring(c, &coffrev1.CreateKeyringRequest{Id: "ha/outage-" + name})
			return err
		})
		try("GenerateDataKey through "+name, func(c context.Context) error {
			_, _, err := clients[name].GenerateDataKey(c, haKeyring, map[string]string{"outage": name})
			return err
		})
		try("Decrypt through "+name, func(c context.Context) error {
			k := envOf[other[name]]
			_, err := clients[name].Decrypt(c, k.env, k.ec)
			return err
		})
	}
	qwg.Wait()
	close(results)
	for r := range results {
		if status.Code(r.err) != codes.Unavailable || r.took >= deadline {
			t.Errorf("%s without etcd quorum: %v after %v; want Unavailable within the %v deadline", r.what, r.err, r.took.Round(time.Millisecond), deadline)
		} else {
			phase("%s without quorum: Unavailable after %v", r.what, r.took.Round(time.Millisecond))
		}
	}

	t0 = time.Now()
	var swg sync.WaitGroup
	swg.Go(func() { cluster.RestartMember(t, lost[0]) })
	cluster.RestartMember(t, lost[1])
	swg.Wait()
	phase("etcd members %d and %d back (took %v)", lost[0], lost[1], time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	var post []haAck
	postWants := map[string][]haWant{}
	for _, name := range []string{a.name, b.name} {
		haWaitFor(t, 30*time.Second, "a release through "+name+" after quorum is back", func() error {
			c, cancel := call()
			defer cancel()
			c, id := haWithRequestID(c)
			ec := map[string]string{"after": name}
			key, env, err := clients[name].GenerateDataKey(c, haKeyring, ec)
			if err == nil {
				post = append(post, haAck{node: name, id: *id, ec: ec, env: env, key: key})
				postWants[name] = append(postWants[name], haWant{"release", *id, kms.AuditGenerateDataKey, n})
			}
			return err
		})
		haWaitFor(t, 30*time.Second, "a decryption through "+name+" after quorum is back", func() error {
			c, cancel := call()
			defer cancel()
			c, id := haWithRequestID(c)
			k := envOf[other[name]]
			got, err := clients[name].Decrypt(c, k.env, k.ec)
			if err == nil {
				if !bytes.Equal(got, k.key) {
					t.Errorf("envelope acknowledged by %s decrypts through %s after the quorum loss to another key", k.node, name)
				}
				postWants[name] = append(postWants[name], haWant{"decryption", *id, kms.AuditDecrypt, k.version})
			}
			return err
		})
	}
	phase("releases and decryptions through both nodes work again %v after the members' restart", time.Since(t0).Round(time.Millisecond))
	// The refused writes did nothing.
	c, cancel = call()
	defer cancel()
	k, err := adminA.GetKeyring(c, &coffrev1.GetKeyringRequest{Id: haKeyring})
	if err != nil || k.GetPrimaryVersion() != n || len(k.GetVersions()) != int(n) {
		t.Errorf("after the refused rotations: %v, %v; want still %d versions", k, err, n)
	}
	for _, name := range []string{a.name, b.name} {
		if _, err := adminA.GetKeyring(c, &coffrev1.GetKeyringRequest{Id: "ha/outage-" + name}); status.Code(err) != codes.NotFound {
			t.Errorf("keyring created during the quorum loss through %s: GetKeyring = %v, want NotFound", name, err)
		}
	}
	for name, adm := range map[string]coffrev1.AdminServiceClient{a.name: adminA, b.name: adminB} {
		haWaitFor(t, 30*time.Second, "a rotation after quorum is back", func() error {
			c, cancel := call()
			defer cancel()
			var md metadata.MD
			_, err := adm.RotateKeyring(c, &coffrev1.RotateKeyringRequest{Id: haKeyring}, grpc.Header(&md))
			if err == nil {
				postWants[name] = append(postWants[name], haWant{"rotation", haRequestID(md), "admin.RotateKeyring", 0})
			}
			return err
		})
	}
	phase("admin writes through both nodes work again %v after the members' restart", time.Since(t0).Round(time.Millisecond))
	c, cancel = call()
	defer cancel()
	if k, err := adminB.GetKeyring(c, &coffrev1.GetKeyringRequest{Id: haKeyring}); err != nil || k.GetPrimaryVersion() != n+2 || len(k.GetVersions()) != int(n+2) {
		t.Errorf("after two rotations once quorum was back: %v, %v; want %d versions", k, err, n+2)
	}
	for _, p := range post {
		c, cancel := call()
		got, err := clients[other[p.node]].Decrypt(c, p.env, p.ec)
		cancel()
		if err != nil || !bytes.Equal(got, p.key) {
			t.Errorf("release acknowledged by %s after the quorum loss does not decrypt through %s: %v", p.node, other[p.node], err)
		}
	}

	// What `coffrectl audit verify --store` sees: exactly the two nodes,
	// each verifying.
	replicas, err := kms.VerifyReplicatedAudits(ctx, st, verifiers)
	if err != nil || len(replicas) != 2 {
		t.Errorf("VerifyReplicatedAudits: %d nodes, %v; want %s and %s", len(replicas), err, a.name, b.name)
	}
	for _, r := range replicas {
		if r.Err != nil {
			t.Errorf("node %s's replicated log: %v", r.Node, r.Err)
		}
	}

	// Stopped cleanly, each node's local log verifies and is exactly what
	// it replicated, which holds what it acknowledged after the quorum loss.
	for _, node := range []*haNode{a, b} {
		raws, remote := haWaitReplicaCheckpoint(t, st, node, verifiers)
		haCheckAudited(t, node.name, "", raws, postWants[node.name])
		if err := node.stop(); err != nil {
			t.Errorf("node %s after SIGTERM: %v, want exit status 0", node.name, err)
		}
		local, err := audit.VerifyDir(node.auditDir, node.verifier)
		if err != nil {
			t.Errorf("node %s's local audit log does not verify: %v", node.name, err)
			continue
		}
		if local.Entries != remote.Entries || !bytes.Equal(local.Root, remote.Root) {
			t.Errorf("node %s: local log has %d entries (root %x), its replica %d (root %x)", node.name, local.Entries, local.Root, remote.Entries, remote.Root)
		}
		phase("node %s stopped; local log of %d entries (%d checkpoints) equals its replica", node.name, local.Entries, local.Checkpoints)
	}
	phase("done: releases acknowledged %s=%d %s=%d, failed %s=%s %s=%s; rotations acknowledged %d, failed %s",
		a.name, ackCount[a.name].Load(), b.name, ackCount[b.name].Load(), a.name, fails[a.name], b.name, fails[b.name],
		len(rotAcks[a.name])+len(rotAcks[b.name]), &rotFails)
}

// haCheckKeyring checks the keyring as both nodes see it: versions 1..n,
// exactly the primary n active and the rest deactivated, each acknowledged
// rotation's version distinct and present, and n-1 between the
// acknowledged rotations and those plus the failed ones (a failed call may
// have taken effect before its answer was lost). It returns n.
func haCheckKeyring(t *testing.T, adminA, adminB coffrev1.AdminServiceClient, rotAcks map[string][]uint32, rotFailed int) uint32 {
	t.Helper()
	var n uint32
	for i, adm := range []coffrev1.AdminServiceClient{adminA, adminB} {
		c, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		k, err := adm.GetKeyring(c, &coffrev1.GetKeyringRequest{Id: haKeyring})
		cancel()
		if err != nil {
			t.Fatalf("GetKeyring through node %d: %v", i, err)
		}
		vs := k.GetVersions()
		if i == 0 {
			n = k.GetPrimaryVersion()
		} else if k.GetPrimaryVersion() != n {
			t.Errorf("the nodes disagree on the primary version: %d and %d", n, k.GetPrimaryVersion())
		}
		if len(vs) != int(n) {
			t.Errorf("keyring has %d versions, primary %d", len(vs), n)
		}
		active := 0
		for j, v := range vs {
			if v.GetVersion() != uint32(j+1) { // #nosec G115 -- j < len(vs), small
				t.Errorf("version %d listed as %d: versions are not 1..n", j+1, v.GetVersion())
			}
			switch v.GetState() {
			case coffrev1.KeyState_KEY_STATE_ACTIVE:
				active++
				if v.GetVersion() != n {
					t.Errorf("version %d is active but the primary is %d", v.GetVersion(), n)
				}
			case coffrev1.KeyState_KEY_STATE_DEACTIVATED:
			default:
				t.Errorf("version %d is %v", v.GetVersion(), v.GetState())
			}
		}
		if active != 1 {
			t.Errorf("%d active versions, want exactly 1", active)
		}
	}
	seen := map[uint32]string{}
	acked := 0
	for node, vs := range rotAcks {
		for _, v := range vs {
			acked++
			if prev, dup := seen[v]; dup {
				t.Errorf("version %d was acknowledged as new by two rotations (%s and %s)", v, prev, node)
			}
			seen[v] = node
			if v < 2 || v > n {
				t.Errorf("a rotation through %s acknowledged version %d; the keyring has 1..%d", node, v, n)
			}
		}
	}
	if got := int(n) - 1; got < acked || got > acked+rotFailed {
		t.Errorf("%d rotations took effect; %d were acknowledged and %d failed", got, acked, rotFailed)
	}
	return n
}

// haWaitReplicaCheckpoint reads node's replicated audit log once its
// latest replicated checkpoint covers every replicated entry (the node
// publishes one within its checkpoint interval of the last entry).
func haWaitReplicaCheckpoint(t *testing.T, st store.Store, node *haNode, verifiers []*audit.Verifier) ([][]byte, *kms.AuditReplicaReport) {
	t.Helper()
	var (
		raws [][]byte
		rep  *kms.AuditReplicaReport
	)
	haWaitFor(t, 30*time.Second, "node "+node.name+"'s replicated checkpoint to cover its replicated entries", func() error {
		var err error
		if raws, rep, err = haReadReplica(t, st, node, verifiers); err != nil {
			return err
		}
		if rep.LatestSize != rep.Entries {
			return fmt.Errorf("latest checkpoint at size %d, %d entries", rep.LatestSize, rep.Entries)
		}
		return nil
	})
	return raws, rep
}

// haReadReplica verifies node's audit log as replicated to the store, as
// `coffrectl audit verify --store` does (contiguous entries, every retained
// checkpoint signed by the node's own key among verifiers and consistent
// with the entries), then reads its entries. A log that does not verify
// fails the test; an error reading the store (the test's etcd client may
// still be reconnecting after a member restart) is returned.
func haReadReplica(t *testing.T, st store.Store, node *haNode, verifiers []*audit.Verifier) ([][]byte, *kms.AuditReplicaReport, error) {
	t.Helper()
	rep, err := kms.VerifyReplicatedAudit(t.Context(), st, node.name, verifiers)
	var bad *kms.AuditReplicaError
	if errors.As(err, &bad) {
		t.Fatalf("node %s's replicated audit log does not verify: %v", node.name, err)
	}
	if err != nil {
		return nil, nil, err
	}
	if verifiers[rep.Verifier] != node.verifier {
		t.Fatalf("node %s's replicated checkpoints verify with another node's key (%d)", node.name, rep.Verifier)
	}
	// Read after the verification: the node may have replicated more since.
	raws, err := kms.ReadReplicatedAudit(t.Context(), st, node.name)
	if err != nil {
		return nil, nil, err
	}
	if uint64(len(raws)) < rep.Entries {
		t.Fatalf("node %s's replicated log shrank from %d to %d entries", node.name, rep.Entries, len(raws))
	}
	return raws, rep, nil
}

// haWaitFor calls f until it succeeds, failing the test if it has not within d.
func haWaitFor(t *testing.T, d time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestHAKillDuringReplicationOutage: a node whose audit entry was written
// locally but could not be replicated (etcd down: the call was refused) is
// SIGKILLed before replication recovers, then restarted once etcd is back.
// Its replicated log must stay one contiguous, verifiable log equal to its
// local one: the entry refused during the outage is replicated when the
// node reopens its log, so the replica never gets a hole that would make
// `coffrectl audit verify --store` fail for that node forever.
func TestHAKillDuringReplicationOutage(t *testing.T) {
	requireSoftHSM(t)
	began := time.Now()
	phase := func(format string, args ...any) {
		t.Logf("[%6.2fs] %s", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
	}
	cluster := etcdtest.StartCluster(t, 1)
	const prefix = "/coffre-ha/"
	pki := newHAPKI(t)
	rootKey := haRandomKey(t, 32)
	a := newHANode(t, "ha-a", pki, cluster.Endpoints(), prefix, rootKey)
	clear(rootKey)
	a.start(t)
	st, err := store.OpenEtcd(t.Context(), store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: prefix, DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("open the etcd store from the test: %v", err)
	}
	haCloseAtEnd(t, "the test's etcd store", st)
	admin := coffrev1.NewAdminServiceClient(pki.conn(t, a.addr, true))
	create := func(id string) error {
		c, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		_, err := admin.CreateKeyring(c, &coffrev1.CreateKeyringRequest{Id: id})
		return err
	}
	if err := create("ha/before"); err != nil {
		t.Fatal(err)
	}
	phase("node serving, one admin call audited and replicated")

	cluster.StopMember(0)
	if err := create("ha/outage"); status.Code(err) != codes.Unavailable {
		t.Fatalf("CreateKeyring with etcd down: %v, want Unavailable", err)
	}
	phase("etcd down: an admin call refused (its entry is on the node's disk, not in etcd)")
	a.kill(t)
	cluster.RestartMember(t, 0)
	a.start(t)
	haWaitFor(t, 30*time.Second, "an admin call after etcd and the node are back", func() error { return create("ha/after") })
	phase("etcd and the node back; admin calls work")

	raws, rep := haWaitReplicaCheckpoint(t, st, a, []*audit.Verifier{a.verifier})
	if err := a.stop(); err != nil {
		t.Errorf("node after SIGTERM: %v, want exit status 0", err)
	}
	local, err := audit.VerifyDir(a.auditDir, a.verifier)
	if err != nil {
		t.Fatalf("the node's local audit log does not verify: %v", err)
	}
	if local.Entries != rep.Entries || !bytes.Equal(local.Root, rep.Root) {
		t.Fatalf("local log has %d entries (root %x), its replica %d (root %x)", local.Entries, local.Root, rep.Entries, rep.Root)
	}
	phase("replica of %d entries is contiguous, verifies and equals the local log", len(raws))
}
