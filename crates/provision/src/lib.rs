//! From a playbook inventory to everything a host needs to run the media repository.
//!
//! ```text
//! vars files ──► Vars (layers, file:line) ──► Evaluator (lazy Jinja) ──► checks ──► Settings
//!                                                                                   │
//!        media-repo.yaml, labels, Traefik file routes, systemd unit, homeserver snippet ◄─┘
//! ```
//! [`render`] is the whole pipeline; [`output`] writes its result atomically.

mod checks;
mod eval;
mod filters;
pub mod output;
mod render;
mod routes;
mod settings;
pub mod vars;
pub mod webserver;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use eval::Evaluator;
pub use output::{Change, OutputFile};
pub use routes::{Route, RouteTable};
pub use settings::Settings;

/// Why rendering failed. Every variant names what to fix: a variable, a file and line, or a path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Yaml(#[from] yaml::YamlError),
    #[error("{subject}: {message}")]
    Invalid { subject: String, message: String },
    #[error("`{name}`{}: {message}", origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    InvalidVar {
        name: String,
        origin: Option<String>,
        message: String,
    },
    #[error("variable `{name}` is not defined{}; set it in your vars.yml", needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default())]
    Undefined {
        name: String,
        needed_by: Option<String>,
    },
    #[error("variables reference each other in a cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("`{name}` ({origin}): template error: {message}")]
    Template {
        name: String,
        origin: String,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Something worth the operator's attention that does not stop the render.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warning(pub String);

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every problem found, so one run reports all of them.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub errors: Vec<Error>,
    pub warnings: Vec<Warning>,
}

/// What a render produced.
#[derive(Debug)]
pub struct Rendered {
    pub settings: Settings,
    pub files: Vec<OutputFile>,
    pub warnings: Vec<Warning>,
}

/// Where the inventory comes from.
#[derive(Debug, Clone)]
pub enum VarsInput {
    File(PathBuf),
    /// Text with a name for messages (tests, stdin).
    Text {
        name: String,
        text: String,
    },
}

/// Loads the built-in layers and the operator's files, later files winning.
pub fn load_vars(inputs: &[VarsInput]) -> Result<vars::Vars, Error> {
    let mut vars = vars::Vars::builtin()?;
    for input in inputs {
        match input {
            VarsInput::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                vars.add_layer(&text, &path.display().to_string(), vars::Layer::User)?;
            }
            VarsInput::Text { name, text } => vars.add_layer(text, name, vars::Layer::User)?,
        }
    }
    Ok(vars)
}

/// The whole pipeline: load, evaluate, check, render. `out_dir` is where the files will go (the
/// existing config there is read to keep datastore ids stable); `None` uses the base path from the
/// variables.
pub fn render(
    inputs: &[VarsInput],
    out_dir: Option<&Path>,
) -> Result<(PathBuf, Rendered), Diagnostics> {
    let vars = load_vars(inputs).map_err(|e| Diagnostics {
        errors: vec![e],
        warnings: Vec::new(),
    })?;
    let mut diagnostics = Diagnostics::default();
    checks::check_names(&vars, &mut diagnostics);
    let eval = Evaluator::new(vars);
    let settings = match Settings::from_vars(&eval, &mut diagnostics) {
        Some(settings) if diagnostics.errors.is_empty() => settings,
        _ => return Err(diagnostics),
    };
    let out_dir = out_dir.map_or_else(|| PathBuf::from(&settings.base_path), Path::to_path_buf);
    checks::check_settings(&eval, &settings, &out_dir, &mut diagnostics);
    if !diagnostics.errors.is_empty() {
        return Err(diagnostics);
    }
    match render::files(&settings) {
        Ok(files) => Ok((
            out_dir,
            Rendered {
                settings,
                files,
                warnings: diagnostics.warnings,
            },
        )),
        Err(e) => {
            diagnostics.errors.push(e);
            Err(diagnostics)
        }
    }
}
