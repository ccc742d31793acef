//! Public IPv4 detection: links and addresses are dumped over rtnetlink
//! (never by running `ip`), one address is chosen by the pure [`choose`], and
//! [`spawn_watcher`] re-chooses on every link or address event so that an
//! address change on the node re-targets the rules. With `--public-address`
//! the agent skips this module altogether.
//!
//! # Which address is chosen
//!
//! The first IPv4 address, in this order, that is not skipped:
//! 1. links by ascending interface index;
//! 2. within one link, addresses in the order the kernel dumps them. The
//!    kernel keeps primaries before secondaries, by scope and then by age,
//!    and uses the first one as its own source address.
//!
//! That is the order `ip -4 addr show` prints, so an operator can read the
//! choice off that output: the first address there that is not skipped.
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
//! - it is filtered, see [`AddressFilter`].
//!
//! [`Choice::skipped`] lists every address that was not chosen and why,
//! including usable ones that only came later in the order.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::AddressFamily;

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
    incl: Vec<Ipv4Net>,
    excl: Vec<Ipv4Net>,
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
    pub fn new(incl: &[Ipv4Net], excl: &[Ipv4Net]) -> Self {
        AddressFilter {
            incl: incl.iter().map(Ipv4Net::trunc).collect(),
            excl: excl.iter().map(Ipv4Net::trunc).collect(),
        }
    }

    /// The network and rule that filter `addr`, or `None` when it may be
    /// chosen.
    pub fn filtered_by(&self, addr: Ipv4Addr) -> Option<(Ipv4Net, FilterRule)> {
        if let Some(net) = self.incl.iter().find(|n| n.contains(&addr)) {
            return Some((*net, FilterRule::Included));
        }
        if self.excl.iter().any(|n| n.contains(&addr)) {
            return None;
        }
        DEFAULT_FILTERED
            .iter()
            .find(|n| n.contains(&addr))
            .map(|net| (*net, FilterRule::Default))
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

/// What [`choose`] needs to know about one IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrFacts {
    /// Interface index of the link the address is on.
    pub index: u32,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub flags: AddressFlags,
}

impl AddrFacts {
    /// `None` for anything but an IPv4 address.
    pub fn from_message(msg: &AddressMessage) -> Option<AddrFacts> {
        if msg.header.family != AddressFamily::Inet {
            return None;
        }
        // IFA_LOCAL is the node's own address; IFA_ADDRESS is the peer's on
        // point-to-point links and equals IFA_LOCAL elsewhere.
        let mut local = None;
        let mut address = None;
        // The header holds only the low 8 flag bits; IFA_FLAGS has them all.
        let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
                AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
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
    /// Tentative, deprecated or failed duplicate detection.
    NotValid { link: String, flag: &'static str },
    /// In a filtered network.
    Filtered { net: Ipv4Net, rule: FilterRule },
    /// Usable, but `chosen` came first in the order.
    NotFirst { chosen: Ipv4Addr },
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

/// The outcome of [`choose`]: the public address, if any, and every other
/// IPv4 address with the reason it was passed over, in the order considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub chosen: Option<Ipv4Addr>,
    pub skipped: Vec<(Ipv4Addr, SkipReason)>,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chosen {
            Some(a) => write!(f, "{a}")?,
            None => write!(f, "none")?,
        }
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
    let mut ordered: Vec<&AddrFacts> = addrs.iter().collect();
    // Stable, so the kernel's order within a link survives.
    ordered.sort_by_key(|a| a.index);

    let mut choice = Choice::default();
    for addr in ordered {
        match (
            skip_reason(links.get(&addr.index).copied(), addr, filter),
            choice.chosen,
        ) {
            (Some(why), _) => choice.skipped.push((addr.address, why)),
            (None, Some(chosen)) => choice
                .skipped
                .push((addr.address, SkipReason::NotFirst { chosen })),
            (None, None) => choice.chosen = Some(addr.address),
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
    if addr.flags.contains(AddressFlags::Secondary) {
        return Some(SkipReason::Secondary {
            link: link.name.clone(),
        });
    }
    for (flag, name) in [
        (AddressFlags::Tentative, "tentative"),
        (AddressFlags::Deprecated, "deprecated"),
        (
            AddressFlags::Dadfailed,
            "duplicate address detection failed",
        ),
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
