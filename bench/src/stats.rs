//! Latency histograms, result rows and their output as a table or as JSON lines.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency that a histogram records, in microseconds (10 minutes). Larger values
/// are recorded as this maximum.
const MAX_LATENCY_US: u64 = 600_000_000;

/// Creates a latency histogram in microseconds with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds are valid")
}

/// Records `latency` in microseconds, at least 1 µs.
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    /// Summarizes `histogram`, or returns `None` when it recorded nothing.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        Some(Latency {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }
}

/// One result line. The JSON fields `target`, `label`, `mode`, `run`, `n`, `secs`, `rate`
/// and the latency percentiles match the lines of the peers' benchmark, so that both can be
/// summarized together.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: &'static str,
    pub label: String,
    pub mode: String,
    /// Case within the mode, such as `batch=100` or `rate=5000`.
    pub case: String,
    pub run: u32,
    /// Tasks counted by the rate.
    pub n: u64,
    pub secs: f64,
    /// Tasks per second.
    pub rate: f64,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub latency: Option<Latency>,
    /// Further figures of the case, such as the offered rate or a memory size.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty", flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Row {
    /// Creates a row of `n` tasks counted over `elapsed`, without latency or extra figures.
    pub fn new(mode: &str, case: impl Into<String>, n: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        Row {
            target: "docket",
            label: String::from("docket"),
            mode: mode.to_string(),
            case: case.into(),
            run: 1,
            n,
            secs,
            rate: if secs > 0.0 { n as f64 / secs } else { 0.0 },
            latency: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Sets the latency percentiles from `histogram`.
    pub fn with_latency(mut self, histogram: &Histogram<u64>) -> Self {
        self.latency = Latency::from_histogram(histogram);
        self
    }

    /// Adds a further figure.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

/// Prints result rows as a table, or as one JSON object per line.
pub struct Printer {
    json: bool,
    label: String,
    run: u32,
    table_header_printed: bool,
}

impl Printer {
    /// Creates a printer; `label` and `run` are copied into every row.
    pub fn new(json: bool, label: String, run: u32) -> Self {
        Printer {
            json,
            label,
            run,
            table_header_printed: false,
        }
    }

    /// Prints `row` at once, so that a long run shows each result as it is measured.
    pub fn print(&mut self, mut row: Row) {
        row.label.clone_from(&self.label);
        row.run = self.run;
        if self.json {
            println!(
                "{}",
                serde_json::to_string(&row).expect("a row serializes to JSON")
            );
            return;
        }
        if !self.table_header_printed {
            println!(
                "{:<9} {:<22} {:>10} {:>8} {:>12} {:>9} {:>9} {:>9} {:>9}  extra",
                "mode", "case", "n", "secs", "tasks/s", "p50 µs", "p99 µs", "p999 µs", "max µs"
            );
            self.table_header_printed = true;
        }
        println!("{}", format_table_line(&row));
    }

    /// Prints the run's header: one JSON object with `"bench": "docket-header"`, or
    /// `key: value` lines.
    pub fn print_header(&self, fields: &[(&str, String)]) {
        if self.json {
            let mut object = serde_json::Map::new();
            object.insert("bench".into(), "docket-header".into());
            for (key, value) in fields {
                object.insert((*key).into(), value.clone().into());
            }
            println!("{}", serde_json::Value::Object(object));
        } else {
            for (key, value) in fields {
                println!("# {key}: {value}");
            }
        }
    }
}

/// Formats one table line: the latency columns show `-` when the row has no latency.
pub fn format_table_line(row: &Row) -> String {
    let column = |value: Option<u64>| value.map_or_else(|| "-".to_string(), group_thousands);
    let latency = row.latency;
    let extra = row
        .extra
        .iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => format!("{key}={text}"),
            other => format!("{key}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{:<9} {:<22} {:>10} {:>8.2} {:>12} {:>9} {:>9} {:>9} {:>9}  {}",
        row.mode,
        row.case,
        group_thousands(row.n),
        row.secs,
        group_thousands(row.rate.round() as u64),
        column(latency.map(|l| l.p50_us)),
        column(latency.map(|l| l.p99_us)),
        column(latency.map(|l| l.p999_us)),
        column(latency.map(|l| l.max_us)),
        extra,
    )
    .trim_end()
    .to_string()
}

/// Formats `value` with a comma between groups of three digits, as in `1,234,567`.
pub fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut output = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            output.push(',');
        }
        output.push(digit);
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_thousands_inserts_commas() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(45_000), "45,000");
        assert_eq!(group_thousands(10_000_000), "10,000,000");
    }

    #[test]
    fn latency_percentiles_of_uniform_values() {
        let mut histogram = new_histogram();
        for micros in 1..=1000 {
            record(&mut histogram, Duration::from_micros(micros));
        }
        let latency = Latency::from_histogram(&histogram).expect("histogram has values");
        assert_eq!(latency.p50_us, 500);
        assert_eq!(latency.p90_us, 900);
        assert_eq!(latency.p99_us, 990);
        assert_eq!(latency.p999_us, 999);
        assert_eq!(latency.max_us, 1000);
    }

    #[test]
    fn latency_of_empty_histogram_is_none() {
        assert_eq!(Latency::from_histogram(&new_histogram()), None);
    }

    #[test]
    fn record_clamps_to_one_microsecond() {
        let mut histogram = new_histogram();
        record(&mut histogram, Duration::from_nanos(10));
        assert_eq!(histogram.min(), 1);
    }

    #[test]
    fn row_json_has_peer_fields() {
        let mut histogram = new_histogram();
        record(&mut histogram, Duration::from_micros(250));
        let row = Row::new("e2e", "rate=5000", 10_000, Duration::from_secs(2))
            .with_latency(&histogram)
            .with("offered_rate", 5000);
        let value = serde_json::to_value(&row).expect("row serializes");
        assert_eq!(value["target"], "docket");
        assert_eq!(value["mode"], "e2e");
        assert_eq!(value["n"], 10_000);
        assert_eq!(value["rate"], 5000.0);
        assert_eq!(value["p50_us"], 250);
        assert_eq!(value["offered_rate"], 5000);
    }

    #[test]
    fn table_line_without_latency_shows_dashes() {
        let row = Row::new("enqueue", "batch=1000", 200_000, Duration::from_secs(1));
        let line = format_table_line(&row);
        assert!(line.starts_with("enqueue   batch=1000"), "line: {line}");
        assert!(line.contains("200,000"), "line: {line}");
        assert_eq!(line.matches(" -").count(), 4, "line: {line}");
    }
}
