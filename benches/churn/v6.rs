//! The IPv6 rows of the churn benchmark: the same work on `ip6` tables —
//! ours (both flavors, IPv6 only, with their floors) beside
//! `ip6tables-nft-restore --noflush` (B) and `nft -f` with the same maps (M),
//! built by the IPv4 rows' own functions with IPv6 addresses.

use super::*;
use podnat_controller::model::Families;
use std::net::Ipv6Addr;

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

fn table6(n: u32) -> RuleSet {
    table_of(n, PUBLIC6.into(), pod_ip6)
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
    let (b2, p2) = (base.clone(), plus.clone());
    let ipt = ns.run(move || {
        let mut be =
            IptablesBackend::for_families(Names::new("podnat"), JumpPositions::default(), V6_ONLY);
        measure_ours!(be, b2, p2)
    });
    let mut rows = [0, 1, 2].map(|i| Row {
        ours: Some(nft[i].0),
        floor: Some(nft[i].1),
        ours_ipt: Some(ipt[i].0),
        floor_ipt: Some(ipt[i].1),
        ..Row::default()
    });
    if peers {
        let full = ipt_lines_of(&base, 0, n, pod_ip6);
        let one = ipt_lines_of(&plus, n, n + 1, pod_ip6);
        restore_rows("b6b", "ip6tables-nft", &full, &one, &mut rows);
        let full = view::nft(&base, &Names::new("podnat"), Family::Ipv6);
        let public = IpAddr::V6(PUBLIC6);
        let add = m_elements_of("add", "ip6", public, pod_ip6(n), n);
        let del = m_elements_of("delete", "ip6", public, pod_ip6(n), n);
        nft_map_rows("b6m", "ip6", &full, &add, &del, &mut rows);
    }
    rows
}
