//! Batched generation against transformers (`tests/py/generate_reference.py`): greedy decoding of
//! ragged, left-padded prompts gives transformers' tokens; the logits processors (repetition
//! penalty, temperature, top-k, top-p) give transformers' logits; `generate` on an array and
//! `evaluate` as a recipe writes them.

mod common;
use common::*;
use ftscript::generate::{generate_batch, generate_scoring, process_logits, Sampling, Scoring};
use tch::{Device, Kind};

/// Greedy batched generation of 8 prompts of 3–40 tokens equals transformers' `generate` with
/// left padding, on the tiny `name` model, fp32 CPU; and each prompt alone gives its row.
fn batched_greedy_matches_transformers(name: &str) {
    batched_greedy_matches_transformers_for(name, 12, Sampling::default().whole_cache_bytes);
}

fn batched_greedy_matches_transformers_for(name: &str, max_new: usize, whole_cache_bytes: i64) -> Vec<Vec<i64>> {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model_dir = tiny(d, name);
    let lengths = [3usize, 40, 17, 8, 25, 5, 33, 12];
    let prompts: Vec<Vec<i64>> = lengths.iter().enumerate().map(|(r, &n)| (0..n).map(|i| 3 + ((i * 31 + r * 97 + 7) % 290) as i64).collect()).collect();
    std::fs::write(d.join("prompts.json"), serde_json::to_string(&prompts).unwrap()).unwrap();
    py("generate_reference.py", &["generate", model_dir.to_str().unwrap(), d.join("prompts.json").to_str().unwrap(), &max_new.to_string(), d.join("hf.json").to_str().unwrap()]);
    let theirs: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(d.join("hf.json")).unwrap()).unwrap();
    let model = ftscript::models::load(&model_dir, "fp32", Device::Cpu).unwrap();
    let s = Sampling { max_new_tokens: max_new, whole_cache_bytes, ..Default::default() };
    let ours = generate_batch(&model, &prompts, &s).unwrap();
    assert_eq!(ours, theirs, "{name}: batched greedy tokens differ from transformers'");
    assert!(ours.iter().map(Vec::len).sum::<usize>() > 8, "{name}: the rows should generate something: {ours:?}");
    for (p, row) in prompts.iter().zip(&ours).take(3) {
        assert_eq!(&generate_batch(&model, std::slice::from_ref(p), &s).unwrap()[0], row, "{name}: a prompt alone differs from its row in the batch");
    }
    ours
}

/// Scoring continuations in the prompts' forward (an evaluation's loss and its generation from
/// one prefill): the summed loss is transformers' over each row alone (prompt and continuation;
/// labels on every continuation token but one, and on a whole prompt in one row), and the tokens
/// generated are those of the prompts without continuations: on Llama; on Gemma 2, whose sliding
/// window (8) is shorter than most rows and whose decoding overwrites the continuations' cache
/// slots; on Phi-3, whose LongRoPE depends on the length (the scored rows, all past the original
/// length of 16 while no prompt is, get a forward of their own).
#[test]
fn scoring_in_the_prompts_forward_matches_transformers() {
    scoring_matches_transformers(Device::Cpu, 1e-5);
}

/// [`scoring_in_the_prompts_forward_matches_transformers`] on the GPU, where the prefill and the
/// steps run the fused inference kernels (fp32; the loss within 1e-4 of transformers' on the CPU).
/// Ignored unless asked for (`--include-ignored`, on a GPU).
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn scoring_in_the_prompts_forward_on_the_gpu_matches_transformers() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    scoring_matches_transformers(Device::Cuda(0), 1e-4);
}

