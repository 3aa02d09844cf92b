//! Every example inventory renders to reviewed snapshots (`cargo insta review` after a change), and the
//! rendered config reads back into the same typed model the server uses.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::path::PathBuf;

use provision::VarsInput;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("vars.yml")
}

fn check(name: &str) {
    let out = tempfile::tempdir().unwrap();
    let (_, rendered) = provision::render(&[VarsInput::File(example(name))], Some(out.path()))
        .unwrap_or_else(|d| panic!("example {name} does not render: {:#?}", d.errors));
    assert!(
        rendered.warnings.is_empty(),
        "example {name} warns: {:?}",
        rendered.warnings
    );

    let paths: Vec<String> = rendered
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    insta::assert_snapshot!(format!("{name}__files"), paths.join("\n"));
    for file in &rendered.files {
        let snapshot = format!("{name}__{}", file.path.display()).replace('/', "__");
        insta::assert_snapshot!(snapshot, file.contents);
    }

    let config = rendered
        .files
        .iter()
        .find(|f| f.path.ends_with("media-repo.yaml"))
        .unwrap();
    let loaded = config::Config::from_yaml(&config.contents, "media-repo.yaml").unwrap();
    assert!(
        loaded.unknown_keys.is_empty(),
        "unknown keys: {:?}",
        loaded.unknown_keys
    );
    assert_eq!(loaded.config, rendered.settings.config);
    assert!(
        loaded.config.validate().is_empty(),
        "{:?}",
        loaded.config.validate()
    );
}

#[test]
fn quickstart() {
    check("quickstart");
}

#[test]
fn s3() {
    check("s3");
}

#[test]
fn dendrite() {
    check("dendrite");
}

#[test]
fn two_domains() {
    check("two-domains");
}

#[test]
fn metrics() {
    check("metrics");
}
