//! The ZeRO engine: drives the model block by block (tch has no module hooks), owns
//! this rank's shards and runs the optimizer.
//!
//! Per unit (see [`super::units`]) a rank holds, by stage (P = unit size, N = world,
//! k = compute dtype bytes):
//!
//! | stage | compute params | gradients | f32 master + Adam moments |
//! | --- | --- | --- | --- |
//! | 0 | kP | kP (all-reduced) | 12P |
//! | 1 | kP | kP (reduce-scattered at step) | 12P/N |
//! | 2 | kP | kP/N (reduce-scattered after each backward) | 12P/N |
//! | 3 | kP/N (all-gathered per use) | kP/N | 12P/N |
//!
//! Loss normalisation: the loss function returns a *sum* over its items (tokens or
//! sequences) and their count; gradients are summed over micro-batches and ranks and
//! divided once by the global count (all-reduced at the step). The result is the
//! gradient of `sum(all items) / count(all items)`, whatever the world size or the
//! micro-batching.
use model::weights::{DecoderLayer, TensorSource};
use model::{
    attention_context, embed, layer_forward, rms_norm, ForwardInput, ModelConfig, Rope, Weights,
};
use tch::{Device, Kind, Tensor};

use super::optimizer::{adamw_step, clip_coefficient, OptimConfig};
use super::schedule::LrScheduler;
use super::units::{flatten, plan_units, Unit};
use super::{ZeroConfig, ZeroStage};
use crate::dist::{CommError, Communicator, ReduceOp};

/// One micro-batch of token ids (`[B, T]` i64) with optional mask and positions.
#[derive(Debug)]
pub struct MicroBatch {
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    pub position_ids: Option<Tensor>,
}

/// What a loss function returns for one micro-batch.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar: the loss summed over the micro-batch's items, with autograd history.
    pub loss_sum: Tensor,
    /// Number of items summed (the global denominator is the sum over all ranks and
    /// micro-batches of this).
    pub count: i64,
}

/// Result of an optimizer step, identical on every rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global mean loss: all loss sums over all counts.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Items (tokens) in the step, over all ranks.
    pub num_items: i64,
    /// Optimizer steps done, this one included.
    pub step: u64,
}

/// Bytes of model state this rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    pub param_bytes: usize,
    pub grad_bytes: usize,
    pub optimizer_bytes: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("config: {0}")]
    Config(String),
    #[error("loss function: {0}")]
    Loss(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Per-unit state of this rank.
pub(crate) struct UnitState {
    pub unit: Unit,
    /// Optimizer shard range (the whole unit under stage 0).
    pub range: std::ops::Range<usize>,
    /// Stages 0-2: the full compute parameters, flat.
    pub params: Option<Tensor>,
    /// Stage 3: this rank's compute-parameter shard.
    pub param_shard: Option<Tensor>,
    /// Stages 0-1: full gradients accumulated over micro-batches; stages 2-3: shard.
    pub grad: Tensor,
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: Tensor,
}

pub struct ZeroEngine {
    pub(crate) cfg: ModelConfig,
    pub(crate) zero: ZeroConfig,
    pub(crate) optim: OptimConfig,
    pub(crate) kind: Kind,
    pub(crate) device: Device,
    pub(crate) comm: Box<dyn Communicator>,
    pub(crate) rope: Rope,
    pub(crate) units: Vec<UnitState>,
    pub(crate) scheduler: LrScheduler,
    pub(crate) step: u64,
    loss_sum: f64,
    count: i64,
}

/// Named tensors handed to the model's block constructors.
struct Named(Vec<(String, Tensor)>);

impl TensorSource for Named {
    fn take(&mut self, name: &str) -> Option<Tensor> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.swap_remove(i).1)
    }
}

