//! Reading Persona-Chat rows from a local `.jsonl`, `.json` or `.parquet` file, a directory of
//! parquet shards, or a hub dataset (its parquet files, downloaded into the HF cache).
//! Every problem names the file, the row (1-based) and the column.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::{Array, LargeListArray, LargeStringArray, ListArray, RecordBatch, StringArray};
use serde_json::Value;

use crate::row::{PersonaForm, PersonaRow, split_facts};

/// The default data set.
pub const DEFAULT_DATASET: &str = "Cynaptics/persona-chat";
const COLUMNS: [&str; 4] = ["conv_id", "persona_b", "dialogue", "reference"];
/// A JSONL line longer than this is refused (real rows are ~1 KB).
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// A `.json` file larger than this is refused (use JSONL or parquet for big data).
pub const MAX_JSON_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: row {row}: column {column}: {msg}")]
    Row {
        path: PathBuf,
        row: usize,
        column: String,
        msg: String,
    },
    #[error(transparent)]
    Hub(#[from] phitune_model::Error),
}

fn file_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// What to do with invalid rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip (and count) invalid rows instead of failing on the first one.
    pub skip_invalid: bool,
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub rows: Vec<PersonaRow>,
    /// One message per skipped row (file, row, column, reason).
    pub skipped: Vec<String>,
    pub files: Vec<PathBuf>,
    /// Valid rows whose `persona_b` was a list of facts, and those where it was one string
    /// (split into facts at sentence ends).
    pub persona_lists: usize,
    pub persona_texts: usize,
}

impl Loaded {
    fn push(
        &mut self,
        path: &Path,
        row: usize,
        parsed: Result<(PersonaRow, PersonaForm), (String, String)>,
        opts: LoadOptions,
    ) -> Result<(), DataError> {
        let checked = parsed.and_then(|(r, form)| r.validate().map(|_| (r, form)));
        match checked {
            Ok((r, form)) => {
                match form {
                    PersonaForm::List => self.persona_lists += 1,
                    PersonaForm::Text => self.persona_texts += 1,
                }
                self.rows.push(r)
            }
            Err((column, msg)) => {
                let e = DataError::Row {
                    path: path.to_path_buf(),
                    row,
                    column,
                    msg,
                };
                if !opts.skip_invalid {
                    return Err(e);
                }
                self.skipped.push(e.to_string());
            }
        }
        Ok(())
    }
}

/// Loads `--data`: an existing file or directory, else a hub dataset id.
pub fn load_source(
    spec: &str,
    revision: Option<&str>,
    opts: LoadOptions,
) -> Result<Loaded, DataError> {
    let path = Path::new(spec);
    if path.exists() {
        return load_path(path, opts);
    }
    let looks_local = spec.starts_with('.')
        || spec.starts_with('/')
        || spec.contains('\\')
        || spec.ends_with(".jsonl")
        || spec.ends_with(".json")
        || spec.ends_with(".parquet");
    if looks_local || phitune_model::io::hub::validate_repo_id(spec).is_err() {
        return Err(file_err(
            path,
            "no such data file or directory (and not a hub dataset id like Cynaptics/persona-chat)",
        ));
    }
    load_files(&hub_parquet_files(spec, revision)?, opts)
}

/// A file, or every `.parquet` / `.jsonl` file in a directory (sorted by name).
pub fn load_path(path: &Path, opts: LoadOptions) -> Result<Loaded, DataError> {
    if !path.is_dir() {
        return load_file(path, opts);
    }
    let mut files = Vec::new();
    collect_data_files(path, &mut files, 0).map_err(|e| file_err(path, e.to_string()))?;
    files.sort();
    if files.is_empty() {
        return Err(file_err(
            path,
            "directory holds no .parquet, .jsonl or .json files",
        ));
    }
    load_files(&files, opts)
}

/// Loads several files in order into one set of rows.
pub fn load_files(files: &[PathBuf], opts: LoadOptions) -> Result<Loaded, DataError> {
    let mut all = Loaded::default();
    for f in files {
        let part = load_file(f, opts)?;
        all.rows.extend(part.rows);
        all.skipped.extend(part.skipped);
        all.files.extend(part.files);
        all.persona_lists += part.persona_lists;
        all.persona_texts += part.persona_texts;
    }
    Ok(all)
}

