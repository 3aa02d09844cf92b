//! What `mmrctl keys` does to key files: generate, convert, merge, revoke.
//!
//! Every write is crash-safe (see [`crate::Step`]) and every operation converges: running it again
//! after a stop at any point ends in the same files as an uninterrupted run, and running it again
//! after success changes nothing.

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::fsio::{self, Checkpoint, Meta};
use crate::{Error, KeyFile, KeyFormat, KeyId, SigningKey};

/// The homeserver whose key file is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Homeserver {
    Synapse,
    Dendrite,
}

impl Homeserver {
    /// The format of its key file.
    pub fn key_format(self) -> KeyFormat {
        match self {
            Self::Synapse => KeyFormat::Synapse,
            Self::Dendrite => KeyFormat::Dendrite,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Synapse => "synapse",
            Self::Dendrite => "dendrite",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Synapse => "Synapse",
            Self::Dendrite => "Dendrite",
        }
    }
}

impl fmt::Display for Homeserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

impl FromStr for Homeserver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "synapse" => Ok(Self::Synapse),
            "dendrite" => Ok(Self::Dendrite),
            other => Err(format!(
                "unknown homeserver `{other}` (expected synapse or dendrite)"
            )),
        }
    }
}

/// What an operation did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    /// Whether any file changed.
    pub changed: bool,
    /// Files written (key files), in order.
    pub written: Vec<PathBuf>,
    /// Backups written by this run (never overwritten once they exist).
    pub backups: Vec<PathBuf>,
    /// What was done or found, one sentence each.
    pub notes: Vec<String>,
    /// Keys taken out of the homeserver's file: the homeserver's config should list them so that
    /// their old signatures still verify (see [`old_keys_config`]).
    pub old_keys: Vec<OldKey>,
}

/// A key removed from a homeserver's key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldKey {
    pub id: KeyId,
    public_key: ed25519_dalek::VerifyingKey,
    /// When it stopped being used, in milliseconds since the epoch.
    pub expired_ts: u64,
}

impl OldKey {
    pub fn new(key: &SigningKey, expired_ts: u64) -> Self {
        Self {
            id: key.id().clone(),
            public_key: key.verifying_key(),
            expired_ts,
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &ed25519_dalek::VerifyingKey {
        &self.public_key
    }

    /// Unpadded base64, as Synapse's `old_signing_keys` and `/_matrix/key/v2/server` give it.
    pub fn public_key_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.public_key.as_bytes())
    }

    /// Padded base64, as Dendrite's sample config gives `old_private_keys[].public_key`.
    pub fn public_key_base64_padded(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.public_key.as_bytes())
    }
}

/// The homeserver config (YAML) that keeps `keys` published as old keys: Synapse's
/// `old_signing_keys` (for `homeserver.yaml`) or Dendrite's `global.old_private_keys` (for
/// `dendrite.yaml`). Merge it into an existing section rather than adding a second one.
pub fn old_keys_config(homeserver: Homeserver, keys: &[OldKey]) -> String {
    let mut out = String::new();
    match homeserver {
        Homeserver::Synapse => {
            out.push_str("old_signing_keys:\n");
            for k in keys {
                out.push_str(&format!(
                    "  \"{}\":\n    key: \"{}\"\n    expired_ts: {}\n",
                    k.id,
                    k.public_key_base64(),
                    k.expired_ts
                ));
            }
        }
        Homeserver::Dendrite => {
            out.push_str("global:\n  old_private_keys:\n");
            for k in keys {
                out.push_str(&format!(
                    "    - public_key: \"{}\"\n      key_id: \"{}\"\n      expired_at: {}\n",
                    k.public_key_base64_padded(),
                    k.id,
                    k.expired_ts
                ));
            }
        }
    }
    out
}

/// A checkpoint that never stops: what every real run uses.
fn proceed() -> impl FnMut(&crate::Step) -> ControlFlow<()> {
    |_| ControlFlow::Continue(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Removes temp files that a stopped run left beside `path` and its backup.
fn clean_stale(path: &Path) -> Result<(), Error> {
    fsio::remove_stale_temp(path)?;
    fsio::remove_stale_temp(&fsio::backup_path(path))
}

/// Reads and parses a key file; `hint` says what to do when it is missing.
fn read_key_file(path: &Path, hint: &str) -> Result<(KeyFile, String, Meta), Error> {
    let Some((text, meta)) = fsio::read_optional(path)? else {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            hint: hint.to_owned(),
        });
    };
    let file = KeyFile::parse(&text, &display(path))?;
    Ok((file, text, meta))
}

