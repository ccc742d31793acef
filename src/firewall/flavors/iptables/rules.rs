//! The agent's iptables rules as iptables-nft 1.8.9 encodes them (native
//! meta/payload/cmp for `-p`/`-s`/`-d`/`--dport`, xt-compat `match` and
//! `target` for the rest, a `counter` in every rule), and back: a rule read
//! from the kernel is the agent's only if what it decodes to has the very
//! same expressions.
//!
//! `write.rs` turns an `AgentRule` into those expressions and the NEWRULE
//! attributes; `read.rs` turns a dumped rule back into an `AgentRule`. Both
//! meet in the reduced `Expr` list below (`exprs_of` is the one description).

mod read;
mod write;

pub(crate) use read::{decode, jump_target, parse_exprs};
pub(crate) use write::{exprs_of, rule_attrs};

use ipnet::IpNet;

use crate::model::{ForwardRule, LocalPod, Mapping, NatKey, PodRef, SnatRule};

/// A mapping counted in `<PREFIX>_COUNT` (`-iptablescounters`): its key,
/// the ports after it (a range's part) and its owner.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counted {
    pub key: NatKey,
    pub span: u16,
    pub owner: PodRef,
}

impl Counted {
    pub fn of(m: &Mapping) -> Counted {
        Counted {
            key: m.key,
            span: m.span,
            owner: m.owner.clone(),
        }
    }
}

/// One rule the agent writes. The variant order is the order inside a chain:
/// in `<PREFIX>_POST` the hairpin masquerade, then the internal-network
/// returns, then the SNATs; in `<PREFIX>_PRE` the hairpin marks before the
/// DNATs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentRule {
    /// `-m mark --mark 0x2000/0x2000 -m comment --comment "<prefix>[hairpin]"
    /// -j MASQUERADE` (`-localaccess`).
    Masquerade,
    /// `-d <GO_INTERNAL_NETWORKS[i]> -m comment --comment
    /// "<prefix>[no_snat_for_internal]" -j RETURN`.
    Return(usize),
    /// `-s P -m addrtype --dst-type LOCAL -m comment --comment ns:pod -j MARK
    /// --set-xmark 0x2000/0x2000` (`-localaccess`).
    Mark(LocalPod),
    Snat(SnatRule),
    /// `[-s R] -d S -p P -m P --dport N -m comment --comment ns:pod -j DNAT
    /// --to-destination A:M`: one rule per allowed range of a restricted
    /// mapping (`sourceRanges`), one without `-s` for an open one. A port
    /// range (`srcPortEnd`) is one rule: `--dport N:N+k` and
    /// `--to-destination A:M-(M+k)/N`.
    Dnat(Mapping, Option<IpNet>),
    Forward(ForwardRule),
    /// `-m comment --comment "<prefix>[jump_to_chain]" -j <chain>`.
    Jump(String),
    /// `-m addrtype --dst-type LOCAL -m comment --comment
    /// "<prefix>[jump_to_chain]" -j <chain>`: `<PREFIX>_OUTPUT` to
    /// `<PREFIX>_PRE`, for connections to the node's own addresses only.
    LocalJump(String),
    /// `-m conntrack --ctstate DNAT -m comment --comment
    /// "<prefix>[jump_to_chain]" -j <chain>`: mangle's jumps to the
    /// counting chains, for DNATed connections only.
    DnatJump(String),
    /// `-m conntrack --ctproto P --ctorigdst S --ctorigdstport N[:M] -m
    /// comment --comment ns:pod -j RETURN` in `<PREFIX>_COUNT`: its counter
    /// counts every packet, both directions, of the connections to the
    /// mapping (`-iptablescounters`).
    Count(Counted),
}

impl AgentRule {
    /// Whether every rule of this kind sorts before every DNAT rule.
    pub fn rank_before_dnat(&self) -> bool {
        matches!(
            self,
            AgentRule::Masquerade | AgentRule::Return(_) | AgentRule::Mark(_) | AgentRule::Snat(_)
        )
    }

    /// What must stay in order inside a chain: the internal-network RETURNs
    /// before the SNATs. Rules of one rank match disjoint packets (or share
    /// the verdict), so any order of them is the same chain.
    pub fn rank(&self) -> u8 {
        match self {
            AgentRule::Masquerade => 0,
            AgentRule::Return(_) | AgentRule::Mark(_) => 1,
            _ => 2,
        }
    }
}

/// An expression reduced to what the agent's encoding determines: counter
/// values, and attributes newer kernels add to their dumps (e.g. the
/// bitwise operation, 0 = mask/xor), are left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        op: u32,
    },
    Xt {
        kind: String,
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    /// `range eq reg lo hi`: `--dport lo:hi`.
    Range {
        sreg: u32,
        op: u32,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    Counter,
    Verdict {
        code: i32,
        chain: Option<String>,
    },
    Other(String),
}

#[cfg(test)]
mod tests;