fn collect_data_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
    if depth > 4 {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect_data_files(&p, out, depth + 1)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("parquet" | "jsonl" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

pub fn load_file(path: &Path, opts: LoadOptions) -> Result<Loaded, DataError> {
    let mut loaded = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => load_jsonl(path, opts)?,
        Some("json") => load_json(path, opts)?,
        Some("parquet") => load_parquet(path, opts)?,
        _ => {
            return Err(file_err(
                path,
                "unsupported data file (expected .jsonl, .json or .parquet)",
            ));
        }
    };
    loaded.files.push(path.to_path_buf());
    Ok(loaded)
}

fn open(path: &Path) -> Result<File, DataError> {
    File::open(path).map_err(|e| file_err(path, e.to_string()))
}

/// Parses one row from a JSON object, naming the column at fault.
fn row_from_json(v: &Value) -> Result<(PersonaRow, PersonaForm), (String, String)> {
    let obj = v
        .as_object()
        .ok_or(("(row)".to_string(), "is not a JSON object".to_string()))?;
    let field = |c: &str| obj.get(c).ok_or((c.to_string(), "is missing".to_string()));
    let string = |c: &str| -> Result<String, (String, String)> {
        match field(c)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) if c == "conv_id" => Ok(n.to_string()),
            other => Err((
                c.to_string(),
                format!("expected a string, found {}", kind(other)),
            )),
        }
    };
    let list = |c: &str| -> Result<Vec<String>, (String, String)> {
        match field(c)? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => Ok(s.clone()),
                    other => Err((
                        format!("{c}[{i}]"),
                        format!("expected a string, found {}", kind(other)),
                    )),
                })
                .collect(),
            other => Err((
                c.to_string(),
                format!("expected a list of strings, found {}", kind(other)),
            )),
        }
    };
    let (persona_b, form) = match field("persona_b")? {
        Value::String(s) => (split_facts(s), PersonaForm::Text),
        Value::Array(_) => (list("persona_b")?, PersonaForm::List),
        other => {
            return Err((
                "persona_b".into(),
                format!(
                    "expected a list of strings or one string, found {}",
                    kind(other)
                ),
            ));
        }
    };
    let row = PersonaRow {
        conv_id: string("conv_id")?,
        persona_b,
        dialogue: list("dialogue")?,
        reference: string("reference")?,
    };
    Ok((row, form))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn load_jsonl(path: &Path, opts: LoadOptions) -> Result<Loaded, DataError> {
    let mut reader = BufReader::new(open(path)?);
    let mut loaded = Loaded::default();
    let mut buf = Vec::new();
    let mut row = 0;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| file_err(path, e.to_string()))?;
        if n == 0 {
            break;
        }
        row += 1;
        if buf.len() > MAX_LINE_BYTES && !buf.ends_with(b"\n") {
            // Refuse rather than read an unbounded line into memory; no resync is attempted.
            return Err(DataError::Row {
                path: path.to_path_buf(),
                row,
                column: "(row)".into(),
                msg: format!("line is longer than {MAX_LINE_BYTES} bytes"),
            });
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim(),
            Err(e) => {
                let parsed = Err(("(row)".to_string(), format!("not valid UTF-8 ({e})")));
                loaded.push(path, row, parsed, opts)?;
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(text)
            .map_err(|e| ("(row)".to_string(), format!("invalid JSON: {e}")))
            .and_then(|v| row_from_json(&v));
        loaded.push(path, row, parsed, opts)?;
    }
    Ok(loaded)
}

fn load_json(path: &Path, opts: LoadOptions) -> Result<Loaded, DataError> {
    let file = open(path)?;
    let len = file
        .metadata()
        .map_err(|e| file_err(path, e.to_string()))?
        .len();
    if len > MAX_JSON_BYTES {
        return Err(file_err(
            path,
            format!(
                "{len} bytes is more than the {MAX_JSON_BYTES}-byte limit for .json; use .jsonl or .parquet"
            ),
        ));
    }
    let v: Value = serde_json::from_reader(BufReader::new(file))
        .map_err(|e| file_err(path, format!("invalid JSON: {e}")))?;
    let items = match v {
        Value::Array(items) => items,
        _ => return Err(file_err(path, "expected a JSON array of row objects")),
    };
    let mut loaded = Loaded::default();
    for (i, item) in items.iter().enumerate() {
        loaded.push(path, i + 1, row_from_json(item), opts)?;
    }
    Ok(loaded)
}

