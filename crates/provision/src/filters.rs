//! The Ansible filters and tests the role's defaults and the operators' inventories use, with
//! Ansible's semantics (`ansible.builtin` filter plugins), on top of minijinja's Jinja builtins.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use sha2::Digest as _;

/// Ansible's namespace for `to_uuid` (`ansible.utils.unsafe_proxy`… `UUID_NAMESPACE_ANSIBLE`).
const UUID_NAMESPACE_ANSIBLE: uuid::Uuid = uuid::uuid!("361e6d51-faec-444a-9079-341386da8e2e");

pub(crate) fn register(env: &mut Environment<'static>) {
    env.add_filter("to_json", to_json);
    env.add_filter("to_nice_json", to_nice_json);
    env.add_filter("from_json", from_json);
    env.add_filter("to_yaml", to_yaml);
    env.add_filter("to_nice_yaml", to_yaml);
    env.add_filter("from_yaml", from_yaml);
    env.add_filter("hash", hash);
    env.add_filter("to_uuid", to_uuid);
    env.add_filter("combine", combine);
    env.add_filter("bool", to_bool);
    env.add_filter("ternary", ternary);
    env.add_filter("dirname", dirname);
    env.add_filter("basename", basename);
    env.add_filter("mandatory", mandatory);
    env.add_filter("regex_replace", regex_replace);
    env.add_filter("quote", quote);
    env.add_filter("union", union);
    env.add_filter("difference", difference);
    env.add_filter("intersect", intersect);
    env.add_filter("flatten", flatten);
    env.add_test("match", |value: &str, pattern: &str| {
        regex_test(value, pattern, true)
    });
    env.add_test("search", |value: &str, pattern: &str| {
        regex_test(value, pattern, false)
    });
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

fn to_serde(value: &Value) -> Result<serde_json::Value, Error> {
    serde_json::to_value(value).map_err(|e| invalid(format!("cannot serialize: {e}")))
}

fn from_serde(value: serde_json::Value) -> Value {
    Value::from(minijinja::value::Serde(value))
}

/// Python's `json.dumps` layout: `", "` and `": "` separators, non-ASCII escaped.
fn to_json(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&to_serde(value)?, &mut out, indent, sort_keys, 0);
    Ok(out)
}

fn to_nice_json(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: usize = kwargs.get::<Option<usize>>("indent")?.unwrap_or(4);
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(true);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&to_serde(value)?, &mut out, Some(indent), sort_keys, 0);
    Ok(out)
}

fn python_json(
    v: &serde_json::Value,
    out: &mut String,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => python_json_string(s, out),
        J::Array(items) if items.is_empty() => out.push_str("[]"),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, out, indent, sort, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if map.is_empty() => out.push_str("{}"),
        J::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json_string(k, out);
                out.push_str(": ");
                python_json(item, out, indent, sort, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn python_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn from_json(s: &str) -> Result<Value, Error> {
    serde_json::from_str::<serde_json::Value>(s)
        .map(from_serde)
        .map_err(|e| invalid(format!("from_json: {e}")))
}

/// `to_yaml`/`to_nice_yaml`: a YAML document of the value. Keys are sorted unless `sort_keys=false`,
/// as Ansible does; `indent` and `width` are accepted (the layout is always block style, 2 spaces).
fn to_yaml(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(true);
    let _: Option<usize> = kwargs.get("indent")?;
    let _: Option<usize> = kwargs.get("width")?;
    kwargs.assert_all_used()?;
    let mut json = to_serde(value)?;
    if sort_keys {
        sort_json(&mut json);
    }
    serde_norway::to_string(&json).map_err(|e| invalid(format!("to_yaml: {e}")))
}

fn sort_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_json),
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_json);
        }
        _ => {}
    }
}

fn from_yaml(s: &str) -> Result<Value, Error> {
    let node = crate::yaml::parse(s, "<from_yaml>").map_err(|e| invalid(e.to_string()))?;
    Ok(from_serde(node_to_json(&node)))
}

