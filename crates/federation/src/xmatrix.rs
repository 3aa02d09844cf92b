//! The `Authorization: X-Matrix ...` header of a federation request, parsed as Synapse 1.163's
//! `_parse_auth_header` accepts it (`synapse/federation/transport/server/_base.py`), and a little
//! more where RFC 9110 allows it:
//!
//! - the scheme `X-Matrix`, in any case, then one or more spaces;
//! - `name=value` parameters separated by commas, with optional spaces or tabs around the commas
//!   (and around `=`); empty list elements (`a=1,,b=2`) are skipped, as RFC 9110 §5.6.1 asks;
//! - names in any case; a value is either a quoted string (backslash escapes removed) or a run of
//!   anything but spaces, tabs, commas, quotes and backslashes, so `key=ed25519:a1` and
//!   `destination=hs.example:8448` work unquoted, as the spec asks;
//! - `origin`, `key` and `sig` are required, `destination` is optional, anything else is ignored;
//! - `origin` must be a valid server name (Synapse's `parse_and_validate_server_name`).
//!
//! Stricter than Synapse, each time because Synapse would read something else than was meant:
//!
//! - **A known parameter given twice is an error** ([`ParseError::Duplicate`]). Synapse keeps the
//!   last one; other implementations keep the first, so a header with two `origin`s could be read
//!   differently by two servers. Unknown parameters may repeat.
//! - A quoted value must be closed (Synapse drops the last character, whatever it is); a comma
//!   inside quotes belongs to the value (Synapse splits there, and so rejects the header).
//! - Control characters (tab included, except as a separator) are refused anywhere.
//! - Known parameters must not be empty.
//!
//! The parser makes one pass over the value, so its work is linear in the header's length.
//! Several `Authorization` headers (one per signature) are the caller's loop: call [`parse`] on
//! each and skip those that fail with [`ParseError::NotXMatrix`].

use std::fmt;

/// One parsed `X-Matrix` authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    /// The sending server's name, validated as a server name (`host` or `host:port`).
    pub origin: String,
    /// The receiving server's name as the sender signed it; `None` for old senders. The caller
    /// must refuse a request whose destination is given and is not its own name (401).
    pub destination: Option<String>,
    /// The signing key's id, `ed25519:<version>`, as given.
    pub key: String,
    /// The signature, unpadded base64, as given.
    pub sig: String,
}

