//! The Hugging Face Hub against a local test Hub (tests/py/hub_server.py on 127.0.0.1): the
//! server validated by the real Python client, ftscript's pushes (LFS, multipart, model card,
//! retries, no partial commits, --allow-push), downloads into the cache Python shares, offline
//! use, and the token never leaking into output or files. In Xet mode the test Hub stores large
//! files in xet-core's `local_cas_server` (installed by scripts/setup.sh into `.tools/bin`),
//! which both ftscript (through hf-hub) and Python (through hf_xet) upload to and download from.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const TOKEN: &str = "hf_TestSecretToken0123456789abcdef";

/// The test Hub (and in Xet mode its CAS server), killed on drop.
struct Hub {
    child: Child,
    cas: Option<Child>,
    url: String,
    root: PathBuf,
}

/// xet-core's `local_cas_server`: `$LOCAL_CAS_SERVER`, or where scripts/setup.sh installs it.
fn local_cas_server() -> PathBuf {
    let path = std::env::var_os("LOCAL_CAS_SERVER").map(PathBuf::from).unwrap_or_else(|| root().join(".tools/bin/local_cas_server"));
    assert!(
        path.is_file(),
        "{} is missing: the Xet test needs xet-core's local_cas_server (scripts/setup.sh installs it; or set LOCAL_CAS_SERVER)",
        path.display()
    );
    path
}

impl Hub {
    fn start(root: &Path, multipart_threshold: u64, chunk_size: u64) -> Hub {
        Hub::spawn(root, &["--multipart-threshold", &multipart_threshold.to_string(), "--chunk-size", &chunk_size.to_string()], None)
    }

    /// The test Hub in Xet mode: large files go to a local_cas_server started here.
    fn start_xet(root: &Path) -> Hub {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cas = Command::new(local_cas_server())
            .arg("--data-directory")
            .arg(root.join("cas"))
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start local_cas_server");
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = cas.try_wait() {
                panic!("local_cas_server exited: {status}");
            }
            assert!(t0.elapsed().as_secs() < 30, "local_cas_server did not start listening on port {port}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Hub::spawn(root, &["--xet-cas", &format!("http://127.0.0.1:{port}")], Some(cas))
    }

    fn spawn(root: &Path, args: &[&str], cas: Option<Child>) -> Hub {
        let mut child = Command::new(python())
            .arg(common::root().join("tests/py/hub_server.py"))
            .arg(root)
            .args(["--token", TOKEN])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the test hub");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("hub_server did not start: {line}")).to_string();
        Hub { child, cas, url, root: root.to_path_buf() }
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.root.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn commits(&self, repo: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == "commit" && e["repo"] == repo).collect()
    }

    fn fail_next(&self, route: &str, status: u16, count: u32) {
        let out = Command::new(python())
            .args(["-c", &format!(
                "import urllib.request,json;urllib.request.urlopen(urllib.request.Request('{}/_test/fail',data=json.dumps({{'route':'{route}','status':{status},'count':{count}}}).encode(),method='POST'))",
                self.url
            )])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.cas.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Environment of a Hub client: the test Hub, the token, a private HF_HOME.
fn hub_env(cmd: &mut Command, hub: &str, home: &Path, token: bool) {
    cmd.env("HF_ENDPOINT", hub)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("FTSCRIPT_HUB_BACKOFF_MS", "50")
        .env("FTSCRIPT_LOG", "info");
    if token {
        cmd.env("HF_TOKEN", TOKEN);
    } else {
        cmd.env_remove("HF_TOKEN");
    }
}

/// Runs tests/py/hub_client.py (Git LFS only: HF_HUB_DISABLE_XET); panics on failure.
fn client(args: &[&str], hub: &str, home: &Path, offline: bool) -> Output {
    run_client(args, hub, home, offline, false)
}

/// tests/py/hub_client.py with Xet transfers on (hf_xet); panics on failure.
fn client_xet(args: &[&str], hub: &str, home: &Path) -> Output {
    run_client(args, hub, home, false, true)
}

fn run_client(args: &[&str], hub: &str, home: &Path, offline: bool, xet: bool) -> Output {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/py/hub_client.py")).args(args);
    hub_env(&mut cmd, hub, home, true);
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    if xet {
        cmd.env_remove("HF_HUB_DISABLE_XET");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "hub_client {args:?} failed:\n{}", text(&out));
    out
}

fn ft(args: &[&str], cwd: &Path, hub: &str, home: &Path, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftscript"));
    cmd.args(args).current_dir(cwd);
    hub_env(&mut cmd, hub, home, true);
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().unwrap()
}

fn sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(data))
}

/// {relative path: sha256} of every file under `dir`.
fn digests(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, sha256(&std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn downloaded(json_path: &Path) -> (PathBuf, BTreeMap<String, String>) {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    let files = v["files"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    (PathBuf::from(v["snapshot"].as_str().unwrap()), files)
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// No file under `dirs` and no output contains the token.
fn assert_token_absent(outputs: &[&Output], dirs: &[&Path]) {
    for o in outputs {
        assert!(!text(o).contains(TOKEN), "the token appears in the output:\n{}", text(o));
    }
    let needle = TOKEN.as_bytes();
    for d in dirs {
        let mut stack = vec![d.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    let data = std::fs::read(&p).unwrap();
                    assert!(!data.windows(needle.len()).any(|w| w == needle), "the token is written in {}", p.display());
                }
            }
        }
    }
}

#[test]
fn python_client_round_trips_files_through_the_test_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("server"), 5_000_000, 4_000_000);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("config.json"), "{\"model_type\": \"llama\"}\n").unwrap();
    std::fs::write(src.join("sub/notes.txt"), "hello hub\n").unwrap();
    std::fs::write(src.join("small.safetensors"), noise(300_000, 1)).unwrap();
    std::fs::write(src.join("big.bin"), noise(12_000_000, 2)).unwrap();
    client(&["upload", "org/roundtrip", src.to_str().unwrap()], &hub.url, &tmp.path().join("home_up"), false);