fn scoring_matches_transformers(device: Device, tolerance: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for name in ["llama_gqa", "gemma2", "phi3"] {
        let model_dir = tiny(d, name);
        // (prompt, continuation) lengths: every prompt within Phi-3's original length, every row past it
        let shapes = [(3usize, 15usize), (16, 4), (9, 21), (8, 9), (12, 13), (5, 30)];
        let token = |r: usize, i: usize, salt: usize| 3 + ((i * 31 + r * 97 + salt) % 290) as i64;
        let prompts: Vec<Vec<i64>> = shapes.iter().enumerate().map(|(r, &(n, _))| (0..n).map(|i| token(r, i, 7)).collect()).collect();
        let continuations: Vec<Vec<i64>> = shapes.iter().enumerate().map(|(r, &(_, n))| (0..n).map(|i| token(r, i, 41)).collect()).collect();
        let labels: Vec<Vec<i64>> = prompts
            .iter()
            .zip(&continuations)
            .enumerate()
            .map(|(r, (p, c))| p.iter().map(|&t| if r == 2 { t } else { -100 }).chain(c.iter().enumerate().map(|(i, &t)| if i == 2 { -100 } else { t })).collect())
            .collect();
        let rows: Vec<serde_json::Value> = (0..shapes.len()).map(|r| serde_json::json!({"ids": ([prompts[r].clone(), continuations[r].clone()].concat()), "labels": labels[r]})).collect();
        std::fs::write(d.join("rows.json"), serde_json::to_string(&rows).unwrap()).unwrap();
        py("generate_reference.py", &["score", model_dir.to_str().unwrap(), d.join("rows.json").to_str().unwrap(), d.join("sums.json").to_str().unwrap()]);
        let theirs: f64 = serde_json::from_str::<Vec<f64>>(&std::fs::read_to_string(d.join("sums.json")).unwrap()).unwrap().iter().sum();
        let model = ftscript::models::load(&model_dir, "fp32", device).unwrap();
        let s = Sampling { max_new_tokens: 12, ..Default::default() };
        let scoring: Vec<Scoring> = continuations.iter().zip(&labels).map(|(c, l)| Scoring { continuation: c, labels: l }).collect();
        let (ours, loss) = generate_scoring(&model, &prompts, Some(&scoring), &s).unwrap();
        let loss = loss.unwrap().double_value(&[]);
        assert!((loss - theirs).abs() <= tolerance * theirs.abs(), "{name}: scored loss {loss} vs transformers' {theirs}");
        assert_eq!(ours, generate_batch(&model, &prompts, &s).unwrap(), "{name}: scoring continuations changed the generated tokens");
        assert!(ours.iter().map(Vec::len).sum::<usize>() > 8, "{name}: the rows should generate something: {ours:?}");
    }
}

/// Long generations: a KV cache allowed no bytes for the whole generation is first sized for 64
/// new tokens and grows twice (to 128, then to 150) while the rows decode; one allowed the
/// default holds the 150 from the start and never grows; the tokens stay transformers' either way.
#[test]
fn a_generation_longer_than_the_caches_first_room_matches_transformers() {
    let before = ftscript::generate::cache_growths();
    let ours = batched_greedy_matches_transformers_for("llama_gqa", 150, 0);
    assert!(ours.iter().any(|r| r.len() > 128), "no row ran past 128 new tokens, so the cache did not grow twice: {:?}", ours.iter().map(Vec::len).collect::<Vec<_>>());
    // the batch's (and those of three of its prompts alone, as long as each runs)
    let growths = ftscript::generate::cache_growths() - before;
    assert!(growths >= 2, "a cache sized for 64 new tokens grew {growths} times");
    let before = ftscript::generate::cache_growths();
    assert_eq!(batched_greedy_matches_transformers_for("llama_gqa", 150, Sampling::default().whole_cache_bytes), ours);
    assert_eq!(ftscript::generate::cache_growths() - before, 0, "a cache for the whole generation grew");
}

#[test]
fn batched_greedy_generation_matches_transformers_on_llama() {
    batched_greedy_matches_transformers("llama_gqa");
}

#[test]
fn batched_greedy_generation_matches_transformers_on_qwen2() {
    batched_greedy_matches_transformers("qwen2_tied");
}

#[test]
fn batched_greedy_generation_matches_transformers_on_mistral() {
    batched_greedy_matches_transformers("mistral");
}

/// q/k norms and a sliding window shorter than the longest prompt.
#[test]
fn batched_greedy_generation_matches_transformers_on_qwen3() {
    batched_greedy_matches_transformers("qwen3");
}

/// Soft-capped scores and logits (attention op by op), sliding windows.
#[test]
fn batched_greedy_generation_matches_transformers_on_gemma2() {
    batched_greedy_matches_transformers("gemma2");
}

/// A second rotary table for the sliding-window layers.
#[test]
fn batched_greedy_generation_matches_transformers_on_gemma3() {
    batched_greedy_matches_transformers("gemma3");
}

/// Routed experts (top-2 of 6, a dense layer among the sparse ones): padding rows are routed too
/// and must not change the real rows' tokens.
#[test]
fn batched_greedy_generation_matches_transformers_on_qwen3_moe() {
    batched_greedy_matches_transformers("qwen3_moe");
}

