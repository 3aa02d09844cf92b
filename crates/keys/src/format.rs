//! Key files: Synapse's lines, Dendrite's and MMR's PEM blocks. Reading detects the format.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::key::{ALGORITHM, KeyId, KeyIdError, SigningKey};

/// Standard base64 that accepts the padding or its absence and non-zero trailing bits (as Python's
/// decoder, which signedjson uses, does: the spec's own test seed has them).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

const DENDRITE_BLOCK: &str = "MATRIX PRIVATE KEY";
const MMR_BLOCK: &str = "MMR PRIVATE KEY";

/// The three key file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyFormat {
    /// Synapse's `signing.key`: one `ed25519 <version> <unpadded base64 seed>` line per key; every key
    /// is published, the first signs.
    Synapse,
    /// Dendrite's `matrix_key.pem`: `MATRIX PRIVATE KEY` PEM blocks with a `Key-ID` header. Dendrite
    /// reads only the first block.
    Dendrite,
    /// matrix-media-repo's `signingKeyPath`: `MMR PRIVATE KEY` PEM blocks with `Key-ID` and
    /// `Version: 1` headers. The media repo signs with the first.
    Mmr,
}

impl KeyFormat {
    /// The lower-case name used on the command line: `synapse`, `dendrite`, `mmr`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Synapse => "synapse",
            Self::Dendrite => "dendrite",
            Self::Mmr => "mmr",
        }
    }

    /// How the format is described in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Synapse => "a Synapse key file (`ed25519 <version> <key>` lines)",
            Self::Dendrite => "a Dendrite key file (`MATRIX PRIVATE KEY` PEM)",
            Self::Mmr => "a media repo key file (`MMR PRIVATE KEY` PEM)",
        }
    }
}

impl fmt::Display for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "synapse" => Ok(Self::Synapse),
            "dendrite" => Ok(Self::Dendrite),
            "mmr" => Ok(Self::Mmr),
            other => Err(format!(
                "unknown key format `{other}` (expected synapse, dendrite or mmr)"
            )),
        }
    }
}

/// A key file that could not be read: which file, which line (1-based; 0 for the whole file) and what
/// is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub problem: Problem,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.problem)
        }
    }
}

/// What is wrong with a key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("no keys in the file")]
    NoKeys,
    #[error(
        "expected `ed25519 <version> <base64 seed>` (a Synapse key line), found {tokens} \
         word(s)"
    )]
    MalformedLine { tokens: usize },
    #[error(
        "a bare key without algorithm and version (Synapse's legacy format): start Synapse once \
         so that it rewrites the file, or write `ed25519 a_xxxx ` in front of the key"
    )]
    LegacyBareKey,
    #[error("unsupported algorithm `{0}` (only `ed25519` keys exist in Matrix)")]
    UnsupportedAlgorithm(String),
    #[error(
        "key version `{0}` must be one or more of the characters a-z, A-Z, 0-9 and _ (the Matrix \
         key id grammar, which Dendrite enforces)"
    )]
    BadVersion(String),
    #[error("`{0}` is not a key id: expected `Key-ID: ed25519:<version>`")]
    NotAKeyId(String),
    #[error("the key is not valid base64")]
    BadBase64,
    #[error("the key is {0} bytes long; an ed25519 seed is 32")]
    SeedLength(usize),
    #[error("`-----BEGIN {0}-----` has no matching `-----END {0}-----`")]
    UnterminatedBlock(String),
    #[error("`-----END {found}-----` closes a `{expected}` block")]
    MismatchedEnd { expected: String, found: String },
    #[error(
        "unknown PEM block `{0}` (expected `{DENDRITE_BLOCK}` for Dendrite or `{MMR_BLOCK}` for \
         the media repo)"
    )]
    UnknownBlock(String),
    #[error("the PEM block has no `Key-ID` header")]
    MissingKeyId,
    #[error("the MMR key block needs the header `Version: 1` (found {0})")]
    MmrVersion(String),
    #[error("unexpected text outside a PEM block")]
    StrayText,
    #[error("{found} in a file of {expected}: one file holds one format")]
    MixedFormats {
        expected: &'static str,
        found: &'static str,
    },
    #[error("key id {id} appears twice (first on line {first_line}){}", if *.same_key { "" } else { ", with different keys" })]
    DuplicateKeyId {
        id: KeyId,
        first_line: usize,
        same_key: bool,
    },
}