fn node_to_json(node: &crate::yaml::Node) -> serde_json::Value {
    use crate::yaml::NodeValue as N;
    match &node.value {
        N::Null => serde_json::Value::Null,
        N::Bool(b) => (*b).into(),
        N::Int(i) => (*i).into(),
        N::Float(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
        N::Str(s) => s.as_str().into(),
        N::Seq(items) => items.iter().map(node_to_json).collect(),
        N::Map(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), node_to_json(v)))
            .collect(),
    }
}

/// `hash('sha512')`: the hex digest of the string's UTF-8 bytes (Ansible's default is sha1).
fn hash(value: &Value, algorithm: Option<&str>) -> Result<String, Error> {
    let text = stringify(value);
    let bytes = text.as_bytes();
    let hex = |d: &[u8]| {
        d.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    Ok(match algorithm.unwrap_or("sha1") {
        "sha1" => sha1_smol::Sha1::from(bytes).digest().to_string(),
        "sha224" => hex(&sha2::Sha224::digest(bytes)),
        "sha256" => hex(&sha2::Sha256::digest(bytes)),
        "sha384" => hex(&sha2::Sha384::digest(bytes)),
        "sha512" => hex(&sha2::Sha512::digest(bytes)),
        other => {
            return Err(invalid(format!(
                "hash: unsupported algorithm `{other}` (use sha1, sha256 or sha512)"
            )));
        }
    })
}

/// `to_uuid`: a version-5 UUID of the string, in Ansible's namespace unless one is given.
fn to_uuid(value: &Value, namespace: Option<&str>) -> Result<String, Error> {
    let ns = match namespace {
        Some(ns) => {
            uuid::Uuid::parse_str(ns).map_err(|e| invalid(format!("to_uuid namespace: {e}")))?
        }
        None => UUID_NAMESPACE_ANSIBLE,
    };
    Ok(uuid::Uuid::new_v5(&ns, stringify(value).as_bytes()).to_string())
}

/// Python's `str()` of a scalar, which is what Ansible's string filters see.
fn stringify(value: &Value) -> String {
    match value.kind() {
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_owned(),
        ValueKind::None => "None".to_owned(),
        _ => value.to_string(),
    }
}

/// `a | combine(b, c, recursive=true, list_merge='replace')`: later dicts win.
fn combine(base: &Value, others: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let recursive: bool = kwargs.get::<Option<bool>>("recursive")?.unwrap_or(false);
    let list_merge: String = kwargs
        .get::<Option<String>>("list_merge")?
        .unwrap_or_else(|| "replace".into());
    kwargs.assert_all_used()?;
    let mut acc = to_serde(base)?;
    for other in others.iter() {
        let other = to_serde(other)?;
        if !acc.is_object() || !other.is_object() {
            return Err(invalid("combine expects dictionaries"));
        }
        merge(&mut acc, other, recursive, &list_merge)?;
    }
    Ok(from_serde(acc))
}

fn merge(
    acc: &mut serde_json::Value,
    other: serde_json::Value,
    recursive: bool,
    list_merge: &str,
) -> Result<(), Error> {
    use serde_json::Value as J;
    match (acc, other) {
        (J::Object(a), J::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) if recursive && existing.is_object() && v.is_object() => {
                        merge(existing, v, recursive, list_merge)?;
                    }
                    Some(J::Array(existing)) if v.is_array() && list_merge != "replace" => {
                        let J::Array(new) = v else {
                            unreachable!("checked above")
                        };
                        match list_merge {
                            "keep" => {}
                            "append" => existing.extend(new),
                            "prepend" => {
                                let old = std::mem::replace(existing, new);
                                existing.extend(old);
                            }
                            "append_rp" | "prepend_rp" => {
                                existing.retain(|x| !new.contains(x));
                                if list_merge == "append_rp" {
                                    existing.extend(new);
                                } else {
                                    let old = std::mem::replace(existing, new);
                                    existing.extend(old);
                                }
                            }
                            other => {
                                return Err(invalid(format!(
                                    "combine: unknown list_merge `{other}`"
                                )));
                            }
                        }
                    }
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        _ => Err(invalid("combine expects dictionaries")),
    }
}

/// Ansible's `bool`: `yes`, `on`, `1`, `true` (any case) and 1 are true; everything else false.
fn to_bool(value: &Value) -> bool {
    match value.kind() {
        ValueKind::Bool => value.is_true(),
        ValueKind::Number => value.as_i64() == Some(1),
        ValueKind::String => {
            matches!(
                value
                    .as_str()
                    .map(|s| s.trim().to_ascii_lowercase())
                    .as_deref(),
                Some("yes" | "on" | "1" | "true")
            )
        }
        _ => false,
    }
}

fn ternary(cond: &Value, yes: Value, no: Value, none: Option<Value>) -> Value {
    match (cond.is_none(), none) {
        (true, Some(n)) => n,
        _ if cond.is_true() => yes,
        _ => no,
    }
}

/// `posixpath.dirname`.
fn dirname(path: &str) -> String {
    let i = path.rfind('/').map_or(0, |i| i + 1);
    let head = &path[..i];
    if !head.is_empty() && head.chars().any(|c| c != '/') {
        head.trim_end_matches('/').to_owned()
    } else {
        head.to_owned()
    }
}

/// `posixpath.basename`.
fn basename(path: &str) -> String {
    path.rfind('/').map_or(path, |i| &path[i + 1..]).to_owned()
}

fn mandatory(value: &Value, msg: Option<&str>) -> Result<Value, Error> {
    if value.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            msg.unwrap_or("mandatory variable not defined").to_owned(),
        ));
    }
    Ok(value.clone())
}

