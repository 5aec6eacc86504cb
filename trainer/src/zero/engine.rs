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
//!
//! Overlap (`zero.overlap_comm`): collectives are issued to an [`AsyncComm`] queue and
//! waited only where their result is needed. Stage 3 gathers unit `i + 1` while unit
//! `i` computes (forward and the recompute walk back); stages 2-3 leave up to
//! [`REDUCE_DEPTH`] gradient reduce-scatters in flight while the backward continues
//! (all are waited before the step); the step all-gathers a unit's new parameters
//! while AdamW runs on the next. Every rank issues the same sequence whatever the
//! timing, and gradients are added to the accumulators in issue order, so results are
//! bitwise those of the blocking schedule.
use std::collections::VecDeque;

use model::weights::{DecoderLayer, TensorSource};
use model::{attention_context, layer_forward, rms_norm, ForwardInput, ModelConfig, Rope, Weights};
use tch::{Device, Kind, Tensor};

use super::optimizer::{adamw_step, clip_coefficient, OptimConfig};
use super::schedule::LrScheduler;
use super::units::{flatten, plan_units, Unit};
use super::{ZeroConfig, ZeroStage};
use crate::dist::{AsyncComm, CommError, Communicator, InFlight, Pending, ReduceOp};

/// Gradient reduce-scatters (stages 2-3) left in flight under `overlap_comm`: at most
/// this many finished units' full-size flat gradients wait for the network, on top of
/// the unit whose backward runs.
pub const REDUCE_DEPTH: usize = 2;

/// Units whose all-gather (stage 3) is issued ahead of use under `overlap_comm`: the
/// next unit's parameters arrive while the current unit computes.
pub const PREFETCH_DEPTH: usize = 1;

/// Parameter all-gathers (stages 1-2, at the step) left in flight under
/// `overlap_comm` while AdamW updates the next unit.
pub const PUBLISH_DEPTH: usize = 1;

/// Training forwards pack the real tokens (`model::packing`: token-wise ops skip the
/// padding) when more than this share of a micro-batch's positions are padding. The
/// scatter and gather around each attention cost about 1.5% of a forward + backward
/// of the demo model on CPU, so packing pays from about 2% of padding
/// (`cargo run --release -p model --example packing_bench`: 0.98x at 4%, 0.95x at 6%,
/// 0.80x at 27%).
pub const MAX_UNPACKED_PADDING: f64 = 0.03;

/// One micro-batch of token ids (`[B, T]` i64) with optional mask and positions.
#[derive(Debug)]
pub struct MicroBatch {
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    pub position_ids: Option<Tensor>,
    /// Shared-prefix segments ([`model::ForwardInput::segment_ids`]; needs positions).
    pub segment_ids: Option<Tensor>,
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
    /// Optimizer steps done, this one included (a skipped step is not one).
    pub step: u64,
    /// The loss or gradient norm was not finite and the update was dropped
    /// ([`super::NonFinitePolicy::Skip`]).
    pub skipped: bool,
    /// Steps skipped so far in this process.
    pub skipped_steps: u64,
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

/// The error a caller's closure (a loss, a weight visitor) returns to the engine.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    Loss(BoxError),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    /// The global loss or gradient norm was NaN or infinite; no weight was changed.
    #[error("step {step}: non-finite loss {loss} or gradient norm {grad_norm}; the update was not applied ({reason})")]
    NonFinite {
        step: u64,
        loss: f64,
        grad_norm: f64,
        reason: String,
    },
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
    /// Collectives, queued on a thread of their own under `overlap_comm`.
    pub(crate) comm: AsyncComm,
    pub(crate) rope: Rope,
    /// Stages 2-3: gradient reduce-scatters issued and not yet added to `grad`.
    grad_flight: InFlight<usize, Tensor>,
    pub(crate) units: Vec<UnitState>,
    pub(crate) scheduler: LrScheduler,
    pub(crate) step: u64,
    loss_sum: f64,
    count: i64,
    /// Steps dropped for a non-finite loss or gradient norm: in all, and in a row.
    skipped_steps: u64,
    consecutive_skips: u64,
    /// Built by [`ZeroEngine::new_frozen`]: parameters only, no gradients, master
    /// weights or optimizer state; `forward_backward` and `step` refuse to run.
    frozen: bool,
}

/// A unit's full flat parameters on their way: resident, or an all-gather in flight.
enum Fetch {
    Resident(Tensor),
    Gathering(Pending<Tensor>),
}

