//! Per-mapping traffic counters (issue 25) in the nftables flavor, against
//! the real kernel on a crowded dual-stack node: N datagrams to a published
//! UDP port are exactly N packets on its key and their IP lengths in bytes;
//! a TCP exchange counts both directions; the node's own datagrams count
//! (local access); another key counts nothing; a key
//! that changes hands starts again from zero; the table still equals the
//! view (counter values aside) and a re-apply sends nothing.

mod support;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::flavors::nftables::{read_traffic, Traffic};
use podnat_controller::firewall::{
    backend_counting, backend_with_options, view, Backend, Changes, TrafficSource,
};
use podnat_controller::model::{Families, Family, NatKey, PodRef, Proto, RuleSet};
use support::crowd::crowd_dual;
use support::netns::{Netns, Sandbox, POD_A_IP, POD_A_IP6, POD_B_IP, POD_B_IP6};
use support::rules::{names, publish};
use support::save::agent_save_by;

const PUBLIC4: &str = "203.0.113.7";
const PUBLIC6: &str = "2001:db8::7";

fn backend() -> Box<dyn Backend> {
    backend_with_options(
        Flavor::Nftables,
        names(),
        JumpPositions::default(),
        Families::DUAL,
        true,
    )
}

/// Pod A publishes 5353/udp and 25/tcp (to 2525), pod B 26/tcp, on both
/// families.
fn rules() -> RuleSet {
    let mut r = RuleSet::default();
    for (public, a, b) in [
        (PUBLIC4, POD_A_IP, POD_B_IP),
        (PUBLIC6, POD_A_IP6, POD_B_IP6),
    ] {
        publish(&mut r, "mail:mx-0", public, 5353, Proto::Udp, a, 5353);
        publish(&mut r, "mail:mx-0", public, 25, Proto::Tcp, a, 2525);
        publish(&mut r, "mail:web-0", public, 26, Proto::Tcp, b, 2525);
    }
    r.normalize();
    r
}

fn key(public: &str, port: u16, proto: Proto) -> NatKey {
    NatKey {
        public_ip: public.parse().unwrap(),
        public_port: port,
        proto,
    }
}

fn traffic(ns: &Netns) -> Vec<Traffic> {
    ns.run(|| read_traffic(&names(), Families::DUAL, 0))
        .unwrap()
        .expect("the table counts traffic")
}

/// `change` on the kernel state just read, as the agent applies a change.
fn apply_change(ns: &Netns, change: Changes) {
    ns.run(move || {
        let mut b = backend();
        b.read()?;
        b.apply_changes(change)
    })
    .unwrap()
    .expect("the change applies");
}

/// `r` with one key more: 27/tcp on IPv4 to pod A's 2527.
fn with_port_27(r: &RuleSet) -> RuleSet {
    let mut grown = r.clone();
    publish(
        &mut grown,
        "mail:mx-0",
        PUBLIC4,
        27,
        Proto::Tcp,
        POD_A_IP,
        2527,
    );
    grown.normalize();
    grown
}

fn of(list: &[Traffic], k: NatKey) -> (u64, u64) {
    let t = list.iter().find(|t| t.key == k).expect("a counted key");
    (t.packets, t.bytes)
}

