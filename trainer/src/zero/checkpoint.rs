//! Sharded training checkpoints that resume exactly, at the same or another world size.
//!
//! Layout of `root/step-00000042/`:
//! - `rank{r}.safetensors`: rank r's shards of every unit (`{unit}.master`,
//!   `{unit}.exp_avg`, `{unit}.exp_avg_sq`, f32);
//! - `rank{r}.json`: the ranges those shards cover, the step, stage and world size, and
//!   the caller's trainer state (data position, RNG seeds...);
//! - `hf/`: when asked, a Hugging Face export of the policy written by rank 0;
//! - `manifest.json`, written last by rank 0: world size, step and the SHA-256 of every
//!   file. A directory without a manifest, or whose files do not match it, is refused.
//!
//! Saving: rank 0 first removes stale temporaries of an earlier crashed save
//! ([`prune_stale`]), then every rank writes into `root/.tmp-step-00000042/` and fsyncs
//! each file; the ranks agree on the outcome (a rank that could not write makes every
//! rank fail, naming it). Rank 0 writes the manifest, fsyncs the temporary directories,
//! and puts the new directory in place without ever deleting the existing copy first: an
//! existing `step-…` is renamed aside to `.old-step-…`, the new one renamed in, the
//! root fsynced, and only then the old copy removed (a crash in between leaves the old
//! copy, which [`prune_stale`] renames back). Then all but the newest `keep_last` step
//! directories are removed, and the ranks agree again.
//!
//! Resuming from `latest` ([`checkpoints`]) fails loudly on I/O errors; a newest
//! checkpoint that fails verification falls back to the one before it, with a warning
//! ([`ZeroEngine::resume`]).
//!
//! Loading: the manifest's world size and stage give every saving rank's range of each
//! unit ([`ShardLayout`], the same function that sharded them); [`plan_unit`] picks,
//! for this rank's new range, the slices of the old shards that cover it, and the rank
//! reads (and checksums) only those ranks' files, plus `rank0.json` for the trainer
//! state. So a checkpoint written at one world size or stage loads at any other, and
//! re-sharding N files onto N ranks reads each file once, not N times. The ranks then
//! agree on the outcome before any further collective: if one fails, all fail, each
//! naming the first failing rank's reason.
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::engine::{EngineError, Result, ZeroEngine};
use crate::dist::{Communicator, ReduceOp, ShardLayout};

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct RankMeta {
    format_version: u32,
    rank: usize,
    world_size: usize,
    stage: u8,
    step: u64,
    /// `(unit name, start, end)` of each unit's shard in this rank's file.
    ranges: Vec<(String, usize, usize)>,
    trainer_state: Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    step: u64,
    world_size: usize,
    stage: u8,
    /// Path relative to the step directory -> hex SHA-256.
    files: std::collections::BTreeMap<String, String>,
}

fn err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Checkpoint {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn io(path: &Path, e: std::io::Error) -> EngineError {
    err(path, e.to_string())
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Makes a directory's entries (creations, renames) durable.
fn fsync_dir(path: &Path) -> Result<()> {
    fsync_file(path)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io(path, e))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Files under `dir`, relative, sorted.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.path().is_dir() {
            list_files(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    out.sort();
    Ok(())
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `root` (step directories with a manifest), oldest first.
/// A missing `root` has none; any other I/O error is returned, never read as "none".
pub fn checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(root, e)),
    };
    let mut steps = vec![];
    for entry in entries {
        let p = entry.map_err(|e| io(root, e))?.path();
        let is_step = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("step-"));
        if !is_step {
            continue;
        }
        let manifest = p.join("manifest.json");
        match std::fs::metadata(&manifest) {
            Ok(_) => steps.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&manifest, e)),
        }
    }
    steps.sort();
    Ok(steps)
}

/// The newest complete checkpoint under `root`, if any (I/O errors are errors).
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(root)?.pop())
}

