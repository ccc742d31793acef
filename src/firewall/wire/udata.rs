//! Userdata as libnftnl writes it and nft reads it: type-length-value
//! entries, type 0 the comment (`NFTNL_UDATA_{TABLE,CHAIN,SET_ELEM}_COMMENT`,
//! a NUL-terminated string). The agent's ownership mark on a table or chain
//! and the owner of a set element travel this way.

/// Comments longer than this do not fit the one-byte length.
pub const MAX_COMMENT: usize = 254;

/// The userdata holding one comment: `nft list` shows it as `comment "…"`.
pub fn comment(text: &str) -> Vec<u8> {
    let mut cut = text.len().min(MAX_COMMENT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut v = Vec::with_capacity(cut + 3);
    v.push(0);
    v.push((cut + 1) as u8);
    v.extend_from_slice(&text.as_bytes()[..cut]);
    v.push(0);
    v
}

/// The comment in `udata`, if there is one (other entries are skipped).
pub fn comment_of(udata: &[u8]) -> Option<&str> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let val = rest.get(2..2 + len)?;
        if ty == 0 {
            let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
            return std::str::from_utf8(&val[..end]).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_reads_back_and_other_entries_are_skipped() {
        let mut u = vec![1, 2, 7, 7];
        u.extend(comment("podnat-controller:podnat"));
        assert_eq!(comment_of(&u), Some("podnat-controller:podnat"));
        assert_eq!(comment_of(&[1, 2, 7, 7]), None);
        assert_eq!(comment_of(&[0, 9, b'x']), None, "a cut entry is no comment");
    }

    #[test]
    fn a_long_comment_is_cut_at_a_character_boundary() {
        let text = "é".repeat(200);
        let u = comment(&text);
        assert!(u.len() <= MAX_COMMENT + 3);
        assert!(text.starts_with(comment_of(&u).unwrap()));
    }
}
