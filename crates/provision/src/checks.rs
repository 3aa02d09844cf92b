//! Checks that need more than a type: variable names (renamed, obsolete, misspelled), required
//! values, S3 credentials, datastore ids that must never change, and conflicts with other roles.

use std::path::Path;

use crate::settings::PREFIX;
use crate::vars::{Layer, Vars};
use crate::{Diagnostics, Error, Evaluator, Settings, Warning};

/// Optional variables the defaults leave commented out (the renderer checks `is defined`).
const OPTIONAL: &[&str] = &[
    "matrix_media_repo_datastore_s3_opts_region",
    "matrix_media_repo_datastore_s3_opts_storage_class",
    "matrix_media_repo_datastore_s3_opts_public_base_url",
];

/// Variables of the container-based role that a native service has no use for.
const OBSOLETE_PREFIXES: &[&str] = &[
    "matrix_media_repo_container_image",
    "matrix_media_repo_docker_image",
];
const OBSOLETE: &[&str] = &[
    "matrix_media_repo_container_network",
    "matrix_media_repo_container_additional_networks",
    "matrix_media_repo_container_http_host_bind_port",
    "matrix_media_repo_container_metrics_host_bind_port",
    "matrix_media_repo_container_extra_arguments",
    "matrix_media_repo_container_src_files_path",
    "matrix_media_repo_docker_network",
    "matrix_media_repo_docker_src_files_path",
];

/// The container role's renames and removals (its `validate_config.yml`): using one is an error.
fn renamed(name: &str) -> Option<String> {
    const SPLIT: &[&str] = &[
        "access_tokens",
        "datastores",
        "uploads",
        "url_previews",
        "thumbnails",
    ];
    const REMOVED_CACHE: &[&str] = &[
        "enabled",
        "max_size_bytes",
        "max_file_size_bytes",
        "tracked_minutes",
        "min_downloads",
        "min_cache_time_seconds",
        "min_evicted_time_seconds",
    ];
    let short = name.strip_prefix(PREFIX)?;
    if SPLIT.contains(&short) {
        return Some(format!(
            "was split into separate `{name}_*` variables; set those instead"
        ));
    }
    if let Some(setting) = short.strip_prefix("downloads_cache_")
        && REMOVED_CACHE.contains(&setting)
    {
        return Some(
            "was removed (matrix-media-repo 1.3 has no download cache); delete it".to_owned(),
        );
    }
    if short == "feature_support" {
        return Some(
            "was removed (matrix-media-repo has no unstable features to turn on); delete it"
                .to_owned(),
        );
    }
    for group in ["logout", "admin", "logout_federation", "admin_federation"] {
        let old = format!("container_labels_traefik_{group}_path_prefix");
        if short == old {
            return Some(format!(
                "was renamed to `{PREFIX}container_labels_traefik_{group}_path_regexp` (a regular expression)"
            ));
        }
    }
    if let Some(rest) = short.strip_prefix("docker_")
        && !is_obsolete(name)
    {
        return Some(format!("was renamed to `{PREFIX}container_{rest}`"));
    }
    None
}

fn is_obsolete(name: &str) -> bool {
    OBSOLETE.contains(&name)
        || OBSOLETE_PREFIXES.iter().any(|p| name.starts_with(p))
        || name == "matrix_media_repo_container_image_force_pull"
}

/// Checks the operator's variable names before anything is evaluated.
pub(crate) fn check_names(vars: &Vars, d: &mut Diagnostics) {
    let known: Vec<&str> = vars
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| vars.is_builtin(n))
        .chain(OPTIONAL.iter().copied())
        .collect();
    for (name, var) in vars
        .iter()
        .filter(|(n, v)| v.origin.layer == Layer::User && n.starts_with(PREFIX))
    {
        let at = &var.origin;
        if let Some(message) = renamed(name) {
            d.errors.push(Error::InvalidVar {
                name: name.clone(),
                origin: Some(at.to_string()),
                message,
            });
        } else if is_obsolete(name) {
            d.warnings.push(Warning(format!(
                "`{name}` ({at}) is a container setting; the media repo now runs as a native service, so it is ignored"
            )));
        } else if !known.contains(&name.as_str()) {
            let message = match closest(name, &known) {
                Some(suggestion) => format!("is not a media repo variable; did you mean `{suggestion}`?"),
                None => "is not a media repo variable; see roles/custom/matrix-media-repo/defaults/main.yml".to_owned(),
            };
            d.errors.push(Error::InvalidVar {
                name: name.clone(),
                origin: Some(at.to_string()),
                message,
            });
        }
    }
}

fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .filter(|k| k.starts_with(PREFIX))
        .map(|k| (strsim::jaro_winkler(name, k), *k))
        .filter(|(score, _)| *score > 0.9)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Checks on evaluated settings. `out_dir` holds the config of the previous render, if any.
