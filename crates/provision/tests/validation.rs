//! Each bad input gives an error (or a warning) that names the variable and where it was set.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use provision::{Diagnostics, Rendered, VarsInput};

const QUICKSTART: &str = "\
matrix_domain: example.com
matrix_homeserver_generic_secret_key: s3cr3t
matrix_media_repo_enabled: true
matrix_media_repo_datastore_file_id: abcdefghijklmnopqrstuvwxyz0123456789
";

fn render_in(dir: &std::path::Path, extra: &str) -> Result<Rendered, Diagnostics> {
    let text = format!("{QUICKSTART}{extra}");
    let input = VarsInput::Text {
        name: "vars.yml".into(),
        text,
    };
    provision::render(&[input], Some(dir)).map(|(_, r)| r)
}

fn render(extra: &str) -> Result<Rendered, Diagnostics> {
    render_in(tempfile::tempdir().unwrap().path(), extra)
}

/// The render's error messages, asserting it failed.
fn errors(extra: &str) -> Vec<String> {
    match render(extra) {
        Ok(_) => panic!("rendering with {extra:?} should fail"),
        Err(d) => d.errors.iter().map(ToString::to_string).collect(),
    }
}

fn warnings(extra: &str) -> Vec<String> {
    match render(extra) {
        Ok(r) => r.warnings.iter().map(ToString::to_string).collect(),
        Err(d) => panic!("rendering with {extra:?} should succeed: {:?}", d.errors),
    }
}

fn assert_one(errors: &[String], needles: &[&str]) {
    assert!(
        errors.iter().any(|e| needles.iter().all(|n| e.contains(n))),
        "no error contains all of {needles:?}: {errors:#?}"
    );
}

#[test]
fn the_quickstart_renders_without_warnings() {
    let rendered = render("").unwrap_or_else(|d| panic!("{:?}", d.errors));
    assert!(rendered.warnings.is_empty(), "{:?}", rendered.warnings);
}

#[test]
fn missing_matrix_domain_is_named() {
    let input = VarsInput::Text {
        name: "vars.yml".into(),
        text: "matrix_homeserver_generic_secret_key: x\nmatrix_media_repo_enabled: true\nmatrix_media_repo_datastore_file_id: x\n"
            .into(),
    };
    let errors: Vec<String> =
        provision::render(&[input], Some(tempfile::tempdir().unwrap().path()))
            .expect_err("must fail")
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
    assert_one(
        &errors,
        &["`matrix_domain` is not defined", "set it in your vars.yml"],
    );
}

#[test]
fn required_variables_are_named_with_file_and_line() {
    assert_one(
        &errors("matrix_media_repo_database_hostname: ''\n"),
        &[
            "`matrix_media_repo_database_hostname` (vars.yml:5)",
            "must not be empty",
        ],
    );
    assert_one(
        &errors("matrix_media_repo_datastore_file_id: ''\n"),
        &[
            "`matrix_media_repo_datastore_file_id` (vars.yml:5)",
            "pwgen",
        ],
    );
    assert_one(
        &errors("matrix_media_repo_container_labels_traefik_internal_media_entrypoints: ''\n"),
        &[
            "matrix_media_repo_container_labels_traefik_internal_media_entrypoints",
            "entrypoint",
        ],
    );
}

#[test]
fn renamed_variables_name_their_replacement() {
    assert_one(
        &errors("matrix_media_repo_container_labels_traefik_logout_path_prefix: /x\n"),
        &[
            "(vars.yml:5)",
            "renamed to `matrix_media_repo_container_labels_traefik_logout_path_regexp`",
        ],
    );
    assert_one(
        &errors("matrix_media_repo_access_tokens: {}\n"),
        &["`matrix_media_repo_access_tokens`", "split"],
    );
    assert_one(
        &errors("matrix_media_repo_downloads_cache_enabled: true\n"),
        &["downloads_cache_enabled", "removed"],
    );
    assert_one(
        &errors("matrix_media_repo_docker_labels_traefik_enabled: true\n"),
        &["renamed to `matrix_media_repo_container_labels_traefik_enabled`"],
    );
}

#[test]
fn misspelled_variables_get_a_suggestion() {
    assert_one(
        &errors("matrix_media_repo_max_byts: 5\n"),
        &[
            "`matrix_media_repo_max_byts` (vars.yml:5)",
            "did you mean `matrix_media_repo_max_bytes`?",
        ],
    );
}

#[test]
fn wrong_types_name_the_variable_and_line() {
    assert_one(
        &errors("matrix_media_repo_port: not-a-port\n"),
        &[
            "`matrix_media_repo_port` (vars.yml:5)",
            "repo.port",
            "not-a-port",
        ],
    );
    assert_one(
        &errors("matrix_media_repo_datastore_file_for_kinds: [pictures]\n"),
        &["datastore_file_for_kinds", "pictures"],
    );
    assert_one(
        &errors("matrix_media_repo_enabled: maybe\n"),
        &["`matrix_media_repo_enabled` (vars.yml:5)", "maybe"],
    );
}

#[test]
fn s3_without_credentials_or_bucket_is_an_error() {
    let errors = errors(
        "matrix_media_repo_datastore_s3_for_kinds: [local_media]\nmatrix_media_repo_datastore_s3_id: s3id\n",
    );
    assert_one(
        &errors,
        &[
            "matrix_media_repo_datastore_s3_opts_access_key_id",
            "access key",
        ],
    );
    assert_one(
        &errors,
        &["matrix_media_repo_datastore_s3_opts_access_secret"],
    );
    assert_one(
        &errors,
        &[
            "matrix_media_repo_datastore_s3_opts_bucket_name",
            "your-media-bucket",
        ],
    );
}

