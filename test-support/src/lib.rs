//! Test-only machinery, kept out of the libraries that ship: [`faults::FaultProxy`], a
//! TCP proxy that cuts or stalls connections to a worker as a failing network or a
//! killed or hung process would, and [`fuzz`], the mutation fuzzer behind the
//! `fuzz_*` tests and `scripts/fuzz.sh`. A dev-dependency of the crates whose tests use
//! it.
pub mod faults;
pub mod fuzz;

pub use faults::FaultProxy;
