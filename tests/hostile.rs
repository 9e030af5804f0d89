//! Recipes as someone else's code, and inputs as an attacker (or a bad disk) would make them:
//! the sandbox of `ftscript run` refuses what a recipe may not touch, naming the flag that allows
//! it and quoting nothing it refused; bad files of every kind end in a clear error, exit ≠ 0, no
//! panic and no partial output.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Runs `body` as `dir/name` with `ftscript run` in `dir` (its environment's Hub cache empty,
/// its endpoint refusing) and the extra flags; returns (success, output).
fn run_in(dir: &Path, name: &str, body: &str, flags: &[&str]) -> (bool, String) {
    std::fs::write(dir.join(name), body).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ftscript"))
        .arg("run")
        .arg(name)
        .args(flags)
        .current_dir(dir)
        .env("HF_HUB_CACHE", dir.join("hub-cache"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

/// Hostile recipes, each refused with the flag that would allow it, its secret never printed and
/// nothing written outside; then the same reads and writes succeed with the flags.
#[test]
fn hostile_recipes_are_refused_with_the_flag_that_allows_them() {
    let work = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (d, e) = (work.path(), elsewhere.path());
    let model = tiny_model_and_text(d, 4);
    let secret = e.join("secret.jsonl");
    std::fs::write(&secret, "{\"text\": \"SECRET-7f3a9c\"}\n").unwrap();
    std::fs::write(e.join("helpers.rhai"), "fn token() { \"SECRET-7f3a9c\" }\n").unwrap();
    let (s, o) = (secret.display(), e.display());
    let cases: &[(&str, String, &str)] = &[
        ("passwd", r#"let ds = load_dataset("/etc/passwd"); print(ds.len());"#.into(), "--allow-read /etc/passwd"),
        ("secret", format!(r#"let ds = load_dataset("{s}"); print(ds[0]);"#), "--allow-read"),
        ("relative", format!(r#"let ds = load_dataset("{}"); print(ds[0]);"#, relative(d, &secret)), "--allow-read"),
        ("module", format!("import \"{}\" as h;\nprint(h::token());", relative(d, &e.join("helpers"))), "--allow-read"),
        ("train", format!(r#"let m = load_model("{model}"); m.add_lora(#{{ r: 2 }}); train(m, #{{ train: load_dataset("data.jsonl"), max_steps: 1, output_dir: "{o}/run" }});"#), "--allow-write"),
        ("adapter", format!(r#"let m = load_model("{model}"); m.add_lora(#{{ r: 2 }}); m.save_adapter("{o}/adapter");"#), "--allow-write"),
        ("merged", format!(r#"let m = load_model("{model}"); m.save_merged("{o}/merged");"#), "--allow-write"),
        ("metrics", format!(r#"import "ft/callbacks" as cb; let log = cb::metrics_logger("{o}/logs/metrics.jsonl"); log.call(#{{ step: 1 }});"#), "--allow-write"),
        ("gguf", format!(r#"let m = load_model("{model}"); m.save_gguf("{o}/model.gguf");"#), "--allow-write"),
        ("download", r#"print(hub_download("someone/model"));"#.into(), "--allow-net"),
        ("hub_model", r#"let m = load_model("someone/model");"#.into(), "--allow-net"),
        ("push", format!(r#"hub_push("{model}", "me/exfiltrated");"#), "--allow-push"),
    ];
    for (name, body, flag) in cases {
        let (ok, t) = run_in(d, &format!("{name}.rhai"), body, &[]);
        assert!(!ok, "{name}: the hostile recipe ran:\n{t}");
        assert!(t.contains(flag), "{name}: the refusal does not name `{flag}`:\n{t}");
        assert!(!t.contains("SECRET-7f3a9c") && !t.contains("root:x:0"), "{name}: refused content leaked:\n{t}");
        assert!(!t.contains("panicked"), "{name}: {t}");
    }
    let mut left: Vec<String> = std::fs::read_dir(e).unwrap().filter_map(|x| x.ok()?.file_name().into_string().ok()).collect();
    left.sort();
    assert_eq!(left, ["helpers.rhai", "secret.jsonl"], "a refused recipe wrote outside its confinement");

    // a callback that never returns, endless recursion and data that grows without end are
    // stopped by a limit, which the error names
    let limited: &[(&str, &str, &[&str])] = &[
        ("loop", r#"let ds = load_dataset("data.jsonl"); ds.map(|r| { loop { } });"#, &["--max-callback-operations", "100000"]),
        ("recursion", "fn down(n) { down(n + 1) }\ndown(0);", &[]),
        ("string", r#"let s = "x"; loop { s += s; }"#, &[]),
        ("array", "let a = []; loop { a.push(0); }", &["--max-array-size", "1000"]),
        ("map", "let m = #{}; let i = 0; while i < 2000 { m[`k${i}`] = i; i += 1; }\nprint(m.len());", &["--max-map-size", "1000"]),
        // Rhai checks a map's size when it is passed on, not at each `m[key] = value`: the memory limit stops this one
        ("memory", "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }", &["--max-memory", "700000000"]),
    ];
    for (name, body, flags) in limited {
        let flag: String = match *name { "loop" => "--max-callback-operations".into(), "recursion" => "--max-call-depth".into(), "memory" => "--max-memory".into(), n => format!("--max-{n}-size") };
        let (ok, t) = run_in(d, &format!("{name}.rhai"), body, flags);
        assert!(!ok && t.contains(&flag) && !t.contains("panicked"), "{name}: {t}");
    }

    // the same reads and writes, allowed by the person running the recipe
    let (ok, t) = run_in(d, "secret.rhai", &format!(r#"let ds = load_dataset("{s}"); print(ds[0].text);"#), &["--allow-read", &o.to_string()]);
    assert!(ok && t.contains("SECRET-7f3a9c"), "{t}");
    let (ok, t) = run_in(d, "module.rhai", &format!("import \"{}\" as h;\nprint(h::token());", relative(d, &e.join("helpers"))), &["--allow-read", &o.to_string()]);
    assert!(ok && t.contains("SECRET-7f3a9c"), "{t}");
    let (ok, t) = run_in(d, "adapter.rhai", &format!(r#"let m = load_model("{model}"); m.add_lora(#{{ r: 2 }}); m.save_adapter("{o}/adapter");"#), &["--allow-write", &o.to_string()]);
    assert!(ok && e.join("adapter/adapter_model.safetensors").exists(), "{t}");
    // paths given on the command line are readable without a flag
    std::fs::write(d.join("given.rhai"), "const data = \"\";\nlet ds = load_dataset(data); print(`records: ${ds.len()}`);\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ftscript")).args(["run", "given.rhai", "--set", &format!("data={s}")]).current_dir(d).output().unwrap();
    assert!(out.status.success() && text(&out).contains("records: 1"), "{}", text(&out));
}

/// `target` relative to `from` (`../../x/y`), so a recipe can reach it without an absolute path.
fn relative(from: &Path, target: &Path) -> String {
    let ups = from.canonicalize().unwrap().components().count() - 1;
    format!("{}{}", "../".repeat(ups), target.canonicalize().unwrap_or(target.to_path_buf()).display().to_string().trim_start_matches('/'))
}

/// A table of bad inputs, one recipe run each on a fresh copy of a valid tiny model, dataset
/// and adapter with one thing broken: a clear error naming the file, key, field or tensor,
/// exit ≠ 0, no panic, and nothing written (no run directory, no adapter). (A missing config
/// key, truncated weights and a weight of the wrong shape are in tests/cli.rs.)
#[test]
fn bad_inputs_end_in_a_clear_error_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = std::path::PathBuf::from(tiny_model_and_text(d, 8));
    let good_recipe = |model: &str, data: &str, adapter: Option<&str>, opts: &str| {
        let adapter = match adapter {
            Some(a) => format!("m.load_adapter(\"{a}\");"),
            None => "m.add_lora(#{ r: 2, targets: [\"q_proj\", \"v_proj\"] });".into(),
        };
        format!(
            "let m = load_model(\"{model}\", #{{ dtype: \"fp32\", device: \"cpu\" }});\n{adapter}\nlet ds = load_dataset(\"{data}\");\ntrain(m, #{{ train: ds, max_steps: 1, batch_size: 2, max_length: 32, output_dir: \"out/run\", {opts} }});\nm.save_adapter(\"out/adapter\");\n"
        )
    };
    let data = d.join("data.jsonl");
    let (ok, t) = run_in(d, "good.rhai", &good_recipe(&model.display().to_string(), &data.display().to_string(), None, ""), &[]);
    assert!(ok, "{t}");
    std::fs::rename(d.join("out/adapter"), d.join("adapter")).unwrap();
    std::fs::remove_dir_all(d.join("out")).unwrap();

    // (name, what to break, the words the error must hold)
    type Break = Box<dyn Fn(&Path)>;
    let rewrite = |file: &'static str, f: fn(Vec<u8>) -> Vec<u8>| -> Break { Box::new(move |dir: &Path| std::fs::write(dir.join(file), f(std::fs::read(dir.join(file)).unwrap())).unwrap()) };
    let json_edit = |file: &'static str, f: fn(&mut serde_json::Value)| -> Break {
        Box::new(move |dir: &Path| {
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(dir.join(file), v.to_string()).unwrap()
        })
    };
    let tensor_edit = |file: &'static str, f: fn(&str, tch::Tensor) -> tch::Tensor| -> Break {
        Box::new(move |dir: &Path| {
            let path = dir.join(file);
            let tensors: Vec<(String, tch::Tensor)> = read_safetensors(&path).into_iter().map(|(k, t)| {
                let t = f(&k, t);
                (k, t)
            }).collect();
            tch::Tensor::write_safetensors(&tensors, &path).unwrap();
        })
    };
    let cases: Vec<(&str, &str, Break, &[&str])> = vec![
        ("config_garbled", "model", rewrite("config.json", |b| b[..b.len() / 2].to_vec()), &["config.json"]),
        ("config_wrong_type", "model", json_edit("config.json", |v| v["num_hidden_layers"] = "two".into()), &["config.json", "num_hidden_layers"]),
        ("config_absurd_size", "model", json_edit("config.json", |v| v["num_hidden_layers"] = (1u64 << 40).into()), &["num_hidden_layers"]),
        ("weights_absurd_header", "model", rewrite("model.safetensors", |mut b| { b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes()); b }), &["model.safetensors"]),
        ("weights_wrong_dtype", "model", tensor_edit("model.safetensors", |k, t| if k.ends_with("layers.0.mlp.up_proj.weight") { t.to_kind(tch::Kind::Int64) } else { t }), &["layers.0.mlp.up_proj.weight"]),
        ("tokenizer_garbled", "model", rewrite("tokenizer.json", |b| b[..b.len() / 2].to_vec()), &["tokenizer.json"]),
        ("data_not_utf8", "data", rewrite("data.jsonl", |mut b| { b.extend_from_slice(b"{\"text\": \"\xff\xfe\"}\n"); b }), &["data.jsonl:9", "UTF-8"]),
        ("data_garbled_line", "data", rewrite("data.jsonl", |mut b| { b.splice(0..0, b"{\"text\": oops\n".iter().copied()); b }), &["data.jsonl:1"]),
        ("data_missing_field", "data", rewrite("data.jsonl", |_| b"{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n".to_vec()), &["text"]),
        ("adapter_config_garbled", "adapter", rewrite("adapter_config.json", |b| b[..b.len() / 2].to_vec()), &["adapter_config.json"]),
        ("adapter_wrong_shape", "adapter", tensor_edit("adapter_model.safetensors", |k, t| if k.contains("layers.0.self_attn.q_proj.lora_A") { t.narrow(1, 0, 5).contiguous() } else { t }), &["layers.0.self_attn.q_proj.lora_A"]),
        ("adapter_truncated", "adapter", rewrite("adapter_model.safetensors", |b| b[..b.len() / 2].to_vec()), &["adapter_model.safetensors"]),
    ];
    let options: &[(&str, &str, &[&str])] = &[
        ("option_typo", "lerning_rate: 1e-3", &["lerning_rate", "did you mean `lr`"]),
        ("option_python_name", "gradient_accumulation_steps: 4", &["gradient_accumulation_steps", "did you mean `grad_accum`"]),
        ("option_wrong_type", "lr: \"high\"", &["lr"]),
        ("option_absurd", "max_length: -5", &["max_length"]),
        ("option_bad_choice", "scheduler: \"cosin\"", &["scheduler", "cosine"]),
    ];
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    let check = |name: &str, body: String, expect: &[&str], case_dir: &Path| {
        let (ok, t) = run_in(case_dir, "case.rhai", &body, &["--allow-read", d.to_str().unwrap()]);
        assert!(!ok, "{name}: ran to the end:\n{t}");
        assert!(!t.contains("panicked") && !t.contains("RUST_BACKTRACE"), "{name}: panicked:\n{t}");
        for word in expect {
            assert!(t.contains(word), "{name}: the error does not name `{word}`:\n{t}");
        }
        assert!(!case_dir.join("out").exists(), "{name}: left output behind:\n{t}");
    };
    for (name, part, broken, expect) in &cases {
        let case_dir = d.join(name);
        let (m, data, adapter) = (case_dir.join("model"), case_dir.join("data"), case_dir.join("adapter"));
        copy_dir(&model, &m);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(d.join("data.jsonl"), data.join("data.jsonl")).unwrap();
        copy_dir(&d.join("adapter"), &adapter);
        broken(&case_dir.join(part));
        let adapter = (*part == "adapter").then(|| adapter.display().to_string());
        check(name, good_recipe(&m.display().to_string(), &data.join("data.jsonl").display().to_string(), adapter.as_deref(), ""), expect, &case_dir);
    }
    for (name, opts, expect) in options {
        let case_dir = d.join(name);
        std::fs::create_dir_all(&case_dir).unwrap();
        check(name, good_recipe(&model.display().to_string(), &data.display().to_string(), None, opts), expect, &case_dir);
    }
}
