//! Safe on a public node (SPEC "Safe on a public node"), against the kernel
//! in namespaces and the test apiserver: the node's own services are never
//! shadowed (a TCP listener on the public address, a UDP socket on the
//! wildcard; a service that starts later is reported, not flipped); only
//! namespaces the selector picks publish, and only the ports their ports
//! annotation lists — a change applies at once, both ways, and a withdrawn
//! port keeps no connection open.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{wait_for, EchoServer, World, NODE, WAIT};
use support::crowd::{crowd, crowd_dual, without_counters};
use support::netns::{Netns, POD_A_IP, POD_A_IP6, PUBLIC_IP};

/// Foreign native tables of the crowd, with handles: the agent never
/// touches them.
fn foreign_tables(node: &Netns) -> String {
    without_counters(&node.sh(
        "nft -a list table ip kube-proxy; nft -a list table inet firewalld; nft -a list table ip6 kube-proxy",
    ))
}

/// A TCP server in a namespace of the test: each accepted connection goes
/// to `handle` on a thread of its own (with the stop flag); stops when
/// dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(
        ns: &Netns,
        addr: &str,
        handle: impl Fn(TcpStream, Arc<AtomicBool>) + Send + Sync + 'static,
    ) -> Server {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = ns.run(|| TcpListener::bind(addr).expect("bind the server"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = Arc::new(handle);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (h, s) = (handle.clone(), s.clone());
                        std::thread::spawn(move || h(c, s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    /// A service of the node itself: answers every connection with `N`.
    fn node_service(node: &Netns, addr: &str) -> Server {
        Server::start(node, addr, |mut c, _| {
            let _ = c.write_all(b"N");
        })
    }

    /// An echo server that keeps each connection open (one byte back per
    /// byte in), to see an established connection through the NAT end.
    fn long_echo(pod: &Netns, port: u16) -> Server {
        Server::start(pod, &format!("[::]:{port}"), |mut c, stop| {
            let _ = c.set_nonblocking(false);
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let mut b = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                match c.read(&mut b) {
                    Ok(0) => return,
                    Ok(_) if c.write_all(&b).is_err() => return,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What answers at `addr` from the client: `N` from the node's service.
fn first_byte(client: &Netns, addr: &str) -> Option<u8> {
    let addr: SocketAddr = addr.parse().unwrap();
    client.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        Some(b[0])
    })
}

fn metrics(node: &Netns) -> String {
    node.sh("curl -sf http://127.0.0.1:8484/metrics")
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn refused_rows(node: &Netns) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&node.sh("curl -sf http://127.0.0.1:8484/entries/list")).unwrap();
    let mut rows: Vec<(String, String)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == "refused")
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn the_nodes_own_services_are_never_shadowed_in_either_family() {
    let w = World::new("guard");
    // A crowded node: kube-proxy, Docker, Cilium, firewalld in both families.
    crowd_dual(&w.sandbox.node);
    let foreign = foreign_tables(&w.sandbox.node);
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // The node serves 8080/tcp on its public IPv4 address only, and
    // 5353/udp on the IPv6 wildcard that takes IPv4 too.
    let _svc = Server::node_service(&w.sandbox.node, &format!("{PUBLIC_IP}:8080"));
    let udp = w.sandbox.node.run(|| UdpSocket::bind("[::]:5353").unwrap());
    let agent = w.start_agent_with(&["-ipfamilies=ipv4,ipv6", "-informerresync=1"]);
    agent.wait_first_sync();
    w.create_pod(
        "mx",
        NODE,
        Some(r#"{"entries":[{"srcPort":8080,"dstPort":2525},{"srcPort":5353,"dstPort":5353,"proto":"udp"},{"srcPort":25,"dstPort":2525}]}"#),
    );
    w.set_running_ips("mx", &[POD_A_IP, POD_A_IP6]);
    wait_for("25 published in both families", WAIT, || {
        w.dnat().len() == 1 && w.dnat6().len() == 2
    });
    // IPv4: 25 only. IPv6: 25 and 8080 (the node serves 8080 on its IPv4
    // address alone); 5353 in neither.
    assert_eq!(
        w.dnat(),
        ["203.0.113.7:25/tcp → 10.1.0.5:2525".to_string()].into()
    );
    assert_eq!(
        w.dnat6(),
        [
            "2001:db8::7:25/tcp → fd00:1::5:2525".to_string(),
            "2001:db8::7:8080/tcp → fd00:1::5:2525".to_string()
        ]
        .into()
    );
    // From outside, the node's service still answers on 8080 and the pod
    // on 25.
    assert_eq!(
        first_byte(&w.sandbox.client, &format!("{PUBLIC_IP}:8080")),
        Some(b'N')
    );
    assert!(w.roundtrip(25));
    // ... and the node's UDP socket still gets the datagrams sent to it.
    w.sandbox.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"q", format!("{PUBLIC_IP}:5353")).unwrap();
    });
    let mut b = [0u8; 1];
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(
        matches!(udp.recv_from(&mut b), Ok((1, _))),
        "the node's UDP service receives what is sent to it"
    );
    wait_for("the NATRefused event", WAIT, || {
        !w.events("mx", "NATRefused").is_empty()
    });
    let note = w.events("mx", "NATRefused").pop().unwrap();
    for part in [
        "port 8080/tcp on 203.0.113.7 is served by the node itself (203.0.113.7:8080)",
        "port 5353/udp on 203.0.113.7 is served by the node itself ([::]:5353)",
        "port 5353/udp on 2001:db8::7 is served by the node itself ([::]:5353)",
    ] {
        assert!(note.contains(part), "{part} in {note}");
    }
    let rows = refused_rows(&w.sandbox.node);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|(r, _)| r == "node_service"), "{rows:?}");
    let m = metrics(&w.sandbox.node);
    assert_eq!(
        metric(&m, "podnat_entries_refused_total{reason=\"node_service\"}"),
        Some(3.0),
        "{m}"
    );

    // A node service that starts on 25 after the mapping exists: reported
    // (event, metric), and the mapping stays.
    let _late = Server::node_service(&w.sandbox.node, "0.0.0.0:25");
    wait_for("the NodeServiceShadowed event", WAIT, || {
        !w.events("mx", "NodeServiceShadowed").is_empty()
    });
    let note = w.events("mx", "NodeServiceShadowed").pop().unwrap();
    assert!(
        note.contains("a node service (0.0.0.0:25) started on 203.0.113.7:25/tcp"),
        "{note}"
    );
    assert!(w.roundtrip(25), "the held mapping stays");
    assert_eq!(w.dnat().len(), 1);
    let m = metrics(&w.sandbox.node);
    assert_eq!(metric(&m, "podnat_node_service_shadowed"), Some(1.0), "{m}");
    assert_eq!(
        foreign_tables(&w.sandbox.node),
        foreign,
        "foreign tables touched"
    );
    drop(agent);
}

/// The iptables flavor in one shot, from a pods file: the same guard, the
/// refusal on stderr, nothing of the refused port in `iptables-nft-save`;
/// and `-guardnodeports=false` takes the port as the Go version did.
#[test]
fn one_shot_iptables_refuses_a_served_port_unless_the_guard_is_off() {
    let ns = Netns::new("guard-once");
    ns.sh("ip link add wan0 type veth peer name wan0p && ip link set wan0p up && ip link set wan0 up && ip addr add 203.0.113.5/24 dev wan0");
    // The mail pods file publishes 25, 143 and 587; the node serves 587.
    let _svc = Server::node_service(&ns, "0.0.0.0:587");
    let pods = format!(
        "{}/tests/fixtures/mail-pods.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let run = |extra: &[&str]| {
        let out = ns
            .command(env!("CARGO_BIN_EXE_podnat-controller"))
            .args([
                "-firewallflavor=iptables",
                "-nodeid=node1",
                "--pods-file",
                &pods,
            ])
            .args(extra)
            .output()
            .expect("run the agent once");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let stderr = run(&[]);
    assert!(
        stderr.contains(
            "not published: port 587/tcp on 203.0.113.5 is served by the node itself (0.0.0.0:587)"
        ),
        "{stderr}"
    );
    let saved = ns.sh("iptables-nft-save -t nat");
    assert_eq!(dnat_ports(&saved), [25, 143].into(), "{saved}");
    run(&["-guardnodeports=false"]);
    assert_eq!(
        dnat_ports(&ns.sh("iptables-nft-save -t nat")),
        [25, 143, 587].into()
    );
}

/// One byte there and back on an open connection.
fn echo_on(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"y").is_ok() && s.read_exact(&mut b).is_ok() && b == *b"y"
}

/// The public IPv4 ports the agent publishes, read from the kernel in
/// either flavor.
fn published(w: &World, flavor: &str) -> BTreeSet<u16> {
    match flavor {
        "nftables" => w
            .dnat()
            .iter()
            .filter_map(|e| e.split(':').nth(1)?.split('/').next()?.parse().ok())
            .collect(),
        _ => dnat_ports(&w.sandbox.node.sh("iptables-nft-save -t nat")),
    }
}

/// The public ports of the agent's DNAT rules in `iptables-nft-save` text.
fn dnat_ports(saved: &str) -> BTreeSet<u16> {
    saved
        .lines()
        .filter(|l| l.starts_with("-A PODNAT_PRE") && l.contains("-j DNAT"))
        .filter_map(|l| l.split("--dport ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn namespaces_publish_what_the_admin_allows_nftables() {
    namespaces_publish_what_the_admin_allows("nftables");
}

#[test]
fn namespaces_publish_what_the_admin_allows_iptables() {
    namespaces_publish_what_the_admin_allows("iptables");
}

/// Selector and ports annotation, changed both ways while the agent runs.
fn namespaces_publish_what_the_admin_allows(flavor: &str) {
    let w = World::new("nspolicy");
    crowd(&w.sandbox.node);
    let foreign = foreign_tables(&w.sandbox.node);
    let _echo = Server::long_echo(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent_with(&[
        &format!("-firewallflavor={flavor}"),
        "-namespaceselector=podnat.bln.space/publish=true",
    ]);
    agent.wait_first_sync();
    w.create_pod(
        "mx",
        NODE,
        Some(r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcPort":587,"dstPort":2525}]}"#),
    );
    w.set_running("mx", POD_A_IP);
    // Not selected: nothing published, the event says why.
    wait_for("NATRefused: not selected", WAIT, || {
        w.events("mx", "NATRefused")
            .iter()
            .any(|n| n.contains("namespace mail is not selected by -namespaceselector"))
    });
    assert!(published(&w, flavor).is_empty());

    // The admin selects the namespace: published at once.
    let t = Instant::now();
    w.patch_namespace(
        "mail",
        serde_json::json!({"labels": {"podnat.bln.space/publish": "true"}}),
    );
    wait_for("both ports published", WAIT, || {
        published(&w, flavor) == [25, 587].into()
    });
    eprintln!("{flavor}: label → published: {:?}", t.elapsed());
    let client = &w.sandbox.client;
    let mut conn = client.run(|| {
        TcpStream::connect_timeout(
            &format!("{PUBLIC_IP}:25").parse().unwrap(),
            Duration::from_secs(2),
        )
        .expect("connect through 25")
    });
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(echo_on(&mut conn), "the open connection works");

    // The admin allows 587 only: 25 goes, with its open connection.
    let t = Instant::now();
    w.patch_namespace(
        "mail",
        serde_json::json!({"annotations": {"bln.space/podnat-ports": "587"}}),
    );
    wait_for("25 withdrawn", WAIT, || {
        published(&w, flavor) == [587].into()
    });
    eprintln!("{flavor}: ports annotation → withdrawn: {:?}", t.elapsed());
    // The conntrack flush follows the commit on the firewall thread (the
    // kernel shows the rule gone a few ms before the entry goes): the open
    // connection must stop within moments, and never work again.
    wait_for(
        "the connection through the withdrawn port stops reaching the pod",
        Duration::from_secs(3),
        || !echo_on(&mut conn),
    );
    assert!(!echo_on(&mut conn), "a stopped connection stays stopped");
    assert!(harness::roundtrip(client, 587));
    wait_for("NATRefused: may publish only 587", WAIT, || {
        w.events("mx", "NATRefused")
            .iter()
            .any(|n| n.contains("port 25/tcp: namespace mail may publish only 587"))
    });

    // A malformed annotation: the namespace publishes nothing until fixed.
    w.patch_namespace(
        "mail",
        serde_json::json!({"annotations": {"bln.space/podnat-ports": "587,smtp"}}),
    );
    wait_for("nothing published", WAIT, || {
        published(&w, flavor).is_empty()
    });
    wait_for("NATRefused: malformed", WAIT, || {
        w.events("mx", "NATRefused").iter().any(|n| {
            n.contains("publishes nothing until its ports annotation is fixed")
                && n.contains("\"smtp\" is not a port")
        })
    });
    let m = metrics(&w.sandbox.node);
    assert!(
        metric(
            &m,
            "podnat_entries_refused_total{reason=\"namespace_policy_invalid\"}"
        )
        .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "podnat_refused_entries{reason=\"namespace_policy_invalid\"}"
        ),
        Some(2.0),
        "{m}"
    );

    // Fixed and the annotation removed: both ports again; the label
    // removed: nothing.
    w.patch_namespace(
        "mail",
        serde_json::json!({"annotations": {"bln.space/podnat-ports": null}}),
    );
    wait_for("both ports again", WAIT, || {
        published(&w, flavor) == [25, 587].into()
    });
    assert!(harness::roundtrip(client, 25));
    w.patch_namespace(
        "mail",
        serde_json::json!({"labels": {"podnat.bln.space/publish": null}}),
    );
    wait_for("withdrawn when the label goes", WAIT, || {
        published(&w, flavor).is_empty()
    });
    assert!(!harness::roundtrip(client, 25));
    assert_eq!(
        foreign_tables(&w.sandbox.node),
        foreign,
        "foreign tables touched"
    );
    drop(agent);
}

/// Kernel tunnel sockets count: a VXLAN link's UDP socket (flannel's
/// 8472) is a socket of the kernel that NETLINK_SOCK_DIAG lists like a
/// user's, so a pod cannot take the overlay's port. (WireGuard's link type
/// is not available on this kernel; its socket is a kernel UDP socket the
/// same way.)
#[test]
fn a_vxlan_tunnel_port_is_served_by_the_node() {
    let ns = Netns::new("guard-vxlan");
    ns.sh("ip link add wan0 type veth peer name wan0p && ip link set wan0p up && ip link set wan0 up && ip addr add 203.0.113.5/24 dev wan0");
    ns.sh("ip link add vx0 type vxlan id 7 dstport 8472 dev wan0 && ip link set vx0 up");
    let dir = std::env::temp_dir().join(format!("podnat-vxlan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pods = dir.join("pods.json");
    let annotation = r#"{"entries":[{"srcPort":8472,"dstPort":8472,"proto":"udp"},{"srcPort":51821,"dstPort":51821,"proto":"udp"}]}"#;
    std::fs::write(
        &pods,
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [{
            "metadata": {"name": "vpn", "namespace": "net", "creationTimestamp": "2026-01-02T03:04:05Z",
                         "annotations": {"bln.space/podnat": annotation}},
            "spec": {"nodeName": "node1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.9",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }]})
        .to_string(),
    )
    .unwrap();
    let out = ns
        .command(env!("CARGO_BIN_EXE_podnat-controller"))
        .args(["-firewallflavor=nftables", "-nodeid=node1", "--pods-file"])
        .arg(&pods)
        .output()
        .expect("run the agent once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("port 8472/udp on 203.0.113.5 is served by the node itself (0.0.0.0:8472)"),
        "{stderr}"
    );
    let map = ns.sh("nft list map ip podnat dnat_to_pod");
    assert!(map.contains("udp . 51821"), "{map}");
    assert!(!map.contains("8472"), "{map}");
    let _ = std::fs::remove_dir_all(&dir);
}
