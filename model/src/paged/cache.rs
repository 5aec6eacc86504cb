//! The paged KV cache's storage: per layer one key pool and one value pool,
//! `[num_blocks, nkv, block_size, d]` each, allocated once. Writing a step's keys and
//! values is an in-place copy into their slots; attention reads the blocks in place
//! (CPU kernel, [`super::kernel`]) or through one gather into a padded batch for SDPA
//! (other devices, and the reference the kernel is tested and benchmarked against). No
//! fused paged kernel ships with libtorch, so on CUDA the gather is the fallback; the
//! engine logs which backend it got ([`PagedKvCache::backend`]).
use half::bf16;
use tch::{Device, Kind, Tensor};

use super::kernel::{paged_attention, Geometry, SeqSpan};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// How attention reads the paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBackend {
    /// The Rust kernel over the blocks in place (CPU, f32 or bf16).
    CpuKernel,
    /// Gather the blocks into a padded `[B, nkv, S, d]` copy, then SDPA.
    GatherSdpa,
}

/// One layer's pools.
#[derive(Debug)]
struct LayerPools {
    keys: Tensor,
    values: Tensor,
}

/// Preallocated key/value block pools for every layer.
#[derive(Debug)]
pub struct PagedKvCache {
    layers: Vec<LayerPools>,
    geo: Geometry,
    num_blocks: usize,
    kind: Kind,
    device: Device,
    backend: AttentionBackend,
}

