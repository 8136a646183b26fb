//! The headers (gRPC metadata) sent with every export: `otlp.headers` from the config, and
//! secrets from files, such as a mounted Kubernetes Secret: `otlp.headers_file` (`name: value`
//! lines) and `otlp.header_files` (`{name: file}`, the file's content is the value). The files
//! are read at start (a bad one refuses the start) and re-read when they change, checked at
//! most once a second on export; a change that does not parse keeps the previous headers.
//! Values never reach a log line, an error message or a metric: they are marked sensitive, and
//! errors name the file and line only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// How often the files are looked at (a stat each), at most.
const RECHECK: Duration = Duration::from_secs(1);

/// What identifies one version of a file: a Secret update swaps a symlink, so the inode
/// changes even when the size and the second do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Re-reads of changed header files, for `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub struct Headers {
    fixed: Vec<(HeaderName, HeaderValue)>,
    lines_file: Option<PathBuf>,
    value_files: Vec<(HeaderName, PathBuf)>,
    state: Mutex<State>,
    pub reloads: ReloadCounts,
}

#[derive(Debug)]
struct State {
    current: Arc<HeaderMap>,
    stamps: Vec<Option<Stamp>>,
    checked: Instant,
}

fn header_name(name: &str, what: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .with_context(|| format!("{what}: invalid header name {name:?}"))
}

fn sensitive(v: &str, what: &str) -> Result<HeaderValue> {
    // The value is not in the message: it may be the secret.
    let mut v = HeaderValue::from_str(v.trim())
        .map_err(|_| anyhow::anyhow!("{what}: not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// `name: value` lines; blank lines and `#` comments are skipped.
fn parse_lines(text: &str, file: &Path) -> Result<Vec<(HeaderName, HeaderValue)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let what = || format!("otlp.headers_file {} line {}", file.display(), i + 1);
        // Neither the name nor the value is quoted back: a malformed line may hold the secret.
        let Some((k, v)) = t.split_once(':') else {
            bail!("{}: not `name: value`", what());
        };
        let k = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| anyhow::anyhow!("{}: not a valid header name", what()))?;
        out.push((k, sensitive(v, &what())?));
    }
    if out.is_empty() {
        bail!(
            "otlp.headers_file {}: no `name: value` line in it",
            file.display()
        );
    }
    Ok(out)
}

