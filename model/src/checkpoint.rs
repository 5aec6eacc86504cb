//! Hugging Face checkpoints on disk: `config.json` plus safetensors weights, either one
//! `model.safetensors` or shards listed by `model.safetensors.index.json`.
//!
//! Loading memory-maps each file, checks every tensor's name, dtype and shape against
//! [`param_specs`] and converts to the requested dtype and device; any mismatch is an
//! error naming the file and tensor. Saving writes the same layout transformers writes,
//! sharded above a size threshold.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{param_specs, Weights};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// Files besides the weights that make a checkpoint directory usable by transformers,
/// vLLM and our own tokenizer; copied by [`copy_auxiliary_files`].
pub const AUXILIARY_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Reads `dir/config.json` and the weights, converting them to `kind` (the checkpoint's
/// own dtype when `None`) on `device`.
pub fn load_pretrained(
    dir: impl AsRef<Path>,
    device: Device,
    kind: Option<Kind>,
) -> Result<(ModelConfig, Weights)> {
    let dir = dir.as_ref();
    let cfg = ModelConfig::from_dir(dir)?;
    let weights = load_weights(dir, &cfg, device, kind.unwrap_or(cfg.dtype))?;
    Ok((cfg, weights))
}

/// The weight files of a checkpoint directory and, when sharded, which tensor is where.
/// Tensor name -> shard file name, from `model.safetensors.index.json`.
type WeightMap = BTreeMap<String, String>;

fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::config(&index, "missing object \"weight_map\""))?;
        let mut weight_map = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::config(&index, format!("weight_map[{name:?}] is not a file name"))
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(ModelError::config(
                    &index,
                    format!("weight_map[{name:?}] = {file:?} is not a file in the directory"),
                ));
            }
            weight_map.insert(name.clone(), file.to_string());
        }
        let files: std::collections::BTreeSet<&String> = weight_map.values().collect();
        let files = files.into_iter().map(|f| dir.join(f)).collect();
        return Ok((files, Some(weight_map)));
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok((vec![single], None));
    }
    Err(ModelError::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"),
        ),
    ))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    match kind {
        Kind::Float => Ok(Dtype::F32),
        Kind::BFloat16 => Ok(Dtype::BF16),
        Kind::Half => Ok(Dtype::F16),
        other => Err(ModelError::Input(format!(
            "cannot save weights as {other:?}; use float32, bfloat16 or float16"
        ))),
    }
}

