//! Running the `hmil-flow` binary from integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_hmil-flow");

pub fn hmil_flow(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "hmil-flow {args:?} failed:\n{text}");
    text
}

/// Runs `hmil-flow` expecting it to fail; returns (stdout, stderr).
pub fn hmil_flow_fails(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!out.status.success(), "hmil-flow {args:?} succeeded:\n{stdout}{stderr}");
    (stdout, stderr)
}

/// Runs the workflow and returns node id → status.
pub fn run(wf: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    let summary = wf.with_file_name("summary.json");
    let mut args = vec!["run", wf.to_str().unwrap(), "--jobs", "2", "--summary-json", summary.to_str().unwrap()];
    args.extend(extra);
    hmil_flow(&args);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(summary).unwrap()).unwrap();
    json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_owned(), n["status"].as_str().unwrap().to_owned()))
        .collect()
}

pub fn executed(statuses: &BTreeMap<String, String>) -> Vec<&str> {
    statuses.iter().filter(|(_, s)| *s == "executed").map(|(id, _)| id.as_str()).collect()
}