    let events = hub.events();
    let uploads: Vec<&Value> = events.iter().filter(|e| e["event"] == "lfs_upload").collect();
    let big_sha = sha256(&std::fs::read(src.join("big.bin")).unwrap());
    assert!(uploads.iter().any(|e| e["oid"] == big_sha.as_str() && e["transfer"] == "multipart" && e["parts"] == 3), "{events:?}");
    assert!(uploads.iter().any(|e| e["transfer"] == "basic" && e["size"] == 300_000), "{events:?}");
    let commit = &hub.commits("org/roundtrip")[0];
    let via = |p: &str| commit["files"].as_array().unwrap().iter().find(|f| f["path"] == p).unwrap()["via"].clone();
    assert_eq!(via("big.bin"), "lfs");
    assert_eq!(via("small.safetensors"), "lfs");
    assert_eq!(via("config.json"), "inline");
    assert!(events.iter().all(|e| e["event"] != "token_leak"), "the client sent its token to a storage URL");

    let out = tmp.path().join("down.json");
    client(&["download", "org/roundtrip", out.to_str().unwrap()], &hub.url, &tmp.path().join("home_down"), false);
    let (snapshot, files) = downloaded(&out);
    assert_eq!(files, digests(&src));
    assert!(snapshot.starts_with(tmp.path().join("home_down/hub/models--org--roundtrip/snapshots")), "{}", snapshot.display());
}

/// An adapter folder as save_adapter writes it, with a 30 MB weight file, inside a run directory.
fn adapter_folder(run: &Path) -> PathBuf {
    let dir = run.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"base_model_name_or_path": "org/tiny", "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), noise(30_000_000, 3)).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}\n").unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 10, \"loss\": 1.5}\n{\"step\": 20, \"loss\": 0.75, \"eval_loss\": 0.8125}\n").unwrap();
    dir
}

