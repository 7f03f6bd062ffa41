//! How commands print: a table on a terminal, JSON under `--json` or when
//! stdout is not a terminal (so scripts get JSON either way), success lines
//! that say what was done, and errors as JSON under `--json`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde_json::Value as Json;

static JSON: AtomicBool = AtomicBool::new(false);

/// Set once, from the global `--json` flag.
pub(crate) fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Whether `--json` was given.
pub(crate) fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Whether output is for a script: `--json`, or stdout is not a terminal.
pub(crate) fn for_scripts() -> bool {
    json() || !std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// Prints a result: JSON for scripts, a table on a terminal.
pub(crate) fn show(v: &Json) {
    if for_scripts() {
        outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        outln!("{}", table(v).trim_end());
    }
}

/// Prints what a changing command did: the sentence, or under `--json`
/// `{"ok": true, "message": …}` plus `extra`'s fields.
pub(crate) fn done(message: &str, extra: Json) {
    if json() {
        let mut out = serde_json::json!({"ok": true, "message": message});
        if let (Json::Object(o), Json::Object(e)) = (&mut out, extra) {
            o.extend(e);
        }
        outln!("{out}");
    } else {
        outln!("{message}");
    }
}

/// An error line for stderr: under `--json`, `{"error": {…}}`.
pub(crate) fn error_line(message: &str, exit_code: u8) -> String {
    if json() {
        serde_json::json!({"error": {"message": message, "exit_code": exit_code}}).to_string()
    } else {
        format!("error: {message}")
    }
}

/// A value as text for one table cell.
fn cell(v: &Json) -> String {
    match v {
        Json::Null => "-".to_owned(),
        Json::String(s) => s.clone(),
        Json::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.iter().map(cell).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

/// A list of objects as columns (the union of their keys, in first-seen
/// order); an object as `key  value` lines; anything else as itself.
pub(crate) fn table(v: &Json) -> String {
    match v {
        Json::Array(rows) if !rows.is_empty() && rows.iter().all(Json::is_object) => {
            let mut columns: Vec<&str> = Vec::new();
            for row in rows {
                for k in row.as_object().into_iter().flat_map(|o| o.keys()) {
                    if !columns.contains(&k.as_str()) {
                        columns.push(k);
                    }
                }
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |items: Vec<String>| {
                let mut s = items
                    .iter()
                    .zip(&widths)
                    .map(|(t, w)| format!("{t:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ");
                s.truncate(s.trim_end().len());
                s + "\n"
            };
            let mut out = line(columns.iter().map(|c| c.to_uppercase()).collect());
            for row in cells {
                out.push_str(&line(row));
            }
            out
        }
        Json::Array(rows) if rows.is_empty() => "(none)\n".to_owned(),
        Json::Object(map) if !map.is_empty() => {
            let width = map.keys().map(String::len).max().unwrap_or(0);
            map.iter()
                .map(|(k, v)| format!("{k:<width$}  {}\n", cell(v)))
                .collect()
        }
        Json::Object(_) => "(none)\n".to_owned(),
        other => format!("{}\n", cell(other)),
    }
}

/// A time as RFC 3339 in UTC, to the second (`2026-11-28T07:32:35Z`).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A unix-milliseconds time as RFC 3339.
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_851_155, "2026-11-28T07:32:35Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01Z");
    }

    #[test]
    fn tables_line_up_columns_and_name_empty_results() {
        let rows = serde_json::json!([
            {"id": "k1", "privileges": ["a", "b"]},
            {"id": "longer", "label": null},
        ]);
        assert_eq!(
            table(&rows),
            "ID      PRIVILEGES  LABEL\nk1      a,b         -\nlonger  -           -\n"
        );
        assert_eq!(table(&serde_json::json!([])), "(none)\n");
        assert_eq!(
            table(&serde_json::json!({"a": 1, "bbb": "x"})),
            "a    1\nbbb  x\n"
        );
    }
}