/// Cleans up after a save that crashed: removes `.tmp-step-…` directories, and for each
/// `.old-step-…` either removes it (its replacement is in place) or renames it back
/// (the crash came between the two renames). Rank 0 runs it before each save.
pub fn prune_stale(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(root, e)),
    };
    for entry in entries {
        let p = entry.map_err(|e| io(root, e))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if name.starts_with(".tmp-step-") {
            tracing::info!(dir = %p.display(), "removing the temporary of an unfinished save");
            std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
        } else if let Some(step) = name.strip_prefix(".old-") {
            let current = root.join(step);
            if current.join("manifest.json").exists() {
                std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
            } else {
                tracing::warn!(dir = %current.display(), "restoring the copy an interrupted save had set aside");
                let _ = std::fs::remove_dir_all(&current);
                std::fs::rename(&p, &current).map_err(|e| io(&current, e))?;
            }
        }
    }
    fsync_dir(root)
}

/// Rank 0's part of a save once every rank's files are written: the manifest, the
/// fsyncs, and the rename into place that never deletes the existing copy first.
fn commit(
    root: &Path,
    tmp: &Path,
    dst: &Path,
    mut manifest: Manifest,
    keep_last: usize,
) -> Result<()> {
    let mut names = vec![];
    list_files(tmp, "", &mut names)?;
    for n in names {
        manifest
            .files
            .insert(n.clone(), sha256_file(&tmp.join(&n))?);
    }
    let hf = tmp.join("hf");
    if hf.is_dir() {
        fsync_dir(&hf)?;
    }
    write_synced(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)
            .expect("serialisable")
            .as_bytes(),
    )?;
    fsync_dir(tmp)?;
    let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("step");
    let aside = root.join(format!(".old-{name}"));
    let had_old = dst.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(dst, &aside).map_err(|e| io(dst, e))?;
    }
    std::fs::rename(tmp, dst).map_err(|e| io(dst, e))?;
    fsync_dir(root)?;
    if had_old {
        std::fs::remove_dir_all(&aside).map_err(|e| io(&aside, e))?;
    }
    prune(root, keep_last)
}