fn compile_regex(pattern: &str, ignorecase: bool, multiline: bool) -> Result<regex::Regex, Error> {
    regex::RegexBuilder::new(pattern)
        .case_insensitive(ignorecase)
        .multi_line(multiline)
        .build()
        .map_err(|e| invalid(format!("bad regular expression: {e}")))
}

/// Python `re.sub` with `\1`/`\g<name>` back-references.
fn regex_replace(
    value: &str,
    pattern: &str,
    replacement: Option<&str>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let ignorecase: bool = kwargs.get::<Option<bool>>("ignorecase")?.unwrap_or(false);
    let multiline: bool = kwargs.get::<Option<bool>>("multiline")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let re = compile_regex(pattern, ignorecase, multiline)?;
    let backref = compile_regex(r"\\(\d+)|\\g<(\w+)>|\$", false, false)?;
    let replacement =
        backref.replace_all(replacement.unwrap_or(""), |c: &regex::Captures<'_>| match (
            c.get(1),
            c.get(2),
        ) {
            (Some(n), _) | (None, Some(n)) => format!("${{{}}}", n.as_str()),
            (None, None) => "$$".to_owned(),
        });
    Ok(re.replace_all(value, replacement.as_ref()).into_owned())
}

fn regex_test(value: &str, pattern: &str, anchored: bool) -> Result<bool, Error> {
    let re = compile_regex(pattern, false, false)?;
    Ok(re.find(value).is_some_and(|m| !anchored || m.start() == 0))
}

