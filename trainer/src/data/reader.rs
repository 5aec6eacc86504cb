//! Dataset files to rows: JSON lines and Parquet, one file or a directory of shards.
//!
//! Every row becomes a JSON object, so the loaders above see one representation whatever
//! the file format. Parquet records (including nested `list<struct<role, content>>`
//! message columns as pyarrow writes them) convert through the `parquet` crate's record
//! API; a null cell becomes JSON `null`, binary cells become base64 strings.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::{Map, Value};

use super::{DataError, DataFormat};

/// One row: its columns, or why it could not be parsed.
pub type Row = Result<Map<String, Value>, MalformedRow>;

/// Why one row of a readable file is not a JSON object; the message names the line (JSON
/// lines) or the element (a JSON array).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedRow {
    #[error("line {line}: not valid UTF-8: {source}")]
    Utf8 {
        line: usize,
        source: std::str::Utf8Error,
    },
    #[error("line {line}: a row must be a JSON object, got {found}")]
    LineNotObject { line: usize, found: &'static str },
    /// `message` is serde_json's (which is not `Clone`; rows are kept and reported later).
    #[error("line {line}: invalid JSON: {message}")]
    Json { line: usize, message: String },
    #[error("array element {index}: a row must be a JSON object, got {found}")]
    ElementNotObject { index: usize, found: &'static str },
}

/// The rows of one file.
#[derive(Debug)]
pub(crate) struct Shard {
    pub path: PathBuf,
    pub rows: Vec<Row>,
}

/// Reads every row of `path` (a file, or a directory of shards in name order) as a JSON
/// object. A row that cannot be parsed (invalid JSON, not an object) is an `Err(reason)`
/// in its place, so row indices stay aligned with the file; a file that cannot be read at
/// all (missing, not Parquet, corrupt) is a [`DataError`]. Blank lines of JSONL files are
/// not rows.
pub fn read_rows(path: &Path, format: DataFormat) -> Result<Vec<Row>, DataError> {
    Ok(read_shards(path, format)?
        .into_iter()
        .flat_map(|shard| shard.rows)
        .collect())
}

/// [`read_rows`], keeping the rows of each file apart.
pub(crate) fn read_shards(path: &Path, format: DataFormat) -> Result<Vec<Shard>, DataError> {
    let io = |source| DataError::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let files = if meta.is_dir() {
        list_shards(path, format)?
    } else {
        vec![(path.to_path_buf(), resolve_format(path, format)?)]
    };
    read_listed(files)
}

/// The rows of each of `files` (e.g. the files of a Hub dataset's split), in order.
pub(crate) fn read_files(files: Vec<PathBuf>, format: DataFormat) -> Result<Vec<Shard>, DataError> {
    let listed = files
        .into_iter()
        .map(|f| resolve_format(&f, format).map(|k| (f, k)))
        .collect::<Result<Vec<_>, _>>()?;
    read_listed(listed)
}

fn read_listed(files: Vec<(PathBuf, DataFormat)>) -> Result<Vec<Shard>, DataError> {
    files
        .into_iter()
        .map(|(file, format)| {
            let rows = match format {
                DataFormat::Parquet => read_parquet(&file)?,
                _ => read_json_rows(&file)?,
            };
            Ok(Shard { path: file, rows })
        })
        .collect()
}

/// The format of a file: `format` itself unless it is `Auto`.
fn resolve_format(path: &Path, format: DataFormat) -> Result<DataFormat, DataError> {
    if format != DataFormat::Auto {
        return Ok(format);
    }
    match path.extension().and_then(OsStr::to_str) {
        Some("jsonl" | "json") => Ok(DataFormat::Jsonl),
        Some("parquet") => Ok(DataFormat::Parquet),
        _ => Err(DataError::UnknownFormat { path: path.into() }),
    }
}

/// The data files of `dir` in name order, each with its format.
fn list_shards(dir: &Path, format: DataFormat) -> Result<Vec<(PathBuf, DataFormat)>, DataError> {
    let io = |source| DataError::Io {
        path: dir.into(),
        source,
    };
    let wanted: &[&str] = match format {
        DataFormat::Auto => &["parquet", "jsonl", "json"],
        DataFormat::Jsonl => &["jsonl", "json"],
        DataFormat::Parquet => &["parquet"],
    };
    let mut shards = Vec::new();
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = path.extension().and_then(OsStr::to_str).unwrap_or("");
        // Follows symlinks, as shard directories often link into a cache.
        let is_file = path.is_file();
        if is_file && !name.starts_with('.') && wanted.contains(&ext) {
            shards.push(path);
        } else {
            others.push(name);
        }
    }
    if shards.is_empty() {
        others.sort();
        return Err(DataError::NoShards {
            dir: dir.into(),
            wanted: match format {
                DataFormat::Auto => "*.parquet, *.jsonl or *.json",
                DataFormat::Jsonl => "*.jsonl or *.json",
                DataFormat::Parquet => "*.parquet",
            },
            found: if others.is_empty() {
                "nothing".into()
            } else {
                others.join(", ")
            },
        });
    }
    shards.sort();
    shards
        .into_iter()
        .map(|path| {
            let format = resolve_format(&path, format)?;
            Ok((path, format))
        })
        .collect()
}