impl ZeroEngine {
    /// Writes a checkpoint of the current step under `root` (collective). With
    /// `hf_export = Some(src)`, rank 0 also writes `hf/` in the Hugging Face format, with
    /// the tokenizer files copied from `src`. Returns the step directory.
    pub fn save_checkpoint(
        &mut self,
        root: &Path,
        trainer_state: &Value,
        keep_last: usize,
        hf_export: Option<&Path>,
    ) -> Result<PathBuf> {
        let rank = self.rank();
        let name = step_dir_name(self.step);
        let tmp = root.join(format!(".tmp-{name}"));
        let dst = root.join(&name);
        let prepared = if rank == 0 {
            std::fs::create_dir_all(root)
                .map_err(|e| io(root, e))
                .and_then(|_| prune_stale(root))
                .and_then(|_| std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e)))
        } else {
            Ok(())
        };
        self.agree_save(&tmp, prepared)?;
        let written = self.write_own_files(&tmp, trainer_state);
        self.agree_save(&tmp, written)?;

        if let Some(src) = hf_export {
            // A collective: every rank takes part, rank 0 writes.
            let weights = self.full_weights()?;
            let exported = if rank == 0 {
                let hf = tmp.join("hf");
                model::save_pretrained(
                    &hf,
                    &self.cfg,
                    &weights,
                    self.cfg.dtype,
                    model::checkpoint::DEFAULT_MAX_SHARD_BYTES,
                )
                .and_then(|_| model::checkpoint::copy_auxiliary_files(src, &hf))
                .map_err(EngineError::from)
            } else {
                Ok(())
            };
            self.agree_save(&tmp, exported)?;
        }

        let committed = if rank == 0 {
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                step: self.step,
                world_size: self.world_size(),
                stage: self.zero.stage.number(),
                files: Default::default(),
            };
            commit(root, &tmp, &dst, manifest, keep_last)
        } else {
            Ok(())
        };
        self.agree_save(&dst, committed)?;
        Ok(dst)
    }

    /// This rank's shards and metadata, each file fsynced.
    fn write_own_files(&self, tmp: &Path, trainer_state: &Value) -> Result<()> {
        let rank = self.rank();
        let mut tensors: Vec<(String, Tensor)> = vec![];
        let mut ranges = vec![];
        for st in &self.units {
            let n = &st.unit.name;
            tensors.push((format!("{n}.master"), st.master.to_device(tch::Device::Cpu)));
            tensors.push((
                format!("{n}.exp_avg"),
                st.exp_avg.to_device(tch::Device::Cpu),
            ));
            tensors.push((
                format!("{n}.exp_avg_sq"),
                st.exp_avg_sq.to_device(tch::Device::Cpu),
            ));
            ranges.push((n.clone(), st.range.start, st.range.end));
        }
        let file = tmp.join(format!("rank{rank}.safetensors"));
        Tensor::write_safetensors(&tensors, &file).map_err(|e| err(&file, e.to_string()))?;
        fsync_file(&file)?;
        let meta = RankMeta {
            format_version: FORMAT_VERSION,
            rank,
            world_size: self.world_size(),
            stage: self.zero.stage.number(),
            step: self.step,
            ranges,
            trainer_state: trainer_state.clone(),
        };
        write_synced(
            &tmp.join(format!("rank{rank}.json")),
            serde_json::to_string_pretty(&meta)
                .expect("serialisable")
                .as_bytes(),
        )
    }

    /// [`Self::agree`] for a save: every rank fails if one could not write, the others
    /// naming it.
    fn agree_save(&mut self, dir: &Path, local: Result<()>) -> Result<()> {
        self.agree_with(dir, local, "could not save it")
    }

    /// Loads `dir`; with `fall_back` (resuming from `latest`), a checkpoint that fails
    /// verification on any rank is skipped with a warning for the newest older one under
    /// the same root. Returns the directory loaded and its trainer state.
    pub fn resume(&mut self, dir: &Path, fall_back: bool) -> Result<(PathBuf, Value)> {
        let mut candidates = vec![dir.to_path_buf()];
        if fall_back {
            if let Some(root) = dir.parent() {
                let mut older: Vec<PathBuf> = checkpoints(root)?
                    .into_iter()
                    .filter(|p| p.file_name() < dir.file_name())
                    .collect();
                older.reverse();
                candidates.extend(older);
            }
        }
        let mut last = None;
        for (i, c) in candidates.iter().enumerate() {
            match self.load_checkpoint(c) {
                Ok(state) => return Ok((c.clone(), state)),
                Err(e @ EngineError::Checkpoint { .. }) if i + 1 < candidates.len() => {
                    tracing::warn!(
                        dir = %c.display(), error = %e,
                        next = %candidates[i + 1].display(),
                        "checkpoint failed verification; falling back to the previous one"
                    );
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| err(dir, "no checkpoint to resume from")))
    }

    /// Restores master weights, Adam moments and the step from `dir` (collective),
    /// re-sharding when the checkpoint was written at another world size or stage.
    /// Reads only the saved shards that overlap this rank's ranges. Returns the
    /// trainer state saved with it. If any rank fails, every rank returns an error.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<Value> {
        let local = self.read_own_shards(dir);
        let restored = self.agree(dir, local)?;
        for (st, [master, exp_avg, exp_avg_sq]) in self.units.iter_mut().zip(restored.units) {
            st.master = master;
            st.exp_avg = exp_avg;
            st.exp_avg_sq = exp_avg_sq;
            let _ = st.grad.zero_();
        }
        self.step = restored.step;
        self.publish_params()?;
        Ok(restored.trainer_state)
    }

    /// The local half of [`Self::load_checkpoint`], with no collective: checks the
    /// manifest, reads the files this rank's ranges need and assembles its shards.
    fn read_own_shards(&self, dir: &Path) -> Result<Restored> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath).map_err(|e| {
            err(
                &mpath,
                format!("not a complete checkpoint (no readable manifest.json): {e}"),
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| err(&mpath, format!("invalid manifest: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(err(
                &mpath,
                format!(
                    "format version {} is not {FORMAT_VERSION}",
                    manifest.format_version
                ),
            ));
        }
        // Which slices of which saved shards make up each of this rank's ranges.
        let mut plans = Vec::with_capacity(self.units.len());
        let mut needed = BTreeSet::new();
        for st in &self.units {
            let old = saved_ranges(manifest.stage, manifest.world_size, st.unit.len);
            let plan = plan_unit(&old, st.range.clone()).map_err(|at| {
                err(
                    dir,
                    format!(
                        "unit {}: no saved shard covers element {at} (world size {}, stage {})",
                        st.unit.name, manifest.world_size, manifest.stage
                    ),
                )
            })?;
            needed.extend(plan.iter().map(|p| p.rank));
            plans.push((old, plan));
        }
        let trainer_state = read_meta(dir, &manifest, 0)?.trainer_state;
        let mut files = std::collections::HashMap::new();
        for &r in &needed {
            let meta = read_meta(dir, &manifest, r)?;
            let name = format!("rank{r}.safetensors");
            verify(dir, &manifest, &name)?;
            let tensors: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(dir.join(&name))?
                    .into_iter()
                    .collect();
            files.insert(r, (meta, tensors));
        }
        tracing::info!(
            rank = self.rank(),
            dir = %dir.display(),
            files = ?needed,
            "checkpoint shards read"
        );

        let mut units = Vec::with_capacity(self.units.len());
        for (st, (old, plan)) in self.units.iter().zip(plans) {
            let name = &st.unit.name;
            let device = st.master.device();
            let mut parts: [Vec<Tensor>; 3] = [vec![], vec![], vec![]];
            for piece in &plan {
                let (meta, tensors) = &files[&piece.rank];
                let saved = meta.ranges.iter().find(|(n, _, _)| n == name);
                let want = &old[piece.rank];
                if saved.map(|(_, s, e)| *s..*e).as_ref() != Some(want) {
                    return Err(err(
                        &dir.join(format!("rank{}.json", piece.rank)),
                        format!(
                            "unit {name}: saved range {saved:?} is not {want:?}, the range of \
                             rank {} at world size {} stage {}",
                            piece.rank, manifest.world_size, manifest.stage
                        ),
                    ));
                }
                for (k, what) in ["master", "exp_avg", "exp_avg_sq"].iter().enumerate() {
                    let key = format!("{name}.{what}");
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| err(dir, format!("rank {} lacks {key}", piece.rank)))?;
                    if t.numel() != want.len() {
                        return Err(err(
                            dir,
                            format!(
                                "rank {}: {key} has {} elements, its range {}",
                                piece.rank,
                                t.numel(),
                                want.len()
                            ),
                        ));
                    }
                    let slice = &piece.within;
                    parts[k].push(t.narrow(0, slice.start as i64, slice.len() as i64));
                }
            }
            let take = |p: &[Tensor]| {
                if p.is_empty() {
                    Tensor::zeros([0], (Kind::Float, device))
                } else {
                    Tensor::cat(p, 0).to_kind(Kind::Float).to_device(device)
                }
            };
            units.push([take(&parts[0]), take(&parts[1]), take(&parts[2])]);
        }
        Ok(Restored {
            step: manifest.step,
            trainer_state,
            units,
        })
    }

    /// Makes the ranks' local outcomes one (collective): `Ok` only if every rank
    /// succeeded. A failing rank returns its own error; the others return one carrying
    /// the lowest failing rank's message, so no rank goes on to a collective its peers
    /// never enter.
    fn agree<T>(&mut self, dir: &Path, local: Result<T>) -> Result<T> {
        self.agree_with(dir, local, "could not load it")
    }

    fn agree_with<T>(&mut self, dir: &Path, local: Result<T>, what: &str) -> Result<T> {
        let (rank, world) = (self.rank(), self.world_size());
        // The lowest failing rank r contributes world - r, the largest value.
        let mut flag = Tensor::from_slice(&[match &local {
            Ok(_) => 0i64,
            Err(_) => (world - rank) as i64,
        }]);
        self.comm.all_reduce(&mut flag, ReduceOp::Max)?;
        let flag = flag.int64_value(&[0]);
        if flag == 0 {
            return local;
        }
        let root = world - flag as usize;
        let message = match &local {
            Err(e) if rank == root => e.to_string(),
            _ => String::new(),
        };
        let mut len = Tensor::from_slice(&[message.len() as i64]);
        self.comm.broadcast(&mut len, root)?;
        let len = len.int64_value(&[0]).max(0) as usize;
        let mut words = Tensor::from_slice(&pack_bytes(message.as_bytes(), len));
        self.comm.broadcast(&mut words, root)?;
        match local {
            Err(e) => Err(e),
            Ok(_) => {
                let words = Vec::<i64>::try_from(&words)?;
                let text = String::from_utf8_lossy(&unpack_bytes(&words, len)).into_owned();
                Err(err(dir, format!("rank {root} {what}: {text}")))
            }
        }
    }
}

