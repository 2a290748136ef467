//! Rendering of results: aligned text for people, JSON for scripts.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// Formats a protobuf timestamp as RFC 3339 in UTC with milliseconds, or `None` if it is
/// unset or out of chrono's range.
pub fn timestamp(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    let timestamp = timestamp?;
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    let time = DateTime::<Utc>::from_timestamp(timestamp.seconds, nanos)?;
    Some(time.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// Returns a timestamp as a JSON string, or `null` if it is unset.
pub fn timestamp_json(value: Option<&prost_types::Timestamp>) -> Value {
    timestamp(value).map_or(Value::Null, Value::String)
}

/// Returns a timestamp as text, or `-` if it is unset.
pub fn timestamp_text(value: Option<&prost_types::Timestamp>) -> String {
    timestamp(value).unwrap_or_else(|| "-".to_owned())
}

/// Converts a protobuf duration to seconds, 0 if it is unset.
pub fn duration_seconds(duration: Option<&prost_types::Duration>) -> f64 {
    duration.map_or(0.0, |duration| {
        duration.seconds as f64 + f64::from(duration.nanos) / 1e9
    })
}

/// Formats a protobuf duration such as `1h 30m`, rounded to milliseconds.
pub fn duration_text(duration: Option<&prost_types::Duration>) -> String {
    let Some(duration) = duration else {
        return "-".to_owned();
    };
    let millis = u64::try_from(duration.seconds)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(duration.nanos / 1_000_000).unwrap_or(0));
    humantime::format_duration(std::time::Duration::from_millis(millis)).to_string()
}

/// Returns an enum value's protobuf name without its type prefix, such as `PENDING` for
/// `TASK_STATE_PENDING`.
pub fn enum_name<'a>(full_name: &'a str, prefix: &str) -> &'a str {
    full_name.strip_prefix(prefix).unwrap_or(full_name)
}

/// Inserts `bytes` into `object` under `key` as a string if they are UTF-8, and otherwise
/// as hexadecimal under `<key>_hex`.
pub fn insert_bytes(object: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            object.insert(key.to_owned(), json!(text));
        }
        Err(_) => {
            object.insert(format!("{key}_hex"), json!(hex(bytes)));
        }
    }
}

/// Returns `bytes` as text: `(empty)`, the text itself if it is UTF-8, and otherwise its
/// size and hexadecimal form.
pub fn bytes_text(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty)".to_owned();
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("({} bytes, not UTF-8) {}", bytes.len(), hex(bytes)),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Returns headers as a JSON object with sorted keys.
pub fn headers_json(headers: &HashMap<String, String>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = headers.iter().collect();
    json!(sorted)
}

/// Returns headers as `key=value` pairs in key order, separated by commas, or `-`.
pub fn headers_text(headers: &HashMap<String, String>) -> String {
    if headers.is_empty() {
        return "-".to_owned();
    }
    let mut pairs: Vec<String> = headers
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    pairs.sort();
    pairs.join(", ")
}

/// Renders `fields` as `key: value` lines with the values aligned.
pub fn fields_text(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    let mut text = String::new();
    for (key, value) in fields {
        let _ = writeln!(text, "{:<width$} {value}", format!("{key}:"));
    }
    text
}

/// Renders a table with a header row and columns padded to their widest cell.
pub fn table_text(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let mut text = String::new();
    let header_cells: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(&header_cells).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    text
}

/// Prints a result: `document` as pretty JSON with `--json`, and `text` otherwise.
pub fn print(json: bool, document: &Value, text: &str) {
    if json {
        let mut pretty =
            serde_json::to_string_pretty(document).expect("a serde_json Value always serializes");
        pretty.push('\n');
        write_stdout(&pretty);
    } else {
        write_stdout(text);
    }
}

/// Writes `text` to stdout and flushes it. A closed stdout, such as a pipe into `head`,
/// is not an error: the reader has what it wanted.
pub fn write_stdout(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let result = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(err) = result
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("docket: cannot write to stdout: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let rows = vec![vec!["emails".to_owned(), "12".to_owned()]];

        let text = table_text(&["QUEUE", "PENDING"], &rows);

        assert_eq!(text, "QUEUE   PENDING\nemails  12\n");
    }

    #[test]
    fn fields_align_values() {
        let text = fields_text(&[("id", "a".to_owned()), ("state", "b".to_owned())]);

        assert_eq!(text, "id:    a\nstate: b\n");
    }

    #[test]
    fn timestamp_is_rfc3339_utc() {
        let value = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000_000,
        };

        assert_eq!(
            timestamp(Some(&value)).as_deref(),
            Some("2023-11-14T22:13:20.005Z")
        );
        assert_eq!(timestamp(None), None);
    }

    #[test]
    fn invalid_utf8_bytes_become_hex() {
        let mut object = Map::new();

        insert_bytes(&mut object, "payload", &[0xff, 0x01]);

        assert_eq!(object.get("payload_hex"), Some(&json!("ff01")));
        assert_eq!(object.get("payload"), None);
    }
}
