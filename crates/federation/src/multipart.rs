//! The `multipart/mixed` body of `/_matrix/federation/v1/media/{download,thumbnail}`: part 1 is
//! the media's metadata (`application/json`, `{}`), part 2 the file or a `Location` to fetch it from.
//!
//! **Serving** ([`Envelope`]): the bytes Synapse 1.163 emits, byte for byte, because Synapse's
//! parser is fragile (see `shared/reference/federation-harness.md` §2): the boundary is unquoted and
//! the last parameter, part 1's type is exactly `application/json`, part 2's `Content-Type` comes
//! before its `Content-Disposition`, and a `Location` is part 2's only header. Synapse keeps only
//! the last piece it received of each header and of the JSON (element-hq/synapse#20035), so the
//! caller must write [`Envelope::head`] as **one** buffer at the start of the body, and send
//! `Content-Length` ([`Envelope::content_length`]) rather than chunked framing.
//!
//! **Requesting** ([`read_media`]): liberal in the form (any RFC 2046 layout: a quoted boundary,
//! other parameters, a preamble, any header order and case, part 1's type with parameters, LF-only
//! line ends), strict about integrity: part 2's stream ends cleanly only once the delimiter after
//! it has arrived, so a truncated transfer always ends in an error. Everything before part 2's
//! body is bounded by [`MAX_HEAD_BYTES`]; the file itself is passed on as it arrives, holding back
//! at most a delimiter's length, with one linear scan.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

// ------------------------------------------------------------------------------------------------
// Serving side

/// The multipart framing around one file (or one redirect), for a federation media response.
#[derive(Debug, Clone)]
pub struct Envelope {
    content_type: String,
    head: Bytes,
    tail: Bytes,
}

/// Why an [`Envelope`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A header value is empty.
    #[error("the media part's {header} is empty")]
    Empty {
        /// `Content-Type`, `Content-Disposition` or `Location`.
        header: &'static str,
    },
    /// A header value has CR, LF or another control character, which would break the framing.
    #[error("the media part's {header} contains a control character (byte {at})")]
    ControlCharacter {
        /// `Content-Type`, `Content-Disposition` or `Location`.
        header: &'static str,
        /// Byte offset in the value.
        at: usize,
    },
    /// A redirect's `Location` must be an absolute `http`/`https` URL: the requester fetches it
    /// as it is (Synapse does not resolve a relative one).
    #[error("the media part's Location is not an absolute http(s) URL")]
    Location,
    /// The OS random number generator failed.
    #[error("no random boundary: {0}")]
    Random(getrandom::Error),
}

const JSON_PART: &str = "Content-Type: application/json\r\n\r\n{}";

impl Envelope {
    /// Part 2 carries the file: `media_type` verbatim as its `Content-Type`, then `disposition`
    /// (`inline`, `attachment; filename*=utf-8''...`) when given.
    pub fn file(media_type: &str, disposition: Option<&str>) -> Result<Envelope, EnvelopeError> {
        check_header("Content-Type", media_type)?;
        let mut headers = format!("Content-Type: {media_type}\r\n");
        if let Some(disposition) = disposition {
            check_header("Content-Disposition", disposition)?;
            headers.push_str("Content-Disposition: ");
            headers.push_str(disposition);
            headers.push_str("\r\n");
        }
        Envelope::new(&headers)
    }

    /// Part 2 is only a `Location` header (the datastore's public URL), with no body: write
    /// [`Envelope::head`] then [`Envelope::tail`].
    pub fn redirect(location: &str) -> Result<Envelope, EnvelopeError> {
        check_header("Location", location)?;
        match url::Url::parse(location) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => return Err(EnvelopeError::Location),
        }
        Envelope::new(&format!("Location: {location}\r\n"))
    }

    fn new(part2_headers: &str) -> Result<Envelope, EnvelopeError> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).map_err(EnvelopeError::Random)?;
        Ok(Envelope::with_boundary(&hex::encode(random), part2_headers))
    }

    fn with_boundary(boundary: &str, part2_headers: &str) -> Envelope {
        let head =
            format!("\r\n--{boundary}\r\n{JSON_PART}\r\n--{boundary}\r\n{part2_headers}\r\n");
        Envelope {
            content_type: format!("multipart/mixed; boundary={boundary}"),
            head: Bytes::from(head),
            tail: Bytes::from(format!("\r\n--{boundary}--\r\n")),
        }
    }

    /// The response's `Content-Type`: `multipart/mixed; boundary=<32 lowercase hex digits>`.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// Everything before the file's bytes, up to and including the blank line after part 2's
    /// headers. Write it as one buffer: Synapse mis-parses a preamble split across reads.
    pub fn head(&self) -> Bytes {
        self.head.clone()
    }

    /// What follows the file's bytes: the closing delimiter, `\r\n--B--\r\n`.
    pub fn tail(&self) -> Bytes {
        self.tail.clone()
    }

    /// The body's length for a file of `file_len` bytes (0 for a redirect).
    pub fn content_length(&self, file_len: u64) -> u64 {
        (self.head.len() as u64)
            .saturating_add(file_len)
            .saturating_add(self.tail.len() as u64)
    }
}

fn check_header(header: &'static str, value: &str) -> Result<(), EnvelopeError> {
    if value.is_empty() {
        return Err(EnvelopeError::Empty { header });
    }
    match value.char_indices().find(|&(_, c)| c.is_control()) {
        Some((at, _)) => Err(EnvelopeError::ControlCharacter { header, at }),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------------------------------
// Requesting side

/// The most bytes [`read_media`] reads before part 2's body: the preamble, part 1 (headers and
/// JSON) and part 2's headers together.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The longest boundary accepted. RFC 2046 allows 70 characters; a little more is tolerated.
const MAX_BOUNDARY: usize = 200;

/// The most spaces or tabs accepted between a boundary and the end of its line.
const MAX_PADDING: usize = 256;

/// Part 2's headers, as the remote server sent them (values trimmed, folded lines joined).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaPart {
    /// The media's type.
    pub content_type: Option<String>,
    /// The media's `Content-Disposition` (with its file name).
    pub content_disposition: Option<String>,
    /// Where to fetch the media instead, unauthenticated; the part's body is then to be ignored.
    pub location: Option<String>,
}

/// Why a remote server's multipart response is unusable. The `Display` text says why, for a log
/// line and a 502's message; it never contains the file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MultipartError {
    /// The response's `Content-Type` is not `multipart/*` with a usable boundary.
    #[error("the response's Content-Type is unusable: {0}")]
    ContentType(&'static str),
    /// The body is not two parts as the federation media API has them.
    #[error("the multipart body is malformed: {0}")]
    Malformed(String),
    /// More than [`MAX_HEAD_BYTES`] came before part 2's body.
    #[error("the multipart body has more than {limit} bytes before the media")]
    TooLarge {
        /// [`MAX_HEAD_BYTES`].
        limit: usize,
    },
    /// The body ended too early: before part 2's body, or before the delimiter after it (a
    /// truncated transfer).
    #[error("the multipart body ended {0}")]
    Truncated(&'static str),
    /// The body stream itself failed (the underlying error's text).
    #[error("reading the response body failed: {0}")]
    Body(String),
}

/// Reads a federation media response's body up to part 2's headers, and returns them with a
/// stream of part 2's bytes, which ends at the next delimiter.
///
/// `content_type` is the response's `Content-Type` header. The stream ends with an error (never a
/// clean end) if the body ends before that delimiter; after an error it ends.
pub async fn read_media<S, E>(
    content_type: &str,
    mut body: S,
) -> Result<(MediaPart, MediaBody<S>), MultipartError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: fmt::Display,
{
    let boundary = boundary(content_type)?;
    let mut head = Head::new(&boundary);
    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return Err(MultipartError::Body(e.to_string())),
            None => return Err(MultipartError::Truncated(head.machine.truncated())),
        };
        if let Some((leftover, rest)) = head.feed(chunk)? {
            let delimiter = head.machine.body_delimiter(&boundary);
            let part = std::mem::take(&mut head.machine.part2.found);
            let mut media = MediaBody {
                stream: body,
                scanner: Scanner::new(delimiter),
                out: VecDeque::new(),
                state: BodyState::Streaming,
            };
            media.start(leftover);
            media.start(rest);
            return Ok((part, media));
        }
    }
}

