//! Media ids and the names the spec allows.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// 24 characters from the OS RNG (144 bits): unguessable, and unique without coordination, so any
/// number of instances can share one database (the primary key catches the impossible collision).
pub fn new_media_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes)?;
    let mut id = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            id.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
        }
    }
    Ok(id)
}

/// The spec's media-id characters (plus `=`, which Dendrite's ids use), at most 255 of them.
pub fn is_valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=".contains(&b))
}

/// `hostname [":" port]`, where hostname is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn is_valid_server_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let Some((ip6, after)) = rest.split_once(']') else {
            return false;
        };
        if ip6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after.strip_prefix(':') {
            Some(port) => (None, Some(port)),
            None => return after.is_empty(),
        }
    } else {
        match name.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(name), None),
        }
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = host.is_none_or(|h| {
        h.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    });
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_media_id().unwrap();
        let b = new_media_id().unwrap();
        assert_eq!(a.len(), 24);
        assert!(is_valid_media_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn media_ids_reject_traversal_and_oversize() {
        for bad in ["", "..", "a/b", "..%2F", "a b", "ä", &"a".repeat(256)] {
            assert!(!is_valid_media_id(bad), "{bad}");
        }
        assert!(is_valid_media_id("AbC_12-x="));
    }

    #[test]
    fn server_names_follow_the_grammar() {
        for good in [
            "example.com",
            "example.com:8448",
            "127.0.0.1",
            "[::1]",
            "[::1]:8448",
            "localhost",
        ] {
            assert!(is_valid_server_name(good), "{good}");
        }
        for bad in [
            "",
            "exa mple.com",
            "example.com:",
            "example.com:123456",
            "[zz]",
            "a/b",
            "..",
            "[::1]x",
        ] {
            assert!(!is_valid_server_name(bad), "{bad}");
        }
    }
}