fn read_homeserver_key(
    path: &Path,
    homeserver: Homeserver,
) -> Result<(KeyFile, String, Meta), Error> {
    let hint = match homeserver {
        Homeserver::Synapse => {
            "Synapse creates its key file (`signing_key_path`) when it first starts: start it \
             once, or give the right path"
        }
        Homeserver::Dendrite => {
            "Dendrite's key file is its `global.private_key` (made with `generate-keys \
             --private-key`): give the right path"
        }
    };
    let read = read_key_file(path, hint)?;
    if read.0.format() != homeserver.key_format() {
        return Err(Error::WrongFormat {
            path: path.to_path_buf(),
            found: read.0.format(),
            homeserver,
        });
    }
    Ok(read)
}

fn read_media_repo_key(path: &Path) -> Result<SigningKey, Error> {
    let hint = format!(
        "Generate the media repo's key first: `mmrctl keys generate --out {}`",
        path.display()
    );
    let (file, _, _) = read_key_file(path, &hint)?;
    match file.keys() {
        [key] => Ok(key.clone()),
        keys => Err(Error::NotOneKey {
            path: path.to_path_buf(),
            count: keys.len(),
        }),
    }
}

/// `mmrctl keys generate`.
#[derive(Debug, Clone)]
pub struct Generate<'a> {
    pub out: &'a Path,
    pub format: KeyFormat,
    /// Replace an existing file (keeping its owner, group and mode).
    pub force: bool,
    /// Leave an existing (valid) key file as it is and report its key.
    pub if_missing: bool,
}

/// The key `generate` made or found.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: KeyId,
    pub public_key: String,
    /// False when `if_missing` found the file there.
    pub created: bool,
}

/// Writes a fresh key from the OS RNG to `out` (mode 0600), never over an existing file unless
/// `force`.
pub fn generate(opts: &Generate<'_>) -> Result<Generated, Error> {
    let out = fsio::resolve(opts.out);
    fsio::remove_stale_temp(&out)?;
    let existing = fsio::read_optional(&out)?;
    if let Some((text, _)) = &existing
        && opts.if_missing
    {
        let file = KeyFile::parse(text, &display(&out))?;
        let first = file.keys()[0].clone();
        return Ok(Generated {
            public_key: first.public_key_base64(),
            id: first.id().clone(),
            created: false,
        });
    }
    let key = SigningKey::generate().map_err(Error::Random)?;
    let text = KeyFile::new(opts.format, vec![key.clone()]).to_text(opts.format);
    match existing {
        Some((_, meta)) if opts.force => {
            fsio::replace(&out, text.as_bytes(), meta, &mut proceed())?
        }
        Some(_) => return Err(Error::Exists { path: out }),
        None => fsio::create_new(&out, text.as_bytes(), 0o600, &mut proceed())?,
    }
    Ok(Generated {
        public_key: key.public_key_base64(),
        id: key.id().clone(),
        created: true,
    })
}

/// `mmrctl keys convert`.
#[derive(Debug, Clone)]
pub struct Convert<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    pub format: KeyFormat,
    /// Only this key (else all, in order).
    pub key_id: Option<&'a KeyId>,
    pub force: bool,
}