/// Part 2's bytes, as a stream: see [`read_media`].
pub struct MediaBody<S> {
    stream: S,
    scanner: Scanner,
    out: VecDeque<Bytes>,
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Streaming,
    /// The delimiter after part 2 arrived: nothing more is read.
    Ended,
    /// An error was returned: nothing more is read.
    Failed,
}

impl<S> MediaBody<S> {
    fn start(&mut self, data: Bytes) {
        if self.state == BodyState::Streaming
            && let Step::End = self.scanner.push(data, &mut self.out)
        {
            self.state = BodyState::Ended;
        }
    }
}

impl<S> fmt::Debug for MediaBody<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaBody")
            .field("state", &self.state)
            .field("queued", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl<S, E> Stream for MediaBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: fmt::Display,
{
    type Item = Result<Bytes, MultipartError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            if this.state != BodyState::Streaming {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(chunk)) => {
                    if let Step::End = this.scanner.push(chunk, &mut this.out) {
                        this.state = BodyState::Ended;
                    }
                }
                Some(Err(e)) => {
                    this.state = BodyState::Failed;
                    return Poll::Ready(Some(Err(MultipartError::Body(e.to_string()))));
                }
                None => match this.scanner.at_end() {
                    Ok(()) => this.state = BodyState::Ended,
                    Err(e) => {
                        this.state = BodyState::Failed;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            }
        }
    }
}

// ---- the Content-Type's boundary

fn boundary(content_type: &str) -> Result<Vec<u8>, MultipartError> {
    use MultipartError::ContentType as Bad;
    let bytes = content_type.as_bytes();
    let type_end = bytes.iter().position(|&b| b == b';').unwrap_or(bytes.len());
    let media_type = content_type[..type_end].trim_matches([' ', '\t']);
    let is_multipart = media_type.len() > "multipart/".len()
        && media_type.as_bytes()[.."multipart/".len()].eq_ignore_ascii_case(b"multipart/");
    if !is_multipart {
        return Err(Bad("expected multipart/mixed with a boundary"));
    }

    let mut found: Option<Vec<u8>> = None;
    let mut i = type_end;
    while i < bytes.len() {
        // `bytes[i]` is `;`.
        i = skip_ows(bytes, i + 1);
        let name_start = i;
        while i < bytes.len() && !matches!(bytes[i], b'=' | b';') {
            i += 1;
        }
        let name = content_type[name_start..i].trim_end_matches([' ', '\t']);
        if bytes.get(i) != Some(&b'=') {
            // A parameter without a value (or an empty one, `;;`): ignored.
            continue;
        }
        i = skip_ows(bytes, i + 1);
        let value = if bytes.get(i) == Some(&b'"') {
            let (value, next) =
                quoted_string(bytes, i).ok_or(Bad("a quoted parameter is not terminated"))?;
            i = skip_ows(bytes, next);
            if i < bytes.len() && bytes[i] != b';' {
                return Err(Bad("something follows a quoted parameter value"));
            }
            value
        } else {
            let start = i;
            while i < bytes.len() && bytes[i] != b';' {
                i += 1;
            }
            content_type[start..i]
                .trim_end_matches([' ', '\t'])
                .as_bytes()
                .to_vec()
        };
        if name.eq_ignore_ascii_case("boundary") {
            if found.is_some() {
                return Err(Bad("two boundary parameters"));
            }
            found = Some(value);
        }
    }

    let boundary = found.ok_or(Bad("expected multipart/mixed with a boundary"))?;
    if boundary.is_empty() {
        return Err(Bad("the boundary is empty"));
    }
    if boundary.len() > MAX_BOUNDARY {
        return Err(Bad("the boundary is longer than 200 characters"));
    }
    if !boundary.iter().all(|&b| (0x20..0x7f).contains(&b)) || boundary.ends_with(b" ") {
        return Err(Bad(
            "the boundary has characters that RFC 2046 does not allow",
        ));
    }
    Ok(boundary)
}