#[test]
fn ftscript_pushes_an_adapter_through_lfs_and_python_downloads_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hub = Hub::start(&t.join("server"), 20_000_000, 8_000_000);
    let home = t.join("home");
    let adapter = adapter_folder(&t.join("run"));

    let push = ft(&["push", adapter.to_str().unwrap(), "org/adapter", "-m", "first adapter"], t, &hub.url, &home, false);
    assert!(push.status.success(), "{}", text(&push));
    let url = String::from_utf8_lossy(&push.stdout).trim().to_string();
    assert!(url.starts_with(&format!("{}/org/adapter/commit/", hub.url)), "{url}");

    // server side: the weights arrived through LFS multipart, nothing large was inlined
    let weights_sha = sha256(&std::fs::read(adapter.join("adapter_model.safetensors")).unwrap());
    let events = hub.events();
    assert!(
        events.iter().any(|e| e["event"] == "lfs_upload" && e["oid"] == weights_sha.as_str() && e["transfer"] == "multipart" && e["parts"] == 4),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["event"] != "token_leak"), "ftscript sent its token to a storage URL");
    let commits = hub.commits("org/adapter");
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0]["message"], "first adapter");
    for f in commits[0]["files"].as_array().unwrap() {
        let expect = if f["path"] == "adapter_model.safetensors" { "lfs" } else { "inline" };
        assert_eq!(f["via"], expect, "{f}");
    }

    // Python gets the same bytes, plus the model card
    let out = t.join("down.json");
    client(&["download", "org/adapter", out.to_str().unwrap()], &hub.url, &t.join("home_py"), false);
    let (snapshot, mut files) = downloaded(&out);
    let card = std::fs::read_to_string(snapshot.join("README.md")).unwrap();
    files.remove("README.md");
    assert_eq!(files, digests(&adapter));
    assert!(card.starts_with("---\n"), "{card}");
    for want in ["base_model: \"org/tiny\"", "library_name: peft", "- ftscript", "| r | 16 |", "| lora_alpha | 32 |", "| eval_loss | 0.8125 |", "| loss | 0.75 |"] {
        assert!(card.contains(want), "model card lacks {want}:\n{card}");
    }

    // a recipe may push only with --allow-push
    let recipe = t.join("push.rhai");
    std::fs::write(
        &recipe,
        format!("let url = hub_push(\"{}\", \"org/adapter\", #{{ commit_message: \"from a recipe\", create_pr: true }});\nprint(`url=${{url}}`);\n", adapter.display()),
    )
    .unwrap();
    let denied = ft(&["run", recipe.to_str().unwrap()], t, &hub.url, &home, false);
    let dt = text(&denied);
    assert!(!denied.status.success() && dt.contains("--allow-push") && dt.contains("ftscript run --allow-push"), "{dt}");
    assert!(dt.contains("push.rhai:1:"), "the error names the recipe line: {dt}");
    assert_eq!(hub.commits("org/adapter").len(), 1, "a refused push must not commit");
    let allowed = ft(&["run", "--allow-push", recipe.to_str().unwrap()], t, &hub.url, &home, false);
    let at = text(&allowed);
    assert!(allowed.status.success(), "{at}");
    assert!(at.contains(&format!("url={}/org/adapter/discussions/1", hub.url)), "{at}");
    let commits = hub.commits("org/adapter");
    assert_eq!(commits.len(), 2);
    assert_eq!(commits[1]["create_pr"], true);
    // the weights were already on the Hub: not uploaded a second time
    assert_eq!(hub.events().iter().filter(|e| e["event"] == "lfs_upload" && e["oid"] == weights_sha.as_str()).count(), 1);

    // without a token: a clear error, no commit
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftscript"));
    cmd.args(["push", adapter.to_str().unwrap(), "org/other"]).current_dir(t);
    hub_env(&mut cmd, &hub.url, &home, false);
    let no_token = cmd.output().unwrap();
    assert!(!no_token.status.success() && text(&no_token).contains("HF_TOKEN"), "{}", text(&no_token));
    assert!(hub.commits("org/other").is_empty());
    // the token file ($HF_HOME/token, as `hf auth login` writes it) works instead of HF_TOKEN
    let login = tempfile::tempdir().unwrap();
    std::fs::write(login.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftscript"));
    cmd.args(["push", adapter.to_str().unwrap(), "org/other"]).current_dir(t);
    hub_env(&mut cmd, &hub.url, login.path(), false);
    let from_file = cmd.output().unwrap();
    assert!(from_file.status.success(), "{}", text(&from_file));
    assert_eq!(hub.commits("org/other").len(), 1);

    // the shipped recipe, to the end: push, then download it back through the cache
    let script = root().join("scripts/push_adapter.rhai");
    let sets = [format!("adapter_dir={:?}", adapter.display().to_string()), "repo_id=\"org/from-recipe\"".into(), "download_check=true".into()];
    let mut args = vec!["run", "--allow-push", "--allow-net", script.to_str().unwrap()];
    for kv in &sets {
        args.extend(["--set", kv.as_str()]);
    }
    let shipped = ft(&args, t, &hub.url, &home, false);
    let st = text(&shipped);
    assert!(shipped.status.success() && st.contains("pushed: ") && st.contains("main is at "), "{st}");
    assert_eq!(hub.commits("org/from-recipe").len(), 1);

    assert_token_absent(&[&push, &denied, &allowed, &no_token, &from_file, &shipped], &[t]);
}

