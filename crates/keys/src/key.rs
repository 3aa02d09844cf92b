//! Key ids and ed25519 signing keys.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use ed25519_dalek::Signer as _;

/// The only signing algorithm Matrix defines.
pub const ALGORITHM: &str = "ed25519";

/// Characters a key version may use (the spec's key id grammar; Dendrite enforces it).
const VERSION_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_";

/// Length of the version of a generated key id: `ed25519:` + 6 characters, as MMR makes them.
const GENERATED_VERSION_LEN: usize = 6;

/// A key id, `ed25519:<version>`, whose version matches `[a-zA-Z0-9_]+`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    version: String,
}

/// Why a key id or version was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyIdError {
    /// The algorithm before the colon is not `ed25519`.
    #[error("unsupported algorithm `{0}` (only `ed25519` keys exist in Matrix)")]
    UnsupportedAlgorithm(String),
    /// No `algorithm:` prefix.
    #[error("`{0}` is not a key id: expected `ed25519:<version>`")]
    NotAKeyId(String),
    /// The version is empty or has characters outside `[a-zA-Z0-9_]`.
    #[error(
        "key version `{0}` must be one or more of the characters a-z, A-Z, 0-9 and _ \
         (the Matrix key id grammar, which Dendrite enforces)"
    )]
    BadVersion(String),
}

impl KeyId {
    /// The key id `ed25519:<version>`.
    pub fn from_version(version: &str) -> Result<Self, KeyIdError> {
        if version.is_empty() || !version.bytes().all(|b| VERSION_CHARS.contains(&b)) {
            return Err(KeyIdError::BadVersion(version.to_owned()));
        }
        Ok(Self {
            version: version.to_owned(),
        })
    }

    /// A fresh key id: `ed25519:` and 6 random characters from `[a-zA-Z0-9_]`.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut version = String::with_capacity(GENERATED_VERSION_LEN);
        let mut bytes = [0u8; 16];
        while version.len() < GENERATED_VERSION_LEN {
            getrandom::fill(&mut bytes)?;
            // Rejection sampling keeps every character equally likely.
            let limit = 256 - 256 % VERSION_CHARS.len();
            for &b in &bytes {
                if usize::from(b) < limit && version.len() < GENERATED_VERSION_LEN {
                    version.push(char::from(
                        VERSION_CHARS[usize::from(b) % VERSION_CHARS.len()],
                    ));
                }
            }
        }
        Ok(Self { version })
    }

    /// The part after `ed25519:`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Always `ed25519`.
    pub fn algorithm(&self) -> &'static str {
        ALGORITHM
    }
}

impl FromStr for KeyId {
    type Err = KeyIdError;

    /// Parses `ed25519:<version>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, version)) = s.split_once(':') else {
            return Err(KeyIdError::NotAKeyId(s.to_owned()));
        };
        if algorithm != ALGORITHM {
            return Err(KeyIdError::UnsupportedAlgorithm(algorithm.to_owned()));
        }
        Self::from_version(version)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.version)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// An ed25519 signing key with its key id. Two keys are equal when both the id and the secret are.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    id: KeyId,
    secret: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A fresh key from the operating system's random number generator, with a random key id.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        let key = Self::from_seed(KeyId::random()?, &seed);
        seed.fill(0);
        Ok(key)
    }

    /// The key whose 32-byte seed (what every key file stores) is `seed`.
    pub fn from_seed(id: KeyId, seed: &[u8; 32]) -> Self {
        Self {
            id,
            secret: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The same secret under another key id.
    pub fn with_id(&self, id: KeyId) -> Self {
        Self {
            id,
            secret: self.secret.clone(),
        }
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The public key.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.secret.verifying_key()
    }

    /// The public key in unpadded base64, as `/_matrix/key/v2/server` publishes it.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.verifying_key().as_bytes())
    }

    /// The public key in padded base64 (Dendrite's `old_private_keys[].public_key` examples use it).
    pub fn public_key_base64_padded(&self) -> String {
        STANDARD.encode(self.verifying_key().as_bytes())
    }

    /// The 32-byte seed: the secret itself. Handle with care.
    pub fn seed(&self) -> &[u8; 32] {
        self.secret.as_bytes()
    }

    /// Whether `other` holds the same secret (whatever its key id).
    pub fn same_secret(&self, other: &Self) -> bool {
        self.secret == other.secret
    }

    /// The ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        self.secret.sign(message)
    }

    /// The underlying ed25519-dalek key.
    pub fn as_dalek(&self) -> &ed25519_dalek::SigningKey {
        &self.secret
    }
}

impl fmt::Debug for SigningKey {
    /// Shows the id and the public key, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("public_key", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_parse_and_print() {
        let id: KeyId = "ed25519:a_AbCd".parse().unwrap();
        assert_eq!(id.version(), "a_AbCd");
        assert_eq!(id.to_string(), "ed25519:a_AbCd");
        assert_eq!(
            "curve25519:x".parse::<KeyId>(),
            Err(KeyIdError::UnsupportedAlgorithm("curve25519".to_owned()))
        );
        assert_eq!(
            "abc".parse::<KeyId>(),
            Err(KeyIdError::NotAKeyId("abc".to_owned()))
        );
        assert_eq!(
            "ed25519:a-b".parse::<KeyId>(),
            Err(KeyIdError::BadVersion("a-b".to_owned()))
        );
        assert_eq!(
            "ed25519:".parse::<KeyId>(),
            Err(KeyIdError::BadVersion(String::new()))
        );
    }

    #[test]
    fn random_key_ids_have_six_valid_characters_and_differ() {
        let ids: Vec<KeyId> = (0..50).map(|_| KeyId::random().unwrap()).collect();
        for id in &ids {
            assert_eq!(id.version().len(), 6, "{id}");
            assert!(KeyId::from_version(id.version()).is_ok(), "{id}");
        }
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert!(distinct.len() > 45, "random ids repeat: {ids:?}");
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_the_secret() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        assert!(!a.same_secret(&b));
        let debug = format!("{a:?}");
        assert!(debug.contains(&a.public_key_base64()), "{debug}");
        assert!(
            !debug.contains(&STANDARD_NO_PAD.encode(a.seed())),
            "{debug}"
        );
        assert_eq!(a.public_key_base64().len(), 43);
        assert_eq!(a.public_key_base64_padded().len(), 44);
    }
}
