//! Multi-lane updates: one update over `count` parallel connections that present the
//! same token (`proto::data_plane`, "Lanes"), each carrying pieces of tensors into one
//! shared [`WeightAssembler`] (a tensor's pieces may come over several lanes) and reading
//! their bytes straight into the staging tensors, as a single connection does; the lane whose end marker completes the update finishes
//! it and answers for all of it. A lane that fails fails the update at once (its token is
//! spent: no rejoin), and the other lanes stop at their next header.
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::data_plane::{self as dp, Lane, Token};

use super::pieces::Pieces;
use super::{
    headers, io_error, read_tensor, refuse, staged_outcome, stream_timeout, Outcome, Shared, Slot,
    SlotCell, TOKEN_WAIT, UNKNOWN_TOKEN,
};
use crate::error::EngineError;
use crate::weights::WeightAssembler;

/// The shared state of one multi-lane update.
pub(super) struct Gather {
    count: u8,
    state: Mutex<State>,
}

struct State {
    /// Taken by the lane that completes the update (or dropped when it fails).
    asm: Option<WeightAssembler>,
    /// The tensors whose pieces are still arriving (on any lane).
    pieces: Pieces,
    /// One bit per lane index that connected.
    joined: u16,
    ended: u8,
    /// The gRPC handler's end of the update, answered once.
    slot: Option<Slot>,
    failed: bool,
}

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gather")
            .field("count", &self.count)
            .finish()
    }
}

impl Gather {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No longer found by lanes presenting `token`.
    fn forget(self: &Arc<Self>, shared: &Shared, token: &Token) {
        let mut gathers = shared.gathers.lock().expect("gathers lock");
        if gathers.get(token).is_some_and(|g| Arc::ptr_eq(g, self)) {
            gathers.remove(token);
        }
    }

    /// Fails the update with `e`; the first failure is the one the handler sees.
    fn fail(self: &Arc<Self>, shared: &Shared, token: &Token, e: EngineError) {
        let slot = {
            let mut st = self.state();
            if st.failed {
                return;
            }
            st.failed = true;
            st.asm = None;
            st.slot.take()
        };
        self.forget(shared, token);
        if let Some(slot) = slot {
            let _ = slot.done.send(Err(e));
        }
    }
}

/// Joins the update of `token` as `lane`: the gather an earlier lane opened, or a new
/// one holding the token's slot (waiting up to [`TOKEN_WAIT`] for the offer).
fn join(shared: &Shared, token: &Token, lane: Lane) -> Result<Arc<Gather>, String> {
    let deadline = Instant::now() + TOKEN_WAIT;
    let mut slots = shared.slots.lock().expect("slots lock");
    loop {
        let open = shared
            .gathers
            .lock()
            .expect("gathers lock")
            .get(token)
            .cloned();
        if let Some(g) = open {
            if g.count != lane.count {
                return Err(format!(
                    "lane {} of {}, but this update's lanes number {}",
                    lane.index, lane.count, g.count
                ));
            }
            let mut st = g.state();
            if st.joined & (1 << lane.index) != 0 {
                return Err(format!(
                    "lane {} of this update is already connected",
                    lane.index
                ));
            }
            st.joined |= 1 << lane.index;
            drop(st);
            return Ok(g);
        }
        if let Some(SlotCell(slot)) = slots.remove(token) {
            slot.connected
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let g = Arc::new(Gather {
                count: lane.count,
                state: Mutex::new(State {
                    asm: Some(WeightAssembler::new(&shared.specs)),
                    pieces: Pieces::default(),
                    joined: 1 << lane.index,
                    ended: 0,
                    slot: Some(slot),
                    failed: false,
                }),
            });
            shared
                .gathers
                .lock()
                .expect("gathers lock")
                .insert(*token, g.clone());
            return Ok(g);
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(UNKNOWN_TOKEN.into());
        };
        slots = shared
            .registered
            .wait_timeout(slots, left)
            .expect("slots lock")
            .0;
    }
}

/// Serves one lane of a multi-lane update (after its hello).
pub(super) fn serve(mut s: TcpStream, peer: SocketAddr, shared: &Shared, token: Token, lane: Lane) {
    let gather = match join(shared, &token, lane) {
        Ok(g) => g,
        Err(m) => {
            tracing::warn!(%peer, lane = lane.index, error = %m, "data-plane lane refused");
            refuse(&mut s, &format!("refused: {m}"));
            return;
        }
    };
    if dp::write_status(&mut s, Ok(())).is_err() {
        let e = EngineError::Unavailable(format!(
            "data plane: lane {} of {}: the sender left after the hello; nothing was applied",
            lane.index, lane.count
        ));
        gather.fail(shared, &token, e);
        return;
    }
    match receive(&mut s, shared, &gather, lane) {
        // Another lane completes the update.
        Ok(None) => {
            let _ = dp::write_status(&mut s, Ok(()));
        }
        Ok(Some((slot, outcome))) => {
            gather.forget(shared, &token);
            let status = outcome.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if let Err(m) = &status {
                tracing::warn!(%peer, error = %m, "data-plane update rejected");
            }
            let _ = slot.done.send(outcome);
            match status {
                Ok(()) => {
                    let _ = dp::write_status(&mut s, Ok(()));
                }
                Err(m) => refuse(&mut s, &m),
            }
        }
        Err(e) => {
            tracing::warn!(%peer, lane = lane.index, error = %e, "data-plane update rejected");
            let m = e.to_string();
            gather.fail(shared, &token, e);
            refuse(&mut s, &m);
        }
    }
}

/// Receives this lane's tensors; the handler's slot and the update's outcome when this
/// lane's end completes it.
fn receive(
    s: &mut TcpStream,
    shared: &Shared,
    gather: &Gather,
    lane: Lane,
) -> Result<Option<(Slot, Outcome)>, EngineError> {
    let idle = shared.idle;
    let mut r = headers(s);
    let route = dp::read_route(&mut r).map_err(|e| io_error("reading the route", e, idle))?;
    if !route.hops.is_empty() {
        return Err(EngineError::InvalidArgument(format!(
            "data plane: lane {} of {}: a multi-lane update goes to one worker, but its route names {} more",
            lane.index,
            lane.count,
            route.hops.len()
        )));
    }
    let timeout = stream_timeout(idle, &route);
    let _ = s.set_read_timeout(Some(timeout));
    let other_failed = || {
        EngineError::Unavailable(
            "data plane: another lane of this update failed; nothing was applied".into(),
        )
    };
    while let Some(h) =
        dp::read_header(&mut r).map_err(|e| io_error("reading a header", e, timeout))?
    {
        let tensor = {
            let mut guard = gather.state();
            let st = &mut *guard;
            // Dropped when the update failed.
            let Some(asm) = st.asm.as_mut() else {
                return Err(other_failed());
            };
            st.pieces.place(asm, shared, &h)?
        };
        read_tensor(&mut r, &tensor, &h, timeout, None)?;
    }
    let mut st = gather.state();
    if st.failed {
        return Err(other_failed());
    }
    st.ended += 1;
    if st.ended < gather.count {
        return Ok(None);
    }
    // Every lane has ended: a tensor still missing pieces never gets them.
    st.pieces.complete()?;
    let asm = st.asm.take().expect("held until the update ends");
    let slot = st.slot.take().expect("answered only at the end");
    drop(st);
    Ok(Some((slot, staged_outcome(asm, shared))))
}