#[test]
fn pushes_retry_transient_errors_and_never_leave_a_partial_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hub = Hub::start(&t.join("server"), 20_000_000, 8_000_000);
    let home = t.join("home");
    let dir = t.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"]}\n").unwrap();
    std::fs::write(dir.join("model.safetensors"), noise(1_000_000, 4)).unwrap();
    std::fs::write(dir.join("README.md"), "---\nlicense: mit\n---\n# mine\n").unwrap();

    // two 503s on the batch and a 429 on the commit: retried with backoff, one commit
    hub.fail_next("batch", 503, 2);
    hub.fail_next("commit", 429, 1);
    let ok = ft(&["push", dir.to_str().unwrap(), "org/retry"], t, &hub.url, &home, false);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("HTTP 503, retrying"), "{}", text(&ok));
    let commits = hub.commits("org/retry");
    assert_eq!(commits.len(), 1);
    let paths: Vec<&str> = commits[0]["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["README.md", "config.json", "model.safetensors"], "the folder's own README.md is kept");

    // an upload that keeps failing: the push fails before any commit
    std::fs::write(dir.join("model.safetensors"), noise(1_000_000, 5)).unwrap();
    hub.fail_next("upload", 500, 100);
    let failed = ft(&["push", dir.to_str().unwrap(), "org/retry"], t, &hub.url, &home, false);
    assert!(!failed.status.success(), "{}", text(&failed));
    assert!(text(&failed).contains("model.safetensors"), "{}", text(&failed));
    assert_eq!(hub.commits("org/retry").len(), 1, "a failed push must leave no commit");
    assert_token_absent(&[&ok, &failed], &[t]);
}

