//! Hugging Face `config.json` of the Qwen2, Qwen3 (dense) and Llama families.
//!
//! Both the transformers 4.x layout (`rope_theta` + `rope_scaling`, `torch_dtype`) and the
//! 5.x layout (`rope_parameters`, `dtype`) are read. The original JSON is kept, so a
//! checkpoint saved by this crate carries every field the source had (generation ids,
//! `transformers_version`, ...) and transformers and vLLM load it back unchanged.
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::Kind;

use crate::error::{ModelError, Result};

/// The supported architectures. They differ in which projections carry biases (Qwen2:
/// q/k/v always; Llama and Qwen3: per `attention_bias`, Llama also `mlp_bias`) and in
/// Qwen3's per-head RMSNorm of queries and keys before RoPE (`q_norm`, `k_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Qwen3,
    Llama,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        }
    }
}

/// RoPE frequency scaling, as transformers' `ROPE_INIT_FUNCTIONS` define it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Position interpolation: `inv_freq / factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling of long wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of `config.json` the transformer needs, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj and v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers o_proj too; Qwen2 has none).
    pub o_bias: bool,
    /// Bias on gate/up/down projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys (weights `[head_dim]`) before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The dtype the checkpoint declares (`dtype` or `torch_dtype`; float32 when absent).
    pub dtype: Kind,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// The parsed `config.json`, written back by [`ModelConfig::to_json`].
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        Self::from_json(raw, &path)
    }

    /// Parses a config.json value; `path` only names the source in errors.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let r = Reader { raw: &raw, path };
        let architecture = r.architecture()?;
        let hidden_size = r.req_i64("hidden_size")?;
        let num_attention_heads = r.req_i64("num_attention_heads")?;
        let num_key_value_heads = r
            .opt_i64("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match r.opt_i64("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads <= 0 || hidden_size % num_attention_heads != 0 {
                    return Err(r.err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads \
                         ({num_attention_heads}) and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let (rope_theta, rope_scaling) = r.rope()?;
        let attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Qwen3 | Architecture::Llama => (attention_bias, attention_bias),
        };
        let mlp_bias = match architecture {
            Architecture::Qwen2 | Architecture::Qwen3 => false,
            Architecture::Llama => r.opt_bool("mlp_bias")?.unwrap_or(false),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: r.req_i64("vocab_size")?,
            hidden_size,
            intermediate_size: r.req_i64("intermediate_size")?,
            num_hidden_layers: usize::try_from(r.req_i64("num_hidden_layers")?)
                .map_err(|_| r.err("num_hidden_layers must not be negative"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.opt_i64("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            dtype: r.dtype()?,
            bos_token_id: r.opt_i64("bos_token_id")?,
            eos_token_ids: r.token_ids("eos_token_id")?,
            raw: raw.clone(),
        };
        r.check_unsupported()?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field checks; every error names the fields involved.
    fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(ModelError::config(path, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v <= 0 {
                return err(format!("{name} must be positive, got {v}"));
            }
        }
        if self.num_hidden_layers == 0 {
            return err("num_hidden_layers must be positive, got 0".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return err(format!(
                "num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return err(format!(
                "head_dim must be even for RoPE, got {}",
                self.head_dim
            ));
        }
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return err(format!(
                "rms_norm_eps ({}) and rope_theta ({}) must be positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    pub fn num_key_value_groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The config.json to write beside weights saved in `dtype`.
    pub fn to_json(&self, dtype: Kind) -> Value {
        let mut raw = self.raw.clone();
        if let Value::Object(map) = &mut raw {
            let name = Value::String(dtype_name(dtype).to_string());
            if map.contains_key("torch_dtype") {
                map.insert("torch_dtype".into(), name.clone());
            }
            map.insert("dtype".into(), name);
        }
        raw
    }
}

/// transformers' name of a dtype (`float32`, `bfloat16`, `float16`).
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Parses `float32` / `bfloat16` / `float16` (also `f32`, `bf16`, `fp16`, ...).
pub fn parse_dtype(name: &str) -> Option<Kind> {
    match name.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" | "float" => Some(Kind::Float),
        "bfloat16" | "bf16" => Some(Kind::BFloat16),
        "float16" | "f16" | "fp16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

/// Typed access to the JSON with errors that name the file and the field.
struct Reader<'a> {
    raw: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::config(PathBuf::from(self.path), message)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be an integer, got {v}"))),
        }
    }

    fn req_i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?
            .ok_or_else(|| self.err(format!("missing required field {key}")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        opt_f64_in(self.raw, key).map_err(|m| self.err(m.to_string()))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be true or false, got {v}"))),
        }
    }

    /// `eos_token_id` may be one id or a list of ids.
    fn token_ids(&self, key: &str) -> Result<Vec<i64>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| self.err(format!("{key} must hold integers, got {v}")))
                })
                .collect(),
            Some(v) => Ok(vec![v.as_i64().ok_or_else(|| {
                self.err(format!("{key} must be an integer or a list, got {v}"))
            })?]),
        }
    }

    fn architecture(&self) -> Result<Architecture> {
        let model_type = self.get("model_type").and_then(Value::as_str);
        let arch0 = self
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        match (model_type, arch0) {
            (Some("qwen2"), _) | (None, Some("Qwen2ForCausalLM")) => Ok(Architecture::Qwen2),
            (Some("qwen3"), _) | (None, Some("Qwen3ForCausalLM")) => Ok(Architecture::Qwen3),
            (Some("llama"), _) | (None, Some("LlamaForCausalLM")) => Ok(Architecture::Llama),
            (found, arch) => Err(ModelError::UnsupportedArchitecture {
                path: self.path.to_path_buf(),
                found: found.or(arch).unwrap_or("<none>").to_string(),
            }),
        }
    }

    fn dtype(&self) -> Result<Kind> {
        match self.get("dtype").or_else(|| self.get("torch_dtype")) {
            None => Ok(Kind::Float),
            Some(Value::String(s)) => parse_dtype(s).ok_or_else(|| {
                self.err(format!(
                    "dtype {s:?} is not supported; use float32, bfloat16 or float16"
                ))
            }),
            Some(v) => Err(self.err(format!("dtype must be a string, got {v}"))),
        }
    }

    /// RoPE base and scaling, from `rope_parameters` (transformers 5) or
    /// `rope_theta` + `rope_scaling` (transformers 4).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self.get("rope_parameters");
        let scaling = params.or_else(|| self.get("rope_scaling"));
        let theta = match params.map(|p| opt_f64_in(p, "rope_theta")).transpose() {
            Ok(Some(Some(t))) => t,
            Ok(_) => self.opt_f64("rope_theta")?.unwrap_or(10000.0),
            Err(m) => return Err(self.err(format!("rope_parameters: {m}"))),
        };
        let Some(s) = scaling else {
            return Ok((theta, RopeScaling::Default));
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let field = |key: &str| -> Result<f64> {
            opt_f64_in(s, key)
                .map_err(|m| self.err(format!("rope scaling: {m}")))?
                .ok_or_else(|| self.err(format!("rope scaling of type {kind} needs {key}")))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: field("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            },
            other => {
                return Err(self.err(format!(
                    "rope type {other:?} is not supported; supported: default, linear, llama3"
                )))
            }
        };
        Ok((theta, scaling))
    }

    /// Features these architectures allow that the transformer does not implement.
    fn check_unsupported(&self) -> Result<()> {
        if let Some(act) = self.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(self.err(format!("hidden_act {act:?} is not supported; only silu")));
            }
        }
        if self.opt_bool("use_sliding_window")? == Some(true) {
            return Err(self.err(format!(
                "use_sliding_window = true (sliding_window {}) is not supported: every layer \
                 attends to the whole sequence here; set use_sliding_window to false only if the \
                 model was trained without it",
                self.get("sliding_window")
                    .map_or("unset".into(), |v| v.to_string())
            )));
        }
        if let Some(Value::Array(types)) = self.get("layer_types") {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(self.err(format!(
                    "layer_types entry {t} is not supported; only full_attention"
                )));
            }
        }
        Ok(())
    }
}

