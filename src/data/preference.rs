//! Preference records, tokenized as TRL 1.x tokenizes them: pairs `{prompt, chosen, rejected}`
//! (DPO, ORPO) and judged completions `{prompt, completion, label}` (KTO).
//!
//! Plain text: the completion gets the EOS token's text appended (unless it ends with it), and
//! `prompt` and `prompt + completion` are tokenized with the tokenizer's special tokens.
//! Conversations (`prompt` a list of messages, completions lists of assistant messages): the
//! model's chat template renders `prompt` with the generation prompt and `prompt + completion`
//! without it, tokenized without special tokens (the template writes them). The completion
//! starts where the two token sequences diverge, for a pair the earlier of the chosen's and the
//! rejected's point (the prompt keeps what both share).

use super::format::string_field;
use super::template::render_chat;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde_json::Value;

/// A tokenized preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

/// A tokenized completion judged desirable (`label: true`) or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub prompt: Vec<i64>,
    pub completion: Vec<i64>,
    pub desirable: bool,
}

/// Leading tokens `a` and `b` share.
fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A record's prompt and completion fields, as text or as messages.
enum Text {
    Plain(String),
    Chat(Vec<Value>),
}

fn field(record: &Value, key: &str, at: &str, what: &str) -> Result<Text> {
    match record.get(key) {
        Some(Value::Array(m)) => Ok(Text::Chat(m.clone())),
        _ => Ok(Text::Plain(string_field(record, key, at, what)?)),
    }
}

/// Token ids of `prompt` alone and of `prompt` followed by each completion.
fn tokenize(tok: &Tokenizer, prompt: &Text, completions: &[Text], at: &str) -> Result<(Vec<i64>, Vec<Vec<i64>>)> {
    match prompt {
        Text::Plain(p) => {
            let eos = tok.eos_token.clone().unwrap_or_default();
            let full = completions
                .iter()
                .map(|c| match c {
                    Text::Plain(c) if c.ends_with(&eos) => tok.encode(&format!("{p}{c}"), true),
                    Text::Plain(c) => tok.encode(&format!("{p}{c}{eos}"), true),
                    Text::Chat(_) => bail!("{at}: the prompt is text but a completion is a list of messages; give both as text or both as messages"),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((tok.encode(p, true)?, full))
        }
        Text::Chat(p) => {
            let template = tok.chat_template.as_deref().ok_or_else(|| anyhow::anyhow!("{at}: the record holds messages, but the model's tokenizer has no chat_template"))?;
            let render = |messages: Vec<Value>, generation: bool| -> Result<Vec<i64>> {
                let text = render_chat(template, &Value::Array(messages), generation, tok.bos_token.as_deref(), tok.eos_token.as_deref()).map_err(|e| anyhow::anyhow!("{at}: {e:#}"))?;
                tok.encode(&text, false)
            };
            let full = completions
                .iter()
                .map(|c| match c {
                    Text::Chat(c) => render(p.iter().chain(c).cloned().collect(), false),
                    Text::Plain(_) => bail!("{at}: the prompt is a list of messages but a completion is text; give both as messages or both as text"),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((render(p.clone(), true)?, full))
        }
    }
}

/// `{prompt, chosen, rejected}`; a conversation without `prompt` takes the messages `chosen`
/// and `rejected` share as its prompt (TRL's `extract_prompt`).
pub fn pair(record: &Value, at: &str, tok: &Tokenizer) -> Result<Pair> {
    let what = "a preference pair has prompt, chosen and rejected";
    let (prompt, chosen, rejected) = match (record.get("prompt"), record.get("chosen"), record.get("rejected")) {
        (None, Some(Value::Array(c)), Some(Value::Array(r))) => {
            let shared = c.iter().zip(r).take_while(|(a, b)| a == b).count();
            (Text::Chat(c[..shared].to_vec()), Text::Chat(c[shared..].to_vec()), Text::Chat(r[shared..].to_vec()))
        }
        _ => (field(record, "prompt", at, what)?, field(record, "chosen", at, what)?, field(record, "rejected", at, what)?),
    };
    let (p, full) = tokenize(tok, &prompt, &[chosen, rejected], at)?;
    let start = common_prefix(&p, &full[0]).min(common_prefix(&p, &full[1]));
    Ok(Pair { prompt: p[..start].to_vec(), chosen: full[0][start..].to_vec(), rejected: full[1][start..].to_vec() })
}

/// `{prompt, completion, label}` with `label` true (desirable) or false.
pub fn judged(record: &Value, at: &str, tok: &Tokenizer) -> Result<Judged> {
    let what = "a KTO record has prompt, completion and label (true or false)";
    let desirable = match record.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(v) => bail!("{at}: field `label` must be true or false ({what}), got {v}"),
        None => bail!("{at}: missing field `label` ({what})"),
    };
    let (p, full) = tokenize(tok, &field(record, "prompt", at, what)?, &[field(record, "completion", at, what)?], at)?;
    let start = common_prefix(&p, &full[0]);
    Ok(Judged { prompt: p[..start].to_vec(), completion: full[0][start..].to_vec(), desirable })
}