impl From<KeyIdError> for Problem {
    fn from(e: KeyIdError) -> Self {
        match e {
            KeyIdError::UnsupportedAlgorithm(a) => Self::UnsupportedAlgorithm(a),
            KeyIdError::NotAKeyId(s) => Self::NotAKeyId(s),
            KeyIdError::BadVersion(v) => Self::BadVersion(v),
        }
    }
}

/// The keys of one file, in file order, and the format they were read in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    format: KeyFormat,
    keys: Vec<SigningKey>,
    /// The line each key starts on, when read from text.
    lines: Vec<usize>,
}

impl KeyFile {
    /// A key file of `keys`, in that order.
    pub fn new(format: KeyFormat, keys: Vec<SigningKey>) -> Self {
        Self {
            format,
            keys,
            lines: Vec::new(),
        }
    }

    /// Reads a key file of any of the three formats. `file_name` is used in errors. A file must hold
    /// at least one key and no key id twice.
    pub fn parse(text: &str, file_name: &str) -> Result<Self, ParseError> {
        let err = |line: usize, problem: Problem| ParseError {
            file: file_name.to_owned(),
            line,
            problem,
        };
        let is_pem = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .is_some_and(|l| l.starts_with("-----BEGIN "));
        let (format, entries) = if is_pem {
            parse_pem(text)
        } else {
            parse_synapse(text).map(|entries| (KeyFormat::Synapse, entries))
        }
        .map_err(|(line, problem)| err(line, problem))?;
        if entries.is_empty() {
            return Err(err(0, Problem::NoKeys));
        }
        let mut file = Self {
            format,
            keys: Vec::with_capacity(entries.len()),
            lines: Vec::with_capacity(entries.len()),
        };
        for (line, key) in entries {
            if let Some(i) = file.position(key.id()) {
                return Err(err(
                    line,
                    Problem::DuplicateKeyId {
                        id: key.id().clone(),
                        first_line: file.lines[i],
                        same_key: file.keys[i].same_secret(&key),
                    },
                ));
            }
            file.keys.push(key);
            file.lines.push(line);
        }
        Ok(file)
    }

    /// The format the file was read in (or made with).
    pub fn format(&self) -> KeyFormat {
        self.format
    }

    /// The keys, in file order: the first is the one that signs.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    /// The first key: the one a homeserver (or the media repo) signs with.
    pub fn first(&self) -> Option<&SigningKey> {
        self.keys.first()
    }

    /// The index of the key with id `id`.
    pub fn position(&self, id: &KeyId) -> Option<usize> {
        self.keys.iter().position(|k| k.id() == id)
    }

    /// The key with id `id`.
    pub fn get(&self, id: &KeyId) -> Option<&SigningKey> {
        self.position(id).map(|i| &self.keys[i])
    }

    /// The line the `index`th key starts on, when the file was read from text.
    pub fn line_of(&self, index: usize) -> Option<usize> {
        self.lines.get(index).copied()
    }

    /// Appends `key` (no check for duplicates: callers decide what a duplicate means).
    pub fn push(&mut self, key: SigningKey) {
        self.keys.push(key);
        self.lines.truncate(0);
    }

    /// Removes and returns the key at `index`.
    pub fn remove(&mut self, index: usize) -> SigningKey {
        self.lines.truncate(0);
        self.keys.remove(index)
    }

    /// Whether both hold the same keys (ids and secrets) in the same order, whatever their format.
    pub fn same_keys(&self, other: &Self) -> bool {
        self.keys == other.keys
    }