/// On a GPU each decoding step is replayed from a CUDA graph (recorded again when the KV cache
/// grows, in the greedy runs): for every family (GQA, q/k norms and sliding windows, soft-capping, two rotary
/// tables, routed experts in bf16) with LoRA adapters attached unmerged, greedy and seeded
/// sampling give the tokens of op-by-op decoding, in fp32 and bf16, and the graph did run; in
/// fp32 the greedy tokens are also transformers' (on the CPU).
/// Ignored unless asked for (`--include-ignored`, on a GPU).
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn cuda_graph_decoding_gives_the_tokens_of_op_by_op_decoding() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lengths = [3usize, 40, 17, 8, 25, 5, 33, 12];
    let prompts: Vec<Vec<i64>> = lengths.iter().enumerate().map(|(r, &n)| (0..n).map(|i| 3 + ((i * 31 + r * 97 + 7) % 290) as i64).collect()).collect();
    std::fs::write(d.join("prompts.json"), serde_json::to_string(&prompts).unwrap()).unwrap();
    // past the cache's first room of 64 new tokens
    let max_new = 80;
    for name in ["llama_gqa", "qwen3", "gemma2", "gemma3", "qwen3_moe"] {
        let model_dir = tiny(d, name);
        for dtype in ["fp32", "bf16"] {
            let mut m = ftscript::models::load(&model_dir, dtype, Device::Cuda(0)).unwrap();
            let spec = all_linear_lora(0.0, vec![]);
            let kind = m.net.kind;
            ftscript::nn::peft::add_lora(&mut m.net, &spec, kind).unwrap();
            tch::no_grad(|| {
                for lin in m.net.linears_mut() {
                    if let Some(l) = lin.lora() {
                        let _ = l.b.shallow_clone().normal_(0.0, 0.05);
                    }
                }
            });
            for temperature in [0.0, 0.8] {
                // greedy: the cache grows past its first room (and the graph is recorded again);
                // sampled: it holds the whole generation from the start
                let whole_cache_bytes = if temperature == 0.0 { 0 } else { Sampling::default().whole_cache_bytes };
                let s = Sampling { max_new_tokens: max_new, temperature, top_k: 50, seed: 7, whole_cache_bytes, ..Default::default() };
                let before = ftscript::generate::cuda_graph_replays();
                let graphed = generate_batch(&m, &prompts, &s).unwrap();
                let replays = ftscript::generate::cuda_graph_replays() - before;
                let eager = generate_batch(&m, &prompts, &Sampling { cuda_graph: false, ..s.clone() }).unwrap();
                println!("{name} {dtype} temperature {temperature}: {replays} steps replayed, {} tokens", graphed.iter().map(Vec::len).sum::<usize>());
                assert_eq!(graphed, eager, "{name} {dtype} temperature {temperature}: the graph's tokens differ from op-by-op decoding");
                // fp32 experts count their rows on the host: that model decodes op by op
                let graphable = !(name == "qwen3_moe" && dtype == "fp32");
                assert_eq!(replays > 0, graphable, "{name} {dtype}: {replays} steps replayed from a CUDA graph");
            }
        }
        // plain fp32 (no adapters) against transformers' left-padded generate on the CPU
        let m = ftscript::models::load(&model_dir, "fp32", Device::Cuda(0)).unwrap();
        py("generate_reference.py", &["generate", model_dir.to_str().unwrap(), d.join("prompts.json").to_str().unwrap(), &max_new.to_string(), d.join("hf.json").to_str().unwrap()]);
        let theirs: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(d.join("hf.json")).unwrap()).unwrap();
        let ours = generate_batch(&m, &prompts, &Sampling { max_new_tokens: max_new, ..Default::default() }).unwrap();
        assert_eq!(ours, theirs, "{name}: CUDA-graph decoding differs from transformers' generate");
    }
}

