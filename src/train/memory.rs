//! Deciding whether gradient checkpointing is needed (`gradient_checkpointing: "auto"`).
//!
//! Without checkpointing, backward keeps every decoder layer's activations. Per token and
//! layer that is about `10·H + 4·I` values (norm outputs, q/k/v, attention output, residuals,
//! gate/up projections and their SiLU product; flash attention keeps no T×T matrix; a sparse
//! layer's experts, [`DecoderConfig::feed_forward_size`]), each in
//! the compute dtype, plus LoRA's dropout copies of its inputs. Checkpointing keeps one `H`
//! vector per layer instead and recomputes the rest, costing one more forward pass. Soft-capped
//! attention (Gemma 2) keeps `[heads, T, T]` matrices per row and layer: with its kernel
//! ([`crate::cuda::autograd::softcap_softmax`]) the raw scores and the probabilities, two in the
//! compute dtype; op by op about four (the capped scores, the fp32 softmax and its cast), counted in fp32.

use crate::models::config::DecoderConfig;
use tch::{Device, Kind};

/// Activation bytes one micro-batch of `rows` rows of `row_len` tokens keeps for backward
/// without checkpointing (on a GPU when `gpu`).
pub fn activation_bytes(c: &DecoderConfig, rows: u64, row_len: u64, kind: Kind, lora_layers_per_block: u64, gpu: bool) -> u64 {
    let h = c.hidden_size as u64;
    let layers = c.num_hidden_layers as u64;
    let per_token: u64 = (0..c.num_hidden_layers).map(|l| 10 * h + c.feed_forward_size(l).2 + lora_layers_per_block * h).sum();
    let dense = per_token * rows * row_len * kind.elt_size_in_bytes() as u64;
    let matrices = if gpu && crate::cuda::autograd::softcap_kernel_on() { 2 * kind.elt_size_in_bytes() as u64 } else { 4 * 4 };
    let scores = if c.attn_softcap.is_some() { matrices * rows * c.num_attention_heads as u64 * row_len * row_len * layers } else { 0 };
    dense + scores
}

/// `(checkpoint?, why)`: checkpoint unless the activations fit in 85% of the free device memory.
pub fn plan(c: &DecoderConfig, rows: u64, row_len: u64, kind: Kind, lora_layers_per_block: u64, device: Device) -> (bool, String) {
    decide(activation_bytes(c, rows, row_len, kind, lora_layers_per_block, device.is_cuda()), device)
}

/// `(checkpoint?, why)` for activations of `need` bytes on `device`.
pub fn decide(need: u64, device: Device) -> (bool, String) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match crate::cuda::mem_info(device) {
        Some((free, total)) => {
            let budget = free as f64 * 0.85;
            if (need as f64) < budget {
                (false, format!("activations need ~{:.1} GiB, {:.1} of {:.1} GiB free: no checkpointing (faster)", gib(need), gib(free), gib(total)))
            } else {
                (true, format!("activations need ~{:.1} GiB but only {:.1} GiB are free: checkpointing each layer", gib(need), gib(free)))
            }
        }
        None if device == Device::Cpu => (false, format!("on the CPU (activations ~{:.1} GiB): no checkpointing", gib(need))),
        None => (true, "free device memory unknown: checkpointing to be safe".into()),
    }
}
