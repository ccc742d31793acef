//! The node's own network as the agent needs it, read through rtnetlink:
//! which IPv4 address is the public one, and when that changes.

pub mod address;
pub mod sockets;
