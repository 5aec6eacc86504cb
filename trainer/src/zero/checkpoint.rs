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
//! Every rank writes into `root/.tmp-step-00000042/` and fsyncs; after a barrier rank 0
//! writes the manifest and renames the directory into place (atomic on POSIX), then
//! removes all but the newest `keep_last` step directories. Loading re-assembles each
//! unit's flat buffers from whatever ranges the saving ranks owned, so a checkpoint
//! written at one world size or stage loads at any other.
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::engine::{EngineError, Result, ZeroEngine};

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

/// The newest complete checkpoint under `root` (one with a manifest), if any.
pub fn latest_checkpoint(root: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join("manifest.json").exists()
        })
        .collect();
    steps.sort();
    steps.pop()
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
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        self.comm.barrier()?;

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
        Tensor::write_safetensors(&tensors, &file)?;
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
        let meta_path = tmp.join(format!("rank{rank}.json"));
        write_synced(
            &meta_path,
            serde_json::to_string_pretty(&meta)
                .expect("serialisable")
                .as_bytes(),
        )?;

        if let Some(src) = hf_export {
            let weights = self.full_weights()?;
            if rank == 0 {
                let hf = tmp.join("hf");
                model::save_pretrained(
                    &hf,
                    &self.cfg,
                    &weights,
                    self.cfg.dtype,
                    model::checkpoint::DEFAULT_MAX_SHARD_BYTES,
                )?;
                model::checkpoint::copy_auxiliary_files(src, &hf)?;
            }
        }
        self.comm.barrier()?;

        if rank == 0 {
            let mut names = vec![];
            list_files(&tmp, "", &mut names)?;
            let mut files = std::collections::BTreeMap::new();
            for n in names {
                files.insert(n.clone(), sha256_file(&tmp.join(&n))?);
            }
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                step: self.step,
                world_size: self.world_size(),
                stage: self.zero.stage.number(),
                files,
            };
            let mpath = tmp.join("manifest.json");
            write_synced(
                &mpath,
                serde_json::to_string_pretty(&manifest)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
            let _ = std::fs::remove_dir_all(&dst);
            std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
            fsync_file(root)?;
            prune(root, keep_last)?;
        }
        self.comm.barrier()?;
        Ok(dst)
    }

    /// Restores master weights, Adam moments and the step from `dir` (collective),
    /// re-sharding when the checkpoint was written at another world size or stage.
    /// Returns the trainer state saved with it.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<Value> {
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
        for (name, want) in &manifest.files {
            let got = sha256_file(&dir.join(name))?;
            if &got != want {
                return Err(err(
                    &dir.join(name),
                    "checksum does not match manifest.json (corrupted or partial)",
                ));
            }
        }
        let mut metas = vec![];
        let mut files = vec![];
        for r in 0..manifest.world_size {
            let p = dir.join(format!("rank{r}.json"));
            let meta: RankMeta =
                serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| io(&p, e))?)
                    .map_err(|e| err(&p, e.to_string()))?;
            let st = dir.join(format!("rank{r}.safetensors"));
            let tensors: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(&st)?.into_iter().collect();
            metas.push(meta);
            files.push(tensors);
        }
        for u in 0..self.units.len() {
            let unit = self.units[u].unit.clone();
            let mut parts: Vec<(usize, usize, usize)> = vec![]; // (start, end, rank)
            for (r, m) in metas.iter().enumerate() {
                let (_, s, e) = m
                    .ranges
                    .iter()
                    .find(|(n, _, _)| n == &unit.name)
                    .ok_or_else(|| {
                        err(dir, format!("rank {r} has no shard of unit {}", unit.name))
                    })?;
                parts.push((*s, *e, r));
            }
            parts.sort();
            // Cover 0..len with consecutive ranges (stage-0 checkpoints repeat the whole
            // unit on every rank: take the first).
            let mut pieces: [Vec<Tensor>; 3] = [vec![], vec![], vec![]];
            let mut at = 0usize;
            for (s, e, r) in parts {
                if s != at || e <= s {
                    continue;
                }
                for (k, what) in ["master", "exp_avg", "exp_avg_sq"].iter().enumerate() {
                    let key = format!("{}.{what}", unit.name);
                    let t = files[r]
                        .get(&key)
                        .ok_or_else(|| err(dir, format!("rank {r} lacks {key}")))?;
                    if t.numel() != e - s {
                        return Err(err(
                            dir,
                            format!(
                                "rank {r}: {key} has {} elements, its range {}",
                                t.numel(),
                                e - s
                            ),
                        ));
                    }
                    pieces[k].push(t.shallow_clone());
                }
                at = e;
            }
            if at != unit.len {
                return Err(err(
                    dir,
                    format!(
                        "unit {} covers {at} of {} elements: was it saved for another model?",
                        unit.name, unit.len
                    ),
                ));
            }
            let st = &mut self.units[u];
            let (start, len) = (st.range.start as i64, st.range.len() as i64);
            let device = st.master.device();
            let take = |p: &[Tensor]| {
                Tensor::cat(p, 0)
                    .narrow(0, start, len)
                    .to_kind(Kind::Float)
                    .to_device(device)
            };
            st.master = take(&pieces[0]);
            st.exp_avg = take(&pieces[1]);
            st.exp_avg_sq = take(&pieces[2]);
            let _ = st.grad.zero_();
        }
        self.step = manifest.step;
        self.publish_params()?;
        Ok(metas.swap_remove(0).trainer_state)
    }
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
