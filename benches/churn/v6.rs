//! The IPv6 rows of the churn benchmark: the same work on `ip6` tables —
//! ours (both flavors, IPv6 only, with their floors) beside
//! `ip6tables-nft-restore --noflush` (B) and `nft -f` with the same maps (M).

use super::*;
use podnat_controller::model::{Families, Family};
use std::net::{IpAddr, Ipv6Addr};

const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const V6_ONLY: Families = Families {
    ipv4: false,
    ipv6: true,
};

fn pod_ip6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0xfd00,
        2,
        0,
        0,
        0,
        0,
        (i >> 16) as u16,
        i as u16 + 1,
    ))
}

/// Ports 0..n over IPv6, each its own pod: one DNAT, one SNAT, one FORWARD.
fn table6(n: u32) -> RuleSet {
    let mut r = RuleSet::default();
    for i in 0..n {
        let owner = PodRef::new("bench", format!("p-{i}"));
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip: PUBLIC6.into(),
                public_port: 10000 + i as u16,
                proto: Proto::Tcp,
            },
            pod_ip: pod_ip6(i),
            pod_port: 80,
            owner: owner.clone(),
        });
        r.snat.push(SnatRule {
            pod_ip: pod_ip6(i),
            proto: Proto::Tcp,
            public_ip: PUBLIC6.into(),
            owner: owner.clone(),
        });
        r.forward.push(ForwardRule {
            pod_ip: pod_ip6(i),
            proto: Proto::Tcp,
            pod_port: 80,
            owner,
        });
    }
    r.normalize();
    r
}

/// (table, `-A ...` line) of ports n_from..n_to, as ip6tables-nft-save prints them.
fn lines6(n_from: u32, n_to: u32) -> Vec<(String, String)> {
    let names = Names::new("podnat");
    let t = table6(n_to);
    let mut out = Vec::new();
    for i in n_from..n_to {
        let ip = pod_ip6(i);
        let s = t.snat.iter().find(|s| s.pod_ip == ip).unwrap();
        let f = t.forward.iter().find(|f| f.pod_ip == ip).unwrap();
        let d = t.dnat.iter().find(|m| m.pod_ip == ip).unwrap();
        out.push(("nat".to_string(), view::ipt_dnat(&names, d)));
        out.push(("nat".to_string(), view::ipt_snat(&names, s)));
        out.push(("filter".to_string(), view::ipt_forward(&names, f)));
    }
    out
}

fn m6_elements(verb: &str, i: u32) -> String {
    let ip = pod_ip6(i);
    let p = 10000 + i;
    if verb == "add" {
        format!(
            "add element ip6 podnat dnat_to_pod {{ {PUBLIC6} . tcp . {p} comment \"bench:p-{i}\" : {ip} . 80 }}\n\
             add element ip6 podnat snat_to_public {{ {ip} . tcp comment \"bench:p-{i}\" : {PUBLIC6} }}\n\
             add element ip6 podnat forward_allowed {{ {ip} . tcp . 80 comment \"bench:p-{i}\" }}\n"
        )
    } else {
        format!(
            "delete element ip6 podnat dnat_to_pod {{ {PUBLIC6} . tcp . {p} }}\n\
             delete element ip6 podnat snat_to_public {{ {ip} . tcp }}\n\
             delete element ip6 podnat forward_allowed {{ {ip} . tcp . 80 }}\n"
        )
    }
}

/// Install n, add 1 and delete 1 at n, over IPv6.
pub fn rows6(n: u32, peers: bool) -> [Row; 3] {
    let (base, plus) = (table6(n), table6(n + 1));
    let ns = Netns::new("b6o");
    let (b2, p2) = (base.clone(), plus.clone());
    let nft = ns.run(move || {
        let mut be = NftablesBackend::for_families(Names::new("podnat"), V6_ONLY);
        measure_ours!(be, b2, p2)
    });
    let ns = Netns::new("b6i");
    let ipt = ns.run(move || {
        let mut be =
            IptablesBackend::for_families(Names::new("podnat"), JumpPositions::default(), V6_ONLY);
        measure_ours!(be, base, plus)
    });
    let mut rows = [0, 1, 2].map(|i| Row {
        ours: Some(nft[i].0),
        floor: Some(nft[i].1),
        ours_ipt: Some(ipt[i].0),
        floor_ipt: Some(ipt[i].1),
        ..Row::default()
    });
    if !peers {
        return rows;
    }

    // B: ip6tables-nft-restore --noflush.
    let ns = Netns::new("b6b");
    let full = tmpfile("b6-full", &restore_file(&lines6(0, n), false, true));
    let add1 = tmpfile("b6-add", &restore_file(&lines6(n, n + 1), false, false));
    let del1 = tmpfile("b6-del", &restore_file(&lines6(n, n + 1), true, false));
    let restore = |f: &str| stdin_cmd("ip6tables-nft-restore", &["--noflush"], f);
    let mut install = vec![];
    for _ in 0..REPS {
        ns.sh("ip6tables-nft -t nat -F; ip6tables-nft -t nat -X; ip6tables-nft -t filter -F; ip6tables-nft -t filter -X; true");
        install.push(timed(&ns, restore(&full)));
    }
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        add.push(timed(&ns, restore(&add1)));
        del.push(timed(&ns, restore(&del1)));
    }
    rows[0].b = Some(median(install));
    rows[1].b = Some(median(add));
    rows[2].b = Some(median(del));

    // M: nft -f with the same maps in an ip6 table.
    let ns = Netns::new("b6m");
    let full = tmpfile(
        "m6-full",
        &view::nft(&table6(n), &Names::new("podnat"), Family::Ipv6),
    );
    let add1 = tmpfile("m6-add", &m6_elements("add", n));
    let del1 = tmpfile("m6-del", &m6_elements("delete", n));
    let nft_f = |f: &str| {
        let mut c = Command::new("nft");
        c.args(["-f", f]);
        c
    };
    let mut install = vec![];
    for _ in 0..REPS {
        ns.sh("nft delete table ip6 podnat 2>/dev/null; true");
        install.push(timed(&ns, nft_f(&full)));
    }
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        add.push(timed(&ns, nft_f(&add1)));
        del.push(timed(&ns, nft_f(&del1)));
    }
    rows[0].m = Some(median(install));
    rows[1].m = Some(median(add));
    rows[2].m = Some(median(del));
    rows
}
