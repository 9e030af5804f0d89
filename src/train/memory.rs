//! How much device memory a micro-batch's activations take, and what backward should keep of
//! them: all (fastest), each layer's input (checkpointing), or nothing on the GPU (offloading to
//! host memory), chosen from free memory (`gradient_checkpointing: "auto"`) or from a stated
//! budget (`memory_budget`).
//!
//! Without checkpointing, backward keeps every decoder layer's activations. Per token and
//! layer: the two norms' inputs (`2·H`; four with sandwich norms), q, k and v after RoPE and
//! attention's output (`2·q + 2·kv` for `q = heads·d`, `kv = kv_heads·d`; flash attention keeps
//! no T×T matrix), the q/k norms' inputs where the model has them (`q + kv`), and the gate and
//! up projections' outputs (`2·I`; a sparse layer's experts, [`DecoderConfig::feed_forward_size`]),
//! each in the compute dtype, plus what the adapters keep ([`AdapterKeep`]): the frozen
//! projections' own backward needs none of their inputs. Backward adds one layer's MLP gradients
//! (`3·I + H`) while it runs. Counted so, the estimates are within 0.5% of the whole-GPU peaks
//! measured on an H200 (7B q+v and all-linear r=16, Qwen3-8B q+v).
//! Checkpointing keeps one `H` vector per layer instead and recomputes the rest, costing one
//! more forward pass; in backward one layer's attention or MLP part (the larger, `6·H` or
//! `4·H + 4·I`, with their adapters' keep) is alive at a time. Offloading keeps two layers' inputs and mid-layer residuals
//! on the GPU at a time (the one in use and the one being fetched). The loss head adds one chunk
//! of fp32 logits and its gradient ([`crate::nn::loss::LOSS_CHUNK_ELEMENTS`]) and the hidden
//! states' gradient. Soft-capped attention (Gemma 2) keeps `[heads, T, T]` matrices per row and
//! layer: with its kernel ([`crate::cuda::autograd::softcap_softmax`]) the raw scores and the
//! probabilities, two in the compute dtype; op by op about four (the capped scores, the fp32
//! softmax and its cast), counted in fp32.

use crate::models::config::DecoderConfig;
use crate::models::decoder::{Decoder, FeedForward};
use crate::models::Checkpointing;
use crate::nn::Linear;
use tch::{Device, Kind};

/// Device bytes a micro-batch needs beyond the resident weights and adapters, for each of what
/// backward may keep (`offload: None` where the model cannot offload).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Needs {
    pub off: u64,
    pub on: u64,
    pub offload: Option<u64>,
    /// `(layers, extra)`: the decoder layers, and what each that keeps its activations needs
    /// beyond its checkpointed input (`None` where only whole-model checkpointing applies).
    pub per_layer: Option<(usize, u64)>,
}

impl Needs {
    pub fn of(&self, c: Checkpointing) -> Option<u64> {
        match c {
            Checkpointing::Off => Some(self.off),
            Checkpointing::First(n) => self.per_layer.map(|(layers, extra)| self.on + layers.saturating_sub(n) as u64 * extra),
            Checkpointing::On => Some(self.on),
            Checkpointing::Offload => self.offload,
        }
    }
}

/// What one decoder layer's adapters keep for backward beyond what the layer keeps itself, in
/// bytes per token: in its attention half (on q/k/v and o_proj) and in its MLP half.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdapterKeep {
    pub attention: u64,
    pub mlp: u64,
}

/// One adapted projection as [`AdapterKeep::of_group`] counts it.
pub struct Adapted {
    pub in_features: u64,
    pub out_features: u64,
    pub dropout: f64,
    /// Plain LoRA (the fused projections); otherwise autograd's path (DoRA, AdaLoRA, a trained copy).
    pub fused: bool,
}