impl PagedKvCache {
    /// Pools of `num_blocks` blocks of `block_size` positions for `cfg`, in `kind` on
    /// `device`. The CPU kernel serves f32 and bf16 on CPU; anything else gathers
    /// (logged once here).
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Input(format!(
                "paged KV cache needs num_blocks and block_size > 0, got {num_blocks} and {block_size}"
            )));
        }
        let geo = Geometry {
            num_heads: cfg.num_attention_heads as usize,
            num_kv_heads: cfg.num_key_value_heads as usize,
            head_dim: cfg.head_dim as usize,
            block_size,
        };
        let shape = [
            num_blocks as i64,
            cfg.num_key_value_heads,
            block_size as i64,
            cfg.head_dim,
        ];
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| -> Result<LayerPools> {
                Ok(LayerPools {
                    keys: Tensor::f_zeros(shape, (kind, device))?,
                    values: Tensor::f_zeros(shape, (kind, device))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = if device == Device::Cpu && matches!(kind, Kind::Float | Kind::BFloat16) {
            AttentionBackend::CpuKernel
        } else {
            AttentionBackend::GatherSdpa
        };
        Ok(PagedKvCache {
            layers,
            geo,
            num_blocks,
            kind,
            device,
            backend,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.geo.block_size
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn backend(&self) -> AttentionBackend {
        self.backend
    }

    /// Forces a backend (the gather path works everywhere; the kernel only on CPU).
    pub fn set_backend(&mut self, backend: AttentionBackend) -> Result<()> {
        if backend == AttentionBackend::CpuKernel
            && !(self.device == Device::Cpu && matches!(self.kind, Kind::Float | Kind::BFloat16))
        {
            return Err(ModelError::Input(format!(
                "the CPU paged-attention kernel needs f32 or bf16 on CPU, not {:?} on {:?}",
                self.kind, self.device
            )));
        }
        self.backend = backend;
        Ok(())
    }

    /// Bytes of one position across all layers (keys and values).
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len()
            * 2
            * self.geo.num_kv_heads
            * self.geo.head_dim
            * self.kind.elt_size_in_bytes()
    }

    /// Bytes the pools hold.
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.num_blocks * self.geo.block_size
    }

    /// Copies block `src` to `dst` in every layer (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        for l in &mut self.layers {
            for pool in [&mut l.keys, &mut l.values] {
                let from = pool.f_get(src as i64)?;
                pool.f_get(dst as i64)?.f_copy_(&from)?;
            }
        }
        Ok(())
    }

    /// Writes this step's `k`, `v` (`[N, nkv, d]` contiguous) of layer `layer` into
    /// `slots` (`[N]` i64 flat slot ids `block * block_size + offset`).
    pub(crate) fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slots: &SlotIndex,
    ) -> Result<()> {
        let l = &mut self.layers[layer];
        let idx = [Some(&slots.block), None, Some(&slots.offset)];
        let _ = l.keys.f_index_put_(&idx, k, false)?;
        let _ = l.values.f_index_put_(&idx, v, false)?;
        Ok(())
    }

    /// Writes packed f32 `k`, `v` (`[N, nkv, d]` each) of layer `layer` into their flat
    /// `slots` (`block * block_size + offset`, one per token) by slice copies. CPU f32
    /// pools only (the fused layer's path).
    pub(crate) fn write_slots_f32(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
    ) -> Result<()> {
        let (nkv, d, bs) = (
            self.geo.num_kv_heads,
            self.geo.head_dim,
            self.geo.block_size,
        );
        let row = nkv * d;
        if self.kind != Kind::Float || self.device != Device::Cpu {
            return Err(ModelError::Input(format!(
                "write_slots_f32 on a {:?} cache on {:?}",
                self.kind, self.device
            )));
        }
        if k.len() != slots.len() * row || v.len() != k.len() {
            return Err(ModelError::Input(format!(
                "write_slots_f32: {} and {} values for {} slots of {row}",
                k.len(),
                v.len(),
                slots.len()
            )));
        }
        if let Some(&s) = slots.iter().find(|&&s| s >= self.num_blocks * bs) {
            return Err(ModelError::Input(format!(
                "slot {s} is outside the pool of {} x {bs}",
                self.num_blocks
            )));
        }
        let l = &mut self.layers[layer];
        // SAFETY: the pools are contiguous f32 CPU tensors (checked above) owned by this
        // cache, borrowed mutably here, and every index is in bounds (slots checked).
        let (kp, vp) = unsafe { (as_mut_slice::<f32>(&l.keys), as_mut_slice::<f32>(&l.values)) };
        for (t, &slot) in slots.iter().enumerate() {
            let (b, o) = (slot / bs, slot % bs);
            for h in 0..nkv {
                let dst = ((b * nkv + h) * bs + o) * d;
                let src = (t * nkv + h) * d;
                kp[dst..dst + d].copy_from_slice(&k[src..src + d]);
                vp[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        Ok(())
    }

    /// Attention of packed `q` `[N, nh, d]` over layer `layer`'s cache; `[N, nh, d]`.
    pub(crate) fn attend(&self, layer: usize, q: &Tensor, spans: &[SeqSpan]) -> Result<Tensor> {
        let l = &self.layers[layer];
        match self.backend {
            AttentionBackend::CpuKernel => {
                let q = q.contiguous();
                let out = q.empty_like();
                let threads = tch::get_num_threads().max(1) as usize;
                let err = |e: super::kernel::KernelError| ModelError::Input(e.to_string());
                // SAFETY: all four tensors are contiguous CPU tensors of `self.kind`
                // (checked by the backend choice and `contiguous`), alive for the call;
                // `out` is fresh and not aliased.
                unsafe {
                    match self.kind {
                        Kind::Float => paged_attention(
                            self.geo,
                            as_slice::<f32>(&q),
                            as_slice::<f32>(&l.keys),
                            as_slice::<f32>(&l.values),
                            spans,
                            as_mut_slice::<f32>(&out),
                            threads,
                        )
                        .map_err(err)?,
                        _ => paged_attention(
                            self.geo,
                            as_slice::<bf16>(&q),
                            as_slice::<bf16>(&l.keys),
                            as_slice::<bf16>(&l.values),
                            spans,
                            as_mut_slice::<bf16>(&out),
                            threads,
                        )
                        .map_err(err)?,
                    }
                }
                Ok(out)
            }
            AttentionBackend::GatherSdpa => {
                gathered_attention(self.geo, &l.keys, &l.values, q, spans)
            }
        }
    }
}

/// Flat slots of a step's tokens as the two index tensors `index_put_` takes.
#[derive(Debug)]
pub(crate) struct SlotIndex {
    pub block: Tensor,
    pub offset: Tensor,
}

unsafe fn as_slice<T>(t: &Tensor) -> &[T] {
    std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel())
}

#[allow(clippy::mut_from_ref)]
unsafe fn as_mut_slice<T>(t: &Tensor) -> &mut [T] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel())
}

