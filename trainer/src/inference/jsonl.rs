//! Append-only JSON-lines output that survives a crash: on open, the complete lines are read
//! back and a partial last line (the process died mid-write) is cut off, so a resumed run
//! appends after the last record it can trust.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a JSON object: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// An output file opened for appending, with the records it already held.
pub struct JsonlAppender {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlAppender {
    /// Opens (creating) `path`; returns the appender, the complete records already in the file,
    /// and whether a partial last line was cut off.
    pub fn open(path: &Path) -> Result<(Self, Vec<Value>, bool), JsonlError> {
        let io = |source| JsonlError::Io {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        // Everything after the last newline is an unfinished write.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let repaired = complete < bytes.len();
        let mut records = Vec::new();
        for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(line).map_err(|e| JsonlError::Corrupt {
                path: path.into(),
                line: i + 1,
                message: e.to_string(),
            })?;
            if !v.is_object() {
                return Err(JsonlError::Corrupt {
                    path: path.into(),
                    line: i + 1,
                    message: "not an object".into(),
                });
            }
            records.push(v);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(false)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        file.set_len(complete as u64).map_err(io)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io)?;
        Ok((
            Self {
                path: path.into(),
                out: BufWriter::new(file),
            },
            records,
            repaired,
        ))
    }

    /// Appends one record and flushes it to the OS (a crash after this loses nothing).
    pub fn append(&mut self, v: &Value) -> Result<(), JsonlError> {
        let io = |source| JsonlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(v).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.out.write_all(&line).map_err(io)?;
        self.out.flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_partial_last_line_is_cut_and_appends_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let (mut w, recs, repaired) = JsonlAppender::open(&path).unwrap();
        assert!(repaired);
        assert_eq!(recs, vec![json!({"a":1}), json!({"a":2})]);
        w.append(&json!({"a":3})).unwrap();
        drop(w);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        let (_, recs, repaired) = JsonlAppender::open(&path).unwrap();
        assert!(!repaired);
        assert_eq!(recs.len(), 3);
        std::fs::write(&path, "{\"a\":1}\nnot json\n").unwrap();
        assert!(matches!(
            JsonlAppender::open(&path),
            Err(JsonlError::Corrupt { line: 2, .. })
        ));
    }
}