/// True for finite numbers above zero (false for NaN).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A config.json entry that should be a number and is not.
#[derive(Debug, thiserror::Error)]
#[error("{key} must be a number, got {value}")]
struct NotANumber {
    key: String,
    value: Value,
}

fn opt_f64_in(v: &Value, key: &str) -> std::result::Result<Option<f64>, NotANumber> {
    match v.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| NotANumber {
            key: key.into(),
            value: x.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2})
    }

    #[test]
    fn reads_transformers4_rope_layout() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        v["torch_dtype"] = json!("bfloat16");
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.dtype, Kind::BFloat16);
        assert_eq!(c.head_dim, 16);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_defaults() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        let c = parse(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.dtype, Kind::Float);
        assert_eq!(c.num_key_value_groups(), 2);
    }

    #[test]
    fn errors_name_the_problem() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("num_attention_heads (4) is not divisible by num_key_value_heads (3)"),
            "{e}"
        );

        let mut v = base();
        v["hidden_size"] = json!(66);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size (66) is not divisible"), "{e}");

        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture \"gpt2\""), "{e}");

        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("missing required field vocab_size"), "{e}");

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("rope type \"yarn\" is not supported"), "{e}");

        let mut v = base();
        v["hidden_size"] = json!("64");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size must be an integer"), "{e}");
    }

    #[test]
    fn to_json_keeps_fields_and_sets_dtype() {
        let mut v = base();
        v["torch_dtype"] = json!("float32");
        v["custom_field"] = json!([1, 2]);
        let c = parse(v).unwrap();
        let out = c.to_json(Kind::BFloat16);
        assert_eq!(out["torch_dtype"], json!("bfloat16"));
        assert_eq!(out["dtype"], json!("bfloat16"));
        assert_eq!(out["custom_field"], json!([1, 2]));
    }

    #[test]
    fn qwen3_has_qk_norm_head_dim_and_refuses_sliding_windows() {
        let v = json!({
            "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6,
            "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": true,
            "attention_bias": false, "use_sliding_window": false, "sliding_window": null,
            "layer_types": ["full_attention", "full_attention"]
        });
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!((c.head_dim, c.num_attention_heads * c.head_dim), (16, 96));
        let names: Vec<String> = crate::param_specs(&c).into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"model.layers.1.self_attn.k_norm.weight".to_string()));
        let mut sw = v.clone();
        sw["use_sliding_window"] = json!(true);
        sw["sliding_window"] = json!(4096);
        let e = parse(sw).unwrap_err().to_string();
        assert!(
            e.contains("use_sliding_window") && e.contains("4096"),
            "{e}"
        );
        let mut lt = v;
        lt["layer_types"] = json!(["full_attention", "sliding_attention"]);
        assert!(parse(lt)
            .unwrap_err()
            .to_string()
            .contains("sliding_attention"));
    }
}