/// Gathers every sequence's blocks into a padded `[B, nkv, S, d]` copy and runs SDPA
/// with a causal, padding-aware mask. `q` `[N, nh, d]` -> `[N, nh, d]`.
pub fn gathered_attention(
    geo: Geometry,
    keys: &Tensor,
    values: &Tensor,
    q: &Tensor,
    spans: &[SeqSpan],
) -> Result<Tensor> {
    let device = q.device();
    let (nh, nkv, d, bs) = (
        geo.num_heads as i64,
        geo.num_kv_heads as i64,
        geo.head_dim as i64,
        geo.block_size as i64,
    );
    let b = spans.len() as i64;
    let max_blocks = spans
        .iter()
        .map(|s| s.ctx_len.div_ceil(bs as usize))
        .max()
        .unwrap_or(1) as i64;
    let tq = spans.iter().map(|s| s.q_len).max().unwrap_or(1) as i64;
    let s_len = max_blocks * bs;
    let mut table = vec![0i64; (b * max_blocks) as usize];
    let mut qrows = vec![0i64; (b * tq) as usize];
    let mut qvalid = vec![false; (b * tq) as usize];
    let mut mask = vec![false; (b * tq * s_len) as usize];
    for (i, s) in spans.iter().enumerate() {
        let nblk = s.ctx_len.div_ceil(bs as usize);
        for (j, &blk) in s.blocks[..nblk].iter().enumerate() {
            table[i * max_blocks as usize + j] = blk as i64;
        }
        let past = s.ctx_len - s.q_len;
        for j in 0..s.q_len {
            let r = i * tq as usize + j;
            qrows[r] = (s.q_start + j) as i64;
            qvalid[r] = true;
            let row = &mut mask[r * s_len as usize..][..s_len as usize];
            row[..past + j + 1].fill(true);
        }
        for j in s.q_len..tq as usize {
            // Padding queries see one key so SDPA stays finite; their output is dropped.
            mask[(i * tq as usize + j) * s_len as usize] = true;
        }
    }
    let table = Tensor::from_slice(&table).to_device(device);
    let gather = |pool: &Tensor| -> Result<Tensor> {
        Ok(pool
            .f_index_select(0, &table)?
            .view([b, max_blocks, nkv, bs, d])
            .permute([0, 2, 1, 3, 4])
            .reshape([b, nkv, s_len, d]))
    };
    let (k, v) = (gather(keys)?, gather(values)?);
    let rows = Tensor::from_slice(&qrows).to_device(device);
    let qp = q
        .f_index_select(0, &rows)?
        .view([b, tq, nh, d])
        .transpose(1, 2);
    let mask = Tensor::from_slice(&mask)
        .to_device(device)
        .view([b, 1, tq, s_len]);
    let out = Tensor::f_scaled_dot_product_attention(
        &qp,
        &k,
        &v,
        Some(&mask),
        0.0,
        false,
        None,
        nh != nkv,
    )?;
    let out = out.transpose(1, 2).reshape([b * tq, nh, d]);
    let valid: Vec<i64> = (0..qvalid.len() as i64)
        .filter(|&r| qvalid[r as usize])
        .collect();
    let picked = out.f_index_select(0, &Tensor::from_slice(&valid).to_device(device))?;
    // Rows come out in span order; put them back at their packed positions.
    let dest: Vec<i64> = qrows
        .iter()
        .zip(&qvalid)
        .filter(|(_, &v)| v)
        .map(|(&r, _)| r)
        .collect();
    let n = q.size()[0];
    let result = Tensor::f_zeros([n, nh, d], (q.kind(), device))?;
    Ok(result.f_index_copy(0, &Tensor::from_slice(&dest).to_device(device), &picked)?)
}
