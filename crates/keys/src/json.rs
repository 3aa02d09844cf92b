//! Canonical JSON and signed JSON (Matrix spec, appendices "Signing JSON").

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde_json::{Map, Value};

use crate::key::{KeyId, SigningKey};

/// Integers beyond ±(2^53 - 1) are not canonical JSON.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// A value that has no canonical JSON form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalJsonError {
    #[error("canonical JSON allows integers only; found {0}")]
    NotAnInteger(String),
    #[error("canonical JSON allows integers in ±(2^53 - 1) only; found {0}")]
    OutOfRange(String),
}

/// Why signing or verifying signed JSON failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("only JSON objects can be signed")]
    NotAnObject,
    #[error(transparent)]
    Canonical(#[from] CanonicalJsonError),
    #[error("`signatures` must be an object of objects")]
    BadSignaturesField,
    #[error("no signature by {entity} with key {key_id}")]
    Missing { entity: String, key_id: String },
    #[error("the signature by {entity} with key {key_id} is not valid unpadded base64 of 64 bytes")]
    Malformed { entity: String, key_id: String },
    #[error("the signature by {entity} with key {key_id} does not match the content")]
    Invalid { entity: String, key_id: String },
    #[error("`{0}` cannot be used in an X-Matrix header (it holds a quote, backslash or space)")]
    BadHeaderValue(String),
}