#[test]
fn python_uploads_ftscript_downloads_and_the_cache_is_shared_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = tiny_llama(t);
    let mut hub = Hub::start(&t.join("server"), 20_000_000, 8_000_000);
    client(&["upload", "org/tiny", model.to_str().unwrap()], &hub.url, &t.join("home_up"), false);

    // ftscript downloads into an empty cache: load_model by Hub id, hub_download
    let home = t.join("home_ft");
    let recipe = t.join("load.rhai");
    std::fs::write(
        &recipe,
        "let m = load_model(\"org/tiny\", #{ revision: \"main\" });\nprint(`loss=${m.loss(\"The quick brown fox\")}`);\nprint(`dir=${hub_download(\"org/tiny\")}`);\nm.add_lora(#{ r: 4 });\nm.save_adapter(\"adapter_out\");\n",
    )
    .unwrap();
    let online = ft(&["run", "--allow-net", recipe.to_str().unwrap()], t, &hub.url, &home, false);
    let ot = text(&online);
    assert!(online.status.success(), "{ot}");
    let dir = ot.lines().find_map(|l| l.split("dir=").nth(1)).unwrap().trim().to_string();
    let snap = PathBuf::from(&dir);
    assert!(snap.starts_with(home.join("hub/models--org--tiny/snapshots")), "{dir}");
    assert!(std::fs::symlink_metadata(snap.join("config.json")).unwrap().file_type().is_symlink());
    let commit = std::fs::read_to_string(home.join("hub/models--org--tiny/refs/main")).unwrap();
    assert_eq!(snap.file_name().unwrap().to_str().unwrap(), commit.trim());
    assert_eq!(digests(&snap), digests(&model));
    // an adapter trained on a Hub model names the Hub id as its base, as peft does
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(t.join("adapter_out/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "org/tiny");

    // a half-downloaded blob (an interrupted download's `.incomplete`, here with wrong bytes) is
    // fetched again in full (hf-hub starts over rather than resuming) and replaces it
    let weights_sha = sha256(&std::fs::read(model.join("model.safetensors")).unwrap());
    let blob = home.join("hub/models--org--tiny/blobs").join(&weights_sha);
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let incomplete = home.join(format!("hub/models--org--tiny/blobs/{weights_sha}.incomplete"));
    std::fs::write(&incomplete, vec![0xAB; bytes.len() / 2]).unwrap();
    let resumed = ft(&["download", "org/tiny"], t, &hub.url, &home, false);
    assert!(resumed.status.success() && text(&resumed).contains("downloaded model.safetensors"), "{}", text(&resumed));
    assert_eq!(std::fs::read(&blob).unwrap(), bytes);
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), bytes);
    assert!(!incomplete.exists(), "the partial blob was left behind");

    // Python reads ftscript's cache offline
    let out = t.join("offline.json");
    client(&["download", "org/tiny", out.to_str().unwrap()], &hub.url, &home, true);
    let (psnap, files) = downloaded(&out);
    assert_eq!(psnap, snap);
    assert_eq!(files, digests(&model));
    let loaded = client(&["load", "org/tiny"], &hub.url, &home, true);
    assert!(text(&loaded).contains("loaded LlamaForCausalLM"), "{}", text(&loaded));

    // and ftscript reads Python's cache
    let py_home = t.join("home_py");
    client(&["download", "org/tiny", t.join("py.json").to_str().unwrap()], &hub.url, &py_home, false);

    // offline, nothing touches the network: the server is gone and both caches still serve
    let _ = hub.child.kill();
    let _ = hub.child.wait();
    let off = ft(&["run", recipe.to_str().unwrap()], t, &hub.url, &py_home, true);
    assert!(off.status.success(), "{}", text(&off));
    let loss = |o: &Output| text(o).lines().find_map(|l| l.split("loss=").nth(1).map(|s| s.trim().to_string())).unwrap();
    assert_eq!(loss(&off), loss(&online));
    let missing = t.join("missing.rhai");
    std::fs::write(&missing, "let m = load_model(\"org/absent\");\n").unwrap();
    let miss = ft(&["run", missing.to_str().unwrap()], t, &hub.url, &py_home, true);
    let mt = text(&miss);
    assert!(!miss.status.success() && mt.contains("org/absent") && mt.contains("HF_HUB_OFFLINE"), "{mt}");
    assert_token_absent(&[&online, &resumed, &off, &miss, &loaded], &[t]);
}