impl Headers {
    /// Checks the config's headers and reads the files; an error names the bad one.
    pub fn load(
        fixed: &BTreeMap<String, String>,
        headers_file: Option<&Path>,
        header_files: &BTreeMap<String, PathBuf>,
    ) -> Result<Headers> {
        let fixed = fixed
            .iter()
            .map(|(k, v)| {
                Ok((
                    header_name(k, "otlp.headers")?,
                    sensitive(v, &format!("otlp.headers: value of {k:?}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let value_files = header_files
            .iter()
            .map(|(k, p)| Ok((header_name(k, "otlp.header_files")?, p.clone())))
            .collect::<Result<_>>()?;
        let mut h = Headers {
            fixed,
            lines_file: headers_file.map(Path::to_path_buf),
            value_files,
            state: Mutex::new(State {
                current: Arc::default(),
                stamps: Vec::new(),
                checked: Instant::now(),
            }),
            reloads: ReloadCounts::default(),
        };
        let (map, stamps) = h.read()?;
        let st = h.state.get_mut().expect("headers lock");
        st.current = Arc::new(map);
        st.stamps = stamps;
        Ok(h)
    }

    /// Whether any header comes from a file.
    pub fn from_files(&self) -> bool {
        self.lines_file.is_some() || !self.value_files.is_empty()
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        self.lines_file
            .as_deref()
            .into_iter()
            .chain(self.value_files.iter().map(|(_, p)| p.as_path()))
    }

    /// The headers now, and the stamps of the files they came from (taken before reading, so
    /// a change during the read is seen at the next check).
    fn read(&self) -> Result<(HeaderMap, Vec<Option<Stamp>>)> {
        let stamps = self.paths().map(stamp).collect();
        let mut map = HeaderMap::new();
        for (k, v) in &self.fixed {
            map.insert(k.clone(), v.clone());
        }
        if let Some(f) = &self.lines_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading otlp.headers_file {}", f.display()))?;
            for (k, v) in parse_lines(&text, f)? {
                map.insert(k, v);
            }
        }
        for (k, f) in &self.value_files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading otlp.header_files.{k} {}", f.display()))?;
            let what = format!("otlp.header_files.{k} {}", f.display());
            anyhow::ensure!(!text.trim().is_empty(), "{what}: empty");
            map.insert(k.clone(), sensitive(&text, &what)?);
        }
        Ok((map, stamps))
    }

    /// The headers to send, after re-reading files that changed (looked at once a second).
    pub fn current(&self) -> Arc<HeaderMap> {
        let mut st = self.state.lock().expect("headers lock");
        if !self.from_files() || st.checked.elapsed() < RECHECK {
            return st.current.clone();
        }
        st.checked = Instant::now();
        let now: Vec<Option<Stamp>> = self.paths().map(stamp).collect();
        if now == st.stamps {
            return st.current.clone();
        }
        match self.read() {
            Ok((map, stamps)) => {
                tracing::info!(headers = map.len(), "OTLP header files changed: re-read");
                self.reloads.ok.fetch_add(1, Ordering::Relaxed);
                st.current = Arc::new(map);
                st.stamps = stamps;
            }
            Err(e) => {
                // Keep sending the previous headers; try again when the files change again.
                tracing::warn!(error = %format!("{e:#}"), "OTLP header files changed but cannot be used; keeping the previous headers");
                self.reloads.failed.fetch_add(1, Ordering::Relaxed);
                st.stamps = now;
            }
        }
        st.current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(test: &str, name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("llmslo-otlp-headers-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn files_are_read_and_checked_without_quoting_the_secret() {
        let lines = tmp("files", "lines");
        std::fs::write(
            &lines,
            "# from a Secret\nAuthorization: Bearer s3cr3t-aaaa\n\nx-tenant: t1\n",
        )
        .unwrap();
        let one = tmp("files", "one");
        std::fs::write(&one, "key-bbbb\n").unwrap();
        let fixed = BTreeMap::from([("x-tenant".to_string(), "t0".to_string())]);
        let per = BTreeMap::from([("X-Api-Key".to_string(), one.clone())]);
        let h = Headers::load(&fixed, Some(&lines), &per).unwrap();
        let m = h.current();
        assert_eq!(m["authorization"], "Bearer s3cr3t-aaaa");
        assert_eq!(m["x-tenant"], "t1", "the file overrides the config");
        assert_eq!(m["x-api-key"], "key-bbbb", "the trailing newline is cut");
        assert!(m["authorization"].is_sensitive());
        assert!(!format!("{h:?}").contains("s3cr3t"), "Debug hides values");

        for (text, says) in [
            ("Bearer s3cr3t-cccc\n", "line 1: not `name: value`"),
            ("# only\n\n", "no `name: value` line"),
            ("bad name s3cr3t: x\n", "line 1: not a valid header name"),
            ("a: s3cr3t\u{7f}\n", "line 1: not a valid header value"),
        ] {
            std::fs::write(&lines, text).unwrap();
            let e = format!(
                "{:#}",
                Headers::load(&fixed, Some(&lines), &per).unwrap_err()
            );
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(e.contains(&lines.display().to_string()), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
        let missing = tmp("files", "missing");
        let e = format!(
            "{:#}",
            Headers::load(&fixed, Some(&missing), &BTreeMap::new()).unwrap_err()
        );
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(lines.parent().unwrap());
    }

    #[test]
    fn a_changed_file_is_re_read_and_a_broken_change_keeps_the_old_headers() {
        let f = tmp("reload", "f");
        std::fs::write(&f, "authorization: Bearer one\n").unwrap();
        let h = Headers::load(&BTreeMap::new(), Some(&f), &BTreeMap::new()).unwrap();
        assert_eq!(h.current()["authorization"], "Bearer one");
        // As a Secret update does: a new file renamed over the old one.
        let next = tmp("reload", "f.new");
        std::fs::write(&next, "authorization: Bearer two\n").unwrap();
        std::fs::rename(&next, &f).unwrap();
        h.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(h.current()["authorization"], "Bearer two");
        std::fs::write(&next, "garbage\n").unwrap();
        std::fs::rename(&next, &f).unwrap();
        h.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(h.current()["authorization"], "Bearer two");
        assert_eq!(h.reloads.ok.load(Ordering::Relaxed), 1);
        assert_eq!(h.reloads.failed.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(f.parent().unwrap());
    }
}
