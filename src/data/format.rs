//! Records → text (built-in prompt templates) → token ids with labels (prompt masked out).

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde_json::Value;

/// Labels of tokens the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The names `format_builtin` knows.
pub const BUILTIN_FORMATS: &[&str] = &["alpaca", "chatml", "text", "chat_template"];

/// A record after formatting: a prompt/response pair, or plain text.
#[derive(Clone, Debug, PartialEq)]
pub enum Formatted {
    Pair { prompt: String, response: String },
    Text(String),
    /// A rendered conversation and the byte ranges of it to learn (the assistant turns).
    Chat { text: String, learn: Vec<std::ops::Range<usize>> },
}

/// Which assistant turns of a multi-turn conversation `chat_template` trains on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrainOn {
    /// Every assistant turn (TRL's `assistant_only_loss`); the rest is masked.
    AllAssistantTurns,
    /// The last assistant turn, everything before it being the prompt.
    LastAssistantTurn,
}

impl Formatted {
    /// A format function's result: `{prompt, response}` or `{text}` (`at` names the record in errors).
    pub fn from_value(v: &Value, at: &str) -> Result<Formatted> {
        let Some(obj) = v.as_object() else {
            bail!("{at}: the format function must return #{{prompt, response}} or #{{text}}, got {v}");
        };
        let has = |k: &str| obj.contains_key(k);
        if has("prompt") || has("response") {
            if has("text") {
                bail!("{at}: the format function returned both `text` and `prompt`/`response`; return one kind");
            }
            let prompt = string_field(v, "prompt", at, "format function result")?;
            let response = string_field(v, "response", at, "format function result")?;
            Ok(Formatted::Pair { prompt, response })
        } else if has("text") {
            Ok(Formatted::Text(string_field(v, "text", at, "format function result")?))
        } else {
            let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
            bail!(
                "{at}: the format function must return #{{prompt, response}} or #{{text}}, got keys [{}]",
                keys.join(", ")
            )
        }
    }

    /// The texts, in order, with a tag telling the kinds apart (for cache keys).
    pub fn parts(&self) -> (u8, std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>) {
        match self {
            Formatted::Pair { prompt, response } => (b'P', prompt.into(), response.into()),
            Formatted::Text(t) => (b'T', t.into(), "".into()),
            Formatted::Chat { text, learn } => (b'C', text.into(), format!("{learn:?}").into()),
        }
    }
}

/// A tokenized training example; labels are NOT shifted (the loss shifts), -100 = ignored.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens that count in the loss.
    pub fn n_labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Examples are cut to this many tokens, keeping the start (0 = no limit).
    pub max_length: usize,
    /// Also train on the prompt tokens (else they are labelled -100).
    pub train_on_prompt: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { max_length: 2048, train_on_prompt: false }
    }
}

/// `record[key]` as a string: numbers and booleans are written out, anything else is an error
/// that names the field, the record and what needs it.
pub(crate) fn string_field(record: &Value, key: &str, at: &str, what: &str) -> Result<String> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
        None | Some(Value::Null) => {
            let have: Vec<&str> = record.as_object().map(|o| o.keys().map(|k| k.as_str()).collect()).unwrap_or_default();
            bail!("{at}: missing field `{key}` ({what}; the record has [{}])", have.join(", "))
        }
        Some(v) => bail!("{at}: field `{key}` must be a string ({what}), got {v}"),
    }
}

/// `record[key]` if present, non-null and non-empty.
fn optional_field(record: &Value, key: &str, at: &str, what: &str) -> Result<Option<String>> {
    match record.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => Ok(Some(string_field(record, key, at, what)?).filter(|s| !s.is_empty())),
    }
}

/// The Stanford Alpaca prompt (identical to `stdlib/templates.rhai`'s `alpaca`).
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(input) => format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!(
            "Below is an instruction that describes a task. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    }
}

