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
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::coalesce::Coalescer;

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

/// How long the watcher lets a burst of events settle before it re-reads:
/// one `ip addr replace` or a link flap sends several messages, and one
/// re-read covers them all.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but no longer than this under a constant stream of events.
const MAX_DELAY: Duration = Duration::from_millis(200);

/// Back-off bounds for re-reading after a failed dump.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

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

/// Reads links and addresses once, on a connection of its own, and chooses.
/// Runs in the network namespace of the calling thread.
pub async fn detect_once(filter: &AddressFilter) -> Result<Choice, AddressError> {
    let (conn, handle, _events) =
        rtnetlink::new_connection().map_err(|source| AddressError::Socket { source })?;
    // The connection is a future that moves the messages; driving it here
    // rather than spawning it means it is gone when this returns.
    tokio::select! {
        choice = read_choice(&handle, filter) => choice,
        () = conn => Err(AddressError::ConnectionClosed),
    }
}

async fn read_choice(handle: &Handle, filter: &AddressFilter) -> Result<Choice, AddressError> {
    let links: Vec<LinkFacts> = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| LinkFacts::from_message(&m))
        .try_collect()
        .await
        .map_err(|source| AddressError::DumpLinks { source })?;
    let mut request = handle.address().get();
    // Ask the kernel for IPv4 only instead of dumping every family.
    request.message_mut().header.family = AddressFamily::Inet;
    let addrs: Vec<AddrFacts> = request
        .execute()
        .try_filter_map(|m| futures::future::ready(Ok(AddrFacts::from_message(&m))))
        .try_collect()
        .await
        .map_err(|source| AddressError::DumpAddresses { source })?;
    Ok(choose(&links, &addrs, filter))
}

/// Subscribes to link and IPv4 address events, reads the current choice, and
/// spawns a task that re-reads after every burst of events and publishes the
/// result. Must run inside a tokio runtime; the socket belongs to the network
/// namespace of the calling thread.
///
/// The receiver starts with a real reading, never a placeholder `None`, so a
/// consumer cannot tear rules down just because it started first. Receivers
/// are woken only when [`Choice::chosen`] changes; the skipped list in the
/// channel is kept current without waking anyone.
///
/// The task ends with `Ok(())` once every receiver is dropped, and with
/// [`AddressError::ConnectionClosed`] if the kernel connection goes away;
/// a failed re-read is logged and retried, keeping the previous choice.
pub async fn spawn_watcher(
    filter: AddressFilter,
) -> Result<(watch::Receiver<Choice>, WatcherTask), AddressError> {
    let (conn, handle, events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
            .map_err(|source| AddressError::Subscribe { source })?;
    let conn = tokio::spawn(conn);
    // Subscribed before the first read: a change racing with it still sends
    // an event, so it cannot be missed.
    let first = match read_choice(&handle, &filter).await {
        Ok(choice) => choice,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    tracing::info!(public_address = %first, "public address detected");
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        let result = follow(&handle, events, &filter, &tx, &conn).await;
        conn.abort();
        result
    });
    Ok((rx, task))
}

/// The watcher's task: it ends only when nobody listens any more (`Ok`) or
/// the kernel connection is gone (`Err`), so `main` can treat its end as
/// fatal.
pub type WatcherTask = JoinHandle<Result<(), AddressError>>;

type Events = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

