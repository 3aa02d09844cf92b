//! Variables in layers, as Ansible stacks them: role defaults, then the playbook's group vars, then
//! the operator's inventory files (later files win). Every variable remembers where it was set.

use std::fmt;

use std::collections::HashSet;

use indexmap::IndexMap;

use crate::Error;
use crate::yaml::{self, Node, NodeValue};

/// The role's defaults: the one source of every `matrix_media_repo_*` default.
pub const ROLE_DEFAULTS: &str =
    include_str!("../../../roles/custom/matrix-media-repo/defaults/main.yml");
pub const ROLE_DEFAULTS_PATH: &str = "roles/custom/matrix-media-repo/defaults/main.yml";
/// The playbook wiring (`group_vars/matrix_servers`) for the media repo.
pub const WIRING: &str = include_str!("../../../group_vars/matrix_servers/matrix-media-repo.yml");
pub const WIRING_PATH: &str = "group_vars/matrix_servers/matrix-media-repo.yml";
/// Defaults of the playbook's other roles that the two files above read; only standalone renders
/// need them, the playbook has its own.
pub const PLAYBOOK_DEFAULTS: &str = include_str!("../data/playbook-defaults.yml");
pub const PLAYBOOK_DEFAULTS_PATH: &str = "crates/provision/data/playbook-defaults.yml";

/// Where a variable's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
    pub layer: Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    /// Other roles' defaults (standalone renders only).
    PlaybookDefaults,
    RoleDefaults,
    Wiring,
    /// The operator's inventory.
    User,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone)]
pub struct Var {
    pub node: Node,
    pub origin: Origin,
}

/// All variables after layering.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    vars: IndexMap<String, Var>,
    /// Names the built-in layers define, even where the inventory overrides them.
    builtin: HashSet<String>,
}

impl Vars {
    /// The embedded defaults and wiring, without any inventory.
    pub fn builtin() -> Result<Vars, Error> {
        let mut vars = Vars::default();
        vars.add_layer(
            PLAYBOOK_DEFAULTS,
            PLAYBOOK_DEFAULTS_PATH,
            Layer::PlaybookDefaults,
        )?;
        vars.add_layer(ROLE_DEFAULTS, ROLE_DEFAULTS_PATH, Layer::RoleDefaults)?;
        vars.add_layer(WIRING, WIRING_PATH, Layer::Wiring)?;
        Ok(vars)
    }

    /// Adds a YAML document whose top level maps variable names to values; its values replace
    /// earlier ones.
    pub fn add_layer(&mut self, text: &str, file: &str, layer: Layer) -> Result<(), Error> {
        let doc = yaml::parse(text, file)?;
        match doc.value {
            NodeValue::Null => Ok(()),
            NodeValue::Map(entries) => {
                for (name, node) in entries {
                    let origin = Origin {
                        file: file.to_owned(),
                        line: node.line,
                        layer,
                    };
                    if layer != Layer::User {
                        self.builtin.insert(name.clone());
                    }
                    self.vars.insert(name, Var { node, origin });
                }
                Ok(())
            }
            _ => Err(Error::Invalid {
                subject: format!("{file}:{}", doc.line),
                message: "a vars file must be a mapping of variable names to values".to_owned(),
            }),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// Whether the role's defaults, the wiring or the playbook defaults define `name`.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Sets a variable from code (for example `--set name=value` or a derived fact).
    pub fn set(&mut self, name: &str, node: Node, origin: Origin) {
        self.vars.insert(name.to_owned(), Var { node, origin });
    }
}
