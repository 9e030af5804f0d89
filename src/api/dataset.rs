//! `load_dataset`, `dataset` and the `Dataset` type: length, indexing, iteration, `map`,
//! `filter`, `shuffle`, `split`, `take`, concatenation.

use crate::data::dataset as data;
use crate::script::options::{from_json, rt_any, to_json};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};
use serde_json::Value;
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// A dataset as recipes see it (records are shared; every operation returns a new dataset).
#[derive(Clone, Debug)]
pub struct Dataset(pub data::Dataset);

/// `for record in ds { ... }`: the records as maps.
pub struct Records {
    records: Rc<Vec<Value>>,
    next: usize,
}

impl Iterator for Records {
    type Item = Dynamic;
    fn next(&mut self) -> Option<Dynamic> {
        let r = self.records.get(self.next)?;
        self.next += 1;
        Some(from_json(r))
    }
}

impl IntoIterator for Dataset {
    type Item = Dynamic;
    type IntoIter = Records;
    fn into_iter(self) -> Records {
        Records { records: self.0.records, next: 0 }
    }
}

pub fn load_dataset(path: &str) -> anyhow::Result<data::Dataset> {
    let resolved = crate::api::read_path(path).map_err(|e| e.context("load_dataset"))?;
    if !resolved.exists() {
        anyhow::bail!("dataset `{path}` not found");
    }
    let ds = data::Dataset::load(&resolved)?;
    tracing::info!("loaded {} records from {}", ds.len(), resolved.display());
    Ok(ds)
}

/// An array of maps → a dataset.
fn from_array(items: Array, origin: &str) -> Res<Dataset> {
    let mut records = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if !item.is_map() {
            return Err(format!("dataset: element {i} is {}, expected a map (#{{...}})", item.type_name()).into());
        }
        records.push(to_json(item));
    }
    Ok(Dataset(data::Dataset::from_records(records, origin)))
}

/// `ds[i]`: the record as a map; negative or out-of-range indices are errors.
fn index(ds: &Dataset, i: i64) -> Res<Map> {
    let n = ds.0.len();
    if i < 0 || i as usize >= n {
        return Err(format!("dataset index {i} out of range: {} has {n} records (valid: 0..{n})", ds.0.origin).into());
    }
    Ok(from_json(&ds.0.records[i as usize]).cast::<Map>())
}

/// Calls `f` on record `i`; errors name the call and the record (its file and line).
fn call_on(ctx: &NativeCallContext, what: &str, f: &FnPtr, ds: &data::Dataset, i: usize) -> Res<Dynamic> {
    crate::script::limits::callback(|| f.call_within_context::<Dynamic>(ctx, (from_json(&ds.records[i]),)))
        .map_err(|e| crate::script::prefix_error(e, &format!("{what}: {}", ds.place(i))))
}

fn map(ctx: NativeCallContext, ds: &mut Dataset, f: FnPtr) -> Res<Dataset> {
    let mut out = Vec::with_capacity(ds.0.len());
    for i in 0..ds.0.len() {
        let v = call_on(&ctx, "map", &f, &ds.0, i)?;
        if !v.is_map() {
            return Err(format!("map: {}: the function must return a map (#{{...}}), got {}", ds.0.place(i), v.type_name()).into());
        }
        out.push((to_json(&v), ds.0.place(i).clone()));
    }
    Ok(Dataset(data::Dataset::with_places(out, ds.0.origin.clone())))
}

fn filter(ctx: NativeCallContext, ds: &mut Dataset, f: FnPtr) -> Res<Dataset> {
    let mut out = vec![];
    for i in 0..ds.0.len() {
        let v = call_on(&ctx, "filter", &f, &ds.0, i)?;
        let keep = v
            .as_bool()
            .map_err(|t| format!("filter: {}: the function must return true or false, got {t}", ds.0.place(i)))?;
        if keep {
            out.push((ds.0.records[i].clone(), ds.0.place(i).clone()));
        }
    }
    Ok(Dataset(data::Dataset::with_places(out, ds.0.origin.clone())))
}

fn split_map((train, eval): (data::Dataset, data::Dataset)) -> Map {
    let mut m = Map::new();
    m.insert("train".into(), Dynamic::from(Dataset(train)));
    m.insert("eval".into(), Dynamic::from(Dataset(eval)));
    m
}