/// Why an `Authorization` value is not a usable X-Matrix header. The `Display` text says what is
/// wrong without repeating the header, so it can be the reason of a 401 (or 400) response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Another scheme (`Bearer ...`) or no scheme at all: not an error when the request has
    /// another `Authorization` header that is X-Matrix.
    #[error("the Authorization header is not of the X-Matrix scheme")]
    NotXMatrix,
    /// A required parameter (`origin`, `key` or `sig`) is absent.
    #[error("the X-Matrix Authorization header has no `{0}` parameter")]
    Missing(&'static str),
    /// A known parameter appears twice.
    #[error("the X-Matrix Authorization header has the `{0}` parameter twice")]
    Duplicate(&'static str),
    /// A known parameter has an empty value.
    #[error("the X-Matrix Authorization header has an empty `{0}` parameter")]
    Empty(&'static str),
    /// A quoted value has no closing quote (or ends in a lone backslash).
    #[error("the X-Matrix Authorization header has an unterminated quoted value (byte {at})")]
    UnterminatedQuote {
        /// Byte offset of the opening quote.
        at: usize,
    },
    /// A control character (tab included, where it is not a separator).
    #[error("the X-Matrix Authorization header contains a control character (byte {at})")]
    ControlCharacter {
        /// Byte offset of the character.
        at: usize,
    },
    /// Anything else that does not follow the grammar.
    #[error("the X-Matrix Authorization header is malformed at byte {at}: {expected}")]
    Syntax {
        /// Byte offset where parsing stopped.
        at: usize,
        /// What was expected there.
        expected: &'static str,
    },
    /// `origin` is not a server name.
    #[error("the X-Matrix origin {origin:?} is not a valid server name: {reason}")]
    InvalidOrigin {
        /// The value, cut to 64 characters.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
}

const SCHEME: &str = "X-Matrix";

/// Parses one `Authorization` header value.
pub fn parse(value: &str) -> Result<XMatrix, ParseError> {
    if let Some((at, _)) = value
        .char_indices()
        .find(|&(_, c)| c.is_control() && c != '\t')
    {
        return Err(ParseError::ControlCharacter { at });
    }
    let bytes = value.as_bytes();
    let mut i = skip_ows(bytes, 0);

    let scheme_end = bytes[i..]
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .map_or(bytes.len(), |n| i + n);
    if !value[i..scheme_end].eq_ignore_ascii_case(SCHEME) {
        return Err(ParseError::NotXMatrix);
    }
    i = scheme_end;
    if bytes.get(i) != Some(&b' ') {
        return Err(match bytes.get(i) {
            None => ParseError::Missing("origin"),
            Some(_) => ParseError::Syntax {
                at: i,
                expected: "a space after `X-Matrix`",
            },
        });
    }

    let mut found = Found::default();
    loop {
        i = skip_ows(bytes, i);
        match bytes.get(i) {
            None => break,
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name_start = i;
        while bytes.get(i).is_some_and(|&b| is_tchar(b)) {
            i += 1;
        }
        if i == name_start {
            return Err(ParseError::Syntax {
                at: i,
                expected: "a parameter name",
            });
        }
        let name = &value[name_start..i];
        i = skip_ows(bytes, i);
        if bytes.get(i) != Some(&b'=') {
            return Err(ParseError::Syntax {
                at: i,
                expected: "`=` after a parameter name",
            });
        }
        i = skip_ows(bytes, i + 1);
        let (param_value, next) = if bytes.get(i) == Some(&b'"') {
            quoted(bytes, i)?
        } else {
            unquoted(value, i)?
        };
        i = skip_ows(bytes, next);
        match bytes.get(i) {
            None | Some(b',') => {}
            Some(_) => {
                return Err(ParseError::Syntax {
                    at: i,
                    expected: "`,` after a parameter's value",
                });
            }
        }
        found.set(name, param_value)?;
    }

    let origin = found.origin.ok_or(ParseError::Missing("origin"))?;
    let key = found.key.ok_or(ParseError::Missing("key"))?;
    let sig = found.sig.ok_or(ParseError::Missing("sig"))?;
    // The grammar discovery resolves (Synapse's `parse_and_validate_server_name`, plus port 0 and
    // dotted digits that are no IPv4 address refused: neither could ever be reached).
    if let Err(e) = crate::discovery::parse_server_name(&origin) {
        let reason = match e {
            crate::discovery::Error::InvalidServerName { reason, .. } => reason,
            e => e.to_string(),
        };
        return Err(ParseError::InvalidOrigin {
            origin: origin.chars().take(64).collect(),
            reason,
        });
    }
    Ok(XMatrix {
        origin,
        destination: found.destination,
        key,
        sig,
    })
}

#[derive(Default)]
struct Found {
    origin: Option<String>,
    destination: Option<String>,
    key: Option<String>,
    sig: Option<String>,
}

impl Found {
    fn set(&mut self, name: &str, value: String) -> Result<(), ParseError> {
        let (slot, known) = if name.eq_ignore_ascii_case("origin") {
            (&mut self.origin, "origin")
        } else if name.eq_ignore_ascii_case("destination") {
            (&mut self.destination, "destination")
        } else if name.eq_ignore_ascii_case("key") {
            (&mut self.key, "key")
        } else if name.eq_ignore_ascii_case("sig") {
            (&mut self.sig, "sig")
        } else {
            return Ok(());
        };
        if slot.is_some() {
            return Err(ParseError::Duplicate(known));
        }
        if value.is_empty() {
            return Err(ParseError::Empty(known));
        }
        *slot = Some(value);
        Ok(())
    }
}

fn skip_ows(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A quoted string starting at `start` (the `"`): its unescaped content and the offset after the
/// closing quote.
fn quoted(bytes: &[u8], start: usize) -> Result<(String, usize), ParseError> {
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => return Err(ParseError::UnterminatedQuote { at: start }),
            Some(b'"') => break,
            Some(b'\\') => match bytes.get(i + 1) {
                None => return Err(ParseError::UnterminatedQuote { at: start }),
                Some(b'\t') => return Err(ParseError::ControlCharacter { at: i + 1 }),
                Some(&b) => {
                    out.push(b);
                    i += 2;
                }
            },
            Some(b'\t') => return Err(ParseError::ControlCharacter { at: i }),
            Some(&b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII bytes (quotes, backslashes) were removed from valid UTF-8, so this cannot fail;
    // the error arm keeps it panic-free all the same.
    let text = String::from_utf8(out).map_err(|_| ParseError::Syntax {
        at: start,
        expected: "UTF-8 in a quoted value",
    })?;
    Ok((text, i + 1))
}

/// An unquoted value starting at `start`: it runs to the next space, tab or comma.
fn unquoted(value: &str, start: usize) -> Result<(String, usize), ParseError> {
    let bytes = value.as_bytes();
    let mut i = start;
    while let Some(&b) = bytes.get(i) {
        match b {
            b' ' | b'\t' | b',' => break,
            b'"' | b'\\' => {
                return Err(ParseError::Syntax {
                    at: i,
                    expected: "no quote or backslash inside an unquoted value",
                });
            }
            _ => i += 1,
        }
    }
    Ok((value[start..i].to_owned(), i))
}

impl fmt::Display for XMatrix {
    /// The form Synapse sends: `X-Matrix origin="…",key="…",sig="…",destination="…"`, each value
    /// quoted and escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn quote(f: &mut fmt::Formatter<'_>, name: &str, value: &str) -> fmt::Result {
            write!(f, "{name}=\"")?;
            for c in value.chars() {
                if c == '"' || c == '\\' {
                    write!(f, "\\")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, "\"")
        }
        write!(f, "{SCHEME} ")?;
        quote(f, "origin", &self.origin)?;
        write!(f, ",")?;
        quote(f, "key", &self.key)?;
        write!(f, ",")?;
        quote(f, "sig", &self.sig)?;
        if let Some(destination) = &self.destination {
            write!(f, ",")?;
            quote(f, "destination", destination)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str =
        "ABCdef0123456789+/ABCdef0123456789+/ABCdef0123456789+/ABCdef0123456789+/ABCdef01234567";

    fn ok(value: &str) -> XMatrix {
        match parse(value) {
            Ok(x) => x,
            Err(e) => panic!("{value:?} was refused: {e}"),
        }
    }

    fn x(origin: &str, destination: Option<&str>, key: &str, sig: &str) -> XMatrix {
        XMatrix {
            origin: origin.to_owned(),
            destination: destination.map(str::to_owned),
            key: key.to_owned(),
            sig: sig.to_owned(),
        }
    }

    #[test]
    fn synapse_output_form() {
        // What Synapse 1.163 sends (reference §3, from nginx's log).
        let value = format!(
            "X-Matrix origin=\"localhost:20449\",key=\"ed25519:a_Rghr\",sig=\"{SIG}\",destination=\"localhost:20448\""
        );
        assert_eq!(
            ok(&value),
            x(
                "localhost:20449",
                Some("localhost:20448"),
                "ed25519:a_Rghr",
                SIG
            )
        );
    }

    #[test]
    fn variants_synapse_accepts() {
        // Verified accepted by Synapse: two spaces, upper-case names, unquoted values with
        // colons, reordered, a tab, spaces around a comma.
        let value = format!(
            "X-Matrix  SIG=\"{SIG}\" , Key=ed25519:mmr1,\tdestination=localhost:20449, Origin=localhost:20448"
        );
        assert_eq!(
            ok(&value),
            x(
                "localhost:20448",
                Some("localhost:20449"),
                "ed25519:mmr1",
                SIG
            )
        );
        // No destination (verified accepted).
        assert_eq!(
            ok("X-Matrix origin=a.example,key=\"ed25519:1\",sig=\"s\""),
            x("a.example", None, "ed25519:1", "s")
        );
        // The spec's example.
        assert_eq!(
            ok(
                "X-Matrix origin=\"origin.hs.example.com\",destination=\"destination.hs.example.com\",key=\"ed25519:key1\",sig=\"ABCDEF...\""
            ),
            x(
                "origin.hs.example.com",
                Some("destination.hs.example.com"),
                "ed25519:key1",
                "ABCDEF..."
            )
        );
    }

    #[test]
    fn liberal_where_the_rfc_allows() {
        let want = x("o.example", Some("d"), "ed25519:k", "s/+=");
        for value in [
            "x-matrix origin=o.example,destination=d,key=ed25519:k,sig=s/+=",
            "X-MATRIX origin=o.example,destination=d,key=ed25519:k,sig=s/+=",
            "X-Matrix origin = o.example , destination=d,key=ed25519:k,sig=s/+=",
            "X-Matrix origin=o.example,,destination=d,key=ed25519:k,sig=s/+=,",
            "  X-Matrix origin=o.example,destination=d,key=ed25519:k,sig=s/+=  ",
            "X-Matrix origin=o.example,destination=d,key=ed25519:k,sig=\"s/+=\",future=\"a, b\"",
            "X-Matrix future=1,future=2,origin=o.example,destination=d,key=ed25519:k,sig=s/+=",
            "X-Matrix origin=\"o.ex\\ample\",destination=\"d\",key=\"ed25519:k\",sig=\"s/+=\"",
        ] {
            assert_eq!(ok(value), want, "{value:?}");
        }
        // Escapes are removed, the escaped character kept.
        assert_eq!(
            ok(r#"X-Matrix origin=o,key="a\"b\\c",sig="é\x""#).key,
            r#"a"b\c"#
        );
        // Commas inside quotes belong to the value.
        assert_eq!(ok(r#"X-Matrix origin=o,key=k,sig="a,b""#).sig, "a,b");
    }

    #[test]
    fn server_names() {
        for origin in [
            "localhost",
            "localhost:20448",
            "1.2.3.4",
            "1.2.3.4:8448",
            "[::1]",
            "[::1]:8448",
            "[2001:db8::1]:443",
            "a-b.c-d.example",
            "xn--bcher-kva.example",
            "host:65535",
        ] {
            assert_eq!(
                ok(&format!("X-Matrix origin={origin},key=k,sig=s")).origin,
                origin
            );
        }
        for origin in [
            "host:",
            "host:0",
            "host:65536",
            "host:-1",
            "host:+1",
            "host:123456",
            "ho_st",
            "ho st",
            ".example",
            "example.",
            "a..b",
            "[::1",
            "[not-v6]",
            "[::1]:x",
            "::1",
            "1.2.3.999",
            "bücher.example",
            "host:80:80",
        ] {
            let value = format!("X-Matrix origin=\"{origin}\",key=k,sig=s");
            assert!(
                matches!(parse(&value), Err(ParseError::InvalidOrigin { .. })),
                "{origin:?}: {:?}",
                parse(&value)
            );
        }
        let long = "a".repeat(300);
        assert!(matches!(
            parse(&format!("X-Matrix origin={long},key=k,sig=s")),
            Err(ParseError::InvalidOrigin { origin, .. }) if origin.len() == 64
        ));
    }

    #[test]
    fn refusals() {
        use ParseError::*;
        let cases: &[(&str, ParseError)] = &[
            ("", NotXMatrix),
            ("Bearer abc", NotXMatrix),
            ("X-Matrixorigin=o,key=k,sig=s", NotXMatrix),
            ("X-Matrix", Missing("origin")),
            ("X-Matrix ", Missing("origin")),
            (
                "X-Matrix\torigin=o,key=k,sig=s",
                Syntax {
                    at: 8,
                    expected: "a space after `X-Matrix`",
                },
            ),
            ("X-Matrix key=k,sig=s", Missing("origin")),
            ("X-Matrix origin=o,sig=s", Missing("key")),
            ("X-Matrix origin=o,key=k", Missing("sig")),
            (
                "X-Matrix origin=o,key=k,sig=s,origin=p",
                Duplicate("origin"),
            ),
            ("X-Matrix origin=o,key=k,sig=s,SIG=s", Duplicate("sig")),
            (
                "X-Matrix origin=o,key=k,sig=s,destination=a,destination=a",
                Duplicate("destination"),
            ),
            ("X-Matrix origin=o,key=,sig=s", Empty("key")),
            ("X-Matrix origin=o,key=\"\",sig=s", Empty("key")),
            (
                "X-Matrix origin=o,key=k,sig=s,destination=",
                Empty("destination"),
            ),
            (
                "X-Matrix origin=o,key=k,sig=\"s",
                UnterminatedQuote { at: 28 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\"s\\\"",
                UnterminatedQuote { at: 28 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\"s\\",
                UnterminatedQuote { at: 28 },
            ),
            (
                "X-Matrix origin=o,key=k\r\n,sig=s",
                ControlCharacter { at: 23 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=s\0",
                ControlCharacter { at: 29 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\u{85}",
                ControlCharacter { at: 28 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\x7f",
                ControlCharacter { at: 28 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\"a\tb\"",
                ControlCharacter { at: 30 },
            ),
            (
                "X-Matrix origin=o,key=k,sig=\"a\\\tb\"",
                ControlCharacter { at: 31 },
            ),
            (
                "X-Matrix origin",
                Syntax {
                    at: 15,
                    expected: "`=` after a parameter name",
                },
            ),
            (
                "X-Matrix origin o,key=k,sig=s",
                Syntax {
                    at: 16,
                    expected: "`=` after a parameter name",
                },
            ),
            (
                "X-Matrix =o,key=k,sig=s",
                Syntax {
                    at: 9,
                    expected: "a parameter name",
                },
            ),
            (
                "X-Matrix origin=o key=k,sig=s",
                Syntax {
                    at: 18,
                    expected: "`,` after a parameter's value",
                },
            ),
            (
                "X-Matrix origin=o,key=\"k\"x,sig=s",
                Syntax {
                    at: 25,
                    expected: "`,` after a parameter's value",
                },
            ),
            (
                "X-Matrix origin=o,key=k\"x\",sig=s",
                Syntax {
                    at: 23,
                    expected: "no quote or backslash inside an unquoted value",
                },
            ),
            ("X-Matrix origin=o;key=k,sig=s", Missing("key")),
        ];
        for (value, want) in cases {
            assert_eq!(parse(value).as_ref(), Err(want), "{value:?}");
        }
    }

    #[test]
    fn messages_say_what_is_wrong() {
        let message = |v: &str| parse(v).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            message("X-Matrix origin=o,key=k"),
            "the X-Matrix Authorization header has no `sig` parameter"
        );
        assert_eq!(
            message("X-Matrix origin=o,key=k,sig=s,origin=p"),
            "the X-Matrix Authorization header has the `origin` parameter twice"
        );
        assert_eq!(
            message("Bearer x"),
            "the Authorization header is not of the X-Matrix scheme"
        );
        assert_eq!(
            message("X-Matrix origin=o_o,key=k,sig=s"),
            "the X-Matrix origin \"o_o\" is not a valid server name: the host must be a DNS name \
             (letters, digits, `-`, dots between labels), an IPv4 address or an IPv6 address in \
             brackets"
        );
    }

    #[test]
    fn display_round_trips() {
        for value in [
            x("o.example:8448", Some("d.example"), "ed25519:k", SIG),
            x("o", None, "k\"q\\", "s, t"),
        ] {
            let text = value.to_string();
            assert_eq!(ok(&text), value, "{text}");
        }
    }

    #[test]
    fn round_trip_with_keys_sign_request() {
        let key = keys::SigningKey::generate().expect("a key");
        let uri = "/_matrix/federation/v1/media/download/abc?timeout_ms=20000";
        let header =
            keys::sign_request(&key, "hs.example", "remote.example:8448", "GET", uri, None)
                .expect("signed");
        let parsed = ok(&header);
        assert_eq!(parsed.origin, "hs.example");
        assert_eq!(parsed.destination.as_deref(), Some("remote.example:8448"));
        assert_eq!(parsed.key, key.id().to_string());

        let mut signed = keys::request_json("hs.example", "remote.example:8448", "GET", uri, None);
        signed["signatures"] = serde_json::json!({"hs.example": {parsed.key.clone(): parsed.sig}});
        keys::verify_json(&signed, "hs.example", key.id(), &key.verifying_key())
            .expect("the parsed signature verifies");
    }

    #[test]
    fn hostile_input_is_linear() {
        // 16 KiB (the upstream cap) of the worst shapes: they must all finish at once.
        let n = 16 * 1024;
        let shapes = [
            format!("X-Matrix {}", ",".repeat(n)),
            format!("X-Matrix {}", " ".repeat(n)),
            format!("X-Matrix a={}", "\\\"".repeat(n / 2)),
            format!("X-Matrix a=\"{}\"", "\\\\".repeat(n / 2)),
            format!("X-Matrix {}", "a=b,".repeat(n / 4)),
            format!("X-Matrix {}", "a".repeat(n)),
            format!("X-Matrix origin=o,key=k,sig=s,{}", "x=\"\",".repeat(n / 5)),
        ];
        let start = std::time::Instant::now();
        for value in &shapes {
            let _ = parse(value);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