#[test]
fn each_published_key_counts_its_packets_and_bytes() {
    let sb = Sandbox::new("trf").with_ipv6();
    crowd_dual(&sb.node);
    let r = rules();
    let first = r.clone();
    sb.node.run(move || backend().apply(&first)).unwrap();
    counts_exactly(&sb, &r, &|| traffic(&sb.node));

    // The table is still the view (counter values aside), and nothing to do.
    for (family, fam) in [(Family::Ipv4, "ip"), (Family::Ipv6, "ip6")] {
        assert_eq!(
            view::canonical_nft(&sb.node.sh(&format!("nft list table {fam} podnat"))),
            view::canonical_nft(&view::nft_with(
                &r.of_family(family),
                &names(),
                family,
                true
            )),
        );
    }
    let again = r.clone();
    let report = sb.node.run(move || backend().apply(&again)).unwrap();
    assert_eq!(report.messages, 0, "{report:?}");

    // Another pod takes 5353/udp: its key starts again from zero; the
    // others keep counting.
    let mut moved = r.clone();
    for m in moved.dnat.iter_mut().filter(|m| m.key.public_port == 5353) {
        m.owner = PodRef::new("mail", "mx-1");
    }
    moved.normalize();
    let tcp25 = of(&traffic(&sb.node), key(PUBLIC4, 25, Proto::Tcp));
    apply_change(&sb.node, Changes::between(&r, &moved));
    let after = traffic(&sb.node);
    assert_eq!(of(&after, key(PUBLIC4, 5353, Proto::Udp)), (0, 0));
    assert_eq!(of(&after, key(PUBLIC4, 25, Proto::Tcp)), tcp25);

    // The dry run of a change, fed to `nft -f`, makes what apply makes:
    // the new key's counted element included (else the next read would
    // see the layout drifted and rebuild it).
    let grown = with_port_27(&moved);
    let g = grown.clone();
    let text = sb.node.run(move || backend().dry_run(&g, false)).unwrap();
    assert!(text.contains("mapping_traffic"), "{text}");
    sb.node.sh(&format!("nft -f - <<'EOF'\n{text}EOF"));
    let g = grown.clone();
    let report = sb.node.run(move || backend().apply(&g)).unwrap();
    assert_eq!(
        report.messages, 0,
        "the dry run's text was the change: {report:?}"
    );

    // A thousand keys more: one scrape finds them all.
    let mut many = grown.clone();
    for port in 30000..31000 {
        publish(
            &mut many,
            "mail:mx-0",
            PUBLIC4,
            port,
            Proto::Udp,
            POD_A_IP,
            5353,
        );
    }
    many.normalize();
    apply_change(&sb.node, Changes::between(&grown, &many));
    let expected = many.dnat.len();
    let all = sb
        .node
        .run(move || read_traffic(&names(), Families::DUAL, expected))
        .unwrap()
        .unwrap();
    assert_eq!(all.len(), expected);
    let after = all;

    // A scrape's cost here, for the record (timing is the bench's job).
    let t = Instant::now();
    let _ = traffic(&sb.node);
    eprintln!("read_traffic of {} keys: {:?}", after.len(), t.elapsed());

    sb.node.run(|| backend().cleanup()).unwrap();
    assert_eq!(
        sb.node
            .run(|| read_traffic(&names(), Families::DUAL, 0))
            .unwrap(),
        None
    );
}

