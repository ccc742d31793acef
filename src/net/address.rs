//! Public address detection (IPv4, and IPv6 when enabled): links and addresses are dumped over rtnetlink
//! (never by running `ip`), one address is chosen by the pure [`choose`], and
//! [`spawn_watcher`] re-chooses on every link or address event so that an
//! address change on the node re-targets the rules. With `--public-address`
//! the agent skips this module altogether.
//!
//! # Which address is chosen
//!
//! Per enabled family, the first address, in this order, that is not skipped:
//! 1. links by ascending interface index;
//! 2. within one link, IPv4 addresses in the order the kernel dumps them
//!    (the kernel keeps primaries before secondaries, by scope and then by
//!    age, and uses the first one as its own source address); IPv6
//!    addresses in the reverse of it, oldest first (the kernel puts a new
//!    one ahead of the older ones of its scope).
//!
//! That is the order `ip -4 addr show` prints (and the reverse of `ip -6
//! addr show`'s per link), so an operator can read the choice off that
//! output.
//!
//! An address is skipped when
//! - its link is down: no `IFF_UP` (administratively down), no
//!   `IFF_LOWER_UP` (no carrier), or an operational state other than `UP` or
//!   `UNKNOWN`. `UNKNOWN` counts as up because dummy, tun and loopback links
//!   report it while they carry traffic;
//! - it is secondary (`IFA_F_SECONDARY`): the kernel marks an address
//!   secondary when it falls inside the subnet of one already on the link.
//!   It is an alias that the kernel neither uses as source nor keeps once its
//!   primary goes (unless `promote_secondaries` is set), so it is never chosen,
//!   not even when its primary is filtered;
//! - it is tentative, deprecated or failed duplicate detection: not, or no
//!   longer, valid as a source address;
//! - (IPv6) it is a temporary privacy address (`IFA_F_TEMPORARY`, the same
//!   bit as IPv4's secondary): it changes by design, so nothing can be
//!   published on it;
//! - it is filtered, see [`AddressFilter`].
//!
//! [`Choice::skipped`] lists every address that was not chosen and why,
//! including usable ones that only came later in the order.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::AddressFamily;

use crate::model::{DualStack, Families, Family};

/// Networks filtered unless `-exclfilternet` allows them again: loopback,
/// RFC 1918 private, link-local and carrier-grade NAT (RFC 6598). None of
/// them is reachable from the internet, so none can be the public address.
pub const DEFAULT_FILTERED: [Ipv4Net; 6] = [
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10),
];

/// IPv6 networks filtered by default: only global unicast can be public.
/// Loopback, link-local, unique local, multicast, IPv4-mapped and the
/// NAT64 well-known prefix.
pub const DEFAULT_FILTERED_V6: [Ipv6Net; 6] = [
    Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128),
    Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96),
];

/// Failures at the rtnetlink boundary.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot open an rtnetlink socket to read the node's addresses: {source}")]
    Socket {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot subscribe to rtnetlink link and IPv4 address events \
         (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR): {source}"
    )]
    Subscribe {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot dump the node's links over rtnetlink: {source}")]
    DumpLinks {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot dump the node's IPv4 addresses over rtnetlink: {source}")]
    DumpAddresses {
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "the rtnetlink connection closed, so address changes can no longer be \
         followed; restart the agent"
    )]
    ConnectionClosed,
}

/// Which rule filtered an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterRule {
    /// One of [`DEFAULT_FILTERED`], not allowed again by `-exclfilternet`.
    Default,
    /// Listed in `-inclfilternet`.
    Included,
}

/// The networks an address must not be in to count as public: the
/// defaults, minus `-exclfilternet`, plus `-inclfilternet`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressFilter {
    incl: Vec<IpNet>,
    excl: Vec<IpNet>,
    /// The families to detect an address of.
    families: Families,
}

impl Default for AddressFilter {
    fn default() -> Self {
        AddressFilter::new(&[], &[])
    }
}

impl AddressFilter {
    /// `incl` and `excl` come from `Config::incl_filter_net` and
    /// `Config::excl_filter_net`. An exclusion opens a hole in the defaults
    /// only: it can allow part of a default network (192.168.5.0/24 out of
    /// 192.168.0.0/16) but never an address that `incl` filters, because
    /// listing a network to filter is the more deliberate statement.
    pub fn new(incl: &[IpNet], excl: &[IpNet]) -> Self {
        AddressFilter {
            incl: incl.iter().map(IpNet::trunc).collect(),
            excl: excl.iter().map(IpNet::trunc).collect(),
            families: Families::default(),
        }
    }