    /// The file's text in `format`.
    pub fn to_text(&self, format: KeyFormat) -> String {
        match format {
            KeyFormat::Synapse => self.keys.iter().map(synapse_line).collect(),
            KeyFormat::Dendrite | KeyFormat::Mmr => self
                .keys
                .iter()
                .map(|k| pem_block(k, format))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

fn synapse_line(key: &SigningKey) -> String {
    format!(
        "{ALGORITHM} {} {}\n",
        key.id().version(),
        STANDARD_NO_PAD.encode(key.seed())
    )
}

fn pem_block(key: &SigningKey, format: KeyFormat) -> String {
    let (kind, extra) = match format {
        KeyFormat::Mmr => (MMR_BLOCK, "Version: 1\n"),
        _ => (DENDRITE_BLOCK, ""),
    };
    // 44 characters: one line, as Go's pem.Encode writes it (it wraps at 64).
    let body = STANDARD.encode(key.seed());
    format!(
        "-----BEGIN {kind}-----\nKey-ID: {}\n{extra}\n{body}\n-----END {kind}-----\n",
        key.id()
    )
}

type Entries = Vec<(usize, SigningKey)>;

fn parse_synapse(text: &str) -> Result<Entries, (usize, Problem)> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens[..] {
            [] => continue,
            [first, ..] if first.starts_with("-----BEGIN") => {
                return Err((
                    n,
                    Problem::MixedFormats {
                        expected: "Synapse key lines",
                        found: "a PEM block",
                    },
                ));
            }
            [_] => return Err((n, Problem::LegacyBareKey)),
            [algorithm, version, key] => {
                if algorithm != ALGORITHM {
                    return Err((n, Problem::UnsupportedAlgorithm(algorithm.to_owned())));
                }
                let id = KeyId::from_version(version).map_err(|e| (n, e.into()))?;
                let seed = decode_seed(key).map_err(|p| (n, p))?;
                entries.push((n, SigningKey::from_seed(id, &seed)));
            }
            _ => {
                return Err((
                    n,
                    Problem::MalformedLine {
                        tokens: tokens.len(),
                    },
                ));
            }
        }
    }
    Ok(entries)
}

fn decode_seed(b64: &str) -> Result<[u8; 32], Problem> {
    let bytes = LENIENT.decode(b64).map_err(|_| Problem::BadBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| Problem::SeedLength(bytes.len()))
}

/// A PEM block being read.
struct Block {
    kind: String,
    begin: usize,
    headers: Vec<(usize, String, String)>,
    in_body: bool,
    body: String,
}

fn parse_pem(text: &str) -> Result<(KeyFormat, Entries), (usize, Problem)> {
    let mut format = None;
    let mut entries = Vec::new();
    let mut block: Option<Block> = None;
    for (index, raw) in text.lines().enumerate() {
        let n = index + 1;
        let line = raw.trim();
        match block.as_mut() {
            None => {
                if line.is_empty() {
                    continue;
                }
                let Some(kind) = line
                    .strip_prefix("-----BEGIN ")
                    .and_then(|l| l.strip_suffix("-----"))
                else {
                    return Err((n, Problem::StrayText));
                };
                let this = match kind {
                    DENDRITE_BLOCK => KeyFormat::Dendrite,
                    MMR_BLOCK => KeyFormat::Mmr,
                    other => return Err((n, Problem::UnknownBlock(other.to_owned()))),
                };
                match format {
                    Some(f) if f != this => {
                        return Err((
                            n,
                            Problem::MixedFormats {
                                expected: block_name(f),
                                found: block_name(this),
                            },
                        ));
                    }
                    _ => format = Some(this),
                }
                block = Some(Block {
                    kind: kind.to_owned(),
                    begin: n,
                    headers: Vec::new(),
                    in_body: false,
                    body: String::new(),
                });
            }
            Some(b) => {
                if let Some(end) = line
                    .strip_prefix("-----END ")
                    .and_then(|l| l.strip_suffix("-----"))
                {
                    if end != b.kind {
                        return Err((
                            n,
                            Problem::MismatchedEnd {
                                expected: b.kind.clone(),
                                found: end.to_owned(),
                            },
                        ));
                    }
                    if let Some(b) = block.take() {
                        let f = format.unwrap_or(KeyFormat::Dendrite);
                        entries.push((b.begin, block_key(&b, f)?));
                    }
                } else if line.starts_with("-----BEGIN ") {
                    return Err((b.begin, Problem::UnterminatedBlock(b.kind.clone())));
                } else if !b.in_body && line.contains(':') {
                    if let Some((name, value)) = line.split_once(':') {
                        b.headers
                            .push((n, name.trim().to_owned(), value.trim().to_owned()));
                    }
                } else {
                    b.in_body = true;
                    b.body.push_str(line);
                }
            }
        }
    }
    if let Some(b) = block {
        return Err((b.begin, Problem::UnterminatedBlock(b.kind)));
    }
    Ok((format.unwrap_or(KeyFormat::Dendrite), entries))
}

fn block_name(format: KeyFormat) -> &'static str {
    match format {
        KeyFormat::Mmr => "an `MMR PRIVATE KEY` block",
        _ => "a `MATRIX PRIVATE KEY` block",
    }
}