/// N datagrams to a published UDP port are exactly N packets on its key and
/// their IP lengths in bytes, in both families; the node's own datagrams
/// count (local access); a TCP exchange counts both directions; other keys
/// count nothing. `traffic`: the counters now.
fn counts_exactly(sb: &Sandbox, r: &RuleSet, traffic: &dyn Fn() -> Vec<Traffic>) {
    // Every key is counted, from zero.
    let before = traffic();
    assert_eq!(before.len(), r.dnat.len());
    assert!(before.iter().all(|t| t.packets == 0 && t.bytes == 0));

    // A pod that reads and never answers: only the client's datagrams
    // pass (no reply, no ICMP error).
    let sink = sb
        .pod_a
        .run(|| UdpSocket::bind("[::]:5353").expect("bind 5353 in pod A"));
    const N: u64 = 10;
    const PAYLOAD: usize = 100;
    for (public, header) in [(PUBLIC4, 20 + 8), (PUBLIC6, 40 + 8)] {
        let to = SocketAddr::new(public.parse::<IpAddr>().unwrap(), 5353);
        sb.client.run(|| {
            let s = UdpSocket::bind(if public.contains(':') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            })
            .unwrap();
            for _ in 0..N {
                s.send_to(&[7u8; PAYLOAD], to).unwrap();
            }
        });
        // The pod got them all (so the counter saw them all).
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];
        for i in 0..N {
            let (n, _) = sink
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} to {public}: {e}"));
            assert_eq!(n, PAYLOAD);
        }
        let (packets, bytes) = of(&traffic(), key(public, 5353, Proto::Udp));
        assert_eq!(packets, N, "{public}: exactly the datagrams sent");
        assert_eq!(
            bytes,
            N * (PAYLOAD + header) as u64,
            "{public}: their IP lengths"
        );
    }

    // With local access the node's own connections count too (its packets
    // in the output hook; replies would count in the input hook).
    let before = of(&traffic(), key(PUBLIC4, 5353, Proto::Udp));
    sb.node.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..N {
            s.send_to(&[7u8; PAYLOAD], (PUBLIC4, 5353)).unwrap();
        }
    });
    let mut buf = [0u8; 512];
    for i in 0..N {
        sink.recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} from the node: {e}"));
    }
    assert_eq!(
        of(&traffic(), key(PUBLIC4, 5353, Proto::Udp)),
        (before.0 + N, before.1 + N * (PAYLOAD + 28) as u64),
        "the node's own datagrams"
    );

    // A TCP exchange through 25 counts both directions; 26 stays at zero.
    let listener = sb.pod_a.run(|| TcpListener::bind("[::]:2525").unwrap());
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        std::io::Read::read_exact(&mut c, &mut b).unwrap();
        std::io::Write::write_all(&mut c, &b).unwrap();
    });
    sb.client.run(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::new(PUBLIC4.parse().unwrap(), 25),
            Duration::from_secs(2),
        )
        .unwrap();
        std::io::Write::write_all(&mut s, b"hello").unwrap();
        let mut b = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
    });
    server.join().unwrap();
    let now = traffic();
    let (packets, bytes) = of(&now, key(PUBLIC4, 25, Proto::Tcp));
    // SYN, SYN-ACK, ACK, data, its ACK or the echo: at least five, both ways.
    assert!(packets >= 5, "{packets} packets");
    assert!(bytes >= packets * 40, "{bytes} bytes");
    assert_eq!(of(&now, key(PUBLIC4, 26, Proto::Tcp)), (0, 0));
    assert_eq!(of(&now, key(PUBLIC6, 25, Proto::Tcp)), (0, 0));
}