impl AdapterKeep {
    /// Bytes per token that the adapters of projections reading one input keep, in `elt`-byte
    /// values: each dropout draw its copy of the input and its mask (a byte a value); without
    /// dropout, the input itself once, unless the layer keeps it anyway (`input_kept`: o_proj's
    /// input is attention's output); off the fused path, also two `out`-wide products.
    pub fn of_group(adapted: &[Adapted], input_kept: bool, elt: u64) -> u64 {
        let dropped: u64 = adapted.iter().filter(|a| a.dropout > 0.0).map(|a| a.in_features * (elt + 1)).sum();
        let shared = adapted.iter().find(|a| a.dropout == 0.0).filter(|_| !input_kept).map_or(0, |a| a.in_features * elt);
        let unfused: u64 = adapted.iter().filter(|a| !a.fused).map(|a| 2 * a.out_features * elt).sum();
        dropped + shared + unfused
    }
}

/// What the adapters of `net`'s first decoder layer keep for backward.
pub fn decoder_adapters_keep(net: &Decoder) -> AdapterKeep {
    let Some(layer) = net.layers.first() else { return AdapterKeep::default() };
    let elt = net.kind.elt_size_in_bytes() as u64;
    let group = |linears: &[&Linear], input_kept: bool| {
        let adapted: Vec<Adapted> = linears
            .iter()
            .filter_map(|l| {
                let a = l.adapter.as_ref()?;
                Some(Adapted { in_features: l.in_features() as u64, out_features: l.out_features() as u64, dropout: a.dropout(), fused: a.as_lora().is_some() })
            })
            .collect();
        AdapterKeep::of_group(&adapted, input_kept, elt)
    };
    let attn = &layer.self_attn;
    let attention = group(&attn.qkv.linears(), false) + group(&[&attn.o_proj], true);
    let mlp = match &layer.mlp {
        FeedForward::Dense(m) => group(&m.gate_up.linears(), false) + group(&[&m.down_proj], false),
        FeedForward::Sparse(_) => 0,
    };
    AdapterKeep { attention, mlp }
}

/// A decoder's [`Needs`] for `rows` rows of `row_len` tokens whose layers' adapters keep
/// `adapters` (on a GPU when `gpu`).
pub fn decoder_needs(c: &DecoderConfig, rows: u64, row_len: u64, kind: Kind, adapters: AdapterKeep, gpu: bool) -> Needs {
    let elt = kind.elt_size_in_bytes() as u64;
    let (h, tokens, layers) = (c.hidden_size as u64, rows * row_len, c.num_hidden_layers as u64);
    let matrices = if gpu { 2 * elt } else { 4 * 4 };
    let scores = if c.attn_softcap.is_some() { matrices * rows * c.num_attention_heads as u64 * row_len * row_len } else { 0 };
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let attention = 2 * q + 2 * kv + if c.qk_norm { q + kv } else { 0 };
    let residuals = if c.sandwich_norms { 4 * h } else { 2 * h };
    let sparse = |l: usize| c.moe.as_ref().is_some_and(|m| m.sparse_layers[l]);
    let mlp = |l: usize| if sparse(l) { c.feed_forward_size(l).2 } else { 2 * c.intermediate_size as u64 };
    let kept = |l: usize| ((residuals + attention + mlp(l)) * elt + adapters.attention + adapters.mlp) * tokens + scores;
    let all: u64 = (0..c.num_hidden_layers).map(kept).sum();
    // while a layer's MLP back-propagates: ∂gate, ∂up, the gated product's gradient and ∂x
    let temporaries = (0..c.num_hidden_layers).map(|l| (if sparse(l) { c.feed_forward_size(l).2 } else { 3 * c.intermediate_size as u64 } + h) * elt * tokens).max().unwrap_or(0);
    let recompute = (0..c.num_hidden_layers).map(|l| (6 * h * elt + adapters.attention).max((4 * h + c.feed_forward_size(l).2) * elt + adapters.mlp) * tokens + scores).max().unwrap_or(0);
    let head = (tokens * c.vocab_size as u64).min(crate::nn::loss::LOSS_CHUNK_ELEMENTS as u64) * 4 * 2 + tokens * h * elt;
    let input = tokens * h * elt;
    let largest = (0..c.num_hidden_layers).map(kept).max().unwrap_or(0);
    Needs {
        off: all + temporaries + head,
        on: layers * input + recompute + head,
        offload: Some(4 * input + recompute + head),
        per_layer: Some((c.num_hidden_layers, largest.saturating_sub(input))),
    }
}

