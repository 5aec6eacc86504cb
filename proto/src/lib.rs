//! The wire protocol between trainer ranks and rollout workers.
//!
//! The `.proto` files live beside this crate (`proto/rollout/v1/`); their generated code is
//! included from OUT_DIR. The rollout-worker issue fills the protocol in; until then the
//! crate is empty so that the dependency direction (trainer -> proto <- rollout-worker)
//! is fixed from the start.
