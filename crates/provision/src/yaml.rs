//! A YAML loader that keeps line numbers and reads plain scalars the way Ansible (PyYAML, YAML 1.1)
//! does: `yes`, `no`, `on`, `off`, `True` are booleans; `~` and `null` are null; `0o17`, `017`,
//! `0x1F` and `1_000` are integers.

use std::collections::HashMap;
use std::sync::LazyLock;

use indexmap::IndexMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A YAML value with the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: NodeValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(IndexMap<String, Node>),
}

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct YamlError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Parses one YAML document. `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<Node, YamlError> {
    let mut builder = Builder {
        file,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        error: None,
    };
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| YamlError {
        file: file.to_owned(),
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: e.info().to_owned(),
    })?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    Ok(builder.root.unwrap_or(Node {
        line: 1,
        value: NodeValue::Null,
    }))
}

enum Frame {
    Seq {
        node: Node,
        anchor: usize,
    },
    Map {
        node: Node,
        anchor: usize,
        key: Option<(String, usize)>,
    },
}

struct Builder<'a> {
    file: &'a str,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<YamlError>,
}

impl Builder<'_> {
    fn fail(&mut self, mark: Marker, message: String) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                file: self.file.to_owned(),
                line: mark.line(),
                col: mark.col() + 1,
                message,
            });
        }
    }

    /// Attaches a finished node to its parent (or makes it the document).
    fn push(&mut self, node: Node, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { node: seq, .. }) => {
                if let NodeValue::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Frame::Map { node: map, key, .. }) => match key.take() {
                None => {
                    let key_text = match node.value {
                        NodeValue::Str(s) => s,
                        NodeValue::Int(i) => i.to_string(),
                        NodeValue::Bool(b) => if b { "True" } else { "False" }.to_owned(),
                        NodeValue::Float(f) => f.to_string(),
                        NodeValue::Null => "None".to_owned(),
                        NodeValue::Seq(_) | NodeValue::Map(_) => {
                            return self.fail(mark, "a mapping key must be a scalar".to_owned());
                        }
                    };
                    *key = Some((key_text, node.line));
                }
                Some((k, _)) => {
                    if let NodeValue::Map(entries) = &mut map.value {
                        if k == "<<" {
                            merge_into(entries, node);
                        } else {
                            // Later keys win, as in PyYAML.
                            entries.insert(k, node);
                        }
                    }
                }
            },
        }
    }
}

/// `<<: *anchor` merges the anchored mapping's keys that are not set already.
fn merge_into(entries: &mut IndexMap<String, Node>, source: Node) {
    let sources = match source.value {
        NodeValue::Seq(items) => items,
        other => vec![Node {
            line: source.line,
            value: other,
        }],
    };
    for source in sources {
        if let NodeValue::Map(m) = source.value {
            for (k, v) in m {
                entries.entry(k).or_insert(v);
            }
        }
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let value = match (&tag, style) {
                    (Some(tag), _) if tag.suffix == "str" => NodeValue::Str(text),
                    (Some(tag), _) if tag.handle == "!" && tag.suffix == "unsafe" => {
                        NodeValue::Str(text)
                    }
                    (Some(tag), _) if tag.handle == "!" && tag.suffix == "vault" => {
                        return self.fail(
                            mark,
                            "ansible-vault encrypted values cannot be read by mmrctl; pass the decrypted \
                             vars file (ansible-vault view) or let the role call mmrctl"
                                .to_owned(),
                        );
                    }
                    (_, TScalarStyle::Plain) => resolve_plain(&text),
                    _ => NodeValue::Str(text),
                };
                self.push(Node { line, value }, anchor, mark);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                node: Node {
                    line,
                    value: NodeValue::Seq(Vec::new()),
                },
                anchor,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                node: Node {
                    line,
                    value: NodeValue::Map(IndexMap::new()),
                },
                anchor,
                key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Seq { node, anchor } | Frame::Map { node, anchor, .. }) =
                    self.stack.pop()
                {
                    self.push(node, anchor, mark);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => self.push(Node { line, ..node }, 0, mark),
                None => self.fail(mark, "alias to an unknown anchor".to_owned()),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

static INT: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^[-+]?(0b[0-1_]+|0x[0-9a-fA-F_]+|0o?[0-7_]+|(0|[1-9][0-9_]*))$")
        .unwrap_or_else(|e| unreachable!("valid regex: {e}"))
});
static FLOAT: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?$")
        .unwrap_or_else(|e| unreachable!("valid regex: {e}"))
});

/// YAML 1.1 resolution of an unquoted scalar, as PyYAML's SafeLoader does it.
pub(crate) fn resolve_plain(text: &str) -> NodeValue {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return NodeValue::Null,
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return NodeValue::Bool(true);
        }
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return NodeValue::Bool(false);
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return NodeValue::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return NodeValue::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return NodeValue::Float(f64::NAN),
        _ => {}
    }
    if INT.is_match(text) {
        let cleaned: String = text.chars().filter(|c| *c != '_').collect();
        let (negative, digits) = match cleaned.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, cleaned.strip_prefix('+').unwrap_or(&cleaned)),
        };
        let parsed = if let Some(bin) = digits.strip_prefix("0b") {
            i64::from_str_radix(bin, 2)
        } else if let Some(hex) = digits.strip_prefix("0x") {
            i64::from_str_radix(hex, 16)
        } else if let Some(oct) = digits.strip_prefix("0o") {
            i64::from_str_radix(oct, 8)
        } else if digits.len() > 1 && digits.starts_with('0') {
            i64::from_str_radix(digits, 8)
        } else {
            digits.parse()
        };
        if let Ok(n) = parsed {
            return NodeValue::Int(if negative { -n } else { n });
        }
    }
    if FLOAT.is_match(text) && text != "." {
        let cleaned: String = text.chars().filter(|c| *c != '_').collect();
        if let Ok(f) = cleaned.parse() {
            return NodeValue::Float(f);
        }
    }
    NodeValue::Str(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_1_1_scalars_resolve_as_ansible_reads_them() {
        let doc = parse(
            "a: yes\nb: Off\nc: 'yes'\nd: 0o17\ne: 017\nf: 1_000\ng: 1.5\nh: ~\ni: 0x1F\nj: \"8000\"\nk: y\n",
            "t.yml",
        )
        .unwrap();
        let NodeValue::Map(m) = doc.value else {
            panic!("not a map")
        };
        let v = |k: &str| m[k].value.clone();
        assert_eq!(v("a"), NodeValue::Bool(true));
        assert_eq!(v("b"), NodeValue::Bool(false));
        assert_eq!(v("c"), NodeValue::Str("yes".into()));
        assert_eq!(v("d"), NodeValue::Int(15));
        assert_eq!(v("e"), NodeValue::Int(15));
        assert_eq!(v("f"), NodeValue::Int(1000));
        assert_eq!(v("g"), NodeValue::Float(1.5));
        assert_eq!(v("h"), NodeValue::Null);
        assert_eq!(v("i"), NodeValue::Int(31));
        assert_eq!(v("j"), NodeValue::Str("8000".into()));
        // PyYAML does not treat a lone `y` as a boolean.
        assert_eq!(v("k"), NodeValue::Str("y".into()));
        assert_eq!(m["k"].line, 11);
    }

    #[test]
    fn anchors_and_merge_keys() {
        let doc = parse(
            "base: &b\n  x: 1\n  y: 2\nother:\n  <<: *b\n  y: 3\n",
            "t.yml",
        )
        .unwrap();
        let NodeValue::Map(m) = doc.value else {
            panic!("not a map")
        };
        let NodeValue::Map(other) = &m["other"].value else {
            panic!("not a map")
        };
        assert_eq!(other["x"].value, NodeValue::Int(1));
        assert_eq!(other["y"].value, NodeValue::Int(3));
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n", "vars.yml").unwrap_err();
        assert_eq!(err.file, "vars.yml");
        assert!(err.line >= 2, "{err}");
        assert!(err.to_string().starts_with("vars.yml:"), "{err}");
    }
}