/// Values of a string column (Utf8 or LargeUtf8); None for nulls.
fn strings(batch: &RecordBatch, col: &str) -> Result<Vec<Option<String>>, String> {
    let a = batch.column_by_name(col).ok_or("is missing")?;
    if let Some(s) = a.as_any().downcast_ref::<StringArray>() {
        return Ok(s.iter().map(|x| x.map(String::from)).collect());
    }
    if let Some(s) = a.as_any().downcast_ref::<LargeStringArray>() {
        return Ok(s.iter().map(|x| x.map(String::from)).collect());
    }
    Err(format!("expected a string column, found {}", a.data_type()))
}

/// Values of a list-of-strings column; None for null lists, Err in the inner vec for null items.
fn string_lists(
    batch: &RecordBatch,
    col: &str,
) -> Result<Vec<Option<Vec<Option<String>>>>, String> {
    let a = batch.column_by_name(col).ok_or("is missing")?;
    let inner = |v: std::sync::Arc<dyn Array>| -> Result<Vec<Option<String>>, String> {
        if let Some(s) = v.as_any().downcast_ref::<StringArray>() {
            return Ok(s.iter().map(|x| x.map(String::from)).collect());
        }
        if let Some(s) = v.as_any().downcast_ref::<LargeStringArray>() {
            return Ok(s.iter().map(|x| x.map(String::from)).collect());
        }
        Err(format!(
            "expected a list of strings, found a list of {}",
            v.data_type()
        ))
    };
    if let Some(l) = a.as_any().downcast_ref::<ListArray>() {
        return l.iter().map(|x| x.map(inner).transpose()).collect();
    }
    if let Some(l) = a.as_any().downcast_ref::<LargeListArray>() {
        return l.iter().map(|x| x.map(inner).transpose()).collect();
    }
    Err(format!(
        "expected a list of strings, found {}",
        a.data_type()
    ))
}

/// The `persona_b` column: a list of facts per row, or one string per row split into facts.
#[allow(clippy::type_complexity)]
fn persona_column(
    batch: &RecordBatch,
) -> Result<(Vec<Option<Vec<Option<String>>>>, PersonaForm), String> {
    match strings(batch, "persona_b") {
        Ok(texts) => {
            let facts = texts
                .into_iter()
                .map(|t| t.map(|t| split_facts(&t).into_iter().map(Some).collect()))
                .collect();
            Ok((facts, PersonaForm::Text))
        }
        Err(_) => Ok((string_lists(batch, "persona_b")?, PersonaForm::List)),
    }
}

fn load_parquet(path: &Path, opts: LoadOptions) -> Result<Loaded, DataError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| file_err(path, format!("not a readable parquet file: {e}")))?;
    let schema = builder.schema().clone();
    for c in COLUMNS {
        if schema.field_with_name(c).is_err() {
            return Err(DataError::Row {
                path: path.to_path_buf(),
                row: 1,
                column: c.into(),
                msg: "is missing from the file's schema".into(),
            });
        }
    }
    let reader = builder
        .with_batch_size(4096)
        .build()
        .map_err(|e| file_err(path, format!("not a readable parquet file: {e}")))?;
    let mut loaded = Loaded::default();
    let mut base = 0;
    for batch in reader {
        let batch = batch.map_err(|e| file_err(path, format!("reading failed: {e}")))?;
        let col_err = |c: &str, m: String| DataError::Row {
            path: path.to_path_buf(),
            row: base + 1,
            column: c.into(),
            msg: m,
        };
        let ids = strings(&batch, "conv_id").map_err(|m| col_err("conv_id", m))?;
        let refs = strings(&batch, "reference").map_err(|m| col_err("reference", m))?;
        let (personas, form) = persona_column(&batch).map_err(|m| col_err("persona_b", m))?;
        let dialogues = string_lists(&batch, "dialogue").map_err(|m| col_err("dialogue", m))?;
        for i in 0..batch.num_rows() {
            let not_null =
                |c: &str, v: Option<String>| v.ok_or((c.to_string(), "is null".to_string()));
            let list = |c: &str,
                        v: Option<Vec<Option<String>>>|
             -> Result<Vec<String>, (String, String)> {
                v.ok_or((c.to_string(), "is null".to_string()))?
                    .into_iter()
                    .enumerate()
                    .map(|(j, s)| s.ok_or((format!("{c}[{j}]"), "is null".to_string())))
                    .collect()
            };
            let parsed = (|| {
                let row = PersonaRow {
                    conv_id: not_null("conv_id", ids[i].clone())?,
                    persona_b: list("persona_b", personas[i].clone())?,
                    dialogue: list("dialogue", dialogues[i].clone())?,
                    reference: not_null("reference", refs[i].clone())?,
                };
                Ok((row, form))
            })();
            loaded.push(path, base + i + 1, parsed, opts)?;
        }
        base += batch.num_rows();
    }
    Ok(loaded)
}