#[test]
fn logits_processors_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("process.safetensors");
    py("generate_reference.py", &["process", f.to_str().unwrap()]);
    let t = read_safetensors(&f);
    let settings = [("penalty", 1.3, 0.0, 0, 1.0), ("temperature", 1.0, 0.7, 0, 1.0), ("top_k", 1.0, 1.0, 5, 1.0), ("top_p", 1.0, 1.0, 0, 0.8), ("all", 1.2, 0.8, 10, 0.9)];
    for (name, repetition_penalty, temperature, top_k, top_p) in settings {
        let s = Sampling { repetition_penalty, temperature, top_k, top_p, ..Default::default() };
        let ours = process_logits(&t["logits"], &t["seen"], &s);
        let theirs = &t[name];
        // the same tokens filtered out, the same values elsewhere
        let (oi, ti) = (ours.isinf(), theirs.isinf());
        assert!(oi.equal(&ti), "{name}: filtered tokens differ");
        let kept = oi.logical_not();
        let diff = (ours.masked_select(&kept) - theirs.masked_select(&kept)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: logits differ by {diff}");
        if top_k > 0 || top_p < 1.0 {
            assert!(oi.sum(Kind::Int64).int64_value(&[]) > 0, "{name}: nothing was filtered");
        }
    }
}

