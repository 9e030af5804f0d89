//! The command line: check, api, --set, --version, and clear one-line errors (never a panic)
//! for bad models and bad recipes.

mod common;
use common::*;
use std::path::Path;

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Runs a recipe that must fail; returns the first line of its error output.
fn fails(dir: &Path, recipe: &str) -> String {
    let r = write(dir, "bad.rhai", recipe);
    let out = ftscript(&["run", &r], dir);
    let t = text(&out);
    assert!(!out.status.success(), "expected failure:\n{t}");
    assert!(!t.contains("panicked"), "panic instead of an error:\n{t}");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line in:\n{t}")).to_string()
}

#[test]
fn every_shipped_recipe_passes_check() {
    let scripts = root().join("scripts");
    let mut recipes: Vec<String> = std::fs::read_dir(&scripts)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|e| e == "rhai").unwrap_or(false))
        .map(|p| p.display().to_string())
        .collect();
    recipes.sort();
    assert!(!recipes.is_empty());
    let mut args = vec!["check"];
    args.extend(recipes.iter().map(|s| s.as_str()));
    let out = ftscript(&args, &root());
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn check_finds_unknown_option_keys_without_running() {
    let tmp = tempfile::tempdir().unwrap();
    let r = write(tmp.path(), "typo.rhai", "let m = load_model(\"nowhere\");\n\nm.add_lora(#{ rr: 8, alpha: 16 });\n");
    let out = ftscript(&["check", &r], tmp.path());
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("typo.rhai:3:") && t.contains("`rr`") && t.contains("`alpha`"), "{t}");
}

#[test]
fn api_lists_every_function_and_each_is_used_by_a_shipped_script() {
    let out = ftscript(&["api"], &root());
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let mut sources = String::new();
    for dir in ["scripts", "stdlib"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().map(|e| e == "rhai").unwrap_or(false) {
                sources.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    let mut unused = vec![];
    for line in listing.lines().filter(|l| !l.starts_with(' ')) {
        let name = line.split('(').next().unwrap();
        let used = if let Some(prop) = name.strip_prefix("get$") {
            sources.contains(&format!(".{prop}"))
        } else if name.starts_with("index$") || name == "to_string" || name == "to_debug" {
            true
        } else if !name.chars().next().unwrap().is_alphabetic() {
            true // operators
        } else if let Some((_, function)) = name.split_once("::") {
            // a native stdlib module's, called through the import's alias (`cb::early_stopping(`)
            sources.contains(&format!("::{function}("))
        } else {
            sources.contains(&format!("{name}("))
        };
        if !used {
            unused.push(name.to_string());
        }
    }
    for must in ["load_model", "add_lora", "train", "load_dataset", "generate", "save_adapter", "save_merged"] {
        assert!(listing.contains(&format!("{must}(")), "api does not list {must}:\n{listing}");
    }
    unused.sort();
    unused.dedup();
    assert!(unused.is_empty(), "functions no script under scripts/ uses: {unused:?}");
}

/// `ftscript api --definitions DIR`: Rhai's definition files for editors, one for the recipe
/// functions (every function `ftscript api` lists, documented, getters as `get` properties)
/// and one per stdlib module (every function, with its doc comment); no type left blank.
#[test]
fn definitions_cover_every_function_and_stdlib_module() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ftscript(&["api", "--definitions", tmp.path().to_str().unwrap()], &root());
    assert!(out.status.success(), "{}", text(&out));
    let defs = std::fs::read_to_string(tmp.path().join("__static__.d.rhai")).unwrap();
    assert!(defs.starts_with("module static;"), "{}", &defs[..100.min(defs.len())]);
    let listing = String::from_utf8_lossy(&ftscript(&["api"], &root()).stdout).to_string();
    for line in listing.lines().filter(|l| !l.starts_with(' ')) {
        let name = line.split('(').next().unwrap();
        if let Some((module, function)) = name.split_once("::") {
            let text = std::fs::read_to_string(tmp.path().join("ft").join(format!("{module}.d.rhai"))).unwrap();
            assert!(text.starts_with(&format!("module ft/{module};")) && text.contains(&format!("fn {function}(")), "ft/{module}: {function} missing:\n{text}");
            continue;
        }
        let written = match name.strip_prefix("get$") {
            Some(prop) => format!("fn get {prop}("),
            None if name.chars().next().unwrap().is_alphabetic() => format!("fn {name}("),
            None => format!("op {name}("),
        };
        assert!(defs.contains(&written), "{name} is missing from the definitions");
    }
    // each documented function keeps its doc comment right above it
    assert!(defs.contains("/// `model.config`: the model's config.json as a map.\nfn get config(model: Model) -> map;"), "{defs}");
    for (module, source) in [("lora", include_str!("../stdlib/lora.rhai")), ("templates", include_str!("../stdlib/templates.rhai"))] {
        let text = std::fs::read_to_string(tmp.path().join("ft").join(format!("{module}.d.rhai"))).unwrap();
        assert!(text.starts_with(&format!("module ft/{module};")), "{text}");
        for line in source.lines().filter(|l| l.starts_with("fn ")) {
            let name = line[3..].split('(').next().unwrap();
            assert!(text.contains(&format!("fn {name}(")), "ft/{module}: {name} missing:\n{text}");
        }
        assert!(!text.contains("-> ;"), "{text}");
    }
    assert!(std::fs::read_to_string(tmp.path().join("ft/lora.d.rhai")).unwrap().contains("/// Every linear layer of the decoder except lm_head"));
}

#[test]
fn set_overrides_declared_constants_only() {
    let tmp = tempfile::tempdir().unwrap();
    let r = write(tmp.path(), "c.rhai", "const epochs = 1;\nconst name = \"a\";\nprint(`epochs=${epochs} name=${name}`);\n");
    let out = ftscript(&["run", &r, "--set", "epochs=5", "--set", "name=bob"], tmp.path());
    assert!(text(&out).contains("epochs=5 name=bob"), "{}", text(&out));
    let out = ftscript(&["run", &r, "--set", "lr=1"], tmp.path());
    let t = text(&out);
    assert!(!out.status.success() && t.contains("`lr`") && t.contains("epochs, name"), "{t}");
    let out = ftscript(&["--version"], tmp.path());
    let t = text(&out);
    assert!(out.status.success() && t.contains("ftscript ") && t.contains("distributed: gloo") && t.contains("Gemma3ForCausalLM"), "{t}");
    // NCCL is compiled in wherever its headers are (scripts/setup.sh installs them)
    let nvidia = std::fs::read_dir(root().join(".venv/lib")).ok().and_then(|mut d| d.next()).map(|e| e.unwrap().path().join("site-packages/nvidia"));
    if nvidia.is_some_and(|n| n.join("nccl/include/nccl.h").exists() && n.join("cu13/include/cuda_runtime.h").exists()) {
        assert!(t.contains("distributed: gloo, nccl"), "NCCL's headers are installed, but the build left NCCL out: {t}");
    }
}

#[test]
fn recipe_errors_name_line_column_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let e = fails(d, "let x = 1;\nlet y = ;\n");
    assert!(e.contains("bad.rhai:2:"), "{e}");
    let e = fails(d, "let m = load_model(\"x\", #{ dtype: \"fp32\", rr: 8 });\n");
    assert!(e.contains("bad.rhai:1:") && e.contains("`rr`") && e.contains("`dtype`") && e.contains("`device`"), "{e}");
}