/// What one rank restores from a checkpoint.
struct Restored {
    step: u64,
    trainer_state: Value,
    /// Per unit: this rank's master, exp_avg and exp_avg_sq shards, f32.
    units: Vec<[Tensor; 3]>,
}

/// `bytes` zero-padded and packed into `ceil(len / 8)` little-endian i64 words (the
/// collectives carry no byte dtype); `len` is the length every rank agreed on.
fn pack_bytes(bytes: &[u8], len: usize) -> Vec<i64> {
    let mut padded = bytes.to_vec();
    padded.resize(len.div_ceil(8) * 8, 0);
    padded
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect()
}

/// The first `len` bytes of words packed by [`pack_bytes`].
fn unpack_bytes(words: &[i64], len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(len);
    bytes
}

/// Checks `name` against the manifest's SHA-256.
fn verify(dir: &Path, manifest: &Manifest, name: &str) -> Result<()> {
    let path = dir.join(name);
    let want = manifest
        .files
        .get(name)
        .ok_or_else(|| err(&path, "not listed in manifest.json"))?;
    if &sha256_file(&path)? != want {
        return Err(err(
            &path,
            "checksum does not match manifest.json (corrupted or partial)",
        ));
    }
    Ok(())
}

/// Saving rank `r`'s `rank{r}.json`, checksummed and checked against the manifest.
fn read_meta(dir: &Path, manifest: &Manifest, r: usize) -> Result<RankMeta> {
    let name = format!("rank{r}.json");
    let path = dir.join(&name);
    verify(dir, manifest, &name)?;
    let meta: RankMeta =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| io(&path, e))?)
            .map_err(|e| err(&path, e.to_string()))?;
    if (meta.rank, meta.world_size, meta.stage, meta.step)
        != (r, manifest.world_size, manifest.stage, manifest.step)
    {
        return Err(err(
            &path,
            format!(
                "rank {}, world size {}, stage {}, step {} disagree with manifest.json \
                 (rank {r}, world size {}, stage {}, step {})",
                meta.rank,
                meta.world_size,
                meta.stage,
                meta.step,
                manifest.world_size,
                manifest.stage,
                manifest.step
            ),
        ));
    }
    Ok(meta)
}

