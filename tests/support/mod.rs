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

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

/// Captures `tracing` output at `level` and above, written on this thread,
/// until the guard is dropped (a current-thread runtime's tasks included).
pub fn capture_logs(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}