/// Writes the keys of `input` to `output` in `format` (mode 0600 when new). An `output` that
/// already holds exactly that is left alone; another existing file needs `force`.
pub fn convert(opts: &Convert<'_>) -> Result<Report, Error> {
    let (input, _, _) = read_key_file(opts.input, "Give an existing key file.")?;
    let keys = match opts.key_id {
        Some(id) => match input.get(id) {
            Some(key) => vec![key.clone()],
            None => {
                return Err(Error::KeyNotFound {
                    path: opts.input.to_path_buf(),
                    id: id.clone(),
                    present: input.keys().iter().map(|k| k.id().clone()).collect(),
                });
            }
        },
        None => input.keys().to_vec(),
    };
    let desired = KeyFile::new(opts.format, keys);
    let text = desired.to_text(opts.format);
    let out = fsio::resolve(opts.output);
    fsio::remove_stale_temp(&out)?;
    let mut report = Report::default();
    let ids = || {
        desired
            .keys()
            .iter()
            .map(|k| k.id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match fsio::read_optional(&out)? {
        Some((current, meta)) => {
            let same = KeyFile::parse(&current, &display(&out))
                .is_ok_and(|f| f.format() == opts.format && f.same_keys(&desired));
            if same {
                report.notes.push(format!(
                    "{} already holds {} in the {} format: nothing changed",
                    out.display(),
                    ids(),
                    opts.format
                ));
                return Ok(report);
            }
            if !opts.force {
                return Err(Error::Exists { path: out });
            }
            fsio::replace(&out, text.as_bytes(), meta, &mut proceed())?;
        }
        None => fsio::create_new(&out, text.as_bytes(), 0o600, &mut proceed())?,
    }
    report.changed = true;
    report.notes.push(format!(
        "wrote {} to {} in the {} format",
        ids(),
        out.display(),
        opts.format
    ));
    report.written.push(out);
    Ok(report)
}

/// `mmrctl keys merge`.
#[derive(Debug, Clone)]
pub struct Merge<'a> {
    pub homeserver: Homeserver,
    /// The homeserver's key file (Synapse's `signing_key_path`, Dendrite's `private_key`).
    pub homeserver_key: &'a Path,
    /// The media repo's key file (its `signingKeyPath`).
    pub media_repo_key: &'a Path,
    /// Synapse: a key of the homeserver's file to take out while adding the media repo's (an
    /// earlier media repo key).
    pub replace_key_id: Option<&'a KeyId>,
    /// Now, in milliseconds since the epoch (the `expired_ts` of a replaced key).
    pub now_ms: u64,
}

/// Makes the homeserver publish the key the media repo signs with.
///
/// - Synapse: adds the media repo's key to Synapse's key file, after the homeserver's own (which
///   keeps signing). Synapse publishes every key of the file.
/// - Dendrite: Dendrite publishes only the first key of its file, so a merged second key would
///   never be published. Instead the media repo signs with the homeserver's own key: it is
///   written, in the MMR format, to the media repo's key file (whose previous content is backed
///   up); Dendrite's file is not changed.
pub fn merge(opts: &Merge<'_>) -> Result<Report, Error> {
    merge_with(opts, &mut proceed())
}

/// [`merge`], calling `checkpoint` at each step of each write (crash tests stop there).
pub fn merge_with(opts: &Merge<'_>, checkpoint: Checkpoint<'_>) -> Result<Report, Error> {
    match opts.homeserver {
        Homeserver::Synapse => merge_synapse(opts, checkpoint),
        Homeserver::Dendrite => merge_dendrite(opts, checkpoint),
    }
}

fn merge_synapse(opts: &Merge<'_>, checkpoint: Checkpoint<'_>) -> Result<Report, Error> {
    let path = fsio::resolve(opts.homeserver_key);
    clean_stale(&path)?;
    let (current, text, meta) = read_homeserver_key(&path, Homeserver::Synapse)?;
    let media = read_media_repo_key(opts.media_repo_key)?;
    let media_id = media.id().clone();
    let own = current.keys()[0].clone();
    let mut report = Report::default();

    let same_id_error = |line: Option<usize>| Error::SameIdDifferentKey {
        path: path.clone(),
        line: line.unwrap_or(0),
        id: media_id.clone(),
        media_repo_key: opts.media_repo_key.to_path_buf(),
    };
    if media.id() == own.id() {
        if !media.same_secret(&own) {
            return Err(same_id_error(current.line_of(0)));
        }
        report.notes.push(format!(
            "the media repo's key {media_id} is the homeserver's own key (the first in {}), which \
             Synapse already publishes: nothing to merge",
            path.display()
        ));
        return Ok(report);
    }

    let mut desired = current.clone();
    if let Some(replace) = opts.replace_key_id {
        match desired.position(replace) {
            Some(0) => {
                return Err(Error::FirstKey {
                    path,
                    line: current.line_of(0).unwrap_or(0),
                    id: replace.clone(),
                });
            }
            Some(i) => {
                let old = desired.remove(i);
                if old != media {
                    report.notes.push(format!(
                        "taking {replace} out of {} (replaced by the media repo's key)",
                        path.display()
                    ));
                    report.old_keys.push(OldKey::new(&old, opts.now_ms));
                }
            }
            None => report.notes.push(format!(
                "{replace} is not in {} (already replaced?): nothing to take out",
                path.display()
            )),
        }
    }
    match desired.position(&media_id) {
        Some(i) if desired.keys()[i].same_secret(&media) => {}
        Some(_) => {
            return Err(same_id_error(
                current.position(&media_id).and_then(|i| current.line_of(i)),
            ));
        }
        None => {
            let others: Vec<KeyId> = desired.keys()[1..].iter().map(|k| k.id().clone()).collect();
            if !others.is_empty() {
                return Err(Error::OtherKeys {
                    path,
                    homeserver_key_id: own.id().clone(),
                    others,
                    media_key_id: media_id,
                    media_repo_key: opts.media_repo_key.to_path_buf(),
                });
            }
            desired.push(media.clone());
        }
    }
    let others: Vec<String> = desired.keys()[1..]
        .iter()
        .filter(|k| k.id() != &media_id)
        .map(|k| k.id().to_string())
        .collect();
    if !others.is_empty() {
        report.notes.push(format!(
            "{} also holds {}, neither the homeserver's key nor the media repo's; left as it is",
            path.display(),
            others.join(", ")
        ));
    }

    if desired.same_keys(&current) {
        report.notes.insert(
            0,
            format!(
                "{} already holds the media repo's key {media_id} after the homeserver's own key \
                 {}: nothing changed",
                path.display(),
                own.id()
            ),
        );
        return Ok(report);
    }

    if let Some(backup) = fsio::backup_once(&path, text.as_bytes(), meta, checkpoint)? {
        report.backups.push(backup);
    }
    fsio::replace(
        &path,
        desired.to_text(KeyFormat::Synapse).as_bytes(),
        meta,
        checkpoint,
    )?;
    report.changed = true;
    report.notes.insert(
        0,
        format!(
            "added the media repo's key {media_id} to {}, after the homeserver's own key {} (which \
             keeps signing events and requests); {} keeps the file as it was before mmrctl first changed it. Restart Synapse so \
             that it publishes the new key",
            path.display(),
            own.id(),
            fsio::backup_path(&path).display()
        ),
    );
    report.written.push(path);
    Ok(report)
}

fn merge_dendrite(opts: &Merge<'_>, checkpoint: Checkpoint<'_>) -> Result<Report, Error> {
    if let Some(id) = opts.replace_key_id {
        return Err(Error::Usage(format!(
            "--replace-key-id {id}: Dendrite's key file is never changed by merge (the media repo \
             signs with the homeserver's own key); to remove a key from it, use `mmrctl keys \
             revoke --homeserver dendrite`"
        )));
    }
    let hs_path = fsio::resolve(opts.homeserver_key);
    let (hs, _, _) = read_homeserver_key(&hs_path, Homeserver::Dendrite)?;
    let own = hs.keys()[0].clone();
    let path = fsio::resolve(opts.media_repo_key);
    clean_stale(&path)?;
    let desired = KeyFile::new(KeyFormat::Mmr, vec![own.clone()]);
    let text = desired.to_text(KeyFormat::Mmr);
    let mut report = Report::default();

    match fsio::read_optional(&path)? {
        None => {
            fsio::create_new(&path, text.as_bytes(), 0o600, checkpoint)?;
            report.changed = true;
        }
        Some((current_text, meta)) => {
            let current = KeyFile::parse(&current_text, &display(&path))?;
            if current.format() == KeyFormat::Mmr && current.same_keys(&desired) {
                report.notes.push(format!(
                    "{} already holds Dendrite's key {} in the MMR format: nothing changed",
                    path.display(),
                    own.id()
                ));
            } else {
                if let Some(backup) =
                    fsio::backup_once(&path, current_text.as_bytes(), meta, checkpoint)?
                {
                    report.backups.push(backup);
                }
                fsio::replace(&path, text.as_bytes(), meta, checkpoint)?;
                report.changed = true;
            }
        }
    }
    if report.changed {
        let backup = fsio::backup_path(&path);
        let kept = if backup.exists() {
            format!("; its previous key is kept in {}", backup.display())
        } else {
            String::new()
        };
        report.notes.push(format!(
            "Dendrite publishes only the first key of its key file, so a merged second key would \
             never be verifiable by other servers. Instead the media repo now signs with \
             Dendrite's own key {}: wrote it, in the MMR format, to {}{kept}. {} was not changed",
            own.id(),
            path.display(),
            hs_path.display()
        ));
        report.written.push(path.clone());
    }
    report.notes.push(format!(
        "{} now holds the homeserver's identity: keep it as secret as Dendrite's own key file. If \
         Dendrite's key is ever rotated, run this merge again",
        path.display()
    ));
    if hs.keys().len() > 1 {
        let ignored: Vec<String> = hs.keys()[1..].iter().map(|k| k.id().to_string()).collect();
        report.notes.push(format!(
            "{} also holds {} after its first key; Dendrite ignores them (they are not published). \
             Remove them with `mmrctl keys revoke --homeserver dendrite --key-id <id>` if an earlier \
             merge added them",
            hs_path.display(),
            ignored.join(", ")
        ));
    }
    Ok(report)
}

/// `mmrctl keys revoke`.
#[derive(Debug, Clone)]
pub struct Revoke<'a> {
    pub homeserver: Homeserver,
    pub homeserver_key: &'a Path,
    pub key_id: &'a KeyId,
    /// Now, in milliseconds since the epoch: the key's `expired_ts`.
    pub now_ms: u64,
}