/// `(checkpointing, why)` without a budget: no checkpointing if the activations fit in 85% of
/// the free device memory, else as few checkpointed layers as fit there, else each layer.
pub fn plan(needs: Needs, device: Device) -> (Checkpointing, String) {
    plan_for(needs, crate::cuda::mem_info(device), device == Device::Cpu)
}

/// [`plan`] given the device's `(free, total)` bytes, where known.
fn plan_for(needs: Needs, memory: Option<(u64, u64)>, cpu: bool) -> (Checkpointing, String) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match memory {
        Some((free, total)) if (needs.off as f64) < free as f64 * 0.85 => {
            (Checkpointing::Off, format!("activations need ~{:.1} GiB, {:.1} of {:.1} GiB free: no checkpointing (faster)", gib(needs.off), gib(free), gib(total)))
        }
        Some((free, _)) => {
            let c = fewest_checkpointed(needs, (free as f64 * 0.85) as u64).unwrap_or(Checkpointing::On);
            (c, format!("activations need ~{:.1} GiB but only {:.1} GiB are free: {}", gib(needs.off), gib(free), c.describe()))
        }
        None if cpu => (Checkpointing::Off, format!("on the CPU (activations ~{:.1} GiB): no checkpointing", gib(needs.off))),
        None => (Checkpointing::On, "free device memory unknown: checkpointing to be safe".into()),
    }
}

/// `First(n)` with the fewest checkpointed layers whose estimate fits in `room` bytes (`None`
/// where none but whole-model checkpointing does, or the model cannot checkpoint by layers).
pub fn fewest_checkpointed(needs: Needs, room: u64) -> Option<Checkpointing> {
    let (layers, _) = needs.per_layer?;
    (1..layers).map(Checkpointing::First).find(|&c| needs.of(c).is_some_and(|b| b <= room))
}

/// What backward keeps for a model of `layers` decoder layers, fastest first: nothing
/// checkpointed, then 1, 2, … of the first layers, then each layer, then each layer offloaded;
/// under a budget the next one is taken when a step runs out of memory.
pub fn ladder(layers: usize) -> Vec<Checkpointing> {
    std::iter::once(Checkpointing::Off)
        .chain((1..layers).map(Checkpointing::First))
        .chain([Checkpointing::On, Checkpointing::Offload])
        .collect()
}

/// The share of a budget the estimates may fill (the rest: the allocator's rounding, library
/// workspaces, what the estimates miss).
pub const BUDGET_SHARE: f64 = 0.92;

/// Under a budget of `room` bytes (the budget less what the weights, adapters and optimizer
/// hold): the fastest way to train micro-batches of `rows` rows whose estimate fits: for each
/// split of the micro-batch into 1, 2, 4, … smaller ones (the same examples per step), each of
/// `modes` in order. `needs(rows)` estimates a micro-batch of `rows` rows. `None`: not even one
/// row fits in any of `modes`.
pub fn fit(room: u64, rows: u64, modes: &[Checkpointing], needs: impl Fn(u64) -> Needs) -> Option<(Checkpointing, usize)> {
    let mut split = 1u64;
    loop {
        let n = needs(rows.div_ceil(split));
        if let Some(&m) = modes.iter().find(|&&m| n.of(m).is_some_and(|b| (b as f64) <= room as f64 * BUDGET_SHARE)) {
            return Some((m, split as usize));
        }
        if rows.div_ceil(split) <= 1 {
            return None;
        }
        split *= 2;
    }
}