#[test]
fn bad_models_give_one_line_errors_naming_file_key_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = tiny_llama(d);
    let copy = |name: &str| {
        let dst = d.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
        dst
    };
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let p = dir.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    };
    let load = |dir: &Path| fails(d, &format!("let m = load_model(\"{}\");\n", dir.display()));

    let missing = copy("missing_key");
    edit_config(&missing, &|c| {
        c.remove("hidden_size");
    });
    let e = load(&missing);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    let arch = copy("unknown_arch");
    edit_config(&arch, &|c| {
        c.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
    });
    let e = load(&arch);
    assert!(e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM") && e.contains("Qwen2ForCausalLM"), "{e}");

    let truncated = copy("truncated");
    let st = truncated.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&truncated);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    let shape = copy("wrong_shape");
    let mut tensors: std::collections::BTreeMap<String, tch::Tensor> =
        read_safetensors(&shape.join("model.safetensors")).into_iter().collect();
    tensors.insert("model.layers.1.mlp.up_proj.weight".into(), tch::Tensor::zeros([3, 3], (tch::Kind::Float, tch::Device::Cpu)));
    ftscript::nn::weights::save_safetensors(&tensors, &shape.join("model.safetensors"), None).unwrap();
    let e = load(&shape);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("[3, 3]"), "{e}");

    // GPUs that are not there, and random_init on a GGUF file
    let split = |device: &str| fails(d, &format!("let m = load_model(\"{}\", #{{ device: \"{device}\" }});\n", good.display()));
    if !tch::Cuda::is_available() {
        let e = split("cuda:0,1");
        assert!(e.contains("cuda:0,1") && e.contains("0 CUDA device(s)"), "{e}");
    }
    let e = split("tpu");
    assert!(e.contains("`tpu`") && e.contains("cuda:N"), "{e}");
    // the file given on the command line, which the recipe may read
    let r = write(d, "gguf.rhai", "const gguf = \"\";\nlet m = load_model(gguf, #{ random_init: true });\n");
    let e = text(&ftscript(&["run", &r, "--set", &format!("gguf={}", demo_gguf().display())], d));
    assert!(e.contains(".gguf") && e.contains("random_init needs a model directory"), "{e}");
}

#[test]
fn readme_lists_every_function() {
    let out = ftscript(&["api"], &root());
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let missing: Vec<&str> = listing.lines().filter(|l| !l.starts_with(' ') && !readme.contains(*l)).collect();
    assert!(missing.is_empty(), "README.md lacks these signatures (paste `ftscript api` into it): {missing:?}");
}