/// Removes a key (never the first, the homeserver's own) from the homeserver's key file, after a
/// backup. The report's `old_keys` holds it, for [`old_keys_config`]. A key already removed (by an
/// earlier run) is found in the backup and reported again, unchanged.
pub fn revoke(opts: &Revoke<'_>) -> Result<Report, Error> {
    revoke_with(opts, &mut proceed())
}

/// [`revoke`], calling `checkpoint` at each step of each write.
pub fn revoke_with(opts: &Revoke<'_>, checkpoint: Checkpoint<'_>) -> Result<Report, Error> {
    let path = fsio::resolve(opts.homeserver_key);
    clean_stale(&path)?;
    let (current, text, meta) = read_homeserver_key(&path, opts.homeserver)?;
    let mut report = Report::default();
    match current.position(opts.key_id) {
        Some(0) => Err(Error::FirstKey {
            path,
            line: current.line_of(0).unwrap_or(0),
            id: opts.key_id.clone(),
        }),
        Some(i) => {
            let mut desired = current.clone();
            let old = desired.remove(i);
            if let Some(backup) = fsio::backup_once(&path, text.as_bytes(), meta, checkpoint)? {
                report.backups.push(backup);
            }
            fsio::replace(
                &path,
                desired.to_text(opts.homeserver.key_format()).as_bytes(),
                meta,
                checkpoint,
            )?;
            report.changed = true;
            report.notes.push(format!(
                "removed {} from {}; {} keeps the file as it was before mmrctl first changed it",
                opts.key_id,
                path.display(),
                fsio::backup_path(&path).display()
            ));
            report.old_keys.push(OldKey::new(&old, opts.now_ms));
            report.written.push(path);
            Ok(report)
        }
        None => {
            let backup = fsio::backup_path(&path);
            let from_backup = fsio::read_optional(&backup)?
                .and_then(|(t, _)| KeyFile::parse(&t, &display(&backup)).ok())
                .and_then(|f| f.get(opts.key_id).cloned());
            match from_backup {
                Some(old) => {
                    report.notes.push(format!(
                        "{} is no longer in {} (already revoked): nothing changed; its public key \
                         comes from {}",
                        opts.key_id,
                        path.display(),
                        backup.display()
                    ));
                    report.old_keys.push(OldKey::new(&old, opts.now_ms));
                    Ok(report)
                }
                None => Err(Error::KeyNotFound {
                    path,
                    id: opts.key_id.clone(),
                    present: current.keys().iter().map(|k| k.id().clone()).collect(),
                }),
            }
        }
    }
}

/// Reads any key file (for `mmrctl keys list`).
pub fn read(path: &Path) -> Result<KeyFile, Error> {
    read_key_file(path, "Give an existing key file.").map(|(file, _, _)| file)
}
