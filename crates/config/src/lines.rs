//! Where each key of a YAML document is, so that a warning can name the line of a key the model
//! does not know.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Walker {
    fn path(&self) -> Vec<String> {
        self.stack
            .iter()
            .filter_map(|f| match f {
                Frame::Map { key } => key.clone(),
                Frame::Seq { index } => Some(index.to_string()),
            })
            .collect()
    }

    /// A value (scalar or whole collection) ended: the enclosing map waits for its next key, the
    /// enclosing sequence moves to its next item.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map { key: key @ None }) = self.stack.last_mut() {
                    *key = Some(text);
                    let path = self.path().join(".");
                    self.lines.entry(path).or_insert(mark.line());
                } else {
                    self.value_done();
                }
            }
            Event::Alias(_) => self.value_done(),
            Event::MappingStart(..) => self.stack.push(Frame::Map { key: None }),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq { index: 0 }),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

/// Dotted key path (sequence items by index, as `serde_ignored` writes them) -> 1-based line.
/// A document that does not parse has no lines (its parse error is reported elsewhere).
pub(crate) fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut walker = Walker::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut walker, false).is_err() {
        return HashMap::new();
    }
    walker.lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nested_in_maps_and_sequences_have_their_lines() {
        let text = "repo:\n  port: 1\n  colour: blue\nhomeservers:\n  - name: a\n    extra: [1, 2]\n  - name: b\n    odd: {x: 1}\n";
        let lines = key_lines(text);
        assert_eq!(lines["repo"], 1);
        assert_eq!(lines["repo.colour"], 3);
        assert_eq!(lines["homeservers.0.extra"], 6);
        assert_eq!(lines["homeservers.1.name"], 7);
        assert_eq!(lines["homeservers.1.odd"], 8);
        assert_eq!(lines["homeservers.1.odd.x"], 8);
    }
}
