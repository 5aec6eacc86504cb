//! The paged KV cache (vLLM's PagedAttention, on CPU in plain Rust): fixed-size blocks
//! in one preallocated pool per layer, a block table per sequence, appends that write
//! in place, sharing of prefix blocks by reference count.
//!
//! - [`blocks`]: the pool's bookkeeping without tensors (free list, reference counts,
//!   the prefix index of automatic prefix caching).
//! - [`cache`]: the pool tensors, slot writes, block copies (copy-on-write) and the
//!   attention backends.
//! - [`kernel`]: the CPU attention kernel reading blocks in place (one pass, online
//!   softmax); `simd`: its AVX2 + FMA block step.
//! - [`forward`]: [`crate::Transformer::forward_paged`] over a packed step.
//! - `fused`: its CPU f32 decoder block (RoPE, slot writes and attention in Rust).
pub mod blocks;
pub mod cache;
pub mod forward;
mod fused;
pub mod kernel;
mod simd;

pub use blocks::{block_hash, BlockId, BlockPool};
pub use cache::{gathered_attention, AttentionBackend, PagedKvCache};
pub use forward::PagedStep;
pub use kernel::{paged_attention, paged_attention_isa, Geometry, Isa, SeqSpan};