/// `shlex.quote`.
fn quote(value: &Value) -> String {
    let s = stringify(value);
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c))
    {
        return s;
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

fn items(value: &Value) -> Result<Vec<Value>, Error> {
    value
        .try_iter()
        .map(Iterator::collect)
        .map_err(|_| invalid("expected a list"))
}

fn union(a: &Value, b: &Value) -> Result<Value, Error> {
    let mut out: Vec<Value> = Vec::new();
    for v in items(a)?.into_iter().chain(items(b)?) {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(Value::from(out))
}

fn difference(a: &Value, b: &Value) -> Result<Value, Error> {
    let b = items(b)?;
    let mut out: Vec<Value> = Vec::new();
    for v in items(a)? {
        if !b.contains(&v) && !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(Value::from(out))
}

fn intersect(a: &Value, b: &Value) -> Result<Value, Error> {
    let b = items(b)?;
    let mut out: Vec<Value> = Vec::new();
    for v in items(a)? {
        if b.contains(&v) && !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(Value::from(out))
}

fn flatten(value: &Value, levels: Option<usize>) -> Result<Value, Error> {
    fn go(v: &Value, levels: Option<usize>, out: &mut Vec<Value>) -> Result<(), Error> {
        for item in items(v)? {
            if item.kind() == ValueKind::Seq && levels != Some(0) {
                go(&item, levels.map(|l| l - 1), out)?;
            } else if !item.is_none() {
                out.push(item);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(value, levels, &mut out)?;
    Ok(Value::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> String {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        register(&mut env);
        env.render_str(template, ())
            .unwrap_or_else(|e| panic!("{template}: {e:#}"))
    }

    #[test]
    fn database_password_matches_ansible() {
        // python3 -c "import hashlib,uuid; h=hashlib.sha512(b'secret:mediarepo.db').hexdigest();
        //   print(uuid.uuid5(uuid.UUID('361E6D51-FAEC-444A-9079-341386DA8E2E'), h))"
        assert_eq!(
            render("{{ ('secret' + ':mediarepo.db') | hash('sha512') | to_uuid }}"),
            "5ea6fe45-cf70-55f5-8d91-319e14ca5094"
        );
        assert_eq!(
            render("{{ 'abc' | hash }}"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn to_json_matches_python_json_dumps() {
        assert_eq!(
            render(r#"{{ {"b": [1, "é"], "a": true} | to_json }}"#),
            r#"{"b": [1, "\u00e9"], "a": true}"#
        );
        assert_eq!(
            render(r#"{{ {"b": 1, "a": 2} | to_nice_json }}"#),
            "{\n    \"a\": 2,\n    \"b\": 1\n}"
        );
    }

    #[test]
    fn combine_merges_like_ansible() {
        assert_eq!(
            render("{{ {'a': {'x': 1}, 'b': 1} | combine({'a': {'y': 2}}) | to_json }}"),
            r#"{"a": {"y": 2}, "b": 1}"#
        );
        assert_eq!(
            render("{{ {'a': {'x': 1}} | combine({'a': {'y': 2}}, recursive=true) | to_json }}"),
            r#"{"a": {"x": 1, "y": 2}}"#
        );
        assert_eq!(
            render("{{ {'l': [1]} | combine({'l': [2]}, list_merge='append') | to_json }}"),
            r#"{"l": [1, 2]}"#
        );
    }

    #[test]
    fn bool_filter_follows_ansible() {
        assert_eq!(
            render(
                "{{ 'yes' | bool }} {{ 'On' | bool }} {{ '0' | bool }} {{ 1 | bool }} {{ 'x' | bool }}"
            ),
            "True True False True False"
        );
    }

    #[test]
    fn path_filters_follow_posixpath() {
        assert_eq!(
            render(
                "{{ '/a/b/c.key' | dirname }} {{ '/a/b/c.key' | basename }} {{ 'c' | dirname }}|{{ '/' | dirname }}"
            ),
            "/a/b c.key |/"
        );
    }

    #[test]
    fn list_filters() {
        assert_eq!(render("{{ [1, 2, 2, 3] | unique | list }}"), "[1, 2, 3]");
        assert_eq!(
            render(
                "{{ [1, 2] | union([2, 3]) }} {{ [1, 2] | difference([2]) }} {{ [[1, [2]], 3] | flatten }}"
            ),
            "[1, 2, 3] [1] [1, 2, 3]"
        );
        assert_eq!(render("{{ (true) | ternary('a', 'b') }}"), "a");
        assert_eq!(
            render(r"{{ 'ab12' | regex_replace('([a-z]+)(\\d+)', '\\2-\\1') }}"),
            "12-ab"
        );
        assert_eq!(render("{{ \"it's\" | quote }}"), r#"'it'"'"'s'"#);
    }
}
