use super::*;
use crate::model::{NatKey, PodRef, Proto};
use std::net::{IpAddr, Ipv4Addr};

/// The SPEC's 3-port mail server pod, plus a UDP entry and an SNAT.
fn mail() -> RuleSet {
    let owner = PodRef::new("mail", "mx-0");
    let public_ip: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
    let pod_ip: IpAddr = Ipv4Addr::new(10, 1, 0, 5).into();
    let mut rules = RuleSet::default();
    for port in [25, 143, 587] {
        rules.dnat.push(Mapping {
            key: NatKey {
                public_ip,
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip,
            pod_port: port,
            owner: owner.clone(),
            span: 0,
        });
        rules.forward.push(ForwardRule {
            pod_ip,
            proto: Proto::Tcp,
            pod_port: port,
            owner: owner.clone(),
            span: 0,
        });
    }
    rules.snat.push(SnatRule {
        pod_ip,
        proto: Proto::Tcp,
        public_ip,
        owner,
    });
    rules.normalize();
    rules
}

#[test]
fn iptables_golden_mail_server() {
    let got = iptables_save(&mail(), &Names::new("podnat"), Family::Ipv4);
    let want = r#"*nat
:PODNAT_POST - [0:0]
:PODNAT_PRE - [0:0]
-A PREROUTING -m comment --comment "podnat[jump_to_chain]" -j PODNAT_PRE
-A POSTROUTING -m comment --comment "podnat[jump_to_chain]" -j PODNAT_POST
-A PODNAT_POST -d 172.16.0.0/12 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 192.168.0.0/16 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 10.0.0.0/8 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 127.0.0.0/8 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -s 10.1.0.5/32 -p tcp -m comment --comment "mail:mx-0" -j SNAT --to-source 203.0.113.7
-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment "mail:mx-0" -j DNAT --to-destination 10.1.0.5:25
-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 143 -m comment --comment "mail:mx-0" -j DNAT --to-destination 10.1.0.5:143
-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 587 -m comment --comment "mail:mx-0" -j DNAT --to-destination 10.1.0.5:587
COMMIT
*filter
:PODNAT_FORWARD - [0:0]
-A FORWARD -m comment --comment "podnat[jump_to_chain]" -j PODNAT_FORWARD
-A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 25 -m comment --comment "mail:mx-0" -j ACCEPT
-A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 143 -m comment --comment "mail:mx-0" -j ACCEPT
-A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 587 -m comment --comment "mail:mx-0" -j ACCEPT
COMMIT
"#;
    assert_eq!(got, want);
}

#[test]
fn nft_golden_mail_server() {
    let got = nft(&mail(), &Names::new("podnat"), Family::Ipv4);
    let want = "table ip podnat {
\tcomment \"podnat-controller:podnat\"
\tmap dnat_to_pod {
\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
\t\telements = { 203.0.113.7 . tcp . 25 comment \"mail:mx-0\" : 10.1.0.5 . 25,
\t\t\t     203.0.113.7 . tcp . 143 comment \"mail:mx-0\" : 10.1.0.5 . 143,
\t\t\t     203.0.113.7 . tcp . 587 comment \"mail:mx-0\" : 10.1.0.5 . 587 }
\t}

\tmap snat_to_public {
\t\ttype ipv4_addr . inet_proto : ipv4_addr
\t\telements = { 10.1.0.5 . tcp comment \"mail:mx-0\" : 203.0.113.7 }
\t}

\tset forward_allowed {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 10.1.0.5 . tcp . 25 comment \"mail:mx-0\",
\t\t\t     10.1.0.5 . tcp . 143 comment \"mail:mx-0\",
\t\t\t     10.1.0.5 . tcp . 587 comment \"mail:mx-0\" }
\t}

\tset mapping_traffic {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tcounter
\t\telements = { 203.0.113.7 . tcp . 25 counter packets 0 bytes 0 comment \"mail:mx-0\",
\t\t\t     203.0.113.7 . tcp . 143 counter packets 0 bytes 0 comment \"mail:mx-0\",
\t\t\t     203.0.113.7 . tcp . 587 counter packets 0 bytes 0 comment \"mail:mx-0\" }
\t}

\tset source_restricted {
\t\ttype ipv4_addr . inet_proto . inet_service
\t}

\tset source_allowed {
\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr
\t\tflags interval
\t}

\tchain prerouting {
\t\tcomment \"podnat-controller:podnat\"
\t\ttype nat hook prerouting priority dstnat - 1; policy accept;
\t\tdnat ip to ip daddr . meta l4proto . th dport map @dnat_to_pod
\t}

\tchain postrouting {
\t\tcomment \"podnat-controller:podnat\"
\t\ttype nat hook postrouting priority srcnat - 1; policy accept;
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr 10.0.0.0/8 return
\t\tip daddr 172.16.0.0/12 return
\t\tip daddr 192.168.0.0/16 return
\t\tsnat to ip saddr . meta l4proto map @snat_to_public
\t}

\tchain forward {
\t\tcomment \"podnat-controller:podnat\"
\t\ttype filter hook forward priority filter - 1; policy accept;
\t\tct state new ip daddr . meta l4proto . th dport @forward_allowed accept
\t}

\tchain source_prerouting {
\t\tcomment \"podnat-controller:podnat\"
\t\ttype filter hook prerouting priority dstnat - 10; policy accept;
\t\tip daddr . meta l4proto . th dport @source_restricted ip daddr . meta l4proto . th dport . ip saddr != @source_allowed drop
\t}

\tchain traffic_forward {
\t\tcomment \"podnat-controller:podnat\"
\t\ttype filter hook forward priority filter - 2; policy accept;
\t\tmeta l4proto tcp ct original ip daddr . ct protocol . ct original proto-dst @mapping_traffic
\t\tmeta l4proto udp ct original ip daddr . ct protocol . ct original proto-dst @mapping_traffic
\t}
}
";
    assert_eq!(got, want);
}

#[test]
fn empty_sets_have_no_elements_line() {
    let got = nft(&RuleSet::default(), &Names::new("pn"), Family::Ipv4);
    assert!(got.starts_with("table ip pn {\n"));
    assert!(!got.contains("elements"));
}

#[test]
fn canonical_sorts_kernel_order() {
    let kernel = "\t\telements = { 203.0.113.7 . tcp . 587 comment \"a:b\" : 10.1.0.5 . 587,\n\t\t\t     203.0.113.7 . tcp . 25 comment \"a:b\" : 10.1.0.5 . 25 }\n";
    let want = "\t\telements = { 203.0.113.7 . tcp . 25 comment \"a:b\" : 10.1.0.5 . 25,\n\t\t\t     203.0.113.7 . tcp . 587 comment \"a:b\" : 10.1.0.5 . 587 }\n";
    assert_eq!(canonical_nft(kernel), want);
}

/// nft puts two IPv4 addresses on a line of a plain address set, one
/// IPv6 address (or concatenation) per line (`make demo` diffs three
/// hairpin sources against `nft list table`).
#[test]
fn local_pods_elements_break_as_nft_prints_them() {
    use crate::model::{LocalPod, PodRef};
    let mut r = RuleSet::default();
    for i in 1..=9u8 {
        r.local.push(LocalPod {
            pod_ip: std::net::IpAddr::from([10, 1, 0, i]),
            owner: PodRef::new("ns", format!("p{i}")),
        });
    }
    let text = nft_with(&r, &Names::new("podnat"), Family::Ipv4, true);
    let line = text
        .lines()
        .find(|l| l.contains("10.1.0.1 comment"))
        .unwrap();
    assert_eq!(line.matches(" comment ").count(), 2, "{text}");
    assert!(
        text.contains(",\n\t\t\t     10.1.0.9 comment \"ns:p9\" }"),
        "{text}"
    );
}
