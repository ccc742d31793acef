//! Firewall flavors: the rule set → kernel (nf_tables netlink) and back, plus
//! the text views of it.

pub mod names;
pub mod view;

pub use names::Names;