#[test]
fn env_reports_versions_and_the_hub_without_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "hf_EnvReportSecret0123456789";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftscript"))
        .arg("env")
        .env("HF_TOKEN", secret)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let torch: String = py_eval("import torch; print(torch.__version__)");
    for want in [format!("ftscript       {}", env!("CARGO_PKG_VERSION")), format!("libtorch       {}", torch.trim()), "Hub endpoint   http://127.0.0.1:9".into(), "Hub token      set".into(), format!("Hub cache      {}", tmp.path().join("hub").display())] {
        assert!(t.contains(&want), "`ftscript env` lacks {want:?}:\n{t}");
    }
    assert!(t.contains("CUDA") && t.contains("NVRTC kernels") && t.contains("gloo"), "{t}");
    assert!(!t.contains(secret), "the token leaked:\n{t}");
}

/// `ftscript init` writes each template as a recipe that passes `check`, its usage line naming
/// the new file; it never overwrites, and an unknown template lists the real ones.
#[test]
fn init_writes_templates_that_pass_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (template, _, _) in ftscript::init::TEMPLATES {
        let name = format!("my_{}", template.replace('-', "_"));
        let out = ftscript(&["init", &name, "--template", template], d);
        assert!(out.status.success(), "{}", text(&out));
        let file = d.join(format!("{name}.rhai"));
        let recipe = std::fs::read_to_string(&file).unwrap();
        assert!(recipe.contains(&format!("{name}.rhai")) && !recipe.contains("scripts/alpaca") && !recipe.contains("scripts/qlora"), "{recipe}");
        let out = ftscript(&["check", file.to_str().unwrap()], d);
        assert!(out.status.success(), "{template}: {}", text(&out));
        let again = ftscript(&["init", &name, "--template", template], d);
        assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));
    }
    let out = ftscript(&["init", "x", "--template", "ppo"], d);
    assert!(!out.status.success() && text(&out).contains("qlora"), "{}", text(&out));
}

/// A decoded PNG: `(width, height, RGB rows)`.
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::fs::File::open(path).unwrap()).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// `ftscript plot` draws runs' curves into a PNG that decodes, at the stated size, with each
/// run's colour in every panel (loss, learning rate, tokens/s); `train` leaves one in its
/// output_dir; a directory without metrics is an error naming the file.
#[test]
fn plot_draws_runs_into_a_png_and_train_leaves_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (run, scale) in [("a", 1.0), ("b", 0.8)] {
        std::fs::create_dir_all(d.join(run)).unwrap();
        let mut lines = vec![];
        for step in 1..=20 {
            lines.push(serde_json::json!({"step": step, "loss": scale * (3.0 - 0.1 * step as f64), "lr": scale * 1e-3 * (1.0 - step as f64 / 20.0), "tokens_per_sec": scale * (1000.0 + 10.0 * step as f64)}).to_string());
            if step % 5 == 0 {
                lines.push(serde_json::json!({"step": step, "eval_loss": scale * (3.1 - 0.1 * step as f64)}).to_string());
            }
        }
        std::fs::write(d.join(run).join("metrics.jsonl"), lines.join("\n")).unwrap();
    }
    let out = ftscript(&["plot", "a", "b", "--out", "both.png"], d);
    assert!(out.status.success(), "{}", text(&out));
    let (w, h, pixels) = decode_png(&d.join("both.png"));
    assert_eq!((w, h), ftscript::plot::SIZE);
    // Palette99's first two colours, one per run, drawn in each third (panel) of the picture
    for (run, colour) in [("a", [230u8, 25, 75]), ("b", [60, 180, 75])] {
        for panel in 0..3 {
            let rows = (panel * h / 3) as usize..((panel + 1) * h / 3) as usize;
            let hits = rows.flat_map(|y| (0..w as usize).map(move |x| (y * w as usize + x) * 3)).filter(|&i| pixels[i..i + 3] == colour).count();
            assert!(hits > 100, "run {run}: {hits} pixels of its colour in panel {panel}");
        }
    }
    let out = ftscript(&["plot", "a"], d);
    assert!(out.status.success() && d.join("a/loss.png").exists(), "{}", text(&out));
    let bad = ftscript(&["plot", "nowhere"], d);
    assert!(!bad.status.success() && text(&bad).contains("nowhere/metrics.jsonl"), "{}", text(&bad));

    let model = tiny_model_and_text(d, 16);
    run_recipe(d, "train.rhai", &format!("let m = load_model(\"{model}\");\nm.add_lora(#{{}});\ntrain(m, #{{ train: load_dataset(\"data.jsonl\"), max_steps: 3, log_every: 1, output_dir: \"run\" }});\n"));
    let (w, h, _) = decode_png(&d.join("run/loss.png"));
    assert_eq!((w, h), ftscript::plot::SIZE);
}
