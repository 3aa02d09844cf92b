//! X-Matrix request authentication (server-server API, "Request Authentication").

use serde_json::{Map, Value};

use crate::json::{SignatureError, signature};
use crate::key::SigningKey;

/// The JSON object a federation request's signature covers: `method`, `uri` (path and query, as
/// sent), `origin`, `destination`, and `content` only when the request has a body.
pub fn request_json(
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
) -> Value {
    let mut object = Map::new();
    object.insert("method".to_owned(), Value::String(method.to_owned()));
    object.insert("uri".to_owned(), Value::String(uri.to_owned()));
    object.insert("origin".to_owned(), Value::String(origin.to_owned()));
    object.insert(
        "destination".to_owned(),
        Value::String(destination.to_owned()),
    );
    if let Some(content) = content {
        object.insert("content".to_owned(), content.clone());
    }
    Value::Object(object)
}

/// The `Authorization` header value for a federation request from `origin` to `destination`,
/// signed with `key`:
/// `X-Matrix origin="…",destination="…",key="ed25519:…",sig="…"`.
///
/// `uri` is the path with its query string (`/_matrix/federation/v1/media/download/abc`), exactly
/// as sent; `content` is the parsed JSON body, `None` for a request without one (media downloads).
pub fn sign_request(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
) -> Result<String, SignatureError> {
    for value in [origin, destination] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_whitespace() || c == ',')
        {
            return Err(SignatureError::BadHeaderValue(value.to_owned()));
        }
    }
    let sig = signature(
        &request_json(origin, destination, method, uri, content),
        key,
    )?;
    Ok(format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"",
        key.id()
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::json::verify_json;

    #[test]
    fn header_carries_a_signature_over_the_request() {
        let key = SigningKey::generate().unwrap();
        let uri = "/_matrix/federation/v1/media/download/abc?x=1";
        let header =
            sign_request(&key, "hs.example", "remote.example:8448", "GET", uri, None).unwrap();
        let prefix = format!(
            "X-Matrix origin=\"hs.example\",destination=\"remote.example:8448\",key=\"{}\",sig=\"",
            key.id()
        );
        assert!(header.starts_with(&prefix), "{header}");
        let sig = header[prefix.len()..].trim_end_matches('"');
        assert_eq!(sig.len(), 86);

        let mut signed = request_json("hs.example", "remote.example:8448", "GET", uri, None);
        assert!(signed.get("content").is_none());
        signed["signatures"] = json!({"hs.example": {key.id().to_string(): sig}});
        verify_json(&signed, "hs.example", key.id(), &key.verifying_key()).unwrap();
    }

    #[test]
    fn content_is_signed_when_given() {
        let key = SigningKey::generate().unwrap();
        let content = json!({"b": [1, 2], "a": "x"});
        let header = sign_request(&key, "o", "d", "POST", "/p", Some(&content)).unwrap();
        let sig = header
            .rsplit("sig=\"")
            .next()
            .unwrap()
            .trim_end_matches('"');
        let mut signed = request_json("o", "d", "POST", "/p", Some(&content));
        signed["signatures"] = json!({"o": {key.id().to_string(): sig}});
        verify_json(&signed, "o", key.id(), &key.verifying_key()).unwrap();
        signed["content"]["a"] = json!("y");
        assert!(verify_json(&signed, "o", key.id(), &key.verifying_key()).is_err());
    }

    #[test]
    fn refuses_values_that_would_break_the_header() {
        let key = SigningKey::generate().unwrap();
        for bad in ["", "a\"b", "a b", "a,b", "a\\b"] {
            assert_eq!(
                sign_request(&key, bad, "d", "GET", "/", None),
                Err(SignatureError::BadHeaderValue(bad.to_owned()))
            );
        }
        assert!(matches!(
            sign_request(&key, "o", "d", "POST", "/", Some(&json!({"f": 0.5}))),
            Err(SignatureError::Canonical(_))
        ));
    }
}