fn describe(ds: &mut Dataset) -> String {
    format!("Dataset({} records from {})", ds.0.len(), ds.0.origin)
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Dataset>("Dataset");
    engine.register_iterator::<Dataset>();

    FuncRegistration::new("load_dataset")
        .with_comments(["/// Loads records from a JSONL file (one object per line) or a JSON file holding an array of objects."])
        .with_params_info(["path: &str", "Dataset"])
        .register_into_engine(engine, |path: &str| -> Res<Dataset> { load_dataset(path).map(Dataset).map_err(rt_any) });
    FuncRegistration::new("dataset")
        .with_comments(["/// Builds a dataset from an array of maps."])
        .with_params_info(["records: Array", "Dataset"])
        .register_into_engine(engine, |records: Array| -> Res<Dataset> { from_array(records, "array") });

    FuncRegistration::new("len")
        .with_comments(["/// The number of records."])
        .with_params_info(["ds: &mut Dataset", "i64"])
        .register_into_engine(engine, |ds: &mut Dataset| -> i64 { ds.0.len() as i64 });
    FuncRegistration::new("get$len")
        .with_comments(["/// The number of records (`ds.len`)."])
        .with_params_info(["ds: &mut Dataset", "i64"])
        .register_into_engine(engine, |ds: &mut Dataset| -> i64 { ds.0.len() as i64 });
    FuncRegistration::new("is_empty")
        .with_comments(["/// Whether the dataset has no records."])
        .with_params_info(["ds: &mut Dataset", "bool"])
        .register_into_engine(engine, |ds: &mut Dataset| -> bool { ds.0.is_empty() });
    FuncRegistration::new("index$get$")
        .with_comments(["/// `ds[i]`: record `i` (0-based) as a map."])
        .with_params_info(["ds: &mut Dataset", "i: i64", "Map"])
        .register_into_engine(engine, |ds: &mut Dataset, i: i64| -> Res<Map> { index(ds, i) });

    FuncRegistration::new("map")
        .with_comments(["/// A new dataset of `f(record)` for every record; `f` must return a map."])
        .with_params_info(["ds: &mut Dataset", "f: FnPtr", "Dataset"])
        .register_into_engine(engine, map);
    FuncRegistration::new("filter")
        .with_comments(["/// A new dataset of the records for which `f(record)` returns true."])
        .with_params_info(["ds: &mut Dataset", "f: FnPtr", "Dataset"])
        .register_into_engine(engine, filter);
    FuncRegistration::new("shuffle")
        .with_comments(["/// A copy in a seeded random order (the same seed gives the same order)."])
        .with_params_info(["ds: &mut Dataset", "seed: i64", "Dataset"])
        .register_into_engine(engine, |ds: &mut Dataset, seed: i64| -> Dataset { Dataset(ds.0.shuffle(seed as u64)) });
    FuncRegistration::new("split")
        .with_comments(["/// Shuffles with `seed`, then puts round(len * fraction) records in `eval` and the rest in `train`: #{train, eval}."])
        .with_params_info(["ds: &mut Dataset", "fraction: f64", "seed: i64", "Map"])
        .register_into_engine(engine, |ds: &mut Dataset, fraction: f64, seed: i64| -> Res<Map> {
            ds.0.split(fraction, seed as u64).map(split_map).map_err(rt_any)
        });
    FuncRegistration::new("split")
        .with_comments(["/// Shuffles with `seed`, then puts `n_eval` records in `eval` and the rest in `train`: #{train, eval}."])
        .with_params_info(["ds: &mut Dataset", "n_eval: i64", "seed: i64", "Map"])
        .register_into_engine(engine, |ds: &mut Dataset, n_eval: i64, seed: i64| -> Res<Map> {
            if n_eval < 0 {
                return Err(format!("split: the eval size must not be negative, got {n_eval}").into());
            }
            ds.0.split_count(n_eval as usize, seed as u64).map(split_map).map_err(rt_any)
        });
    FuncRegistration::new("take")
        .with_comments(["/// The first `n` records (all of them if there are fewer)."])
        .with_params_info(["ds: &mut Dataset", "n: i64", "Dataset"])
        .register_into_engine(engine, |ds: &mut Dataset, n: i64| -> Dataset { Dataset(ds.0.take(n.max(0) as usize)) });
    FuncRegistration::new("concat")
        .with_comments(["/// The records of `ds` followed by those of `other`."])
        .with_params_info(["ds: &mut Dataset", "other: Dataset", "Dataset"])
        .register_into_engine(engine, |ds: &mut Dataset, other: Dataset| -> Dataset { Dataset(ds.0.concat(&other.0)) });
    FuncRegistration::new("+")
        .with_comments(["/// `a + b`: the records of `a` followed by those of `b`."])
        .with_params_info(["a: Dataset", "b: Dataset", "Dataset"])
        .register_into_engine(engine, |a: Dataset, b: Dataset| -> Dataset { Dataset(a.0.concat(&b.0)) });
    FuncRegistration::new("to_array")
        .with_comments(["/// The records as an array of maps."])
        .with_params_info(["ds: &mut Dataset", "Array"])
        .register_into_engine(engine, |ds: &mut Dataset| -> Array { ds.0.records.iter().map(from_json).collect() });
    FuncRegistration::new("to_string")
        .with_comments(["/// `Dataset(N records from PATH)`."])
        .with_params_info(["ds: &mut Dataset", "String"])
        .register_into_engine(engine, describe);
    FuncRegistration::new("to_debug")
        .with_comments(["/// `Dataset(N records from PATH)`."])
        .with_params_info(["ds: &mut Dataset", "String"])
        .register_into_engine(engine, describe);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `script::new_engine` sets it up: `eval` is a name (`split.eval`), not a keyword.
    #[allow(deprecated)]
    fn engine() -> Engine {
        let mut e = Engine::new();
        e.on_parse_token(|token, _, _| match token {
            rhai::Token::Reserved(s) if s.as_str() == "eval" => rhai::Token::Identifier(s),
            t => t,
        });
        register(&mut e);
        e
    }

    #[test]
    fn recipe_surface() {
        let e = engine();
        let script = r#"
            let ds = dataset([#{a: 1}, #{a: 2}, #{a: 3}, #{a: 4}]);
            let doubled = ds.map(|r| #{a: r.a * 2});
            let big = doubled.filter(|r| r.a > 4);
            let s = ds.split(0.5, 1);
            let both = ds + big;
            let total = 0;
            for r in both { total += r.a; }
            [ds.len, len(big), big[0].a, s.train.len + 10 * s.eval.len, both.len(), total,
             ds.concat(ds).len, ds.shuffle(3).to_array().len(), ds.take(2).len, `${ds}`]
        "#;
        let out: Array = e.eval(script).unwrap();
        let out: Vec<String> = out.iter().map(|d| d.to_string()).collect();
        assert_eq!(out, ["4", "2", "6", "22", "6", "24", "8", "4", "2", "Dataset(4 records from array)"]);
    }

    #[test]
    fn eval_is_a_name() {
        let e = engine();
        let v: i64 = e.eval("let eval = 2; let m = #{train: 1, eval: eval}; m.eval + eval(\"1 + 1\")").unwrap();
        assert_eq!(v, 4);
    }

    #[test]
    fn errors_name_the_record() {
        let e = engine();
        let err = e.eval::<Dynamic>("dataset([#{a: 1}, #{b: 2}]).map(|r| #{a: r.a + 1})").unwrap_err().to_string();
        assert!(err.contains("map: array record 1"), "{err}");
        let err = e.eval::<Dynamic>("dataset([#{a: 1}]).map(|r| r.a)").unwrap_err().to_string();
        assert!(err.contains("map: array record 0") && err.contains("must return a map"), "{err}");
        let err = e.eval::<Dynamic>("dataset([#{a: 1}]).filter(|r| 1)").unwrap_err().to_string();
        assert!(err.contains("filter: array record 0") && err.contains("true or false"), "{err}");
        let err = e.eval::<Dynamic>("dataset([#{a: 1}])[1]").unwrap_err().to_string();
        assert!(err.contains("index 1 out of range") && err.contains("1 records"), "{err}");
        let err = e.eval::<Dynamic>("dataset([#{a: 1}])[-1]").unwrap_err().to_string();
        assert!(err.contains("index -1 out of range"), "{err}");
        let err = e.eval::<Dynamic>("dataset([#{a: 1}, 2])").unwrap_err().to_string();
        assert!(err.contains("element 1"), "{err}");
    }
}