/// Built-in templates by name: "alpaca" (with and without `input`, the standard Stanford Alpaca
/// texts, identical to stdlib/templates.rhai), "chatml", "text" (record.text), "chat_template"
/// (the model's own Jinja template over `messages` records: prompt = everything before the last
/// assistant message rendered with add_generation_prompt, response = the rest). Errors name the
/// missing field and the record (`at`: its file and line, or its place in a dataset built in the recipe).
pub fn format_builtin(name: &str, record: &Value, at: &str, tok: &Tokenizer, train_on: TrainOn) -> Result<Formatted> {
    match name {
        "alpaca" => {
            let what = "the alpaca template reads instruction, output and an optional input";
            let instruction = string_field(record, "instruction", at, what)?;
            let input = optional_field(record, "input", at, what)?;
            let output = string_field(record, "output", at, what)?;
            Ok(Formatted::Pair { prompt: alpaca_prompt(&instruction, input.as_deref()), response: output })
        }
        "chatml" => {
            let what = "the chatml template reads instruction, output and an optional input";
            let instruction = string_field(record, "instruction", at, what)?;
            let input = optional_field(record, "input", at, what)?;
            let output = string_field(record, "output", at, what)?;
            let user = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction,
            };
            Ok(Formatted::Pair {
                prompt: format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"),
                response: format!("{output}<|im_end|>"),
            })
        }
        "text" => Ok(Formatted::Text(string_field(record, "text", at, "the text template reads text")?)),
        "chat_template" => chat_template(record, at, tok, train_on),
        other => bail!("unknown format `{other}`; built-in formats: {}", BUILTIN_FORMATS.join(", ")),
    }
}

/// The model's chat template over `record.messages`. Every assistant turn: the whole conversation,
/// learning the parts the template marks with `{% generation %}` or, for a template without such
/// markers, each assistant message as rendered (the text between the conversation before it with
/// the generation prompt, and the conversation up to it). The last turn: the conversation up to
/// the last assistant message is the prompt (with the generation prompt), that message the response.
fn chat_template(record: &Value, at: &str, tok: &Tokenizer, train_on: TrainOn) -> Result<Formatted> {
    let messages = match record.get("messages") {
        Some(Value::Array(m)) => m,
        Some(v) => bail!("{at}: field `messages` must be an array of #{{role, content}}, got {v}"),
        None => bail!("{at}: missing field `messages` (the chat_template format reads messages: [#{{role, content}}, ...])"),
    };
    for (j, m) in messages.iter().enumerate() {
        if m.get("role").and_then(|r| r.as_str()).is_none() {
            bail!("{at}: message {j} has no string `role`");
        }
    }
    let is_assistant = |m: &Value| m.get("role").and_then(|r| r.as_str()) == Some("assistant");
    let Some(last) = messages.iter().rposition(is_assistant) else {
        bail!("{at}: `messages` has no assistant message to train on");
    };
    let Some(template) = tok.chat_template.as_deref() else {
        bail!("the chat_template format needs a tokenizer with a chat_template (tokenizer_config.json has none)");
    };
    let render = |msgs: &[Value], gen: bool| {
        super::template::render_chat_spans(template, &Value::Array(msgs.to_vec()), gen, tok.bos_token.as_deref(), tok.eos_token.as_deref())
            .map_err(|e| anyhow::anyhow!("{at}: {e:#}"))
    };
    let not_a_prefix = || {
        anyhow::anyhow!(
            "{at}: the chat template renders the conversation differently from its prefix \
             (the prompt is not a prefix of the full text), so the response cannot be told apart; \
             use a format function that returns #{{prompt, response}}"
        )
    };
    match train_on {
        TrainOn::LastAssistantTurn => {
            // the conversation through its last assistant message, tokenized as a whole as
            // below; the learnt tokens are that message as rendered
            let (text, marked) = render(&messages[..=last], false)?;
            if let Some(span) = marked.last() {
                return Ok(Formatted::Chat { learn: vec![span.clone()], text });
            }
            let (prompt, _) = render(&messages[..last], true)?;
            if !text.starts_with(prompt.as_str()) {
                return Err(not_a_prefix());
            }
            let last_turn = prompt.len()..text.len();
            Ok(Formatted::Chat { learn: vec![last_turn], text })
        }
        TrainOn::AllAssistantTurns => {
            let (text, marked) = render(messages, false)?;
            if !marked.is_empty() {
                return Ok(Formatted::Chat { text, learn: marked });
            }
            // assistant message `k` as rendered: after the conversation before it (with the
            // generation prompt), up to the end of the conversation through it
            let mut learn = vec![];
            for k in (0..messages.len()).filter(|&k| is_assistant(&messages[k])) {
                let (prompt, _) = render(&messages[..k], true)?;
                let (upto, _) = render(&messages[..=k], false)?;
                if !upto.starts_with(prompt.as_str()) || !text.starts_with(upto.as_str()) {
                    return Err(not_a_prefix());
                }
                learn.push(prompt.len()..upto.len());
            }
            Ok(Formatted::Chat { text, learn })
        }
    }
}