/// The iptables flavor with `-iptablescounters`: one counting rule per
/// mapping in `<PREFIX>_COUNT` (ip and ip6 mangle, from POSTROUTING and,
/// with local access, INPUT) counts exactly what the nftables flavor's set
/// counts; `iptables-nft-save` / `ip6tables-nft-save` list the chains as
/// the view does, `-C` finds each counting rule, a re-apply sends nothing,
/// and the rules' counters survive a change of another key.
#[test]
fn each_published_key_counts_its_packets_and_bytes_iptables() {
    let sb = Sandbox::new("trfi").with_ipv6();
    crowd_dual(&sb.node);
    let backend = || {
        backend_counting(
            Flavor::Iptables,
            names(),
            JumpPositions::default(),
            Families::DUAL,
            true,
            true,
        )
    };
    let source = TrafficSource::for_flavor(Flavor::Iptables, names(), Families::DUAL, true)
        .expect("counted");
    let read = || {
        let s = source.clone();
        sb.node
            .run(move || s.read(0))
            .unwrap()
            .expect("the chains count traffic")
    };
    let r = rules();
    let first = r.clone();
    sb.node.run(move || backend().apply(&first)).unwrap();
    counts_exactly(&sb, &r, &read);
    for (family, tool) in [
        (Family::Ipv4, "iptables-nft"),
        (Family::Ipv6, "ip6tables-nft"),
    ] {
        let text = view::iptables_save_counted(&r.of_family(family), &names(), family, true, true);
        assert!(text.contains("*mangle\n:PODNAT_COUNT - [0:0]"), "{text}");
        assert_eq!(
            agent_save_by(&sb.node, &format!("{tool}-save")),
            text,
            "{tool}-save"
        );
        // As iptables-nft-save prints them: the saved text finds the rule,
        // and a save restores it (below).
        for spec in text
            .lines()
            .filter_map(|l| l.strip_prefix("-A PODNAT_COUNT "))
        {
            let out = sb
                .node
                .try_sh(&format!("{tool} -t mangle -C PODNAT_COUNT {spec}"));
            assert!(
                out.status.success(),
                "{tool} -C PODNAT_COUNT {spec}: {out:?}"
            );
        }
    }
    let again = r.clone();
    let report = sb.node.run(move || backend().apply(&again)).unwrap();
    assert_eq!(report.messages, 0, "{report:?}");
    // A save restored (iptables-persistent at boot): the counting rules come
    // back as the agent's own (unmarked: adopted once), nothing refused.
    sb.node
        .sh("iptables-nft-save > /tmp/trfi.save && iptables-nft-restore < /tmp/trfi.save; rm -f /tmp/trfi.save");
    let again = r.clone();
    sb.node.run(move || backend().apply(&again)).unwrap();
    let again = r.clone();
    let report = sb.node.run(move || backend().apply(&again)).unwrap();
    assert_eq!(report.messages, 0, "settled after the restore: {report:?}");
    // Another key added: the others keep their counts (their rules stay).
    let before = read();
    let grown = with_port_27(&r);
    let g = grown.clone();
    sb.node.run(move || backend().apply(&g)).unwrap();
    let after = read();
    assert_eq!(
        of(&after, key(PUBLIC4, 5353, Proto::Udp)),
        of(&before, key(PUBLIC4, 5353, Proto::Udp))
    );
    assert_eq!(of(&after, key(PUBLIC4, 27, Proto::Tcp)), (0, 0));
    // A change of the pod port alone, as the loop applies it (one batch on
    // top of the last commit): the counting rule (key and owner) stays,
    // with its count.
    let mut moved = grown.clone();
    for m in moved
        .dnat
        .iter_mut()
        .filter(|m| m.key == key(PUBLIC4, 5353, Proto::Udp))
    {
        m.pod_port = 5354;
    }
    for f in moved
        .forward
        .iter_mut()
        .filter(|f| f.pod_port == 5353 && f.pod_ip.is_ipv4())
    {
        f.pod_port = 5354;
    }
    moved.normalize();
    let change = Changes::between(&grown, &moved);
    let applied = sb
        .node
        .run(move || {
            let mut b = backend();
            b.read()?;
            b.apply_changes(change)
        })
        .unwrap();
    let report = applied.expect("the change fits the settled chains");
    assert!(report.messages <= 4, "DNAT and FORWARD only: {report:?}");
    assert_eq!(
        of(&read(), key(PUBLIC4, 5353, Proto::Udp)),
        of(&after, key(PUBLIC4, 5353, Proto::Udp))
    );
    let grown = moved;
    // Without the flag the counting chains go, the rest stays.
    let plain = grown.clone();
    sb.node
        .run(move || {
            backend_with_options(
                Flavor::Iptables,
                names(),
                JumpPositions::default(),
                Families::DUAL,
                true,
            )
            .apply(&plain)
        })
        .unwrap();
    assert!(!sb
        .node
        .sh("iptables-nft-save; ip6tables-nft-save")
        .contains("PODNAT_COUNT"));
    assert_eq!(
        agent_save_by(&sb.node, "iptables-nft-save"),
        view::iptables_save_with(&grown.of_family(Family::Ipv4), &names(), Family::Ipv4, true)
    );
    // With it again, then `cleanup`: nothing of the agent's is left in
    // mangle either.
    let g = grown.clone();
    sb.node.run(move || backend().apply(&g)).unwrap();
    assert!(sb
        .node
        .sh("iptables-nft-save -t mangle")
        .contains("PODNAT_COUNT"));
    let said = sb.node.run(move || backend().cleanup()).unwrap();
    assert!(
        said.iter().any(|l| l.contains("mangle PODNAT_COUNT")),
        "{said:?}"
    );
    let left = sb.node.sh("nft list ruleset");
    // (The tables stay: the restore above made them anew, unmarked.)
    for gone in ["PODNAT_COUNT", "PODNAT_FORWARD", "PODNAT_POST"] {
        assert!(!left.contains(gone), "{gone}: {left}");
    }
}
