//! The wire protocol between trainer ranks and rollout workers (`rollout.v1`).
//!
//! The `.proto` file lives beside this crate (`proto/rollout/v1/rollout.proto`) and is the
//! reference for field semantics (which log-probs are returned, what a weight version
//! means); `build.rs` compiles it into OUT_DIR with a vendored protoc and this module
//! includes the generated messages, the tonic client and the server trait. Wire types
//! stay here: the worker and the trainer convert them to domain types at their edges.
pub mod rollout {
    pub mod v1 {
        tonic::include_proto!("rollout.v1");
    }
}

pub use rollout::v1;

pub mod data_plane;
pub mod frame;
