//! Running the `docket` command line in tests.

use std::process::{Command, Output};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{WAIT, cli_binary, run_with_timeout};

/// Returns `docket` with `args`, without inherited `DOCKET_*` variables, so that only the
/// arguments configure it.
pub fn docket_command(args: &[&str]) -> Command {
    let mut command = Command::new(cli_binary());
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DOCKET_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `docket` with `args` and returns its output.
pub async fn docket(args: &[&str]) -> Result<Output> {
    run_with_timeout(&mut docket_command(args), WAIT).await
}

/// Runs `docket` with `args`, checks that it exits 0, and returns its stdout.
pub async fn docket_ok(args: &[&str]) -> Result<String> {
    let output = docket(args).await?;
    if !output.status.success() {
        bail!(
            "docket {args:?} exited with {}; stdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Runs `docket --json` with `args`, checks that it exits 0, and parses its stdout.
pub async fn docket_json(args: &[&str]) -> Result<Value> {
    let mut all_args = vec!["--json"];
    all_args.extend_from_slice(args);
    let stdout = docket_ok(&all_args).await?;
    serde_json::from_str(&stdout).with_context(|| format!("stdout is not JSON:\n{stdout}"))
}

/// Returns the string at `pointer` in `document`, failing if it is missing.
pub fn text_at<'a>(document: &'a Value, pointer: &str) -> Result<&'a str> {
    document
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no string at {pointer} in {document:#}"))
}
