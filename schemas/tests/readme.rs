//! Every TOML block of the README and every shipped workflow is a valid workflow (a block that
//! shows only some sections is read on top of the README's first, complete, example).

use std::path::{Path, PathBuf};

use schemas::workflow::Workflow;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The ```toml blocks of `markdown`, with the line each starts on.
fn toml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some((i + 2, String::new())),
            (Some(_), "```") => out.push(current.take().unwrap()),
            (Some((_, text)), l) => {
                text.push_str(l);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// `extra`'s tables replace or extend those of `base`.
fn merged(base: &str, extra: &str) -> String {
    let mut table: toml::Table = toml::from_str(base).unwrap();
    for (k, v) in toml::from_str::<toml::Table>(extra).unwrap() {
        table.insert(k, v);
    }
    toml::to_string(&table).unwrap()
}

#[test]
fn every_readme_toml_block_is_a_valid_workflow() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = toml_blocks(&readme);
    assert!(blocks.len() >= 2, "found {} TOML blocks", blocks.len());
    let base = &blocks[0].1;
    for (line, text) in &blocks {
        if let Err(e) = toml::from_str::<toml::Table>(text) {
            panic!("README.md line {line}: not valid TOML: {e}");
        }
        let whole = if text.contains("[workflow]") { text.clone() } else { merged(base, text) };
        if let Err(e) = Workflow::parse(&whole, Path::new("README.md"), &[]) {
            panic!("README.md line {line}: not a valid workflow: {e}");
        }
    }
}

#[test]
fn shipped_workflows_are_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("workflows")).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            Workflow::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "{n} workflows");
}