pub(crate) fn check_settings(eval: &Evaluator, s: &Settings, out_dir: &Path, d: &mut Diagnostics) {
    let mut require = |name: &str, value: &str, why: &str| {
        if value.trim().is_empty() {
            d.errors
                .push(eval.invalid(name, &format!("must not be empty: {why}")));
        }
    };
    let db_host = eval.json("matrix_media_repo_database_hostname").ok();
    let db_host = db_host
        .as_ref()
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    require(
        "matrix_media_repo_database_hostname",
        db_host,
        "set the Postgres host the media repo connects to",
    );
    for ds in &s.config.datastores {
        let (name, what) = match ds.kind {
            config::DatastoreKind::File => ("matrix_media_repo_datastore_file_id", "file"),
            config::DatastoreKind::S3 => ("matrix_media_repo_datastore_s3_id", "S3"),
        };
        require(
            name,
            &ds.id,
            &format!(
                "every {what} datastore needs a permanent id; generate one with `pwgen -s 64 1` and never change it"
            ),
        );
    }
    for route in &s.routes.routes {
        if route.entrypoints.is_empty() {
            let group = route
                .name
                .trim_start_matches("matrix-media-repo-")
                .replace('-', "_");
            let var = format!("matrix_media_repo_container_labels_traefik_{group}_entrypoints");
            let name = if eval.is_defined(&var) {
                var
            } else {
                format!("the entrypoints of router {}", route.name)
            };
            d.errors.push(eval.invalid(
                &name,
                "must name at least one Traefik entrypoint while its router is enabled",
            ));
        }
    }
    for hs in &s.config.homeservers {
        if hs.name.is_empty() {
            d.errors.push(eval.invalid(
                "matrix_media_repo_homeservers",
                "a homeserver entry has an empty `name`",
            ));
        }
    }
    check_s3(eval, s, d);
    check_datastore_ids(eval, s, out_dir, d);
    check_conflicts(eval, d);
    for problem in s.config.validate() {
        // Empty ids and S3 credentials were reported above with the variable to set.
        if problem.message == "must not be empty" && problem.key.starts_with("datastores[") {
            continue;
        }
        d.errors.push(Error::Invalid {
            subject: "the rendered media-repo.yaml".to_owned(),
            message: problem.to_string(),
        });
    }
}

fn check_s3(eval: &Evaluator, s: &Settings, d: &mut Diagnostics) {
    for ds in &s.config.datastores {
        let config::DatastoreOpts::S3(opts) = &ds.opts else {
            continue;
        };
        let checks = [
            (
                "matrix_media_repo_datastore_s3_opts_access_key_id",
                &opts.access_key_id,
                "the access key id",
            ),
            (
                "matrix_media_repo_datastore_s3_opts_access_secret",
                &opts.access_secret,
                "the secret key",
            ),
            (
                "matrix_media_repo_datastore_s3_opts_bucket_name",
                &opts.bucket_name,
                "the bucket name",
            ),
            (
                "matrix_media_repo_datastore_s3_opts_endpoint",
                &opts.endpoint,
                "the endpoint host",
            ),
        ];
        for (name, value, what) in checks {
            if value.trim().is_empty() {
                d.errors.push(eval.invalid(
                    name,
                    &format!("the S3 datastore is enabled but {what} is empty; set it"),
                ));
            }
        }
        if opts.bucket_name == "your-media-bucket" {
            d.errors.push(eval.invalid(
                "matrix_media_repo_datastore_s3_opts_bucket_name",
                "is still the example value `your-media-bucket`; set your bucket's name",
            ));
        }
        if opts.prefix_length > 16 {
            d.warnings.push(Warning(format!(
                "matrix_media_repo_datastore_s3_opts_prefix_length is {}: more than 16 gives no benefit",
                opts.prefix_length
            )));
        }
    }
}

/// Media rows record their datastore's id: a changed or dropped id makes existing media unreachable.
fn check_datastore_ids(eval: &Evaluator, s: &Settings, out_dir: &Path, d: &mut Diagnostics) {
    let path = out_dir.join("config/media-repo.yaml");
    let previous = match config::Config::load(&path) {
        Ok(loaded) => loaded.config,
        Err(config::Error::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return;
        }
        Err(e) => {
            d.warnings.push(Warning(format!(
                "cannot read the previous config to compare datastore ids: {e}"
            )));
            return;
        }
    };
    for old in &previous.datastores {
        let name = match old.kind {
            config::DatastoreKind::File => "matrix_media_repo_datastore_file_id",
            config::DatastoreKind::S3 => "matrix_media_repo_datastore_s3_id",
        };
        match s.config.datastores.iter().find(|ds| ds.kind == old.kind) {
            Some(new) if new.id != old.id => d.errors.push(eval.invalid(
                name,
                &format!(
                    "changed from `{}` (in {}) to `{}`: datastore ids must never change, or existing media \
                     becomes unreachable; set it back to `{}`",
                    old.id,
                    path.display(),
                    new.id,
                    old.id
                ),
            )),
            Some(_) => {}
            None => d.errors.push(Error::Invalid {
                subject: name.replace("_id", "_enabled"),
                message: format!(
                    "the datastore `{}` in {} would be dropped, making its media unreachable; keep it \
                     read-only instead (`{}` with an empty for_kinds list)",
                    old.id,
                    path.display(),
                    name.replace("_id", "_enabled: true")
                ),
            }),
        }
    }
}

/// Other media stores the seed warns about: they would split media across two places.
fn check_conflicts(eval: &Evaluator, d: &mut Diagnostics) {
    const OTHER_STORES: &[(&str, &str)] = &[
        (
            "matrix_synapse_ext_synapse_s3_storage_provider_enabled",
            "Synapse's S3 storage provider",
        ),
        ("matrix_s3_media_store_enabled", "the goofys S3 media store"),
        (
            "matrix_synapse_enable_media_repo",
            "Synapse's own media repository",
        ),
    ];
    for (name, what) in OTHER_STORES {
        let enabled = eval.is_defined(name)
            && matches!(eval.json(name), Ok(serde_json::Value::Bool(true)))
            && eval.origin(name).is_some_and(|o| o.layer == Layer::User);
        if enabled {
            let at = eval
                .origin(name)
                .map(|o| format!(" ({o})"))
                .unwrap_or_default();
            d.warnings.push(Warning(format!(
                "`{name}`{at} turns on {what} while the media repo is enabled: media would be split across two \
                 stores; turn it off"
            )));
        }
    }
}
