//! Lazy evaluation of variables, as Ansible does it: a string holding `{{ … }}` or `{% … %}` is a Jinja
//! template, evaluated only when something reads the variable, against all variables, recursively.
//! A template that is a single `{{ expression }}` yields the expression's native value (list, dict,
//! bool, number), as Ansible's templar does; anything else yields a string.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use minijinja::value::{Object, Value};
use minijinja::{Environment, UndefinedBehavior};

use crate::vars::{Origin, Vars};
use crate::yaml::{Node, NodeValue};
use crate::{Error, filters};

pub struct Evaluator {
    inner: Arc<Inner>,
}

struct Inner {
    env: Environment<'static>,
    vars: Vars,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    cache: HashMap<String, Value>,
    /// Variables being evaluated, outermost first: a name seen twice is a reference cycle.
    stack: Vec<String>,
    /// The first error raised by a variable that a template read; it explains that template's failure.
    nested_error: Option<Error>,
    /// Names templates asked for that no layer defines.
    missing: Vec<String>,
}

impl Evaluator {
    pub fn new(vars: Vars) -> Evaluator {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        filters::register(&mut env);
        Evaluator {
            inner: Arc::new(Inner {
                env,
                vars,
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub fn vars(&self) -> &Vars {
        &self.inner.vars
    }

    pub fn is_defined(&self, name: &str) -> bool {
        self.inner.vars.contains(name)
    }

    /// The evaluated value of a variable; an undefined one is an error naming it.
    pub fn value(&self, name: &str) -> Result<Value, Error> {
        if !self.inner.vars.contains(name) {
            return Err(Error::Undefined {
                name: name.to_owned(),
                needed_by: None,
            });
        }
        self.inner.eval_var(name)
    }

    /// The value of a variable as JSON, for typed extraction.
    pub fn json(&self, name: &str) -> Result<serde_json::Value, Error> {
        let value = self.value(name)?;
        serde_json::to_value(&value)
            .map_err(|e| self.invalid(name, &format!("cannot be represented: {e}")))
    }

    /// Evaluates a template string in the context of all variables (for tests and `--set`).
    pub fn render_template(&self, template: &str, origin: &Origin) -> Result<Value, Error> {
        self.inner.render(template, "<template>", origin)
    }

    /// Where a variable was set, for error messages.
    pub fn origin(&self, name: &str) -> Option<&Origin> {
        self.inner.vars.get(name).map(|v| &v.origin)
    }

    /// An error about a variable's value, naming the variable and where it was set.
    pub fn invalid(&self, name: &str, message: &str) -> Error {
        Error::InvalidVar {
            name: name.to_owned(),
            origin: self.origin(name).map(ToString::to_string),
            message: message.to_owned(),
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the cache inconsistent: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn eval_var(self: &Arc<Self>, name: &str) -> Result<Value, Error> {
        {
            let mut state = self.state();
            if let Some(v) = state.cache.get(name) {
                return Ok(v.clone());
            }
            if let Some(pos) = state.stack.iter().position(|n| n == name) {
                let mut cycle: Vec<String> = state.stack[pos..].to_vec();
                cycle.push(name.to_owned());
                return Err(Error::Cycle { cycle });
            }
            state.stack.push(name.to_owned());
        }
        let var = self.vars.get(name).cloned();
        let result = match var {
            Some(var) => self.eval_node(&var.node, name, &var.origin),
            None => Err(Error::Undefined {
                name: name.to_owned(),
                needed_by: None,
            }),
        };
        let mut state = self.state();
        state.stack.pop();
        if let Ok(v) = &result {
            state.cache.insert(name.to_owned(), v.clone());
        }
        result
    }

    fn eval_node(
        self: &Arc<Self>,
        node: &Node,
        name: &str,
        origin: &Origin,
    ) -> Result<Value, Error> {
        Ok(match &node.value {
            NodeValue::Null => Value::from(()),
            NodeValue::Bool(b) => Value::from(*b),
            NodeValue::Int(i) => Value::from(*i),
            NodeValue::Float(f) => Value::from(*f),
            NodeValue::Str(s) if is_template(s) => {
                let origin = Origin {
                    line: node.line,
                    ..origin.clone()
                };
                self.render(s, name, &origin)?
            }
            NodeValue::Str(s) => Value::from(s.as_str()),
            NodeValue::Seq(items) => {
                let items: Result<Vec<Value>, Error> = items
                    .iter()
                    .map(|n| self.eval_node(n, name, origin))
                    .collect();
                Value::from(items?)
            }
            NodeValue::Map(entries) => {
                let mut out = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    out.push((Value::from(k.as_str()), self.eval_node(v, name, origin)?));
                }
                Value::from_pairs(out)
            }
        })
    }

    fn render(
        self: &Arc<Self>,
        template: &str,
        name: &str,
        origin: &Origin,
    ) -> Result<Value, Error> {
        let ctx = Value::from_object(Context(Arc::clone(self)));
        let missing_before = self.state().missing.len();
        let result = match single_expression(template) {
            Some(expr) => self.env.compile_expression(expr).and_then(|e| e.eval(ctx)),
            None => self.env.render_str(template, ctx).map(Value::from),
        };
        let mut state = self.state();
        // A variable this template read failed: that failure, not the template's, is the cause.
        if let Some(nested) = state.nested_error.take() {
            return Err(nested);
        }
        result.map_err(|e| {
            let missing = state
                .missing
                .get(missing_before..)
                .and_then(|m| m.last().cloned());
            match missing {
                Some(missing) if is_undefined_error(&e) => Error::Undefined {
                    name: missing,
                    needed_by: Some(format!("`{name}` ({origin})")),
                },
                _ => Error::Template {
                    name: name.to_owned(),
                    origin: origin.to_string(),
                    message: describe(&e),
                },
            }
        })
    }
}

/// The variables as a Jinja context: each lookup evaluates (once) the variable it names.
#[derive(Debug)]
struct Context(Arc<Inner>);

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<vars>")
    }
}

impl Object for Context {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        if !self.0.vars.contains(name) {
            self.0.state().missing.push(name.to_owned());
            return None;
        }
        match self.0.eval_var(name) {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.state().nested_error.get_or_insert(e);
                None
            }
        }
    }
}

pub(crate) fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// `{{ expr }}` alone (surrounding whitespace allowed) → `expr`.
fn single_expression(template: &str) -> Option<&str> {
    let inner = template.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner)
}

