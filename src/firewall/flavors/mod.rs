//! The flavors: each encodes, decodes and diffs the agent's rules in its own
//! layout (iptables-nft compatible, native nftables, in memory for tests),
//! and `PerFamily` puts one instance per address family behind one flavor.

pub(crate) mod families;
pub mod iptables;
pub mod memory;
pub mod nftables;
