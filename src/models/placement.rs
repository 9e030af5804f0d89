//! Where the parts of a model live: one device, or the decoder layers split across GPUs
//! (pipeline-style placement, like transformers' `device_map="auto"`).
//!
//! A split model runs its layers in order, handing the hidden state from one GPU to the next;
//! autograd carries the gradients back across the same copies. One GPU works at a time: the
//! point is fitting a model that one GPU cannot hold, not speed.

use super::config::DecoderConfig;
use anyhow::{bail, Context, Result};
use tch::Device;

/// The device of the embeddings, of each decoder layer, and of the final norm + output head.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub embed: Device,
    pub layers: Vec<Device>,
    pub head: Device,
}

impl Placement {
    /// Everything on `device`.
    pub fn single(device: Device, num_layers: usize) -> Placement {
        Placement { embed: device, layers: vec![device; num_layers], head: device }
    }

    /// Contiguous runs of layers on each of `gpus`, balancing the bytes of weights per GPU:
    /// the embeddings count on the first GPU, an untied output head on the last (a tied head
    /// shares the embeddings, so it stays on the first). `bytes_per_weight` is what one weight
    /// of a decoder linear layer costs (2 in bf16, ~0.53 in 4 bits with its absmax).
    pub fn balanced(c: &DecoderConfig, gpus: &[Device], dense_bytes: f64, bytes_per_weight: f64) -> Placement {
        let n = gpus.len();
        let h = c.hidden_size as f64;
        let (q, kv) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
        let layer = |l: usize| {
            let (linear, dense, _) = c.feed_forward_size(l);
            (2.0 * h * q + 2.0 * h * kv + linear as f64) * bytes_per_weight + (2.0 * h + dense as f64) * dense_bytes
        };
        let embed = c.vocab_size as f64 * h * dense_bytes;
        let head = if c.tie_word_embeddings { 0.0 } else { embed };
        let sizes: Vec<f64> = (0..c.num_hidden_layers).map(layer).collect();
        let total = embed + sizes.iter().sum::<f64>() + head;
        // layer l goes to the GPU whose share of the running total its middle falls in
        let mut before = embed;
        let layers = sizes
            .iter()
            .map(|size| {
                let middle = before + size / 2.0;
                before += size;
                gpus[((middle / total * n as f64) as usize).min(n - 1)]
            })
            .collect();
        let head = if c.tie_word_embeddings { gpus[0] } else { gpus[n - 1] };
        Placement { embed: gpus[0], layers, head }
    }

    /// "layers 0–15 on cuda:0, 16–31 on cuda:1; head on cuda:1", for the log.
    pub fn describe(&self) -> String {
        let mut runs: Vec<(usize, usize, Device)> = vec![];
        for (l, &d) in self.layers.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.2 == d => r.1 = l,
                _ => runs.push((l, l, d)),
            }
        }
        let runs: Vec<String> = runs.iter().map(|(a, b, d)| format!("layers {a}–{b} on {}", name(*d))).collect();
        format!("embeddings on {}, {}, head on {}", name(self.embed), runs.join(", "), name(self.head))
    }
}

pub fn name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// What `device:` asks for: one device, or a split over several GPUs.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceSpec {
    One(Device),
    Split(Vec<Device>),
}

impl From<Device> for DeviceSpec {
    fn from(d: Device) -> Self {
        DeviceSpec::One(d)
    }
}

/// `"auto" | "cpu" | "cuda" | "cuda:N" | "cuda:0,1"`. `auto` is this process's GPU when a
/// launcher started it (data parallel, even with one process); otherwise the decoder split over every visible GPU when there are several
/// (as `device_map="auto"`), the one GPU, or the CPU. `cuda` means this process's GPU.
pub fn parse_device_spec(s: &str) -> Result<DeviceSpec> {
    let count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    Ok(match s {
        "auto" if !crate::dist::launched() && count > 1 => DeviceSpec::Split((0..count).map(Device::Cuda).collect()),
        s if s.starts_with("cuda:") && s.contains(',') => {
            let mut gpus = vec![];
            for part in s[5..].split(',') {
                let n: usize = part.trim().parse().with_context(|| format!("invalid device list `{s}`"))?;
                if n >= count {
                    bail!("device `{s}` names cuda:{n} but {count} CUDA device(s) are visible");
                }
                gpus.push(Device::Cuda(n));
            }
            DeviceSpec::Split(gpus)
        }
        s => DeviceSpec::One(super::parse_device(s)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, tied: bool) -> DecoderConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied
        });
        DecoderConfig::from_json(&json).unwrap()
    }

    #[test]
    fn splits_7b_in_halves_and_keeps_runs_contiguous() {
        let gpus = [Device::Cuda(0), Device::Cuda(1)];
        let p = Placement::balanced(&config(32, false), &gpus, 2.0, 2.0);
        assert_eq!(p.layers.iter().filter(|&&d| d == gpus[0]).count(), 16);
        assert!(p.layers.windows(2).all(|w| w[0] == w[1] || (w[0] == gpus[0] && w[1] == gpus[1])));
        assert_eq!((p.embed, p.head), (gpus[0], gpus[1]));
        assert_eq!(p.describe(), "embeddings on cuda:0, layers 0–15 on cuda:0, layers 16–31 on cuda:1, head on cuda:1");
    }

    #[test]
    fn four_bit_layers_weigh_less_than_the_embeddings() {
        // in 4 bits a layer is ~4× lighter, so the embeddings and head (bf16) push layers off
        // the first and last GPUs; every GPU still gets some, in order
        let gpus: Vec<Device> = (0..4).map(Device::Cuda).collect();
        let p = Placement::balanced(&config(32, false), &gpus, 2.0, 0.53);
        let counts: Vec<usize> = gpus.iter().map(|g| p.layers.iter().filter(|&&d| d == *g).count()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 32);
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        assert!(counts[0] < counts[1] && counts[3] < counts[2], "{counts:?}");
        let tied = Placement::balanced(&config(32, true), &gpus, 2.0, 0.53);
        assert_eq!(tied.head, gpus[0]);
    }
}
