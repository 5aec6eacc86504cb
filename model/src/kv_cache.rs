//! Key/value cache for incremental decoding of a batch of sequences.
//!
//! The cache is owned by the caller and passed into [`crate::Transformer::forward`], so
//! one model serves any number of independent batches. Sequences of different lengths
//! are left-padded: every row has the same number of cached positions `S`, and `mask`
//! (`[B, S]`, bool) marks which of them are real tokens. Rows can be dropped
//! ([`KvCache::select`]) when sequences finish and batches merged ([`KvCache::concat`])
//! when new sequences join, which is what continuous batching needs.
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Cached keys and values of one layer: `[B, num_key_value_heads, S, head_dim]` each,
/// after RoPE.
#[derive(Debug)]
pub struct LayerKv {
    pub keys: Tensor,
    pub values: Tensor,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `[B, S]` bool: true where the cached position holds a real token. `None` until the
    /// first forward.
    mask: Option<Tensor>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            mask: None,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Cached positions per row (`S`), padding included.
    pub fn seq_len(&self) -> i64 {
        self.mask.as_ref().map_or(0, |m| m.size()[1])
    }

    /// Rows in the cache; 0 before the first forward.
    pub fn batch_size(&self) -> i64 {
        self.mask.as_ref().map_or(0, |m| m.size()[0])
    }

    /// `[B, S]` validity mask of the cached positions.
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    /// Real (non-padding) tokens cached per row, `[B]` i64.
    pub fn lengths(&self) -> Option<Tensor> {
        self.mask
            .as_ref()
            .map(|m| m.sum_dim_intlist(1, false, Kind::Int64))
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                l.keys.numel() * l.keys.kind().elt_size_in_bytes()
                    + l.values.numel() * l.values.kind().elt_size_in_bytes()
            })
            .sum()
    }

    /// Appends this step's keys and values of layer `i` and returns the full ones.
    pub(crate) fn append(&mut self, i: usize, keys: Tensor, values: Tensor) -> (Tensor, Tensor) {
        let layer = match self.layers[i].take() {
            None => LayerKv { keys, values },
            Some(old) => LayerKv {
                keys: Tensor::cat(&[old.keys, keys], 2),
                values: Tensor::cat(&[old.values, values], 2),
            },
        };
        let out = (layer.keys.shallow_clone(), layer.values.shallow_clone());
        self.layers[i] = Some(layer);
        out
    }

    /// Records the validity mask after a forward that appended to every layer.
    pub(crate) fn set_mask(&mut self, mask: Tensor) {
        self.mask = Some(mask);
    }

    /// Keeps only the rows `rows` (`[N]` i64 indices), in that order.
    pub fn select(&self, rows: &Tensor) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| -> Result<LayerKv> {
                        Ok(LayerKv {
                            keys: l.keys.f_index_select(0, rows)?,
                            values: l.values.f_index_select(0, rows)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mask = self
            .mask
            .as_ref()
            .map(|m| m.f_index_select(0, rows))
            .transpose()?;
        Ok(KvCache { layers, mask })
    }

    /// Stacks the rows of several caches into one, left-padding the shorter ones.
    pub fn concat(caches: &[&KvCache]) -> Result<KvCache> {
        let Some(first) = caches.first() else {
            return Err(ModelError::Input("concat of no caches".into()));
        };
        let num_layers = first.num_layers();
        let caches: Vec<&&KvCache> = caches.iter().filter(|c| c.mask.is_some()).collect();
        if caches.iter().any(|c| c.num_layers() != num_layers) {
            return Err(ModelError::Input(
                "concat of caches with different layer counts".into(),
            ));
        }
        if caches.is_empty() {
            return Ok(KvCache::new(num_layers));
        }
        let s = caches.iter().map(|c| c.seq_len()).max().unwrap_or(0);
        let pad = |t: &Tensor, dim: i64| -> Result<Tensor> {
            let missing = s - t.size()[dim as usize];
            if missing == 0 {
                return Ok(t.shallow_clone());
            }
            let mut shape = t.size();
            shape[dim as usize] = missing;
            let z = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            Ok(Tensor::f_cat(&[&z, t], dim)?)
        };
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let mut keys = vec![];
            let mut values = vec![];
            for c in &caches {
                let l = c.layers[i].as_ref().ok_or_else(|| {
                    ModelError::Input(format!("cache layer {i} is empty in a filled cache"))
                })?;
                keys.push(pad(&l.keys, 2)?);
                values.push(pad(&l.values, 2)?);
            }
            layers.push(Some(LayerKv {
                keys: Tensor::f_cat(&keys, 0)?,
                values: Tensor::f_cat(&values, 0)?,
            }));
        }
        let masks = caches
            .iter()
            .map(|c| pad(c.mask.as_ref().expect("filtered above"), 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            mask: Some(Tensor::f_cat(&masks, 0)?),
        })
    }

    /// Drops leading positions that are padding in every row (left after rows were
    /// removed by [`KvCache::select`]).
    pub fn compact(&mut self) -> Result<()> {
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        let any = mask.f_any_dims(&[0i64][..], false)?;
        let s = any.size()[0];
        let nonzero = any.f_nonzero()?;
        if nonzero.numel() == 0 {
            return Ok(());
        }
        let first = nonzero.f_min()?.int64_value(&[]);
        if first == 0 {
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            l.keys = l.keys.f_narrow(2, first, s - first)?;
            l.values = l.values.f_narrow(2, first, s - first)?;
        }
        self.mask = Some(mask.f_narrow(1, first, s - first)?);
        Ok(())
    }
}