/// JSON lines; a file whose first non-blank byte is `[` is read as one JSON array of rows
/// instead (the other layout `datasets` loads from `.json`).
fn read_json_rows(path: &Path) -> Result<Vec<Row>, DataError> {
    let io = |source| DataError::Io {
        path: path.into(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let first = loop {
        let buf = reader.fill_buf().map_err(io)?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == Some(b'[') {
        return read_json_array(path, reader);
    }
    let mut rows = Vec::new();
    let mut line = Vec::new();
    let mut line_no = 0usize;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        rows.push(parse_line(&line, line_no));
    }
    Ok(rows)
}

fn parse_line(line: &[u8], line_no: usize) -> Row {
    let text = std::str::from_utf8(line).map_err(|source| MalformedRow::Utf8 {
        line: line_no,
        source,
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(MalformedRow::LineNotObject {
            line: line_no,
            found: super::type_name(&other),
        }),
        Err(e) => Err(MalformedRow::Json {
            line: line_no,
            message: e.to_string(),
        }),
    }
}

fn read_json_array(path: &Path, mut reader: impl Read) -> Result<Vec<Row>, DataError> {
    let mut text = String::new();
    reader
        .read_to_string(&mut text)
        .map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
    let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(map) => Ok(map),
            other => Err(MalformedRow::ElementNotObject {
                index: i,
                found: super::type_name(&other),
            }),
        })
        .collect())
}

/// Every row of a Parquet file, all columns, as JSON objects.
/// The parquet crate's record reader asserts (panics) on some malformed schemas, e.g.
/// a LIST group whose child is not REPEATED: such a file is an error naming it.
fn read_parquet(path: &Path) -> Result<Vec<Row>, DataError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_parquet_rows(path)))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the decoder failed");
            let why: String = why.chars().take(300).collect();
            Err(DataError::Parquet {
                path: path.into(),
                row: None,
                message: why,
            })
        })
}

fn read_parquet_rows(path: &Path) -> Result<Vec<Row>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let parquet_err = |row: Option<usize>, e: parquet::errors::ParquetError| DataError::Parquet {
        path: path.into(),
        row,
        message: e.to_string(),
    };
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(None, e))?;
    let expected = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| parquet_err(None, e))?;
    let mut rows = Vec::with_capacity(expected);
    for (i, record) in iter.enumerate() {
        let record = record.map_err(|e| parquet_err(Some(i), e))?;
        let map: Map<String, Value> = record
            .get_column_iter()
            .map(|(name, field)| (name.clone(), field.to_json_value()))
            .collect();
        rows.push(Ok(map));
    }
    if rows.len() != expected {
        return Err(DataError::Parquet {
            path: path.into(),
            row: None,
            message: format!(
                "footer says {expected} rows but {} were decoded",
                rows.len()
            ),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_keep_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            b"{\"prompt\": \"a\"}\n\n[1, 2]\n{\"prompt\": \nnot json\n{\"prompt\": \"\xff\"}\n{\"prompt\": \"b\", \"n\": 2}",
        )
        .unwrap();
        let rows = read_rows(&path, DataFormat::Auto).unwrap();
        assert_eq!(rows.len(), 6, "{rows:?}");
        assert_eq!(rows[0].as_ref().unwrap()["prompt"], "a");
        assert!(rows[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("line 3: a row must be a JSON object, got a list"));
        assert!(rows[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("line 4: invalid JSON"));
        assert!(rows[3]
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("line 5: invalid JSON"));
        assert!(rows[4].as_ref().unwrap_err().to_string().contains("UTF-8"));
        assert_eq!(rows[5].as_ref().unwrap()["n"], 2);
    }

    #[test]
    fn json_array_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        std::fs::write(&path, "  \n[{\"prompt\": \"a\"}, 3]").unwrap();
        let rows = read_rows(&path, DataFormat::Auto).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("array element 1"));
        std::fs::write(&path, "[{\"prompt\": \"a\"}").unwrap();
        assert!(matches!(
            read_rows(&path, DataFormat::Auto),
            Err(DataError::Json { .. })
        ));
    }

    #[test]
    fn formats_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("d.txt");
        std::fs::write(&txt, "{\"prompt\": \"a\"}\n").unwrap();
        let err = read_rows(&txt, DataFormat::Auto).unwrap_err();
        assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
        assert_eq!(read_rows(&txt, DataFormat::Jsonl).unwrap().len(), 1);

        let err = read_rows(dir.path(), DataFormat::Auto).unwrap_err();
        assert!(err.to_string().contains("found: d.txt"), "{err}");
        std::fs::write(dir.path().join("b.jsonl"), "{\"i\": 1}\n{\"i\": 2}\n").unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"i\": 0}\n").unwrap();
        std::fs::write(dir.path().join(".hidden.jsonl"), "{\"i\": 9}\n").unwrap();
        let rows = read_rows(dir.path(), DataFormat::Auto).unwrap();
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.as_ref().unwrap()["i"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, [0, 1, 2]);

        let missing = dir.path().join("nope.jsonl");
        let err = read_rows(&missing, DataFormat::Auto).unwrap_err();
        assert!(err.to_string().contains("nope.jsonl"), "{err}");
    }

    #[test]
    fn not_parquet_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.parquet");
        std::fs::write(&path, "{\"prompt\": \"a\"}\n").unwrap();
        let err = read_rows(&path, DataFormat::Auto).unwrap_err();
        assert!(matches!(err, DataError::Parquet { .. }), "{err}");
        assert!(err.to_string().contains("d.parquet"), "{err}");
    }
}