/// Each saving rank's range of a unit of `len` elements: the whole unit under stage 0
/// (optimizer state replicated), else [`ShardLayout`]'s range over `world_size`.
pub fn saved_ranges(stage: u8, world_size: usize, len: usize) -> Vec<Range<usize>> {
    let layout = ShardLayout::new(len, if stage == 0 { 1 } else { world_size });
    (0..world_size)
        .map(|r| if stage == 0 { 0..len } else { layout.range(r) })
        .collect()
}

/// A slice of one saved shard: elements `within` (relative to the shard's start) of
/// saving rank `rank`'s shard of a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub rank: usize,
    pub within: Range<usize>,
}

/// The slices of saved shards that, concatenated, give elements `want` of a unit
/// whose saved ranks held `saved[r]`. Greedy interval cover: at each position the
/// shard reaching furthest wins (the lowest rank on ties), so the fewest files are
/// read; replicated stage-0 shards all come from rank 0. Pure. `Err(at)` names the
/// first element no shard covers.
pub fn plan_unit(saved: &[Range<usize>], want: Range<usize>) -> Result<Vec<Piece>, usize> {
    let mut pieces = vec![];
    let mut at = want.start;
    while at < want.end {
        let (rank, range) = saved
            .iter()
            .enumerate()
            .filter(|(_, r)| r.start <= at && at < r.end)
            .min_by_key(|(rank, r)| (std::cmp::Reverse(r.end), *rank))
            .ok_or(at)?;
        let end = range.end.min(want.end);
        pieces.push(Piece {
            rank,
            within: at - range.start..end - range.start,
        });
        at = end;
    }
    Ok(pieces)
}