fn block_key(b: &Block, format: KeyFormat) -> Result<SigningKey, (usize, Problem)> {
    let header = |name: &str| {
        b.headers
            .iter()
            .find(|(_, h, _)| h.eq_ignore_ascii_case(name))
    };
    let Some((id_line, _, id)) = header("Key-ID") else {
        return Err((b.begin, Problem::MissingKeyId));
    };
    let id: KeyId = id.parse().map_err(|e: KeyIdError| (*id_line, e.into()))?;
    if format == KeyFormat::Mmr {
        match header("Version") {
            Some((_, _, v)) if v == "1" => {}
            Some((line, _, v)) => return Err((*line, Problem::MmrVersion(format!("`{v}`")))),
            None => return Err((b.begin, Problem::MmrVersion("none".to_owned()))),
        }
    }
    let body_line = b.headers.last().map_or(b.begin, |h| h.0) + 1;
    let seed = decode_seed(&b.body).map_err(|p| (body_line, p))?;
    Ok(SigningKey::from_seed(id, &seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's test vector seed (appendices: signing JSON), in canonical base64: the spec writes
    /// it `…XA1`, with non-zero trailing bits.
    const SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA0";

    fn key(version: &str, seed: &str) -> SigningKey {
        SigningKey::from_seed(
            KeyId::from_version(version).unwrap(),
            &decode_seed(seed).unwrap(),
        )
    }

    fn other_seed() -> String {
        STANDARD_NO_PAD.encode([7u8; 32])
    }

    fn parse_err(text: &str) -> ParseError {
        KeyFile::parse(text, "f.key").expect_err(text)
    }

    #[test]
    fn synapse_round_trip() {
        let text = format!("ed25519 a_AbCd {SEED}\ned25519 mmr_01 {}\n", other_seed());
        let file = KeyFile::parse(&text, "f").unwrap();
        assert_eq!(file.format(), KeyFormat::Synapse);
        assert_eq!(file.keys().len(), 2);
        assert_eq!(file.keys()[0].id().to_string(), "ed25519:a_AbCd");
        assert_eq!(file.line_of(1), Some(2));
        assert_eq!(file.to_text(KeyFormat::Synapse), text);
        // The spec's test key's public key.
        assert_eq!(
            file.keys()[0].public_key_base64(),
            "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
        );
    }

    #[test]
    fn reads_the_spec_seed_as_written() {
        let file = KeyFile::parse(
            "ed25519 1 YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1\n",
            "f",
        )
        .unwrap();
        assert_eq!(file.keys()[0], key("1", SEED));
    }

    #[test]
    fn synapse_reading_is_as_lenient_as_signedjson() {
        // Blank lines, surrounding spaces, tabs, padding, no final newline.
        let text = format!(
            "\n  ed25519\ta_AbCd   {SEED}=  \n\n\ned25519 x {}",
            other_seed()
        );
        let file = KeyFile::parse(&text, "f").unwrap();
        assert_eq!(file.keys().len(), 2);
        assert_eq!(file.line_of(0), Some(2));
        assert_eq!(file.line_of(1), Some(5));
        assert_eq!(file.keys()[0], key("a_AbCd", SEED));
    }

    #[test]
    fn dendrite_round_trip() {
        let file = KeyFile::new(
            KeyFormat::Dendrite,
            vec![key("abc123", SEED), key("b", &other_seed())],
        );
        let text = file.to_text(KeyFormat::Dendrite);
        assert!(
            text.starts_with(&format!(
                "-----BEGIN MATRIX PRIVATE KEY-----\nKey-ID: ed25519:abc123\n\n{SEED}=\n-----END \
                 MATRIX PRIVATE KEY-----\n\n-----BEGIN MATRIX PRIVATE KEY-----\n"
            )),
            "{text}"
        );
        let back = KeyFile::parse(&text, "f").unwrap();
        assert_eq!(back.format(), KeyFormat::Dendrite);
        assert!(back.same_keys(&file));
        assert_eq!(back.line_of(1), Some(7));
    }

    #[test]
    fn mmr_round_trip() {
        let file = KeyFile::new(KeyFormat::Mmr, vec![key("Ab1_9z", SEED)]);
        let text = file.to_text(KeyFormat::Mmr);
        assert_eq!(
            text,
            format!(
                "-----BEGIN MMR PRIVATE KEY-----\nKey-ID: ed25519:Ab1_9z\nVersion: 1\n\n{SEED}=\n\
                 -----END MMR PRIVATE KEY-----\n"
            )
        );
        let back = KeyFile::parse(&text, "f").unwrap();
        assert_eq!(back.format(), KeyFormat::Mmr);
        assert!(back.same_keys(&file));
    }

    #[test]
    fn pem_as_go_writes_and_reads_it() {
        // Go's pem.Decode accepts a body without a blank line after the headers, a wrapped body,
        // CRLF line ends, and an unpadded body.
        let seed = STANDARD.encode([9u8; 32]);
        let (a, b) = seed.split_at(20);
        let text = format!(
            "-----BEGIN MATRIX PRIVATE KEY-----\r\nKey-ID: ed25519:k1\r\n{a}\r\n{b}\r\n-----END \
             MATRIX PRIVATE KEY-----\r\n"
        );
        let file = KeyFile::parse(&text, "f").unwrap();
        assert_eq!(file.keys()[0].seed(), &[9u8; 32]);
    }

    #[test]
    fn conversions_keep_ids_and_keys() {
        let file = KeyFile::new(
            KeyFormat::Synapse,
            vec![key("a_AbCd", SEED), key("x", &other_seed())],
        );
        for from in [KeyFormat::Synapse, KeyFormat::Dendrite, KeyFormat::Mmr] {
            let text = file.to_text(from);
            let read = KeyFile::parse(&text, "f").unwrap();
            assert_eq!(read.format(), from);
            for to in [KeyFormat::Synapse, KeyFormat::Dendrite, KeyFormat::Mmr] {
                let again = KeyFile::parse(&read.to_text(to), "f").unwrap();
                assert_eq!(again.format(), to);
                assert!(again.same_keys(&file), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn synapse_errors_name_the_line() {
        let e = parse_err(&format!("ed25519 a {SEED}\nnonsense here\n"));
        assert_eq!(e.line, 2);
        assert_eq!(e.problem, Problem::MalformedLine { tokens: 2 });
        assert!(
            e.to_string().starts_with("f.key:2: expected `ed25519"),
            "{e}"
        );

        let e = parse_err(&format!("\ncurve25519 a {SEED}\n"));
        assert_eq!(
            (e.line, e.problem),
            (2, Problem::UnsupportedAlgorithm("curve25519".to_owned()))
        );
        let e = parse_err(&format!("{SEED}\n"));
        assert_eq!((e.line, e.problem), (1, Problem::LegacyBareKey));
        let e = parse_err("ed25519 a not*base64\n");
        assert_eq!((e.line, e.problem), (1, Problem::BadBase64));
        let e = parse_err("ed25519 a AAAA\n");
        assert_eq!((e.line, e.problem), (1, Problem::SeedLength(3)));
        let e = parse_err(&format!("ed25519 a-b {SEED}\n"));
        assert_eq!(
            (e.line, e.problem),
            (1, Problem::BadVersion("a-b".to_owned()))
        );
        let e = parse_err(&format!(
            "ed25519 a {SEED}\n-----BEGIN MATRIX PRIVATE KEY-----\n"
        ));
        assert_eq!(e.line, 2);
        assert!(matches!(e.problem, Problem::MixedFormats { .. }), "{e}");
    }

    #[test]
    fn empty_files_and_duplicates() {
        for text in ["", "\n\n  \n"] {
            let e = parse_err(text);
            assert_eq!((e.line, e.problem.clone()), (0, Problem::NoKeys));
            assert_eq!(e.to_string(), "f.key: no keys in the file");
        }
        let e = parse_err(&format!("ed25519 a {SEED}\ned25519 a {}\n", other_seed()));
        assert_eq!(e.line, 2);
        assert_eq!(
            e.to_string(),
            "f.key:2: key id ed25519:a appears twice (first on line 1), with different keys"
        );
        let e = parse_err(&format!("ed25519 a {SEED}\ned25519 a {SEED}\n"));
        assert_eq!(
            e.to_string(),
            "f.key:2: key id ed25519:a appears twice (first on line 1)"
        );
    }

    #[test]
    fn pem_errors_name_the_line() {
        let block = |kind: &str, headers: &str, body: &str| {
            format!("-----BEGIN {kind}-----\n{headers}\n{body}\n-----END {kind}-----\n")
        };
        let seed = format!("{SEED}=");
        let e = parse_err(&block("MATRIX PRIVATE KEY", "", &seed));
        assert_eq!((e.line, e.problem), (1, Problem::MissingKeyId));
        let e = parse_err(&block("MATRIX PRIVATE KEY", "Key-ID: rsa:abc", &seed));
        assert_eq!(
            (e.line, e.problem),
            (2, Problem::UnsupportedAlgorithm("rsa".to_owned()))
        );
        let e = parse_err(&block("MATRIX PRIVATE KEY", "Key-ID: ed25519:a.b", &seed));
        assert_eq!(
            (e.line, e.problem),
            (2, Problem::BadVersion("a.b".to_owned()))
        );
        let e = parse_err(&block("MATRIX PRIVATE KEY", "Key-ID: ed25519:ab", "AAAA"));
        assert_eq!((e.line, e.problem), (3, Problem::SeedLength(3)));
        let e = parse_err(&block("MATRIX PRIVATE KEY", "Key-ID: ed25519:ab", "%%%"));
        assert_eq!((e.line, e.problem), (3, Problem::BadBase64));
        let e = parse_err(&block("MMR PRIVATE KEY", "Key-ID: ed25519:ab", &seed));
        assert_eq!(
            (e.line, e.problem),
            (1, Problem::MmrVersion("none".to_owned()))
        );
        let e = parse_err(&block(
            "MMR PRIVATE KEY",
            "Key-ID: ed25519:ab\nVersion: 2",
            &seed,
        ));
        assert_eq!(
            (e.line, e.problem),
            (3, Problem::MmrVersion("`2`".to_owned()))
        );
        let e = parse_err(&block("RSA PRIVATE KEY", "", &seed));
        assert_eq!(
            (e.line, e.problem),
            (1, Problem::UnknownBlock("RSA PRIVATE KEY".to_owned()))
        );
        let e = parse_err("-----BEGIN MATRIX PRIVATE KEY-----\nKey-ID: ed25519:a\n\nAAAA\n");
        assert_eq!(
            (e.line, e.problem),
            (
                1,
                Problem::UnterminatedBlock("MATRIX PRIVATE KEY".to_owned())
            )
        );
        let e = parse_err(
            "-----BEGIN MATRIX PRIVATE KEY-----\nKey-ID: ed25519:a\n-----END MMR PRIVATE KEY-----\n",
        );
        assert_eq!(e.line, 3);
        assert!(matches!(e.problem, Problem::MismatchedEnd { .. }), "{e}");
        let good = block("MATRIX PRIVATE KEY", "Key-ID: ed25519:ab\n", &seed);
        let e = parse_err(&format!("{good}garbage\n"));
        assert_eq!((e.line, e.problem), (6, Problem::StrayText));
        let mmr = block("MMR PRIVATE KEY", "Key-ID: ed25519:cd\nVersion: 1\n", &seed);
        let e = parse_err(&format!("{good}{mmr}"));
        assert_eq!(e.line, 6);
        assert!(matches!(e.problem, Problem::MixedFormats { .. }), "{e}");
        let e = parse_err(&format!("{good}{good}"));
        assert_eq!(e.line, 6);
        assert!(
            matches!(e.problem, Problem::DuplicateKeyId { first_line: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn format_names() {
        for f in [KeyFormat::Synapse, KeyFormat::Dendrite, KeyFormat::Mmr] {
            assert_eq!(f.name().parse::<KeyFormat>(), Ok(f));
        }
        assert!("pem".parse::<KeyFormat>().is_err());
    }
}