#[test]
fn a_changed_datastore_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = render_in(dir.path(), "").unwrap_or_else(|d| panic!("{:?}", d.errors));
    let planned = provision::output::plan(dir.path(), &first.files).unwrap();
    provision::output::apply(&planned).unwrap();

    let d = render_in(
        dir.path(),
        "matrix_media_repo_datastore_file_id: another-id\n",
    )
    .expect_err("must fail");
    let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_one(
        &errors,
        &[
            "`matrix_media_repo_datastore_file_id` (vars.yml:5)",
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "another-id",
            "never change",
        ],
    );

    let d = render_in(dir.path(), "matrix_media_repo_datastore_file_for_kinds: []\nmatrix_media_repo_datastore_s3_for_kinds: [thumbnails, local_media, remote_media, archives]\nmatrix_media_repo_datastore_s3_id: s3\nmatrix_media_repo_datastore_s3_opts_access_key_id: a\nmatrix_media_repo_datastore_s3_opts_access_secret: b\nmatrix_media_repo_datastore_s3_opts_bucket_name: c\n")
        .expect_err("dropping the file store must fail");
    let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_one(
        &errors,
        &["abcdefghijklmnopqrstuvwxyz0123456789", "read-only"],
    );
}

#[test]
fn a_read_only_datastore_stays_configured() {
    let extra = "matrix_media_repo_datastore_file_enabled: true\nmatrix_media_repo_datastore_file_for_kinds: []\n\
                 matrix_media_repo_datastore_s3_for_kinds: [thumbnails, local_media, remote_media, archives]\n\
                 matrix_media_repo_datastore_s3_id: s3\nmatrix_media_repo_datastore_s3_opts_access_key_id: a\n\
                 matrix_media_repo_datastore_s3_opts_access_secret: b\nmatrix_media_repo_datastore_s3_opts_bucket_name: c\n";
    let rendered = render(extra).unwrap_or_else(|d| panic!("{:?}", d.errors));
    let file = rendered
        .settings
        .config
        .datastores
        .iter()
        .find(|d| d.kind == config::DatastoreKind::File)
        .unwrap();
    assert!(file.for_kinds.is_empty());
}

#[test]
fn a_reference_cycle_names_the_cycle() {
    assert_one(
        &errors(
            "matrix_media_repo_port: '{{ matrix_media_repo_metrics_port }}'\nmatrix_media_repo_metrics_port: '{{ matrix_media_repo_port }}'\n",
        ),
        &[
            "cycle",
            "matrix_media_repo_port -> matrix_media_repo_metrics_port -> matrix_media_repo_port",
        ],
    );
}

#[test]
fn yaml_syntax_errors_name_file_and_line() {
    assert_one(
        &errors("matrix_media_repo_admins: [a, b\nfoo: 1\n"),
        &["vars.yml:"],
    );
}

#[test]
fn a_disabled_media_repo_renders_nothing() {
    assert_one(
        &errors("matrix_media_repo_enabled: false\n"),
        &[
            "`matrix_media_repo_enabled` (vars.yml:5)",
            "set `matrix_media_repo_enabled: true`",
        ],
    );
}

#[test]
fn container_role_variables_warn_instead_of_failing() {
    let warnings = warnings(
        "matrix_media_repo_container_image_tag: v1.3.8\nmatrix_media_repo_container_network: matrix\n",
    );
    assert_one(
        &warnings,
        &[
            "`matrix_media_repo_container_image_tag` (vars.yml:5)",
            "native service",
        ],
    );
    assert_one(
        &warnings,
        &["`matrix_media_repo_container_network` (vars.yml:6)"],
    );
}

#[test]
fn another_media_store_is_a_warning() {
    let warnings = warnings("matrix_synapse_ext_synapse_s3_storage_provider_enabled: true\n");
    assert_one(
        &warnings,
        &[
            "matrix_synapse_ext_synapse_s3_storage_provider_enabled",
            "(vars.yml:5)",
            "two stores",
        ],
    );
}

#[test]
fn yaml_1_1_booleans_mean_what_ansible_makes_them_mean() {
    let rendered =
        render("matrix_media_repo_metrics_enabled: yes\nmatrix_media_repo_json_logs: On\n");
    let config = rendered
        .unwrap_or_else(|d| panic!("{:?}", d.errors))
        .settings
        .config;
    assert!(config.metrics.enabled);
    assert!(config.repo.json_logs);
    // A quoted 'yes' is a string: MMR's boolean field rejects it, as it would the container role's output.
    let errors = errors("matrix_media_repo_log_colors: 'yes'\n");
    assert_one(&errors, &["`matrix_media_repo_log_colors` (vars.yml:5)"]);
}

#[test]
fn the_database_password_is_derived_as_the_playbook_derives_it() {
    let rendered = render("").unwrap_or_else(|d| panic!("{:?}", d.errors));
    // python3: uuid.uuid5(UUID('361E6D51-FAEC-444A-9079-341386DA8E2E'),
    //                     hashlib.sha512(b's3cr3t:mediarepo.db').hexdigest())
    let expected = "27538594-b3ac-5ae1-91aa-a9b8b260ca14";
    assert!(
        rendered
            .settings
            .config
            .database
            .postgres
            .contains(&format!(":{expected}@")),
        "{}",
        rendered.settings.config.database.postgres
    );
}
