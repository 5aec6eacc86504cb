//! Every field of TRL's GRPOConfig / SFTConfig (with transformers' TrainingArguments),
//! TRL's ModelConfig and ScriptArguments, and open-r1's script arguments, fed with its
//! TRL default to the config loader: none may be an unknown key. Each is accepted with
//! its meaning, accepted with exactly one warning that says what happens instead, or
//! refused with a reason naming the key.
//!
//! The list is scripts/checks/trl_fields.txt, written by scripts/checks/trl_fields.py
//! from the installed TRL (this test needs neither TRL nor Python).
use std::collections::BTreeMap;

use serde_json::{Map, Value};
use trainer::config::{load_with_env, ConfigError, Loaded, Recipe, RecipeWarning};
use trainer::grpo::GrpoConfig;
use trainer::sft::SftConfig;

struct Field {
    command: String,
    source: String,
    name: String,
    default: Value,
}

fn fields() -> Vec<Field> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/checks/trl_fields.txt"
    );
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 4, "bad line in trl_fields.txt: {l:?}");
            Field {
                command: cols[0].into(),
                source: cols[1].into(),
                name: cols[2].into(),
                default: serde_json::from_str(cols[3])
                    .unwrap_or_else(|e| panic!("{}: default {:?}: {e}", cols[2], cols[3])),
            }
        })
        .collect()
}

/// Loads `{model_name_or_path, output_dir, <field>: <default>}` as a JSON config file.
fn load_one<T: Recipe>(f: &Field) -> Result<Loaded<T>, ConfigError> {
    let mut table = Map::new();
    table.insert("model_name_or_path".into(), "m".into());
    table.insert("output_dir".into(), "o".into());
    // TRL's null for the two required settings means "must be given": keep ours.
    if !(f.default.is_null() && table.contains_key(&f.name)) {
        table.insert(f.name.clone(), f.default.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.json");
    std::fs::write(&path, Value::Object(table).to_string()).unwrap();
    load_with_env::<T>(Some(&path), &[], Vec::<(String, String)>::new())
}

#[derive(Default)]
struct Outcome {
    accepted: Vec<String>,
    warned: BTreeMap<String, String>,
    refused: BTreeMap<String, String>,
    unknown: Vec<String>,
    wrong: Vec<String>,
}

fn classify<T: Recipe>(f: &Field, out: &mut Outcome) {
    let label = format!("{} {} ({})", f.command, f.name, f.source);
    match load_one::<T>(f) {
        Ok(l) => {
            let mine: Vec<&RecipeWarning> = l.warnings.iter().filter(|w| w.key == f.name).collect();
            if l.warnings.len() != mine.len() || mine.len() > 1 {
                out.wrong
                    .push(format!("{label}: warnings {:?}", l.warnings));
            } else if let Some(w) = mine.first() {
                if w.message.trim().is_empty() {
                    out.wrong.push(format!("{label}: empty warning"));
                }
                out.warned.insert(label, w.message.clone());
            } else {
                out.accepted.push(label);
            }
        }
        Err(ConfigError::UnknownKeys { .. }) => out.unknown.push(label),
        Err(e) => {
            let text = e.to_string();
            if text.contains(&f.name) {
                out.refused.insert(label, text);
            } else {
                out.wrong
                    .push(format!("{label}: error does not name the field: {text}"));
            }
        }
    }
}

#[test]
fn every_trl_and_open_r1_field_is_accepted_warned_or_refused_never_unknown() {
    let fields = fields();
    assert!(fields.len() > 300, "only {} fields listed", fields.len());
    let mut out = Outcome::default();
    for f in &fields {
        match f.command.as_str() {
            "grpo" => classify::<GrpoConfig>(f, &mut out),
            "sft" => classify::<SftConfig>(f, &mut out),
            other => panic!("{}: unknown command {other:?}", f.name),
        }
    }
    for (k, v) in &out.refused {
        eprintln!("refused: {k}: {v}");
    }
    eprintln!(
        "{} fields: {} accepted, {} warned, {} refused at their TRL default",
        fields.len(),
        out.accepted.len(),
        out.warned.len(),
        out.refused.len()
    );
    assert!(out.unknown.is_empty(), "unknown keys: {:#?}", out.unknown);
    assert!(out.wrong.is_empty(), "{:#?}", out.wrong);
    // A TRL default asks for nothing this system lacks, so none is refused.
    assert!(
        out.refused.is_empty(),
        "refused at their defaults: {:#?}",
        out.refused
    );
}