/// The gallery's release pipeline to the end: `scripts/multi_stage.rhai` trains the tiny model,
/// scores it, merges it and, above its threshold, publishes the merged model to the test Hub
/// (Python downloads the bytes it wrote); below the threshold it publishes nothing.
#[test]
fn the_multi_stage_recipe_releases_to_the_hub_only_above_its_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hub = Hub::start(&t.join("server"), 20_000_000, 8_000_000);
    let home = t.join("home");
    let model = tiny_chat_model(t);
    let lines: Vec<String> = (0..12).map(|i| serde_json::json!({"instruction": "As JSON.", "input": format!("age: {i}"), "output": format!("{{\"age\": {i}}}")}).to_string()).collect();
    std::fs::write(t.join("kv.jsonl"), lines.join("\n")).unwrap();
    let script = common::root().join("scripts/multi_stage.rhai");
    let release = |threshold: &str, out: &str| {
        let sets = [
            format!("model_dir={:?}", model.display().to_string()),
            "data_file=\"kv.jsonl\"".into(),
            format!("output_dir={out:?}"),
            "n_eval=2".into(),
            "max_steps=2".into(),
            format!("threshold={threshold}"),
            "require_improvement=false".into(),
            "repo_id=\"org/released\"".into(),
        ];
        let mut args = vec!["run", "--allow-push", script.to_str().unwrap()];
        for kv in &sets {
            args.extend(["--set", kv.as_str()]);
        }
        ft(&args, t, &hub.url, &home, false)
    };
    let above = release("0.0", "runs/a");
    let at = text(&above);
    assert!(above.status.success() && at.contains("released: "), "{at}");
    let commits = hub.commits("org/released");
    assert_eq!(commits.len(), 1);
    let out = t.join("down.json");
    client(&["download", "org/released", out.to_str().unwrap()], &hub.url, &t.join("home_py"), false);
    let (_, mut files) = downloaded(&out);
    files.remove("README.md");
    assert_eq!(files, digests(&t.join("runs/a/merged")));
    let below = release("2.0", "runs/b");
    let bt = text(&below);
    assert!(below.status.success() && bt.contains("not released") && !t.join("runs/b/merged").exists(), "{bt}");
    assert_eq!(hub.commits("org/released").len(), 1, "a run below the threshold must not publish");
}

