//! Hugging Face Hub ids resolved in the local cache, offline.
//!
//! `Qwen/Qwen2.5-1.5B-Instruct` names the snapshot that `huggingface-cli download` (or
//! `hf download`) left in the cache:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
//!   models--Qwen--Qwen2.5-1.5B-Instruct/
//!     refs/main                 the commit hash of the branch
//!     snapshots/<hash>/         the files (links into blobs/)
//!   datasets--open-r1--OpenR1-Math-220k/ ...
//! ```
//!
//! A local directory is taken as it is, so every existing path keeps working. Nothing is
//! ever downloaded: a missing repository is a [`HubError::NotFound`] that names every
//! place looked at and the command that downloads it.
use std::path::{Path, PathBuf};

/// Which kind of repository an id names (they live apart in the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    fn word(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{kind} {id:?} is neither a local directory nor a Hugging Face Hub id (`org/name`)")]
    NotAnId { kind: &'static str, id: String },
    #[error(
        "{kind} {id:?} was not found: it is not a local directory, and the Hugging Face cache has \
         no snapshot of it at revision {revision:?} (looked at: {}). Nothing is downloaded here; \
         fetch it with `{command}`, with HF_HUB_CACHE or HF_HOME set as for this run",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        kind: &'static str,
        id: String,
        revision: String,
        looked: Vec<PathBuf>,
        command: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cache root and how to find repositories in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    pub root: PathBuf,
}

impl HubCache {
    /// The cache `huggingface_hub` uses under this process's environment.
    pub fn from_env() -> HubCache {
        HubCache::from_vars(|k| std::env::var_os(k).map(PathBuf::from))
    }

    /// [`HubCache::from_env`] with an explicit lookup (tests pass their own).
    pub fn from_vars(var: impl Fn(&str) -> Option<PathBuf>) -> HubCache {
        let nonempty = |k: &str| var(k).filter(|p| !p.as_os_str().is_empty());
        let root = nonempty("HF_HUB_CACHE")
            .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| nonempty("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| nonempty("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
            .or_else(|| nonempty("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        HubCache { root }
    }

    /// The repository folder of `id` (`models--org--name`), whether or not it exists.
    pub fn repo_dir(&self, kind: RepoType, id: &str) -> PathBuf {
        self.root.join(format!(
            "{}--{}",
            kind.folder_prefix(),
            id.replace('/', "--")
        ))
    }

    /// A local directory as it is, else the cached snapshot of Hub id `id` at `revision`
    /// (a branch or tag under `refs/`, or a commit hash under `snapshots/`; default
    /// `main`).
    pub fn resolve(
        &self,
        id_or_path: &str,
        kind: RepoType,
        revision: Option<&str>,
    ) -> Result<PathBuf, HubError> {
        let local = Path::new(id_or_path);
        if local.is_dir() {
            return Ok(local.to_path_buf());
        }
        if !is_repo_id(id_or_path) {
            return Err(HubError::NotAnId {
                kind: kind.word(),
                id: id_or_path.into(),
            });
        }
        let revision = revision.unwrap_or("main");
        let repo = self.repo_dir(kind, id_or_path);
        let reference = repo.join("refs").join(revision);
        let mut looked = vec![local.to_path_buf(), reference.clone()];
        if reference.is_file() {
            let hash = std::fs::read_to_string(&reference).map_err(|source| HubError::Io {
                path: reference.clone(),
                source,
            })?;
            let snapshot = repo.join("snapshots").join(hash.trim());
            if snapshot.is_dir() {
                return Ok(snapshot);
            }
            looked.push(snapshot);
        }
        let by_hash = repo.join("snapshots").join(revision);
        if by_hash.is_dir() {
            return Ok(by_hash);
        }
        looked.push(by_hash);
        let type_flag = match kind {
            RepoType::Model => "",
            RepoType::Dataset => " --repo-type dataset",
        };
        let rev_flag = if revision == "main" {
            String::new()
        } else {
            format!(" --revision {revision}")
        };
        Err(HubError::NotFound {
            kind: kind.word(),
            id: id_or_path.into(),
            revision: revision.into(),
            looked,
            command: format!("huggingface-cli download {id_or_path}{type_flag}{rev_flag}"),
        })
    }
}

/// `name` or `org/name` of Hub characters (letters, digits, `-`, `_`, `.`), as the Hub
/// allows; no path syntax (`..`, leading `/` or `.`).
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The model directory of `id_or_path` in the environment's cache; see [`HubCache::resolve`].
pub fn resolve_model(id_or_path: &Path, revision: Option<&str>) -> Result<PathBuf, HubError> {
    HubCache::from_env().resolve(&id_or_path.to_string_lossy(), RepoType::Model, revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(cache: &Path, kind: RepoType, id: &str, hash: &str, branch: &str) -> PathBuf {
        let c = HubCache { root: cache.into() };
        let repo = c.repo_dir(kind, id);
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(branch), format!("{hash}\n")).unwrap();
        snap
    }

    #[test]
    fn cache_root_follows_huggingface_hub() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| PathBuf::from(v))
            }
        };
        let c = HubCache::from_vars(vars(&[
            ("HF_HUB_CACHE", "/a"),
            ("HF_HOME", "/b"),
            ("HOME", "/h"),
        ]));
        assert_eq!(c.root, PathBuf::from("/a"));
        let c = HubCache::from_vars(vars(&[("HF_HOME", "/b"), ("HOME", "/h")]));
        assert_eq!(c.root, PathBuf::from("/b/hub"));
        let c = HubCache::from_vars(vars(&[("HOME", "/h")]));
        assert_eq!(c.root, PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn ids_resolve_to_snapshots_and_misses_say_where_and_how() {
        let dir = tempfile_dir();
        let cache = HubCache {
            root: dir.join("hub"),
        };
        let snap = snapshot(
            &cache.root,
            RepoType::Model,
            "Qwen/Qwen3-0.6B",
            "abc123",
            "main",
        );
        assert_eq!(
            cache
                .resolve("Qwen/Qwen3-0.6B", RepoType::Model, None)
                .unwrap(),
            snap
        );
        // A commit hash names the snapshot directly.
        assert_eq!(
            cache
                .resolve("Qwen/Qwen3-0.6B", RepoType::Model, Some("abc123"))
                .unwrap(),
            snap
        );
        // Models and datasets live apart.
        let err = cache
            .resolve("Qwen/Qwen3-0.6B", RepoType::Dataset, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("datasets--Qwen--Qwen3-0.6B"), "{err}");
        assert!(
            err.contains("huggingface-cli download Qwen/Qwen3-0.6B --repo-type dataset"),
            "{err}"
        );
        let err = cache
            .resolve("Qwen/Qwen3-0.6B", RepoType::Model, Some("v2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refs/v2") && err.contains("--revision v2"),
            "{err}"
        );
        // A local directory wins, and path syntax is never taken for an id.
        let local = dir.join("local-model");
        std::fs::create_dir_all(&local).unwrap();
        assert_eq!(
            cache
                .resolve(local.to_str().unwrap(), RepoType::Model, None)
                .unwrap(),
            local
        );
        let err = cache.resolve("../x/y", RepoType::Model, None).unwrap_err();
        assert!(matches!(err, HubError::NotAnId { .. }), "{err}");
        assert!(
            !is_repo_id("a/b/c") && is_repo_id("gpt2") && is_repo_id("open-r1/OpenR1-Math-220k")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "model-hub-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