async fn follow(
    handle: &Handle,
    mut events: Events,
    filter: &AddressFilter,
    tx: &watch::Sender<Choice>,
    conn: &JoinHandle<()>,
) -> Result<(), AddressError> {
    loop {
        // Which event it was does not matter: any of them (an overrun
        // included) means "read again".
        tokio::select! {
            () = tx.closed() => return Ok(()),
            event = events.next() => if event.is_none() {
                return Err(AddressError::ConnectionClosed);
            },
        }
        // Let the burst end (one re-read covers it); a closed stream shows on
        // the next turn of the loop.
        let mut burst = Coalescer::new(tokio::time::Instant::now(), DEBOUNCE, MAX_DELAY);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(burst.deadline()) => break,
                event = events.next() => match event {
                    Some(_) => burst.poke(tokio::time::Instant::now()),
                    None => break,
                },
            }
        }

        let mut delay = RETRY_MIN;
        let choice = loop {
            match read_choice(handle, filter).await {
                Ok(choice) => break choice,
                Err(e) => {
                    if conn.is_finished() {
                        return Err(AddressError::ConnectionClosed);
                    }
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot re-read the node's addresses; keeping the previous public address");
                    tokio::select! {
                        () = tx.closed() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        publish(tx, choice);
    }
}

fn publish(tx: &watch::Sender<Choice>, choice: Choice) {
    let previous = tx.borrow().chosen;
    if previous != choice.chosen {
        tracing::info!(
            previous = %previous.map_or("none".to_string(), |a| a.to_string()),
            public_address = %choice,
            "public address changed"
        );
    }
    tx.send_if_modified(move |current| {
        let changed = current.chosen != choice.chosen;
        *current = choice;
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn up(index: u32, name: &str) -> LinkFacts {
        LinkFacts {
            index,
            name: name.into(),
            admin_up: true,
            carrier: true,
            oper_state: State::Unknown,
        }
    }

    fn addr(index: u32, a: &str) -> AddrFacts {
        AddrFacts {
            index,
            address: ip(a),
            prefix_len: 24,
            flags: AddressFlags::Permanent,
        }
    }

    #[test]
    fn default_filter_covers_the_non_public_ranges() {
        let f = AddressFilter::default();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.5.2",
            "169.254.1.1",
            "100.64.0.1",
            "100.127.255.254",
        ] {
            assert_eq!(
                f.filtered_by(ip(a)).map(|(_, r)| r),
                Some(FilterRule::Default),
                "{a}"
            );
        }
        for a in [
            "203.0.113.7",
            "198.51.100.1",
            "172.32.0.1",
            "100.128.0.1",
            "8.8.8.8",
        ] {
            assert_eq!(f.filtered_by(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn exclusion_allows_a_default_network_or_part_of_it() {
        let f = AddressFilter::new(&[], &[net("192.168.0.0/16")]);
        assert_eq!(f.filtered_by(ip("192.168.5.2")), None);
        assert!(f.filtered_by(ip("10.1.0.2")).is_some());

        let f = AddressFilter::new(&[], &[net("192.168.5.0/24")]);
        assert_eq!(f.filtered_by(ip("192.168.5.2")), None);
        assert_eq!(
            f.filtered_by(ip("192.168.6.2")),
            Some((net("192.168.0.0/16"), FilterRule::Default))
        );
    }

    #[test]
    fn inclusion_filters_more_and_beats_exclusion() {
        let f = AddressFilter::new(&[net("203.0.113.0/24")], &[]);
        assert_eq!(
            f.filtered_by(ip("203.0.113.7")),
            Some((net("203.0.113.0/24"), FilterRule::Included))
        );
        assert_eq!(f.filtered_by(ip("198.51.100.1")), None);

        let f = AddressFilter::new(&[net("192.168.5.0/24")], &[net("192.168.0.0/16")]);
        assert_eq!(
            f.filtered_by(ip("192.168.5.2")),
            Some((net("192.168.5.0/24"), FilterRule::Included))
        );
        assert_eq!(f.filtered_by(ip("192.168.6.2")), None);
    }

    #[test]
    fn filter_networks_are_truncated_to_their_prefix() {
        let f = AddressFilter::new(&[net("203.0.113.77/24")], &[]);
        assert!(f.filtered_by(ip("203.0.113.1")).is_some());
    }

    #[test]
    fn first_public_address_is_chosen_and_the_rest_explained() {
        let links = [up(1, "lo"), up(2, "d0"), up(3, "d1"), up(4, "d2")];
        let addrs = [
            addr(1, "127.0.0.1"),
            addr(2, "10.1.0.2"),
            addr(3, "192.168.5.2"),
            addr(4, "203.0.113.7"),
        ];
        let c = choose(&links, &addrs, &AddressFilter::default());
        assert_eq!(c.chosen, Some(ip("203.0.113.7")));
        assert_eq!(
            c.skipped,
            vec![
                (
                    ip("127.0.0.1"),
                    SkipReason::Filtered {
                        net: net("127.0.0.0/8"),
                        rule: FilterRule::Default
                    }
                ),
                (
                    ip("10.1.0.2"),
                    SkipReason::Filtered {
                        net: net("10.0.0.0/8"),
                        rule: FilterRule::Default
                    }
                ),
                (
                    ip("192.168.5.2"),
                    SkipReason::Filtered {
                        net: net("192.168.0.0/16"),
                        rule: FilterRule::Default
                    }
                ),
            ]
        );
    }

    #[test]
    fn lower_ifindex_wins_whatever_the_input_order() {
        let links = [up(9, "b"), up(3, "a")];
        let addrs = [addr(9, "198.51.100.1"), addr(3, "203.0.113.7")];
        let c = choose(&links, &addrs, &AddressFilter::default());
        assert_eq!(c.chosen, Some(ip("203.0.113.7")));
        assert_eq!(
            c.skipped,
            vec![(
                ip("198.51.100.1"),
                SkipReason::NotFirst {
                    chosen: ip("203.0.113.7")
                }
            )]
        );
    }

    #[test]
    fn dump_order_decides_within_a_link() {
        let links = [up(2, "d0")];
        let addrs = [addr(2, "203.0.113.9"), addr(2, "198.51.100.1")];
        let c = choose(&links, &addrs, &AddressFilter::default());
        assert_eq!(c.chosen, Some(ip("203.0.113.9")));
    }

    #[test]
    fn secondary_is_never_chosen_even_when_its_primary_is_filtered() {
        let links = [up(2, "d0")];
        let mut secondary = addr(2, "203.0.113.7");
        secondary.flags |= AddressFlags::Secondary;
        let addrs = [addr(2, "203.0.113.9"), secondary.clone()];
        let c = choose(&links, &addrs, &AddressFilter::default());
        assert_eq!(c.chosen, Some(ip("203.0.113.9")));
        assert_eq!(
            c.skipped,
            vec![(
                ip("203.0.113.7"),
                SkipReason::Secondary { link: "d0".into() }
            )]
        );

        let c = choose(
            &links,
            &addrs,
            &AddressFilter::new(&[net("203.0.113.9/32")], &[]),
        );
        assert_eq!(c.chosen, None);
        assert!(matches!(c.skipped[1].1, SkipReason::Secondary { .. }));
    }

    #[test]
    fn tentative_deprecated_and_dadfailed_are_skipped() {
        let links = [up(2, "d0")];
        for (flag, name) in [
            (AddressFlags::Tentative, "tentative"),
            (AddressFlags::Deprecated, "deprecated"),
            (
                AddressFlags::Dadfailed,
                "duplicate address detection failed",
            ),
        ] {
            let mut a = addr(2, "203.0.113.7");
            a.flags |= flag;
            let c = choose(&links, &[a], &AddressFilter::default());
            assert_eq!(c.chosen, None);
            assert_eq!(
                c.skipped,
                vec![(
                    ip("203.0.113.7"),
                    SkipReason::NotValid {
                        link: "d0".into(),
                        flag: name
                    }
                )]
            );
        }
    }

    #[test]
    fn down_links_are_ignored() {
        let mut admin_down = up(2, "d0");
        admin_down.admin_up = false;
        let mut no_carrier = up(3, "d1");
        no_carrier.carrier = false;
        let mut dormant = up(4, "d2");
        dormant.oper_state = State::Dormant;
        let mut oper_up = up(5, "d3");
        oper_up.oper_state = State::Up;
        let links = [admin_down, no_carrier, dormant, oper_up];
        let addrs = [
            addr(2, "203.0.113.2"),
            addr(3, "203.0.113.3"),
            addr(4, "203.0.113.4"),
            addr(5, "203.0.113.5"),
        ];
        let c = choose(&links, &addrs, &AddressFilter::default());
        assert_eq!(c.chosen, Some(ip("203.0.113.5")));
        let downs: Vec<u32> = c
            .skipped
            .iter()
            .filter_map(|(_, why)| match why {
                SkipReason::LinkDown { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(downs, vec![2, 3, 4]);
    }

    #[test]
    fn address_without_its_link_is_skipped() {
        let c = choose(&[], &[addr(7, "203.0.113.7")], &AddressFilter::default());
        assert_eq!(c.chosen, None);
        assert_eq!(
            c.skipped,
            vec![(ip("203.0.113.7"), SkipReason::LinkMissing { index: 7 })]
        );
    }

    #[test]
    fn nothing_to_choose_from() {
        assert_eq!(
            choose(&[], &[], &AddressFilter::default()),
            Choice::default()
        );
    }

    #[test]
    fn link_facts_from_message() {
        let mut msg = LinkMessage::default();
        msg.header.index = 4;
        msg.header.flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Broadcast;
        msg.attributes.push(LinkAttribute::IfName("eth0".into()));
        msg.attributes.push(LinkAttribute::OperState(State::Up));
        assert_eq!(
            LinkFacts::from_message(&msg),
            LinkFacts {
                index: 4,
                name: "eth0".into(),
                admin_up: true,
                carrier: true,
                oper_state: State::Up
            }
        );
        let l = LinkFacts::from_message(&LinkMessage::default());
        assert!(!l.admin_up && !l.carrier && l.oper_state == State::Unknown);
    }

    #[test]
    fn addr_facts_prefer_local_and_full_flags() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = 3;
        msg.header.prefix_len = 32;
        // A point-to-point link: IFA_ADDRESS is the peer.
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(ip("203.0.113.1"))));
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(ip("203.0.113.7"))));
        msg.attributes.push(AddressAttribute::Flags(
            AddressFlags::Permanent | AddressFlags::Noprefixroute,
        ));
        assert_eq!(
            AddrFacts::from_message(&msg),
            Some(AddrFacts {
                index: 3,
                address: ip("203.0.113.7"),
                prefix_len: 32,
                flags: AddressFlags::Permanent | AddressFlags::Noprefixroute,
            })
        );

        let mut v6 = AddressMessage::default();
        v6.header.family = AddressFamily::Inet6;
        v6.attributes
            .push(AddressAttribute::Address("2001:db8::1".parse().unwrap()));
        assert_eq!(AddrFacts::from_message(&v6), None);
    }

    #[test]
    fn addr_facts_fall_back_to_header_flags() {
        use netlink_packet_route::address::AddressHeaderFlags;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.flags = AddressHeaderFlags::Secondary;
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(ip("203.0.113.7"))));
        let a = AddrFacts::from_message(&msg).unwrap();
        assert!(a.flags.contains(AddressFlags::Secondary));
    }

    #[test]
    fn choice_display_names_every_skip() {
        let links = [up(2, "d0")];
        let c = choose(
            &links,
            &[addr(2, "10.1.0.2"), addr(2, "203.0.113.7")],
            &AddressFilter::default(),
        );
        assert_eq!(
            c.to_string(),
            "203.0.113.7 (skipped: 10.1.0.2: in 10.0.0.0/8, filtered by default (allow it with -exclfilternet 10.0.0.0/8))"
        );
        assert_eq!(Choice::default().to_string(), "none");
    }

    fn arb_links() -> impl Strategy<Value = Vec<LinkFacts>> {
        proptest::collection::btree_set(1u32..12, 0..6).prop_flat_map(|indexes| {
            let n = indexes.len();
            (
                Just(indexes),
                proptest::collection::vec((any::<bool>(), any::<bool>(), 0u8..8), n),
            )
                .prop_map(|(indexes, states)| {
                    indexes
                        .into_iter()
                        .zip(states)
                        .map(|(index, (admin_up, carrier, oper))| LinkFacts {
                            index,
                            name: format!("l{index}"),
                            admin_up,
                            carrier,
                            oper_state: State::from(oper),
                        })
                        .collect()
                })
        })
    }

    fn arb_addrs() -> impl Strategy<Value = Vec<AddrFacts>> {
        let nets = prop_oneof![
            Just([203u8, 0, 113]),
            Just([198, 51, 100]),
            Just([10, 1, 0]),
            Just([192, 168, 5]),
            Just([127, 0, 0]),
        ];
        proptest::collection::vec((1u32..12, nets, 1u8..255, 0u32..0x80), 0..12).prop_map(|v| {
            v.into_iter()
                .map(|(index, [a, b, c], d, flags)| AddrFacts {
                    index,
                    address: Ipv4Addr::new(a, b, c, d),
                    prefix_len: 24,
                    flags: AddressFlags::from_bits_retain(flags),
                })
                .collect()
        })
    }

    fn arb_filter() -> impl Strategy<Value = AddressFilter> {
        let nets = proptest::sample::subsequence(
            vec![
                net("203.0.113.0/24"),
                net("192.168.0.0/16"),
                net("10.1.0.0/24"),
                net("198.51.100.0/25"),
            ],
            0..3,
        );
        (nets.clone(), nets).prop_map(|(incl, excl)| AddressFilter::new(&incl, &excl))
    }

    proptest! {
        #[test]
        fn every_address_is_chosen_or_explained_once(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
            let c = choose(&links, &addrs, &filter);
            let mut seen: Vec<Ipv4Addr> = c.skipped.iter().map(|(a, _)| *a).chain(c.chosen).collect();
            let mut given: Vec<Ipv4Addr> = addrs.iter().map(|a| a.address).collect();
            seen.sort();
            given.sort();
            prop_assert_eq!(seen, given);
        }

        #[test]
        fn the_chosen_address_passes_every_check(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
            let c = choose(&links, &addrs, &filter);
            if let Some(chosen) = c.chosen {
                let ok = addrs.iter().any(|a| {
                    a.address == chosen
                        && skip_reason(links.iter().find(|l| l.index == a.index), a, &filter).is_none()
                });
                prop_assert!(ok);
                prop_assert!(filter.filtered_by(chosen).is_none());
            } else {
                let none_usable = c
                    .skipped
                    .iter()
                    .all(|(_, why)| !matches!(why, SkipReason::NotFirst { .. }));
                prop_assert!(none_usable);
            }
        }

        #[test]
        fn only_the_order_within_a_link_matters(links in arb_links(), addrs in arb_addrs(), filter in arb_filter(), seed in any::<u64>()) {
            // Shuffle the links and interleave the links' addresses anew,
            // keeping each link's own order.
            let mut shuffled_links = links.clone();
            shuffled_links.sort_by_key(|l| (u64::from(l.index) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut regrouped = addrs.clone();
            regrouped.sort_by_key(|a| (u64::from(a.index) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            prop_assert_eq!(choose(&links, &addrs, &filter), choose(&shuffled_links, &regrouped, &filter));
        }
    }
}