    /// Detects addresses of `families` (IPv4 alone by default).
    pub fn with_families(mut self, families: Families) -> Self {
        self.families = families;
        self
    }

    pub fn families(&self) -> Families {
        self.families
    }

    /// The network and rule that filter `addr`, or `None` when it may be
    /// chosen.
    pub fn filtered_by(&self, addr: IpAddr) -> Option<(IpNet, FilterRule)> {
        if let Some(net) = self.incl.iter().find(|n| n.contains(&addr)) {
            return Some((*net, FilterRule::Included));
        }
        if self.excl.iter().any(|n| n.contains(&addr)) {
            return None;
        }
        match addr {
            IpAddr::V4(a) => DEFAULT_FILTERED
                .iter()
                .find(|n| n.contains(&a))
                .map(|net| (IpNet::V4(*net), FilterRule::Default)),
            IpAddr::V6(a) => DEFAULT_FILTERED_V6
                .iter()
                .find(|n| n.contains(&a))
                .map(|net| (IpNet::V6(*net), FilterRule::Default)),
        }
    }
}

/// What [`choose`] needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// `IFF_UP`: the administrator set it up.
    pub admin_up: bool,
    /// `IFF_LOWER_UP`: the link has carrier.
    pub carrier: bool,
    /// `IFLA_OPERSTATE` (RFC 2863); `Unknown` when the kernel sends none.
    pub oper_state: State,
}

impl LinkFacts {
    pub fn from_message(msg: &LinkMessage) -> LinkFacts {
        let mut name = String::new();
        let mut oper_state = State::Unknown;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name.clone_from(n),
                LinkAttribute::OperState(s) => oper_state = *s,
                _ => {}
            }
        }
        LinkFacts {
            index: msg.header.index,
            name,
            admin_up: msg.header.flags.contains(LinkFlags::Up),
            carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            oper_state,
        }
    }

    /// Why addresses on this link cannot be used, or `None` when it is up.
    fn down_because(&self) -> Option<String> {
        if !self.admin_up {
            return Some("administratively down (no IFF_UP)".into());
        }
        if !self.carrier {
            return Some("no carrier (no IFF_LOWER_UP)".into());
        }
        match self.oper_state {
            State::Up | State::Unknown => None,
            other => Some(format!("operational state {other:?}")),
        }
    }
}

/// What [`choose`] needs to know about one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrFacts {
    /// Interface index of the link the address is on.
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    pub flags: AddressFlags,
}

impl AddrFacts {
    /// `None` for anything but an IPv4 or IPv6 address.
    pub fn from_message(msg: &AddressMessage) -> Option<AddrFacts> {
        let v6 = match msg.header.family {
            AddressFamily::Inet => false,
            AddressFamily::Inet6 => true,
            _ => return None,
        };
        // IFA_LOCAL is the node's own address; IFA_ADDRESS is the peer's on
        // point-to-point links and equals IFA_LOCAL elsewhere.
        let mut local = None;
        let mut address = None;
        // The header holds only the low 8 flag bits; IFA_FLAGS has them all.
        let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(a) if a.is_ipv6() == v6 => local = Some(*a),
                AddressAttribute::Address(a) if a.is_ipv6() == v6 => address = Some(*a),
                AddressAttribute::Flags(f) => flags = *f,
                _ => {}
            }
        }
        Some(AddrFacts {
            index: msg.header.index,
            address: local.or(address)?,
            prefix_len: msg.header.prefix_len,
            flags,
        })
    }
}

/// Why an address was not chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Its link is down; `because` says how.
    LinkDown {
        link: String,
        index: u32,
        because: String,
    },
    /// The link vanished between the link and the address dump; the event
    /// that removed it triggers another read.
    LinkMissing { index: u32 },
    /// `IFA_F_SECONDARY`: an alias inside a primary's subnet.
    Secondary { link: String },
    /// `IFA_F_TEMPORARY` (IPv6 privacy extensions): it changes by design.
    Temporary { link: String },
    /// Tentative, deprecated or failed duplicate detection.
    NotValid { link: String, flag: &'static str },
    /// In a filtered network.
    Filtered { net: IpNet, rule: FilterRule },
    /// Usable, but `chosen` came first in the order.
    NotFirst { chosen: IpAddr },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::LinkDown {
                link,
                index,
                because,
            } => write!(f, "link {link} (index {index}) is down: {because}"),
            SkipReason::LinkMissing { index } => {
                write!(f, "link index {index} is gone (removed during the dump)")
            }
            SkipReason::Secondary { link } => {
                write!(f, "secondary address on {link}; only primaries are chosen")
            }
            SkipReason::Temporary { link } => write!(
                f,
                "temporary (privacy) address on {link}; it changes by design"
            ),
            SkipReason::NotValid { link, flag } => write!(f, "{flag} on {link}"),
            SkipReason::Filtered {
                net,
                rule: FilterRule::Default,
            } => write!(
                f,
                "in {net}, filtered by default (allow it with -exclfilternet {net})"
            ),
            SkipReason::Filtered {
                net,
                rule: FilterRule::Included,
            } => write!(f, "in {net}, listed in -inclfilternet"),
            SkipReason::NotFirst { chosen } => {
                write!(
                    f,
                    "usable, but {chosen} comes first (lower ifindex or earlier on its link)"
                )
            }
        }
    }
}

