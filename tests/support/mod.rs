//! Shared helpers of the integration tests: the built binary, temp dirs, corpus paths.

#![allow(dead_code)]

pub mod dlq;
pub mod e2e;
pub mod script;
pub mod server;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `claygate` binary cargo built for these tests.
pub fn claygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_claygate"))
}

/// Runs `claygate` with `args` and returns what it did.
pub fn run(args: &[&str]) -> Output {
    claygate()
        .args(args)
        .env_remove("CLAYGATE_ADMIN_TOKEN")
        .output()
        .expect("the claygate binary runs")
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path under `tests/corpus`.
pub fn corpus(rel: &str) -> PathBuf {
    repo().join("tests").join("corpus").join(rel)
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// Standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