/// `memory_budget`'s plan, logged: what backward keeps and how many smaller micro-batches each
/// planned one of `examples` examples (rows of `row_len` tokens) runs as, under `budget` bytes
/// per GPU of which `resident` are held before any activation ([`fit`]; where nothing is
/// estimated to fit, the most frugal way one example at a time, with a warning). An error when
/// the budget is below `resident`.
pub fn plan_within(budget: u64, resident: u64, examples: u64, row_len: u64, modes: &[Checkpointing], needs: impl Fn(u64) -> Needs) -> anyhow::Result<(Checkpointing, usize)> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    anyhow::ensure!(
        resident < budget,
        "memory_budget {:.2} GiB is below what training holds before any activations: {:.2} GiB of weights, adapters and optimizer state on the GPU",
        gib(budget),
        gib(resident)
    );
    let (mode, split) = fit(budget - resident, examples, modes, needs).unwrap_or_else(|| {
        tracing::warn!("memory_budget {:.2} GiB: even one example of {row_len} tokens is estimated not to fit beside {:.2} GiB of weights; trying anyway", gib(budget), gib(resident));
        (*modes.last().unwrap_or(&Checkpointing::On), examples.max(1) as usize)
    });
    tracing::info!(
        "memory_budget {:.2} GiB per GPU ({:.2} held by weights, adapters and optimizer): {}, micro-batches of {} examples ({} per planned one); a step that still runs out of memory retries with the next more frugal setting",
        gib(budget),
        gib(resident),
        mode.describe(),
        examples.div_ceil(split as u64),
        split
    );
    Ok((mode, split))
}