fn is_undefined_error(e: &minijinja::Error) -> bool {
    e.kind() == minijinja::ErrorKind::UndefinedError
}

fn describe(e: &minijinja::Error) -> String {
    let mut message = e
        .detail()
        .map_or_else(|| e.kind().to_string(), ToOwned::to_owned);
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::Layer;

    fn eval(yaml: &str) -> Evaluator {
        let mut vars = Vars::default();
        vars.add_layer(yaml, "vars.yml", Layer::User).unwrap();
        Evaluator::new(vars)
    }

    fn json(e: &Evaluator, name: &str) -> serde_json::Value {
        e.json(name).unwrap_or_else(|err| panic!("{name}: {err}"))
    }

    #[test]
    fn single_expressions_keep_their_type_and_mixed_templates_are_strings() {
        let e = eval(
            "a: [1, 2]\nb: [3]\nsum: '{{ a + b }}'\nflag: '{{ (a | length) > 0 }}'\n\
             text: 'n={{ a | length }}'\nblock: |\n  {{ {} | combine({'k': 'v'}) }}\n",
        );
        assert_eq!(json(&e, "sum"), serde_json::json!([1, 2, 3]));
        assert_eq!(json(&e, "flag"), serde_json::json!(true));
        assert_eq!(json(&e, "text"), serde_json::json!("n=2"));
        assert_eq!(json(&e, "block"), serde_json::json!({"k": "v"}));
    }

    #[test]
    fn nested_references_are_resolved_lazily() {
        let e = eval("c: '{{ b }}-c'\nb: '{{ a }}-b'\na: x\nlist: ['{{ a }}', 1]\n");
        assert_eq!(json(&e, "c"), serde_json::json!("x-b-c"));
        assert_eq!(json(&e, "list"), serde_json::json!(["x", 1]));
    }

    #[test]
    fn a_reference_cycle_is_an_error_that_names_the_cycle() {
        let e = eval("a: '{{ b }}'\nb: '{{ c }}'\nc: '{{ a }}'\n");
        let err = e.value("a").unwrap_err().to_string();
        assert!(err.contains("a -> b -> c -> a"), "{err}");
    }

    #[test]
    fn an_undefined_variable_is_named_with_the_variable_that_needed_it() {
        let e = eval("a: 'x'\nb: '{{ a ~ nope }}'\n");
        let err = e.value("b").unwrap_err().to_string();
        assert!(
            err.contains("`nope`") && err.contains("`b` (vars.yml:2)"),
            "{err}"
        );
    }

    #[test]
    fn defined_tests_and_default_see_undefined_variables() {
        let e = eval("a: '{{ nope | default(5) }}'\nb: '{{ nope is defined }}'\n");
        assert_eq!(json(&e, "a"), serde_json::json!(5));
        assert_eq!(json(&e, "b"), serde_json::json!(false));
    }
}