/// Tokens of a pair's prompt (BOS included where the tokenizer adds it); `None` for plain text.
pub fn prompt_tokens(f: &Formatted, tok: &Tokenizer) -> Option<usize> {
    match f {
        Formatted::Pair { prompt, .. } => tok.encode_prompt(prompt).ok().map(|p| p.len()),
        Formatted::Text(_) | Formatted::Chat { .. } => None,
    }
}

/// Appends the tokenizer's EOS to `ids` unless they already end with it.
fn push_eos(tok: &Tokenizer, ids: &mut Vec<i64>) {
    if let Some(eos) = tok.eos_id.filter(|e| ids.last() != Some(e)) {
        ids.push(eos);
    }
}

/// A pair's response as [`tokenize`] lays it after the prompt: `encode(response, false)` and
/// the EOS (not doubled).
fn response_tokens(tok: &Tokenizer, response: &str) -> Result<Vec<i64>> {
    let mut ids = tok.encode(response, false)?;
    push_eos(tok, &mut ids);
    Ok(ids)
}

/// Pair: ids = encode_prompt(prompt) ++ encode(response, add_special=false) ++ [eos];
/// labels = -100 on prompt tokens unless train_on_prompt; response ids and the EOS keep their
/// labels (also when pad == eos). Text: encode_prompt(text) ++ [eos], all labelled. EOS is not
/// added twice. Chat: encode(text, false), as transformers tokenizes a rendered chat template (the
/// template writes BOS and each turn's end itself); a token is learnt when it lies between the
/// token holding the first byte of a learnt range and the one holding its last byte, both
/// included, as transformers' `return_assistant_tokens_mask` does. Truncated to max_length (the
/// start is kept).
pub fn tokenize(f: &Formatted, tok: &Tokenizer, o: &TokenizeOptions) -> Result<Example> {
    let (mut input_ids, mut labels) = match f {
        Formatted::Pair { prompt, response } => {
            let p = tok.encode_prompt(prompt)?;
            let r = response_tokens(tok, response)?;
            let mut labels = if o.train_on_prompt { p.clone() } else { vec![IGNORE; p.len()] };
            labels.extend_from_slice(&r);
            let mut ids = p;
            ids.extend_from_slice(&r);
            (ids, labels)
        }
        Formatted::Text(text) => {
            let mut ids = tok.encode_prompt(text)?;
            push_eos(tok, &mut ids);
            (ids.clone(), ids)
        }
        Formatted::Chat { text, learn } => {
            let (ids, offsets) = tok.encode_with_offsets(text, false)?;
            let holding = |byte: usize| offsets.iter().position(|&(s, e)| s <= byte && byte < e);
            let mut learnt = vec![o.train_on_prompt; ids.len()];
            for range in learn.iter().filter(|r| !r.is_empty()) {
                let Some(first) = holding(range.start) else { break };
                let last = holding(range.end - 1).unwrap_or(ids.len() - 1);
                learnt[first..=last].iter_mut().for_each(|l| *l = true);
            }
            let labels = ids.iter().zip(&learnt).map(|(&id, &l)| if l { id } else { IGNORE }).collect();
            (ids, labels)
        }
    };
    if o.max_length > 0 {
        input_ids.truncate(o.max_length);
        labels.truncate(o.max_length);
    }
    Ok(Example { input_ids, labels })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A word-level tokenizer: `<s>` 0 (BOS, added by the post-processor), `</s>` 1 (EOS, also the
    /// pad: there is no pad token), `<unk>` 2, then a few words.
    pub(crate) fn test_tokenizer(chat_template: Option<&str>) -> Tokenizer {
        let words = ["hello", "world", "good", "bye", "user", "assistant", "<", ">", "|", "a", "b", "c"];
        let mut vocab = serde_json::Map::new();
        for (i, w) in ["<s>", "</s>", "<unk>"].iter().chain(words.iter()).enumerate() {
            vocab.insert(w.to_string(), json!(i));
        }
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "<s>"), special(1, "</s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let mut config = json!({"bos_token": "<s>", "eos_token": "</s>"});
        if let Some(t) = chat_template {
            config["chat_template"] = json!(t);
        }
        let files = vec![
            ("tokenizer.json".to_string(), serde_json::to_vec(&tj).unwrap()),
            ("tokenizer_config.json".to_string(), serde_json::to_vec(&config).unwrap()),
        ];
        Tokenizer::from_files(files, "test", None, None, None).unwrap()
    }

    fn pair(p: &str, r: &str) -> Formatted {
        Formatted::Pair { prompt: p.into(), response: r.into() }
    }

    #[test]
    fn tokenizer_basics() {
        let t = test_tokenizer(None);
        assert_eq!(t.encode("hello world", true).unwrap(), vec![0, 3, 4]);
        assert_eq!(t.encode("hello world", false).unwrap(), vec![3, 4]);
        assert_eq!((t.bos_id, t.eos_id, t.pad_id), (Some(0), Some(1), 1));
    }

    #[test]
    fn prompt_is_masked_and_eos_labelled_when_pad_is_eos() {
        let t = test_tokenizer(None);
        let o = TokenizeOptions { max_length: 64, train_on_prompt: false };
        let ex = tokenize(&pair("hello world", "good bye"), &t, &o).unwrap();
        assert_eq!(ex.input_ids, vec![0, 3, 4, 5, 6, 1]);
        assert_eq!(ex.labels, vec![-100, -100, -100, 5, 6, 1]);
        assert_eq!(t.pad_id, 1); // pad == eos, and the EOS still counts
        let ex = tokenize(&pair("hello world", "good bye"), &t, &TokenizeOptions { train_on_prompt: true, ..o.clone() }).unwrap();
        assert_eq!(ex.labels, ex.input_ids);
        // a response that already ends with EOS does not get a second one
        let ex = tokenize(&pair("hello", "bye </s>"), &t, &o).unwrap();
        assert_eq!(ex.input_ids, vec![0, 3, 6, 1]);
        assert_eq!(ex.labels, vec![-100, -100, 6, 1]);
        // a prompt that writes the BOS itself does not get a second one
        let ex = tokenize(&pair("<s> hello", "bye"), &t, &o).unwrap();
        assert_eq!(ex.input_ids, vec![0, 3, 6, 1]);
    }

    #[test]
    fn text_is_all_labelled() {
        let t = test_tokenizer(None);
        let ex = tokenize(&Formatted::Text("a b c".into()), &t, &TokenizeOptions::default()).unwrap();
        assert_eq!(ex.input_ids, vec![0, 12, 13, 14, 1]);
        assert_eq!(ex.labels, ex.input_ids);
        assert_eq!(ex.n_labelled(), 5);
    }

    #[test]
    fn truncation_keeps_the_start() {
        let t = test_tokenizer(None);
        let o = TokenizeOptions { max_length: 4, train_on_prompt: false };
        let ex = tokenize(&pair("hello world", "good bye"), &t, &o).unwrap();
        assert_eq!(ex.input_ids, vec![0, 3, 4, 5]);
        assert_eq!(ex.labels, vec![-100, -100, -100, 5]);
        let ex = tokenize(&pair("hello world a b c", "good"), &t, &o).unwrap();
        assert_eq!(ex.n_labelled(), 0);
        let ex = tokenize(&Formatted::Text("a b c a b c".into()), &t, &TokenizeOptions { max_length: 3, train_on_prompt: false }).unwrap();
        assert_eq!(ex.input_ids, vec![0, 12, 13]);
    }

    #[test]
    fn alpaca_texts_and_missing_fields() {
        let t = test_tokenizer(None);
        let r = json!({"instruction": "Add.", "input": "1 2", "output": "3"});
        let Formatted::Pair { prompt, response } = format_builtin("alpaca", &r, "record 0", &t, TrainOn::LastAssistantTurn).unwrap() else { panic!() };
        assert_eq!(
            prompt,
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
        );
        assert_eq!(response, "3");
        let r = json!({"instruction": "Hi.", "input": "", "output": 3});
        let Formatted::Pair { prompt, response } = format_builtin("alpaca", &r, "record 0", &t, TrainOn::LastAssistantTurn).unwrap() else { panic!() };
        assert_eq!(
            prompt,
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nHi.\n\n### Response:\n"
        );
        assert_eq!(response, "3");
        let e = format_builtin("alpaca", &json!({"instruction": "x"}), "record 17", &t, TrainOn::LastAssistantTurn).unwrap_err().to_string();
        assert!(e.contains("record 17") && e.contains("missing field `output`"), "{e}");
        let e = format_builtin("text", &json!({"body": "x"}), "record 4", &t, TrainOn::LastAssistantTurn).unwrap_err().to_string();
        assert!(e.contains("record 4") && e.contains("`text`") && e.contains("[body]"), "{e}");
        let e = format_builtin("nope", &json!({}), "record 0", &t, TrainOn::LastAssistantTurn).unwrap_err().to_string();
        assert!(e.contains("alpaca, chatml, text, chat_template"), "{e}");
        let Formatted::Pair { prompt, response } =
            format_builtin("chatml", &json!({"instruction": "Q", "output": "A"}), "record 0", &t, TrainOn::LastAssistantTurn).unwrap() else { panic!() };
        assert_eq!(prompt, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(response, "A<|im_end|>");
    }

    #[test]
    fn chat_template_splits_at_the_last_assistant_message() {
        let tpl = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {{ eos_token }} {% endfor %}\
                   {% if add_generation_prompt %}<|assistant|> {% endif %}";
        let t = test_tokenizer(Some(tpl));
        let r = json!({"messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
            {"role": "user", "content": "good"},
            {"role": "assistant", "content": "bye"},
        ]});
        let f = format_builtin("chat_template", &r, "record 0", &t, TrainOn::LastAssistantTurn).unwrap();
        let text = "<|user|> hello </s> <|assistant|> world </s> <|user|> good </s> <|assistant|> bye </s> ";
        let start = text.len() - "bye </s> ".len();
        assert_eq!(f, Formatted::Chat { text: text.into(), learn: vec![start..text.len()] });
        let e = format_builtin("chat_template", &json!({"messages": [{"role": "user", "content": "x"}]}), "record 3", &t, TrainOn::LastAssistantTurn)
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 3") && e.contains("no assistant"), "{e}");
        let e = format_builtin("chat_template", &r, "record 0", &test_tokenizer(None), TrainOn::LastAssistantTurn).unwrap_err().to_string();
        assert!(e.contains("chat_template"), "{e}");
        // a template whose generation prompt is not what the assistant turn starts with
        let odd = "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}{% if add_generation_prompt %}GEN {% endif %}";
        let e = format_builtin("chat_template", &r, "record 5", &test_tokenizer(Some(odd)), TrainOn::LastAssistantTurn).unwrap_err().to_string();
        assert!(e.contains("record 5") && e.contains("prefix"), "{e}");
    }

    #[test]
    fn format_function_results() {
        assert_eq!(Formatted::from_value(&json!({"prompt": "p", "response": "r"}), "record 0").unwrap(), pair("p", "r"));
        assert_eq!(Formatted::from_value(&json!({"text": "t"}), "record 0").unwrap(), Formatted::Text("t".into()));
        let e = Formatted::from_value(&json!({"prompt": "p"}), "record 9").unwrap_err().to_string();
        assert!(e.contains("record 9") && e.contains("`response`"), "{e}");
        assert!(Formatted::from_value(&json!({"x": 1}), "record 0").is_err());
    }
}