/// A quoted string at `start` (the `"`): its unescaped bytes and the offset after it.
fn quoted_string(bytes: &[u8], start: usize) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        match *bytes.get(i)? {
            b'"' => return Some((out, i + 1)),
            b'\\' => {
                out.push(*bytes.get(i + 1)?);
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
}

fn skip_ows(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

// ---- everything before part 2's body: lines, bounded

struct Head {
    buf: BytesMut,
    /// Start of the current, incomplete line in `buf`.
    line_start: usize,
    /// How far from `line_start` `buf` is known to have no `\n`.
    scanned: usize,
    machine: Machine,
}

impl Head {
    fn new(boundary: &[u8]) -> Head {
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary);
        Head {
            buf: BytesMut::new(),
            line_start: 0,
            scanned: 0,
            machine: Machine {
                dash_boundary,
                state: HeadState::Preamble,
                lf_only: false,
                part1: Headers::new(Part::Metadata),
                part2: Headers::new(Part::Media),
            },
        }
    }

    /// Takes the next chunk; once part 2's headers are complete, returns what follows them in
    /// `buf` and the chunk's rest that was not copied into `buf`.
    fn feed(&mut self, chunk: Bytes) -> Result<Option<(Bytes, Bytes)>, MultipartError> {
        let take = (MAX_HEAD_BYTES - self.buf.len()).min(chunk.len());
        self.buf.extend_from_slice(&chunk[..take]);
        let rest = chunk.slice(take..);
        loop {
            let from = self.line_start + self.scanned;
            let Some(n) = self.buf[from..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len() - self.line_start;
                break;
            };
            let end = from + n;
            let mut line = &self.buf[self.line_start..end];
            let crlf = line.last() == Some(&b'\r');
            if crlf {
                line = &line[..line.len() - 1];
            }
            let done = self.machine.line(line, crlf)?;
            self.line_start = end + 1;
            self.scanned = 0;
            if done {
                let leftover = self.buf.split_off(self.line_start).freeze();
                return Ok(Some((leftover, rest)));
            }
        }
        if self.buf.len() >= MAX_HEAD_BYTES {
            return Err(MultipartError::TooLarge {
                limit: MAX_HEAD_BYTES,
            });
        }
        Ok(None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    Preamble,
    Part1Headers,
    Part1Body,
    Part2Headers,
}

struct Machine {
    /// `--` and the boundary.
    dash_boundary: Vec<u8>,
    state: HeadState,
    /// The first delimiter line ended in a bare LF: part 2 ends at `\n--B`, not `\r\n--B`.
    lf_only: bool,
    part1: Headers,
    part2: Headers,
}

enum Delimiter {
    Open,
    Close,
}

impl Machine {
    /// One line, without its line end. True once part 2's headers are complete.
    fn line(&mut self, line: &[u8], crlf: bool) -> Result<bool, MultipartError> {
        let malformed = |s: &str| Err(MultipartError::Malformed(s.to_owned()));
        match self.state {
            HeadState::Preamble => match self.delimiter(line) {
                Some(Delimiter::Open) => {
                    self.lf_only = !crlf;
                    self.state = HeadState::Part1Headers;
                }
                Some(Delimiter::Close) => return malformed("it closes before its first part"),
                None => {}
            },
            HeadState::Part1Body => match self.delimiter(line) {
                Some(Delimiter::Open) => self.state = HeadState::Part2Headers,
                Some(Delimiter::Close) => {
                    return malformed("it has only the metadata part, no media part");
                }
                None => {}
            },
            HeadState::Part1Headers | HeadState::Part2Headers => {
                if self.delimiter(line).is_some() {
                    return malformed("a part's headers end without a blank line");
                }
                let part2 = self.state == HeadState::Part2Headers;
                if !line.is_empty() {
                    let headers = if part2 {
                        &mut self.part2
                    } else {
                        &mut self.part1
                    };
                    headers.line(line)?;
                } else if part2 {
                    return Ok(true);
                } else {
                    self.part1.check_json()?;
                    self.state = HeadState::Part1Body;
                }
            }
        }
        Ok(false)
    }

    fn delimiter(&self, line: &[u8]) -> Option<Delimiter> {
        let after = line.strip_prefix(self.dash_boundary.as_slice())?;
        if after.starts_with(b"--") {
            Some(Delimiter::Close)
        } else if after.iter().all(|&b| b == b' ' || b == b'\t') {
            Some(Delimiter::Open)
        } else {
            None
        }
    }

    fn truncated(&self) -> &'static str {
        match self.state {
            HeadState::Preamble => "before its first part",
            HeadState::Part1Headers => "inside the metadata part's headers",
            HeadState::Part1Body => "inside the metadata part",
            HeadState::Part2Headers => "inside the media part's headers",
        }
    }

    /// What ends part 2: the line end (as the first delimiter line had it), `--`, the boundary.
    fn body_delimiter(&self, boundary: &[u8]) -> Box<[u8]> {
        let mut delimiter = if self.lf_only {
            b"\n--".to_vec()
        } else {
            b"\r\n--".to_vec()
        };
        delimiter.extend_from_slice(boundary);
        delimiter.into_boxed_slice()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Metadata,
    Media,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Metadata => "the metadata part",
            Part::Media => "the media part",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentType,
    ContentDisposition,
    Location,
    Other,
}

struct Headers {
    part: Part,
    found: MediaPart,
    /// The field of the last header line, for folded continuation lines.
    last: Option<Field>,
}

impl Headers {
    fn new(part: Part) -> Headers {
        Headers {
            part,
            found: MediaPart::default(),
            last: None,
        }
    }

    fn line(&mut self, line: &[u8]) -> Result<(), MultipartError> {
        let part = self.part;
        let malformed = |what: &str| Err(MultipartError::Malformed(format!("{part} has {what}")));
        if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return malformed("a control character in its headers");
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // An obsolete folded line: continues the last header.
            let Some(field) = self.last else {
                return malformed("a continuation line before its first header");
            };
            if !self.keeps(field) {
                return Ok(());
            }
            let more = text(part, field, trim(line))?;
            if let Some(value) = self.slot(field).as_mut()
                && !more.is_empty()
            {
                value.push(' ');
                value.push_str(&more);
            }
            return Ok(());
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return malformed("a header line without `:`");
        };
        let name = trim(&line[..colon]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return malformed("a header with an invalid name");
        }
        let field = if name.eq_ignore_ascii_case(b"content-type") {
            Field::ContentType
        } else if name.eq_ignore_ascii_case(b"content-disposition") {
            Field::ContentDisposition
        } else if name.eq_ignore_ascii_case(b"location") {
            Field::Location
        } else {
            Field::Other
        };
        self.last = Some(field);
        if !self.keeps(field) {
            return Ok(());
        }
        let value = text(part, field, trim(&line[colon + 1..]))?;
        let slot = self.slot(field);
        if slot.is_some() {
            return Err(MultipartError::Malformed(format!(
                "{part} has two {} headers",
                field_name(field)
            )));
        }
        *slot = Some(value);
        Ok(())
    }

    /// Whether this part's `field` is one [`read_media`] returns or checks.
    fn keeps(&self, field: Field) -> bool {
        match self.part {
            Part::Metadata => field == Field::ContentType,
            Part::Media => field != Field::Other,
        }
    }

    /// Where a kept field goes (`Other` is never kept: see [`Headers::keeps`]).
    fn slot(&mut self, field: Field) -> &mut Option<String> {
        match field {
            Field::ContentType | Field::Other => &mut self.found.content_type,
            Field::ContentDisposition => &mut self.found.content_disposition,
            Field::Location => &mut self.found.location,
        }
    }

    /// Part 1 must be JSON when it says what it is (parameters allowed).
    fn check_json(&self) -> Result<(), MultipartError> {
        let Some(content_type) = &self.found.content_type else {
            return Ok(());
        };
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        if media_type.eq_ignore_ascii_case("application/json") {
            return Ok(());
        }
        let shown: String = content_type.chars().take(100).collect();
        Err(MultipartError::Malformed(format!(
            "the metadata part is {shown:?}, not application/json"
        )))
    }
}

fn field_name(field: Field) -> &'static str {
    match field {
        Field::ContentType => "Content-Type",
        Field::ContentDisposition => "Content-Disposition",
        Field::Location => "Location",
        Field::Other => "other",
    }
}

fn text(part: Part, field: Field, value: &[u8]) -> Result<String, MultipartError> {
    String::from_utf8(value.to_vec()).map_err(|_| {
        MultipartError::Malformed(format!(
            "{part} has a {} header that is not UTF-8",
            field_name(field)
        ))
    })
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// ---- part 2's body: a streaming search for the delimiter

/// Finds the delimiter (`\r\n--B`, or `\n--B`) in a stream of chunks. Its first byte appears
/// nowhere else in it (a boundary is printable ASCII), which keeps the search linear and means a
/// candidate is always one run at the end of what was seen.
struct Scanner {
    delimiter: Box<[u8]>,
    /// Searches for `delimiter` (SIMD: the scan runs over every byte of every remote file).
    finder: memchr::memmem::Finder<'static>,
    /// A proper prefix of the delimiter at the end of the data seen so far (held back, since it
    /// may be the delimiter), or, when `look` is set, the whole delimiter and the padding or
    /// partial line end seen after it.
    held: BytesMut,
    /// How many of `held`'s first bytes are not content: the line end of the blank line after
    /// part 2's headers, which doubles as the delimiter's when the body is empty and the
    /// delimiter follows at once (`Location: ...\r\n\r\n--B`, as in MSC3916's example).
    not_content: usize,
    look: Option<Look>,
}

/// After a full delimiter: a delimiter line has `--`, or padding and a line end, after the
/// boundary; anything else means those bytes were content (`--Bx` is not a delimiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    AfterBoundary,
    Dash,
    Padding(usize),
    Cr,
}

enum Step {
    More,
    End,
}

enum Looked {
    Delimiter,
    NotDelimiter,
    NeedMore,
}

enum Found {
    Full(usize),
    Partial(usize),
    Nothing,
}

impl Scanner {
    fn new(delimiter: Box<[u8]>) -> Scanner {
        debug_assert!(!delimiter[1..].contains(&delimiter[0]));
        let line_end = if delimiter[0] == b'\r' { 2 } else { 1 };
        Scanner {
            held: BytesMut::from(&delimiter[..line_end]),
            not_content: line_end,
            finder: memchr::memmem::Finder::new(&delimiter[..]).into_owned(),
            delimiter,
            look: None,
        }
    }

    /// The held bytes turned out to be content: queues them (less those that never were).
    fn release(&mut self, out: &mut VecDeque<Bytes>) {
        let mut held = self.held.split().freeze();
        held.advance(self.not_content);
        self.not_content = 0;
        if !held.is_empty() {
            out.push_back(held);
        }
    }

    /// Scans `data`, queueing the content it can release on `out`.
    fn push(&mut self, mut data: Bytes, out: &mut VecDeque<Bytes>) -> Step {
        let dlen = self.delimiter.len();
        loop {
            if let Some(look) = self.look {
                match self.look_ahead(look, &mut data) {
                    Looked::Delimiter => return Step::End,
                    Looked::NeedMore => return Step::More,
                    Looked::NotDelimiter => {
                        // None of the held bytes can start a delimiter: release them all; the
                        // byte that decided it is still in `data`.
                        self.look = None;
                        self.release(out);
                    }
                }
            } else if !self.held.is_empty() {
                let have = self.held.len();
                let n = (dlen - have).min(data.len());
                if data[..n] == self.delimiter[have..have + n] {
                    self.held.extend_from_slice(&data[..n]);
                    data.advance(n);
                    if self.held.len() < dlen {
                        return Step::More;
                    }
                    self.look = Some(Look::AfterBoundary);
                } else {
                    self.release(out);
                }
            } else {
                match find(&data, &self.delimiter, &self.finder) {
                    Found::Full(at) => {
                        if at > 0 {
                            out.push_back(data.slice(..at));
                        }
                        self.held.extend_from_slice(&data[at..at + dlen]);
                        data.advance(at + dlen);
                        self.look = Some(Look::AfterBoundary);
                    }
                    Found::Partial(at) => {
                        if at > 0 {
                            out.push_back(data.slice(..at));
                        }
                        self.held.extend_from_slice(&data[at..]);
                        return Step::More;
                    }
                    Found::Nothing => {
                        if !data.is_empty() {
                            out.push_back(data);
                        }
                        return Step::More;
                    }
                }
            }
        }
    }

    /// Decides, byte by byte, whether the delimiter in `held` ends a delimiter line. The byte that
    /// decides "no" is left in `data`.
    fn look_ahead(&mut self, mut look: Look, data: &mut Bytes) -> Looked {
        loop {
            let Some(&b) = data.first() else {
                self.look = Some(look);
                return Looked::NeedMore;
            };
            look = match (look, b) {
                (Look::Cr | Look::AfterBoundary | Look::Padding(_), b'\n') | (Look::Dash, b'-') => {
                    return Looked::Delimiter;
                }
                (Look::AfterBoundary, b'-') => Look::Dash,
                (Look::AfterBoundary, b' ' | b'\t') => Look::Padding(1),
                (Look::Padding(n), b' ' | b'\t') if n < MAX_PADDING => Look::Padding(n + 1),
                (Look::AfterBoundary | Look::Padding(_), b'\r') => Look::Cr,
                _ => return Looked::NotDelimiter,
            };
            self.held.extend_from_slice(&data[..1]);
            data.advance(1);
        }
    }

    /// The body ended: fine once the whole delimiter has arrived (whatever followed it).
    fn at_end(&self) -> Result<(), MultipartError> {
        if self.look.is_some() {
            Ok(())
        } else if self.held.len() == self.not_content {
            Err(MultipartError::Truncated(
                "before the delimiter after the media: the media is incomplete",
            ))
        } else {
            Err(MultipartError::Truncated(
                "inside the delimiter after the media: the media may be incomplete",
            ))
        }
    }
}

/// The delimiter's first position in `data`, or where a prefix of it ends `data`.
fn find(data: &[u8], delimiter: &[u8], finder: &memchr::memmem::Finder<'_>) -> Found {
    if let Some(at) = finder.find(data) {
        return Found::Full(at);
    }
    // Else a proper prefix of it may end the data (a partial match can only be at the end, so
    // a full one, had there been one, would have come first).
    let tail = data.len().saturating_sub(delimiter.len() - 1);
    memchr::memchr_iter(delimiter[0], &data[tail..])
        .map(|n| tail + n)
        .find(|&at| delimiter.starts_with(&data[at..]))
        .map_or(Found::Nothing, Found::Partial)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Waker;

    use super::*;

    /// Polls a future that never waits (the test streams are always ready).
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the future waited"),
        }
    }

    type Chunks = futures_util::stream::Iter<std::vec::IntoIter<Result<Bytes, String>>>;

    fn stream(chunks: Vec<Result<Bytes, String>>) -> Chunks {
        futures_util::stream::iter(chunks)
    }

    /// Reads a whole response: part 2's headers and bytes, or the first error.
    fn read_chunks(
        content_type: &str,
        chunks: Vec<Bytes>,
    ) -> Result<(MediaPart, Vec<u8>), MultipartError> {
        block_on(async {
            let (part, mut body) =
                read_media(content_type, stream(chunks.into_iter().map(Ok).collect())).await?;
            let mut file = Vec::new();
            while let Some(item) = body.next().await {
                file.extend_from_slice(&item?);
            }
            assert!(
                body.next().await.is_none(),
                "a stream that ended stays ended"
            );
            Ok((part, file))
        })
    }

    fn read(content_type: &str, body: &[u8]) -> Result<(MediaPart, Vec<u8>), MultipartError> {
        read_chunks(content_type, vec![Bytes::copy_from_slice(body)])
    }

    fn split(body: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            chunks.push(Bytes::copy_from_slice(&body[start..cut]));
            start = cut;
        }
        chunks.push(Bytes::copy_from_slice(&body[start..]));
        chunks
    }

    fn bytewise(body: &[u8]) -> Vec<Bytes> {
        body.iter().map(|&b| Bytes::copy_from_slice(&[b])).collect()
    }

    fn whole(envelope: &Envelope, file: &[u8]) -> Vec<u8> {
        let mut body = envelope.head().to_vec();
        body.extend_from_slice(file);
        body.extend_from_slice(&envelope.tail());
        assert_eq!(
            body.len() as u64,
            envelope.content_length(file.len() as u64)
        );
        body
    }

    fn boundary_of(envelope: &Envelope) -> &str {
        envelope
            .content_type()
            .strip_prefix("multipart/mixed; boundary=")
            .expect("the content type's form")
    }

    fn part(
        content_type: Option<&str>,
        disposition: Option<&str>,
        location: Option<&str>,
    ) -> MediaPart {
        MediaPart {
            content_type: content_type.map(str::to_owned),
            content_disposition: disposition.map(str::to_owned),
            location: location.map(str::to_owned),
        }
    }

    /// xorshift64*: deterministic test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const SYNAPSE_BOUNDARY: &str = "729d79f19f8940e6b8a852e76c2b767c";

    /// Captured from Synapse 1.163 (federation-harness.md §2.1).
    fn synapse_body() -> Vec<u8> {
        let b = SYNAPSE_BOUNDARY;
        format!(
            "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: text/plain\r\nContent-Disposition: inline\r\n\r\nHello from B\r\n--{b}--\r\n"
        )
        .into_bytes()
    }

    // ---- Envelope

    #[test]
    fn envelope_is_synapse_byte_for_byte() {
        let envelope = Envelope::file("text/plain", Some("inline")).expect("envelope");
        let b = boundary_of(&envelope).to_owned();
        assert_eq!(b.len(), 32);
        assert!(
            b.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        let body = whole(&envelope, b"Hello from B");
        assert_eq!(body, synapse_body().replace_boundary(SYNAPSE_BOUNDARY, &b));
        assert_eq!(envelope.content_length(12), 221);
        assert_eq!(
            envelope.head(),
            format!(
                "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: text/plain\r\nContent-Disposition: inline\r\n\r\n"
            )
        );
        assert_eq!(envelope.tail(), format!("\r\n--{b}--\r\n"));
    }

    trait ReplaceBoundary {
        fn replace_boundary(self, from: &str, to: &str) -> Vec<u8>;
    }

    impl ReplaceBoundary for Vec<u8> {
        fn replace_boundary(self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8(self)
                .expect("text")
                .replace(from, to)
                .into_bytes()
        }
    }

    #[test]
    fn envelope_forms() {
        let envelope = Envelope::file("img/png", None).expect("envelope");
        let b = boundary_of(&envelope).to_owned();
        assert_eq!(
            envelope.head(),
            format!(
                "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: img/png\r\n\r\n"
            )
        );
        let disposition = "attachment; filename*=utf-8''%E6%97%A5%E6%9C%AC%20%E2%98%95.png";
        let envelope = Envelope::file("image/png", Some(disposition)).expect("envelope");
        let b = boundary_of(&envelope).to_owned();
        assert!(
            envelope.head().ends_with(
                format!(
                    "--{b}\r\nContent-Type: image/png\r\nContent-Disposition: {disposition}\r\n\r\n"
                )
                .as_bytes()
            )
        );

        let location = "https://cdn.example.org/ab/c1/2345.txt?sig=x";
        let envelope = Envelope::redirect(location).expect("envelope");
        let b = boundary_of(&envelope).to_owned();
        assert_eq!(
            whole(&envelope, b""),
            format!(
                "\r\n--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nLocation: {location}\r\n\r\n\r\n--{b}--\r\n"
            )
            .into_bytes()
        );

        let other = Envelope::file("text/plain", None).expect("envelope");
        assert_ne!(boundary_of(&other), b, "a fresh boundary each time");
    }

    #[test]
    fn envelope_refuses_values_that_break_the_framing() {
        use EnvelopeError::*;
        let file = |t: &str, d: Option<&str>| Envelope::file(t, d).err();
        assert_eq!(
            file("", None),
            Some(Empty {
                header: "Content-Type"
            })
        );
        assert_eq!(
            file("text/plain\r\nX: y", None),
            Some(ControlCharacter {
                header: "Content-Type",
                at: 10
            })
        );
        assert_eq!(
            file("text/plain", Some("inline\n")),
            Some(ControlCharacter {
                header: "Content-Disposition",
                at: 6
            })
        );
        assert_eq!(
            file("text/plain", Some("")),
            Some(Empty {
                header: "Content-Disposition"
            })
        );
        for bad in ["a\0", "a\tb", "a\x7f", "a\u{85}"] {
            assert!(
                matches!(file(bad, None), Some(ControlCharacter { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            Envelope::redirect("https://cdn.example/a\r\nb").err(),
            Some(ControlCharacter {
                header: "Location",
                at: 21
            })
        );
        for bad in [
            "/relative/path",
            "ftp://cdn.example/x",
            "cdn.example/x",
            "https://",
        ] {
            assert_eq!(Envelope::redirect(bad).err(), Some(Location), "{bad:?}");
        }
        assert_eq!(
            Envelope::redirect("").err(),
            Some(Empty { header: "Location" })
        );
        assert_eq!(
            Envelope::file("text/plain", Some("inline\r"))
                .err()
                .map(|e| e.to_string()),
            Some(
                "the media part's Content-Disposition contains a control character (byte 6)"
                    .to_owned()
            )
        );
    }

    // ---- read_media: the forms

    #[test]
    fn reads_synapse_capture() {
        let content_type = format!("multipart/mixed; boundary={SYNAPSE_BOUNDARY}");
        let body = synapse_body();
        assert_eq!(body.len(), 221);
        let (found, file) = read(&content_type, &body).expect("read");
        assert_eq!(found, part(Some("text/plain"), Some("inline"), None));
        assert_eq!(file, b"Hello from B");
    }

    #[test]
    fn round_trip_every_split() {
        let file = b"Hello\r\n--\r\n-\rfrom B\r\n";
        let envelope =
            Envelope::file("text/plain", Some("attachment; filename=a.txt")).expect("envelope");
        let body = whole(&envelope, file);
        let want = part(Some("text/plain"), Some("attachment; filename=a.txt"), None);
        let check = |chunks: Vec<Bytes>| {
            let (found, got) = read_chunks(envelope.content_type(), chunks).expect("read");
            assert_eq!(found, want);
            assert_eq!(got, file);
        };
        check(bytewise(&body));
        for i in 0..=body.len() {
            check(split(&body, &[i]));
            for j in i..=body.len() {
                check(split(&body, &[i, j]));
            }
        }
    }

    #[test]
    fn empty_file() {
        let envelope =
            Envelope::file("application/octet-stream", Some("inline")).expect("envelope");
        let body = whole(&envelope, b"");
        assert_eq!(body.len() as u64, envelope.content_length(0));
        for i in 0..=body.len() {
            let (found, file) =
                read_chunks(envelope.content_type(), split(&body, &[i])).expect("read");
            assert_eq!(
                found.content_type.as_deref(),
                Some("application/octet-stream")
            );
            assert!(file.is_empty());
        }
        let (_, file) = read_chunks(envelope.content_type(), bytewise(&body)).expect("read");
        assert!(file.is_empty());
    }

    #[test]
    fn truncated_at_every_offset_is_an_error() {
        let file = b"data\r\n--with\r\n--a\r\nlookalike\r";
        let envelope = Envelope::file("text/plain", Some("inline")).expect("envelope");
        let body = whole(&envelope, file);
        // Complete once `\r\n--B` after the file has arrived.
        let complete = envelope.head().len() + file.len() + 4 + 32;
        for cut in 0..=body.len() {
            for chunks in [
                split(&body[..cut], &[]),
                bytewise(&body[..cut]),
                split(&body[..cut], &[cut / 2]),
            ] {
                match read_chunks(envelope.content_type(), chunks) {
                    Ok((_, got)) => {
                        assert!(
                            cut >= complete,
                            "cut at {cut} of {} looked complete",
                            body.len()
                        );
                        assert_eq!(got, file);
                    }
                    Err(e) => {
                        assert!(cut < complete, "cut at {cut}: {e}");
                        assert!(
                            matches!(e, MultipartError::Truncated(_)),
                            "cut at {cut}: {e:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_file_random_chunks_with_delimiter_lookalikes() {
        let envelope = Envelope::file("application/octet-stream", None).expect("envelope");
        let b = boundary_of(&envelope).as_bytes().to_vec();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut file = Vec::with_capacity(1 << 20);
        while file.len() < 1 << 20 {
            match rng.below(6) {
                0 => {
                    // `\r\n--` and a proper prefix of the boundary.
                    let k = rng.below(b.len());
                    file.extend_from_slice(b"\r\n--");
                    file.extend_from_slice(&b[..k]);
                    file.push(b'!');
                }
                1 => {
                    // The whole boundary but one wrong last byte.
                    file.extend_from_slice(b"\r\n--");
                    file.extend_from_slice(&b[..b.len() - 1]);
                    file.push(b'x');
                }
                2 => {
                    // The delimiter without its CR.
                    file.extend_from_slice(b"!\n--");
                    file.extend_from_slice(&b);
                    file.extend_from_slice(b"--\r\n");
                }
                3 => file.extend_from_slice(&[b'\r'; 3][..1 + rng.below(3)]),
                _ => {
                    for _ in 0..rng.below(200) {
                        file.push(rng.next() as u8);
                    }
                }
            }
        }
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(&b);
        assert!(!file.windows(delimiter.len()).any(|w| w == delimiter));
        let body = whole(&envelope, &file);
        for round in 0..8 {
            let mut cuts = Vec::new();
            let mut at = 0;
            loop {
                at += match round % 3 {
                    0 => 1 + rng.below(64),
                    1 => 1 + rng.below(70_000),
                    _ => 1 + rng.below(b.len() + 6),
                };
                if at >= body.len() {
                    break;
                }
                cuts.push(at);
            }
            let (found, got) =
                read_chunks(envelope.content_type(), split(&body, &cuts)).expect("read");
            assert_eq!(
                found.content_type.as_deref(),
                Some("application/octet-stream")
            );
            assert!(got == file, "round {round}: the file differs");
        }
        // And as one chunk, and truncated just before the delimiter completes.
        let (_, got) = read(envelope.content_type(), &body).expect("read");
        assert!(got == file);
        let cut = envelope.head().len() + file.len() + 4 + b.len() - 1;
        assert!(matches!(
            read(envelope.content_type(), &body[..cut]),
            Err(MultipartError::Truncated(_))
        ));
    }

    #[test]
    fn a_boundary_that_does_not_end_a_line_is_content() {
        let b = "bound";
        let ct = format!("multipart/mixed; boundary={b}");
        for inner in [
            "\r\n--boundx",
            "\r\n--bound x",
            "\r\n--bound-x",
            "\r\n--bound\rx",
            "\r\n--bound \t\rx",
            "\r\n--bound\r\r",
        ] {
            let body = format!(
                "--{b}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: text/plain\r\n\r\nA{inner}Z\r\n--{b}--\r\n"
            );
            let want = format!("A{inner}Z");
            let (_, got) = read(&ct, body.as_bytes()).expect("read");
            assert_eq!(String::from_utf8_lossy(&got), want);
            let (_, got) = read_chunks(&ct, bytewise(body.as_bytes())).expect("read");
            assert_eq!(String::from_utf8_lossy(&got), want);
        }
        // At the very start of the body too (where the blank line's CRLF may be the delimiter's).
        let body = format!(
            "--{b}\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: text/plain\r\n\r\n--boundx\r\n--{b}--"
        );
        for chunks in [split(body.as_bytes(), &[]), bytewise(body.as_bytes())] {
            assert_eq!(read_chunks(&ct, chunks).expect("read").1, b"--boundx");
        }
        // Padding, a next part, or nothing after the boundary all end part 2.
        for end in [
            "\r\n--bound  \t\r\n",
            "\r\n--bound\r\n--bound--",
            "\r\n--bound",
            "\r\n--bound\n",
            "\r\n--bound-",
        ] {
            let body =
                format!("--{b}\r\n\r\n{{}}\r\n--{b}\r\nContent-Type: text/plain\r\n\r\nAZ{end}");
            let (_, got) = read(&ct, body.as_bytes()).expect("read");
            assert_eq!(got, b"AZ", "{end:?}");
            let (_, got) = read_chunks(&ct, bytewise(body.as_bytes())).expect("read");
            assert_eq!(got, b"AZ", "{end:?}");
        }
    }

    #[test]
    fn liberal_forms() {
        let cases: &[(&str, &str, MediaPart, &[u8])] = &[
            // A quoted boundary with spaces, other parameters around it, any case.
            (
                "Multipart/Mixed; charset=x; BOUNDARY=\"a b:c\"; foo=bar",
                "preamble\r\n--a b:c\r\ncontent-type: application/json; charset=utf-8\r\n\r\n{\"k\": 1}\r\n--a b:c\r\nCONTENT-DISPOSITION: inline\r\nX-Other: y\r\ncontent-type:  image/png \r\n\r\nPNG\r\n--a b:c--\r\nepilogue",
                part(Some("image/png"), Some("inline"), None),
                b"PNG",
            ),
            // Go's mime/multipart (Dendrite): no leading CRLF, part 2 only a Content-Type.
            (
                "multipart/mixed; boundary=4b8d2c5f2a1e9e3b0c6d7a8f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f",
                "--4b8d2c5f2a1e9e3b0c6d7a8f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f\r\nContent-Type: application/json\r\n\r\n{}\r\n--4b8d2c5f2a1e9e3b0c6d7a8f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f\r\nContent-Type: image/jpeg\r\n\r\nJPEG\r\n--4b8d2c5f2a1e9e3b0c6d7a8f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f--\r\n",
                part(Some("image/jpeg"), None, None),
                b"JPEG",
            ),
            // The MSC3916 example: no closing delimiter, a blank line before each delimiter.
            (
                "multipart/mixed; boundary=gc0p4Jq0M2Yt08jU534c0p",
                "--gc0p4Jq0M2Yt08jU534c0p\r\nContent-Type: application/json\r\n\r\n{}\r\n\r\n--gc0p4Jq0M2Yt08jU534c0p\r\nContent-Type: text/plain\r\n\r\nThis media is plain text. Maybe somebody used it as a paste bin.\r\n\r\n--gc0p4Jq0M2Yt08jU534c0p\r\n",
                part(Some("text/plain"), None, None),
                b"This media is plain text. Maybe somebody used it as a paste bin.\r\n",
            ),
            // The MSC3916 redirect example.
            (
                "multipart/mixed; boundary=gc0p4Jq0M2Yt08jU534c0p",
                "--gc0p4Jq0M2Yt08jU534c0p\r\nContent-Type: application/json\r\n\r\n{}\r\n\r\n--gc0p4Jq0M2Yt08jU534c0p\r\nLocation: https://cdn.example.org/ab/c1/2345.txt\r\n\r\n--gc0p4Jq0M2Yt08jU534c0p\r\n",
                part(None, None, Some("https://cdn.example.org/ab/c1/2345.txt")),
                b"",
            ),
            // LF-only line ends.
            (
                "multipart/mixed;boundary=xyz",
                "\n--xyz\nContent-Type: application/json\n\n{}\n--xyz\nContent-Type: text/plain\n\nline1\r\nline2\n--xyz--\n",
                part(Some("text/plain"), None, None),
                b"line1\r\nline2",
            ),
            // Padding after delimiters, a folded header, no part-1 type, a header with no value.
            (
                "multipart/form-data; boundary=q",
                "--q \t\r\n\r\n{}\r\n--q  \r\nContent-Disposition: attachment;\r\n\tfilename=a.txt\r\nContent-Type:\r\n\r\nx\r\n--q--",
                part(Some(""), Some("attachment; filename=a.txt"), None),
                b"x",
            ),
        ];
        for (content_type, body, want, file) in cases {
            for chunks in [split(body.as_bytes(), &[]), bytewise(body.as_bytes())] {
                let (found, got) = read_chunks(content_type, chunks).expect(body);
                assert_eq!(&found, want, "{body:?}");
                assert_eq!(&got, file, "{body:?}");
            }
        }
    }

    #[test]
    fn redirect_round_trip() {
        let envelope = Envelope::redirect("https://cdn.example/a/b?x=1").expect("envelope");
        let body = whole(&envelope, b"");
        for i in 0..=body.len() {
            let (found, file) =
                read_chunks(envelope.content_type(), split(&body, &[i])).expect("read");
            assert_eq!(found, part(None, None, Some("https://cdn.example/a/b?x=1")));
            assert!(file.is_empty());
        }
    }

    // ---- read_media: refusals

    #[test]
    fn unusable_content_types() {
        use MultipartError::ContentType as Bad;
        let body = synapse_body();
        for (content_type, want) in [
            ("", Bad("expected multipart/mixed with a boundary")),
            ("text/html", Bad("expected multipart/mixed with a boundary")),
            (
                "multipart/",
                Bad("expected multipart/mixed with a boundary"),
            ),
            (
                "multipart/mixed",
                Bad("expected multipart/mixed with a boundary"),
            ),
            (
                "multipart/mixed; charset=x",
                Bad("expected multipart/mixed with a boundary"),
            ),
            (
                "multipart/mixed; boundary",
                Bad("expected multipart/mixed with a boundary"),
            ),
            (
                "application/json; boundary=x",
                Bad("expected multipart/mixed with a boundary"),
            ),
            ("multipart/mixed; boundary=", Bad("the boundary is empty")),
            (
                "multipart/mixed; boundary=\"\"",
                Bad("the boundary is empty"),
            ),
            (
                "multipart/mixed; boundary=\"abc",
                Bad("a quoted parameter is not terminated"),
            ),
            (
                "multipart/mixed; boundary=\"abc\"x",
                Bad("something follows a quoted parameter value"),
            ),
            (
                "multipart/mixed; boundary=a; boundary=a",
                Bad("two boundary parameters"),
            ),
            (
                "multipart/mixed; boundary=\"a\r\nb\"",
                Bad("the boundary has characters that RFC 2046 does not allow"),
            ),
            (
                "multipart/mixed; boundary=\"ab \"",
                Bad("the boundary has characters that RFC 2046 does not allow"),
            ),
            (
                "multipart/mixed; boundary=bü",
                Bad("the boundary has characters that RFC 2046 does not allow"),
            ),
        ] {
            assert_eq!(
                read(content_type, &body).err(),
                Some(want),
                "{content_type:?}"
            );
        }
        let long = format!("multipart/mixed; boundary={}", "a".repeat(201));
        assert_eq!(
            read(&long, &body).err(),
            Some(Bad("the boundary is longer than 200 characters"))
        );
        assert_eq!(
            Bad("the boundary is empty").to_string(),
            "the response's Content-Type is unusable: the boundary is empty"
        );
    }

    #[test]
    fn malformed_bodies() {
        let ct = "multipart/mixed; boundary=B";
        let malformed = |s: &str| Some(MultipartError::Malformed(s.to_owned()));
        let truncated = |s: &'static str| Some(MultipartError::Truncated(s));
        let cases: &[(&str, Option<MultipartError>)] = &[
            ("", truncated("before its first part")),
            ("<html>not found</html>", truncated("before its first part")),
            ("--B", truncated("before its first part")),
            ("--B--\r\n", malformed("it closes before its first part")),
            (
                "--B\r\nContent-Type: application/json\r\n",
                truncated("inside the metadata part's headers"),
            ),
            (
                "--B\r\nContent-Type: application/json\r\n\r\n{}",
                truncated("inside the metadata part"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: text/plain\r\n",
                truncated("inside the media part's headers"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: text/plain\r\n\r\nabc",
                truncated("before the delimiter after the media: the media is incomplete"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: text/plain\r\n\r\nabc\r\n-",
                truncated("inside the delimiter after the media: the media may be incomplete"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B--\r\n",
                malformed("it has only the metadata part, no media part"),
            ),
            (
                "--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n",
                malformed("the metadata part is \"text/plain\", not application/json"),
            ),
            (
                "--B\r\nContent-Type: application/json\r\n--B\r\n",
                malformed("a part's headers end without a blank line"),
            ),
            (
                "--B\r\nno colon here\r\n\r\n",
                malformed("the metadata part has a header line without `:`"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\n: x\r\n\r\n",
                malformed("the media part has a header with an invalid name"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nBad Name: x\r\n\r\n",
                malformed("the media part has a header with an invalid name"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\n folded\r\n\r\n",
                malformed("the media part has a continuation line before its first header"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: a\0b\r\n\r\n",
                malformed("the media part has a control character in its headers"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: a\rb\r\n\r\n",
                malformed("the media part has a control character in its headers"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nContent-Type: a\r\ncontent-type: b\r\n\r\n",
                malformed("the media part has two Content-Type headers"),
            ),
            (
                "--B\r\n\r\n{}\r\n--B\r\nLocation: https://a\r\nLocation: https://b\r\n\r\n",
                malformed("the media part has two Location headers"),
            ),
            (
                "--B\r\nContent-Type: application/json\r\nContent-Type: application/json\r\n\r\n",
                malformed("the metadata part has two Content-Type headers"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(read(ct, body.as_bytes()).err(), *want, "{body:?}");
            assert_eq!(
                read_chunks(ct, bytewise(body.as_bytes())).err(),
                *want,
                "{body:?}"
            );
        }
        // Headers that are not UTF-8.
        let mut body =
            b"--B\r\n\r\n{}\r\n--B\r\nContent-Disposition: inline; filename=\xff\r\n\r\nx\r\n--B--"
                .to_vec();
        assert_eq!(
            read(ct, &body).err(),
            malformed("the media part has a Content-Disposition header that is not UTF-8")
        );
        // ... but only the ones that are kept.
        body = b"--B\r\nX-Other: \xff\r\n\r\n{}\r\n--B\r\nX-Other: \xff\r\nContent-Disposition: inline\r\n\r\nx\r\n--B--".to_vec();
        assert_eq!(read(ct, &body).expect("read").1, b"x");
    }

    #[test]
    fn everything_before_the_media_is_bounded() {
        let ct = "multipart/mixed; boundary=B";
        let head_of = |json_len: usize| {
            let mut head = b"--B\r\nContent-Type: application/json\r\n\r\n".to_vec();
            head.resize(head.len() + json_len, b' ');
            head.extend_from_slice(b"\r\n--B\r\nContent-Type: text/plain\r\n\r\n");
            head
        };
        let fixed = head_of(0).len();
        for (json_len, fits) in [
            (MAX_HEAD_BYTES - fixed, true),
            (MAX_HEAD_BYTES - fixed + 1, false),
        ] {
            let mut body = head_of(json_len);
            assert_eq!(body.len() <= MAX_HEAD_BYTES, fits);
            body.extend_from_slice(&[b'x'; 100_000]);
            body.extend_from_slice(b"\r\n--B--\r\n");
            for cuts in [
                vec![],
                (1..body.len()).step_by(1000).collect::<Vec<_>>(),
                vec![10, 70_000],
            ] {
                let result = read_chunks(ct, split(&body, &cuts));
                if fits {
                    assert_eq!(result.expect("read").1.len(), 100_000);
                } else {
                    assert_eq!(
                        result.err(),
                        Some(MultipartError::TooLarge {
                            limit: MAX_HEAD_BYTES
                        })
                    );
                }
            }
        }
        // A long preamble without line ends, and an endless stream of header lines.
        let garbage = vec![b'a'; 200_000];
        assert_eq!(
            read(ct, &garbage).err(),
            Some(MultipartError::TooLarge {
                limit: MAX_HEAD_BYTES
            })
        );
        let mut headers = b"--B\r\n".to_vec();
        while headers.len() < 100_000 {
            headers.extend_from_slice(b"X-A: b\r\n");
        }
        assert_eq!(
            read_chunks(ct, split(&headers, &[7, 5000])).err(),
            Some(MultipartError::TooLarge {
                limit: MAX_HEAD_BYTES
            })
        );
    }

    #[test]
    fn a_failing_body_stream_is_an_error() {
        let ct = format!("multipart/mixed; boundary={SYNAPSE_BOUNDARY}");
        let body = synapse_body();
        let results = block_on(async {
            let chunks = vec![
                Ok(Bytes::copy_from_slice(&body[..181])),
                Err("connection reset".to_owned()),
                Ok(Bytes::copy_from_slice(&body[181..])),
            ];
            let (_, mut media) = read_media(&ct, stream(chunks)).await.expect("head");
            let mut results = Vec::new();
            while let Some(item) = media.next().await {
                results.push(item);
            }
            results
        });
        assert_eq!(
            results,
            vec![
                Ok(Bytes::from_static(b"Hello from B")),
                Err(MultipartError::Body("connection reset".to_owned()))
            ]
        );
        let early = block_on(read_media(
            &ct,
            stream(vec![
                Ok(Bytes::copy_from_slice(&body[..50])),
                Err("timed out".to_owned()),
            ]),
        ));
        assert_eq!(
            early.err().map(|e| e.to_string()),
            Some("reading the response body failed: timed out".to_owned())
        );
    }

    #[test]
    fn body_is_passed_on_at_once() {
        // Each chunk's bytes come out before the next chunk is read, less at most a
        // delimiter's length held back.
        let envelope = Envelope::file("text/plain", None).expect("envelope");
        let dlen = 4 + 32;
        let mut body = envelope.head().to_vec();
        body.extend_from_slice(&[b'a'; 1000]);
        body.extend_from_slice(b"\r\n--");
        body.extend_from_slice(&boundary_of(&envelope).as_bytes()[..10]);
        block_on(async {
            let chunks: Vec<Result<Bytes, String>> = vec![Ok(Bytes::from(body))];
            let (_, mut media) = read_media(envelope.content_type(), stream(chunks))
                .await
                .expect("head");
            let first = media.next().await.expect("some").expect("bytes");
            assert_eq!(first.len(), 1000);
            assert!(14 < dlen);
            assert!(matches!(
                media.next().await,
                Some(Err(MultipartError::Truncated(_)))
            ));
            assert!(media.next().await.is_none());
        });
    }

    #[test]
    fn hostile_bodies_are_linear() {
        let envelope = Envelope::file("text/plain", None).expect("envelope");
        let b = boundary_of(&envelope).as_bytes().to_vec();
        let mut near = Vec::new();
        while near.len() < 4 << 20 {
            near.extend_from_slice(b"\r\n--");
            near.extend_from_slice(&b[..b.len() - 1]);
        }
        let crs = vec![b'\r'; 4 << 20];
        let start = std::time::Instant::now();
        for file in [&near, &crs] {
            let body = whole(&envelope, file);
            let cuts: Vec<usize> = (1..body.len()).step_by(b.len() + 3).collect();
            let (_, got) = read_chunks(envelope.content_type(), split(&body, &cuts)).expect("read");
            assert!(got == *file);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        // The head phase with one-byte chunks of a 64 KiB line.
        let mut head = b"--B\r\n\r\n".to_vec();
        head.resize(MAX_HEAD_BYTES - 100, b'{');
        let start = std::time::Instant::now();
        assert!(read_chunks("multipart/mixed; boundary=B", bytewise(&head)).is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn media_body_is_send_and_unpin() {
        fn send_unpin<T: Send + Unpin>() {}
        fn send<T: Send>(_: &T) {}
        send_unpin::<MediaBody<Chunks>>();
        send(&read_media(
            "multipart/mixed; boundary=B",
            stream(Vec::new()),
        ));
    }
}
