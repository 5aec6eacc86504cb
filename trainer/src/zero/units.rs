//! Units of sharding: the parameters gathered, run and released together. Unit 0 is the
//! "outer" unit (embeddings, final norm and an untied head; like FSDP's root module it
//! stays gathered for a whole micro-batch), unit `i + 1` is decoder layer `i`.
//! Each unit's parameters are one flat buffer in `param_specs` order, split across
//! ranks by [`ShardLayout`].
use std::ops::Range;

use model::weights::{layer_param_specs, ParamSpec};
use model::ModelConfig;
use tch::{Kind, Tensor};

use crate::dist::ShardLayout;

#[derive(Debug, Clone)]
pub struct Unit {
    /// `outer` or `layers.{i}`.
    pub name: String,
    pub specs: Vec<ParamSpec>,
    /// Start of each parameter in the flat buffer.
    pub offsets: Vec<usize>,
    /// Elements in the flat buffer.
    pub len: usize,
}

impl Unit {
    fn new(name: String, specs: Vec<ParamSpec>) -> Self {
        let mut offsets = Vec::with_capacity(specs.len());
        let mut len = 0usize;
        for s in &specs {
            offsets.push(len);
            len += s.numel() as usize;
        }
        Unit {
            name,
            specs,
            offsets,
            len,
        }
    }

    /// The range of the flat buffer this rank's optimizer owns: everything under stage 0
    /// (`world_size` 1), else [`ShardLayout`]'s range.
    pub fn shard_range(&self, rank: usize, world_size: usize) -> Range<usize> {
        ShardLayout::new(self.len, world_size).range(rank)
    }

    /// Views of `flat` shaped as the unit's parameters.
    pub fn unflatten(&self, flat: &Tensor) -> Vec<Tensor> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(s, &o)| flat.narrow(0, o as i64, s.numel()).view(s.shape.as_slice()))
            .collect()
    }

    /// `[len]` f32: 1 where AdamW applies weight decay, 0 for norms and biases.
    pub fn decay_mask(&self) -> Tensor {
        let mut mask = vec![0f32; self.len];
        for (s, &o) in self.specs.iter().zip(&self.offsets) {
            if !s.is_norm_or_bias() {
                mask[o..o + s.numel() as usize].fill(1.0);
            }
        }
        Tensor::from_slice(&mask)
    }
}

/// The units of a model, outer first, then one per layer.
pub fn plan_units(cfg: &ModelConfig) -> Vec<Unit> {
    let mut outer = vec![];
    for s in model::param_specs(cfg) {
        if !s.name.starts_with("model.layers.") {
            outer.push(s);
        }
    }
    let mut units = vec![Unit::new("outer".into(), outer)];
    for i in 0..cfg.num_hidden_layers {
        units.push(Unit::new(format!("layers.{i}"), layer_param_specs(cfg, i)));
    }
    units
}

/// Concatenates tensors into one flat `[sum numel]` buffer of `kind`; an undefined
/// tensor (a parameter that got no gradient) contributes zeros of `specs`' size.
pub fn flatten(tensors: &[Tensor], specs: &[ParamSpec], kind: Kind, device: tch::Device) -> Tensor {
    let parts: Vec<Tensor> = tensors
        .iter()
        .zip(specs)
        .map(|(t, s)| {
            if t.defined() {
                t.reshape([-1]).to_kind(kind)
            } else {
                Tensor::zeros([s.numel()], (kind, device))
            }
        })
        .collect();
    Tensor::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tied: bool) -> ModelConfig {
        let raw = serde_json::json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": tied});
        ModelConfig::from_json(raw, std::path::Path::new("t")).unwrap()
    }

    #[test]
    fn units_cover_every_parameter_once() {
        for tied in [true, false] {
            let c = cfg(tied);
            let units = plan_units(&c);
            assert_eq!(units.len(), 3);
            let names: Vec<String> = units
                .iter()
                .flat_map(|u| u.specs.iter().map(|s| s.name.clone()))
                .collect();
            let mut want: Vec<String> =
                model::param_specs(&c).into_iter().map(|s| s.name).collect();
            let mut got = names.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want);
            assert_eq!(
                units[0].specs.iter().any(|s| s.name == "lm_head.weight"),
                !tied
            );
        }
    }

    #[test]
    fn flatten_unflatten_round_trip_and_decay_mask() {
        let c = cfg(true);
        let u = &plan_units(&c)[1];
        let ts: Vec<Tensor> = u
            .specs
            .iter()
            .map(|s| Tensor::randn(s.shape.as_slice(), (Kind::Float, tch::Device::Cpu)))
            .collect();
        let flat = flatten(&ts, &u.specs, Kind::Float, tch::Device::Cpu);
        assert_eq!(flat.size(), [u.len as i64]);
        for (a, b) in ts.iter().zip(u.unflatten(&flat)) {
            assert!(a.equal(&b));
        }
        let mask = Vec::<f32>::try_from(u.decay_mask()).unwrap();
        let norm = &u.specs[0];
        assert!(norm.name.ends_with("input_layernorm.weight"));
        assert!(mask[..norm.numel() as usize].iter().all(|&x| x == 0.0));
        assert_eq!(mask[norm.numel() as usize], 1.0);
    }
}
