//! Clients in other languages against a real broker: the Python test in
//! tests/clients/python (grpcio, stubs generated from `proto/` by grpcio-tools at run time)
//! and the Node.js test in tests/clients/node (@grpc/grpc-js and @grpc/proto-loader).
//!
//! Each test starts a broker with a 200 ms heartbeat interval, runs one script with the
//! broker's address in `DOCKET_BROKER`, and fails with the script's output if the script
//! fails or reports no passed test. A missing Python package or `node_modules` folder
//! fails the test with the command that installs it.
//!
//! A third test checks that every code block of docs/clients.md marked
//! `<!-- same as tests/clients/... -->` appears, line for line up to indentation, in the
//! file it names, so that the documented Python and Node.js code is the tested code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_tests::{BrokerProcess, run_with_timeout, temp_dir};

/// Upper bound on one script's run, which takes about 6 s on an idle machine.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Heartbeat interval of the broker, short so that the scripts see heartbeats quickly.
const HEARTBEAT_INTERVAL: &str = "200ms";

const PYTHON_INSTALL: &str = "python3 -m pip install -r tests/clients/python/requirements.txt";

const NODE_INSTALL: &str = "npm ci --prefix tests/clients/node";

#[tokio::test(flavor = "multi_thread")]
async fn python_client_drives_broker() -> Result<()> {
    require_python_packages()?;
    let dir = temp_dir();
    let broker =
        BrokerProcess::start(dir.path(), &["--heartbeat-interval", HEARTBEAT_INTERVAL]).await?;

    let script = clients_dir().join("python/test_broker.py");
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .env("DOCKET_BROKER", broker.addr().to_string());
    let output = run_with_timeout(&mut command, RUN_LIMIT).await?;

    // unittest reports on stderr, in a line such as "Ran 9 tests in 5.9s".
    let report = String::from_utf8_lossy(&output.stderr);
    let ran = report
        .lines()
        .find_map(|line| line.strip_prefix("Ran ")?.split_whitespace().next())
        .and_then(|count| count.parse::<u32>().ok());
    check_run("Python", &output, ran)
}

#[tokio::test(flavor = "multi_thread")]
async fn node_client_drives_broker() -> Result<()> {
    require_node_modules()?;
    let dir = temp_dir();
    let broker =
        BrokerProcess::start(dir.path(), &["--heartbeat-interval", HEARTBEAT_INTERVAL]).await?;

    let script = clients_dir().join("node/broker.test.js");
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-reporter=tap"])
        .arg(&script)
        .env("DOCKET_BROKER", broker.addr().to_string());
    let output = run_with_timeout(&mut command, RUN_LIMIT).await?;

    // The TAP reporter ends with summary lines such as "# pass 9" and "# fail 0".
    let report = String::from_utf8_lossy(&output.stdout);
    let passed = report
        .lines()
        .find_map(|line| line.strip_prefix("# pass "))
        .and_then(|count| count.trim().parse::<u32>().ok());
    check_run("Node.js", &output, passed)
}

#[test]
fn docs_snippets_match_client_tests() -> Result<()> {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent folder")?;
    let docs_path = repository.join("docs/clients.md");
    let docs = std::fs::read_to_string(&docs_path)
        .with_context(|| format!("failed to read {}", docs_path.display()))?;

    let blocks = marked_blocks(&docs)?;
    for source in [
        "tests/clients/python/test_broker.py",
        "tests/clients/node/broker.test.js",
    ] {
        let count = blocks.iter().filter(|block| block.source == source).count();
        if count < MIN_BLOCKS_PER_SOURCE {
            bail!(
                "docs/clients.md marks {count} code blocks as `{SNIPPET_MARK} {source} -->`, \
                 expected at least {MIN_BLOCKS_PER_SOURCE}"
            );
        }
    }

    for block in &blocks {
        let path = repository.join(&block.source);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let file_lines: Vec<&str> = text.lines().map(str::trim).collect();
        let block_lines: Vec<&str> = block.lines.iter().map(|line| line.trim()).collect();
        let found = file_lines
            .windows(block_lines.len())
            .any(|window| window == block_lines.as_slice());
        if !found {
            bail!(
                "the code block at docs/clients.md line {} is not in {} line for line; copy \
                 it again from the file:\n{}",
                block.line,
                block.source,
                block.lines.join("\n")
            );
        }
    }
    Ok(())
}

/// Start of the HTML comment that marks a code block of docs/clients.md as a copy.
const SNIPPET_MARK: &str = "<!-- same as";

/// Minimum number of marked blocks per client test file, so that dropping the marks fails.
const MIN_BLOCKS_PER_SOURCE: usize = 4;

/// A code block of docs/clients.md that must appear in `source`.
struct MarkedBlock {
    /// Path of the file relative to the repository.
    source: String,
    /// Line number of the mark, from 1.
    line: usize,
    lines: Vec<String>,
}

/// Collects each fenced code block that follows a `<!-- same as PATH -->` line.
fn marked_blocks(docs: &str) -> Result<Vec<MarkedBlock>> {
    let mut blocks = Vec::new();
    let mut lines = docs.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(SNIPPET_MARK) else {
            continue;
        };
        let source = rest.trim_end_matches("-->").trim().to_string();
        let fence = lines.next().map(|(_, fence)| fence.trim());
        if !fence.is_some_and(|fence| fence.starts_with("```")) {
            bail!(
                "docs/clients.md line {}: the mark is not followed by a fenced code block",
                index + 1
            );
        }
        let body: Vec<String> = lines
            .by_ref()
            .map(|(_, line)| line)
            .take_while(|line| line.trim() != "```")
            .map(str::to_string)
            .collect();
        if body.is_empty() {
            bail!(
                "docs/clients.md line {}: the marked code block is empty",
                index + 1
            );
        }
        blocks.push(MarkedBlock {
            source,
            line: index + 1,
            lines: body,
        });
    }
    Ok(blocks)
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Fails with the script's output unless it exited 0 and reported at least one test.
fn check_run(language: &str, output: &Output, tests_run: Option<u32>) -> Result<()> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the {language} client test failed ({}); stdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
    }
    match tests_run {
        Some(count) if count > 0 => Ok(()),
        _ => bail!(
            "the {language} client test exited 0 but reported no test run; \
             stdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

/// Fails with the install command when grpcio, grpcio-tools or protobuf is missing.
fn require_python_packages() -> Result<()> {
    let output = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, google.protobuf"])
        .stdin(Stdio::null())
        .output()
        .context("failed to run python3, which the Python client test needs")?;
    if !output.status.success() {
        bail!(
            "the Python client test needs grpcio, grpcio-tools and protobuf: install them \
             with `{PYTHON_INSTALL}`\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Fails with the install command when Node.js or the test's `node_modules` is missing.
fn require_node_modules() -> Result<()> {
    let output = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .context("failed to run node, which the Node.js client test needs (version 20 or newer)")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let major = version
        .strip_prefix('v')
        .and_then(|rest| rest.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    // node:test and its TAP reporter exist from Node.js 18.15 on. The test was written
    // and run on Node.js 20.
    if major.is_none_or(|major| major < 20) {
        bail!("the Node.js client test needs Node.js 20 or newer, found {version:?}");
    }

    let modules = clients_dir().join("node/node_modules");
    for package in ["@grpc/grpc-js", "@grpc/proto-loader"] {
        let manifest = modules.join(package).join("package.json");
        if !manifest.is_file() {
            bail!(
                "{} not found: the Node.js client test needs {package}; install its \
                 packages with `{NODE_INSTALL}`",
                manifest.display()
            );
        }
    }
    Ok(())
}
