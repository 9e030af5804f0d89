//! Prompt templates: the model's own Jinja `chat_template` (rendered with minijinja, with
//! Python-style string methods as transformers templates expect).

use anyhow::{Context, Result};

/// Renders a Hugging Face chat template over `messages` (`[{role, content}, ...]`).
pub fn render_chat(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    Ok(render_chat_spans(template, messages, add_generation_prompt, bos_token, eos_token)?.0)
}

/// Opens and closes a `{% generation %}` block in the rendered text (Unicode private use).
const GEN_OPEN: char = '\u{F8F0}';
const GEN_CLOSE: char = '\u{F8F1}';

/// [`render_chat`], plus the byte ranges of the text that the template marks with
/// `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers; empty when
/// it has none). The tags become marker characters in the output, then are cut out.
pub fn render_chat_spans(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<(String, Vec<std::ops::Range<usize>>)> {
    // `{%- generation -%}` → `{{- 'GEN_OPEN' -}}`, and the same for `endgeneration`
    static TAGS: std::sync::OnceLock<[(regex::Regex, String); 2]> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        [("endgeneration", GEN_CLOSE), ("generation", GEN_OPEN)].map(|(name, marker)| {
            (regex::Regex::new(&format!(r"\{{%(-?)\s*{name}\s*(-?)%\}}")).expect("a valid regex"), format!("{{{{$1 '{marker}' $2}}}}"))
        })
    });
    let template = tags.iter().fold(template.to_string(), |t, (re, to)| re.replace_all(&t, to.as_str()).into_owned());
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", &template).context("chat_template does not parse")?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    let marked = env.get_template("chat")?.render(ctx).context("chat_template failed to render")?;
    let (mut text, mut spans, mut open) = (String::with_capacity(marked.len()), vec![], None);
    for c in marked.chars() {
        match c {
            GEN_OPEN => open = Some(text.len()),
            GEN_CLOSE => spans.extend(open.take().map(|start| start..text.len())),
            c => text.push(c),
        }
    }
    Ok((text, spans))
}