/// Keeps the newest `keep_last` step directories under `root` (0 keeps all).
fn prune(root: &Path, keep_last: usize) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep_last);
    for p in &steps[..excess] {
        std::fs::remove_dir_all(p).map_err(|e| io(p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The saved ranks whose files a new rank reads for one unit.
    fn files(saved: &[Range<usize>], want: Range<usize>) -> Vec<usize> {
        plan_unit(saved, want)
            .unwrap()
            .iter()
            .map(|p| p.rank)
            .collect()
    }

    #[test]
    fn resharding_reads_only_overlapping_shards() {
        // 10 elements saved by 3 ranks (4, 4, 2), loaded by 2 ranks (5, 5).
        let saved = saved_ranges(2, 3, 10);
        assert_eq!(saved, [0..4, 4..8, 8..10]);
        let new = ShardLayout::new(10, 2);
        assert_eq!(
            plan_unit(&saved, new.range(0)).unwrap(),
            [
                Piece {
                    rank: 0,
                    within: 0..4
                },
                Piece {
                    rank: 1,
                    within: 0..1
                }
            ]
        );
        assert_eq!(
            plan_unit(&saved, new.range(1)).unwrap(),
            [
                Piece {
                    rank: 1,
                    within: 1..4
                },
                Piece {
                    rank: 2,
                    within: 0..2
                }
            ]
        );
        // Same world size: each rank reads its own file only.
        for r in 0..3 {
            assert_eq!(files(&saved, ShardLayout::new(10, 3).range(r)), [r]);
        }
        // 2 -> 3 ranks: the middle rank straddles both saved shards.
        let saved = saved_ranges(3, 2, 9);
        let new = ShardLayout::new(9, 3);
        let got: Vec<_> = (0..3).map(|r| files(&saved, new.range(r))).collect();
        assert_eq!(got, [vec![0], vec![0, 1], vec![1]]);
    }

    #[test]
    fn replicated_and_empty_ranges() {
        // Stage 0 saved the whole unit on every rank: rank 0's copy serves everyone.
        let saved = saved_ranges(0, 3, 7);
        assert_eq!(saved, [0..7, 0..7, 0..7]);
        for r in 0..2 {
            assert_eq!(files(&saved, ShardLayout::new(7, 2).range(r)), [0]);
        }
        // An empty new range needs nothing; an empty saved shard is never read.
        assert!(plan_unit(&saved, 7..7).unwrap().is_empty());
        let saved = saved_ranges(1, 4, 5); // 2, 2, 1, 0
        assert_eq!(files(&saved, 0..5), [0, 1, 2]);
    }

    #[test]
    fn a_gap_names_the_first_uncovered_element() {
        assert_eq!(plan_unit(&[0..3, 5..8], 0..8), Err(3));
        assert_eq!(plan_unit(&[], 2..4), Err(2));
    }

    #[test]
    fn error_messages_survive_packing() {
        for msg in ["", "x", "exactly8", "a longer message: rank1.safetensors"] {
            let words = pack_bytes(msg.as_bytes(), msg.len());
            assert_eq!(words.len(), msg.len().div_ceil(8));
            assert_eq!(unpack_bytes(&words, msg.len()), msg.as_bytes());
        }
    }
}
