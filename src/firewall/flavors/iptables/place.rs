//! Where the agent hooks into iptables-nft's tables: each place is a base
//! chain of iptables-nft's (PREROUTING, POSTROUTING, FORWARD, nat OUTPUT,
//! and with `-iptablescounters` mangle POSTROUTING and INPUT) and the
//! agent's chain its jump leads to.

use rustables::{Chain, ChainPolicy, ChainType, Hook, HookClass, Table};

use crate::config::JumpPositions;
use crate::firewall::names::Names;
use crate::firewall::wire::netlink::{attr_be32, attr_str, find_attr, sys};

pub(super) const NAT: &str = "nat";
pub(super) const FILTER: &str = "filter";
pub(super) const MANGLE: &str = "mangle";
/// The tables the agent may use, in the order it reads and writes them.
pub(super) const TABLES: [&str; 3] = [NAT, FILTER, MANGLE];

/// The index of `table` (one of `TABLES`, as every place's table is) in
/// `TABLES`.
pub(super) fn table_index(table: &str) -> usize {
    match table {
        NAT => 0,
        FILTER => 1,
        _ => {
            debug_assert_eq!(table, MANGLE);
            2
        }
    }
}

/// One of the places the agent hooks in: a parent (base) chain of
/// iptables-nft's and the agent's chain its jump leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    Pre,
    Post,
    Forward,
    /// nat OUTPUT → `<PREFIX>_OUTPUT` (`-localaccess`), which jumps to
    /// `<PREFIX>_PRE`: the node's own connections get the same DNAT.
    Output,
    /// mangle POSTROUTING → `<PREFIX>_COUNT` (`-iptablescounters`): every
    /// DNATed packet leaving the node, forwarded (both directions) or its
    /// own, walks the counting rules.
    Count,
    /// mangle INPUT → `<PREFIX>_COUNTIN` (`-iptablescounters` with
    /// `-localaccess`): the replies to the node's own connections; it jumps
    /// to `<PREFIX>_COUNT`.
    CountInput,
}

/// How many places there are (the length of every per-place array).
pub(super) const N_PLACES: usize = 6;

/// Every place; the first three are the Go version's, the fourth is
/// `-localaccess`'s, the last two `-iptablescounters`'.
pub(super) const PLACES: [Place; N_PLACES] = [
    Place::Pre,
    Place::Post,
    Place::Forward,
    Place::Output,
    Place::Count,
    Place::CountInput,
];

/// The places the agent manages: `local` adds nat OUTPUT, `counters` the
/// counting chains in mangle (INPUT's with `local` only).
pub(super) fn places(local: bool, counters: bool) -> &'static [Place] {
    const GO: [Place; 3] = [Place::Pre, Place::Post, Place::Forward];
    const COUNTED: [Place; 4] = [Place::Pre, Place::Post, Place::Forward, Place::Count];
    match (local, counters) {
        (false, false) => &GO,
        (true, false) => &PLACES[..4],
        (false, true) => &COUNTED,
        (true, true) => &PLACES,
    }
}

impl Place {
    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn table(self) -> &'static str {
        match self {
            Place::Pre | Place::Post | Place::Output => NAT,
            Place::Forward => FILTER,
            Place::Count | Place::CountInput => MANGLE,
        }
    }

    pub(super) fn parent(self) -> &'static str {
        match self {
            Place::Pre => "PREROUTING",
            Place::Post => "POSTROUTING",
            Place::Forward => "FORWARD",
            Place::Output => "OUTPUT",
            Place::Count => "POSTROUTING",
            Place::CountInput => "INPUT",
        }
    }

    /// The base chain's hook, priority and type, as iptables-nft creates
    /// it on first use.
    pub(super) fn hook(self) -> (HookClass, i32, ChainType) {
        match self {
            Place::Pre => (HookClass::PreRouting, -100, ChainType::Nat),
            Place::Post => (HookClass::PostRouting, 100, ChainType::Nat),
            Place::Forward => (HookClass::Forward, 0, ChainType::Filter),
            Place::Output => (HookClass::Out, -100, ChainType::Nat),
            Place::Count => (HookClass::PostRouting, -150, ChainType::Filter),
            Place::CountInput => (HookClass::In, -150, ChainType::Filter),
        }
    }

    /// The base chain as iptables-nft creates it (policy accept), with the
    /// agent's mark.
    pub(super) fn base_chain(self, table: &Table, names: &Names) -> Chain {
        let (hook, priority, ty) = self.hook();
        Chain::new(table)
            .with_name(self.parent())
            .with_hook(Hook::new(hook, priority))
            .with_policy(ChainPolicy::Accept)
            .with_type(ty)
            .with_userdata(names.mark_udata())
    }

    /// Whether the dumped chain `c` is this place's base chain as the agent
    /// (or iptables-nft) makes it: hook, priority, type, policy accept.
    pub(super) fn made_like(self, c: &[u8]) -> bool {
        let (hook, priority, ty) = self.hook();
        let h = find_attr(c, sys::NFTA_CHAIN_HOOK).unwrap_or(&[]);
        let ty = if ty == ChainType::Nat {
            "nat"
        } else {
            "filter"
        };
        attr_be32(h, sys::NFTA_HOOK_HOOKNUM) == Some(hook as u32)
            && attr_be32(h, sys::NFTA_HOOK_PRIORITY) == Some(priority as u32)
            && attr_str(c, sys::NFTA_CHAIN_TYPE).as_deref() == Some(ty)
            && attr_be32(c, sys::NFTA_CHAIN_POLICY) == Some(libc::NF_ACCEPT as u32)
    }

    pub(super) fn own(self, n: &Names) -> &str {
        match self {
            Place::Pre => &n.pre,
            Place::Post => &n.post,
            Place::Forward => &n.forward,
            Place::Output => &n.output,
            Place::Count => &n.count,
            Place::CountInput => &n.count_input,
        }
    }

    pub(super) fn requested(self, j: &JumpPositions) -> i32 {
        match self {
            Place::Pre => j.prerouting,
            Place::Post => j.postrouting,
            Place::Forward => j.forward,
            Place::Output => j.output,
            // First: a foreign ACCEPT before the jump would end the walk
            // of mangle's chain before the packet is counted.
            Place::Count | Place::CountInput => 1,
        }
    }

    /// Whether a version of the agent that did not mark its objects ever
    /// made this place's base chain. Not mangle's: every version that hooks
    /// there marks what it makes, so an unmarked one holding the agent's
    /// jump is someone else's (e.g. iptables-restore's).
    pub(super) fn unmarked_by_earlier_versions(self) -> bool {
        !matches!(self, Place::Count | Place::CountInput)
    }

    /// The rule in the base chain that leads to the agent's chain: a plain
    /// jump, or for the counting chains a jump of DNATed packets only.
    pub(super) fn jump(self, n: &Names) -> super::rules::AgentRule {
        let own = self.own(n).to_string();
        match self {
            Place::Count | Place::CountInput => super::rules::AgentRule::DnatJump(own),
            _ => super::rules::AgentRule::Jump(own),
        }
    }
}
