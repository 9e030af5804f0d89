//! Text metrics for eval callbacks: `exact_match`, `bleu`, `rouge_l` (each on a pair of
//! strings or on two arrays of strings).

use crate::train::metrics;
use rhai::{Array, Engine, EvalAltResult, FuncRegistration};

type Res<T> = Result<T, Box<EvalAltResult>>;

fn strings(a: &Array, what: &str) -> Res<Vec<String>> {
    a.iter()
        .map(|d| d.clone().into_string().map_err(|t| format!("{what}: expected strings, got {t}").into()))
        .collect()
}

fn pair(name: &str, p: &Array, r: &Array) -> Res<(Vec<String>, Vec<String>)> {
    let (p, r) = (strings(p, name)?, strings(r, name)?);
    if p.len() != r.len() {
        return Err(format!("{name}: {} predictions but {} references", p.len(), r.len()).into());
    }
    Ok((p, r))
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("exact_match")
        .with_comments(["/// 1.0 if the prediction equals the reference after trimming whitespace, else 0.0."])
        .with_params_info(["prediction: &str", "reference: &str", "f64"])
        .register_into_engine(engine, |p: &str, r: &str| metrics::exact_match(p, r));
    FuncRegistration::new("exact_match")
        .with_comments(["/// Fraction of predictions equal to their reference (whitespace-trimmed)."])
        .with_params_info(["predictions: Array", "references: Array", "f64"])
        .register_into_engine(engine, |p: Array, r: Array| -> Res<f64> {
            let (p, r) = pair("exact_match", &p, &r)?;
            Ok(metrics::exact_match_corpus(&p, &r))
        });
    FuncRegistration::new("bleu")
        .with_comments(["/// Corpus BLEU (0-100) as sacrebleu computes it (13a tokenizer, 4-grams, brevity penalty)."])
        .with_params_info(["predictions: Array", "references: Array", "f64"])
        .register_into_engine(engine, |p: Array, r: Array| -> Res<f64> {
            let (p, r) = pair("bleu", &p, &r)?;
            Ok(metrics::corpus_bleu(&p, &r))
        });
    FuncRegistration::new("rouge_l")
        .with_comments(["/// ROUGE-L F-measure as the rouge-score package computes it."])
        .with_params_info(["prediction: &str", "reference: &str", "f64"])
        .register_into_engine(engine, |p: &str, r: &str| metrics::rouge_l(p, r));
    FuncRegistration::new("rouge_l")
        .with_comments(["/// Mean ROUGE-L F-measure over prediction/reference pairs."])
        .with_params_info(["predictions: Array", "references: Array", "f64"])
        .register_into_engine(engine, |p: Array, r: Array| -> Res<f64> {
            let (p, r) = pair("rouge_l", &p, &r)?;
            Ok(metrics::rouge_l_corpus(&p, &r))
        });
}
