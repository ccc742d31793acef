//! Names of everything the agent owns, derived from `-resourceprefix`, and
//! the few fixed parts of its layout (hairpin mark, internal-network
//! returns), so the backends, the views and `cleanup` agree on them.

use std::net::{IpAddr, Ipv4Addr};

use crate::model::Family;

/// Object names for one resource prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The prefix as given (`podnat`): native table name, jump comment.
    pub prefix: String,
    /// `<PREFIX>_PRE` in `ip nat`.
    pub pre: String,
    /// `<PREFIX>_POST` in `ip nat`.
    pub post: String,
    /// `<PREFIX>_FORWARD` in `ip filter`.
    pub forward: String,
    /// Comment of the jump rules: `<prefix>[jump_to_chain]`.
    pub jump_comment: String,
    /// Comment of the internal-network RETURNs in `<PREFIX>_POST`:
    /// `<prefix>[no_snat_for_internal]`, as the Go version's `ensureDefaults`.
    pub internal_comment: String,
    /// `<PREFIX>_OUTPUT` in `ip nat` (`-localaccess`).
    pub output: String,
    /// Comment of the hairpin masquerade: `<prefix>[hairpin]`.
    pub hairpin_comment: String,
    /// `<PREFIX>_COUNT` in `ip mangle` (`-iptablescounters`): one counting
    /// rule per mapping, reached from mangle POSTROUTING.
    pub count: String,
    /// `<PREFIX>_COUNTIN` in `ip mangle`: reached from mangle INPUT
    /// (with `-localaccess`, the replies to the node's own connections),
    /// one jump to `<PREFIX>_COUNT`. (iptables takes chain names of at most
    /// 28 characters: a 20-character prefix and `_FORWARD` or `_COUNTIN`.)
    pub count_input: String,
}

/// Native flavor: map/set and chain names inside `table ip <prefix>`.
pub const NFT_DNAT_MAP: &str = "dnat_to_pod";
pub const NFT_SNAT_MAP: &str = "snat_to_public";
pub const NFT_FORWARD_SET: &str = "forward_allowed";
pub const NFT_PRE_CHAIN: &str = "prerouting";
pub const NFT_POST_CHAIN: &str = "postrouting";
pub const NFT_FORWARD_CHAIN: &str = "forward";
/// `-localaccess`: the node's own connections (nat output hook) and the
/// hairpin sources (every pod on this node).
pub const NFT_OUTPUT_CHAIN: &str = "output";
pub const NFT_LOCAL_SET: &str = "local_pods";
pub const NFT_OUTPUT_PRIORITY: i32 = -101;
/// Source allow-lists (`sourceRanges`): the restricted keys, the allowed
/// (key, source range) intervals, and the filter chains that drop the rest
/// before any DNAT — prerouting, and output with `-localaccess`.
pub const NFT_RESTRICTED_SET: &str = "source_restricted";
pub const NFT_SOURCES_SET: &str = "source_allowed";
pub const NFT_SOURCE_PRE_CHAIN: &str = "source_prerouting";
pub const NFT_SOURCE_OUT_CHAIN: &str = "source_output";
/// Before the agent's DNAT (-101) and conntrack's (-200) after: `dstnat - 10`.
pub const NFT_SOURCE_PRIORITY: i32 = -110;
/// Per-mapping traffic counters: a set of the published keys with a counter
/// on each element, looked up by every forwarded packet of a connection
/// whose original destination is one (both directions), just before the
/// agent's forward chain — and, with `-localaccess`, by the node's own
/// connections' packets (output, and input for the replies).
pub const NFT_TRAFFIC_SET: &str = "mapping_traffic";
pub const NFT_TRAFFIC_CHAIN: &str = "traffic_forward";
pub const NFT_TRAFFIC_OUT_CHAIN: &str = "traffic_output";
pub const NFT_TRAFFIC_IN_CHAIN: &str = "traffic_input";
pub const NFT_TRAFFIC_PRIORITY: i32 = -2;
/// The mark bit of a hairpin connection (a pod of this node to a published
/// address of the node): set in prerouting, masqueraded on in postrouting, as
/// netavark does with the same bit; kube-proxy's bits are 0x4000 and 0x8000.
pub const HAIRPIN_MARK: u32 = 0x2000;
/// Base chain priorities: just before the standard dstnat (-100), srcnat
/// (100) and filter (0) hooks, so the agent's NAT runs before kube-proxy's.
pub const NFT_PRE_PRIORITY: i32 = -101;
pub const NFT_POST_PRIORITY: i32 = 99;
pub const NFT_FORWARD_PRIORITY: i32 = -1;

/// The networks `<PREFIX>_POST` returns un-NATed, in the order the Go version
/// puts them at the head of its chain (its `internalNetworks`, inserted at
/// positions 1..4 by `ensureDefaults`): the networks of
/// `model::INTERNAL_NETWORKS`, ordered so `iptables-nft-save` prints the Go
/// version's very lines. The native flavor keeps its own order.
pub const GO_INTERNAL_NETWORKS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
];

/// The networks `<PREFIX>_POST` returns un-NATed in `f`'s table, in chain
/// order: IPv4 as the Go version; IPv6 (which it never had) fc00::/7,
/// fe80::/10, ::1/128.
pub fn internal_returns(f: Family) -> Vec<(IpAddr, u8)> {
    match f {
        Family::Ipv4 => GO_INTERNAL_NETWORKS
            .iter()
            .map(|(n, l)| (IpAddr::V4(*n), *l))
            .collect(),
        Family::Ipv6 => crate::model::internal_networks(f),
    }
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        let up = prefix.to_ascii_uppercase();
        Names {
            prefix: prefix.to_string(),
            pre: format!("{up}_PRE"),
            post: format!("{up}_POST"),
            forward: format!("{up}_FORWARD"),
            jump_comment: format!("{prefix}[jump_to_chain]"),
            internal_comment: format!("{prefix}[no_snat_for_internal]"),
            output: format!("{up}_OUTPUT"),
            hairpin_comment: format!("{prefix}[hairpin]"),
            count: format!("{up}_COUNT"),
            count_input: format!("{up}_COUNTIN"),
        }
    }

    /// The native flavor's table (`ip <prefix>`).
    pub fn table(&self) -> &str {
        &self.prefix
    }
}

/// The ownership mark: the comment of every table and chain the agent
/// creates (nf_tables userdata; `nft list` shows it, iptables-nft ignores
/// it). It names the resource prefix, so agents with different prefixes
/// never take each other's objects.
impl Names {
    pub fn mark(&self) -> String {
        format!("podnat-controller:{}", self.prefix)
    }

    /// The mark as userdata, for NFTA_TABLE_USERDATA / NFTA_CHAIN_USERDATA.
    pub(crate) fn mark_udata(&self) -> Vec<u8> {
        crate::firewall::wire::udata::comment(&self.mark())
    }

    /// Whether `udata` (a table's or chain's) carries this agent's mark.
    pub(crate) fn marked(&self, udata: Option<&[u8]>) -> bool {
        udata
            .and_then(crate::firewall::wire::udata::comment_of)
            .is_some_and(|c| c == self.mark())
    }
}