/// The units one micro-batch uses, in order of use, fetched `lookahead` units ahead
/// of the one being taken (so a stage-3 gather overlaps the compute before it).
struct GatherQueue {
    order: Vec<usize>,
    lookahead: usize,
    /// Entries of `order` fetched so far.
    issued: usize,
    /// Entries of `order` taken so far.
    taken: usize,
    fetched: VecDeque<(usize, Fetch)>,
}

impl GatherQueue {
    fn new(order: Vec<usize>, lookahead: usize) -> Self {
        GatherQueue {
            order,
            lookahead,
            issued: 0,
            taken: 0,
            fetched: VecDeque::new(),
        }
    }
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
        Self::build(cfg, weights, zero, optim, total_steps, device, comm, false)
    }

    /// A model that never trains (GRPO's reference model, `beta > 0`): each rank holds
    /// only its stage's compute parameters (full under stages 0-2, a `1/N` shard under
    /// stage 3), in the compute dtype; no gradient buffers, f32 master weights or Adam
    /// moments. For a 7B model under ZeRO-2 on 2 ranks that is `2P` bytes instead of
    /// `2P + 2P/N + 12P/N` (~100 GB / N saved). Only the gradient-free paths
    /// ([`ZeroEngine::forward_no_grad`]) may be used.
    pub fn new_frozen(
        cfg: ModelConfig,
        weights: &Weights,
        zero: ZeroConfig,
        device: Device,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        Self::build(
            cfg,
            weights,
            zero,
            OptimConfig::default(),
            1,
            device,
            comm,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        cfg: ModelConfig,
        weights: &Weights,
        zero: ZeroConfig,
        optim: OptimConfig,
        total_steps: u64,
        device: Device,
        comm: Box<dyn Communicator>,
        frozen: bool,
    ) -> Result<Self> {
        let config = |e: crate::config::InvalidConfig| EngineError::Config(e.to_string());
        zero.validate().map_err(config)?;
        optim.validate().map_err(config)?;
        let kind = zero.compute_kind().map_err(config)?;
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
            drop(full32);
            if frozen {
                let none = || Tensor::zeros([0], (Kind::Float, device));
                units.push(UnitState {
                    range,
                    params,
                    param_shard,
                    grad: Tensor::zeros([0], (kind, device)),
                    exp_avg: none(),
                    exp_avg_sq: none(),
                    decay: none(),
                    master: none(),
                    unit,
                });
                continue;
            }
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
        let scheduler = LrScheduler::from_optim(&optim, total_steps);
        // One rank has nothing to overlap: no thread.
        let background = zero.overlap_comm && world > 1;
        let comm = AsyncComm::new(comm, background)?;
        let depth = if background { REDUCE_DEPTH } else { 0 };
        let engine = ZeroEngine {
            rope: Rope::new(&cfg, device),
            cfg,
            zero,
            optim,
            kind,
            device,
            comm,
            grad_flight: InFlight::new(depth),
            units,
            scheduler,
            step: 0,
            loss_sum: 0.0,
            count: 0,
            skipped_steps: 0,
            consecutive_skips: 0,
            frozen,
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

    /// The communicator, for collectives of the caller's own (blocking). Under
    /// `overlap_comm` a call is queued behind the engine's in-flight collectives and
    /// returns once it (and so all of them) has run, keeping every rank's order.
    pub fn comm(&mut self) -> &mut dyn Communicator {
        &mut self.comm
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

    pub(super) fn refuse_if_frozen(&self, what: &str) -> Result<()> {
        if self.frozen {
            return Err(EngineError::Config(format!(
                "{what} on a frozen engine (a reference model holds no gradients or optimizer state)"
            )));
        }
        Ok(())
    }

    /// Whether this engine was built by [`ZeroEngine::new_frozen`].
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Starts getting unit `u`'s full flat parameters: an alias of the resident
    /// parameters (stages 0-2) or an all-gather of the shards (stage 3). The shard is
    /// read by the collective while in flight; nothing writes it during a micro-batch
    /// (the step replaces it, after every gather was waited).
    fn fetch(&mut self, u: usize) -> Fetch {
        let st = &self.units[u];
        match (&st.params, &st.param_shard) {
            (Some(p), _) => Fetch::Resident(p.shallow_clone()),
            (None, Some(shard)) => Fetch::Gathering(
                self.comm
                    .all_gather_async(shard.shallow_clone(), st.unit.len),
            ),
            (None, None) => unreachable!("a unit holds parameters or a shard"),
        }
    }

    /// Unit `u`'s parameters as tensors, fetched synchronously (the gradient-free paths
    /// of `inference.rs`).
    pub(super) fn gather(&mut self, u: usize) -> Result<Vec<Tensor>> {
        let full = match self.fetch(u) {
            Fetch::Resident(t) => t,
            Fetch::Gathering(p) => p.wait()?,
        };
        Ok(self.units[u].unit.unflatten(&full))
    }

    /// The next unit of `q` as fresh leaf tensors requiring grad (views of its flat
    /// parameters), after issuing the fetches of the units `q` looks ahead to.
    fn next_unit(&mut self, q: &mut GatherQueue) -> Result<Vec<Tensor>> {
        let want = (q.taken + 1 + q.lookahead).min(q.order.len());
        while q.issued < want {
            let u = q.order[q.issued];
            let f = self.fetch(u);
            q.fetched.push_back((u, f));
            q.issued += 1;
        }
        let (u, f) = q
            .fetched
            .pop_front()
            .expect("forward_backward takes no more units than it planned");
        q.taken += 1;
        let full = match f {
            Fetch::Resident(t) => t,
            Fetch::Gathering(p) => p.wait()?,
        };
        Ok(self.units[u]
            .unit
            .unflatten(&full)
            .into_iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect())
    }

    /// Moves unit `u`'s gradients from `leaves` into this rank's accumulator: added to
    /// the full buffer (stages 0-1) or reduce-scattered and added to the shard (2-3).
    /// The leaves (and, under stage 3, the gathered parameters) are dropped here; the
    /// flat gradient belongs to the reduce-scatter until it is waited.
    fn finish_unit(&mut self, u: usize, leaves: Vec<Tensor>) -> Result<()> {
        let grads: Vec<Tensor> = leaves.iter().map(Tensor::grad).collect();
        let st = &self.units[u];
        let flat = tch::no_grad(|| flatten(&grads, &st.unit.specs, self.kind, self.device));
        drop(grads);
        drop(leaves);
        match self.zero.stage {
            ZeroStage::Stage0 | ZeroStage::Stage1 => self.add_grad(u, &flat),
            ZeroStage::Stage2 | ZeroStage::Stage3 => {
                let pending = self.comm.reduce_scatter_async(flat, ReduceOp::Sum);
                for (v, p) in self.grad_flight.push(u, pending) {
                    self.add_grad(v, &p.wait()?);
                }
            }
        }
        Ok(())
    }

    fn add_grad(&mut self, u: usize, g: &Tensor) {
        tch::no_grad(|| {
            let _ = self.units[u].grad.g_add_(g);
        });
    }

    /// Waits for every in-flight gradient reduce-scatter and adds it, in issue order.
    fn settle_grads(&mut self) -> Result<()> {
        for (u, p) in self.grad_flight.drain() {
            self.add_grad(u, &p.wait()?);
        }
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

    /// The micro-batch's ids on this engine's device and its attention context (mask,
    /// positions, rotary tables).
    pub(super) fn prepare(&self, mb: &MicroBatch) -> Result<(Tensor, model::AttentionContext)> {
        let ids = mb.input_ids.to_device(self.device);
        let mask = mb.attention_mask.as_ref().map(|m| m.to_device(self.device));
        let pos = mb.position_ids.as_ref().map(|p| p.to_device(self.device));
        let seg = mb.segment_ids.as_ref().map(|s| s.to_device(self.device));
        let mut input = ForwardInput::new(&ids);
        input.attention_mask = mask.as_ref();
        input.position_ids = pos.as_ref();
        input.segment_ids = seg.as_ref();
        let ctx = attention_context(&self.cfg, &self.rope, self.kind, &input, None)?
            .pack_real_tokens(MAX_UNPACKED_PADDING);
        Ok((ids, ctx))
    }

    /// Forward and backward of one micro-batch; gradients accumulate until
    /// [`ZeroEngine::step`]. `loss_fn` gets the final normalised hidden states
    /// `[B, T, H]` and the head weight `[V, H]`, and returns a summed loss.
    pub fn forward_backward<F>(&mut self, mb: &MicroBatch, mut loss_fn: F) -> Result<f64>
    where
        F: FnMut(&Tensor, &Tensor) -> std::result::Result<LossOutput, BoxError>,
    {
        self.refuse_if_frozen("forward_backward")?;
        let (ids, ctx) = self.prepare(mb)?;
        let n_layers = self.cfg.num_hidden_layers;
        let recompute = self.zero.recompute();
        // Units in order of use: outer, the layers forward, and with recomputation the
        // layers again backward, except the last, whose forward parameters are kept.
        let mut order: Vec<usize> = (0..=n_layers).collect();
        if recompute {
            order.extend((1..n_layers).rev());
        }
        let lookahead = if self.comm.is_background() {
            PREFETCH_DEPTH
        } else {
            0
        };
        let mut q = GatherQueue::new(order, lookahead);
        let outer = self.next_unit(&mut q)?;
        let tied = self.cfg.tie_word_embeddings;
        let (embed_w, norm_w) = (&outer[0], &outer[1]);
        let head_w = if tied { &outer[0] } else { &outer[2] };

        let out = if !recompute {
            // Plain autograd over the whole model; stage 2 shards after the backward.
            let mut layer_leaves = vec![];
            let mut h = ctx.embed_input(embed_w, &ids);
            for i in 0..n_layers {
                let leaves = self.next_unit(&mut q)?;
                h = layer_forward(&self.cfg, &self.layer(i, &leaves)?, &h, &ctx, None)?;
                layer_leaves.push(leaves);
            }
            let hn = ctx.unpack_output(rms_norm(&h, norm_w, self.cfg.rms_norm_eps));
            let out = loss_fn(&hn, head_w).map_err(EngineError::Loss)?;
            out.loss_sum.f_backward()?;
            for (i, leaves) in layer_leaves.into_iter().enumerate().rev() {
                self.finish_unit(i + 1, leaves)?;
            }
            out
        } else {
            // Gradient checkpointing: keep each block's input, recompute in backward.
            let mut inputs = Vec::with_capacity(n_layers);
            let mut last = None;
            let mut h = tch::no_grad(|| ctx.embed_input(embed_w, &ids));
            for i in 0..n_layers {
                let leaves = self.next_unit(&mut q)?;
                let layer = self.layer(i, &leaves)?;
                inputs.push(h.shallow_clone());
                h = tch::no_grad(|| layer_forward(&self.cfg, &layer, &h, &ctx, None))?;
                if i + 1 == n_layers {
                    last = Some(leaves);
                }
            }
            let h_last = h.detach().set_requires_grad(true);
            let hn = ctx.unpack_output(rms_norm(&h_last, norm_w, self.cfg.rms_norm_eps));
            let out = loss_fn(&hn, head_w).map_err(EngineError::Loss)?;
            out.loss_sum.f_backward()?;
            let mut g = h_last.grad();
            for i in (0..n_layers).rev() {
                let leaves = match last.take() {
                    Some(leaves) => leaves,
                    None => self.next_unit(&mut q)?,
                };
                let x = inputs[i].detach().set_requires_grad(true);
                let y = layer_forward(&self.cfg, &self.layer(i, &leaves)?, &x, &ctx, None)?;
                (y * g.detach()).sum(Kind::Float).f_backward()?;
                g = x.grad();
                self.finish_unit(i + 1, leaves)?;
            }
            (ctx.embed_input(embed_w, &ids) * g.detach())
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
        self.refuse_if_frozen("step")?;
        self.settle_grads()?;
        // Issued in one go, waited in order: the counts, the loss, and (stages 0-1)
        // every unit's gradient reduction. A gradient handed to a collective is not
        // read (stage 0 reduces it in place) or written (stage 1) before its wait.
        let totals = self
            .comm
            .all_reduce_async(Tensor::from_slice(&[self.count]), ReduceOp::Sum);
        let loss = self
            .comm
            .all_reduce_async(Tensor::from_slice(&[self.loss_sum as f32]), ReduceOp::Sum);
        let mut reduced: Vec<Option<Pending<Tensor>>> = Vec::with_capacity(self.units.len());
        for st in &self.units {
            let grad = st.grad.shallow_clone();
            reduced.push(match self.zero.stage {
                ZeroStage::Stage0 => Some(self.comm.all_reduce_async(grad, ReduceOp::Sum)),
                ZeroStage::Stage1 => Some(self.comm.reduce_scatter_async(grad, ReduceOp::Sum)),
                ZeroStage::Stage2 | ZeroStage::Stage3 => None,
            });
        }
        let count = totals.wait()?.int64_value(&[0]);
        let loss = loss.wait()?;
        let denom = count.max(1) as f64;

        // This rank's f32 gradient shard of every unit, divided by the global count.
        let mut grads = Vec::with_capacity(self.units.len());
        for (st, pending) in self.units.iter().zip(reduced) {
            let g = match pending {
                Some(p) => p.wait()?.to_kind(Kind::Float),
                None => st.grad.to_kind(Kind::Float),
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
        let mean_loss = loss.double_value(&[0]) / denom;
        // Both values come out of collectives (stage 0's gradients are all-reduced), so
        // every rank takes the same branch: no rank updates while another skips.
        if !(mean_loss.is_finite() && grad_norm.is_finite()) {
            return self.skip_nonfinite(mean_loss, grad_norm, count);
        }
        self.consecutive_skips = 0;
        let coef = clip_coefficient(grad_norm, self.optim.max_grad_norm);
        let lr = self.scheduler.lr(self.step);
        self.step += 1;
        // AdamW unit by unit; a unit's new parameters are all-gathered while the next
        // unit updates.
        let mut published = self.publish_window();
        for (u, g) in grads.into_iter().enumerate() {
            let st = &mut self.units[u];
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
            self.publish_unit(u, &mut published)?;
        }
        self.finish_publish(published)?;
        let stats = StepStats {
            loss: mean_loss,
            grad_norm,
            learning_rate: lr,
            num_items: count,
            step: self.step,
            skipped: false,
            skipped_steps: self.skipped_steps,
        };
        self.loss_sum = 0.0;
        self.count = 0;
        Ok(stats)
    }

    /// Drops the accumulated gradients of a step whose loss or norm is not finite:
    /// master weights, moments, compute parameters and the schedule stay as they were.
    fn skip_nonfinite(&mut self, loss: f64, grad_norm: f64, count: i64) -> Result<StepStats> {
        for st in &mut self.units {
            let _ = st.grad.zero_();
        }
        self.loss_sum = 0.0;
        self.count = 0;
        let step = self.step + 1;
        let stop = |reason: String| EngineError::NonFinite {
            step,
            loss,
            grad_norm,
            reason,
        };
        if self.optim.on_nonfinite == super::NonFinitePolicy::Stop {
            return Err(stop("on_nonfinite = stop".into()));
        }
        self.skipped_steps += 1;
        self.consecutive_skips += 1;
        if self.consecutive_skips >= self.optim.max_consecutive_skipped_steps {
            return Err(stop(format!(
                "{} steps in a row were not finite (max_consecutive_skipped_steps)",
                self.consecutive_skips
            )));
        }
        if self.rank() == 0 {
            tracing::warn!(
                step,
                loss,
                grad_norm,
                skipped_steps = self.skipped_steps,
                "non-finite loss or gradient norm: step skipped, weights unchanged"
            );
        }
        Ok(StepStats {
            loss,
            grad_norm,
            learning_rate: self.scheduler.lr(self.step),
            num_items: count,
            step: self.step,
            skipped: true,
            skipped_steps: self.skipped_steps,
        })
    }

    /// The window of parameter all-gathers [`Self::publish_unit`] keeps in flight.
    fn publish_window(&self) -> InFlight<usize, Tensor> {
        InFlight::new(if self.comm.is_background() {
            PUBLISH_DEPTH
        } else {
            0
        })
    }

    /// Rebuilds unit `u`'s compute parameters from its master shard: a copy (stage 0),
    /// an all-gather issued into `window` (stages 1-2) or a new shard (stage 3).
    fn publish_unit(&mut self, u: usize, window: &mut InFlight<usize, Tensor>) -> Result<()> {
        let st = &mut self.units[u];
        let compute = st.master.to_kind(self.kind);
        match self.zero.stage {
            ZeroStage::Stage0 => {
                st.params
                    .as_mut()
                    .expect("stage 0 keeps params")
                    .copy_(&compute);
            }
            ZeroStage::Stage1 | ZeroStage::Stage2 => {
                let pending = self.comm.all_gather_async(compute, st.unit.len);
                for (v, p) in window.push(u, pending) {
                    self.copy_params(v, &p.wait()?);
                }
            }
            ZeroStage::Stage3 => st.param_shard = Some(compute),
        }
        Ok(())
    }

    /// Waits for the all-gathers left in `window` and copies them into place.
    fn finish_publish(&mut self, mut window: InFlight<usize, Tensor>) -> Result<()> {
        for (v, p) in window.drain() {
            self.copy_params(v, &p.wait()?);
        }
        Ok(())
    }

    fn copy_params(&mut self, u: usize, full: &Tensor) {
        self.units[u]
            .params
            .as_mut()
            .expect("stages 0-2 keep params")
            .copy_(full);
    }

    /// Rebuilds the compute parameters from the master shards (collective).
    pub(crate) fn publish_params(&mut self) -> Result<()> {
        self.settle_grads()?;
        let mut window = self.publish_window();
        for u in 0..self.units.len() {
            self.publish_unit(u, &mut window)?;
        }
        self.finish_publish(window)
    }

    /// The f32 master weights of the whole model, gathered on every rank (collective).
    /// For export and weight sync; under stage 3 this materialises the model once.
    pub fn full_weights(&mut self) -> Result<Weights> {
        self.settle_grads()?;
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