/// The parquet files of a hub dataset revision, from the HF cache or downloaded into it.
pub fn hub_parquet_files(id: &str, revision: Option<&str>) -> Result<Vec<PathBuf>, DataError> {
    let repo = phitune_model::io::hub::HubRepo::new(id, hf_hub::RepoType::Dataset, revision)?;
    if let Some(snapshot) = repo.cached_snapshot() {
        let mut files = Vec::new();
        collect_data_files(&snapshot, &mut files, 0)
            .map_err(|e| file_err(&snapshot, e.to_string()))?;
        files.retain(|f| f.extension().is_some_and(|e| e == "parquet"));
        files.sort();
        if !files.is_empty() && (phitune_model::io::hub::offline() || repo.list_remote().is_err()) {
            return Ok(files);
        }
    }
    let mut names: Vec<String> = repo
        .list_remote()?
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(phitune_model::Error::Hub(format!(
            "{id}: the dataset repo has no parquet files"
        ))
        .into());
    }
    names
        .iter()
        .map(|n| repo.get(n).map_err(DataError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("phitune-load-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const FACTS: &str = "i love dogs. i work at a bakery! do i sleep late? always";
    const SPLIT: [&str; 4] = [
        "i love dogs.",
        "i work at a bakery!",
        "do i sleep late?",
        "always",
    ];

    /// Reformatted copies of Persona-Chat store `persona_b` as one string of sentences: such
    /// rows load with the string split into facts, and the form is counted.
    #[test]
    fn persona_as_one_string_is_split_into_facts_in_jsonl_and_parquet() {
        let dir = scratch("persona-text");
        let jsonl = dir.join("rows.jsonl");
        let text_row = serde_json::json!({"conv_id": "a", "persona_b": FACTS,
            "dialogue": ["hi"], "reference": "hello"});
        let list_row = serde_json::json!({"conv_id": "b", "persona_b": ["i am tall."],
            "dialogue": ["hi"], "reference": "hey"});
        std::fs::write(&jsonl, format!("{text_row}\n{list_row}\n")).unwrap();
        let loaded = load_path(&jsonl, LoadOptions::default()).unwrap();
        assert_eq!(loaded.rows[0].persona_b, SPLIT);
        assert_eq!(loaded.rows[1].persona_b, ["i am tall."]);
        assert_eq!((loaded.persona_lists, loaded.persona_texts), (1, 1));

        // Parquet with a string column for persona_b.
        let parquet = dir.join("rows.parquet");
        let mut dialogue = ListBuilder::new(StringBuilder::new());
        dialogue.values().append_value("hi");
        dialogue.append(true);
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("conv_id", Arc::new(StringArray::from(vec!["a"]))),
            ("persona_b", Arc::new(StringArray::from(vec![FACTS]))),
            ("dialogue", Arc::new(dialogue.finish())),
            ("reference", Arc::new(StringArray::from(vec!["hello"]))),
        ];
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let file = File::create(&parquet).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let loaded = load_path(&parquet, LoadOptions::default()).unwrap();
        assert_eq!(loaded.rows[0].persona_b, SPLIT);
        assert_eq!((loaded.persona_lists, loaded.persona_texts), (0, 1));

        // A string of nothing but blanks is still refused, naming the column.
        std::fs::write(
            &jsonl,
            r#"{"conv_id": "a", "persona_b": "   ", "dialogue": ["hi"], "reference": "x"}"#,
        )
        .unwrap();
        let err = load_path(&jsonl, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("column persona_b"), "{err}");
    }
}