/// Checkpoint keys that transformers ignores on load and so do we.
fn ignored(name: &str, cfg: &ModelConfig) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Loads and validates the weights of `dir` for `cfg`.
pub fn load_weights(dir: &Path, cfg: &ModelConfig, device: Device, kind: Kind) -> Result<Weights> {
    let specs: HashMap<String, Vec<i64>> = param_specs(cfg)
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    let (files, weight_map) = weight_files(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut unexpected = vec![];
    for path in &files {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and dropped before returning; a checkpoint being
        // rewritten while it is loaded is outside what any loader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Some(map) = &weight_map {
            let present: HashSet<String> = st.names().into_iter().map(str::to_string).collect();
            let file_name = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            if let Some((name, _)) = map
                .iter()
                .find(|(n, f)| f.as_str() == file_name && !present.contains(*n))
            {
                return Err(ModelError::IndexMismatch {
                    path: path.clone(),
                    name: name.clone(),
                });
            }
        }
        for (name, view) in st.tensors() {
            if ignored(&name, cfg) {
                continue;
            }
            let Some(expected) = specs.get(&name) else {
                unexpected.push(name);
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if &shape != expected {
                return Err(ModelError::ShapeMismatch {
                    path: path.clone(),
                    name,
                    expected: expected.clone(),
                    found: shape,
                });
            }
            let src_kind = kind_of(view.dtype()).ok_or_else(|| ModelError::UnsupportedDtype {
                path: path.clone(),
                name: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let t = Tensor::f_from_data_size(view.data(), &shape, src_kind)?
                .f_to_kind(kind)?
                .f_to_device(device)?;
            tensors.insert(name, t);
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(ModelError::UnexpectedTensors {
            dir: dir.to_path_buf(),
            names: unexpected,
        });
    }
    let mut missing: Vec<String> = specs
        .keys()
        .filter(|n| !tensors.contains_key(*n))
        .cloned()
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(ModelError::MissingTensors {
            dir: dir.to_path_buf(),
            names: missing,
        });
    }
    Weights::from_source(cfg, &mut tensors).map_err(|e| ModelError::MissingTensors {
        dir: dir.to_path_buf(),
        names: vec![e.name],
    })
}

/// A tensor's bytes in a given dtype, ready for a safetensors file.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostTensor {
    fn new(t: &Tensor, kind: Kind) -> Result<Self> {
        let dtype = dtype_of(kind)?;
        let t = t
            .f_detach()?
            .f_to_kind(kind)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        Ok(HostTensor { dtype, shape, data })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Flushes `path` (a file, or a directory's entries) to stable storage.
fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// Writes `dir/config.json` and the weights in `kind`, as transformers'
/// `save_pretrained` does: one `model.safetensors` when everything fits in
/// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards and an index.
pub fn save_pretrained(
    dir: impl AsRef<Path>,
    cfg: &ModelConfig,
    weights: &Weights,
    kind: Kind,
    max_shard_bytes: u64,
) -> Result<()> {
    let dir = dir.as_ref();
    dtype_of(kind)?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_json(kind)).expect("a JSON value serialises");
    std::fs::write(&config_path, text + "\n").map_err(|e| ModelError::io(&config_path, e))?;
    sync_path(&config_path)?;
    // Remove weight files of an earlier save so no stale shard is picked up.
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == INDEX_FILE || (name.starts_with("model") && name.ends_with(".safetensors")) {
            std::fs::remove_file(&path).map_err(|e| ModelError::io(&path, e))?;
        }
    }

    // Plan the shards by byte size, in parameter order.
    let named = weights.named();
    let elt = kind.elt_size_in_bytes() as u64;
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut current = 0u64;
    let mut total = 0u64;
    for (i, (_, t)) in named.iter().enumerate() {
        let bytes = t.numel() as u64 * elt;
        if current > 0 && current + bytes > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("never empty").push(i);
        current += bytes;
        total += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (s, members) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, n)
        };
        let host = members
            .iter()
            .map(|&i| Ok((named[i].0.clone(), HostTensor::new(named[i].1, kind)?)))
            .collect::<Result<Vec<_>>>()?;
        for (name, _) in &host {
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        let path = dir.join(&file);
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(host.iter().map(|(n, t)| (n, t)), Some(meta), &path)
            .map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        sync_path(&path)?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("a JSON value serialises");
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))?;
        sync_path(&path)?;
    }
    // Every file is durable; now the directory entries that name them.
    sync_path(dir)
}

/// Copies tokenizer, chat-template and generation-config files from `src` to `dst`
/// where they exist, so an exported checkpoint is complete.
pub fn copy_auxiliary_files(src: &Path, dst: &Path) -> Result<()> {
    for name in AUXILIARY_FILES {
        let from = src.join(name);
        if from.exists() {
            let to = dst.join(name);
            std::fs::copy(&from, &to).map_err(|e| ModelError::io(&from, e))?;
            sync_path(&to)?;
        }
    }
    sync_path(dst)
}

/// Writes to `dir` a randomly initialised f32 checkpoint shaped like the one in `base`
/// with `overrides` applied to its config.json (`layer_types` follows
/// `num_hidden_layers`), plus `base`'s tokenizer files, for benchmarks that need a model
/// of a given size. Weights come from seed 0; a `dir` that already holds a config.json
/// is kept as it is. Returns the config and the weights.
pub fn write_random_like(
    base: &Path,
    dir: &Path,
    overrides: &[(&str, Value)],
) -> Result<(ModelConfig, Weights)> {
    let path = base.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut raw: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    for (k, v) in overrides {
        raw[*k] = v.clone();
    }
    let layers = raw["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    raw["layer_types"] = json!(vec!["full_attention"; layers]);
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg = ModelConfig::from_json(raw, &dir.join("config.json"))?;
    tch::manual_seed(0);
    let w = Weights::random(&cfg, Kind::Float, Device::Cpu);
    if !dir.join("config.json").exists() {
        crate::save_pretrained(dir, &cfg, &w, Kind::Float, DEFAULT_MAX_SHARD_BYTES)?;
        copy_auxiliary_files(base, dir)?;
    }
    Ok((cfg, w))
}
