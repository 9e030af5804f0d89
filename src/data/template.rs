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
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", template).context("chat_template does not parse")?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    env.get_template("chat")?.render(ctx).context("chat_template failed to render")
}
