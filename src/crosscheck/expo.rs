//! Just enough of the Prometheus text exposition (0.0.4, and the OpenMetrics subset servers
//! send) to read histogram families: `name{labels} value [timestamp]` lines, label values with
//! escapes, `+Inf`/`NaN`. Everything else (comments, other families, malformed lines) is
//! skipped. The input is another process's output: nothing here panics, and sizes are bounded.

/// One sample line that passed `want`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// What a parse found.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub samples: Vec<Sample>,
    /// Lines that looked like samples (any family) and parsed.
    pub good_lines: usize,
    /// Lines that were neither comments, blank, nor valid samples.
    pub bad_lines: usize,
}

/// Lines longer than this are skipped (counted bad): no exposition needs them.
pub const MAX_LINE: usize = 64 * 1024;
/// Labels of one sample beyond this make the line bad.
pub const MAX_LABELS: usize = 32;
/// Samples kept at most (of the wanted families).
pub const MAX_SAMPLES: usize = 100_000;

/// Parses `text`, keeping the samples whose metric name `want` accepts.
pub fn parse(text: &str, want: impl Fn(&str) -> bool) -> Parsed {
    let mut out = Parsed::default();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if line.len() > MAX_LINE {
            out.bad_lines += 1;
            continue;
        }
        match parse_line(t, &want) {
            Some(Some(s)) => {
                out.good_lines += 1;
                if out.samples.len() < MAX_SAMPLES {
                    out.samples.push(s);
                }
            }
            Some(None) => out.good_lines += 1,
            None => out.bad_lines += 1,
        }
    }
    out
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit()
}

/// None: malformed. Some(None): valid but not wanted (labels are not parsed then).
fn parse_line(line: &str, want: &impl Fn(&str) -> bool) -> Option<Option<Sample>> {
    let b = line.as_bytes();
    if !is_name_start(*b.first()?) {
        return None;
    }
    let end = b.iter().position(|&c| !is_name_char(c)).unwrap_or(b.len());
    let name = &line[..end];
    let mut rest = &line[end..];
    let wanted = want(name);
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (ls, after) = parse_labels(r, wanted)?;
        labels = ls;
        rest = after;
    }
    // Value, then an optional timestamp (ignored).
    let mut fields = rest.split_ascii_whitespace();
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let value = parse_value(fields.next()?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(wanted.then(|| Sample {
        name: name.to_string(),
        labels,
        value,
    }))
}

/// Parses `a="x",b="y"}` and returns the labels (when `keep`) and the text after `}`.
fn parse_labels(mut s: &str, keep: bool) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    let mut n = 0;
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((out, after));
        }
        let b = s.as_bytes();
        if !is_name_start(*b.first()?) {
            return None;
        }
        let end = b.iter().position(|&c| !is_name_char(c))?;
        let key = &s[..end];
        s = s[end..].trim_start().strip_prefix('=')?.trim_start();
        s = s.strip_prefix('"')?;
        let mut val = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    '\\' => val.push('\\'),
                    '"' => val.push('"'),
                    // Unknown escapes are kept as written (Prometheus does the same).
                    other => {
                        val.push('\\');
                        val.push(other);
                    }
                },
                c => val.push(c),
            }
        };
        s = &s[close + 1..];
        n += 1;
        if n > MAX_LABELS {
            return None;
        }
        if keep {
            out.push((key.to_string(), val));
        }
        s = s.trim_start();
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf`, `NaN` (case as Prometheus accepts).
pub fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => {
            // Rust would also take "infinity" and the like; Prometheus would not.
            if v.bytes()
                .any(|c| c.is_ascii_alphabetic() && c != b'e' && c != b'E')
            {
                return None;
            }
            v.parse().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_labels_and_escapes() {
        let text = "# HELP x_seconds help \\n text\n# TYPE x_seconds histogram\n\
            x_seconds_bucket{model_name=\"a \\\"b\\\" \\\\ c\\nd\",le=\"0.5\"} 3.0\n\
            x_seconds_bucket{le=\"+Inf\" , model_name=\"m\",} 4 1700000000000\n\
            x_seconds_count 4\r\n\
            other_total{a=\"b\"} 9\n\
            x_seconds_sum NaN\n";
        let p = parse(text, |n| n.starts_with("x_seconds"));
        assert_eq!(p.bad_lines, 0);
        assert_eq!(p.good_lines, 5);
        assert_eq!(p.samples.len(), 4);
        assert_eq!(
            p.samples[0].labels,
            vec![
                ("model_name".to_string(), "a \"b\" \\ c\nd".to_string()),
                ("le".to_string(), "0.5".to_string())
            ]
        );
        assert_eq!(p.samples[0].value, 3.0);
        assert_eq!(p.samples[1].value, 4.0);
        assert_eq!(p.samples[1].labels[0].1, "+Inf");
        assert_eq!(p.samples[2].name, "x_seconds_count");
        assert!(p.samples[3].value.is_nan());
    }

    #[test]
    fn garbage_is_counted_never_panics() {
        let bad = [
            "x{",
            "x{a=\"b}",
            "x{a=b} 1",
            "x{a=\"b\" c=\"d\"} 1",
            "x 1 2 3",
            "x",
            "x{}",
            "x{} infinity",
            "1x 2",
            "x{a=\"\\",
            "x{\u{e9}=\"1\"} 1",
            "x{a=\"1\"}1",
            "{\"quoted.name\"} 1",
        ];
        for l in bad {
            let p = parse(l, |_| true);
            assert_eq!((p.good_lines, p.bad_lines), (0, 1), "{l:?}");
        }
        let many: String = (0..40).map(|i| format!("l{i}=\"v\",")).collect();
        assert_eq!(parse(&format!("x{{{many}}} 1"), |_| true).bad_lines, 1);
        let long = format!("x{{a=\"{}\"}} 1", "y".repeat(MAX_LINE));
        assert_eq!(parse(&long, |_| true).bad_lines, 1);
        // Arbitrary bytes, decoded lossily, as the scraper would.
        let junk: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let p = parse(&String::from_utf8_lossy(&junk), |_| true);
        assert!(p.samples.len() <= p.good_lines);
    }

    #[test]
    fn unwanted_families_skip_label_parsing() {
        let p = parse("a{x=\"1\"} 1\nb{y=\"2\"} 2\n", |n| n == "b");
        assert_eq!(p.good_lines, 2);
        assert_eq!(p.samples.len(), 1);
        assert_eq!(p.samples[0].labels, vec![("y".into(), "2".into())]);
    }
}
