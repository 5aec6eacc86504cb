//! The policy's parameters, named exactly as the Hugging Face checkpoint keys
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...), so loading, export and weight sync
//! to rollout workers need no renaming table.
//!
//! [`param_specs`] is the one list of names and shapes of an architecture; everything
//! that enumerates parameters (checkpoint IO, ZeRO flattening, weight sync) uses it.
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;

/// A parameter's checkpoint name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
}

impl ParamSpec {
    fn new(name: impl Into<String>, shape: &[i64]) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Norm weights and biases: AdamW applies no weight decay to these.
    pub fn is_norm_or_bias(&self) -> bool {
        self.name.ends_with(".bias") || self.name.ends_with("norm.weight")
    }
}

/// The checkpoint prefix of decoder layer `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}.")
}

/// Names and shapes of decoder layer `i`, in checkpoint order.
pub fn layer_param_specs(cfg: &ModelConfig, i: usize) -> Vec<ParamSpec> {
    let p = layer_prefix(i);
    let (h, d, im) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut v = vec![ParamSpec::new(format!("{p}input_layernorm.weight"), &[h])];
    for (proj, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
        v.push(ParamSpec::new(
            format!("{p}self_attn.{proj}.weight"),
            &[out, h],
        ));
        if cfg.qkv_bias {
            v.push(ParamSpec::new(format!("{p}self_attn.{proj}.bias"), &[out]));
        }
    }
    v.push(ParamSpec::new(
        format!("{p}self_attn.o_proj.weight"),
        &[h, q],
    ));
    if cfg.o_bias {
        v.push(ParamSpec::new(format!("{p}self_attn.o_proj.bias"), &[h]));
    }
    if cfg.qk_norm {
        v.push(ParamSpec::new(format!("{p}self_attn.q_norm.weight"), &[d]));
        v.push(ParamSpec::new(format!("{p}self_attn.k_norm.weight"), &[d]));
    }
    v.push(ParamSpec::new(
        format!("{p}post_attention_layernorm.weight"),
        &[h],
    ));
    for (proj, shape) in [
        ("gate_proj", [im, h]),
        ("up_proj", [im, h]),
        ("down_proj", [h, im]),
    ] {
        v.push(ParamSpec::new(format!("{p}mlp.{proj}.weight"), &shape));
        if cfg.mlp_bias {
            v.push(ParamSpec::new(format!("{p}mlp.{proj}.bias"), &shape[..1]));
        }
    }
    v
}

