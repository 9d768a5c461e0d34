//! Where checkpoints come from: a local directory or a Hugging Face hub id.
//!
//! Hub files live in the standard HF cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`),
//! shared with Python tools. Files already in the cache are used without touching the network;
//! `HF_HUB_OFFLINE=1` forbids the network entirely. `HF_TOKEN` (or the cache's `token` file) is
//! sent for gated/private repos and never printed.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};

/// Checks that `id` is a plausible hub repo id (`name` or `owner/name`), so that nothing a user
/// types can turn into a path outside the cache.
pub fn validate_repo_id(id: &str) -> Result<()> {
    let bad = |why: &str| Error::Hub(format!("\"{id}\" is not a valid hub repo id: {why}"));
    if id.is_empty() || id.len() > 96 {
        return Err(bad("empty or too long"));
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(bad("expected owner/name"));
    }
    for p in &parts {
        if p.is_empty() || *p == "." || *p == ".." || p.starts_with('.') || p.contains("..") {
            return Err(bad("empty, dot or '..' component"));
        }
        if !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
        }
    }
    Ok(())
}

fn validate_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 128
        && !rev
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Hub(format!("\"{rev}\" is not a valid revision")))
    }
}

pub fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

/// The HF token from `HF_TOKEN` or the cache's token file, if any. Never log it.
fn token(cache: &hf_hub::Cache) -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| cache.token())
        .map(|t| t.trim().to_string())
}

/// A repo on the hub at one revision, with lookups in the local cache.
pub struct HubRepo {
    id: String,
    kind: RepoType,
    revision: String,
    cache: hf_hub::Cache,
}

impl HubRepo {
    pub fn new(id: &str, kind: RepoType, revision: Option<&str>) -> Result<Self> {
        validate_repo_id(id)?;
        let revision = revision.unwrap_or("main");
        validate_revision(revision)?;
        Ok(Self {
            id: id.to_string(),
            kind,
            revision: revision.to_string(),
            cache: hf_hub::Cache::from_env(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.id.clone(), self.kind, self.revision.clone())
    }

    /// `snapshots/<commit>` of this revision in the cache, if the revision is known locally.
    pub fn cached_snapshot(&self) -> Option<PathBuf> {
        let root = self.cache.path().join(self.repo().folder_name());
        let commit =
            if self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit()) {
                self.revision.clone()
            } else {
                std::fs::read_to_string(root.join("refs").join(&self.revision))
                    .ok()?
                    .trim()
                    .to_string()
            };
        validate_revision(&commit).ok()?;
        let dir = root.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// A file of this revision from the cache, if present.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        let p = self.cached_snapshot()?.join(file);
        p.is_file().then_some(p)
    }

    fn api(&self) -> Result<hf_hub::api::sync::ApiRepo> {
        if offline() {
            return Err(Error::Hub(format!(
                "{}: not in the local HF cache and HF_HUB_OFFLINE is set",
                self.id
            )));
        }
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone());
        // A mirror or a private hub, as the Python tools take it.
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT")
            && !endpoint.trim().is_empty()
        {
            builder = builder.with_endpoint(endpoint.trim().trim_end_matches('/').to_string());
        }
        let api = builder
            .with_token(token(&self.cache))
            .with_progress(true)
            .build()
            .map_err(|e| Error::Hub(format!("cannot start the hub client: {e}")))?;
        Ok(api.repo(self.repo()))
    }

    /// Lists the files of this revision on the hub (needs the network).
    pub fn list_remote(&self) -> Result<Vec<String>> {
        let info = self
            .api()?
            .info()
            .map_err(|e| self.hub_error("listing files", e))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// A file from the cache, or downloaded into it with a progress bar.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        let api = self.api().map_err(|_| {
            Error::Hub(format!(
                "{}: {file} is not in the local HF cache ({}) and HF_HUB_OFFLINE is set",
                self.id,
                self.cache.path().display()
            ))
        })?;
        eprintln!(
            "downloading {}/{file} (revision {})",
            self.id, self.revision
        );
        api.download(file)
            .map_err(|e| self.hub_error(&format!("downloading {file}"), e))
    }

    fn hub_error(&self, what: &str, e: hf_hub::api::sync::ApiError) -> Error {
        if let Some(why) = unreachable(&e) {
            let fix = match self.kind {
                RepoType::Dataset => "pass --data FILE or DIR",
                _ => "pass --model DIR",
            };
            return Error::Hub(format!(
                "{} is not in the HF cache ({}) and the hub is unreachable ({why}): {fix}, or connect",
                self.id,
                self.cache.path().display()
            ));
        }
        // ureq's messages contain the URL but never the Authorization header.
        let msg = e.to_string();
        let hint = if msg.contains("401") || msg.contains("403") {
            " (gated or private repo? set HF_TOKEN)"
        } else if msg.contains("404") {
            " (no such repo, revision or file)"
        } else {
            ""
        };
        Error::Hub(format!(
            "{} @ {}: {what} failed: {msg}{hint}",
            self.id, self.revision
        ))
    }
}