/// The canonical JSON encoding of `value`: object keys sorted by code point, no insignificant
/// whitespace, UTF-8 as is (only `"`, `\` and control characters escaped), integers only.
pub fn canonical_json(value: &Value) -> Result<String, CanonicalJsonError> {
    let mut out = String::new();
    write_value(&mut out, value)?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value) -> Result<(), CanonicalJsonError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let int = n
                .as_i64()
                .or_else(|| n.as_u64().and_then(|u| i64::try_from(u).ok()));
            match int {
                Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => {
                    out.push_str(&i.to_string());
                }
                Some(_) => return Err(CanonicalJsonError::OutOfRange(n.to_string())),
                None if n.is_f64() => return Err(CanonicalJsonError::NotAnInteger(n.to_string())),
                None => return Err(CanonicalJsonError::OutOfRange(n.to_string())),
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // The workspace's serde_json keeps insertion order: sort explicitly. `str`'s order is
            // byte order, which for UTF-8 is code point order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, item)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The bytes a signature covers: `value` without `signatures` and `unsigned`, canonically encoded.
fn signed_bytes(object: &Map<String, Value>) -> Result<String, CanonicalJsonError> {
    let mut stripped = object.clone();
    stripped.remove("signatures");
    stripped.remove("unsigned");
    canonical_json(&Value::Object(stripped))
}

/// The signature of `value` (an object) by `key`, in unpadded base64, without adding it.
pub fn signature(value: &Value, key: &SigningKey) -> Result<String, SignatureError> {
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let bytes = signed_bytes(object)?;
    Ok(STANDARD_NO_PAD.encode(key.sign(bytes.as_bytes()).to_bytes()))
}

/// Signs `value` (an object) as `entity` (a server name) with `key`: adds
/// `signatures.<entity>.<key id>`, keeping any other signatures.
pub fn sign_json(value: &mut Value, entity: &str, key: &SigningKey) -> Result<(), SignatureError> {
    let sig = signature(value, key)?;
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let signatures = object
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(signatures) = signatures else {
        return Err(SignatureError::BadSignaturesField);
    };
    let by_entity = signatures
        .entry(entity)
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(by_entity) = by_entity else {
        return Err(SignatureError::BadSignaturesField);
    };
    by_entity.insert(key.id().to_string(), Value::String(sig));
    Ok(())
}

/// Checks the signature `signatures.<entity>.<key_id>` of `value` against `public_key`.
pub fn verify_json(
    value: &Value,
    entity: &str,
    key_id: &KeyId,
    public_key: &ed25519_dalek::VerifyingKey,
) -> Result<(), SignatureError> {
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let key_id = key_id.to_string();
    let missing = || SignatureError::Missing {
        entity: entity.to_owned(),
        key_id: key_id.clone(),
    };
    let sig = match object.get("signatures") {
        None => return Err(missing()),
        Some(Value::Object(signatures)) => match signatures.get(entity) {
            None => return Err(missing()),
            Some(Value::Object(by_entity)) => match by_entity.get(&key_id) {
                None => return Err(missing()),
                Some(Value::String(sig)) => sig,
                Some(_) => return Err(SignatureError::BadSignaturesField),
            },
            Some(_) => return Err(SignatureError::BadSignaturesField),
        },
        Some(_) => return Err(SignatureError::BadSignaturesField),
    };
    let malformed = || SignatureError::Malformed {
        entity: entity.to_owned(),
        key_id: key_id.clone(),
    };
    let raw = STANDARD_NO_PAD
        .decode(sig.trim_end_matches('='))
        .map_err(|_| malformed())?;
    let raw = <[u8; 64]>::try_from(raw.as_slice()).map_err(|_| malformed())?;
    let bytes = signed_bytes(object)?;
    public_key
        .verify_strict(
            bytes.as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&raw),
        )
        .map_err(|_| SignatureError::Invalid {
            entity: entity.to_owned(),
            key_id,
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec_key() -> SigningKey {
        let seed: [u8; 32] = STANDARD_NO_PAD
            .decode("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA0")
            .unwrap()
            .try_into()
            .unwrap();
        SigningKey::from_seed(KeyId::from_version("1").unwrap(), &seed)
    }

    #[test]
    fn canonical_json_as_the_spec_shows() {
        // The spec's examples (appendices, canonical JSON).
        let cases = [
            (json!({}), "{}"),
            (json!({"one": 1, "two": "Two"}), r#"{"one":1,"two":"Two"}"#),
            (json!({"b": "2", "a": "1"}), r#"{"a":"1","b":"2"}"#),
            (
                json!({"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}}),
                r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#,
            ),
            (json!({"a": "日本語"}), r#"{"a":"日本語"}"#),
            (json!({"本": 2, "日": 1}), r#"{"日":1,"本":2}"#),
            (json!({"a": "\u{65e5}"}), "{\"a\":\"日\"}"),
            (json!({"a": null}), r#"{"a":null}"#),
            (
                json!({"a": "\"\\\u{8}\t\n\u{c}\r\u{1}\u{1f}\u{7f}/"}),
                "{\"a\":\"\\\"\\\\\\b\\t\\n\\f\\r\\u0001\\u001f\u{7f}/\"}",
            ),
            (
                json!({"n": [-9007199254740991_i64, 9007199254740991_i64, 0]}),
                r#"{"n":[-9007199254740991,9007199254740991,0]}"#,
            ),
        ];
        for (value, want) in cases {
            assert_eq!(canonical_json(&value).unwrap(), want);
        }
        assert_eq!(
            canonical_json(&json!({"a": 1.5})),
            Err(CanonicalJsonError::NotAnInteger("1.5".to_owned()))
        );
        assert!(matches!(
            canonical_json(&json!([9007199254740992_i64])),
            Err(CanonicalJsonError::OutOfRange(_))
        ));
        assert!(matches!(
            canonical_json(&json!([u64::MAX])),
            Err(CanonicalJsonError::OutOfRange(_))
        ));
    }

    #[test]
    fn signs_the_spec_test_vectors() {
        let key = spec_key();
        let mut empty = json!({});
        sign_json(&mut empty, "domain", &key).unwrap();
        assert_eq!(
            empty,
            json!({"signatures": {"domain": {"ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}})
        );
        let mut two = json!({"two": "Two", "one": 1});
        sign_json(&mut two, "domain", &key).unwrap();
        assert_eq!(
            two["signatures"]["domain"]["ed25519:1"],
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        );
        verify_json(&two, "domain", key.id(), &key.verifying_key()).unwrap();
    }

    #[test]
    fn verification_fails_on_changes_and_keeps_other_signatures() {
        let key = spec_key();
        let other = SigningKey::generate().unwrap();
        let mut value = json!({"a": 1, "unsigned": {"age": 5}});
        sign_json(&mut value, "domain", &key).unwrap();
        sign_json(&mut value, "other", &other).unwrap();
        // `unsigned` is not covered.
        value["unsigned"] = json!({"age": 6});
        verify_json(&value, "domain", key.id(), &key.verifying_key()).unwrap();
        verify_json(&value, "other", other.id(), &other.verifying_key()).unwrap();

        let mut changed = value.clone();
        changed["a"] = json!(2);
        assert!(matches!(
            verify_json(&changed, "domain", key.id(), &key.verifying_key()),
            Err(SignatureError::Invalid { .. })
        ));
        assert!(matches!(
            verify_json(&value, "domain", key.id(), &other.verifying_key()),
            Err(SignatureError::Invalid { .. })
        ));
        assert!(matches!(
            verify_json(&value, "nobody", key.id(), &key.verifying_key()),
            Err(SignatureError::Missing { .. })
        ));
        let mut garbled = value.clone();
        garbled["signatures"]["domain"]["ed25519:1"] = json!("AAAA");
        assert!(matches!(
            verify_json(&garbled, "domain", key.id(), &key.verifying_key()),
            Err(SignatureError::Malformed { .. })
        ));
        assert_eq!(
            sign_json(&mut json!([1]), "d", &key),
            Err(SignatureError::NotAnObject)
        );
    }
}