#[test]
fn a_recipe_generates_for_an_array_and_evaluates_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    let records: Vec<String> = (0..6).map(|i| serde_json::json!({"instruction": format!("count {i}"), "output": "the quick brown fox"}).to_string()).collect();
    std::fs::write(d.join("qa.jsonl"), records.join("\n")).unwrap();
    let t = run_recipe(
        d,
        "gen.rhai",
        &format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let prompts = ["the quick", "record 1: the quick brown fox jumps over", "a"];
let batch = m.generate(prompts, #{{ max_new_tokens: 6 }});
let alone = prompts.map(|p| m.generate(p, #{{ max_new_tokens: 6 }}));
print(`SAME ${{batch == alone}} LEN ${{batch.len()}}`);
let sampled = m.generate(prompts, #{{ max_new_tokens: 6, temperature: 0.8, top_k: 20, top_p: 0.9, repetition_penalty: 1.2, seed: 7, batch_size: 2 }});
let again = m.generate(prompts, #{{ max_new_tokens: 6, temperature: 0.8, top_k: 20, top_p: 0.9, repetition_penalty: 1.2, seed: 7, batch_size: 2 }});
print(`SEEDED ${{sampled == again}}`);
let full = m.generate("the quick", #{{ max_new_tokens: 12 }});
let piece = full.sub_string(4, 2);
let cut = m.generate(["the quick", "a"], #{{ max_new_tokens: 12, stop: [piece, "never appears"] }});
print(`STOP ${{full.len() >= 6 && cut[0] == full.sub_string(0, full.index_of(piece))}}`);
let scores = evaluate(m, load_dataset("qa.jsonl"), #{{ format: "alpaca", max_new_tokens: 8, batch_size: 4, samples: 2 }});
print(`EVAL records=${{scores.records}} samples=${{scores.samples.len()}} em=${{scores.exact_match}} bleu=${{scores.bleu}} rouge=${{scores.rouge_l}}`);
print(`REF ${{scores.samples[0].reference}}`);
"#
        ),
    );
    assert!(t.contains("SAME true LEN 3"), "{t}");
    assert!(t.contains("SEEDED true"), "{t}");
    assert!(t.contains("STOP true"), "{t}");
    assert!(t.contains("EVAL records=6 samples=2 em=0.0"), "{t}");
    assert!(t.contains("REF the quick brown fox"), "{t}");
    // a misspelt metric is caught before anything runs, by `check` too
    std::fs::write(d.join("bad.rhai"), format!("let m = load_model(\"{model}\");\nevaluate(m, load_dataset(\"qa.jsonl\"), #{{ metrics: [\"roug_l\"] }});\n")).unwrap();
    for cmd in ["run", "check"] {
        let out = ftscript(&[cmd, "bad.rhai"], d);
        let t = text(&out);
        assert!(!out.status.success() && t.contains("did you mean \"rouge_l\""), "{cmd}: {t}");
    }
}

/// A hook's generation from the chat template, as a user writes it: `m.generate(m.chat_prompt(..))`
/// with a template that writes BOS while the tokenizer adds one (Llama 3's way) gives the tokens
/// transformers generates from `apply_chat_template(..., add_generation_prompt=True)` (one BOS),
/// not those of a doubled BOS.
#[test]
fn a_chat_prompt_generates_what_transformers_generates_from_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = with_template(tiny_llama(d), &format!("{{{{ bos_token }}}}{CHAT_TEMPLATE}"));
    let question = "the quick brown fox jumps over";
    // weights drawn wider than the tiny model's (std 0.25), so that what it generates depends on
    // its prompt; transformers' answer to one BOS, checked to differ from its answer to two
    let want = py_eval(&format!(
        r#"
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({dir:?})
model = AutoModelForCausalLM.from_pretrained({dir:?}, dtype=torch.float32).eval()
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.25)
model.save_pretrained({dir:?})
ids = tok.apply_chat_template([{{"role": "user", "content": {question:?}}}], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
assert ids[0, 0] == tok.bos_token_id and ids[0, 1] != tok.bos_token_id
def answer(ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
assert answer(ids) != answer(torch.cat([ids[:, :1], ids], 1))
print(json.dumps(answer(ids)))
"#,
        dir = model.display().to_string()
    ));
    let t = run_recipe(
        d,
        "chat.rhai",
        &format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let prompt = m.chat_prompt("{question}");
let ids = m.tokenizer.encode(prompt);
print(`BOS ${{ids[0] == m.tokenizer.bos_id && ids[1] == m.tokenizer.bos_id}}`);
print("ANSWER[" + m.generate(prompt, #{{ max_new_tokens: 12 }}) + "]END");
"#,
            model = model.display()
        ),
    );
    // the tokenizer's own encoding doubles the BOS here
    assert!(t.contains("BOS true"), "{t}");
    let want: String = serde_json::from_str(want.trim()).unwrap();
    assert!(t.contains(&format!("ANSWER[{want}]END")), "generate from chat_prompt vs transformers from apply_chat_template ({want:?}):\n{t}");
}

/// `generate` on an array batches prompts of like length together, longest first (a batch pads
/// each prompt to its longest), and returns the continuations in the prompts' order: what each
/// prompt alone gives. Fails when batches follow the array's order (a one-word prompt beside a
/// long one).
#[test]
fn prompts_of_like_length_are_decoded_together() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    std::fs::write(
        d.join("lengths.rhai"),
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let prompts = ["a", "record 1: the quick brown fox jumps over the lazy dog", "b", "record 2: the quick brown fox jumps over the lazy cat", "c"];
let batch = m.generate(prompts, #{{ max_new_tokens: 5, batch_size: 2 }});
let alone = prompts.map(|p| m.generate(p, #{{ max_new_tokens: 5 }}));
print(`SAME ${{batch == alone}} LEN ${{batch.len()}}`);
"#
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftscript")).args(["run", "lengths.rhai"]).current_dir(d).env("FTSCRIPT_LOG", "ftscript=debug").output().unwrap();
    let t = text(&out);
    assert!(out.status.success() && t.contains("SAME true LEN 5"), "{t}");
    // the batched call's batches: two of two prompts, then one
    let spans: Vec<(usize, usize)> = t
        .lines()
        .filter_map(|l| l.split("generate: ").nth(1)?.strip_suffix(" tokens").map(str::to_string))
        .filter_map(|l| {
            let span = l.strip_prefix("2 prompt(s) of ")?;
            let (lo, hi) = span.split_once(" to ")?;
            Some((lo.parse().ok()?, hi.parse().ok()?))
        })
        .collect();
    assert_eq!(spans.len(), 2, "{t}");
    assert!(spans[0].0 > 10 && spans.iter().all(|(lo, hi)| hi - lo <= 3), "batches pad more than they need to: {spans:?}");
}

/// A batch of prompts that runs out of memory (injected: batches of more than 2 rows fail) is
/// decoded again in halves, in `generate` and in `evaluate`, with a warning, and gives what one
/// prompt at a time gives.
#[test]
fn a_batch_that_runs_out_of_memory_is_generated_in_halves() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    let records: Vec<String> = (0..5).map(|i| serde_json::json!({"instruction": format!("count {i}"), "output": "the quick brown fox"}).to_string()).collect();
    std::fs::write(d.join("qa.jsonl"), records.join("\n")).unwrap();
    std::fs::write(
        d.join("oom.rhai"),
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let prompts = ["the quick", "record 1: the quick brown fox jumps over", "a", "record 2:", "the lazy"];
let batch = m.generate(prompts, #{{ max_new_tokens: 6, batch_size: 5 }});
let alone = prompts.map(|p| m.generate(p, #{{ max_new_tokens: 6 }}));
print(`SAME ${{batch == alone}} LEN ${{batch.len()}}`);
let all = evaluate(m, load_dataset("qa.jsonl"), #{{ format: "alpaca", max_new_tokens: 6, batch_size: 4, samples: 5 }});
let one = evaluate(m, load_dataset("qa.jsonl"), #{{ format: "alpaca", max_new_tokens: 6, batch_size: 1, samples: 5 }});
print(`EVAL ${{all.samples == one.samples}} ${{all.records}}`);
"#
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftscript")).args(["run", "oom.rhai"]).current_dir(d).env("FTSCRIPT_INJECT_OOM_ROWS", "2").output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("SAME true LEN 5") && t.contains("EVAL true 5"), "{t}");
    assert!(t.contains("out of memory decoding 5 prompts at a time, now 2 at a time"), "{t}");
    assert!(t.contains("out of memory decoding 4 prompts at a time, now 2 at a time"), "{t}");
}

/// `eval_generate` scores generated answers at each evaluation: the scores reach metrics.jsonl
/// and `on_eval` (early stopping on one of them), a profile of the step before an evaluation
/// holds it, and a misspelt metric is caught before training.
#[test]
fn train_scores_generated_answers_at_each_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    let records: Vec<String> = (0..24).map(|i| serde_json::json!({"instruction": format!("say {}", i % 3), "output": "the quick brown fox"}).to_string()).collect();
    std::fs::write(d.join("qa.jsonl"), records.join("\n")).unwrap();
    let recipe = |metric: &str, out: &str| {
        format!(
            r#"
import "ft/callbacks" as cb;
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("qa.jsonl").split(6, 1);
let seen = [];
let r = train(m, #{{ train: data.train, eval: data.eval, format: "alpaca", batch_size: 4, max_steps: 6, lr: 3e-2, log_every: 1, eval_every: 2,
    eval_generate: #{{ metrics: ["{metric}", "exact_match"], max_new_tokens: 6, batch_size: 4, samples: 1 }},
    on_eval: [|s| {{ seen.push(s.eval_exact_match); }}, cb::early_stopping(#{{ metric: "eval_rouge_l", mode: "max", patience: 1 }})],
    output_dir: "{out}", profile: #{{ start: 2, steps: 1 }} }});
print(`RESULT steps=${{r.steps}} seen=${{seen.len()}}`);
"#
        )
    };
    let t = run_recipe(d, "eg.rhai", &recipe("rouge_l", "eg"));
    assert!(t.contains("RESULT steps=") && t.contains("eval_generate sample"), "{t}");
    let evals: Vec<serde_json::Value> = metrics(&d.join("eg/metrics.jsonl")).into_iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert!(!evals.is_empty());
    for e in &evals {
        for key in ["eval_rouge_l", "eval_exact_match", "eval_generate_seconds", "eval_seconds"] {
            assert!(e.get(key).and_then(|v| v.as_f64()).is_some(), "no {key} in {e}");
        }
        // the whole evaluation's time holds the generation's
        assert!(e["eval_seconds"].as_f64() >= e["eval_generate_seconds"].as_f64(), "{e}");
    }
    // the profile of step 2 holds the evaluation after it: greedy generation's argmax is there
    let summary = std::fs::read_to_string(d.join("eg/profile/summary.txt")).unwrap();
    assert!(summary.starts_with("steps 2..=2 and the evaluation after step 2"), "{summary}");
    let trace = std::fs::read_to_string(d.join("eg/profile/trace.json")).unwrap();
    assert!(trace.contains("aten::argmax"), "the profile holds no generation");
    std::fs::write(d.join("bad.rhai"), recipe("roug_l", "bad")).unwrap();
    let out = ftscript(&["run", "bad.rhai"], d);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("eval_generate: metrics \"roug_l\" is not one of") && !t.contains(" step 1 loss"), "{t}");
}

/// An evaluation's loss from its generation's prompts, as a user writes it: `train` with
/// `eval_generate` logs the eval losses of the same run without it (its own loss pass) and says
/// they came from the prompts' forward; after training, `evaluate`'s `loss` metric is that
/// eval loss too (the reference's tokens as `train` tokenizes the record), and asking for it
/// leaves the predictions as they were. So for alpaca pairs, for pairs whose prompt is
/// `chat_prompt`'s rendering, and for `messages` records, with a chat template that writes BOS
/// while the tokenizer adds one (Llama 3's way): the prompts are tokenized as `train` tokenizes
/// them, one BOS. `loss` among `eval_generate`'s metrics is refused before training starts.
#[test]
fn an_evaluation_scores_its_loss_in_the_forward_of_its_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    std::fs::create_dir_all(d.join("bos")).unwrap();
    let chat = with_template(tiny(&d.join("bos"), "llama_gqa"), &format!("{{{{ bos_token }}}}{CHAT_TEMPLATE}")).display().to_string();
    let qa: Vec<(String, String)> = (0..20).map(|i| (format!("say {} {}", i % 3, "word ".repeat(i % 7)), format!("the quick brown fox {}", "jumps ".repeat(i % 5)))).collect();
    let lines = |f: &dyn Fn(&(String, String)) -> serde_json::Value| qa.iter().map(|r| f(r).to_string()).collect::<Vec<_>>().join("\n");
    std::fs::write(d.join("qa.jsonl"), lines(&|(q, a)| serde_json::json!({"instruction": q, "output": a}))).unwrap();
    std::fs::write(d.join("chat.jsonl"), lines(&|(q, a)| serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))).unwrap();
    let recipe = |(model, data, format): (&str, &str, &str), generate: &str, out: &str| {
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let fmt = {format};
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("{data}").split(7, 1);
let r = train(m, #{{ train: data.train, eval: data.eval, format: fmt, batch_size: 4, eval_batch_size: 3, max_steps: 4, lr: 3e-2,
    log_every: 1, eval_every: 2, output_dir: "{out}"{generate} }});
let opts = #{{ format: fmt, max_new_tokens: 5, batch_size: 4, samples: 7 }};
let scored = evaluate(m, data.eval, opts + #{{ metrics: ["loss", "rouge_l"] }});
let plain = evaluate(m, data.eval, opts + #{{ metrics: ["rouge_l"] }});
print(`RESULT eval_loss=${{r.eval_loss}} loss=${{scored.loss}} same=${{scored.samples.map(|s| s.prediction) == plain.samples.map(|s| s.prediction)}} has_loss=${{"loss" in plain}}`);
"#
        )
    };
    let number = |t: &str, key: &str| -> f64 {
        let line = t.lines().find(|l| l.contains("RESULT ")).unwrap_or_else(|| panic!("no RESULT:\n{t}"));
        let at = line.find(&format!(" {key}=")).unwrap() + key.len() + 2;
        line[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let evals = |out: &str| -> Vec<f64> { metrics(&d.join(out).join("metrics.jsonl")).iter().filter_map(|m| m.get("eval_loss").and_then(|v| v.as_f64())).collect() };
    let chat_pairs = "|r| #{ prompt: m.chat_prompt(r.instruction), response: r.output }";
    for (name, case) in [("alpaca", (model.as_str(), "qa.jsonl", "\"alpaca\"")), ("chat_prompt", (chat.as_str(), "qa.jsonl", chat_pairs)), ("messages", (chat.as_str(), "chat.jsonl", "\"chat_template\""))] {
        let own = run_recipe(d, &format!("own-{name}.rhai"), &recipe(case, "", &format!("own-{name}")));
        let shared = run_recipe(d, &format!("shared-{name}.rhai"), &recipe(case, ", eval_generate: #{ metrics: [\"rouge_l\"], max_new_tokens: 5, batch_size: 4 }", &format!("shared-{name}")));
        assert!(shared.contains("eval_loss is scored in the forward of eval_generate's prompts") && !own.contains("eval_loss is scored"), "{name}: {shared}");
        let (a, b) = (evals(&format!("own-{name}")), evals(&format!("shared-{name}")));
        assert_eq!(a.len(), 2, "{name}: {a:?}");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{name}: eval_loss of the loss pass {x} vs from the prompts' forward {y}");
        }
        for t in [&own, &shared] {
            let (eval_loss, loss) = (number(t, "eval_loss"), number(t, "loss"));
            assert!((eval_loss - loss).abs() <= 1e-5 * eval_loss, "{name}: evaluate's loss {loss} vs train's eval_loss {eval_loss}");
            assert!(t.contains("same=true has_loss=false"), "{name}: {t}");
        }
    }
    let recipe = |generate: &str, out: &str| recipe((model.as_str(), "qa.jsonl", "\"alpaca\""), generate, out);
    std::fs::write(d.join("bad.rhai"), recipe(", eval_generate: #{ metrics: [\"loss\"] }", "bad")).unwrap();
    let out = ftscript(&["run", "bad.rhai"], d);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("eval_generate: leave \"loss\" out of metrics") && !t.contains(" step 1 loss"), "{t}");
}
