//! `hub_push` and `hub_download`: the Hugging Face Hub from a recipe.
//!
//! Pushing publishes someone's work, so a recipe may only push when the person running it says
//! so: `ftscript run --allow-push RECIPE` (`ftscript push DIR REPO` is explicit already).

use crate::hub::{self, HubConfig, PushOptions};
use crate::script::options::{guard, parse};
use rhai::{Engine, EvalAltResult, FuncRegistration, Map};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};

type Res<T> = Result<T, Box<EvalAltResult>>;

static ALLOW_PUSH: AtomicBool = AtomicBool::new(false);

/// Lets recipes call `hub_push` (`ftscript run --allow-push`).
pub fn set_allow_push(allow: bool) {
    ALLOW_PUSH.store(allow, Ordering::SeqCst);
}

pub const PUSH_NOT_ALLOWED: &str = "pushing to the Hub from a recipe needs the permission of the person running it: \
     rerun with `ftscript run --allow-push RECIPE` (or push the folder yourself with `ftscript push DIR REPO`)";

/// Options of `hub_push(dir, repo_id, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushArgs {
    /// Create the repo private (default false; an existing repo keeps its visibility).
    pub private: Option<bool>,
    /// Branch to commit to (default `main`; created if missing).
    pub revision: Option<String>,
    pub commit_message: Option<String>,
    /// Open a pull request instead of committing to the branch.
    pub create_pr: Option<bool>,
    /// Hyper-parameters to list in the generated model card.
    pub hyperparameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Options of `hub_download(repo_id, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadArgs {
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
}

pub fn push(dir: &str, repo_id: &str, a: PushArgs) -> anyhow::Result<String> {
    let opts = PushOptions {
        private: a.private.unwrap_or(false),
        revision: a.revision,
        commit_message: a.commit_message,
        create_pr: a.create_pr.unwrap_or(false),
        hyperparameters: a.hyperparameters.map(|m| m.into_iter().collect()).unwrap_or_default(),
    };
    hub::push(&HubConfig::from_env(), &crate::api::read_path(dir)?, repo_id, &opts)
}

fn push_from_recipe(dir: &str, repo_id: &str, a: PushArgs) -> Res<String> {
    if !ALLOW_PUSH.load(Ordering::SeqCst) {
        return Err(format!("hub_push: {PUSH_NOT_ALLOWED}").into());
    }
    if !crate::dist::is_main_process() {
        // data-parallel run: rank 0 pushes, the others would only duplicate its commit
        tracing::debug!("hub_push: skipped on rank {}", crate::dist::rank());
        return Ok(String::new());
    }
    guard("hub_push", || push(dir, repo_id, a))
}

fn download(repo_id: &str, a: DownloadArgs) -> Res<String> {
    guard("hub_download", || {
        let dir = snapshot(repo_id, a.revision.as_deref(), hub::Filter::All)?;
        Ok(dir.display().to_string())
    })
}

/// `repo_id`'s snapshot directory for a recipe: downloaded into the cache, or, when the sandbox
/// keeps the recipe off the network, found there.
pub fn snapshot(repo_id: &str, revision: Option<&str>, filter: hub::Filter) -> anyhow::Result<std::path::PathBuf> {
    let cfg = HubConfig::from_env();
    if crate::script::sandbox::net_closed() && !cfg.offline {
        let revision = revision.unwrap_or("main");
        return hub::cached_snapshot(&cfg, repo_id, revision).ok_or_else(|| {
            anyhow::anyhow!("`{repo_id}` (revision {revision}) is not in the Hub cache {}, and downloading it needs the network: rerun with `--allow-net` to allow it", cfg.cache_dir.display())
        });
    }
    hub::snapshot_download(&cfg, repo_id, revision, filter)
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("hub_push")
        .with_comments(["/// Commits folder `dir` to the Hub repo `repo_id` (created if needed; weights through Xet or LFS, as the Hub offers; a model card unless there is a README.md); returns the commit URL. Needs `ftscript run --allow-push`."])
        .with_params_info(["dir: &str", "repo_id: &str", "String"])
        .register_into_engine(engine, |dir: &str, repo_id: &str| -> Res<String> { push_from_recipe(dir, repo_id, PushArgs::default()) });
    FuncRegistration::new("hub_push")
        .with_comments(["/// hub_push with #{private, revision, commit_message, create_pr, hyperparameters}."])
        .with_params_info(["dir: &str", "repo_id: &str", "options: Map", "String"])
        .register_into_engine(engine, |dir: &str, repo_id: &str, opts: Map| -> Res<String> {
            push_from_recipe(dir, repo_id, parse("hub_push", &opts)?)
        });
    FuncRegistration::new("hub_download")
        .with_comments(["/// Downloads Hub repo `repo_id` into the Hugging Face cache (shared with Python; offline with HF_HUB_OFFLINE=1); returns the snapshot directory."])
        .with_params_info(["repo_id: &str", "String"])
        .register_into_engine(engine, |repo_id: &str| -> Res<String> { download(repo_id, DownloadArgs::default()) });
    FuncRegistration::new("hub_download")
        .with_comments(["/// hub_download with #{revision}."])
        .with_params_info(["repo_id: &str", "options: Map", "String"])
        .register_into_engine(engine, |repo_id: &str, opts: Map| -> Res<String> { download(repo_id, parse("hub_download", &opts)?) });
}