/// Why the hub could not be reached at all (name lookup, connection, network I/O), as opposed
/// to an answer from it (401, 404, ...); None for the latter.
fn unreachable(e: &hf_hub::api::sync::ApiError) -> Option<&'static str> {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::TooManyRetries(inner) => unreachable(inner),
        ApiError::RequestError(inner) => match &**inner {
            ureq::Error::Transport(t) => Some(match t.kind() {
                ureq::ErrorKind::Dns => "the host name does not resolve",
                ureq::ErrorKind::ConnectionFailed => "the connection failed",
                ureq::ErrorKind::Io => "a network error",
                ureq::ErrorKind::ProxyConnect | ureq::ErrorKind::ProxyUnauthorized => {
                    "the proxy refused the connection"
                }
                _ => return None,
            }),
            ureq::Error::Status(..) => None,
        },
        _ => None,
    }
}

/// Files a model directory must or may hold.
const MODEL_REQUIRED: &[&str] = &["config.json"];
const MODEL_OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Resolves `--model`: an existing directory is used as is; otherwise the string must be a hub
/// id, whose config, tokenizer and safetensors weights are fetched (or found in the cache).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{spec}: --model must be a directory or a hub id, not a file"
        )));
    }
    let looks_local = spec.starts_with('.')
        || spec.starts_with('/')
        || spec.starts_with('~')
        || spec.contains('\\');
    if looks_local || validate_repo_id(spec).is_err() {
        return Err(Error::Invalid(format!(
            "{spec}: no such model directory (and not a valid hub id like microsoft/phi-2)"
        )));
    }
    let repo = HubRepo::new(spec, RepoType::Model, revision)?;
    if let Some(dir) = cached_model_complete(&repo) {
        return Ok(dir);
    }
    let remote = repo.list_remote()?;
    let has = |f: &str| remote.iter().any(|r| r == f);
    for f in MODEL_REQUIRED {
        if !has(f) {
            return Err(Error::Hub(format!("{spec}: the repo has no {f}")));
        }
        repo.get(f)?;
    }
    for f in MODEL_OPTIONAL.iter().filter(|f| has(f)) {
        repo.get(f)?;
    }
    let weights = if has(INDEX) {
        let index = repo.get(INDEX)?;
        for shard in crate::io::checkpoint::index_shards(&index)? {
            repo.get(&shard)?;
        }
        index
    } else if has(SINGLE) {
        repo.get(SINGLE)?
    } else if remote
        .iter()
        .any(|f| f.ends_with(".bin") || f.ends_with(".pt"))
    {
        return Err(Error::Hub(format!(
            "{spec}: the repo has only PyTorch pickle weights (*.bin); phitune loads safetensors only, \
             because unpickling can run arbitrary code. Convert them with transformers' \
             `save_pretrained(..., safe_serialization=True)` or pick a safetensors revision."
        )));
    } else {
        return Err(Error::Hub(format!(
            "{spec}: the repo has no model.safetensors or {INDEX}"
        )));
    };
    Ok(weights
        .parent()
        .expect("cache files live in a snapshot directory")
        .to_path_buf())
}

/// The cached snapshot directory if it already holds everything a model needs.
fn cached_model_complete(repo: &HubRepo) -> Option<PathBuf> {
    let dir = repo.cached_snapshot()?;
    if !MODEL_REQUIRED.iter().all(|f| dir.join(f).is_file()) {
        return None;
    }
    if dir.join(INDEX).is_file() {
        let shards = crate::io::checkpoint::index_shards(&dir.join(INDEX)).ok()?;
        shards.iter().all(|s| dir.join(s).is_file()).then_some(dir)
    } else {
        dir.join(SINGLE).is_file().then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in [
            "microsoft/phi-2",
            "gpt2",
            "Cynaptics/persona-chat",
            "a_b/c.d-1",
        ] {
            validate_repo_id(ok).unwrap();
        }
        for bad in [
            "",
            "../etc",
            "a/../b",
            "/abs/path",
            "a/b/c",
            "a b/c",
            "a/.hidden",
            "x/y\u{0}",
            "..",
            "a/b..c",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_revision("main").is_ok());
        assert!(validate_revision("refs/pr/1").is_ok());
        assert!(validate_revision("../../x").is_err());
    }
}