/// The outcome of [`choose`]: the public address of each enabled family,
/// if any, and every other address of those families with the reason it was
/// passed over, in the order considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub chosen: DualStack,
    pub skipped: Vec<(IpAddr, SkipReason)>,
}

impl Choice {
    /// The skipped addresses of one family.
    pub fn skipped_of(&self, f: Family) -> impl Iterator<Item = &(IpAddr, SkipReason)> {
        self.skipped
            .iter()
            .filter(move |(a, _)| Family::of(*a) == f)
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.chosen)?;
        for (i, (addr, why)) in self.skipped.iter().enumerate() {
            let sep = if i == 0 { " (skipped: " } else { "; " };
            write!(f, "{sep}{addr}: {why}")?;
        }
        if !self.skipped.is_empty() {
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// Picks the public address in the order the module documentation gives.
/// Pure: `addrs` in the kernel's dump order is all it assumes.
pub fn choose(links: &[LinkFacts], addrs: &[AddrFacts], filter: &AddressFilter) -> Choice {
    let links: BTreeMap<u32, &LinkFacts> = links.iter().map(|l| (l.index, l)).collect();
    // By link; within a link IPv4 in the kernel's order, IPv6 in the reverse
    // of it: the kernel puts a new IPv6 address ahead of the older ones of
    // its scope, so reversed the oldest comes first, and adding an address
    // (a VIP, a renumbered prefix) does not move the published one.
    let mut ordered: Vec<(i64, &AddrFacts)> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                if a.address.is_ipv6() {
                    -(i as i64)
                } else {
                    i as i64
                },
                a,
            )
        })
        .collect();
    ordered.sort_by_key(|(pos, a)| (a.index, a.address.is_ipv6(), *pos));
    let ordered: Vec<&AddrFacts> = ordered.into_iter().map(|(_, a)| a).collect();

    let mut choice = Choice::default();
    for addr in ordered {
        let family = Family::of(addr.address);
        if !filter.families.contains(family) {
            continue;
        }
        match (
            skip_reason(links.get(&addr.index).copied(), addr, filter),
            choice.chosen.get(family),
        ) {
            (Some(why), _) => choice.skipped.push((addr.address, why)),
            (None, Some(chosen)) => choice
                .skipped
                .push((addr.address, SkipReason::NotFirst { chosen })),
            (None, None) => choice.chosen.add(addr.address),
        }
    }
    choice
}

fn skip_reason(
    link: Option<&LinkFacts>,
    addr: &AddrFacts,
    filter: &AddressFilter,
) -> Option<SkipReason> {
    let Some(link) = link else {
        return Some(SkipReason::LinkMissing { index: addr.index });
    };
    if let Some(because) = link.down_because() {
        return Some(SkipReason::LinkDown {
            link: link.name.clone(),
            index: link.index,
            because,
        });
    }
    // IFA_F_TEMPORARY is IFA_F_SECONDARY's bit: IPv6 has no secondaries.
    if addr.flags.contains(AddressFlags::Secondary) {
        let link = link.name.clone();
        return Some(if addr.address.is_ipv6() {
            SkipReason::Temporary { link }
        } else {
            SkipReason::Secondary { link }
        });
    }
    // Dadfailed first: the kernel keeps a (permanent) address whose
    // detection failed tentative as well, and it will never become valid.
    for (flag, name) in [
        (
            AddressFlags::Dadfailed,
            "duplicate address detection failed",
        ),
        (AddressFlags::Tentative, "tentative"),
        (AddressFlags::Deprecated, "deprecated"),
    ] {
        if addr.flags.contains(flag) {
            return Some(SkipReason::NotValid {
                link: link.name.clone(),
                flag: name,
            });
        }
    }
    filter
        .filtered_by(addr.address)
        .map(|(net, rule)| SkipReason::Filtered { net, rule })
}

mod watcher;
pub use watcher::{detect_once, spawn_watcher, WatcherTask};

#[cfg(test)]
mod tests;
