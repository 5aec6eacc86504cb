//! Gradient-free uses of the sharded model: a forward pass for log-probs (GRPO's old and
//! reference log-probs) and a unit-by-unit walk over the full weights (weight sync to the
//! rollout workers and export), both collective and never holding more than one unit's
//! gathered parameters beyond what the stage keeps resident.
use model::{layer_forward, rms_norm};
use tch::{Kind, Tensor};

use super::engine::{BoxError, EngineError, MicroBatch, Result, ZeroEngine};
use super::ZeroStage;
use crate::dist::Communicator;

impl ZeroEngine {
    /// Runs the model on `mb` without autograd and hands the final normalised hidden
    /// states `[B, T, H]` and the head weight `[V, H]` to `f`. Collective under stage 3
    /// (each unit is gathered, used and released in turn).
    pub fn forward_no_grad<T, F>(&mut self, mb: &MicroBatch, f: F) -> Result<T>
    where
        F: FnOnce(&Tensor, &Tensor) -> std::result::Result<T, BoxError>,
    {
        let _guard = tch::no_grad_guard();
        let (ids, ctx) = self.prepare(mb)?;
        let outer = self.gather(0)?;
        let head = if self.cfg.tie_word_embeddings {
            &outer[0]
        } else {
            &outer[2]
        };
        let mut h = ctx.embed_input(&outer[0], &ids);
        for i in 0..self.cfg.num_hidden_layers {
            let leaves = self.gather(i + 1)?;
            h = layer_forward(&self.cfg, &self.layer(i, &leaves)?, &h, &ctx, None)?;
        }
        let hn = ctx.unpack_output(rms_norm(&h, &outer[1], self.cfg.rms_norm_eps));
        f(&hn, head).map_err(EngineError::Loss)
    }

    /// Collective: calls `f(name, tensor)` for every parameter of the model (Hugging Face
    /// names, float32 values of the master weights), one unit at a time. Stages 0-2 with
    /// float32 compute read the resident parameters; otherwise each unit's master shards
    /// are all-gathered and released after `f` has seen them, so no rank ever holds a
    /// second full copy of the model. Every rank must call this; `f` may do nothing on
    /// ranks other than the one that ships the weights. An error from `f` stops further
    /// calls of `f` but not the collectives, and is returned at the end.
    pub fn visit_full_weights<F>(&mut self, f: F) -> Result<()>
    where
        F: FnMut(&str, &Tensor) -> std::result::Result<(), BoxError>,
    {
        self.visit_weights(Kind::Float, f)
    }

    /// As [`ZeroEngine::visit_full_weights`], for a consumer that wants `want` (a weight
    /// push in the wire dtype): when the compute dtype is `want`, the compute parameters
    /// are used as they are (resident under stages 1-2, their shards gathered under
    /// stage 3: half the bytes of the f32 master for bfloat16), which equal the master
    /// weights rounded to `want`.
    pub fn visit_weights<F>(&mut self, want: Kind, mut f: F) -> Result<()>
    where
        F: FnMut(&str, &Tensor) -> std::result::Result<(), BoxError>,
    {
        self.refuse_if_frozen("visit_full_weights")?;
        let mut first_err = None;
        for u in 0..self.units.len() {
            let st = &self.units[u];
            let compute_wanted = self.kind == Kind::Float || self.kind == want;
            let full = match (&st.params, &st.param_shard, self.zero.stage) {
                (_, _, ZeroStage::Stage0) if self.kind == Kind::Float || want == Kind::Float => {
                    st.master.shallow_clone()
                }
                (Some(p), _, _) if compute_wanted => p.shallow_clone(),
                (None, Some(shard), _) if compute_wanted => {
                    self.comm.all_gather(shard, st.unit.len)?
                }
                _ => self.comm.all_gather(&st.master, st.unit.len)?,
            };
            if first_err.is_some() {
                continue;
            }
            let st = &self.units[u];
            for (spec, t) in st.unit.specs.iter().zip(st.unit.unflatten(&full)) {
                if let Err(e) = f(&spec.name, &t) {
                    first_err = Some(EngineError::Config(format!(
                        "while visiting {}: {e}",
                        spec.name
                    )));
                    break;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