impl ZeroEngine {
    /// Builds the engine from the full initial weights (every rank loads the same
    /// checkpoint and keeps what its stage needs). `total_steps` sizes the schedule.
    pub fn new(
        cfg: ModelConfig,
        weights: &Weights,
        zero: ZeroConfig,
        optim: OptimConfig,
        total_steps: u64,
        device: Device,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        zero.validate().map_err(EngineError::Config)?;
        optim.validate().map_err(EngineError::Config)?;
        let kind = zero.compute_kind().map_err(EngineError::Config)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let opt_world = if zero.stage == ZeroStage::Stage0 {
            1
        } else {
            world
        };
        let named: std::collections::HashMap<String, &Tensor> =
            weights.named().into_iter().collect();
        let mut units = vec![];
        for unit in plan_units(&cfg) {
            let tensors: Vec<Tensor> = unit
                .specs
                .iter()
                .map(|s| {
                    named
                        .get(&s.name)
                        .map(|t| t.detach())
                        .ok_or_else(|| EngineError::Config(format!("weights lack {}", s.name)))
                })
                .collect::<Result<_>>()?;
            let full32 = tch::no_grad(|| flatten(&tensors, &unit.specs, Kind::Float, device));
            let range = unit.shard_range(if opt_world == 1 { 0 } else { rank }, opt_world);
            let master = full32
                .narrow(0, range.start as i64, range.len() as i64)
                .copy();
            let sharded_grads = matches!(zero.stage, ZeroStage::Stage2 | ZeroStage::Stage3);
            let grad_len = if sharded_grads { range.len() } else { unit.len };
            let (params, param_shard) = if zero.stage == ZeroStage::Stage3 {
                (None, Some(master.to_kind(kind)))
            } else {
                (Some(full32.to_kind(kind)), None)
            };
            units.push(UnitState {
                range: range.clone(),
                params,
                param_shard,
                grad: Tensor::zeros([grad_len as i64], (kind, device)),
                exp_avg: master.zeros_like(),
                exp_avg_sq: master.zeros_like(),
                decay: unit
                    .decay_mask()
                    .narrow(0, range.start as i64, range.len() as i64)
                    .to_device(device),
                master,
                unit,
            });
        }
        let scheduler = LrScheduler::new(
            optim.lr_scheduler_type,
            optim.learning_rate,
            optim.warmup_ratio,
            total_steps,
        );
        let engine = ZeroEngine {
            rope: Rope::new(&cfg, device),
            cfg,
            zero,
            optim,
            kind,
            device,
            comm,
            units,
            scheduler,
            step: 0,
            loss_sum: 0.0,
            count: 0,
        };
        let m = engine.memory();
        tracing::info!(
            rank,
            stage = engine.zero.stage.number(),
            param_bytes = m.param_bytes,
            grad_bytes = m.grad_bytes,
            optimizer_bytes = m.optimizer_bytes,
            "model state held by this rank"
        );
        Ok(engine)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    pub fn comm(&mut self) -> &mut dyn Communicator {
        self.comm.as_mut()
    }

    /// Bytes of parameters, gradients and optimizer state held by this rank.
    pub fn memory(&self) -> MemoryReport {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut r = MemoryReport {
            param_bytes: 0,
            grad_bytes: 0,
            optimizer_bytes: 0,
        };
        for u in &self.units {
            r.param_bytes += u
                .params
                .as_ref()
                .or(u.param_shard.as_ref())
                .map_or(0, bytes);
            r.grad_bytes += bytes(&u.grad);
            r.optimizer_bytes += bytes(&u.master) + bytes(&u.exp_avg) + bytes(&u.exp_avg_sq);
        }
        r
    }

    /// Fresh leaf tensors (requiring grad) of unit `u`'s parameters: aliases of the
    /// resident parameters (stages 0-2) or an all-gather of the shards (stage 3).
    pub(super) fn gather(&mut self, u: usize) -> Result<Vec<Tensor>> {
        let st = &self.units[u];
        let full = match (&st.params, &st.param_shard) {
            (Some(p), _) => p.shallow_clone(),
            (None, Some(shard)) => {
                let len = st.unit.len;
                self.comm.all_gather(shard, len)?
            }
            (None, None) => unreachable!("a unit holds parameters or a shard"),
        };
        Ok(st
            .unit
            .unflatten(&full)
            .into_iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect())
    }

    /// Moves unit `u`'s gradients from `leaves` into this rank's accumulator: added to
    /// the full buffer (stages 0-1) or reduce-scattered and added to the shard (2-3).
    /// The leaves (and, under stage 3, the gathered parameters) are dropped after.
    fn finish_unit(&mut self, u: usize, leaves: Vec<Tensor>) -> Result<()> {
        let grads: Vec<Tensor> = leaves.iter().map(Tensor::grad).collect();
        let st = &self.units[u];
        let flat = tch::no_grad(|| flatten(&grads, &st.unit.specs, self.kind, self.device));
        drop(grads);
        drop(leaves);
        let add = match self.zero.stage {
            ZeroStage::Stage0 | ZeroStage::Stage1 => flat,
            ZeroStage::Stage2 | ZeroStage::Stage3 => {
                self.comm.reduce_scatter(&flat, ReduceOp::Sum)?
            }
        };
        let st = &mut self.units[u];
        tch::no_grad(|| {
            let _ = st.grad.g_add_(&add);
        });
        Ok(())
    }

    pub(super) fn layer(&self, i: usize, leaves: &[Tensor]) -> Result<DecoderLayer> {
        let specs = &self.units[i + 1].unit.specs;
        let mut src = Named(
            specs
                .iter()
                .map(|s| s.name.clone())
                .zip(leaves.iter().map(Tensor::shallow_clone))
                .collect(),
        );
        DecoderLayer::from_source(&self.cfg, i, &mut src)
            .map_err(|n| EngineError::Config(format!("layer {i} lacks {n}")))
    }

    /// Forward and backward of one micro-batch; gradients accumulate until
    /// [`ZeroEngine::step`]. `loss_fn` gets the final normalised hidden states
    /// `[B, T, H]` and the head weight `[V, H]`, and returns a summed loss.
    pub fn forward_backward<F>(&mut self, mb: &MicroBatch, mut loss_fn: F) -> Result<f64>
    where
        F: FnMut(&Tensor, &Tensor) -> std::result::Result<LossOutput, String>,
    {
        let ids = mb.input_ids.to_device(self.device);
        let mask = mb.attention_mask.as_ref().map(|m| m.to_device(self.device));
        let pos = mb.position_ids.as_ref().map(|p| p.to_device(self.device));
        let mut input = ForwardInput::new(&ids);
        input.attention_mask = mask.as_ref();
        input.position_ids = pos.as_ref();
        let ctx = attention_context(&self.cfg, &self.rope, self.kind, &input, None)?;
        let n_layers = self.cfg.num_hidden_layers;
        let outer = self.gather(0)?;
        let tied = self.cfg.tie_word_embeddings;
        let (embed_w, norm_w) = (&outer[0], &outer[1]);
        let head_w = if tied { &outer[0] } else { &outer[2] };

        let out = if !self.zero.recompute() {
            // Plain autograd over the whole model; stage 2 shards after the backward.
            let mut layer_leaves = vec![];
            let mut h = embed(embed_w, &ids);
            for i in 0..n_layers {
                let leaves = self.gather(i + 1)?;
                h = layer_forward(&self.cfg, &self.layer(i, &leaves)?, &h, &ctx, None)?;
                layer_leaves.push(leaves);
            }
            let hn = rms_norm(&h, norm_w, self.cfg.rms_norm_eps);
            let out = loss_fn(&hn, head_w).map_err(EngineError::Loss)?;
            out.loss_sum.f_backward()?;
            for (i, leaves) in layer_leaves.into_iter().enumerate().rev() {
                self.finish_unit(i + 1, leaves)?;
            }
            out
        } else {
            // Gradient checkpointing: keep each block's input, recompute in backward.
            let mut inputs = Vec::with_capacity(n_layers);
            let mut h = tch::no_grad(|| embed(embed_w, &ids));
            for i in 0..n_layers {
                let leaves = self.gather(i + 1)?;
                let layer = self.layer(i, &leaves)?;
                inputs.push(h.shallow_clone());
                h = tch::no_grad(|| layer_forward(&self.cfg, &layer, &h, &ctx, None))?;
            }
            let h_last = h.detach().set_requires_grad(true);
            let hn = rms_norm(&h_last, norm_w, self.cfg.rms_norm_eps);
            let out = loss_fn(&hn, head_w).map_err(EngineError::Loss)?;
            out.loss_sum.f_backward()?;
            let mut g = h_last.grad();
            for i in (0..n_layers).rev() {
                let leaves = self.gather(i + 1)?;
                let x = inputs[i].detach().set_requires_grad(true);
                let y = layer_forward(&self.cfg, &self.layer(i, &leaves)?, &x, &ctx, None)?;
                (y * g.detach()).sum(Kind::Float).f_backward()?;
                g = x.grad();
                self.finish_unit(i + 1, leaves)?;
            }
            (embed(embed_w, &ids) * g.detach())
                .sum(Kind::Float)
                .f_backward()?;
            out
        };
        self.finish_unit(0, outer)?;
        let loss = out.loss_sum.double_value(&[]);
        self.loss_sum += loss;
        self.count += out.count;
        Ok(loss)
    }

    /// Normalises, clips and applies the accumulated gradients; collective.
    pub fn step(&mut self) -> Result<StepStats> {
        let mut totals = Tensor::from_slice(&[self.count]);
        self.comm.all_reduce(&mut totals, ReduceOp::Sum)?;
        let count = totals.int64_value(&[0]);
        let mut loss = Tensor::from_slice(&[self.loss_sum as f32]);
        self.comm.all_reduce(&mut loss, ReduceOp::Sum)?;
        let denom = count.max(1) as f64;

        // This rank's f32 gradient shard of every unit, divided by the global count.
        let mut grads = Vec::with_capacity(self.units.len());
        for u in 0..self.units.len() {
            let st = &mut self.units[u];
            let g = match self.zero.stage {
                ZeroStage::Stage0 => {
                    self.comm.all_reduce(&mut st.grad, ReduceOp::Sum)?;
                    st.grad.to_kind(Kind::Float)
                }
                ZeroStage::Stage1 => self
                    .comm
                    .reduce_scatter(&st.grad, ReduceOp::Sum)?
                    .to_kind(Kind::Float),
                ZeroStage::Stage2 | ZeroStage::Stage3 => st.grad.to_kind(Kind::Float),
            };
            grads.push(g / denom);
        }
        let local_sq: f64 = grads.iter().map(super::optimizer::sum_of_squares).sum();
        let norm_sq = if self.zero.stage == ZeroStage::Stage0 {
            local_sq
        } else {
            let mut t = Tensor::from_slice(&[local_sq as f32]);
            self.comm.all_reduce(&mut t, ReduceOp::Sum)?;
            t.double_value(&[0])
        };
        let grad_norm = norm_sq.sqrt();
        let coef = clip_coefficient(grad_norm, self.optim.max_grad_norm);
        let lr = self.scheduler.lr(self.step);
        self.step += 1;
        for (st, g) in self.units.iter_mut().zip(grads) {
            let g = if coef < 1.0 { g * coef } else { g };
            adamw_step(
                &mut st.master,
                &mut st.exp_avg,
                &mut st.exp_avg_sq,
                &g,
                &st.decay,
                &self.optim,
                lr,
                self.step,
            );
            let _ = st.grad.zero_();
        }
        self.publish_params()?;
        let stats = StepStats {
            loss: loss.double_value(&[0]) / denom,
            grad_norm,
            learning_rate: lr,
            num_items: count,
            step: self.step,
        };
        self.loss_sum = 0.0;
        self.count = 0;
        Ok(stats)
    }

    /// Rebuilds the compute parameters from the master shards.
    pub(crate) fn publish_params(&mut self) -> Result<()> {
        for u in 0..self.units.len() {
            let stage = self.zero.stage;
            let st = &mut self.units[u];
            let compute = st.master.to_kind(self.kind);
            match stage {
                ZeroStage::Stage0 => {
                    st.params
                        .as_mut()
                        .expect("stage 0 keeps params")
                        .copy_(&compute);
                }
                ZeroStage::Stage1 | ZeroStage::Stage2 => {
                    let full = self.comm.all_gather(&compute, st.unit.len)?;
                    st.params
                        .as_mut()
                        .expect("stages 1-2 keep params")
                        .copy_(&full);
                }
                ZeroStage::Stage3 => st.param_shard = Some(compute),
            }
        }
        Ok(())
    }

    /// The f32 master weights of the whole model, gathered on every rank (collective).
    /// For export and weight sync; under stage 3 this materialises the model once.
    pub fn full_weights(&mut self) -> Result<Weights> {
        let mut named = Named(vec![]);
        for u in 0..self.units.len() {
            let st = &self.units[u];
            let full = if self.zero.stage == ZeroStage::Stage0 {
                st.master.shallow_clone()
            } else {
                self.comm.all_gather(&st.master, st.unit.len)?
            };
            let st = &self.units[u];
            for (s, t) in st.unit.specs.iter().zip(st.unit.unflatten(&full)) {
                named.0.push((s.name.clone(), t.to_device(Device::Cpu)));
            }
        }
        Weights::from_source(&self.cfg, &mut named)
            .map_err(|n| EngineError::Config(format!("gathered weights lack {n}")))
    }
}