/// The next, more frugal way after `c` among `modes` (`None` at the last), by `needs`: the first
/// that needs at most halfway between `c` and checkpointing every layer (halving the layers that
/// keep their activations, so that a retry after running out of memory gets there in about
/// log₂ of the layers), else the next.
pub fn more_frugal(c: Checkpointing, modes: &[Checkpointing], needs: &Needs) -> Option<Checkpointing> {
    let at = modes.iter().position(|&m| m == c)?;
    let rest = &modes[at + 1..];
    let halfway = match (needs.of(c), needs.of(Checkpointing::On)) {
        (Some(now), Some(on)) if now > on => Some(on + (now - on) / 2),
        _ => None,
    };
    halfway.and_then(|h| rest.iter().find(|&&m| needs.of(m).is_some_and(|n| n <= h))).or(rest.first()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B's shape as the benches build it.
    fn llama_7b() -> DecoderConfig {
        let j = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5});
        DecoderConfig::from_json(&j).unwrap()
    }

    const GIB: f64 = (1u64 << 30) as f64;

    /// Plain LoRA with dropout 0.05 (the benches') on projections of these input widths.
    fn lora(inputs: &[u64]) -> Vec<Adapted> {
        inputs.iter().map(|&i| Adapted { in_features: i, out_features: 4096, dropout: 0.05, fused: true }).collect()
    }

    /// LoRA on q_proj and v_proj of a model `hidden` wide, in bf16.
    fn q_v(hidden: u64) -> AdapterKeep {
        AdapterKeep { attention: AdapterKeep::of_group(&lora(&[hidden, hidden]), false, 2), mlp: 0 }
    }

    /// LoRA on every projection of the 7B (`"all-linear"`), in bf16.
    fn all_linear_7b() -> AdapterKeep {
        let (h, i) = (4096, 11008);
        let attention = AdapterKeep::of_group(&lora(&[h, h, h]), false, 2) + AdapterKeep::of_group(&lora(&[h]), true, 2);
        let mlp = AdapterKeep::of_group(&lora(&[h, h]), false, 2) + AdapterKeep::of_group(&lora(&[i]), false, 2);
        AdapterKeep { attention, mlp }
    }

    /// Qwen3-8B's shape as the benches build it (q/k norms, GQA 32/8, 151,936-token vocabulary).
    fn qwen3_8b() -> DecoderConfig {
        let j = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6});
        DecoderConfig::from_json(&j).unwrap()
    }

    /// What an adapter keeps: with dropout its copy of the input and a mask byte a value; without,
    /// its group's input once (none where the layer keeps that input itself); off the fused path
    /// two products of its output's width besides.
    #[test]
    fn adapters_keep_their_dropped_inputs_and_masks() {
        let plain = |dropout: f64, fused: bool| Adapted { in_features: 100, out_features: 30, dropout, fused };
        assert_eq!(AdapterKeep::of_group(&[plain(0.1, true), plain(0.1, true)], false, 2), 2 * 100 * 3);
        assert_eq!(AdapterKeep::of_group(&[plain(0.0, true), plain(0.0, true)], false, 2), 100 * 2);
        assert_eq!(AdapterKeep::of_group(&[plain(0.0, true)], true, 2), 0);
        assert_eq!(AdapterKeep::of_group(&[plain(0.1, true), plain(0.0, true)], false, 4), 100 * 5 + 100 * 4);
        assert_eq!(AdapterKeep::of_group(&[plain(0.0, false)], true, 2), 2 * 30 * 2);
        assert_eq!(AdapterKeep::of_group(&[], false, 2), 0);
    }

    /// Keeping everything, 4 rows × 2048 tokens in bf16, against the peaks measured on an H200
    /// less the weights, adapters and optimizer state (2026-12-04): the 7B with q+v LoRA 29.75
    /// GiB (42.30 − 12.55), with all-linear r=16 LoRA ~49.6 (62.75 − ~13.15), Qwen3-8B with q+v
    /// 34.28 (49.54 − 15.26). Within 1.5% (a miscounted activation of `H` values a layer would
    /// move the 7B's by 7%).
    #[test]
    fn keeping_everything_is_estimated_as_the_h200_measured() {
        for (name, c, adapters, measured) in [("7B q+v", llama_7b(), q_v(4096), 29.75), ("7B all-linear", llama_7b(), all_linear_7b(), 49.6), ("Qwen3-8B q+v", qwen3_8b(), q_v(4096), 34.28)] {
            let off = decoder_needs(&c, 4, 2048, Kind::BFloat16, adapters, true).off as f64 / GIB;
            assert!((off / measured - 1.0).abs() < 0.015, "{name}: ~{off:.2} GiB estimated, {measured} measured");
        }
    }

    /// The 7B, q+v LoRA, 4 rows × 2048 tokens, bf16, measured on an H200 (2026-12-04): 12.55 GiB of
    /// weights; peaks 15.87 GiB checkpointing, 14.06 offloading, 42.3 keeping everything. The
    /// estimates must be near the measured checkpointing and offloading peaks (so a budget at
    /// Unsloth's 14.35 GiB picks offloading).
    #[test]
    fn the_7b_estimates_are_near_what_the_h200_measured() {
        let n = decoder_needs(&llama_7b(), 4, 2048, Kind::BFloat16, q_v(4096), true);
        let (on, offload) = (n.on as f64 / GIB, n.offload.unwrap() as f64 / GIB);
        assert!((on - (15.87 - 12.55)).abs() < 0.3, "checkpointing ~{on:.2} GiB");
        assert!((offload - (14.06 - 12.55)).abs() < 0.3, "offloading ~{offload:.2} GiB");
        let room = ((14.35 - 12.55 - 0.06) * GIB) as u64;
        let needs = |rows| decoder_needs(&llama_7b(), rows, 2048, Kind::BFloat16, q_v(4096), true);
        assert_eq!(fit(room, 4, &ladder(32), needs), Some((Checkpointing::Offload, 1)));
        assert_eq!(fit((4.0 * GIB) as u64, 4, &ladder(32), needs), Some((Checkpointing::On, 1)));
        // keeping everything (measured 29.75 GiB) asks for 33 GiB of room (the budget's share);
        // with 30, some of the first layers are checkpointed
        assert!(matches!(fit((30.0 * GIB) as u64, 4, &ladder(32), needs), Some((Checkpointing::First(1..=31), 1))));
        assert_eq!(fit((33.0 * GIB) as u64, 4, &ladder(32), needs), Some((Checkpointing::Off, 1)));
        // a budget too small for 4 rows offloaded, enough for 2: two micro-batches of 2 rows
        assert_eq!(fit((1.2 * GIB) as u64, 4, &ladder(32), needs), Some((Checkpointing::Offload, 2)));
        // checkpointing asked for: never offloaded, smaller micro-batches instead
        assert_eq!(fit(room, 4, &[Checkpointing::On], needs), Some((Checkpointing::On, 4)));
        assert_eq!(fit(1 << 20, 4, &ladder(32), needs), None);
    }

    #[test]
    fn the_ladder_steps_to_more_frugal_ways() {
        let three = ladder(3);
        assert_eq!(three, [Checkpointing::Off, Checkpointing::First(1), Checkpointing::First(2), Checkpointing::On, Checkpointing::Offload]);
        let needs = |layers| Needs { off: 100 + layers as u64 * 10, on: 100, offload: Some(60), per_layer: Some((layers, 10)) };
        let n3 = needs(3);
        // all 3 layers keep theirs: halfway is 1.5 layers, so 1 keeps them (the first 2 checkpointed)
        assert_eq!(more_frugal(Checkpointing::Off, &three, &n3), Some(Checkpointing::First(2)));
        assert_eq!(more_frugal(Checkpointing::First(1), &three, &n3), Some(Checkpointing::First(2)));
        assert_eq!(more_frugal(Checkpointing::First(2), &three, &n3), Some(Checkpointing::On));
        assert_eq!(more_frugal(Checkpointing::On, &three, &n3), Some(Checkpointing::Offload));
        assert_eq!(more_frugal(Checkpointing::Offload, &three, &n3), None);
        assert_eq!(more_frugal(Checkpointing::On, &[Checkpointing::On], &n3), None);
        // 32 layers: 32 → 16 → 8 → 4 → 2 → 1 keeping theirs, then each layer checkpointed, then offloaded
        let (n32, all) = (needs(32), ladder(32));
        let mut steps = vec![Checkpointing::Off];
        while let Some(next) = more_frugal(*steps.last().unwrap(), &all, &n32) {
            steps.push(next);
        }
        let firsts = [16, 24, 28, 30, 31].map(Checkpointing::First);
        assert_eq!(steps, [&[Checkpointing::Off][..], &firsts, &[Checkpointing::On, Checkpointing::Offload]].concat());
    }

    /// Checkpointing the first `n` layers needs `on` plus what each of the other layers keeps
    /// beyond its input: between `on` and `off`, falling as `n` grows; the budget's plan takes the
    /// fewest checkpointed layers that fit (the 7B all-linear r=16 recipe against Unsloth's
    /// 50.0 GiB whole-GPU peak: some layers checkpointed, not all).
    #[test]
    fn checkpointing_the_first_layers_fits_between_none_and_all() {
        let needs = |rows| decoder_needs(&llama_7b(), rows, 2048, Kind::BFloat16, all_linear_7b(), true);
        let n = needs(4);
        let first = |k| n.of(Checkpointing::First(k)).unwrap();
        assert!(first(1) < n.off && first(31) > n.on);
        assert!((1..31).all(|k| first(k + 1) < first(k)));
        assert_eq!(n.of(Checkpointing::First(32)), Some(n.on));
        // 12.6 GiB of weights and adapters: 37.4 GiB of room
        let room = ((50.0 - 12.6) * GIB) as u64;
        let Some((Checkpointing::First(k), 1)) = fit(room, 4, &ladder(32), needs) else { panic!("{:?}", fit(room, 4, &ladder(32), needs)) };
        assert!((8..24).contains(&k), "{k} layers checkpointed");
        assert!(first(k) as f64 <= room as f64 * BUDGET_SHARE && first(k - 1) as f64 > room as f64 * BUDGET_SHARE);
        assert_eq!(fewest_checkpointed(n, first(k)), Some(Checkpointing::First(k)));
        assert_eq!(fewest_checkpointed(n, n.on), None);
        // "auto" without a budget, from the free memory: everything where it fits in 85% of it,
        // else the fewest checkpointed layers that do, else each layer
        let free = |bytes: u64| Some((bytes, 80 << 30));
        assert_eq!(plan_for(n, free(n.off * 2), false).0, Checkpointing::Off);
        let (c, why) = plan_for(n, free((first(k) as f64 / 0.85) as u64 + (1 << 20)), false);
        assert_eq!(c, Checkpointing::First(k), "{why}");
        assert!(why.contains(&format!("checkpointing the first {k} layers")), "{why}");
        assert_eq!(plan_for(n, free(n.on), false).0, Checkpointing::On);
        assert_eq!(plan_for(n, None, true).0, Checkpointing::Off);
    }
}
