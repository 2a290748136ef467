//! The header of every run: date, machine, git revision and durability mode.

use std::process::Command;
use std::time::SystemTime;

/// The broker's durability mode. It has only one: every commit is fsynced before the RPC
/// that caused it returns.
pub const DURABILITY: &str = "fsync per commit";

/// Collects the header fields, in print order.
pub fn collect(broker: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "date",
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        ),
        ("cores", cores()),
        ("cpu", cpu_model()),
        ("memory", memory()),
        ("kernel", kernel()),
        ("git revision", git_revision()),
        ("durability", DURABILITY.to_string()),
        ("broker", broker.to_string()),
    ]
}

fn cores() -> String {
    std::thread::available_parallelism()
        .map(|cores| cores.to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| meminfo_kib(&text, "MemTotal"))
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Returns the value in KiB of field `name` in a `/proc/meminfo` or `/proc/PID/status` text.
pub fn meminfo_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != name {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

fn kernel() -> String {
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        return release.trim().to_string();
    }
    command_output("uname", &["-r"]).unwrap_or_else(|| "unknown".to_string())
}

/// Returns the revision of the repository in the current folder or, failing that, of the
/// one that contains this executable, such as `target/release` of a checkout.
fn git_revision() -> String {
    let beside_executable = std::env::current_exe()
        .ok()
        .and_then(|path| path.parent().map(|dir| dir.to_string_lossy().into_owned()));
    command_output("git", &["rev-parse", "--short", "HEAD"])
        .or_else(|| {
            let dir = beside_executable?;
            command_output("git", &["-C", &dir, "rev-parse", "--short", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_field_in_kib() {
        let text = "MemTotal:       24684544 kB\nMemFree:        20442112 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(24_684_544));
        assert_eq!(meminfo_kib(text, "MemFree"), Some(20_442_112));
        assert_eq!(meminfo_kib(text, "VmRSS"), None);
    }

    #[test]
    fn status_vmrss_in_kib() {
        let text = "Name:\tdocket-broker\nVmPeak:\t  123456 kB\nVmRSS:\t   45678 kB\n";
        assert_eq!(meminfo_kib(text, "VmRSS"), Some(45_678));
    }
}
