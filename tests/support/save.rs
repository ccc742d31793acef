//! What `iptables-nft-save` shows of the agent in a namespace, in the form
//! the iptables rule view renders it.

use super::netns::Netns;

/// The agent's part of `iptables-nft-save` (its chains, its rules, its jump
/// lines), table by table as the view renders them: what the view equals.
pub fn agent_iptables_save(ns: &Netns) -> String {
    let mut out = String::new();
    for t in ["nat", "filter"] {
        out.push_str(&format!("*{t}\n"));
        for l in ns.sh(&format!("iptables-nft-save -t {t}")).lines() {
            if l.starts_with(":PODNAT_")
                || l.starts_with("-A PODNAT_")
                || l.contains("\"podnat[jump_to_chain]\"")
            {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}