/// The test Hub in Xet mode (its LFS batch answers `transfer: "xet"`, its tokens point at a
/// local_cas_server): ftscript's push goes through hf-hub to the CAS, never through the LFS
/// upload routes, and Python (hf_xet) downloads the same bytes; a file Python uploaded through
/// Xet downloads byte-identically into ftscript's cache, fetched from the CAS, and Python then
/// reads that cache offline.
#[test]
fn with_xet_ftscript_pushes_through_the_cas_and_downloads_what_python_stored_there() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hub = Hub::start_xet(&t.join("server"));
    let home = t.join("home");
    let adapter = adapter_folder(&t.join("run"));

    let push = ft(&["push", adapter.to_str().unwrap(), "org/xet-adapter", "-m", "through xet"], t, &hub.url, &home, false);
    let pt = text(&push);
    assert!(push.status.success(), "{pt}");
    let url = String::from_utf8_lossy(&push.stdout).trim().to_string();
    assert!(url.starts_with(&format!("{}/org/xet-adapter/commit/", hub.url)), "{url}");
    assert!(pt.contains("through Xet"), "{pt}");
    let events = hub.events();
    let weights_sha = sha256(&std::fs::read(adapter.join("adapter_model.safetensors")).unwrap());
    assert!(events.iter().all(|e| e["event"] != "lfs_upload"), "the LFS upload routes were used: {events:?}");
    assert!(events.iter().any(|e| e["event"] == "lfs_batch" && e["transfer"] == "xet" && e["repo"] == "org/xet-adapter"), "{events:?}");
    assert!(events.iter().any(|e| e["event"] == "xet_token" && e["kind"] == "write" && e["repo"] == "org/xet-adapter"), "{events:?}");
    assert!(events.iter().all(|e| e["event"] != "token_leak"));
    let commits = hub.commits("org/xet-adapter");
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0]["message"], "through xet");
    for f in commits[0]["files"].as_array().unwrap() {
        // "xet": the Hub found these bytes (sha256 and size) in the CAS, not in its LFS store
        let expect = if f["path"] == "adapter_model.safetensors" { "xet" } else { "inline" };
        assert_eq!(f["via"], expect, "{f}");
        if f["via"] == "xet" {
            assert_eq!(f["sha256"], weights_sha.as_str());
        }
    }
    assert!(!hub.root.join("objects").join(&weights_sha).exists(), "the weights reached the LFS store");

    // Python, with hf_xet, downloads byte-identical files from the CAS
    let out = t.join("down.json");
    client_xet(&["download", "org/xet-adapter", out.to_str().unwrap()], &hub.url, &t.join("home_py"));
    let (_, mut files) = downloaded(&out);
    assert!(files.remove("README.md").is_some());
    assert_eq!(files, digests(&adapter));
    let plain = |repo: &str| hub.events().into_iter().filter(|e| e["event"] == "xet_file_plain_get" && e["repo"] == repo).count();
    assert_eq!(plain("org/xet-adapter"), 0, "Python fetched the Xet file from the Hub, not the CAS");

    // Python uploads through Xet; ftscript downloads it into its cache, from the CAS
    let src = t.join("py_model");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("config.json"), "{\"model_type\": \"llama\"}\n").unwrap();
    std::fs::write(src.join("model.safetensors"), noise(6_000_000, 7)).unwrap();
    client_xet(&["upload", "org/xet-py", src.to_str().unwrap()], &hub.url, &t.join("home_up"));
    let py_commit = &hub.commits("org/xet-py")[0];
    let via = |p: &str| py_commit["files"].as_array().unwrap().iter().find(|f| f["path"] == p).unwrap()["via"].clone();
    assert_eq!(via("model.safetensors"), "xet", "{py_commit}");
    let down = ft(&["download", "org/xet-py"], t, &hub.url, &home, false);
    assert!(down.status.success(), "{}", text(&down));
    let snap = PathBuf::from(String::from_utf8_lossy(&down.stdout).trim());
    assert!(snap.starts_with(home.join("hub/models--org--xet-py/snapshots")), "{}", snap.display());
    assert_eq!(digests(&snap), digests(&src));
    assert_eq!(plain("org/xet-py"), 0, "ftscript fetched the Xet file from the Hub, not the CAS");
    let weights = sha256(&std::fs::read(src.join("model.safetensors")).unwrap());
    assert!(home.join("hub/models--org--xet-py/blobs").join(&weights).is_file(), "the blob is not named by its sha256");

    // Python reads ftscript's cache offline
    let off = t.join("offline.json");
    client(&["download", "org/xet-py", off.to_str().unwrap()], &hub.url, &home, true);
    let (psnap, pfiles) = downloaded(&off);
    assert_eq!(psnap, snap);
    assert_eq!(pfiles, digests(&src));

    // hf-hub's errors, as ftscript says them: a missing repo or revision is named
    let absent = ft(&["download", "org/absent"], t, &hub.url, &home, false);
    let at = text(&absent);
    assert!(!absent.status.success() && at.contains("`org/absent` was not found") && at.contains("HF_TOKEN"), "{at}");
    let no_rev = ft(&["download", "org/xet-py", "--revision", "nope"], t, &hub.url, &home, false);
    let nt = text(&no_rev);
    assert!(!no_rev.status.success() && nt.contains("revision nope of `org/xet-py` was not found"), "{nt}");
    assert_token_absent(&[&push, &down, &absent, &no_rev], &[t]);
}
