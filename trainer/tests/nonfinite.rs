//! A NaN or infinite loss on one rank never reaches the weights: under `skip` every rank
//! drops the step (weights, moments and step count unchanged, the skip counted), under
//! `stop` every rank fails it; `max_consecutive_skipped_steps` ends a run that only
//! produces non-finite steps.
mod engine_support;

use engine_support::{engine, forward_backward, optim, run_world, same_weights, weights};
use trainer::zero::{NonFinitePolicy, OptimConfig};

fn policy(on_nonfinite: NonFinitePolicy, max_consecutive: u64) -> OptimConfig {
    OptimConfig {
        on_nonfinite,
        max_consecutive_skipped_steps: max_consecutive,
        ..optim()
    }
}

#[test]
fn a_non_finite_loss_on_one_rank_is_skipped_by_every_rank() {
    for poison in [f64::NAN, f64::INFINITY] {
        let out = run_world(2, |rank, port| {
            let mut e = engine(2, rank, port, policy(NonFinitePolicy::Skip, 10));
            forward_backward(&mut e, 0, 1.0);
            let first = e.step().unwrap();
            assert!(!first.skipped);
            let before = weights(&mut e);
            // Only rank 1's loss is poisoned; its gradients carry it to everyone.
            forward_backward(&mut e, 1, if rank == 1 { poison } else { 1.0 });
            let st = e.step().unwrap();
            assert!(st.skipped, "rank {rank}: {st:?}");
            assert_eq!((st.step, st.skipped_steps), (1, 1));
            assert_eq!(e.steps_done(), 1);
            let after = weights(&mut e);
            assert!(same_weights(&before, &after), "rank {rank}: weights moved");
            // Training goes on from the unchanged state.
            forward_backward(&mut e, 2, 1.0);
            let next = e.step().unwrap();
            assert!(!next.skipped && next.loss.is_finite() && next.step == 2);
            assert!(!same_weights(&after, &weights(&mut e)));
            weights(&mut e)
        });
        assert!(same_weights(&out[0], &out[1]), "the ranks diverged");
    }
}

#[test]
fn stop_fails_every_rank_and_endless_skips_stop_the_run() {
    let out = run_world(2, |rank, port| {
        let mut e = engine(2, rank, port, policy(NonFinitePolicy::Stop, 10));
        let before = weights(&mut e);
        forward_backward(&mut e, 0, if rank == 0 { f64::NAN } else { 1.0 });
        let err = e.step().unwrap_err().to_string();
        assert!(same_weights(&before, &weights(&mut e)));
        err
    });
    for e in &out {
        assert!(
            e.contains("non-finite") && e.contains("on_nonfinite = stop"),
            "{e}"
        );
    }
    let mut e = engine(1, 0, 0, policy(NonFinitePolicy::Skip, 3));
    for s in 0..2 {
        forward_backward(&mut e, s, f64::NAN);
        assert!(e.step().unwrap().skipped);
    }
    forward_backward(&mut e, 2, f64::NAN);
    let err = e.step().unwrap_err().to_string();
    assert!(err.contains("max_consecutive_skipped_steps"), "{err}");
    assert_eq!(e.steps_done(), 0);
}