/// Every parameter of the model, in checkpoint order: embeddings, layers, norm, head.
/// A tied head (`tie_word_embeddings`) is not listed: it is `model.embed_tokens.weight`.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let mut v = vec![ParamSpec::new(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, cfg.hidden_size],
    )];
    for i in 0..cfg.num_hidden_layers {
        v.extend(layer_param_specs(cfg, i));
    }
    v.push(ParamSpec::new("model.norm.weight", &[cfg.hidden_size]));
    if !cfg.tie_word_embeddings {
        v.push(ParamSpec::new(
            "lm_head.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        ));
    }
    v
}

/// `y = x W^T + b`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` of queries and keys.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One transformer block's parameters. The trainer builds these from gathered shards
/// under ZeRO-3 and drops them after use, so the block forward takes them explicitly.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// Takes tensors by checkpoint name; `None` when a name is absent.
pub trait TensorSource {
    fn take(&mut self, name: &str) -> Option<Tensor>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Option<Tensor> {
        self.remove(name)
    }
}

/// A tensor that [`Weights::from_source`] needed and the source did not hold; its
/// message is the missing checkpoint name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}")]
pub struct MissingTensor {
    pub name: String,
}

fn take(src: &mut dyn TensorSource, name: String) -> Result<Tensor, MissingTensor> {
    src.take(&name).ok_or(MissingTensor { name })
}

fn linear(src: &mut dyn TensorSource, prefix: &str, bias: bool) -> Result<Linear, MissingTensor> {
    Ok(Linear {
        weight: take(src, format!("{prefix}.weight"))?,
        bias: if bias {
            Some(take(src, format!("{prefix}.bias"))?)
        } else {
            None
        },
    })
}

fn norm(
    src: &mut dyn TensorSource,
    name: String,
    present: bool,
) -> Result<Option<Tensor>, MissingTensor> {
    present.then(|| take(src, name)).transpose()
}

impl DecoderLayer {
    /// Builds layer `i` from `src`; the error is the first missing name.
    pub fn from_source(
        cfg: &ModelConfig,
        i: usize,
        src: &mut dyn TensorSource,
    ) -> Result<Self, MissingTensor> {
        let p = layer_prefix(i);
        Ok(DecoderLayer {
            input_layernorm: take(src, format!("{p}input_layernorm.weight"))?,
            self_attn: Attention {
                q_proj: linear(src, &format!("{p}self_attn.q_proj"), cfg.qkv_bias)?,
                k_proj: linear(src, &format!("{p}self_attn.k_proj"), cfg.qkv_bias)?,
                v_proj: linear(src, &format!("{p}self_attn.v_proj"), cfg.qkv_bias)?,
                o_proj: linear(src, &format!("{p}self_attn.o_proj"), cfg.o_bias)?,
                q_norm: norm(src, format!("{p}self_attn.q_norm.weight"), cfg.qk_norm)?,
                k_norm: norm(src, format!("{p}self_attn.k_norm.weight"), cfg.qk_norm)?,
            },
            post_attention_layernorm: take(src, format!("{p}post_attention_layernorm.weight"))?,
            mlp: Mlp {
                gate_proj: linear(src, &format!("{p}mlp.gate_proj"), cfg.mlp_bias)?,
                up_proj: linear(src, &format!("{p}mlp.up_proj"), cfg.mlp_bias)?,
                down_proj: linear(src, &format!("{p}mlp.down_proj"), cfg.mlp_bias)?,
            },
        })
    }

    /// `(name, tensor)` pairs in the order of [`layer_param_specs`].
    pub fn named(&self, i: usize) -> Vec<(String, &Tensor)> {
        fn push<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, l: &'a Linear) {
            out.push((format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        let p = layer_prefix(i);
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut out = vec![(format!("{p}input_layernorm.weight"), &self.input_layernorm)];
        push(&mut out, format!("{p}self_attn.q_proj"), &a.q_proj);
        push(&mut out, format!("{p}self_attn.k_proj"), &a.k_proj);
        push(&mut out, format!("{p}self_attn.v_proj"), &a.v_proj);
        push(&mut out, format!("{p}self_attn.o_proj"), &a.o_proj);
        for (name, w) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(w) = w {
                out.push((format!("{p}self_attn.{name}.weight"), w));
            }
        }
        out.push((
            format!("{p}post_attention_layernorm.weight"),
            &self.post_attention_layernorm,
        ));
        push(&mut out, format!("{p}mlp.gate_proj"), &m.gate_proj);
        push(&mut out, format!("{p}mlp.up_proj"), &m.up_proj);
        push(&mut out, format!("{p}mlp.down_proj"), &m.down_proj);
        out
    }
}

/// All parameters of a model.
#[derive(Debug)]
pub struct Weights {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// Builds the weights from `src`; the error is the first missing name.
    pub fn from_source(
        cfg: &ModelConfig,
        src: &mut dyn TensorSource,
    ) -> Result<Self, MissingTensor> {
        let embed_tokens = take(src, "model.embed_tokens.weight".into())?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::from_source(cfg, i, src))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = take(src, "model.norm.weight".into())?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take(src, "lm_head.weight".into())?)
        };
        Ok(Weights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Random weights of a sensible scale (tests and benchmarks; training starts from a
    /// checkpoint). Deterministic for a given tch seed.
    pub fn random(cfg: &ModelConfig, kind: Kind, device: Device) -> Self {
        let mut map: HashMap<String, Tensor> = param_specs(cfg)
            .into_iter()
            .map(|s| {
                let t = if s.name.ends_with("norm.weight") {
                    Tensor::ones(s.shape.as_slice(), (Kind::Float, device))
                } else if s.name.ends_with(".bias") {
                    Tensor::zeros(s.shape.as_slice(), (Kind::Float, device))
                } else {
                    Tensor::randn(s.shape.as_slice(), (Kind::Float, device)) * 0.02
                };
                (s.name, t.to_kind(kind))
            })
            .collect();
        Self::from_source(cfg, &mut map).expect("param_specs lists every parameter")
    }

    /// `(name, tensor)` pairs in the order of [`param_specs`] (tied head excluded).
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            v.extend(layer.named(i));
        }
        v.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h));
        }
        v
    }

    /// The output projection `[V, H]`: `lm_head.weight`, or the embeddings when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Marks every parameter as requiring (or not) gradients.
    pub fn set_requires_grad(&mut self, requires_grad: bool) {
        for (_, t) in self.named() {
            // `set_requires_grad` returns the same tensor; the flag lives on it.
            let _ = t.set_requires_grad(requires_grad);
        }
    }

    /// Total number of parameters (a tied head counted once).
    pub fn num_params(&self) -> i64 {
        self.named().iter().map(|(_, t)| t.numel() as i64).sum()
    }
}
